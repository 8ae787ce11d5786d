"""results.json, results.md (a table per workload, targets checked) and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from . import _ingest
from ._latency import FLOOR, MMCACHE_COLD, MMCACHE_MEMO, kind_name
from ._system import GB, MB

# DESIGN.md "Performance targets".
OPEN_SPEEDUP_TARGET = 100.0  # x faster than the fastest alternative at 1 GB
WORKERS_EXCESS_TARGET = 0.05  # of one copy, in total over N workers
SAVE_SPEED_TARGET = 0.90  # of plainly writing the same bytes
WIDE_PICKLE_TARGET = 5.0  # x faster than read_pickle: 10,000 mixed columns
WIDE_CATEGORIES_TARGET = 0.100  # s: 10,000 categorical columns, each its own categories
CHUNK_BYTES_TARGET = 1024  # bytes pickled per task of a chunked Pool.map ...
CHUNK_SPEEDUP_TARGET = 10.0  # ... and x faster than the same map over the plain frame
ALTERNATIVE_READERS = ("pd.read_pickle", "pd.read_parquet", "pd.read_feather",
                       "feather.read_table(memory_map=True).to_pandas()")
X = "\u00d7"  # the multiplication sign of ratios
VS = f"{X} mmcache"
MMCACHE_METHODS = ("mmcache-fork", "mmcache-spawn", "mmcache-forkserver")


def _mmcache_for(start: str) -> str:
    """The mmcache row an alternative is compared with: same start method (loky ~ spawn)."""
    return {"fork": "mmcache-fork", "spawn": "mmcache-spawn", "forkserver": "mmcache-forkserver",
            "loky": "mmcache-spawn"}[start]


def _baseline_for(start: str) -> str:
    return f"baseline-{start}"


def _size(n: float) -> str:
    if n >= GB:
        return f"{n / GB:.1f} GB"
    return f"{n / MB:.0f} MB"


def _secs(t: float | None) -> str:
    if t is None or not math.isfinite(t):
        return "—"
    if t < 1e-3:
        return f"{t * 1e6:.0f} µs"
    if t < 1:
        return f"{t * 1e3:.1f} ms" if t < 0.1 else f"{t * 1e3:.0f} ms"
    return f"{t:.2f} s"


def _ratio(x: float | None, y: float | None, floor: float = 0.0) -> str:
    """x / y as '12\u00d7', or '—' when it means nothing (missing, or y at or under ``floor``)."""
    if x is None or y is None or y <= floor:
        return "—"
    r = x / y
    if r >= 100:
        return f"{r:,.0f}{X}"
    if r >= 10:
        return f"{r:.0f}{X}"
    return f"{r:.2f}{X}" if r < 1 else f"{r:.1f}{X}"


def _mb(n: float | None) -> str:
    return "—" if n is None else f"{n / MB:,.0f}"


def _mean(row: dict[str, Any], key: str) -> float | None:
    if "workers" not in row:
        return None
    return float(np.mean([w["mem"][key] for w in row["workers"]]))


def _ok(row: dict[str, Any]) -> bool:
    return "workers" in row and "error" not in row


# --- derived figures --------------------------------------------------------------------------


def _index(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["method"], r["n"]): r for r in rows}


def workers_excess(sh: dict[str, Any]) -> list[dict[str, Any]]:
    """For each mmcache row: what its workers added beyond the interpreter baseline."""
    idx = _index(sh["rows"])
    out = []
    for (method, n), row in sorted(idx.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if method not in MMCACHE_METHODS or not _ok(row):
            continue
        base = idx.get((_baseline_for(row["start"]), n))
        if base is None or not _ok(base):
            continue
        sys_excess = row["workers_added"] - base["workers_added"]
        # Own processes' memory at the measuring moment includes the entry's pages, which the
        # workers map (they read all of it): that is the one copy, made by save, not by them.
        tree_excess = row["tree_added"] - row.get("entry_bytes", 0) - base["tree_added"]
        anon = sum(w["mem"]["anon"] for w in row["workers"])
        anon_base = sum(w["mem"]["anon"] for w in base["workers"])
        out.append({
            "method": method, "n": n,
            "system_excess": sys_excess,
            "tree_excess": tree_excess,
            "noise": max(row["mem_available_noise"], base["mem_available_noise"]),
            "anon_excess": anon - anon_base,
            "uss_excess": sum(w["mem"]["uss"] for w in row["workers"])
            - sum(w["mem"]["uss"] for w in base["workers"]),
            "frame_bytes": sh["frame_bytes"],
        })
    return out


def targets(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each DESIGN.md performance target measured here."""
    out: list[tuple[str, str, str]] = []
    sizes = results.get("open_vs_size", [])
    one_gb = [p for p in sizes if abs(p["target_bytes"] - GB) < GB / 10]
    for p in one_gb or sizes[-1:]:
        o = p["open"]
        cold = o[MMCACHE_COLD]["best"]
        alts = {k: o[k]["best"] for k in ALTERNATIVE_READERS if k in o}
        if alts:
            fastest = min(alts, key=lambda k: alts[k])
            speedup = alts[fastest] / cold
            out.append((
                f"open ≥ {OPEN_SPEEDUP_TARGET:.0f}{X} faster than the fastest alternative "
                f"({_size(p['frame_bytes'])} frame)",
                f"{_secs(cold)} vs {_secs(alts[fastest])} ({fastest}): {speedup:,.0f}{X}",
                "met" if speedup >= OPEN_SPEEDUP_TARGET else "MISSED",
            ))
    for p in results.get("open_vs_columns", []):
        if p["ncols"] != max(q["ncols"] for q in results["open_vs_columns"]):
            continue
        o = p["open"]
        cold, pkl = o[MMCACHE_COLD]["best"], o["pd.read_pickle"]["best"]
        what = f"open of {p['ncols']:,} {kind_name(p['mixed'])} columns x {p['rows']:,} rows"
        measured = f"{_secs(cold)} vs {_secs(pkl)} ({pkl / cold:.2f}{X} pickle's speed)"
        if FLOOR in o:
            measured += f"; floor {_secs(o[FLOOR]['best'])} ({pkl / o[FLOOR]['best']:.1f}{X})"
        if p["mixed"] == "categories":
            out.append((f"{what} ≤ {WIDE_CATEGORIES_TARGET * 1e3:.0f} ms", measured,
                        "met" if cold <= WIDE_CATEGORIES_TARGET else "MISSED"))
        elif p["mixed"]:
            out.append((f"{what} ≥ {WIDE_PICKLE_TARGET:.0f}{X} faster than read_pickle",
                        measured, "met" if pkl / cold >= WIDE_PICKLE_TARGET else "MISSED"))
        else:
            out.append((f"{what} no slower than read_pickle", measured,
                        "met" if cold <= pkl else "MISSED"))
    ch = results.get("chunks")
    if ch and len(ch["rows_out"]) >= 2:
        plain, mapped = ch["rows_out"][:2]
        speedup = plain["wall_s"] / mapped["wall_s"]
        floor = ""
        if len(ch["rows_out"]) > 2:  # each worker holding the data: the most any way can gain
            held = ch["rows_out"][2]["wall_s"]
            floor = f"; floor {_secs(held)}, at most {plain['wall_s'] / held:.1f}{X}"
        out.append((
            f"chunked Pool.map over {_size(ch['frame_bytes'])}: ≤ {CHUNK_BYTES_TARGET:,} B per "
            f"task, ≥ {CHUNK_SPEEDUP_TARGET:.0f}{X} faster than over the plain frame",
            f"{mapped['bytes_per_task']:,} B vs {plain['bytes_per_task'] / MB:,.1f} MB per task; "
            f"{_secs(mapped['wall_s'])} vs {_secs(plain['wall_s'])} ({speedup:.1f}{X}){floor}",
            "met" if mapped["bytes_per_task"] <= CHUNK_BYTES_TARGET
            and speedup >= CHUNK_SPEEDUP_TARGET else "MISSED",
        ))
    sh = results.get("sharing")
    if sh:
        limit = WORKERS_EXCESS_TARGET * sh["frame_bytes"]
        for e in workers_excess(sh):
            own = max(e["anon_excess"], e["tree_excess"])
            if e["noise"] > limit:
                by_sys = "inconclusive"
            elif e["system_excess"] <= limit:
                by_sys = "met"
            else:
                by_sys = "within noise" if e["system_excess"] - e["noise"] <= limit else "MISSED"
            out.append((
                f"{e['method']}, N={e['n']}: workers add ≤ {WORKERS_EXCESS_TARGET:.0%} of one "
                f"copy ({_size(limit)}) beyond their interpreters",
                f"own processes {e['tree_excess'] / MB:+,.0f} MB "
                f"({e['tree_excess'] / sh['frame_bytes']:.1%}), private anon "
                f"{e['anon_excess'] / MB:+,.0f} MB; MemAvailable "
                f"{e['system_excess'] / MB:+,.0f} MB "
                f"({e['system_excess'] / sh['frame_bytes']:.1%}, noise ±{e['noise'] / MB:.0f} MB)",
                f"{'met' if own <= limit else 'MISSED'} (own memory); {by_sys} (MemAvailable)",
            ))
    if "ingest" in results:
        out += _ingest.targets(results["ingest"])
    for p in sizes:
        s = p["save"]
        if "mmcache.save" not in s:
            continue
        speed = s["plain write (ndarray.tofile)"]["best"] / s["mmcache.save"]["best"]
        out.append((
            f"save ≥ {SAVE_SPEED_TARGET:.0%} of plain write speed ({_size(p['frame_bytes'])})",
            f"{_secs(s['mmcache.save']['best'])} vs "
            f"{_secs(s['plain write (ndarray.tofile)']['best'])}: {speed:.0%}",
            "met" if speed >= SAVE_SPEED_TARGET else "MISSED",
        ))
    return out


# --- markdown ---------------------------------------------------------------------------------


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _open_size_table(points: list[dict[str, Any]], key: str) -> list[str]:
    names = [MMCACHE_COLD, MMCACHE_MEMO, *ALTERNATIVE_READERS] if key == "best" \
        else [MMCACHE_COLD, *ALTERNATIVE_READERS]
    head = ["reader", *[_size(p["frame_bytes"]) for p in points]]
    rows = []
    for name in names:
        cells = [f"`{name}`"]
        for p in points:
            o = p["open"].get(name)
            if o is None or key not in o:
                cells.append(f"skipped: {p.get('skipped', {}).get(_fmt_of(name), '')}".strip())
                continue
            t = o[key]
            cold = p["open"][MMCACHE_COLD][key]
            cells.append(_secs(t) if name == MMCACHE_COLD else f"{_secs(t)} ({_ratio(t, cold)})")
        rows.append(cells)
    return _table(head, rows)


def _fmt_of(reader: str) -> str:
    return "pickle" if "pickle" in reader else "parquet" if "parquet" in reader else "feather"


def _save_table(points: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for p in points:
        names += [k for k in p["save"] if k not in names]
    head = ["writer", *[_size(p["frame_bytes"]) for p in points]]
    rows = []
    for name in names:
        cells = [f"`{name}`"]
        for p in points:
            s = p["save"].get(name)
            if s is None:
                cells.append("skipped")
                continue
            plain = p["save"]["plain write (ndarray.tofile)"]["best"]
            speed = p["frame_bytes"] / s["best"] / GB
            cells.append(f"{_secs(s['best'])}, {speed:.2f} GB/s of frame, "
                         f"{plain / s['best']:.0%} of plain speed")
        rows.append(cells)
    return _table(head, rows)


def _columns_table(points: list[dict[str, Any]], mixed: bool | str) -> list[str]:
    pts = [p for p in points if p["mixed"] is mixed or (
        isinstance(mixed, str) and p["mixed"] == mixed)]
    if not pts:
        return []
    head = ["reader", *[f"{p['ncols']:,} cols" for p in pts]]
    rows = []
    for name in [MMCACHE_COLD, MMCACHE_MEMO, *ALTERNATIVE_READERS, FLOOR]:
        if not all(name in p["open"] for p in pts):
            continue
        cells = [f"`{name}`"]
        for p in pts:
            t = p["open"][name]["best"]
            cold = p["open"][MMCACHE_COLD]["best"]
            cells.append(_secs(t) if name == MMCACHE_COLD else f"{_secs(t)} ({_ratio(t, cold)})")
        rows.append(cells)
    return _table(head, rows)


def _sharing_tables(sh: dict[str, Any]) -> list[str]:
    idx = _index(sh["rows"])
    out: list[str] = []
    for n in sh["ns"]:
        out += [f"#### N = {n} worker{'s' if n > 1 else ''}", ""]
        head = ["method", "start", "wall s (set-up + run)", VS,
                "worker USS MB", VS, "worker PSS MB", VS,
                "worker private anon MB", "system memory added MB (set-up; workers)",
                VS, "own processes' memory added MB", VS]
        rows = []
        for row in (r for r in sh["rows"] if r["n"] == n):
            cells = [row["label"], row["start"]]
            if "skipped" in row or "error" in row:
                why = f"skipped: {row['skipped']}" if "skipped" in row else f"error: {row['error']}"
                rows.append([*cells, why, *[""] * (len(head) - 3)])
                continue
            ref = idx.get((_mmcache_for(row["start"]), n))
            ref = ref if ref and _ok(ref) else None
            is_ref = row["method"].startswith("mmcache") or row["method"].startswith("baseline")

            def vs(x: float | None, key: str, ref: dict[str, Any] | None = ref,
                   is_ref: bool = is_ref) -> str:
                if is_ref or ref is None:
                    return ""
                y = _mean(ref, key[4:]) if key.startswith("mem:") else ref[key]
                return _ratio(x, y, floor=MB if key.endswith("added") else 0.0)

            wall = row["setup_s"] + row["run_s"]
            ref_wall = ref["setup_s"] + ref["run_s"] if ref else None
            cells += [
                f"{wall:.2f} ({row['setup_s']:.2f} + {row['run_s']:.2f})",
                "" if is_ref or ref is None else _ratio(wall, ref_wall),
                _mb(_mean(row, "uss")), vs(_mean(row, "uss"), "mem:uss"),
                _mb(_mean(row, "pss")), vs(_mean(row, "pss"), "mem:pss"),
                _mb(_mean(row, "anon")),
                f"{_mb(row['total_added'])} ({_mb(row['setup_added'])}; "
                f"{_mb(row['workers_added'])})",
                vs(row["total_added"], "total_added"),
                _mb(row["tree_added"]), vs(row["tree_added"], "tree_added"),
            ]
            if "wrong" in row:
                cells[0] += f" **WRONG: {row['wrong']}**"
            rows.append(cells)
        out += [*_table(head, rows), ""]
    return out


def _calibration(sh: dict[str, Any]) -> list[str]:
    cal = sh.get("calibration")
    if not cal:
        return []
    return [
        f"MemAvailable check, same run: allocating {_size(cal['bytes'])} of anonymous memory "
        f"lowered MemAvailable by {cal['anon_seen']:.0%} of it; writing as many bytes to "
        f"tmpfs lowered it by {cal['tmpfs_seen']:.0%} of them. Where that is well under 100%, "
        "MemAvailable under-counts memory held in tmpfs (mmcache's entry, shared_memory, "
        "the mp.Array arena, joblib's memory-mapped arrays) on this machine, and the "
        "own-process column is the one to compare.",
        "",
    ]


def _files_on(results: dict[str, Any]) -> str:
    where = results.get("temp_dir")
    return str(Path(where).parent) if where else "/dev/shm"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    v = m["versions"]
    lines = [
        "# mmcache benchmarks",
        "",
        f"Command: `{results['command']}` (from the repository root, in the project's venv)  ",
        f"Date: {m['date']}; total run time {results['elapsed_s'] / 60:.1f} min  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
        f"/dev/shm tmpfs {m['shm_bytes'] / 2**30:.0f} GiB; {m['os']}  ",
        f"mmcache measured: {m.get('mmcache_source', '?')}  ",
        f"Versions: Python {m['python']}, mmcache {v['mmcache']}, pandas {v['pandas']}, "
        f"numpy {v['numpy']}, pyarrow {v['pyarrow']}, joblib {v['joblib']}, "
        f"psutil {v['psutil']}",
        "",
        "Every file (mmcache's cache dir, pickle, parquet, feather, the plain write) is on the "
        f"same file system ({_files_on(results)}). "
        "Times are the best of several repetitions (all of them are in "
        "results.json). The frame is mixed: 6 float64, 3 int64, a pandas 3 `str` column "
        "(Arrow), a category (int8 codes) and a tz-aware datetime. MB = 10^6 bytes.",
        "",
        "## DESIGN.md performance targets",
        "",
    ]
    lines += _table(["target", "measured", "verdict"], [list(t) for t in targets(results)])
    lines += [""]
    sizes = results.get("open_vs_size", [])
    if sizes:
        lines += [
            "## Open latency vs frame size",
            "",
            "Time to get a DataFrame back from the file; in brackets, how many times mmcache's "
            "cold open. Cold: mmcache's per-process memo cleared first "
            "(`mmcache._cache._MEMO.clear()`), so the files are mapped anew; memoised: "
            "the same process opens the unchanged entry again. mmcache maps the files and reads "
            "no data page at open, so the next table also times one full read of every column "
            "right after opening.",
            "",
            *_open_size_table(sizes, "best"),
            "",
            "### Open, then read every column once",
            "",
            *_open_size_table(sizes, "open_and_read_all_s"),
            "",
        ]
    cols = results.get("open_vs_columns", [])
    if cols:
        lines += ["## Open latency vs column count (1,000 rows)", ""]
        for mixed, title in ((True, "Mixed columns (float, int, str, category, tz datetime in "
                                    "turn)"), (False, "All float64"),
                             ("categories", "Categories, each column its own 50")):
            t = _columns_table(cols, mixed)
            if t:
                lines += [f"### {title}", "", *t, ""]
    ch = results.get("chunks")
    if ch:
        lines += [
            f"## Chunked Pool.map ({_size(ch['frame_bytes'])}, {ch['workers']} spawn workers, "
            f"{ch['rows_out'][0]['tasks']} row chunks)",
            "",
            "`pool.map(work, [df.iloc[i:i + n] for i in range(0, len(df), n)])`, `work` reading "
            "every column of its chunk; the pool started and warm before the clock starts. "
            "Memory added: peak drop of MemAvailable during the map. The floor: each worker "
            "holds its own copy of the frame (made before the clock starts) and a task ships "
            "only its row bounds, so the map is `work` alone; no way of shipping rows beats it.",
            "",
            *_table(["frame", "bytes per task", "wall", "memory added (MB)", "correct"], [
                [r["way"], f"{r['bytes_per_task']:,}", _secs(r["wall_s"]), _mb(r["memory_added"]),
                 "yes" if r["correct"] else "NO"] for r in ch["rows_out"]]),
            "",
        ]
    if sizes:
        lines += [
            "## Save throughput",
            "",
            "Against the physical limit measured in the same run: one `ndarray.tofile` of as "
            "many bytes as the mmcache entry, to the same file system, from memory, interleaved "
            "with mmcache's saves. Feather is written uncompressed (its fastest read).",
            "",
            *_save_table(sizes),
            "",
        ]
    sh = results.get("sharing")
    if sh:
        lines += [
            f"## Sharing one {_size(sh['frame_bytes'])} frame with N workers",
            "",
            "Each worker reads every column (sums the numbers, the string offsets and bytes "
            "through Arrow's buffers, the category codes, the datetimes) and its checksums are "
            "compared with the parent's. Memory is taken while all N workers hold the data: "
            "USS, PSS (psutil `memory_full_info()`) and private anonymous memory (from "
            "`/proc/PID/smaps`: what a copy costs; USS also counts mapped file pages that only "
            "one process maps, e.g. mmcache with one worker) are per-worker means; system "
            "memory added is `MemAvailable` before the method's set-up minus `MemAvailable` at "
            "that moment (set-up: mmcache's save, the Manager's copy, the copy into shared "
            "memory; workers: everything after; noise: the larger of the spread of the "
            "samples taken around each moment and how far MemAvailable moved from before the "
            "run to after it, once all of the run was gone). Own processes' memory added: "
            "the same change counted "
            "over the benchmark's own processes only (the sum of their anonymous and "
            "shared-memory PSS, so each page once), which other work on the machine cannot "
            "disturb. Wall time: set-up, plus creating the workers "
            "until all have read everything. Ratios compare with mmcache under the same start "
            "method (joblib's loky workers are fresh interpreters, compared with spawn). "
            "Pool-based alternatives use fork, the Linux default of this Python. "
            "Memory-hungry runs are skipped, not attempted, when their estimated peak exceeds "
            f"the cap ({results['cap_bytes'] / GB:.0f} GB) or free memory. The machine ran "
            "other work (another developer's test suite) during the run, so MemAvailable "
            "carries noise, at times hundreds of MB; the own-process figures do not.",
            "",
            *_calibration(sh),
            *_sharing_tables(sh),
            "### Beyond the interpreters' own memory (mmcache rows)",
            "",
            "What the data added: the row's figure minus the `interpreter only` baseline of "
            "the same start method and N (workers that import the same modules and run the "
            "same read over a 1,000-row frame); totals over the N workers. Own processes' "
            "memory also has the entry's bytes taken out: the workers map the entry's pages, "
            "the one copy that `save` made before they started. The verdict on the target "
            "uses the own-process and private-anon figures, which other work on the machine "
            "cannot disturb; MemAvailable is shown with the noise seen around it.",
            "",
        ]
        exc_rows = []
        for e in workers_excess(sh):
            exc_rows.append([
                e["method"], str(e["n"]),
                f"{e['tree_excess'] / MB:+,.0f} ({e['tree_excess'] / e['frame_bytes']:.1%})",
                f"{e['anon_excess'] / MB:+,.0f} ({e['anon_excess'] / e['frame_bytes']:.1%})",
                f"{e['system_excess'] / MB:+,.0f} ({e['system_excess'] / e['frame_bytes']:.1%})",
                f"±{e['noise'] / MB:.0f}", f"{e['uss_excess'] / MB:+,.0f}",
            ])
        lines += _table(["method", "N", "own processes' memory MB (of one copy)",
                         "private anon MB (of one copy)",
                         "MemAvailable MB (of one copy)", "MemAvailable noise MB",
                         "USS MB"], exc_rows)
        lines += [""]
    if "ingest" in results:
        lines += _ingest.markdown(results["ingest"])
    if "dask" in results:
        from ._dask import markdown as dask_markdown

        lines += dask_markdown(results["dask"])
    if results.get("commands"):
        lines += ["Workloads measured by other commands (`--only`): " + "; ".join(
            f"{k}: `{v}`" for k, v in sorted(results["commands"].items())), ""]
    if results.get("errors"):
        lines += ["## Errors", "", *[f"- {e}" for e in results["errors"]], ""]
    lines += ["## Plots", ""]
    for name in results.get("plots", []):
        lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------


def plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sh = results.get("sharing")
    if sh:
        fig, axes = plt.subplots(1, 4, figsize=(22, 6))
        methods = list(dict.fromkeys(r["method"] for r in sh["rows"]))
        colors = plt.get_cmap("tab20").colors
        for i, method in enumerate(methods):
            rows = [r for r in sh["rows"] if r["method"] == method and _ok(r)]
            if not rows:
                continue
            ns = [r["n"] for r in rows]
            base = method.startswith("baseline")
            style = "-o" if method.startswith("mmcache") else ":." if base else "--s"
            kw = {"label": rows[0]["label"], "color": colors[i % len(colors)],
                  "linewidth": 1 if base else 1.8}
            axes[0].plot(ns, [r["tree_added"] / MB for r in rows], style, **kw)
            axes[1].plot(ns, [r["total_added"] / MB for r in rows], style, **kw)
            axes[2].plot(ns, [_mean(r, "pss") / MB for r in rows], style, **kw)
            axes[3].plot(ns, [r["setup_s"] + r["run_s"] for r in rows], style, **kw)
        titles = ("own processes' memory added (MB)", "system memory added, MemAvailable (MB)",
                  "per-worker PSS (MB)", "wall time (s)")
        for ax, title in zip(axes, titles, strict=True):
            ax.set_xlabel("workers N")
            ax.set_title(title)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sh["ns"], [str(n) for n in sh["ns"]])
            ax.grid(alpha=0.3)
        axes[3].set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Sharing a {_size(sh['frame_bytes'])} DataFrame with N workers")
        fig.tight_layout()
        fig.savefig(out / "memory_vs_workers.png", dpi=110)
        plt.close(fig)
        written.append("memory_vs_workers.png")
    sizes = results.get("open_vs_size", [])
    if sizes:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for name in [MMCACHE_COLD, MMCACHE_MEMO, *ALTERNATIVE_READERS]:
            pts = [(p["frame_bytes"] / GB, p["open"][name]["best"]) for p in sizes
                   if name in p["open"]]
            if pts:
                ax.plot(*zip(*pts, strict=True), "-o" if "mmcache" in name else "--s",
                        label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("frame size (GB)")
        ax.set_ylabel("open time (s)")
        ax.set_title("Open latency vs frame size")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "open_vs_size.png", dpi=110)
        plt.close(fig)
        written.append("open_vs_size.png")
    cols = results.get("open_vs_columns", [])
    if cols:
        fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
        for ax, mixed in zip(axes, (True, False), strict=True):
            pts_all = [p for p in cols if p["mixed"] is mixed]
            for name in [MMCACHE_COLD, MMCACHE_MEMO, *ALTERNATIVE_READERS]:
                pts = [(p["ncols"], p["open"][name]["best"]) for p in pts_all]
                if pts:
                    ax.plot(*zip(*pts, strict=True), "-o" if "mmcache" in name else "--s",
                            label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("columns (1,000 rows)")
            ax.set_title("mixed dtypes" if mixed else "all float64")
            ax.grid(alpha=0.3, which="both")
        axes[0].set_ylabel("open time (s)")
        axes[0].legend(fontsize=8)
        fig.suptitle("Open latency vs column count")
        fig.tight_layout()
        fig.savefig(out / "open_vs_columns.png", dpi=110)
        plt.close(fig)
        written.append("open_vs_columns.png")
    if sizes:
        fig, ax = plt.subplots(figsize=(8, 5))
        names: list[str] = []
        for p in sizes:
            names += [k for k in p["save"] if k not in names]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs, ys = [], []
            for j, p in enumerate(sizes):
                if name in p["save"]:
                    xs.append(j + i * width)
                    ys.append(p["frame_bytes"] / p["save"][name]["best"] / GB)
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))],
                      [_size(p["frame_bytes"]) for p in sizes])
        ax.set_ylabel("GB of frame per second")
        ax.set_title("Save throughput (same tmpfs)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "save_throughput.png", dpi=110)
        plt.close(fig)
        written.append("save_throughput.png")
    if "dask" in results:
        from ._dask import plot as dask_plot

        name = dask_plot(results["dask"], out)
        if name:
            written.append(name)
    return written


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    try:
        results["plots"] = plots(results, out)
    except Exception as exc:  # a broken plot must not lose the measurements
        results.setdefault("errors", []).append(f"plots: {type(exc).__name__}: {exc}")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")
