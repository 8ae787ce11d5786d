"""pandas' assert helpers, against what a round trip through mmcache gives on this pandas.

Object columns (and row-index levels) holding only str come back as Arrow-backed strings (the
price of zero-copy, in the README's dtype table): pandas 3 names that dtype ``str``; pandas 2
names it ``string[pyarrow_numpy]`` (2.2) or ``str`` (2.3). On pandas 3 most test data are
``str`` already; on pandas 2 ``pd.DataFrame({"s": ["a"]})`` is object. The helpers below
compare ``left`` (what mmcache gave) with ``right`` (the plain frame) after converting only
``right`` by that rule, so a column that comes back as object where str is promised (or the
reverse) still fails. Column labels and categories stay object (they are kept as labels).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import infer_dtype

PANDAS_2 = int(pd.__version__.split(".")[0]) < 3
try:
    STR = pd.StringDtype("pyarrow", na_value=np.nan)
except TypeError:  # pandas 2.2
    STR = pd.StringDtype("pyarrow_numpy")


def _only_str(values: Any) -> bool:
    objs = np.asarray(values, dtype=object)
    if len(objs) == 0:
        return False
    rest = objs[~pd.isna(objs)]
    return len(rest) > 0 and all(isinstance(v, str) for v in rest)


def _as_str(values: Any) -> Any:
    """Object values of only str (with missing values): what mmcache gives back."""
    if isinstance(values.dtype, np.dtype) and values.dtype == object and _only_str(values):
        return pd.array(np.asarray(values, dtype=object), dtype=STR)
    return values


def as_opened_index(index: pd.Index) -> pd.Index:
    if isinstance(index, pd.MultiIndex):
        return index.set_levels([as_opened_index(level) for level in index.levels])
    if index.dtype == object and infer_dtype(index, skipna=True) == "string":
        return pd.Index(_as_str(index._values), name=index.name)
    return index


def as_opened(obj: Any) -> Any:
    """``obj`` as mmcache gives it back: object-of-str as Arrow strings (values, row index)."""
    if isinstance(obj, pd.DataFrame):
        out = obj.copy(deep=False)
        for i in range(obj.shape[1]):
            col = obj.iloc[:, i]
            new = _as_str(col._values)
            if new is not col._values:
                out.isetitem(i, new)
        out.index = as_opened_index(obj.index)
        out.attrs = obj.attrs
        return out
    if isinstance(obj, pd.Series):
        out = obj.copy(deep=False)
        values = _as_str(obj._values)
        if values is not obj._values:
            out = pd.Series(values, index=obj.index, name=obj.name)
            out.attrs = obj.attrs
        out.index = as_opened_index(obj.index)
        return out
    if isinstance(obj, pd.Index):
        return as_opened_index(obj)
    return obj


def assert_frame_equal(left: pd.DataFrame, right: pd.DataFrame, **kw: Any) -> None:
    pd.testing.assert_frame_equal(left, as_opened(right), **kw)


def assert_series_equal(left: pd.Series, right: pd.Series, **kw: Any) -> None:
    pd.testing.assert_series_equal(left, as_opened(right), **kw)


def assert_index_equal(left: pd.Index, right: pd.Index, **kw: Any) -> None:
    pd.testing.assert_index_equal(left, as_opened(right), **kw)
