"""Open latency and save throughput: mmcache against pickle, parquet and feather.

Every file lives on the same tmpfs, so the figures compare formats, not disks. One size (or
column count) at a time, one format at a time: each file is deleted before the next is
written, so a 4 GB frame never has more than one other copy of itself around.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.feather as feather

import mmcache
from mmcache import _cache as mmcache_cache

from ._data import frame_nbytes, mixed_frame, touch_frame, wide_frame
from ._system import GB, MB, clear_dir, repeat, settle, summary, timed

# Peak memory of writing then reading a format, in copies of the frame, beyond the frame the
# benchmark holds: the file, plus what the reader builds (pickle: the frame; parquet and
# feather: an Arrow table, then the pandas frame). Generous, so a 4 GB run never meets the
# OOM killer.
_PEAK_COPIES = {"pickle": 2.2, "parquet": 3.0, "feather": 3.2}
RESERVE_BYTES = 2 * GB


def _write_pickle(df: pd.DataFrame, path: Path) -> None:
    df.to_pickle(path)


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    df.to_parquet(path)  # pyarrow, snappy: what users get by default


def _write_feather(df: pd.DataFrame, path: Path) -> None:
    # Uncompressed, feather's fastest read and the only one memory_map=True can use without
    # decompressing (pandas' default would be lz4).
    df.to_feather(path, compression="uncompressed")


def _read_feather_mmap(path: Path) -> pd.DataFrame:
    return feather.read_table(path, memory_map=True).to_pandas()


# name -> (file suffix, writer, readers {reader name: reader})
FORMATS: dict[str, tuple[str, Callable[[pd.DataFrame, Path], None],
                         dict[str, Callable[[Path], pd.DataFrame]]]] = {
    "pickle": (".pkl", _write_pickle, {"pd.read_pickle": pd.read_pickle}),
    "parquet": (".parquet", _write_parquet, {"pd.read_parquet": pd.read_parquet}),
    "feather": (".feather", _write_feather, {
        "pd.read_feather": pd.read_feather,
        "feather.read_table(memory_map=True).to_pandas()": _read_feather_mmap,
    }),
}
SAVERS = {"pickle": "df.to_pickle", "parquet": "df.to_parquet",
          "feather": "df.to_feather (uncompressed)"}
MMCACHE_COLD = "mmcache.open (cold)"
MMCACHE_MEMO = "mmcache.open (memoised)"
FLOOR = "floor: the frame's objects over arrays in memory"


def rebuild(df: pd.DataFrame) -> pd.DataFrame:
    """A new frame over ``df``'s own buffers with every per-column object built anew, by
    pandas' fastest internal constructors, as an open must build them: text and datetime
    wrappers, categoricals with their dtype and (one per distinct list) categories Index,
    blocks, axes. No file, metadata or check: a bound no reader of any format can beat,
    so a wide-frame target below it is out of reach. pandas 3.1 and newer only."""
    from pandas.api.internals import create_dataframe_from_blocks

    text = pd.arrays.ArrowStringArray
    cats_seen: dict[int, pd.Index] = {}
    blocks = []
    for blk in df._mgr.blocks:
        v = blk.values
        if isinstance(v, pd.Categorical):
            cats = v.dtype.categories
            new = cats_seen.get(id(cats))
            if new is None:
                data = cats._values
                if isinstance(data, text):
                    data = data._from_pyarrow_array(data._pa_array)
                new = cats_seen[id(cats)] = pd.Index._simple_new(data, name=cats.name)
            dtype = pd.CategoricalDtype.__new__(pd.CategoricalDtype)
            dtype._categories, dtype._ordered = new, v.dtype.ordered
            v = pd.Categorical._simple_new(v._codes, dtype)
        elif isinstance(v, text):
            v = v._from_pyarrow_array(v._pa_array)
        elif isinstance(v, pd.arrays.DatetimeArray):
            v = pd.arrays.DatetimeArray._simple_new(v._ndarray, dtype=v.dtype)
        blocks.append((v, blk.mgr_locs.as_array))
    return create_dataframe_from_blocks(blocks, index=df.index._view(),
                                        columns=df.columns._view())


def _floor(df: pd.DataFrame, reps: dict[str, Any]) -> dict[str, Any] | None:
    if not hasattr(pd.arrays.ArrowStringArray, "_from_pyarrow_array"):
        return None  # pandas before 3.1

    def op() -> Any:
        with mmcache_cache.no_gc():  # as an open builds a frame
            return rebuild(df)

    return summary(repeat(op, before=gc.collect, **reps["mmcache"]))


def _cold() -> None:
    mmcache_cache._MEMO.clear()
    gc.collect()


def _open_mmcache(
    key: str, cache: Path, reps: dict[str, Any], with_read: bool
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def op() -> Any:
        return mmcache.open(key, cache_dir=cache)

    out[MMCACHE_COLD] = summary(repeat(op, before=_cold, **reps["mmcache"]))
    keep = op()  # populate the memo
    out[MMCACHE_MEMO] = summary(repeat(op, **reps["mmcache"]))
    del keep
    if with_read:
        _cold()
        t_open, frame = timed(op)
        t_read, _ = timed(lambda: touch_frame(frame))
        out[MMCACHE_COLD]["then_read_all_s"] = t_read
        out[MMCACHE_COLD]["open_and_read_all_s"] = t_open + t_read
        del frame
    _cold()
    return out


def _open_file(
    reader: Callable[[Path], pd.DataFrame], path: Path, reps: dict[str, Any], with_read: bool
) -> dict[str, Any]:
    times: list[float] = []
    read_all: list[float] = []
    while len(times) < reps["min_reps"] or (
        sum(times) < reps["budget"] and len(times) < reps["max_reps"]
    ):
        gc.collect()
        t, frame = timed(lambda: reader(path))
        times.append(t)
        if with_read and not read_all:
            read_all.append(timed(lambda f=frame: touch_frame(f))[0])
        del frame
    out = summary(times)
    if read_all:
        out["then_read_all_s"] = read_all[0]
        out["open_and_read_all_s"] = min(times) + read_all[0]
    return out


def size_point(
    size: int, tmp: Path, *, save_reps: int, alt_save_reps: int, read_reps: dict[str, Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Save and open one mixed frame of ``size`` bytes in every format."""
    t = time.perf_counter()
    df = mixed_frame(size)
    nbytes = frame_nbytes(df)
    log(f"open/save: frame {nbytes / MB:.0f} MB, {len(df):,} rows, built in "
        f"{time.perf_counter() - t:.1f} s")
    point: dict[str, Any] = {"target_bytes": size, "frame_bytes": nbytes, "rows": len(df),
                             "cols": df.shape[1], "save": {}, "open": {}, "skipped": {}}
    cache = tmp / "cache"
    key = "frame"
    try:
        # mmcache.save against plainly writing as many bytes, interleaved so drift hits both.
        entry = mmcache.save(df, key, cache_dir=cache)  # warm-up; tells the entry's size
        mmcache.delete(key, cache_dir=cache)
        point["entry_bytes"] = entry.nbytes
        plain = np.ones(entry.nbytes, dtype=np.uint8)  # in memory, like the frame
        plain_path = tmp / "plain.bin"
        m_times, p_times = [], []
        for _ in range(save_reps):
            settle()
            m_times.append(timed(lambda: mmcache.save(df, key, cache_dir=cache))[0])
            mmcache.delete(key, cache_dir=cache)
            settle()
            p_times.append(timed(lambda a=plain: a.tofile(plain_path))[0])
            os.unlink(plain_path)
        del plain
        mmcache.save(df, key, cache_dir=cache)  # for the open timings
        point["save"]["mmcache.save"] = summary(m_times) | {"bytes": entry.nbytes}
        point["save"]["plain write (ndarray.tofile)"] = summary(p_times) | {"bytes": entry.nbytes}
        log(f"  save: mmcache {min(m_times):.3f} s, plain {min(p_times):.3f} s "
            f"({min(p_times) / min(m_times):.0%} of plain speed)")
        point["open"].update(_open_mmcache(key, cache, read_reps, with_read=True))
        log(f"  open: mmcache cold {point['open'][MMCACHE_COLD]['best'] * 1e3:.2f} ms, "
            f"memo {point['open'][MMCACHE_MEMO]['best'] * 1e3:.3f} ms")
        mmcache.delete(key, cache_dir=cache)
        _cold()
        for fmt, (suffix, writer, readers) in FORMATS.items():
            need = int(_PEAK_COPIES[fmt] * nbytes) + RESERVE_BYTES
            avail = settle()
            if need > avail:
                point["skipped"][fmt] = (f"would need {need / GB:.1f} GB, "
                                         f"{avail / GB:.1f} GB available")
                log(f"  {fmt}: skipped ({point['skipped'][fmt]})")
                continue
            path = tmp / f"frame{suffix}"
            times = []
            for _ in range(alt_save_reps):
                path.unlink(missing_ok=True)
                settle()
                times.append(timed(lambda p=path, w=writer: w(df, p))[0])
            point["save"][SAVERS[fmt]] = summary(times) | {"bytes": path.stat().st_size}
            for name, reader in readers.items():
                point["open"][name] = _open_file(reader, path, read_reps["files"],
                                                 with_read=True)
                log(f"  {name}: {point['open'][name]['best']:.3f} s")
            path.unlink()
    finally:
        clear_dir(tmp)
        _cold()
    return point


def kind_name(mixed: bool | str) -> str:
    return "categories" if mixed == "categories" else "mixed" if mixed else "float64"


def columns_point(
    ncols: int, mixed: bool | str, tmp: Path, *, reps: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """Open a ``ncols`` x 1,000 frame in every format."""
    df = wide_frame(ncols, mixed=mixed)
    point: dict[str, Any] = {"ncols": ncols, "rows": len(df), "mixed": mixed,
                             "frame_bytes": frame_nbytes(df), "save": {}, "open": {}}
    cache = tmp / "cache"
    try:
        t, entry = timed(lambda: mmcache.save(df, "wide", cache_dir=cache))
        point["save"]["mmcache.save"] = {"best": t, "bytes": entry.nbytes}
        point["open"].update(_open_mmcache("wide", cache, reps, with_read=False))
        floor = _floor(df, reps)
        if floor is not None:
            point["open"][FLOOR] = floor
        for fmt, (suffix, writer, readers) in FORMATS.items():
            path = tmp / f"wide{suffix}"
            t, _ = timed(lambda p=path, w=writer: w(df, p))
            point["save"][SAVERS[fmt]] = {"best": t, "bytes": path.stat().st_size}
            for name, reader in readers.items():
                point["open"][name] = _open_file(reader, path, reps["files"], with_read=False)
            path.unlink()
    finally:
        clear_dir(tmp)
        _cold()
    o = point["open"]
    floor_s = f", floor {o[FLOOR]['best'] * 1e3:.1f} ms" if FLOOR in o else ""
    log(f"wide {kind_name(mixed)} {ncols:>6} cols: mmcache cold "
        f"{o[MMCACHE_COLD]['best'] * 1e3:.1f} ms{floor_s}, read_pickle "
        f"{o['pd.read_pickle']['best'] * 1e3:.1f} ms, feather mmap "
        f"{o['feather.read_table(memory_map=True).to_pandas()']['best'] * 1e3:.1f} ms")
    return point
