"""Chunked ``Pool.map``: the usual way to spread a frame over workers, plain against opened.

``pool.map(work, [df.iloc[i:i + n] for i in range(0, len(df), n)])`` with 4 ``spawn``
workers, once over the plain frame (each chunk pickles its rows) and once over the frame
``mmcache.open`` gave (each chunk pickles as a reference to the same pages). Reported per
way: bytes pickled per task, wall time of the map (the pool is started and warmed before),
memory added while it ran (peak drop of ``MemAvailable``, sampled every 20 ms, against the
level with the pool warm), and whether the workers' checksums agree with the parent's.

A third row is the floor: each worker already holds a private copy of the whole frame,
made before the clock starts, and a task ships only its row bounds; the map is then only
``work`` itself. No way of getting the rows to the workers can beat it, so the speed-up over
the plain frame can be no more than plain / floor.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import mmcache

from ._data import frame_nbytes, mixed_frame, touch_frame
from ._system import clear_dir, mem_available, settle, timed

WORKERS = 4
TASKS = 32  # chunks per map: several per worker, as a real chunked job has
WAIT = 600.0  # seconds: bound on one map
FLOOR = "floor: each worker holds a copy"


def work(chunk: Any) -> dict[str, float]:
    """The task: read every column of the chunk (module level: spawn children import it)."""
    return touch_frame(chunk)


def _pid(_: Any) -> int:
    time.sleep(0.05)  # long enough for every worker to take one
    return os.getpid()


def _warm(pool: Any) -> None:
    """Until every worker has answered a task, so every initializer has run."""
    seen: set[int] = set()
    for _ in range(int(WAIT / 0.05)):
        seen |= set(pool.map_async(_pid, range(WORKERS), chunksize=1).get(WAIT))
        if len(seen) >= WORKERS:
            return
    raise TimeoutError(f"{WORKERS - len(seen)} of the pool's workers never started")


_HELD: Any = None  # the floor's worker: its own copy of the whole frame


def _hold(cache: str) -> None:
    global _HELD
    # numbers and categories private (pandas 3 keeps Arrow text buffers shared), every page
    # touched by the copy or, for the text, by the open
    _HELD = mmcache.open("chunks", cache_dir=cache).copy(deep=True)


def work_held(bounds: tuple[int, int]) -> dict[str, float]:
    """The floor's task: ``work`` on rows of the copy the worker holds."""
    return work(_HELD.iloc[bounds[0] : bounds[1]])


class _Peak:
    """Lowest ``MemAvailable`` seen while running, from a sampling thread."""

    def __init__(self) -> None:
        self.low = mem_available()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.low = min(self.low, mem_available())

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _one(name: str, frame: Any, want: list[dict[str, float]], n: int,
         held: str | None = None) -> dict[str, Any]:
    """One map; ``held``: the floor (each worker copies the entry in that cache dir first,
    tasks are row bounds)."""
    task: Any
    chunks: list[Any]
    if held is None:
        task, chunks = work, [frame.iloc[i : i + n] for i in range(0, len(frame), n)]
    else:
        task, chunks = work_held, [(i, i + n) for i in range(0, len(frame), n)]
    sizes = [len(pickle.dumps(c)) for c in chunks]
    pool = mp.get_context("spawn").Pool(
        WORKERS, *((_hold, (held,)) if held is not None else ()))
    try:
        _warm(pool)
        gc.collect()
        before = settle()
        with _Peak() as peak:
            t, got = timed(lambda: pool.map_async(task, chunks, chunksize=1).get(WAIT))
    finally:
        pool.terminate()
        pool.join()
    return {"way": name, "tasks": len(chunks), "bytes_per_task": max(sizes),
            "bytes_total": sum(sizes), "wall_s": t, "memory_added": before - peak.low,
            "correct": got == want}


def chunks(size: int, tmp: Path, *, log: Any) -> dict[str, Any]:
    """Both ways over one ``size``-byte frame, side by side."""
    plain = mixed_frame(size, seed=11)
    cache = tmp / "cache"
    n = -(-len(plain) // TASKS)
    want = [touch_frame(plain.iloc[i : i + n]) for i in range(0, len(plain), n)]
    out: dict[str, Any] = {"frame_bytes": frame_nbytes(plain), "rows": len(plain),
                           "workers": WORKERS, "rows_per_task": n, "rows_out": []}
    try:
        mmcache.save(plain, "chunks", cache_dir=cache)
        out["rows_out"].append(_one("plain frame", plain, want, n))
        del plain
        gc.collect()
        opened = mmcache.open("chunks", cache_dir=cache)
        out["rows_out"].append(_one("mmcache.open frame", opened, want, n))
        out["rows_out"].append(_one(FLOOR, opened, want, n, held=str(cache)))
        del opened
    finally:
        clear_dir(tmp)
    a, b = out["rows_out"][:2]
    log(f"chunked Pool.map {out['frame_bytes'] / 1e9:.2f} GB: plain {a['wall_s']:.2f} s, "
        f"{a['bytes_per_task'] / 1e6:.1f} MB/task; mmcache {b['wall_s']:.2f} s, "
        f"{b['bytes_per_task']} B/task")
    return out
