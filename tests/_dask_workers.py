"""Real Dask clusters for the tests, and the functions their workers run.

A simulated **node** is a group of worker processes given their own ``MMCACHE_DIR``: on
one machine that is what tells two hosts apart to mmcache (a node is one host and cache
directory). Every cluster is a ``SpecCluster`` of ``Nanny`` workers (each worker its own
process, as in production), torn down within a bounded time, its processes killed if they
outlive that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

import mmcache
from tests._zerocopy import array_buffers, maps_under

CLOSE_TIMEOUT = 30


@contextlib.contextmanager
def cluster(node_dirs: list[Path], per_node: int = 2, **worker_options: Any) -> Iterator[Any]:
    """A client of a cluster with ``per_node`` workers (1 thread each) per directory."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    workers = {
        f"n{i}w{j}": {"cls": Nanny, "options": {
            "nthreads": 1, "env": {"MMCACHE_DIR": str(d)}, "memory_limit": None,
            **worker_options}}
        for i, d in enumerate(node_dirs) for j in range(per_node)
    }
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    spec = None
    try:
        spec = SpecCluster(
            workers=workers,
            scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
        )
        with Client(spec, timeout=60) as client:
            client.wait_for_workers(len(workers), timeout=60)
            yield client
    finally:
        if spec is not None:
            with contextlib.suppress(Exception):
                spec.close(timeout=CLOSE_TIMEOUT)
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                # multiprocessing's resource tracker, started on the way, serves the rest of
                # the session: killing it makes later tests warn "process died unexpectedly".
                if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline()):
                    p.kill()


def node_of(dask_worker: Any) -> str:
    return os.environ["MMCACHE_DIR"]


def sum_zero_copy(ref: Any, column: str) -> tuple[str, float, bool]:
    """A task: the column's sum (of lengths, for text), from this node's copy, and whether
    it was read in place
    (every buffer inside a mapping of a file under this worker's cache dir)."""
    df = ref.open()
    col = df[column]
    ranges = maps_under(os.environ["MMCACHE_DIR"])
    inside = all(any(s <= a and a + n <= e for s, e, _ in ranges)
                 for a, n in array_buffers(col))
    total = col.sum() if pd.api.types.is_numeric_dtype(col) else col.str.len().sum()
    return os.environ["MMCACHE_DIR"], float(total), inside and bool(ranges)


def keys_here() -> list[str]:
    return sorted(e.key for e in mmcache.entries())


def build_logged(log: str) -> pd.DataFrame:
    """A build function that records each call (node, pid) in ``log``."""
    with open(log, "a") as f:
        f.write(f"{os.environ['MMCACHE_DIR']} {os.getpid()}\n")
    return frame(1000)


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "a": np.arange(n, dtype="float64"),
        "b": np.arange(n, dtype="int32") % 7,
        "s": pd.Series([f"s{i % 97}" for i in range(n)], dtype="string[pyarrow]"),
    })


def hold(ref: Any) -> int:
    """Open the shared frame, read every page, and keep it alive in this worker."""
    from distributed import get_worker

    df = ref.open()
    float(df.sum(numeric_only=True).sum())
    get_worker()._mmcache_test_hold = df
    return int(sum(n for _, n in array_buffers(df.iloc[:, 0])))


def memory_view(dask_worker: Any) -> dict[str, Any]:
    """What Dask and the kernel say of this worker's memory, and its Dask sizeof."""
    from dask.sizeof import sizeof

    proc = psutil.Process()
    info = proc.memory_full_info()
    held = getattr(dask_worker, "_mmcache_test_hold", None)
    return {
        "dask": dask_worker.monitor.get_process_memory(),
        "rss": info.rss,
        "uss": info.uss,
        "status": dask_worker.status.name,
        "sizeof": None if held is None else sizeof(held),
        "pid": os.getpid(),
    }


async def statuses_over(seconds: float, dask_worker: Any) -> list[str]:
    """Every status the worker passed through during ``seconds`` (sampled each 20 ms, on
    its event loop, beside its memory monitor)."""
    seen = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seen.append(dask_worker.status.name)
        await asyncio.sleep(0.02)
    return sorted(set(seen))


class Raw:
    """Bytes that unpickle, on the receiving side, into whatever they were pickled from:
    a task argument the client can no longer open itself."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        import pickle

        return (pickle.loads, (self.payload,))


def view_received(obj: Any, cache_dir: str) -> dict[str, Any]:
    """What a task received for a view: a full copy, its class, and whether it maps the
    same pages (see tests._workers.view_task)."""
    from tests import _workers

    return _workers.view_task((obj, cache_dir))


def column_sum(df: Any, column: str) -> float:
    return float(df[column].sum())


def big_frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame({"x": np.arange(rows, dtype="float64")})


def writer_pid(pids: list[int], cache_dir: str) -> int | None:
    """The one of ``pids`` that has a data file under ``cache_dir`` open right now."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith(cache_dir + os.sep) and target.endswith(".npy"):
                        return pid
    return None


async def grow_heap(nbytes: int, dask_worker: Any) -> int:
    """Allocate ``nbytes`` of real memory in the worker and keep it (a coroutine: run
    without waiting, as the worker may be killed for it before it could answer)."""
    dask_worker._mmcache_test_heap = np.ones(nbytes // 8)
    return os.getpid()


def save_tasks_per_node(client: Any, stream: list[dict[str, Any]]) -> dict[str, int]:
    """How many of share's writing tasks each node's workers ran (a task stream's data)."""
    where = client.run(node_of)
    out: dict[str, int] = {}
    for t in stream:
        if str(t.get("key", "")).startswith("mmcache-share-"):
            node = where.get(t["worker"], t["worker"])
            out[node] = out.get(node, 0) + 1
    return out
