"""The frames the benchmarks share and open, and the full read that every worker performs.

One mixed-dtype frame stands in for a user's data: float64 and int64 columns (one pandas block
each), a pandas 3 ``str`` column (Arrow large-string buffers), a category with int8 codes and a
tz-aware datetime. Its size is set in bytes; the rows follow from the measured bytes per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

N_FLOAT = 6
N_INT = 3
N_CATEGORIES = 50
TZ = "Europe/Paris"
STR_DTYPE = pd.StringDtype("pyarrow", na_value=np.nan)  # pandas 3's default ``str``
# Rows of the probe frame used to measure bytes per row before building the real one.
_PROBE_ROWS = 100_000


def _strings(ints: np.ndarray) -> pd.Series:
    # Built in Arrow, never through Python str objects: a 4 GB frame has 40 M of them.
    arr = pc.binary_join_element_wise("id-", pc.cast(pa.array(ints), pa.string()), "")
    arr = arr.cast(pa.large_string())
    return pa.chunked_array([arr]).to_pandas(types_mapper={pa.large_string(): STR_DTYPE}.get)


def mixed_frame_rows(nrows: int, seed: int = 0) -> pd.DataFrame:
    """A mixed-dtype frame of ``nrows`` rows (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, Any] = {}
    for i in range(N_FLOAT):
        cols[f"f{i}"] = rng.standard_normal(nrows)
    for i in range(N_INT):
        cols[f"i{i}"] = rng.integers(0, 1_000_000, nrows, dtype=np.int64)
    df = pd.DataFrame(cols)  # copies: two consolidated blocks, as a user's frame would have
    df["s0"] = _strings(rng.integers(0, 10**8, nrows)).array
    codes = rng.integers(0, N_CATEGORIES, nrows, dtype=np.int8)
    cats = [f"cat-{i:02d}" for i in range(N_CATEGORIES)]
    df["c0"] = pd.Categorical.from_codes(codes, categories=cats)
    secs = np.int64(1_577_836_800) + np.arange(nrows, dtype=np.int64)
    df["t0"] = pd.to_datetime(secs, unit="s", utc=True).tz_convert(TZ)
    df.attrs["bench"] = "mixed"
    return df


def frame_nbytes(df: pd.DataFrame) -> int:
    """Bytes of the frame's buffers (Arrow string buffers included, index included)."""
    return int(df.memory_usage(deep=True, index=True).sum())


def mixed_frame(target_bytes: int, seed: int = 0) -> pd.DataFrame:
    """A mixed-dtype frame of about ``target_bytes`` bytes."""
    probe = mixed_frame_rows(_PROBE_ROWS, seed)
    per_row = frame_nbytes(probe) / _PROBE_ROWS
    del probe
    return mixed_frame_rows(max(1, int(target_bytes / per_row)), seed)


_WIDE_KINDS = ("float", "int", "str", "category", "datetime")


def wide_frame(
    ncols: int, nrows: int = 1000, *, mixed: bool | str = True, seed: int = 0
) -> pd.DataFrame:
    """``ncols`` columns x ``nrows`` rows; mixed cycles through the five kinds, else float64;
    ``mixed="categories"``: every column a category with its own 50 categories."""
    rng = np.random.default_rng(seed)
    cols: dict[str, Any] = {}
    cats = pd.CategoricalDtype([f"cat-{i:02d}" for i in range(N_CATEGORIES)])
    base = pd.to_datetime(
        np.int64(1_577_836_800) + np.arange(nrows, dtype=np.int64), unit="s", utc=True
    ).tz_convert(TZ)
    for i in range(ncols):
        kind = _WIDE_KINDS[i % len(_WIDE_KINDS)] if mixed is True else "float"
        name = f"c{i}"
        if mixed == "categories":
            codes = rng.integers(0, N_CATEGORIES, nrows, dtype=np.int8)
            cols[name] = pd.Categorical.from_codes(
                codes, categories=[f"{name}-{k:02d}" for k in range(N_CATEGORIES)])
        elif kind == "float":
            cols[name] = rng.standard_normal(nrows)
        elif kind == "int":
            cols[name] = rng.integers(0, 1_000_000, nrows, dtype=np.int64)
        elif kind == "str":
            cols[name] = _strings(rng.integers(0, 10**8, nrows)).array
        elif kind == "category":
            codes = rng.integers(0, N_CATEGORIES, nrows, dtype=np.int8)
            cols[name] = pd.Categorical.from_codes(codes, dtype=cats)
        else:
            cols[name] = base
    return pd.DataFrame(cols)


def split_numeric(df: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    """Column names: (float64, int64, the rest)."""
    floats = [c for c in df.columns if df[c].dtype == np.float64]
    ints = [c for c in df.columns if df[c].dtype == np.int64]
    rest = [c for c in df.columns if c not in floats and c not in ints]
    return floats, ints, rest


# --- the full read ------------------------------------------------------------------------


def _sum_buffer(buf: pa.Buffer | None, dtype: Any) -> float:
    if buf is None or buf.size == 0:
        return 0.0
    n = buf.size // np.dtype(dtype).itemsize
    return float(np.frombuffer(buf, dtype=dtype, count=n).sum())


def touch_column(s: pd.Series) -> float:
    """Read every byte of one column's buffers and return a checksum.

    Numbers are summed; strings have their Arrow offsets and data bytes summed (through
    pyarrow's buffers, no Python str objects); categories their codes; datetimes their int64
    values. Sums wrap or round alike in every process, so checksums compare across methods.
    """
    dtype = s.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return float(np.asarray(s.array.codes).sum(dtype=np.int64))
    if isinstance(dtype, pd.DatetimeTZDtype):
        return float(s.array.asi8.sum())
    if isinstance(dtype, pd.StringDtype):
        arr = pa.array(s.array)  # the Arrow array pandas holds, not a copy
        chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
        total = 0.0
        for ch in chunks:
            _validity, offsets, data = ch.buffers()
            # Only the part of the offsets/data buffers this (possibly sliced) array uses;
            # sum(off - off[0]) without a temporary array (the read must not allocate).
            off = np.frombuffer(offsets, dtype=np.int64)[ch.offset : ch.offset + len(ch) + 1]
            total += float(int(off.sum()) - int(off[0]) * len(off))
            total += _sum_buffer(data.slice(int(off[0]), int(off[-1] - off[0])), np.uint8)
        return total
    values = s.to_numpy()
    if values.dtype.kind == "i":
        return float(values.sum(dtype=np.int64))
    return float(values.sum())


def touch_frame(df: pd.DataFrame) -> dict[str, float]:
    """Read every column of ``df`` fully; per-column checksums."""
    return {str(c): touch_column(df[c]) for c in df.columns}


def touch_arrays(names: list[str], block: np.ndarray, as_int: bool = False) -> dict[str, float]:
    """Checksums of the rows of a (columns x rows) block, as touch_column computes them."""
    out = {}
    for name, row in zip(names, block, strict=True):
        out[name] = float(row.sum(dtype=np.int64)) if as_int else float(row.sum())
    return out


def same_checksums(a: dict[str, float], b: dict[str, float], rtol: float = 1e-9) -> list[str]:
    """Columns whose checksums differ (beyond float rounding of reordered sums)."""
    bad = [k for k in a.keys() | b.keys() if k not in a or k not in b]
    for k in a.keys() & b.keys():
        x, y = a[k], b[k]
        if abs(x - y) > rtol * max(abs(x), abs(y), 1.0):
            bad.append(k)
    return sorted(bad)
