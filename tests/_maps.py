"""Zero-copy checks from outside the library: which files does this process map, and where?

``/proc/self/maps`` lists every mapping of the process with its address range and, for file
mappings, the file's path (suffixed with `` (deleted)`` once the file was unlinked). A column
is zero-copy when its buffer's address falls in a range that maps a file under the cache dir.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

_DELETED = " (deleted)"


def mapped_files(pid: int | str = "self") -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of every file mapping of process ``pid`` (default: this one).

    ``end`` is exclusive. Anonymous mappings and pseudo-paths (``[heap]``, ``[stack]``,
    ``[anon:...]``) are left out; a trailing `` (deleted)`` is stripped from the path.
    """
    out = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith("/"):
                continue
            path = fields[5]
            if path.endswith(_DELETED):
                path = path[: -len(_DELETED)]
            start, _, end = fields[0].partition("-")
            out.append((int(start, 16), int(end, 16), path))
    return out


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def maps_under(cache_dir: str | os.PathLike[str], pid: int | str = "self") -> list[
    tuple[int, int, str]
]:
    """The file mappings of process ``pid`` whose file lies under ``cache_dir``."""
    root = os.path.realpath(cache_dir)
    return [m for m in mapped_files(pid) if _under(m[2], root)]


def buffer_in_cache(addr: int, cache_dir: str | os.PathLike[str]) -> bool:
    """True if address ``addr`` lies in this process's mapping of a file under ``cache_dir``."""
    return any(start <= addr < end for start, end, _ in maps_under(cache_dir))


def buffer_addresses(obj: pd.Series | pd.Index | Any) -> list[int]:
    """Start addresses of the data buffers behind a Series (or its array) without copying.

    numpy-backed columns: the values; categoricals: the codes; Arrow-backed columns: every
    non-null buffer of every chunk (validity, offsets, data). Anything else raises TypeError,
    so a check never passes by looking at nothing.
    """
    arr = obj.array if isinstance(obj, pd.Series | pd.Index) else obj
    if isinstance(arr, pd.Categorical):
        return [_np_addr(arr.codes)]
    if isinstance(arr, pd.arrays.NumpyExtensionArray):
        return [_np_addr(arr.to_numpy(copy=False))]
    if isinstance(arr, pd.arrays.ArrowExtensionArray | pd.arrays.ArrowStringArray):
        data = arr.__arrow_array__()
        chunks = data.chunks if isinstance(data, pa.ChunkedArray) else [data]
        addrs = [b.address for c in chunks for b in c.buffers() if b is not None]
        if not addrs:
            raise TypeError(f"{type(arr).__name__} has no buffers to check")
        return addrs
    if isinstance(arr, np.ndarray):
        return [_np_addr(arr)]
    raise TypeError(f"do not know where the buffers of {type(arr).__name__} are")


def _np_addr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def frame_addresses(df: pd.DataFrame) -> list[list[int]]:
    """Buffer addresses of each column of ``df``, by position (labels may repeat)."""
    return [buffer_addresses(df.iloc[:, i]) for i in range(df.shape[1])]


def frame_in_cache(df: pd.DataFrame, cache_dir: str | os.PathLike[str]) -> bool:
    """True if every column buffer of ``df`` lies in a mapping of a file under ``cache_dir``."""
    addrs = [a for col in frame_addresses(df) for a in col]
    spans = [(s, e) for s, e, _ in maps_under(cache_dir)]
    return bool(addrs) and all(any(s <= a < e for s, e in spans) for a in addrs)
