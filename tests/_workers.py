"""Module-level worker functions for the multiprocess tests.

Children started with ``spawn`` or ``forkserver`` import this module to find their target, so
everything a child runs lives here, at module level, and importing it has no side effects.

Process workers take a ``multiprocessing`` queue first and put ``("ok", payload)`` messages
on it; :func:`report` runs them and turns any exception into one ``("err", traceback)``
message, so the parent fails with the child's traceback instead of waiting for a timeout.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

import mmcache
from tests import _pd

from ._zerocopy import array_buffers, frame_addresses, frame_in_cache, maps_under

# A child never waits longer than this for its parent (the parent has its own, shorter, bounds).
CHILD_TIMEOUT = 120.0


# --- data -------------------------------------------------------------------------------------


def make_mixed_frame(nrows: int, seed: int = 0) -> pd.DataFrame:
    """float64 x3, int64 x2, a ``str`` column (with some nulls) and a category; ~58 B/row."""
    rng = np.random.default_rng(seed)
    ints = (np.arange(nrows, dtype=np.int64) * 7919 + seed) % 1_000_000_007
    strs = pa.array(ints, mask=(np.arange(nrows) % 1000) == 7).cast(pa.large_string())
    cols: dict[str, Any] = {
        "a": rng.random(nrows),
        "b": rng.standard_normal(nrows),
        "c": rng.random(nrows) * 1e6,
        "i": rng.integers(-(10**12), 10**12, nrows, dtype=np.int64),
        "j": np.arange(nrows, dtype=np.int64) + seed,
        "s": pd.Series(strs.to_pandas(), copy=False).astype(_pd.STR),  # object on pandas 2
        "cat": pd.Categorical.from_codes(
            rng.integers(0, 4, nrows).astype(np.int8), categories=["red", "green", "blue", "grey"]
        ),
    }
    df = pd.DataFrame(cols, copy=False)
    assert df["s"].dtype == _pd.STR, df["s"].dtype
    return df


def read_all(df: pd.DataFrame, chunk: int = 1 << 17) -> dict[str, int]:
    """Read every byte of every column; small temporaries only (so USS measures sharing).

    numeric: wrapping integer sum of the raw bits (exact, order-free); category: sum of codes;
    str: sum of ``str.len()`` over row chunks plus the sum of the Arrow data bytes.
    """
    out: dict[str, int] = {}
    for pos in range(df.shape[1]):
        name = str(df.columns[pos])
        s = df.iloc[:, pos]
        if isinstance(s.dtype, pd.CategoricalDtype):
            out[name] = int(s.array.codes.sum(dtype=np.int64))
        elif isinstance(s.dtype, np.dtype):
            v = s.to_numpy()
            out[name] = int(v.view(f"u{v.itemsize}").sum(dtype=np.uint64))
        elif isinstance(s.dtype, pd.StringDtype):
            lengths = 0
            for start in range(0, len(s), chunk):
                lengths += int(s.iloc[start : start + chunk].str.len().sum())
            data = s.array.__arrow_array__()
            chunks = data.chunks if isinstance(data, pa.ChunkedArray) else [data]
            nbytes = sum(
                int(np.frombuffer(c.buffers()[2], np.uint8).sum(dtype=np.uint64)) for c in chunks
            )
            out[name] = lengths * 1_000_003 + nbytes
        else:
            raise TypeError(f"read_all: unexpected dtype {s.dtype} of column {name!r}")
    return out


def checksum(df: pd.DataFrame | pd.Series) -> tuple[Any, ...]:
    """Labels, dtypes and a hash of every value and the index: equal frames, equal checksums."""
    frame = df.to_frame() if isinstance(df, pd.Series) else df
    h = pd.util.hash_pandas_object(frame, index=True).to_numpy()
    return (
        tuple(map(str, frame.columns)),
        tuple(map(str, frame.dtypes)),
        len(frame),
        int(h.sum(dtype=np.uint64)),
    )


# --- process workers (first argument: the queue) -------------------------------------------------


def report(q: Any, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(q, *args)``; on any exception put ``("err", traceback)`` on ``q``."""
    try:
        fn(q, *args)
    except BaseException:
        q.put(("err", f"pid {os.getpid()}:\n{traceback.format_exc()}"))


def _wait(evt: Any, what: str) -> None:
    if not evt.wait(CHILD_TIMEOUT):
        raise TimeoutError(f"child {os.getpid()}: parent never signalled {what!r}")


def hold_and_measure(
    q: Any, go: Any, hold: Any, release: Any, key: str, cache_dir: str
) -> None:
    """Baseline USS/PSS, open + read everything, then hold the frame until released.

    Messages: ``"ready"`` once the baseline is taken (the parent then samples MemAvailable and
    sets ``go``); then, once every worker has read everything (``hold`` barrier), a dict of
    measurements; the frame stays mapped until the parent sets ``release``.
    """
    import psutil

    proc = psutil.Process()
    read_all(make_mixed_frame(5000, seed=1))  # warm up lazily imported code paths
    gc.collect()  # under fork: pay the copy-on-write of the parent's heap before the baseline
    base = proc.memory_full_info()
    q.put(("ok", "ready"))
    _wait(go, "go")
    t0 = time.perf_counter()
    df = mmcache.open(key, cache_dir=cache_dir)
    t_open = time.perf_counter() - t0
    sums = read_all(df)
    t_read = time.perf_counter() - t0 - t_open
    hold.wait(CHILD_TIMEOUT)  # every worker now maps and has read the whole frame
    after = proc.memory_full_info()
    q.put(("ok", {
        "pid": os.getpid(),
        "base_uss": base.uss, "base_pss": base.pss,
        "uss": after.uss, "pss": after.pss,
        "sums": sums,
        "zero_copy": frame_in_cache(df, cache_dir),
        "t_open": t_open, "t_read": t_read,
    }))
    _wait(release, "release")
    del df


def build_race(q: Any, barrier: Any, key: str, cache_dir: str, counter: str) -> None:
    """Start with the others, then ``open(key, build=...)``; send back a plain copy."""
    barrier.wait(CHILD_TIMEOUT)
    df = mmcache.open(key, cache_dir=cache_dir, build=functools.partial(build_small, counter))
    q.put(("ok", {"pid": os.getpid(), "frame": pd.DataFrame(df).copy(),
                  "zero_copy": frame_in_cache(df, cache_dir)}))


def build_small(counter: str) -> pd.DataFrame:
    """A ``build=`` callback that leaves a trace of every call (one line, appended atomically)."""
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    time.sleep(0.5)  # long enough that racing processes really overlap
    return small_frame()


def small_frame() -> pd.DataFrame:
    return make_mixed_frame(2000, seed=5)


def open_in_forked_child(q: Any, key: str, cache_dir: str) -> None:
    """In a child forked after the parent opened ``key``: does ``open`` map anything new?"""
    before = maps_under(cache_dir)
    df = mmcache.open(key, cache_dir=cache_dir)
    after = maps_under(cache_dir)
    q.put(("ok", {
        "before": before, "after": after,
        "addrs": frame_addresses(df), "zero_copy": frame_in_cache(df, cache_dir),
        "checksum": checksum(df),
    }))


def hold_through_resave(
    q: Any, resaved: Any, deleted: Any, key: str, cache_dir: str
) -> None:
    """Hold a frame while the parent re-saves the key, then deletes it; checksum each time."""
    old = mmcache.open(key, cache_dir=cache_dir)
    q.put(("ok", {"old": checksum(old)}))
    _wait(resaved, "resaved")
    new = mmcache.open(key, cache_dir=cache_dir)
    q.put(("ok", {"old": checksum(old), "new": checksum(new)}))
    _wait(deleted, "deleted")
    try:
        mmcache.open(key, cache_dir=cache_dir)
        reopen_error = None
    except Exception as exc:
        reopen_error = (type(exc).__name__, isinstance(exc, KeyError),
                        isinstance(exc, mmcache.MmcacheError))
    q.put(("ok", {
        "old": checksum(old), "new": checksum(new), "old_read": read_all(old),
        "reopen_error": reopen_error,
        "old_zero_copy": frame_in_cache(old, cache_dir),
    }))


# --- Pool tasks (one picklable argument, result returned) ------------------------------------


def frame_task(arg: tuple[pd.DataFrame, str]) -> dict[str, Any]:
    """A frame received through Pool.map: its checksum and whether it is zero-copy here."""
    df, cache_dir = arg
    return {"pid": os.getpid(), "type": type(df).__name__, "checksum": checksum(df),
            "zero_copy": frame_in_cache(df, cache_dir)}


def entry_task(entry: mmcache.Entry) -> dict[str, Any]:
    """Open an Entry in the worker; send back a plain (fully pickled) copy of the frame."""
    df = entry.open()
    return {"pid": os.getpid(), "frame": pd.DataFrame(df).copy(),
            "zero_copy": frame_in_cache(df, entry.cache_dir)}


def share_task(arg: tuple[mmcache.Entry, int]) -> dict[str, Any]:
    ref, i = arg
    df = ref.open()
    return {"i": i, "pid": os.getpid(), "checksum": checksum(df),
            "zero_copy": frame_in_cache(df, ref.cache_dir)}


def view_task(arg: tuple[pd.DataFrame | pd.Series, str]) -> dict[str, Any]:
    """A view received through Pool.map: a full copy to compare, and whether every buffer
    of its columns and index lies in a mapped cache file here (``None``: nothing to check)."""
    obj, cache_dir = arg
    cols = [obj] if isinstance(obj, pd.Series) else [obj.iloc[:, i] for i in range(obj.shape[1])]
    bufs = [b for c in cols for b in array_buffers(c._values)] + array_buffers(obj.index)
    ranges = maps_under(cache_dir)
    return {"copy": obj.copy(deep=True), "type": type(obj).__name__,
            "zero_copy": bool(bufs) and all(any(s <= a and a + n <= e for s, e, _ in ranges)
                                            for a, n in bufs)}


def chunk_task(chunk: pd.DataFrame) -> tuple[Any, ...]:
    """What a chunked Pool.map computes per row chunk: a checksum and column sums."""
    return checksum(chunk), tuple(float(chunk[c].sum()) for c in ("a", "b", "i"))


_HELD: list[int] = []


def exhaust_descriptors() -> None:
    """A Pool initializer: this worker can open no more files (EMFILE), as under a tight
    ``ulimit -n``, so no reference can be opened here."""
    import resource

    import mmcache._cache
    import mmcache._views  # noqa: F401  (imported while files can still be opened)

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
    with contextlib.suppress(OSError):
        while True:
            _HELD.append(os.open(os.devnull, os.O_RDONLY))


def echo(obj: Any) -> Any:
    """A task that hands its argument back in its result."""
    return obj
