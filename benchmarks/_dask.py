"""Dask distributed: one frame to every worker of 2 simulated nodes x 2 workers.

Side by side in one run, each way in a fresh cluster (``SpecCluster`` of ``Nanny`` workers,
one thread each, a 2 GiB memory limit each, Dask's default memory fractions; each node's
workers get their own ``MMCACHE_DIR``):

- ``scatter``: ``client.scatter(df, broadcast=True)``, then one task per worker on it;
- ``submit``: ``client.submit(f, df)``, one task per worker, the frame in each task;
- ``mmcache.dask.share``: one copy per node, ``register(client)`` first; tasks get the handle;
- the same without ``register``, to show what Dask's accounting makes of mapped pages.

(``--smoke``, CI's test that every method still runs, uses one cluster for all four, ``share``
last since ``register`` stays on a cluster: starting four clusters of four nannies was half
of the smoke run's time; its figures are not measurements anyway.)

Every task reads every column, then holds the frame until all four have read it, and a
second more. Measured: wall time (first call until every worker has read the frame), bytes
moved between processes (loopback traffic: every process of the cluster is on this
machine; scattered data relayed by the scheduler count twice), memory added (peak of
the process tree's anonymous PSS plus the bytes of the nodes' cache directories, minus the
baseline), each worker's pause events (its status sampled every
10 ms on its own event loop), and at the hold each worker's Dask-reported memory against its
private memory (USS, and private anonymous memory: its heap).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from ._data import frame_nbytes, mixed_frame, touch_frame
from ._system import MB, private_anon, tree_memory

LIMIT = 2 * 2**30
NODES, PER_NODE = 2, 2
METHODS = ("scatter", "submit", "share", "share, no register")


# --- in the workers ----------------------------------------------------------------------


def _read_hold(df: Any, hold: float, tag: str) -> dict[str, Any]:
    """Read every column; once every worker has (``tag``'s events), hold the frame for
    ``hold`` seconds (Dask's memory measure catches up), then say what each one sees."""
    from distributed import Event, get_worker

    if hasattr(df, "open"):  # the mmcache.dask handle
        df = df.open()
    checksums = touch_frame(df)
    worker = get_worker()
    Event(f"{tag}-read-{worker.address}").set()
    Event(f"{tag}-go").wait(timeout=600)
    time.sleep(hold)
    info = psutil.Process().memory_full_info()
    return {"dask": worker.monitor.get_process_memory(), "uss": info.uss, "rss": info.rss,
            "private_anon": private_anon(), "worker": worker.address,
            "checksum": sum(checksums.values())}


async def _count_pauses(dask_worker: Any) -> None:
    """Count running -> paused transitions until told to stop (``_pauses``)."""
    old = getattr(dask_worker, "_bench_task", None)
    if old is not None:  # a cluster reused for another method (--smoke): one sampler at a time
        old.cancel()
    dask_worker._bench_pauses = 0
    dask_worker._bench_stop = False
    last = dask_worker.status.name

    async def sample() -> None:
        nonlocal last
        while not dask_worker._bench_stop:
            now = dask_worker.status.name
            if now == "paused" and last != "paused":
                dask_worker._bench_pauses += 1
            last = now
            await asyncio.sleep(0.01)

    dask_worker._bench_task = asyncio.ensure_future(sample())


def _pauses(dask_worker: Any) -> int:
    dask_worker._bench_stop = True
    return int(getattr(dask_worker, "_bench_pauses", -1))


# --- in the benchmark process --------------------------------------------------------------


def _wait_read(client: Any, tag: str, addrs: list[str], futs: list[Any],
               timeout: float) -> str | None:
    """Until every worker has read the frame; what went wrong if a task failed first (a
    worker restarted by its nanny loses scattered data, and its task with it)."""
    from distributed import Event

    waiting = list(addrs)
    end = time.monotonic() + timeout
    while waiting and time.monotonic() < end:
        if Event(f"{tag}-read-{waiting[0]}").wait(timeout=0.2):
            waiting.pop(0)
            continue
        for f in futs:
            if f.status in ("error", "cancelled", "lost"):
                with contextlib.suppress(Exception):
                    return f"{f.status}: {f.exception(timeout=5)!r}"[:300]
                return f.status
    return f"timed out waiting for {waiting}" if waiting else None


def _restarts(client: Any) -> int:
    """Worker processes its nanny restarted for memory so far (the nanny logs each)."""
    with contextlib.suppress(Exception):
        return len(client.get_events("worker-restart-memory"))
    return -1


def _loopback() -> int:
    counters = psutil.net_io_counters(pernic=True)
    return counters["lo"].bytes_sent if "lo" in counters else 0


def _anon_pss() -> int:
    """Pss_Anon of this process and its descendants: the heaps. (Entries are tmpfs files,
    counted once by the bytes of the cache directories, not where they are mapped.)"""
    return tree_memory(("Pss_Anon:",))


def _dir_bytes(dirs: list[Path]) -> int:
    total = 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


class _Peak:
    """Samples the process tree's memory (plus the cache dirs) every 50 ms; keeps the peak."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _anon_pss() + _dir_bytes(self.dirs))
            self._stop.wait(0.05)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _cluster(dirs: list[Path]) -> Any:
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {f"n{i}w{j}": {"cls": Nanny, "options": {
        "nthreads": 1, "memory_limit": LIMIT, "env": {"MMCACHE_DIR": str(d)}}}
        for i, d in enumerate(dirs) for j in range(PER_NODE)}
    return SpecCluster(workers=workers,
                       scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}})


def _node_dirs(tmp: Path) -> list[Path]:
    dirs = [tmp / f"node{i}" for i in range(NODES)]
    for d in dirs:
        d.mkdir(mode=0o700)
    return dirs


def _remove(dirs: list[Path]) -> None:
    import shutil

    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def run_method(method: str, df: Any, expect: float, tmp: Path, hold: float,
               log: Callable[[str], None],
               shared: tuple[Any, list[Path]] | None = None) -> dict[str, Any]:
    """One method, in a fresh cluster, or in ``shared`` (a cluster and its node dirs) that
    the caller started and closes."""
    from distributed import Client, Event

    import mmcache.dask as mdask

    cluster, dirs = shared if shared is not None else (None, _node_dirs(tmp))
    try:
        if cluster is None:
            cluster = _cluster(dirs)
        with Client(cluster) as client:
            client.wait_for_workers(NODES * PER_NODE, timeout=120)
            addrs = sorted(client.scheduler_info(n_workers=-1)["workers"])
            restarts0 = _restarts(client)
            if method == "share":
                mdask.register(client)
            client.run(_count_pauses)
            gc.collect()
            time.sleep(0.5)
            base, net0 = _anon_pss() + _dir_bytes(dirs), _loopback()
            with _Peak(dirs) as peak:
                t0 = time.perf_counter()
                if method == "scatter":
                    arg: Any = client.scatter(df, broadcast=True)
                elif method == "submit":
                    arg = df
                else:
                    arg = mdask.share(client, df)
                tag = f"bench-{method}-{time.monotonic_ns()}"
                futs = [client.submit(_read_hold, arg, hold, tag, workers=[a], pure=False)
                        for a in addrs]
                failed = _wait_read(client, tag, addrs, futs, timeout=600)
                wall = time.perf_counter() - t0
                Event(f"{tag}-go").set()
                results = [] if failed else client.gather(futs)
                restarts = _restarts(client)
                if restarts >= 0 and restarts0 >= 0:
                    restarts -= restarts0
            moved = _loopback() - net0
            pauses = client.run(_pauses)
            copies = {str(d): len(list(d.glob("*.json"))) for d in dirs}
            if hasattr(arg, "delete"):
                arg.delete()
            del arg, futs
        if failed:
            row = {"method": method, "error": failed, "pauses": sum(pauses.values()),
                   "restarts": restarts, "added_bytes": peak.peak - base,
                   "moved_bytes": moved, "wall_s": wall}
            log(f"dask {method}: FAILED after {wall:.1f} s: {failed}")
            return row
        row = {
            "method": method, "wall_s": wall, "moved_bytes": moved, "restarts": restarts,
            "added_bytes": peak.peak - base, "pauses": sum(pauses.values()),
            "pauses_per_worker": pauses, "workers": results,
            "entries_per_node": copies if method.startswith("share") else None,
            "checksums_equal": all(
                abs(r["checksum"] - expect) <= 1e-9 * max(abs(expect), 1.0) for r in results),
        }
        log(f"dask {method}: {row['wall_s']:.1f} s, moved {moved / MB:,.0f} MB, added "
            f"{row['added_bytes'] / MB:,.0f} MB, pauses {row['pauses']}")
        return row
    finally:
        if shared is None:
            with contextlib.suppress(Exception):
                if cluster is not None:
                    cluster.close(timeout=60)
            _remove(dirs)


def dask_sharing(size: int, tmp: Path, log: Callable[[str], None],
                 hold: float = 1.0, one_cluster: bool = False) -> dict[str, Any]:
    """Every method on one frame of about ``size`` bytes, each in a fresh cluster, or all in
    one (``one_cluster``: --smoke; ``share`` last, its ``register`` stays)."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return {"skipped": "distributed is not installed (pip install -e '.[dev]')"}
    df = mixed_frame(size)
    out: dict[str, Any] = {"frame_bytes": frame_nbytes(df), "nrows": len(df),
                           "limit_bytes": LIMIT, "nodes": NODES, "per_node": PER_NODE,
                           "hold_s": hold, "one_cluster": one_cluster, "rows": []}
    expect = sum(touch_frame(df).values())
    methods = [m for m in METHODS if m != "share"] + ["share"] if one_cluster else METHODS
    shared = None
    try:
        if one_cluster:
            dirs = _node_dirs(tmp)
            shared = (_cluster(dirs), dirs)
        for method in methods:
            try:
                out["rows"].append(run_method(method, df, expect, tmp, hold, log, shared))
            except Exception as exc:
                out["rows"].append({"method": method, "error": f"{type(exc).__name__}: {exc}"})
                log(f"dask {method}: ERROR {exc}")
    finally:
        if shared is not None:
            with contextlib.suppress(Exception):
                shared[0].close(timeout=60)
            _remove(shared[1])
    return out


# --- report ----------------------------------------------------------------------------------


def markdown(dk: dict[str, Any]) -> list[str]:
    if "skipped" in dk:
        return ["## Dask distributed", "", f"Skipped: {dk['skipped']}", ""]
    fb = dk["frame_bytes"]
    share = next((r for r in dk["rows"] if r["method"] == "share" and "error" not in r), None)
    lines = [
        "## Dask distributed: one frame to 2 nodes x 2 workers",
        "",
        f"{fb / MB:,.0f} MB mixed frame ({dk['nrows']:,} rows), {dk['nodes']} simulated nodes "
        f"x {dk['per_node']} workers (Nanny, 1 thread, {dk['limit_bytes'] / 2**30:.0f} GiB "
        "limit each, Dask's default memory fractions), one task per worker reading every "
        "column and holding it until all four have (wall time: until then). "
        + ("All methods in one cluster (--smoke), share last. " if dk.get("one_cluster")
           else "Each method in a fresh cluster. ")
        + "Moved: loopback bytes (data relayed by the scheduler count twice).",
        "",
        "| method | wall s | vs share | moved MB | memory added MB (copies of the frame) "
        "| pause events | restarts | per worker, MB: Dask-reported / USS / private anonymous |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in dk["rows"]:
        if "error" in r:
            extra = (f"{r['moved_bytes'] / MB:,.0f} | {r['added_bytes'] / MB:,.0f} "
                     f"({r['added_bytes'] / fb:.1f}) | {r['pauses']} | {r['restarts']}"
                     if "pauses" in r else " | | | ")
            lines.append(f"| {r['method']} | failed after {r.get('wall_s', 0):.1f} s: "
                         f"{r['error']} | | {extra} | |")
            continue
        per = ", ".join(f"{w['dask'] / MB:,.0f}/{w['uss'] / MB:,.0f}/{w['private_anon'] / MB:,.0f}"
                        for w in r["workers"])
        vs = f"{r['wall_s'] / share['wall_s']:.1f}x" if share else ""
        lines.append(
            f"| {r['method']} | {r['wall_s']:.2f} | {vs} | {r['moved_bytes'] / MB:,.0f} | "
            f"{r['added_bytes'] / MB:,.0f} ({r['added_bytes'] / fb:.1f}) | {r['pauses']} | "
            f"{r['restarts']} | {per} |")
    if share:
        lines += ["", f"Entries per node with share: {share['entries_per_node']}."]
    lines += [""]
    return lines


def plot(dk: dict[str, Any], out: Path) -> str | None:
    rows = [r for r in dk.get("rows", []) if "error" not in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"scatter": "#999", "submit": "#bbb", "share": "#2a7",
              "share, no register": "#8c8"}
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    names = [r["method"] for r in rows]
    for ax, key, title in zip(
            axes, ("added_bytes", "moved_bytes", "wall_s"),
            ("memory added, peak (GB)", "moved between processes (GB)", "wall time (s)"),
            strict=False):
        vals = [r[key] / (1e9 if key != "wall_s" else 1) for r in rows]
        ax.bar(names, vals, color=[colors.get(n, "#ccc") for n in names])
        ax.set_title(title)
    ax = axes[3]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [max(w["dask"] for w in r["workers"]) / 1e9 for r in rows],
           width=0.4, color="#d95", label="Dask-reported")
    ax.bar([i + 0.2 for i in x], [max(w["uss"] for w in r["workers"]) / 1e9 for r in rows],
           width=0.4, color="#59d", label="USS")
    ax.set_xticks(list(x), names)
    ax.set_title("worker memory, max (GB)")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Dask: {dk['frame_bytes'] / 1e9:.1f} GB frame, 2 nodes x 2 workers")
    fig.tight_layout()
    fig.savefig(out / "dask.png", dpi=110)
    plt.close(fig)
    return "dask.png"
