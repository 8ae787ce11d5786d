"""Zero-copy checks from outside the library: which files does a process map, and where?

``/proc/PID/maps`` lists every mapping with its address range and, for file mappings, the
file's path (suffixed with `` (deleted)`` once unlinked). A column is zero-copy when each of
its buffers lies inside a range that maps a file under the cache directory.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

_DELETED = " (deleted)"


def maps_under(cache_dir: str | os.PathLike[str], pid: int | str = "self") -> list[
    tuple[int, int, str]
]:
    """``(start, end, path)`` of each mapping by ``pid`` of a file below ``cache_dir``."""
    root = os.path.realpath(cache_dir) + os.sep
    out = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) < 6:
                continue
            path = fields[5].removesuffix(_DELETED)
            if path.startswith(root):
                start, _, end = fields[0].partition("-")
                out.append((int(start, 16), int(end, 16), path))
    return out


def array_buffers(values) -> list[tuple[int, int]]:
    """(address, nbytes) of each non-empty memory buffer behind a pandas/numpy array.

    Raises for an array kind it does not know, so a check never passes by looking at nothing.
    """
    if isinstance(values, pd.Series):
        return array_buffers(values._values)
    if isinstance(values, np.ndarray):
        return [(values.__array_interface__["data"][0], values.nbytes)] if values.nbytes else []
    if isinstance(values, pd.RangeIndex):
        return []
    if isinstance(values, pd.MultiIndex):
        out = []
        for lev in values.levels:
            out += array_buffers(lev)
        for codes in values.codes:
            out += array_buffers(codes)
        return out
    if isinstance(values, pd.Index):
        return array_buffers(values._values)
    if isinstance(values, pd.arrays.NumpyExtensionArray):
        return array_buffers(values.to_numpy())
    if isinstance(values, pd.Categorical):
        # Object categories are kept as labels (JSON), rebuilt at open: small, not mapped
        # (the README's dtype table). pandas 2 makes ["x", "y"] object categories.
        cats = values.categories
        return array_buffers(values.codes) + ([] if cats.dtype == object else array_buffers(cats))
    if isinstance(values, pd.arrays.IntervalArray):
        return array_buffers(values._left) + array_buffers(values._right)
    if hasattr(values, "_mask"):
        return array_buffers(values._data) + array_buffers(values._mask)
    if hasattr(values, "_pa_array"):
        out = []
        for chunk in values._pa_array.chunks:
            out += [(b.address, b.size) for b in chunk.buffers() if b is not None and b.size]
        return out
    if hasattr(values, "_ndarray"):
        return array_buffers(values._ndarray)
    raise AssertionError(f"no buffer inspection for {type(values)}")


def frame_addresses(df: pd.DataFrame) -> list[list[int]]:
    """Buffer start addresses of each column of ``df``, by position (labels may repeat)."""
    return [[a for a, _ in array_buffers(df.iloc[:, i])] for i in range(df.shape[1])]


def _inside(buffers, ranges) -> bool:
    return all(any(s <= a and a + n <= e for s, e, _ in ranges) for a, n in buffers)


def frame_in_cache(df: pd.DataFrame, cache_dir) -> bool:
    """True if every column buffer of ``df`` lies in a mapping of a file under ``cache_dir``."""
    bufs = [b for i in range(df.shape[1]) for b in array_buffers(df.iloc[:, i])]
    return bool(bufs) and _inside(bufs, maps_under(cache_dir))


def assert_zero_copy(obj, cache_dir, *, include_index: bool = False) -> None:
    """Every buffer of every column (and of the index) lies inside a mapped cache file."""
    ranges = maps_under(cache_dir)
    if isinstance(obj, pd.Series):
        cols = {obj.name: obj._values}
    else:
        cols = {f"{i}:{obj.columns[i]!r}": obj.iloc[:, i]._values for i in range(obj.shape[1])}
    if include_index:
        cols["<index>"] = obj.index
    for name, values in cols.items():
        for addr, size in array_buffers(values):
            assert _inside([(addr, size)], ranges), (
                f"column {name}: buffer {addr:#x}+{size} is not in a cache mapping"
            )
