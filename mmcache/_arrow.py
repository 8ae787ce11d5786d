"""``open_arrow``: an entry as a ``pyarrow.Table`` over the same mapped files, no data copied.

Each column's pandas array (as ``open`` builds it over the entry's memoised mapping) is
wrapped by ``pa.Array.from_buffers`` over ``pa.py_buffer`` of the mapped numpy memory, which
keeps the mapping alive for as long as the table lives. What Arrow lays out differently is
converted, and only that: validity bitmaps (pandas keeps a byte per row, or NaN / NaT in the
values; 1 bit a row), booleans (bits), category labels (small), and columns of a type Arrow
has no zero-copy form for (Period, Interval, complex: converted whole by ``pa.array``).

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


def table(frame: pd.DataFrame | pd.Series) -> pa.Table:
    """``frame`` as an Arrow table sharing its memory (see the module docstring)."""
    if isinstance(frame, pd.Series):
        frame = frame.to_frame(name=frame.name if frame.name is not None else 0)
    index = frame.index
    ranged = isinstance(index, pd.RangeIndex)
    arrays = [_array(frame.iloc[:, i]._values, f"column {frame.columns[i]!r}")
              for i in range(frame.shape[1])]
    # Names, index placement and pandas metadata exactly as from_pandas makes them, from an
    # empty slice (it converts no data).
    meta = pa.Schema.from_pandas(frame.iloc[:0], preserve_index=None if ranged else True)
    if not ranged:
        for level in range(index.nlevels):
            arrays.append(_array(index.get_level_values(level)._values, "the index"))
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


def _array(values: Any, where: str) -> pa.Array:
    if hasattr(values, "_pa_array"):  # Arrow strings, ArrowDtype: already Arrow
        chunked = values._pa_array
        return chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
    if isinstance(values, pd.Categorical):
        codes = values.codes
        indices = _primitive(codes, pa.from_numpy_dtype(codes.dtype), codes >= 0)
        return pa.DictionaryArray.from_arrays(
            indices, pa.array(np.asarray(values.categories)), ordered=values.ordered)
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
        raise UnsupportedTypeError(
            f"{where} has dtype {values.dtype}, which Arrow cannot hold ({exc}); open it "
            "with mmcache.open, or leave it out with columns=[...]"
        ) from exc
