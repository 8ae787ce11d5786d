"""Categorical columns with text categories, stored as groups (storage format 2).

A frame of 10,000 categorical columns, each with its own 50 categories, described each
column and its categories in the JSON metadata (4 MB for that frame) and decoded them one by
one: 380 ms to open, most of it JSON and per-column bookkeeping. Here the columns whose
categories are unnamed Arrow text (pandas 3's ``str``, ``string[pyarrow]``) are grouped by
codes dtype: each group's codes are one 2-D block, like a numpy dtype's columns, and every
distinct list of categories is a run of one Arrow ``large_string`` table, checked once per
open. Per column the metadata holds its position and nothing else.

Other categoricals (object, number or datetime categories, named categories) keep the
per-column codec of :mod:`._codecs`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from . import _compat
from ._codecs import Mapped, Pool, Spec, _validate_arrow_full, equal_categories
from ._errors import CorruptEntryError

_NA = {"nan": np.nan, "NA": pd.NA}


def groupable(values: Any) -> str | None:
    """The ``na`` name ("nan" or "NA") of a Categorical's text categories when it can join a
    group, else None."""
    if not isinstance(values, pd.Categorical) or values.ndim != 1:
        return None
    cats = values.dtype.categories
    if type(cats) is not pd.Index or cats.name is not None:
        return None
    arr = cats._values
    if not isinstance(arr, pd.arrays.ArrowStringArray) or arr._pa_array.null_count:
        return None
    if not pa.types.is_large_string(arr._pa_array.type):
        return None
    return "NA" if cats.dtype.na_value is pd.NA else "nan"


def encode(columns: list[tuple[int, pd.Categorical, str]], pool: Pool) -> Spec:
    """The ``cats`` part of a frame's layout for ``columns`` [(position, values, na)]."""
    entries: list[pa.Array] = []
    seen: dict[Any, list[tuple[pd.Index, int]]] = {}

    def entry(dtype: pd.CategoricalDtype) -> int:
        same = seen.setdefault(dtype, [])  # equal lists are stored once
        i = equal_categories(same, dtype.categories)
        if i is not None:
            return i
        entries.append(dtype.categories._values._pa_array)
        same.append((dtype.categories, len(entries) - 1))
        return len(entries) - 1

    groups: dict[tuple[str, str], list[tuple[int, np.ndarray, int, bool]]] = {}
    for pos, values, na in columns:
        codes = values._codes
        groups.setdefault((codes.dtype.str, na), []).append(
            (pos, codes, entry(values.dtype), bool(values.dtype.ordered)))
    out = []
    for (dtype, na), cols in groups.items():
        cols.sort(key=lambda c: c[0])
        out.append({
            "cols": [c[0] for c in cols],
            "dtype": dtype,
            "na": na,
            "codes": pool.add_run([c[1] for c in cols]),  # one 2-D block of codes
            "cats": pool.add(np.array([c[2] for c in cols], dtype=np.int64)),
            "ordered": [j for j, c in enumerate(cols) if c[3]],
        })
    chunks = [c for e in entries for c in e.chunks]
    table = pa.concat_arrays(chunks) if chunks else pa.array([], pa.large_string())
    _, offsets_buf, data_buf = table.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=len(table) + 1,
                            offset=table.offset * 8)
    data = (np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
            if data_buf is not None else np.zeros(0, dtype=np.uint8))
    starts = np.cumsum([0, *(len(e) for e in entries)], dtype=np.int64)
    return {
        "groups": out,
        "table": {"starts": pool.add(starts), "offsets": pool.add(offsets - offsets[0]),
                  "data": pool.add(data)},
    }


class _Table:
    """The categories of one decode: the Arrow text table, checked once, and a string array
    per distinct list."""

    def __init__(self, spec: Spec, m: Mapped) -> None:
        self.spec, self.m = spec, m
        self.arr: pa.ChunkedArray | None = None
        self.starts: list[int] = []
        self.arrays: dict[tuple[int, str], Any] = {}

    def _load(self) -> None:
        m, spec = self.m, self.spec
        starts = m.get(spec["starts"], "<i8")
        offsets = m.get(spec["offsets"], "<i8")
        data = m.get(spec["data"], "|u1")
        if not len(offsets) or not len(starts):
            raise CorruptEntryError(f"{m.where}: empty categories table")
        total = len(offsets) - 1
        arr = pa.Array.from_buffers(pa.large_string(), total,
                                    [None, pa.py_buffer(offsets), pa.py_buffer(data)],
                                    null_count=0)
        _validate_arrow_full(arr, m)  # offsets within the data, UTF-8: read once, small
        if starts[0] != 0 or starts[-1] != total or (np.diff(starts) < 0).any():
            raise CorruptEntryError(f"{m.where}: categories table has bad starts")
        # chunked: a slice of it is what pandas' string arrays hold, with nothing to wrap
        self.arr, self.starts = pa.chunked_array([arr]), starts.tolist()

    def count(self) -> int:
        if self.arr is None:
            self._load()
        return len(self.starts) - 1

    def count_of(self, i: int) -> int:
        return self.starts[i + 1] - self.starts[i]

    def width(self, i: int) -> int:
        """The bytes of the codes pandas gives a Categorical of list ``i``."""
        return _compat.codes_width(self.count_of(i))

    def index(self, i: int, na: str) -> pd.Index:
        """A new Index of list ``i`` for each column: columns saved with equal categories
        may have had Index objects of their own, and renaming one (``.name = x``, in
        place) must not rename another's. Their text wrapper is shared."""
        arr = self.arrays.get((i, na))
        if arr is None:
            assert self.arr is not None  # count() came first
            a, b = self.starts[i], self.starts[i + 1]
            arr = self.arrays[(i, na)] = _compat.string_array(self.arr.slice(a, b - a), _NA[na])
        return pd.Index._simple_new(arr, name=None)  # type: ignore[attr-defined]


def decode(spec: Spec, m: Mapped, nrows: int,
           wanted: dict[int, list[int]]) -> list[tuple[pd.Categorical, list[int]]]:
    """The wanted columns (old position -> new positions) of the groups, as (Categorical,
    new positions)."""
    table = _Table(spec["table"], m)
    out = []
    for g in spec["groups"]:
        cols = g["cols"]
        if not any(old in wanted for old in cols):
            continue
        codes = m.get(g["codes"], g["dtype"])
        if codes.dtype.kind != "i":  # pandas would convert (copy) codes of another kind
            raise CorruptEntryError(f"{m.where}: category codes stored as {codes.dtype}")
        if codes.size != len(cols) * nrows:
            raise CorruptEntryError(f"{m.where}: block of category codes has a wrong size")
        codes = codes.reshape(len(cols), nrows)
        ids = m.get(g["cats"], "<i8")
        if len(ids) != len(cols) or (len(ids) and not 0 <= ids.min() <= ids.max() < table.count()):
            raise CorruptEntryError(f"{m.where}: bad categories references")
        ordered = set(g["ordered"])
        if not all(type(j) is int and 0 <= j < len(cols) for j in ordered):
            raise CorruptEntryError(f"{m.where}: bad ordered columns {g['ordered']!r:.80}")
        na = g["na"]
        if na not in _NA:
            raise CorruptEntryError(f"{m.where}: bad missing-value kind {na!r}")
        width = codes.dtype.itemsize
        for j, (old, i) in enumerate(zip(cols, ids.tolist(), strict=True)):
            news = wanted.get(old)
            if news is None:
                continue
            dtype = _compat.categorical_dtype(table.index(i, na), j in ordered)
            # Not checking the codes' range: that would read every page of the column.
            if table.width(i) != width:
                # mmcache stores the codes pandas made, whose width follows the number of
                # categories: another width means the metadata points elsewhere (converting
                # would copy them out of the mapped files)
                raise CorruptEntryError(
                    f"{m.where}: category codes of {width} bytes for {table.count_of(i)} "
                    "categories")
            out.append((pd.Categorical._simple_new(codes[j], dtype), news))  # type: ignore[attr-defined]
    return out
