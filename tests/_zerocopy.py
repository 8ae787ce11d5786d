"""Checks that data lies inside files mapped from the cache directory (/proc/self/maps)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd


def mapped_ranges(under: str | os.PathLike[str]) -> list[tuple[int, int, str]]:
    """(start, end, path) of every mapping of a file below ``under`` in this process."""
    root = os.path.realpath(under)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            path = parts[5].strip().removesuffix(" (deleted)")
            if path.startswith(root + os.sep):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, path))
    return out


def array_buffers(values) -> list[tuple[int, int]]:
    """(address, nbytes) of each non-empty memory buffer behind a pandas/numpy array."""
    if isinstance(values, np.ndarray):
        return [(values.__array_interface__["data"][0], values.nbytes)] if values.nbytes else []
    if isinstance(values, pd.RangeIndex):
        return []
    if isinstance(values, pd.Index):
        if isinstance(values, pd.MultiIndex):
            out = []
            for lev in values.levels:
                out += array_buffers(lev)
            for codes in values.codes:
                out += array_buffers(codes)
            return out
        return array_buffers(values._values)
    if isinstance(values, pd.arrays.NumpyExtensionArray):
        return array_buffers(values.to_numpy())
    if isinstance(values, pd.Categorical):
        return array_buffers(values.codes) + array_buffers(values.categories)
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


def assert_zero_copy(obj, cache_dir, *, include_index: bool = False) -> None:
    """Every buffer of every column (and of the index) lies inside a mapped cache file."""
    ranges = mapped_ranges(cache_dir)
    if isinstance(obj, pd.Series):
        cols = {obj.name: obj._values}
    else:
        cols = {f"{i}:{obj.columns[i]!r}": obj.iloc[:, i]._values for i in range(obj.shape[1])}
    if include_index:
        cols["<index>"] = obj.index
    for name, values in cols.items():
        for addr, size in array_buffers(values):
            inside = any(s <= addr and addr + size <= e for s, e, _ in ranges)
            assert inside, f"column {name}: buffer {addr:#x}+{size} is not in a cache mapping"


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*"))
