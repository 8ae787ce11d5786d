"""``open_arrow``: an entry as a ``pyarrow.Table`` over the same mapped files, no data copied.

Each column's pandas array (as ``open`` builds it over the entry's memoised mapping) is
wrapped by ``pa.Array.from_buffers`` over ``pa.py_buffer`` of the mapped numpy memory, which
keeps the mapping alive for as long as the table lives. What Arrow lays out differently is
converted, and only that: validity bitmaps (pandas keeps a byte per row, or NaN / NaT in the
values; 1 bit a row), booleans (bits), category labels (small), and columns of a type Arrow
has no zero-copy form for (Period, Interval: converted whole by ``pa.array``). What Arrow
cannot hold (complex numbers, categories of Interval or mixed labels, a column label that
appears twice) raises an ``UnsupportedTypeError`` naming the key and the column and pointing
to ``mmcache.open``.

The index goes where ``pa.Table.from_pandas`` puts it: a RangeIndex only in the pandas
metadata, any other index as columns (``__index_level_0__`` when unnamed); the schema carries
that pandas metadata, so ``table.to_pandas()`` rebuilds the frame.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ._errors import UnsupportedTypeError


def table(frame: pd.DataFrame | pd.Series, key: str) -> pa.Table:
    """``frame`` (``key``'s entry) as an Arrow table sharing its memory (see the module
    docstring); what Arrow cannot hold raises an error naming the key and the column."""
    if isinstance(frame, pd.Series):
        frame = frame.to_frame(name=frame.name if frame.name is not None else 0)
    if not frame.columns.is_unique:
        twice = list(frame.columns[frame.columns.duplicated()].unique())
        raise UnsupportedTypeError(
            f"key {key!r}: column {twice[0]!r} appears more than once (labels {twice!r}), "
            "which an Arrow table with pandas metadata cannot hold (pa.Table.from_pandas "
            f"refuses it too); open it with mmcache.open({key!r}), leave it out with "
            f"mmcache.open_arrow({key!r}, columns=[...]), or save it with unique labels",
            key=key)
    index = frame.index
    ranged = isinstance(index, pd.RangeIndex)
    arrays = [_array(frame.iloc[:, i]._values, f"column {frame.columns[i]!r}", key)
              for i in range(frame.shape[1])]
    # Names, index placement and pandas metadata exactly as from_pandas makes them, from an
    # empty slice (it converts no data). preserve_index=None, not False, for a RangeIndex:
    # with False the metadata leaves out the column labels' type (int labels came back str).
    try:
        meta = pa.Schema.from_pandas(frame.iloc[:0], preserve_index=None if ranged else True)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        where = _culprit(frame.iloc[:0])
        raise UnsupportedTypeError(
            f"key {key!r}: {where} cannot be described to Arrow by pa.Schema.from_pandas "
            f"({exc}); open it with mmcache.open({key!r}) for the pandas frame"
            + ("" if where.startswith("the index") else
               f", or leave it out with mmcache.open_arrow({key!r}, columns=[...])"),
            key=key) from exc
    if not ranged:
        for level in range(index.nlevels):
            arrays.append(_array(index.get_level_values(level)._values, "the index", key))
    pandas_meta = json.loads(meta.metadata[b"pandas"])
    if ranged:
        pandas_meta["index_columns"] = [{"kind": "range", "name": index.name,
                                         "start": index.start, "stop": index.stop,
                                         "step": index.step}]
    metadata = {**meta.metadata, b"pandas": json.dumps(pandas_meta).encode()}
    return pa.Table.from_arrays(arrays, names=meta.names, metadata=metadata)


def _bitmap(valid: np.ndarray) -> pa.Buffer | None:
    """Arrow's validity bitmap for a bool mask of valid rows (a copy: 1 bit a row), or None
    when all are valid."""
    if valid.all():
        return None
    return pa.py_buffer(np.packbits(valid, bitorder="little"))


def _primitive(values: np.ndarray, typ: pa.DataType, valid: np.ndarray | None) -> pa.Array:
    """An Arrow array over ``values``' own memory (copied only if not contiguous)."""
    data = np.ascontiguousarray(values)
    if data.dtype.kind in "mM":
        data = data.view(np.int64)
    validity = None if valid is None else _bitmap(valid)
    nulls = 0 if validity is None or valid is None else int(len(valid) - valid.sum())
    return pa.Array.from_buffers(typ, len(data), [validity, pa.py_buffer(data)],
                                 null_count=nulls)


def _culprit(empty: pd.DataFrame) -> str:
    """Which of ``empty``'s columns (or its index) ``pa.Schema.from_pandas`` refuses."""
    for i in range(empty.shape[1]):
        try:
            pa.Schema.from_pandas(empty.iloc[:, [i]], preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError):
            return f"column {empty.columns[i]!r}"
    return "the index or the column labels"


def _unsupported(where: str, values: Any, key: str, exc: Exception) -> UnsupportedTypeError:
    leave = "" if where == "the index" else (
        f", or leave it out with mmcache.open_arrow({key!r}, columns=[...])")
    return UnsupportedTypeError(
        f"key {key!r}: {where} has dtype {values.dtype}, which Arrow cannot hold ({exc}); "
        f"open it with mmcache.open({key!r}) for the pandas frame{leave}", key=key)


def _dictionary(categories: pd.Index) -> pa.Array:
    """A categorical's labels as Arrow values, as ``pa.Table.from_pandas`` makes them:
    Period labels through pandas' own Arrow extension type. (Interval labels would go the
    same way, but from_pandas refuses them, the table's to_pandas fails and DuckDB stops on
    an internal error: refused.)"""
    if isinstance(categories.dtype, pd.PeriodDtype):
        return pa.array(categories.array)
    return pa.array(np.asarray(categories))


def _array(values: Any, where: str, key: str) -> pa.Array:
    if hasattr(values, "_pa_array"):  # Arrow strings, ArrowDtype: already Arrow
        chunked = values._pa_array
        return chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
    if isinstance(values, pd.Categorical):
        codes = values.codes
        indices = _primitive(codes, pa.from_numpy_dtype(codes.dtype), codes >= 0)
        try:
            return pa.DictionaryArray.from_arrays(
                indices, _dictionary(values.categories), ordered=values.ordered)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise _unsupported(where, values, key, exc) from exc
    if hasattr(values, "_mask") and values.dtype.kind != "b":  # Int*, UInt*, Float*
        return _primitive(values._data, pa.from_numpy_dtype(values._data.dtype), ~values._mask)
    if isinstance(values, pd.arrays.DatetimeArray) and values.tz is not None:
        data = values._ndarray
        unit = np.datetime_data(data.dtype)[0]
        typ = pa.timestamp(unit, tz=pa.lib.tzinfo_to_string(values.tz))
        return _primitive(data, typ, ~np.isnat(data))
    if isinstance(values, pd.arrays.DatetimeArray | pd.arrays.TimedeltaArray):
        values = values._ndarray
    if isinstance(values, np.ndarray) and values.dtype.kind in "iufmM":
        if values.dtype.kind in "mM":
            valid = ~np.isnat(values)
        elif values.dtype.kind == "f":
            valid = ~np.isnan(values)  # as from_pandas: NaN is null
        else:
            valid = None
        return _primitive(values, pa.from_numpy_dtype(values.dtype), valid)
    try:  # bool (bits), boolean, Period, Interval, object: converted
        return pa.array(values, from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise _unsupported(where, values, key, exc) from exc
