"""Giving N workers one DataFrame: mmcache against the ways people do it today.

Each run measures, while all N workers hold the data they have read in full:
- wall time from starting the workers (pool creation included) until every worker has read
  everything, plus the method's own set-up (mmcache's save, a Manager assignment, a copy into
  shared memory), reported apart;
- each worker's USS, PSS and private anonymous memory (``psutil`` and ``/proc/PID/smaps``);
- system memory added: ``MemAvailable`` before the set-up minus ``MemAvailable`` at that moment,
  and the part of it added after the set-up, by the workers alone.
An interpreter baseline (workers that import the same modules and read nothing) is run for
each start method and N, so what the data costs can be told from what Python costs.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import mmcache
from mmcache import _cache as mmcache_cache

from . import _workers
from ._data import frame_nbytes, mixed_frame_rows, same_checksums, split_numeric, touch_frame
from ._system import (
    GB,
    MB,
    clear_dir,
    kill_children,
    mem_available,
    memory_of,
    sample_available,
    settle,
    tree_memory,
)

# Headroom kept free beyond a run's estimated need: the rest of the machine (and another
# developer's tests) must keep running, and a too-big run would bring in the OOM killer.
RESERVE_BYTES = 3 * GB
# Rows of the frame the interpreter baseline reads: the same code, next to no data.
TINY_ROWS = 1000
# Long-lived helper processes started by prewarm (resource trackers, the forkserver): they
# exit on their own with this process; killing one early makes its library relaunch it.
HELPERS: set[int] = set()


@dataclass(frozen=True)
class Method:
    name: str
    start: str  # start method of its workers; its interpreter baseline and mmcache reference
    label: str
    # Bytes a run needs at peak beyond what exists before it, from (N, frame, numeric, rest).
    need: Callable[[int, int, int, int], int]


_PY = 200 * MB  # a generous worker interpreter with pandas and pyarrow imported


def _interp(n: int) -> int:
    return n * _PY


METHODS: list[Method] = [
    Method("baseline-fork", "fork", "interpreter only (fork)", lambda n, f, u, r: _interp(n)),
    Method("baseline-spawn", "spawn", "interpreter only (spawn)", lambda n, f, u, r: _interp(n)),
    Method("baseline-forkserver", "forkserver", "interpreter only (forkserver)",
           lambda n, f, u, r: _interp(n)),
    Method("baseline-loky", "loky", "interpreter only (joblib loky)",
           lambda n, f, u, r: _interp(n)),
    Method("mmcache-fork", "fork", "mmcache, fork", lambda n, f, u, r: f + _interp(n)),
    Method("mmcache-spawn", "spawn", "mmcache, spawn", lambda n, f, u, r: f + _interp(n)),
    Method("mmcache-forkserver", "forkserver", "mmcache, forkserver",
           lambda n, f, u, r: f + _interp(n)),
    # Each worker holds the received pickle and the frame it unpickles at once; the parent
    # pickles one task at a time.
    Method("pickle-arg", "fork", "Pool.map, frame pickled as argument",
           lambda n, f, u, r: (2 * n + 1) * f + _interp(n)),
    Method("fork-global", "fork", "fork-inherited global", lambda n, f, u, r: _interp(n)),
    # The server keeps a copy and pickles one per client request, concurrently.
    Method("manager", "fork", "Manager().Namespace()",
           lambda n, f, u, r: (3 * n + 1) * f + _interp(n)),
    # joblib memory-maps numpy arrays over 1 MB (its default max_nbytes), pickles the rest.
    Method("joblib", "loky", "joblib Parallel (loky), frame as argument",
           lambda n, f, u, r: f + (2 * n + 1) * r + _interp(n)),
    Method("shared_memory", "fork", "shared_memory numeric block + rest pickled",
           lambda n, f, u, r: u + (2 * n + 1) * r + _interp(n)),
    Method("mp.Array", "fork", "mp.Array of doubles + rest pickled",
           lambda n, f, u, r: u + (2 * n + 1) * r + _interp(n)),
]
BY_NAME = {m.name: m for m in METHODS}


class _ThreadResult:
    """A blocking call run in a thread, polled like an AsyncResult."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._out: list[Any] = []
        self._err: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._out.append(fn())
        except BaseException as exc:
            self._err.append(exc)

    def ready(self) -> bool:
        return not self._thread.is_alive()

    def get(self, timeout: float) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("workers did not return")
        if self._err:
            raise self._err[0]
        return self._out[0]


def _shutdown_loky() -> None:
    from joblib.externals.loky import reusable_executor

    ex = reusable_executor._executor
    if ex is not None:
        ex.shutdown(wait=True, kill_workers=True)


class _Run:
    """One method at one N. ``setup`` (untimed here, timed by the caller), ``start`` (creates
    the workers; returns something with ``ready()``/``get()``), ``teardown`` (always runs)."""

    def __init__(self, method: Method, n: int, df: pd.DataFrame, tmp: Path) -> None:
        self.method, self.n, self.df, self.tmp = method, n, df, tmp
        self.pool: Any = None

    def ctx(self) -> Any:
        return mp.get_context("fork" if self.method.start == "loky" else self.method.start)

    def setup(self) -> None:
        pass

    def tasks(self, sync: _workers.Sync) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
        raise NotImplementedError

    def pool_args(self) -> tuple[Any, tuple[Any, ...]]:
        return None, ()

    def start(self, sync: _workers.Sync) -> Any:
        fn, tasks = self.tasks(sync)
        init, initargs = self.pool_args()
        self.pool = self.ctx().Pool(self.n, initializer=init, initargs=initargs)
        return self.pool.starmap_async(fn, tasks, chunksize=1)

    def teardown(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


class _Baseline(_Run):
    def setup(self) -> None:
        self.tiny = mixed_frame_rows(TINY_ROWS)

    def tasks(self, sync: _workers.Sync) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
        return _workers.baseline, [(self.tiny, sync)] * self.n


class _LokyBaseline(_Run):
    def setup(self) -> None:
        self.tiny = mixed_frame_rows(TINY_ROWS)

    def start(self, sync: _workers.Sync) -> Any:
        from joblib import Parallel, delayed

        par = Parallel(n_jobs=self.n, backend="loky", batch_size=1, pre_dispatch="all",
                       temp_folder=str(self.tmp))
        tiny = self.tiny
        return _ThreadResult(
            lambda: par(delayed(_workers.baseline)(tiny, sync) for _ in range(self.n))
        )

    def teardown(self) -> None:
        _shutdown_loky()


class _Mmcache(_Run):
    """The parent saves the frame and opens it; the opened frame is the task argument.

    It pickles as a reference (key + cache dir + version); a forked worker finds the
    parent's mapping in its inherited memo, a spawned one maps the files itself.
    """

    def setup(self) -> None:
        self.cache = self.tmp / "cache"
        self.key = f"bench-{uuid.uuid4().hex[:8]}"
        self.entry_bytes = mmcache.save(self.df, self.key, cache_dir=self.cache).nbytes
        self.frame = mmcache.open(self.key, cache_dir=self.cache)

    def tasks(self, sync: _workers.Sync) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
        return _workers.read_frame, [(self.frame, sync)] * self.n

    def teardown(self) -> None:
        super().teardown()
        self.frame = None
        with contextlib.suppress(Exception):
            mmcache.delete(self.key, cache_dir=self.cache)
        mmcache_cache._MEMO.clear()  # the parent's mapping: without this the pages stay


class _PickleArg(_Run):
    def tasks(self, sync: _workers.Sync) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
        return _workers.read_frame, [(self.df, sync)] * self.n


class _ForkGlobal(_Run):
    def setup(self) -> None:
        _workers.GLOBAL_FRAME = self.df

    def tasks(self, sync: _workers.Sync) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
        return _workers.read_global, [(sync,)] * self.n

    def teardown(self) -> None:
        super().teardown()
        _workers.GLOBAL_FRAME = None


class _Manager(_Run):
    def setup(self) -> None:
        self.manager = self.ctx().Manager()
        self.ns = self.manager.Namespace()
        self.ns.df = self.df  # pickled to the server, which keeps its own copy

    def tasks(self, sync: _workers.Sync) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
        return _workers.read_namespace, [(self.ns, sync)] * self.n

    def teardown(self) -> None:
        super().teardown()
        self.ns = None
        if getattr(self, "manager", None) is not None:
            self.manager.shutdown()
            self.manager = None


class _Joblib(_Run):
    def start(self, sync: _workers.Sync) -> Any:
        from joblib import Parallel, delayed

        # Defaults otherwise: max_nbytes="1M" memory-maps the numpy blocks into temp_folder.
        par = Parallel(n_jobs=self.n, backend="loky", batch_size=1, pre_dispatch="all",
                       temp_folder=str(self.tmp))
        df = self.df
        return _ThreadResult(
            lambda: par(delayed(_workers.read_frame)(df, sync) for _ in range(self.n))
        )

    def teardown(self) -> None:
        _shutdown_loky()


def _numeric_layout(df: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    return split_numeric(df)


class _SharedMemory(_Run):
    """The float and int columns copied into one segment; the other columns pickled."""

    def setup(self) -> None:
        floats, ints, rest = _numeric_layout(self.df)
        nrows = len(self.df)
        parts, offset = [], 0
        for names, dtype in ((floats, "<f8"), (ints, "<i8")):
            if names:
                parts.append({"names": names, "dtype": dtype, "offset": offset})
                offset += len(names) * nrows * 8
        self.shm = shared_memory.SharedMemory(create=True, size=max(offset, 1))
        for part in parts:
            block = np.ndarray((len(part["names"]), nrows), dtype=part["dtype"],
                               buffer=self.shm.buf, offset=part["offset"])
            for i, name in enumerate(part["names"]):
                block[i] = self.df[name].to_numpy()
            del block
        self.layout = {"nrows": nrows, "parts": parts}
        self.rest = self.df[rest]

    def tasks(self, sync: _workers.Sync) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
        return _workers.read_shared_memory, [(self.shm.name, self.layout, self.rest, sync)] * self.n

    def teardown(self) -> None:
        super().teardown()
        if getattr(self, "shm", None) is not None:
            self.shm.close()
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()
            self.shm = None
        self.rest = None


class _SharedArray(_Run):
    """The classic answer: numeric columns as doubles in an ``mp.Array`` inherited by the
    Pool's initializer; the other columns (which it cannot hold) pickled."""

    def setup(self) -> None:
        floats, ints, rest = _numeric_layout(self.df)
        names = floats + ints
        nrows = len(self.df)
        self.array = mp.get_context("fork").Array(ctypes.c_double, len(names) * nrows, lock=False)
        block = np.frombuffer(self.array, dtype=np.float64).reshape(len(names), nrows)
        for i, name in enumerate(names):
            block[i] = self.df[name].to_numpy()
        del block
        self.layout = {"nrows": nrows, "names": names}
        self.rest = self.df[rest]

    def pool_args(self) -> tuple[Any, tuple[Any, ...]]:
        return _workers.init_shared_array, (self.array,)

    def tasks(self, sync: _workers.Sync) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
        return _workers.read_shared_array, [(self.layout, self.rest, sync)] * self.n

    def teardown(self) -> None:
        super().teardown()
        self.array = None
        self.rest = None


_RUNS: dict[str, type[_Run]] = {
    "baseline-fork": _Baseline,
    "baseline-spawn": _Baseline,
    "baseline-forkserver": _Baseline,
    "baseline-loky": _LokyBaseline,
    "mmcache-fork": _Mmcache,
    "mmcache-spawn": _Mmcache,
    "mmcache-forkserver": _Mmcache,
    "pickle-arg": _PickleArg,
    "fork-global": _ForkGlobal,
    "manager": _Manager,
    "joblib": _Joblib,
    "shared_memory": _SharedMemory,
    "mp.Array": _SharedArray,
}


def _wait_count(folder: Path, prefix: str, n: int, handle: Any, timeout: float) -> None:
    """Wait until ``n`` files ``prefix.*`` exist; fail fast if the workers' call ended."""
    end = time.monotonic() + timeout
    while len(list(folder.glob(f"{prefix}.*"))) < n:
        if handle.ready():
            handle.get(0)  # raises the workers' error
            raise RuntimeError(f"workers returned before all wrote {prefix}")
        if time.monotonic() > end:
            raise TimeoutError(f"only {len(list(folder.glob(prefix + '.*')))} of {n} workers "
                               f"reached '{prefix}' within {timeout:.0f} s")
        time.sleep(0.005)


def run_one(
    method: Method, n: int, df: pd.DataFrame, tmp: Path, reference: dict[str, float],
    sizes: tuple[int, int, int], *, cap: int, keep: set[int], timeout: float,
) -> dict[str, Any]:
    """Run ``method`` with ``n`` workers once; a result row (or a skip/error row)."""
    row: dict[str, Any] = {"method": method.name, "label": method.label, "start": method.start,
                           "n": n}
    if method.start == "loky" and n == 1:
        row["skipped"] = "joblib runs n_jobs=1 in the calling process, without workers"
        return row
    need = method.need(n, *sizes)
    row["need_bytes"] = need
    avail = mem_available()
    if need > cap:
        row["skipped"] = f"would need {need / GB:.1f} GB (cap {cap / GB:.0f} GB)"
        return row
    if need > avail - RESERVE_BYTES:
        row["skipped"] = (f"would need {need / GB:.1f} GB; {avail / GB:.1f} GB available, "
                          f"{RESERVE_BYTES / GB:.0f} GB kept in reserve")
        return row
    sync_dir = tmp / f"sync-{uuid.uuid4().hex[:8]}"
    sync_dir.mkdir()
    sync = _workers.Sync(str(sync_dir), timeout)
    run = _RUNS[method.name](method, n, df, tmp)
    handle = None
    try:
        settle()
        m0, noise0 = sample_available()
        tree0 = tree_memory()
        t = time.perf_counter()
        run.setup()
        row["setup_s"] = time.perf_counter() - t
        gc.collect()
        m1, noise1 = sample_available(3)
        t0 = time.perf_counter()
        handle = run.start(sync)
        _wait_count(sync_dir, "ready", n, handle, timeout)
        row["run_s"] = time.perf_counter() - t0
        _workers.mark(sync_dir / "measure")
        _wait_count(sync_dir, "measured", n, handle, timeout)
        m2, noise2 = sample_available()
        tree2 = tree_memory()
        row["parent"] = memory_of()
        _workers.mark(sync_dir / "release")
        results = handle.get(timeout)
        row["setup_added"] = m0 - m1
        row["workers_added"] = m1 - m2
        row["total_added"] = m0 - m2
        row["tree_added"] = tree2 - tree0
        row["mem_available_noise"] = max(noise0, noise1, noise2)
        if isinstance(run, _Mmcache):
            row["entry_bytes"] = run.entry_bytes
        row["workers"] = [{"mem": r["mem"], "read_s": r["read_s"], "pid": r["pid"]}
                          for r in results]
        if not method.name.startswith("baseline"):
            bad = sorted({c for r in results for c in same_checksums(r["checksums"], reference)})
            if bad:
                row["wrong"] = f"checksums differ in columns {bad}"
    except BaseException as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        (sync_dir / "abort").touch()
        if not isinstance(exc, Exception):
            raise
    finally:
        try:
            run.teardown()
        finally:
            killed = kill_children(keep)
            if killed:
                row.setdefault("notes", []).append(f"killed leftover processes {killed}")
            clear_dir(sync_dir)
            sync_dir.rmdir()
    if "total_added" in row:
        # How far MemAvailable moved between before and after the run, everything of the
        # run gone: other work on the machine, plus anything the run left behind.
        row["leftover"] = m0 - settle()
        row["mem_available_noise"] = max(row["mem_available_noise"], abs(row["leftover"]))
    return row


def prewarm(tmp: Path) -> set[int]:
    """Start the long-lived helpers (resource trackers, the forkserver) before measuring, so
    no run is charged for them; return their pids (kept alive between runs)."""
    from multiprocessing import resource_tracker

    from joblib import Parallel, delayed

    resource_tracker.ensure_running()
    ctx = mp.get_context("forkserver")
    # Preloading makes forkserver children start with pandas & co. already imported, shared
    # with the server: the usual way to use forkserver with heavy imports.
    ctx.set_forkserver_preload(["benchmarks._workers"])
    p = ctx.Process(target=_noop)
    p.start()
    p.join(120)
    # Two jobs: joblib runs n_jobs=1 in this process and would start nothing.
    Parallel(n_jobs=2, backend="loky", temp_folder=str(tmp))(delayed(_noop)() for _ in range(2))
    _shutdown_loky()
    import psutil

    HELPERS.update(c.pid for c in psutil.Process().children(recursive=True))
    return set(HELPERS)


def _noop() -> None:
    pass


def calibrate(tmp: Path, nbytes: int) -> dict[str, Any]:
    """How much of a known allocation MemAvailable shows on this machine, for anonymous
    memory (a touched numpy array) and for tmpfs (the same bytes written to a file)."""
    path = tmp / "calibrate.bin"
    try:
        m0 = settle()
        arr = np.ones(nbytes, dtype=np.uint8)
        time.sleep(0.5)
        m1 = mem_available()
        arr.tofile(path)
        time.sleep(0.5)
        m2 = mem_available()
    finally:
        path.unlink(missing_ok=True)
    del arr
    return {"bytes": nbytes, "anon_seen": (m0 - m1) / nbytes, "tmpfs_seen": (m1 - m2) / nbytes}


_MEMORY_FIELDS = ("setup_added", "workers_added", "total_added", "tree_added")


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs: the median of each system-memory figure (MemAvailable
    moves with the rest of the machine; the median of a few runs damps that), the worker
    figures of the run with the median ``workers_added``, every run kept under ``repeats``."""
    ok = [r for r in rows if "total_added" in r]
    if len(ok) < 2:
        return rows[-1]
    ok.sort(key=lambda r: r["workers_added"])
    out = dict(ok[len(ok) // 2])
    for key in _MEMORY_FIELDS:
        out[key] = int(statistics.median(r[key] for r in ok))
    out["mem_available_noise"] = max(r["mem_available_noise"] for r in ok)
    out["repeats"] = [{k: r.get(k) for k in (*_MEMORY_FIELDS, "setup_s", "run_s")} for r in ok]
    return out


def sharing(
    size: int, ns: list[int], tmp: Path, *, cap: int, log: Callable[[str], None],
    methods: list[str] | None = None, repeats: int = 1,
) -> dict[str, Any]:
    """The sharing workload at one frame size; all methods, all N."""
    t = time.perf_counter()
    df = _data_frame(size)
    nbytes = frame_nbytes(df)
    floats, ints, _ = split_numeric(df)
    numeric = int(sum(df[c].to_numpy().nbytes for c in floats + ints))
    rest_bytes = nbytes - numeric
    reference = touch_frame(df)
    log(f"sharing: frame {nbytes / MB:.0f} MB, {len(df):,} rows, built in "
        f"{time.perf_counter() - t:.1f} s")
    keep = prewarm(tmp)
    cal = calibrate(tmp, nbytes)
    log(f"MemAvailable showed {cal['anon_seen']:.0%} of {nbytes / MB:.0f} MB of anonymous memory "
        f"and {cal['tmpfs_seen']:.0%} of as many bytes written to tmpfs")
    gb = nbytes / GB
    rows = []
    chosen = [m for m in METHODS if methods is None or m.name in methods
              or m.name.startswith("baseline")]
    for n in ns:
        for method in chosen:
            timeout = 120 + 120 * gb * n
            # mmcache and the baselines it is judged against are cheap: repeat them so the
            # MemAvailable figures are medians.
            k = repeats if method.name.startswith(("mmcache", "baseline")) else 1
            runs = []
            for _ in range(k):
                runs.append(run_one(method, n, df, tmp, reference,
                                    (nbytes, numeric, rest_bytes),
                                    cap=cap, keep=keep, timeout=timeout))
                log(_describe(runs[-1]))
                if "total_added" not in runs[-1]:
                    break
            rows.append(_median_row(runs))
    del df
    gc.collect()
    return {"frame_bytes": nbytes, "numeric_bytes": numeric, "rest_bytes": rest_bytes,
            "ns": ns, "rows": rows, "calibration": cal}


def _data_frame(size: int) -> pd.DataFrame:
    from ._data import mixed_frame

    return mixed_frame(size)


def _describe(row: dict[str, Any]) -> str:
    head = f"  {row['method']:<20} N={row['n']}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    uss = np.mean([w["mem"]["uss"] for w in row["workers"]]) / MB
    anon = np.mean([w["mem"]["anon"] for w in row["workers"]]) / MB
    return (f"{head} setup {row['setup_s']:.2f} s run {row['run_s']:.2f} s  worker USS "
            f"{uss:.0f} MB anon {anon:.0f} MB  added {row['total_added'] / MB:+.0f} MB "
            f"(workers {row['workers_added'] / MB:+.0f} MB, "
            f"noise ±{row['mem_available_noise'] / MB:.0f}) "
            f"own {row['tree_added'] / MB:+.0f} MB"
            + (f"  WRONG {row['wrong']}" if "wrong" in row else ""))
