"""Chunked ``Pool.map``: the usual way to spread a frame over workers, plain against opened.

``pool.map(work, [df.iloc[i:i + n] for i in range(0, len(df), n)])`` with 4 ``spawn``
workers, once over the plain frame (each chunk pickles its rows) and once over the frame
``mmcache.open`` gave (each chunk pickles as a reference to the same pages). Reported per
way: bytes pickled per task, wall time of the map (the pool is started and warmed before),
memory added while it ran (peak drop of ``MemAvailable``, sampled every 20 ms, against the
level with the pool warm), and whether the workers' checksums agree with the parent's.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import pickle
import threading
from pathlib import Path
from typing import Any

import mmcache

from ._data import frame_nbytes, mixed_frame, touch_frame
from ._system import clear_dir, mem_available, settle, timed

WORKERS = 4
TASKS = 32  # chunks per map: several per worker, as a real chunked job has
WAIT = 600.0  # seconds: bound on one map


def work(chunk: Any) -> dict[str, float]:
    """The task: read every column of the chunk (module level: spawn children import it)."""
    return touch_frame(chunk)


def _noop(_: Any) -> None:
    return None


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


def _one(name: str, frame: Any, want: list[dict[str, float]], n: int) -> dict[str, Any]:
    chunks = [frame.iloc[i : i + n] for i in range(0, len(frame), n)]
    sizes = [len(pickle.dumps(c)) for c in chunks]
    pool = mp.get_context("spawn").Pool(WORKERS)
    try:
        pool.map(_noop, range(WORKERS), chunksize=1)  # started and warm
        gc.collect()
        before = settle()
        with _Peak() as peak:
            t, got = timed(lambda: pool.map_async(work, chunks, chunksize=1).get(WAIT))
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
        del opened
    finally:
        clear_dir(tmp)
    a, b = out["rows_out"]
    log(f"chunked Pool.map {out['frame_bytes'] / 1e9:.2f} GB: plain {a['wall_s']:.2f} s, "
        f"{a['bytes_per_task'] / 1e6:.1f} MB/task; mmcache {b['wall_s']:.2f} s, "
        f"{b['bytes_per_task']} B/task")
    return out
