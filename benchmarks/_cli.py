"""``python -m benchmarks --quick | --smoke | --full``: run the workloads, write results."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._system import GB, MB, exit_on_signals, kill_children, machine, temp_dir

RESULTS = Path(__file__).resolve().parent / "results"
# Runs whose estimated peak exceeds this are reported as skipped: pickling a 1 GB frame to 8
# workers would need ~17 GB on a 24 GiB machine that others use too.
DEFAULT_CAP_GB = 16.0


@dataclass
class Config:
    sizes: list[int]
    share_size: int
    ns: list[int]
    ncols: list[int]
    # mixed dtypes (True), all float64 (False), categories each with its own ("categories")
    wide_kinds: list[bool | str]
    memory_repeats: int  # runs of mmcache and baseline sharing rows (medians reported)
    save_reps: dict[int, int]  # frame size -> mmcache/plain save repetitions
    alt_save_reps: dict[int, int]
    read_reps: dict[int, dict[str, Any]]  # frame size -> repeat() settings
    wide_reps: dict[str, Any] = field(default_factory=dict)
    ingest_rows: int = 800_000  # parquet rows to ingest (~112 bytes each in memory)
    ingest_rounds: int = 1  # runs of each ingest method, interleaved (best time reported)
    chunk_size: int = 100 * MB  # frame of the chunked Pool.map workload
    # column counts of the "categories" kind (its 10,000-column files take long to write)
    category_ncols: list[int] = field(default_factory=lambda: [1_000])
    dask_one_cluster: bool = False  # every Dask method in one cluster (not a measurement)
    # Freeze what exists once everything is imported (gc.freeze) so the collections run
    # before each repetition skip it: in the smoke run they took 80 ms each, 25 of its 90 s.
    # Not in measuring runs: it would also make the collections the interpreter starts during
    # a timed read cheaper, changing what the committed figures measure.
    freeze_gc: bool = False
    out: Path = RESULTS


def _reads(mmcache_budget: float, files_min: int, files_budget: float) -> dict[str, Any]:
    return {"mmcache": {"min_reps": 20, "max_reps": 500, "budget": mmcache_budget},
            "files": {"min_reps": files_min, "max_reps": 50, "budget": files_budget}}


QUICK = Config(
    sizes=[100 * MB],
    share_size=100 * MB,
    ns=[1, 2, 4],
    ncols=[10, 100, 1_000, 10_000],
    wide_kinds=[True, "categories"],
    memory_repeats=1,
    save_reps={100 * MB: 3},
    alt_save_reps={100 * MB: 1},
    read_reps={100 * MB: _reads(0.2, 3, 1.0)},
    wide_reps=_reads(0.2, 2, 0.5),
    out=RESULTS / "quick",
)
# CI's smoke test: every workload, format and sharing method once, on small data (N=2 is
# the smallest N at which joblib starts workers). Its figures mean little; it fails only
# if a run breaks.
SMOKE = Config(
    sizes=[20 * MB],
    share_size=20 * MB,
    ns=[2],
    ncols=[10, 1_000],
    wide_kinds=[True],
    memory_repeats=1,
    save_reps={20 * MB: 1},
    alt_save_reps={20 * MB: 1},
    read_reps={20 * MB: _reads(0.05, 1, 0.1)},
    wide_reps=_reads(0.05, 1, 0.1),
    chunk_size=20 * MB,
    ingest_rows=200_000,
    dask_one_cluster=True,  # four clusters of four nannies were half of the smoke run
    freeze_gc=True,
    out=RESULTS / "smoke",
)
FULL = Config(
    sizes=[100 * MB, GB, 4 * GB],
    share_size=GB,
    ns=[1, 2, 4, 8],
    ncols=[10, 100, 1_000, 10_000],
    wide_kinds=[True, False, "categories"],
    memory_repeats=3,
    save_reps={100 * MB: 5, GB: 3, 4 * GB: 3},
    alt_save_reps={100 * MB: 3, GB: 2, 4 * GB: 1},
    read_reps={100 * MB: _reads(1.0, 5, 3.0), GB: _reads(1.0, 3, 5.0),
               4 * GB: _reads(1.0, 2, 5.0)},
    wide_reps=_reads(1.0, 3, 3.0),
    ingest_rows=20_000_000,  # ~2.3 GB in memory: DESIGN.md asks for at least 2 GB
    chunk_size=GB,
    category_ncols=[10, 100, 1_000, 10_000],
    # interleaved rounds, best time: with other work on the machine one run gave ingest
    # 17.3 s against read_table's 3.8 s, the next 11.9 s against 13.0 s; on a quiet machine
    # read_table alone took 3.1, 8.2 and 4.2 s in a row (fresh pages, see the README)
    ingest_rounds=5,
)
WORKLOADS = ("size", "columns", "sharing", "chunks", "ingest", "dask")
_RESULT = {"size": "open_vs_size", "columns": "open_vs_columns"}  # results.json key, if other


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cfg: Config, workloads: list[str], cap: int, command: str) -> dict[str, Any]:
    from . import _chunks, _dask, _ingest, _latency, _sharing

    if cfg.freeze_gc:
        import gc

        gc.collect()
        gc.freeze()
    t0 = time.perf_counter()
    results: dict[str, Any] = {"command": command, "machine": machine(), "cap_bytes": cap,
                               "errors": []}
    # Room for the biggest frame's entry and one other file of it, plus joblib's dumps.
    with temp_dir("run", need=3 * max([*cfg.sizes, cfg.share_size])) as tmp:
        results["temp_dir"] = str(tmp)
        try:
            if "size" in workloads:
                results["open_vs_size"] = []
                for size in cfg.sizes:
                    try:
                        results["open_vs_size"].append(_latency.size_point(
                            size, tmp, save_reps=cfg.save_reps[size],
                            alt_save_reps=cfg.alt_save_reps[size],
                            read_reps=cfg.read_reps[size], log=_log))
                    except Exception as exc:
                        _fail(results, f"open/save at {size / MB:.0f} MB", exc)
            if "columns" in workloads:
                results["open_vs_columns"] = []
                for mixed in cfg.wide_kinds:
                    for ncols in cfg.category_ncols if mixed == "categories" else cfg.ncols:
                        try:
                            results["open_vs_columns"].append(_latency.columns_point(
                                ncols, mixed, tmp, reps=cfg.wide_reps, log=_log))
                        except Exception as exc:
                            _fail(results, f"open of {ncols} columns", exc)
            if "chunks" in workloads:
                try:
                    results["chunks"] = _chunks.chunks(cfg.chunk_size, tmp, log=_log)
                except Exception as exc:
                    _fail(results, "chunks", exc)
            if "ingest" in workloads:
                try:
                    results["ingest"] = _ingest.ingest_point(cfg.ingest_rows, tmp, log=_log,
                                                              rounds=cfg.ingest_rounds)
                except Exception as exc:
                    _fail(results, "ingest", exc)
            if "sharing" in workloads:
                try:
                    results["sharing"] = _sharing.sharing(cfg.share_size, cfg.ns, tmp, cap=cap,
                                                          log=_log, repeats=cfg.memory_repeats)
                except Exception as exc:
                    _fail(results, "sharing", exc)
            if "dask" in workloads:
                try:
                    results["dask"] = _dask.dask_sharing(cfg.share_size, tmp, log=_log,
                                                         one_cluster=cfg.dask_one_cluster)
                except Exception as exc:
                    _fail(results, "dask", exc)
        finally:
            kill_children(keep=_sharing.HELPERS)
    for row in results.get("chunks", {}).get("rows_out", []):
        if not row["correct"]:
            results["errors"].append(f"chunks {row['way']}: checksums differ")
    for row in results.get("sharing", {}).get("rows", []):
        for key in ("error", "wrong"):
            if key in row:
                results["errors"].append(f"sharing {row['method']} N={row['n']}: {row[key]}")
    for row in results.get("dask", {}).get("rows", []):
        # scatter/submit failing (workers restarted for memory) is what they measure; an
        # mmcache row failing, or wrong data anywhere, is a broken run.
        if ("error" in row and row["method"].startswith("share")) \
                or not row.get("checksums_equal", True):
            results["errors"].append(f"dask {row['method']}: {row.get('error', 'wrong data')}")
    results["elapsed_s"] = time.perf_counter() - t0
    return results


def _fail(results: dict[str, Any], what: str, exc: Exception) -> None:
    _log(f"ERROR in {what}: {exc}")
    traceback.print_exc()
    results["errors"].append(f"{what}: {type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true",
                      help="small sizes (100 MB, N=1,2,4), about 2 minutes; "
                           "writes to benchmarks/results/quick/")
    mode.add_argument("--smoke", action="store_true",
                      help="tiny sizes (20 MB, N=2), every workload once, under a minute: "
                           "CI's smoke test; writes to benchmarks/results/smoke/")
    mode.add_argument("--full", action="store_true",
                      help="100 MB, 1 GB, 4 GB; N=1,2,4,8 at 1 GB; under 30 minutes; writes "
                           "the committed benchmarks/results/")
    p.add_argument("--only", action="append", choices=WORKLOADS,
                   help="run only this workload (repeatable)")
    p.add_argument("--out", type=Path, help="results folder (default: see --quick/--full)")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite results.md and the plots from results.json")
    p.add_argument("--cap-gb", type=float, default=DEFAULT_CAP_GB,
                   help="skip runs whose estimated peak memory exceeds this (default "
                        f"{DEFAULT_CAP_GB:.0f})")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else SMOKE if args.smoke else FULL
    out = args.out or cfg.out
    command = "python -m benchmarks " + " ".join(argv)
    if args.report_only:
        import json

        from ._report import write

        write(json.loads((out / "results.json").read_text()), out)
        _log(f"rewrote {out / 'results.md'}")
        return 0
    exit_on_signals()
    results = run(cfg, args.only or list(WORKLOADS), int(args.cap_gb * GB), command)
    from ._report import write

    if args.only and (out / "results.json").exists():
        # One workload measured again: the others keep their committed figures (and the
        # report says which command produced which).
        import json

        old = json.loads((out / "results.json").read_text())
        commands = old.get("commands", {})
        for name in WORKLOADS:
            if name not in args.only and _RESULT.get(name, name) in old:  # measured before
                commands.setdefault(name, old.get("command", "?"))
        commands.update(dict.fromkeys(args.only, command))
        results = {**old, **results, "commands": commands}

    write(results, out)
    _log(f"wrote {out / 'results.md'} ({results['elapsed_s'] / 60:.1f} min)")
    for e in results["errors"]:
        _log(f"error: {e}")
    return 1 if results["errors"] else 0
