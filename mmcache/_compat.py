"""What differs between the pandas (and pyarrow) versions mmcache supports, and workarounds
for pandas code that writes into the arrays it is given: the one place for both, so the rest
of the code has no version branches.

Versions (pandas 2.2 to 3.1, pyarrow 15 and newer): building a frame from blocks, Arrow string
arrays, an index's freq, Arrow view types, and whether pandas writes edits in place (pandas 2
without copy-on-write, see :func:`writes_in_place`).

mmcache hands out columns over read-only memory maps. pandas copy-on-write copies a column
before an edit, so almost every operation works on them, but a few internal algorithms write
into their *input* buffers as scratch space, which raises "assignment destination is
read-only" on an opened frame (and on any frame built over read-only arrays).

Each workaround below names the pandas code it covers, acts only on read-only inputs (so a
plain frame takes pandas' own path, unchanged) and never makes a mapped buffer writable.
Differences between pandas versions that mmcache must bridge belong here too.

Audit (pandas 3.1, ``pandas/core/arrays/masked.py`` and ``array_algos``): of the masked-array
(``Int*``, ``UInt*``, ``Float*``, ``boolean``) operations, only the accumulations write into
their input. ``fillna``, ``pad_or_backfill``, ``interpolate``, ``clip``, ``round``, the
reductions (``masked_reductions``: sum, prod, min, max, mean, var, std, any, all), ufuncs,
arithmetic and groupby kernels copy first or take ``const`` views, and their ``copy=False``
paths are reached only after copy-on-write has copied the block (see
``tests/test_trust_codecs.py``, which runs them on an opened frame).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from ._mmap import in_private_mapping

PANDAS_2 = int(pd.__version__.split(".")[0]) < 3


def writes_in_place() -> bool:
    """True when pandas writes edits straight into a frame's arrays: pandas 2.x with
    copy-on-write off (its default) or in "warn" mode. Then a frame over read-only memory
    would refuse every in-place edit ("assignment destination is read-only"), so each
    ``open`` gets its own private copy-on-write mapping instead (see ``Cache._hand_out``).
    pandas 3 always copies on write; read at each open, as the option can change."""
    return PANDAS_2 and pd.options.mode.copy_on_write is not True


try:
    from pandas.api.internals import create_dataframe_from_blocks as frame_from_blocks
except ImportError:  # pandas 2.x: the same steps, from the internals that function wraps
    from pandas._libs.internals import BlockPlacement
    from pandas.core.arrays import DatetimeArray, TimedeltaArray
    from pandas.core.internals.blocks import (
        ensure_block_shape,
        get_block_type,
        maybe_coerce_values,
    )
    from pandas.core.internals.managers import BlockManager

    def frame_from_blocks(  # type: ignore[misc]
        blocks: list[tuple[Any, np.ndarray]], index: pd.Index, columns: pd.Index
    ) -> pd.DataFrame:
        """pandas 3's ``pandas.api.internals.create_dataframe_from_blocks``, for pandas 2."""
        objs = []
        for values, placement in blocks:
            dtype = values.dtype
            if (isinstance(dtype, pd.api.extensions.ExtensionDtype)
                    and getattr(dtype, "_supports_2d", False)) or isinstance(
                        values, DatetimeArray | TimedeltaArray):
                values = ensure_block_shape(values, ndim=2)
            values = maybe_coerce_values(values)
            objs.append(get_block_type(dtype)(values, ndim=2, placement=BlockPlacement(placement)))
        mgr = BlockManager(objs, [columns, index])
        return pd.DataFrame._from_mgr(mgr, mgr.axes)


def categorical_dtype(categories: pd.Index, ordered: bool) -> pd.CategoricalDtype:
    """``CategoricalDtype(categories, ordered)`` for categories already known valid (unique,
    no missing values: checked at save, or those of an existing dtype), built as pandas'
    ``CategoricalDtype._finalize`` (pandas 2.2 to 3.1) builds one but without checking them
    again: 0.5 µs instead of 9 (``_from_fastpath``) or ~100 (the checked constructor).
    10,000 categorical columns are 10,000 of these at every open."""
    dtype = pd.CategoricalDtype.__new__(pd.CategoricalDtype)
    dtype._categories = categories  # type: ignore[attr-defined]
    dtype._ordered = ordered  # type: ignore[attr-defined]
    return dtype


def codes_width(n: int) -> int:
    """The bytes of the codes pandas gives a Categorical of ``n`` categories (its
    ``coerce_indexer_dtype``: 126 categories take int8, 127 int16)."""
    return 1 if n < 2**7 - 1 else 2 if n < 2**15 - 1 else 4 if n < 2**31 - 1 else 8


def categorical(codes: np.ndarray, dtype: pd.CategoricalDtype) -> pd.Categorical:
    """A Categorical over ``codes`` without a copy or a check of their range, as
    ``Categorical.from_codes(codes, dtype=dtype, validate=False)`` builds it (that one also
    re-derives the dtype: ~4x slower), when ``codes`` already have the width pandas picks."""
    if codes.ndim != 1 or codes.dtype != np.dtype(f"i{codes_width(len(dtype.categories))}"):
        return pd.Categorical.from_codes(codes, dtype=dtype, validate=False)
    return pd.Categorical._simple_new(codes, dtype)  # type: ignore[attr-defined]


def string_array(arr: Any, na: Any) -> Any:
    """A pandas string array over Arrow ``large_string`` data ``arr``, without a copy.

    ``na`` is ``np.nan`` for pandas 3's default ``str`` dtype (also what object columns of
    str come back as: their data are stored as Arrow strings) or ``pd.NA`` for
    ``string[pyarrow]``. pandas 2.2 spells the first ``string[pyarrow_numpy]``, the dtype its
    ``future.infer_string`` option gives; pandas 2.3 and 3 ``StringDtype("pyarrow", na_value=nan)``.
    """
    template = _string_template(na is pd.NA)
    if template is not None:
        # pandas' own constructor for the results of its operations: the checked one takes
        # ~10 µs a column (2,000 text columns of a wide frame: 20 ms of each open)
        return template._from_pyarrow_array(arr)
    try:
        dtype = pd.StringDtype("pyarrow", na_value=na)
    except TypeError:  # pandas 2.2: no na_value
        dtype = pd.StringDtype("pyarrow" if na is pd.NA else "pyarrow_numpy")
    if PANDAS_2:  # 2.2: one class per dtype; 2.3: the array takes no dtype= yet
        return dtype.construct_array_type()(arr)
    return pd.arrays.ArrowStringArray(arr, dtype=dtype)


@functools.cache
def _string_template(na_is_na: bool) -> Any:
    """An empty string array of the dtype, whose ``_from_pyarrow_array`` (pandas 3.1 and
    newer) wraps large_string data without the checks; None where pandas has no such
    method."""
    cls = pd.arrays.ArrowStringArray
    if PANDAS_2 or not hasattr(cls, "_from_pyarrow_array"):
        return None
    import pyarrow as pa

    dtype = pd.StringDtype("pyarrow", na_value=pd.NA if na_is_na else np.nan)
    return cls(pa.array([], pa.large_string()), dtype=dtype)


def arrow_to_pandas(table: Any) -> pd.DataFrame:
    """The frame ``pd.read_parquet`` makes of Arrow ``table`` (``ingest`` converts each batch
    so): pandas' own conversion where it has one (3.x), else ``to_pandas`` with strings as
    Arrow-backed ``str``. (pandas 2 makes object columns of them, which ``save`` stores as the
    very same Arrow strings and opens as ``str``: the Python objects would be a detour, and
    a batch of only nulls would be an object column of None, not text.)"""
    # split_blocks: a block per column, so numbers without nulls are not copied into 2-D
    # blocks (ingest regroups columns itself).
    if not PANDAS_2:
        from pandas.io._util import arrow_table_to_pandas

        return arrow_table_to_pandas(table, to_pandas_kwargs={"split_blocks": True})
    import pyarrow as pa

    dtype = string_array(pa.array([], pa.large_string()), np.nan).dtype
    strings = {pa.string(): dtype, pa.large_string(): dtype}
    df = table.to_pandas(types_mapper=strings.get, split_blocks=True)
    # The mapper wins over the pandas metadata: a column pandas wrote as StringDtype (NA
    # for missing) would come back with NaN. Give it NA semantics, as save() opens it.
    meta = (table.schema.pandas_metadata or {}).get("columns", [])
    wrote_na = {c.get("field_name") for c in meta if c.get("numpy_type") == "string"}
    if wrote_na:
        index = {c for c in (table.schema.pandas_metadata or {}).get("index_columns", [])
                 if isinstance(c, str)}
        fields = [n for n in table.column_names if n not in index]
        for pos, name in enumerate(fields if len(fields) == df.shape[1] else []):
            col = df.iloc[:, pos]
            if name in wrote_na and col.dtype == dtype:
                df.isetitem(pos, pd.Series(string_array(col.array._pa_array, pd.NA),
                                           index=df.index, name=col.name))
    return df


def set_freq(index: pd.Index, freq: Any) -> None:
    """Set a DatetimeIndex/TimedeltaIndex's freq without the public setter's check of every
    value (O(rows) at each open; it was valid when saved), as pandas' own constructors do.
    pandas 3 keeps it on the index, pandas 2 on the index's array."""
    if PANDAS_2:
        index._data._freq = freq
    else:
        index._freq = freq


def own_freq(index: pd.Index) -> pd.Index:
    """``index`` with an array object of its own when it can hold a freq on pandas 2, which
    keeps the freq on the array: frames handed out over one mapping share their index's array, and
    ``df.index.freq = None`` on one would reach the others. Data are not copied."""
    # Without a freq too: `df.index.freq = "D"` sets it on the shared array (third attack).
    if not PANDAS_2 or not isinstance(index, pd.DatetimeIndex | pd.TimedeltaIndex):
        return index
    freq = index.freq
    data = index._data
    own = type(data)._simple_new(data._ndarray, freq=freq, dtype=data.dtype)
    out = type(index)._simple_new(own, name=index.name)
    # Same values: share what pandas builds lazily (the lookup engine, O(rows) once), as its
    # own Index views do; the freq is not among it.
    out._cache = index._cache
    return out


def is_view_type(t: Any) -> bool:
    """Arrow's string_view / binary_view (pyarrow 16+; older ones have neither)."""
    import pyarrow as pa

    return bool(getattr(pa.types, "is_string_view", lambda t: False)(t)
                or getattr(pa.types, "is_binary_view", lambda t: False)(t))


_ACCUMULATIONS = ("cumsum", "cumprod", "cummin", "cummax")


def _copy_if_read_only(
    func: Callable[..., tuple[np.ndarray, np.ndarray]],
) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Wrap one of pandas' masked accumulations so read-only inputs are copied first.

    ``pandas.core.array_algos.masked_accumulations._cum_func`` fills the masked slots of
    ``values`` in place (``values[mask] = fill_value``) before accumulating, and with
    ``skipna=True`` returns ``mask`` itself as the result's mask. ``BaseMaskedArray._accumulate``
    passes the column's own ``_data`` and ``_mask``, so ``Series.cumsum()`` (and cumprod,
    cummin, cummax, also via ``DataFrame``) fails on a read-only column. Copying a read-only
    ``values`` (and a read-only ``mask``, which the result would otherwise share and could not
    be edited through) costs what pandas' own result costs anyway.
    """

    @functools.wraps(func)
    def accumulate(values: np.ndarray, mask: np.ndarray, *args: Any,
                   **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        # Over a private mapping (pandas 2 without copy-on-write) the scratch writes would
        # land in the frame's own pages: harmless to its data, but they would mark it edited.
        if not values.flags.writeable or in_private_mapping(values):
            values = values.copy()
        if not mask.flags.writeable or in_private_mapping(mask):
            mask = mask.copy()
        return func(values, mask, *args, **kwargs)

    accumulate.__mmcache_wraps__ = func  # type: ignore[attr-defined]
    return accumulate


def _copy_objects_if_read_only(func: Callable[[np.ndarray], int]) -> Callable[[np.ndarray], int]:
    """pandas 2's ``lib.memory_usage_of_objects`` takes a writable buffer only (a Cython
    memoryview), so ``memory_usage(deep=True)``, ``info(memory_usage="deep")`` and
    ``sys.getsizeof`` raised on a read-only object column (all-missing columns of an opened
    frame). Reading it from a copy of the pointers costs 8 bytes a row, once."""

    @functools.wraps(func)
    def usage(values: np.ndarray) -> int:
        return func(values if values.flags.writeable else values.copy())

    usage.__mmcache_wraps__ = func  # type: ignore[attr-defined]
    return usage


def install() -> None:
    """Apply the workarounds (idempotent; called when mmcache is imported)."""
    if PANDAS_2:
        from pandas._libs import lib

        func = lib.memory_usage_of_objects
        if not hasattr(func, "__mmcache_wraps__"):
            lib.memory_usage_of_objects = _copy_objects_if_read_only(func)
    try:
        from pandas.core.array_algos import masked_accumulations
    except ImportError:  # pragma: no cover - a pandas without masked accumulations
        return
    # BaseMaskedArray._accumulate looks the function up by name at each call.
    for name in _ACCUMULATIONS:
        func = getattr(masked_accumulations, name, None)
        if func is not None and not hasattr(func, "__mmcache_wraps__"):
            setattr(masked_accumulations, name, _copy_if_read_only(func))
