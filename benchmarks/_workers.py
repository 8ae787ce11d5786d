"""What runs inside the worker processes (importable: spawn and forkserver re-import it).

Every worker gets the frame its method's way, reads all of it, then takes part in a small
file-based rendezvous in a sync folder the parent watches:

    worker: read everything -> write ``ready.PID`` -> wait for ``measure``
            -> measure own memory -> write ``measured.PID`` -> wait for ``release`` -> return
    parent: wait for N ``ready`` (the timed part ends) -> write ``measure``
            -> wait for N ``measured`` -> sample MemAvailable -> write ``release``

So memory is taken while all N workers hold the data at once, and the rendezvous needs only a
path: it works the same for Pool, joblib's loky workers and Manager clients.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import mmcache  # noqa: F401  (workers of every method import the same modules)

from ._data import touch_arrays, touch_frame
from ._system import memory_of

# Set by the parent just before it forks (the fork-inherited global method).
GLOBAL_FRAME: pd.DataFrame | None = None
# Set by the Pool initializer (the classic mp.Array answer).
_SHARED_ARRAY: Any = None
_POLL = 0.005


@dataclass(frozen=True)
class Sync:
    """Where the rendezvous files live and how long anyone waits for the other side."""

    path: str
    timeout: float


class SyncAborted(RuntimeError):
    pass


def wait_for(path: Path, timeout: float, abort: Path | None = None) -> None:
    """Poll until ``path`` exists; raise if ``abort`` appears or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while not path.exists():
        if abort is not None and abort.exists():
            raise SyncAborted(f"aborted while waiting for {path.name}")
        if time.monotonic() > end:
            raise TimeoutError(f"waited {timeout:.0f} s for {path}")
        time.sleep(_POLL)


def mark(path: Path) -> None:
    path.write_text(str(os.getpid()))


def _hold(sync: Sync, checksums: dict[str, float], t_start: float) -> dict[str, Any]:
    folder = Path(sync.path)
    pid = os.getpid()
    t_read = time.perf_counter() - t_start
    mark(folder / f"ready.{pid}")
    wait_for(folder / "measure", sync.timeout, folder / "abort")
    mem = memory_of()
    mark(folder / f"measured.{pid}")
    wait_for(folder / "release", sync.timeout, folder / "abort")
    return {"pid": pid, "checksums": checksums, "mem": mem, "read_s": t_read}


def baseline(tiny: pd.DataFrame, sync: Sync) -> dict[str, Any]:
    """The same interpreter running the same read code over a 1,000-row frame.

    What a worker costs before the data: imports, plus what running Python code does to a
    forked child (reference counts and the garbage collector touch inherited objects, whose
    pages the kernel then copies), which scales with the code run, not with the rows.
    """
    t = time.perf_counter()
    return _hold(sync, touch_frame(tiny), t)


def read_frame(df: pd.DataFrame, sync: Sync) -> dict[str, Any]:
    """The frame arrives as an argument (pickled in full, or as an mmcache reference)."""
    t = time.perf_counter()
    return _hold(sync, touch_frame(df), t)


def read_global(sync: Sync) -> dict[str, Any]:
    t = time.perf_counter()
    assert GLOBAL_FRAME is not None, "fork-inherited global missing: not a forked child?"
    return _hold(sync, touch_frame(GLOBAL_FRAME), t)


def read_namespace(ns: Any, sync: Sync) -> dict[str, Any]:
    t = time.perf_counter()
    df = ns.df  # the Manager's server pickles its copy and sends it to this worker
    return _hold(sync, touch_frame(df), t)


def _numeric_views(buf: Any, layout: dict[str, Any]) -> list[tuple[list[str], np.ndarray, bool]]:
    out = []
    for part in layout["parts"]:
        arr = np.ndarray(
            (len(part["names"]), layout["nrows"]), dtype=part["dtype"], buffer=buf,
            offset=part["offset"],
        )
        out.append((part["names"], arr, np.dtype(part["dtype"]).kind == "i"))
    return out


def read_shared_memory(
    name: str, layout: dict[str, Any], rest: pd.DataFrame, sync: Sync
) -> dict[str, Any]:
    """Numeric block from a ``multiprocessing.shared_memory`` segment; other columns pickled."""
    t = time.perf_counter()
    shm = shared_memory.SharedMemory(name=name)
    try:
        checks: dict[str, float] = {}
        for names, arr, as_int in _numeric_views(shm.buf, layout):
            checks.update(touch_arrays(names, arr, as_int))
            del arr
        checks.update(touch_frame(rest))
        return _hold(sync, checks, t)
    finally:
        shm.close()


def init_shared_array(arr: Any) -> None:
    """Pool initializer of the classic answer: keep the inherited ``mp.Array`` in a global."""
    global _SHARED_ARRAY
    _SHARED_ARRAY = arr


def read_shared_array(layout: dict[str, Any], rest: pd.DataFrame, sync: Sync) -> dict[str, Any]:
    """Numeric columns as doubles in an ``mp.Array``; other columns pickled."""
    t = time.perf_counter()
    assert _SHARED_ARRAY is not None, "mp.Array missing: initializer not run?"
    block = np.frombuffer(_SHARED_ARRAY, dtype=np.float64).reshape(-1, layout["nrows"])
    checks = touch_arrays(layout["names"], block)
    checks.update(touch_frame(rest))
    return _hold(sync, checks, t)
