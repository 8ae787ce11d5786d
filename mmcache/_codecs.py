"""Per-dtype encoding of pandas data into flat buffers, and decoding back without copies.

An encoder turns a column (or an index) into a small JSON-able *spec* plus numpy buffers that
it hands to a :class:`Pool`; the pool decides where each buffer lives in the entry's ``.npy``
files and returns a *ref* ``{"f": file, "o": offset, "n": count}``. A decoder gets the spec and
a :class:`Mapped` view of those files and rebuilds the pandas object over the mapped memory.
Each dtype family's encoder and decoder sit next to each other below.

Buffers of one numpy dtype share one ``.npy`` file: a frame of 10,000 float columns is one file
and one ``mmap``, not 10,000 (file descriptors, ``vm.max_map_count`` and ~80 µs per file would
otherwise dominate ``open``).
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import decimal
import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pandas.api.types import infer_dtype

from . import _compat
from ._errors import CorruptEntryError, UnsupportedTypeError
from ._time import freq_from_json, freq_to_json, tz_from_json, tz_to_json

_compat.install()  # masked columns over read-only maps need it (see _compat)

Spec = dict[str, Any]
# What decoding metadata that is well-formed JSON but not a layout mmcache wrote can raise
# (wrong types, missing keys, out-of-range numbers, absurd nesting): all mean corruption.
BAD_LAYOUT = (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError,
              RecursionError, pa.ArrowException)

# Non-block buffers start on 64-byte boundaries (Arrow's recommended alignment, and what
# SIMD kernels like); numpy's .npy data itself starts 64-byte aligned.
_ALIGN = 64
_NUMPY_KINDS = "biufcmM"


def equal_categories(seen: list[tuple[pd.Index, int]], categories: pd.Index) -> int | None:
    """The number kept beside the first of ``seen`` holding ``categories`` exactly, in order
    and dtype: pandas takes unordered dtypes holding the same words in another order as
    equal (and hashes them alike), but the codes of each mean their own order's labels."""
    for cats, i in seen:
        if cats.dtype == categories.dtype and cats.equals(categories):
            return i
    return None


class Pool:
    """Collects buffers for writing, one growing 1-D array per numpy dtype."""

    def __init__(self) -> None:
        self.files: dict[str, list[Any]] = {}
        self.counts: dict[str, int] = {}
        self.order: list[str] = []
        # Specs shared by equal categories (the categories of 10,000 category columns of
        # one CategoricalDtype are written once and decoded once); columns name them by
        # index. See categories().
        self.shared: dict[Any, list[tuple[pd.Index, int]]] = {}
        self.shared_specs: list[Spec] = []

    def categories(self, dtype: pd.CategoricalDtype, where: str) -> int:
        """The index of ``dtype``'s categories among the shared specs, each distinct list
        written once. Distinct means in order too: pandas takes unordered dtypes holding the
        same words in another order as equal (and hashes them alike), but the codes of each
        mean their own order's labels."""
        seen = self.shared.setdefault(dtype, [])
        i = equal_categories(seen, dtype.categories)
        if i is not None:
            return i
        # labels=True: object categories stay object (JSON); categories are small.
        self.shared_specs.append(
            encode_index(dtype.categories, self, f"{where} categories", labels=True))
        seen.append((dtype.categories, len(self.shared_specs) - 1))
        return len(self.shared_specs) - 1

    def add_run(self, arrays: list[np.ndarray]) -> Spec:
        """Place ``arrays`` (one numpy dtype) one after the other, the first aligned: the
        rows of one 2-D block. The ref covers them all."""
        first = None
        for arr in arrays:
            ref = self.add(arr, align=first is None)
            first = first or ref
        assert first is not None
        return {"f": first["f"], "o": first["o"], "n": sum(a.size for a in arrays)}

    def add(self, arr: np.ndarray, *, align: bool = True) -> Spec:
        arr = np.asarray(arr)
        dt = arr.dtype
        if dt.hasobject or dt.kind not in _NUMPY_KINDS:
            raise AssertionError(f"internal: buffer of dtype {dt} cannot be stored")
        flat = arr.reshape(-1) if arr.flags.c_contiguous else np.ascontiguousarray(arr).ravel()
        return self.put(dt, flat.size, flat, align=align)

    def put(self, dt: np.dtype, size: int, item: Any, *, align: bool = True) -> Spec:
        """Place ``size`` items of ``dt`` held by ``item`` (an array, or what the writer of
        the files knows how to copy: see _ingest) at the end of ``dt``'s file."""
        key = dt.str
        if key not in self.files:
            self.files[key] = []
            self.counts[key] = 0
            self.order.append(key)
        count = self.counts[key]
        if align and dt.itemsize and (count * dt.itemsize) % _ALIGN:
            pad = (_ALIGN - (count * dt.itemsize) % _ALIGN) // dt.itemsize
            if pad:
                self.files[key].append(np.zeros(pad, dtype=dt))
                count += pad
        self.files[key].append(item)
        self.counts[key] = count + size
        return {"f": self.order.index(key), "o": count, "n": int(size)}


class Mapped:
    """Read-only arrays over an entry's mapped files, handed out as plain ndarray views."""

    def __init__(self, arrays: list[np.ndarray], where: str) -> None:
        self.arrays = arrays
        self.where = where
        self.shared_specs: list[Spec] = []  # the layout's shared specs
        self.shared: dict[int, Any] = {}  # ... decoded once each
        # Writable columns built in memory over a private mapping, with what they were built
        # from (see edited()): their writes leave no trace in the mapping's pages.
        self.built: list[tuple[np.ndarray, np.ndarray]] = []
        # Writable copy-on-write mappings (pandas 2 without copy-on-write): what is decoded
        # over them is the frame's own memory, and two columns must never share it.
        self.private = any(a.flags.writeable for a in arrays)

    def for_layout(self, shared_specs: list[Spec]) -> Mapped:
        """This mapping with the layout's shared specs and an empty cache of their decoded
        objects, for one decode (its arrays and ``built`` are this mapping's own)."""
        m = copy.copy(self)
        m.shared_specs = list(shared_specs)
        m.shared = {}
        return m

    def edited(self) -> bool:
        """True if a column this mapping's frame built in memory was written since."""
        ids = np.array([id(v) for v in _NULLS], dtype=np.int64)
        for out, codes in self.built:
            now = np.asarray(np.frompyfunc(id, 1, 1)(out)).astype(np.int64)
            if not np.array_equal(now, ids[codes]):
                return True
        return False

    def get(self, ref: Spec, dtype: str | None = None) -> np.ndarray:
        try:
            f, start, count = ref["f"], ref["o"], ref["n"]
            if not all(type(x) is int for x in (f, start, count)):  # JSON false is no 0
                raise TypeError
            base = self.arrays[f]
        except BAD_LAYOUT as exc:
            raise CorruptEntryError(f"{self.where}: bad buffer reference {ref!r}") from exc
        if start < 0 or count < 0 or start + count > base.size:
            raise CorruptEntryError(
                f"{self.where}: buffer {ref!r} lies outside its file of {base.size} items"
            )
        if dtype is not None and base.dtype != np.dtype(dtype):
            raise CorruptEntryError(
                f"{self.where}: buffer {ref!r} has dtype {base.dtype}, metadata says {dtype}"
            )
        return base[start : start + count]

    def buffer(self, ref: Spec | None) -> pa.Buffer | None:
        return None if ref is None else pa.py_buffer(self.get(ref, "|u1"))


# --- labels and names (JSON scalars) -----------------------------------------------------


# Tuples in labels nest a level per MultiIndex-like level; far deeper ones would exhaust the
# recursion limit (here, in JSON and at open) instead of being refused.
_MAX_LABEL_NESTING = 100


def label_to_json(value: Any, where: str, _depth: int = 0) -> Any:
    """Encode a label or name as JSON, tagging what JSON cannot tell apart (tuples)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        if _depth >= _MAX_LABEL_NESTING:
            raise UnsupportedTypeError(
                f"{where} is nested too deeply (tuples in tuples more than "
                f"{_MAX_LABEL_NESTING} levels): flatten or rename it before save()"
            )
        return {"tuple": [label_to_json(v, where, _depth + 1) for v in value]}
    raise UnsupportedTypeError(
        f"{where} is {value!r} of type {type(value).__name__}; mmcache stores labels and names "
        "that are str, int, float, bool, None or tuples of those: rename it before save()"
    )


def label_from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(label_from_json(v) for v in value["tuple"])
        return float(value["float"])
    return value


# How deeply df.attrs may nest. JSON, copy.deepcopy (pandas copies attrs into derived frames;
# mmcache into each opened one) and pickle all recurse once or more per level: far deeper
# attrs would save but then fail to open or to pickle with RecursionError.
MAX_ATTRS_NESTING = 100


def check_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Return ``attrs`` if JSON holds it exactly, else raise UnsupportedTypeError."""

    def check(v: Any, path: str, depth: int) -> None:
        if v is None or isinstance(v, (bool, int, str)):
            return
        if isinstance(v, float):
            if not math.isfinite(v):
                raise UnsupportedTypeError(f"attrs{path} = {v!r}: JSON cannot hold it exactly")
            return
        if isinstance(v, (list, dict)) and depth >= MAX_ATTRS_NESTING:
            raise UnsupportedTypeError(
                f"attrs{path[:200]}... nests lists and dicts more than {MAX_ATTRS_NESTING} "
                "levels deep, which mmcache does not store (copying or pickling it would "
                "exhaust Python's recursion limit); flatten it, or store it as one str, e.g. "
                "json.dumps(...), before save()"
            )
        if isinstance(v, list):
            for i, x in enumerate(v):
                check(x, f"{path}[{i}]", depth + 1)
            return
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise UnsupportedTypeError(
                        f"attrs{path} has key {k!r}; JSON keys must be str: convert it"
                    )
                check(x, f"{path}[{k!r}]", depth + 1)
            return
        raise UnsupportedTypeError(
            f"attrs{path} = {v!r} of type {type(v).__name__}; mmcache keeps df.attrs as JSON "
            "(dict, list, str, int, finite float, bool, None): convert or drop it before save()"
        )

    check(attrs, "", 0)
    return attrs


# --- Arrow arrays (pandas strings, ArrowDtype) ------------------------------------------


def _arrow_type_to_json(t: pa.DataType) -> str:
    # Arrow's own schema serialisation (flatbuffers: data, never code) names any type exactly.
    return base64.b64encode(pa.schema([pa.field("x", t)]).serialize().to_pybytes()).decode()


@functools.lru_cache(maxsize=256)
def _arrow_type_from_json(s: str) -> pa.DataType:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(s))).field(0).type


def _arrow_storable(t: pa.DataType) -> bool:
    return not (
        pa.types.is_nested(t)
        or pa.types.is_dictionary(t)
        or isinstance(t, pa.ExtensionType)
        or _compat.is_view_type(t)
    )


def _encode_arrow(arr: pa.Array | pa.ChunkedArray, pool: Pool) -> Spec:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if arr.offset or arr.get_total_buffer_size() > arr.nbytes + _ALIGN:
        # A slice (df.head(), a filtered frame) still references its parent's buffers:
        # write only what it uses, as a compact copy made here at save time.
        arr = arr.take(pa.array(np.arange(len(arr), dtype=np.int64)))
    bufs = []
    for buf in arr.buffers():
        bufs.append(None if buf is None else pool.add(np.frombuffer(buf, dtype=np.uint8)))
    return {
        "type": _arrow_type_to_json(arr.type),
        "len": len(arr),
        "nulls": arr.null_count,
        "bufs": bufs,
    }


def _decode_arrow(spec: Spec, mapped: Mapped) -> pa.Array:
    try:
        typ = _arrow_type_from_json(spec["type"])
        return pa.Array.from_buffers(
            typ,
            int(spec["len"]),
            [mapped.buffer(b) for b in spec["bufs"]],
            null_count=int(spec["nulls"]),
        )
    except BAD_LAYOUT as exc:
        raise CorruptEntryError(f"{mapped.where}: cannot rebuild Arrow array: {exc}") from exc


def _validate_arrow(arr: pa.Array, mapped: Mapped) -> pa.Array:
    try:
        arr.validate(full=False)
    except pa.ArrowInvalid as exc:
        raise CorruptEntryError(f"{mapped.where}: Arrow buffers are inconsistent: {exc}") from exc
    return arr


def _validate_arrow_full(arr: pa.Array | pa.ChunkedArray, mapped: Mapped) -> None:
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise CorruptEntryError(f"{mapped.where}: Arrow data is damaged: {exc}") from exc


# --- arrays: encode -----------------------------------------------------------------------


def encode_array(values: Any, pool: Pool, where: str, *, code: str | None = None) -> Spec:
    """Encode a 1-D ndarray or ExtensionArray (a column's or an index's values).

    ``where`` names it in errors ("column 'a'"); ``code`` is how the user reaches it
    (``df['a']``), for the conversion an error suggests.
    """
    try:
        return _encode_array(values, pool, where, code)
    except UnicodeEncodeError as exc:
        x = code or "s"
        # Arrow (strings) and pandas' hashing (categories) encode str as UTF-8, which a lone
        # surrogate such as "\ud800" (os.fsdecode of bad bytes, a broken decode) cannot be.
        raise UnsupportedTypeError(
            f"{where} holds a str that is not valid Unicode{_first_bad_str(values)}: it contains "
            "a lone surrogate, which mmcache cannot store as UTF-8 text; replace it before "
            f"save(), e.g. {x}.str.encode('utf-8', 'replace').str.decode('utf-8'), or keep "
            f"the raw bytes: {x}.str.encode('utf-8', 'surrogateescape')"
            ".astype(pd.ArrowDtype(pa.binary()))"
        ) from exc


def _first_bad_str(values: Any) -> str:
    try:
        items = values.categories if isinstance(values.dtype, pd.CategoricalDtype) else values
        for i, v in enumerate(np.asarray(items, dtype=object)):
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    at = "a category" if items is not values else f"row {i}"
                    return f" ({at} is {v[:40]!r})"
    except Exception:  # only decorates the message
        pass
    return ""


def _encode_array(values: Any, pool: Pool, where: str, code: str | None) -> Spec:
    dtype = values.dtype
    if isinstance(values, np.ndarray) and dtype.kind in _NUMPY_KINDS:
        return {"c": "np", "v": pool.add(values)}
    if isinstance(dtype, pd.DatetimeTZDtype):
        return {"c": "dttz", "tz": tz_to_json(dtype.tz, where), "v": pool.add(values._ndarray)}
    if isinstance(dtype, pd.api.extensions.ExtensionDtype) and hasattr(values, "_mask"):
        return {"c": "masked", "dtype": dtype.name, "v": pool.add(values._data),
                "m": pool.add(values._mask)}
    if isinstance(dtype, pd.CategoricalDtype):
        return {
            "c": "cat",
            "ordered": bool(dtype.ordered),
            "codes": pool.add(values.codes),
            "cats": pool.categories(dtype, where),
        }
    if _is_object(dtype) and len(values) == 0:
        return {"c": "obj0"}  # an empty object column stays object: there is nothing to map
    if _is_object(dtype):
        nulls = _encode_nulls(values, pool)
        if nulls is not None:
            return nulls
    if isinstance(dtype, pd.StringDtype) or (_is_object(dtype) and _only_str(values)):
        na = "NA" if isinstance(dtype, pd.StringDtype) and dtype.na_value is pd.NA else "nan"
        if isinstance(dtype, pd.StringDtype) and dtype.storage in ("pyarrow", "pyarrow_numpy"):
            pa_arr = values._pa_array
        else:
            objs = np.asarray(values, dtype=object)
            try:
                pa_arr = pa.array(objs, type=pa.large_string(), from_pandas=True)
            except UnicodeError:
                raise  # a lone surrogate: encode_array names it
            except (pa.ArrowException, TypeError, ValueError):
                # Missing values Arrow does not take for null (np.float32("nan"), ...):
                # every missing value of a str column is stored as null.
                objs = objs.copy()
                objs[pd.isna(objs)] = None
                try:
                    pa_arr = pa.array(objs, type=pa.large_string(), from_pandas=True)
                except UnicodeError:
                    raise
                except (pa.ArrowException, TypeError, ValueError) as exc:
                    raise _unsupported(where, dtype, values) from exc
        if pa_arr.type != pa.large_string():
            pa_arr = pa_arr.cast(pa.large_string())
        return {"c": "str", "na": na, "arrow": _encode_arrow(pa_arr, pool)}
    if isinstance(values, pd.arrays.NumpyExtensionArray):
        return _encode_array(values.to_numpy(), pool, where, code)
    if isinstance(dtype, pd.ArrowDtype):
        pa_arr = values._pa_array
        if not _arrow_storable(pa_arr.type):
            raise _unsupported(where, dtype, code=code)
        return {"c": "arrow", "arrow": _encode_arrow(pa_arr, pool)}
    if isinstance(dtype, pd.PeriodDtype):
        return {"c": "period", "dtype": str(dtype), "v": pool.add(values.asi8)}
    if isinstance(dtype, pd.IntervalDtype):
        return {
            "c": "interval",
            "closed": values.closed,
            "l": encode_array(values.left._values, pool, f"{where} left"),
            "r": encode_array(values.right._values, pool, f"{where} right"),
        }
    if isinstance(values, pd.arrays.DatetimeArray | pd.arrays.TimedeltaArray):
        return _encode_array(values._ndarray, pool, where, code)
    raise _unsupported(where, dtype, values, code=code)


def _is_object(dtype: Any) -> bool:
    return isinstance(dtype, np.dtype) and dtype.kind == "O"


def _only_str(values: Any) -> bool:
    # An Index of object dtype that is empty stays object (kept exactly as JSON).
    kinds = ("string",) if isinstance(values, pd.Index) else ("string", "empty")
    kind = infer_dtype(values, skipna=True)
    if kind == "mixed" and not isinstance(values, pd.Index):
        # str with missing values infer_dtype does not skip (pd.NaT, ...): still text.
        objs = np.asarray(values, dtype=object)
        rest = objs[~pd.isna(objs)]
        return len(rest) > 0 and all(isinstance(v, str) for v in rest)
    return kind in kinds


# --- object columns holding only missing values -------------------------------------------
# They stay object columns of exactly those values (a column of None is not a str column, and
# accepts any later edit). Python objects cannot be mapped: open() builds the column in private
# memory (8 bytes a row, one shared array per process) from a stored byte per row. (Always a
# buffer, even when all rows are alike: a row count alone in metadata would let a damaged or
# hostile entry make open() allocate any amount; a buffer's size is checked against its file.)

_NULLS: tuple[Any, ...] = (None, np.nan, pd.NA, pd.NaT)


def _null_code(v: Any) -> int:
    if v is None:
        return 0
    if isinstance(v, float | np.floating) and v != v:
        return 1
    if v is pd.NA:
        return 2
    if v is pd.NaT:
        return 3
    return -1


def _encode_nulls(values: Any, pool: Pool) -> Spec | None:
    """The spec of an object column of only None/NaN/NA/NaT, else None (a quick no)."""
    arr = np.asarray(values, dtype=object)
    if _null_code(arr[0]) < 0 or _null_code(arr[-1]) < 0 or not pd.isna(arr).all():
        return None
    codes = np.fromiter((_null_code(v) for v in arr), dtype=np.int8, count=len(arr))
    if (codes < 0).any():
        return None  # a missing value of another kind (numpy NaT, Decimal NaN, ...)
    return {"c": "null", "codes": pool.add(codes.astype(np.uint8))}


def _decode_nulls(spec: Spec, m: Mapped) -> np.ndarray:
    codes = m.get(spec["codes"], "|u1")
    if len(codes) and int(codes.max()) >= len(_NULLS):
        raise CorruptEntryError(f"{m.where}: bad codes of a column of missing values")
    out = np.array(_NULLS, dtype=object)[codes]
    # Over the shared mapping, shared by every frame open() returns in this process (its
    # memo): edits copy (copy-on-write), and raw writes raise as they do on mapped columns.
    # Over a frame's own private mapping (pandas 2 without copy-on-write), the frame's own.
    out.flags.writeable = bool(codes.flags.writeable)
    if out.flags.writeable:
        m.built.append((out, codes))
    return out


# --- what cannot be stored, and what to do about it ---------------------------------------


def _type_name(t: type) -> str:
    module = t.__module__
    if module == "builtins":
        return t.__qualname__
    if module.startswith(("pandas.", "numpy.")):
        module = module.split(".", 1)[0]
    return f"{module}.{t.__qualname__}"


def _conversion(t: type, x: str) -> str | None:
    """A concrete conversion of a column of ``t`` objects (``x`` names it) to a stored dtype."""
    if issubclass(t, _dt.datetime | np.datetime64):  # pd.Timestamp is a datetime
        return (f"{x} = pd.to_datetime({x}) makes datetime64 (utc=True for mixed time "
                "zones)")
    if issubclass(t, _dt.date):
        return (f"{x} = pd.to_datetime({x}) makes datetime64, or "
                f"{x}.astype(pd.ArrowDtype(pa.date32())) keeps dates")
    if issubclass(t, _dt.time):
        return f"{x}.astype(pd.ArrowDtype(pa.time64('us')))"
    if issubclass(t, _dt.timedelta | np.timedelta64):
        return f"{x} = pd.to_timedelta({x})"
    if issubclass(t, decimal.Decimal):
        return (f"{x}.astype(float), or {x}.astype(pd.ArrowDtype(pa.decimal128(38, 10))) "
                "to keep them exact (pick the precision and scale you need)")
    if issubclass(t, dict | list | tuple | set | frozenset):
        return (f"{x}.map(json.dumps) stores them as str (mmcache stores no nested values), "
                "or drop the column")
    if issubclass(t, bytes | bytearray):
        return f"{x}.astype(pd.ArrowDtype(pa.binary()))"
    if issubclass(t, bool | np.bool_):
        return f"{x}.astype('boolean')"
    if issubclass(t, int | float | np.integer | np.floating):
        return (f"{x} = pd.to_numeric({x}) makes a numeric column "
                f"({x}.astype('Int64') or 'Float64' keeps missing values as <NA>)")
    if issubclass(t, complex | np.complexfloating):
        return f"{x}.astype(complex)"
    if issubclass(t, pd.Period):
        return f"{x}.astype('period[<freq>]'), e.g. 'period[D]'"
    if issubclass(t, pd.Interval):
        return f"pd.arrays.IntervalArray({x}.tolist())"
    return None


def _unsupported(
    where: str, dtype: Any, values: Any = None, *, code: str | None = None
) -> UnsupportedTypeError:
    x = code or "s"
    if values is not None and _is_object(dtype):
        sample = np.asarray(values[:1000], dtype=object)
        types = sorted({type(v) for v in sample if _null_code(v) < 0}, key=_type_name)
        names = ", ".join(_type_name(t) for t in types[:5]) + (", ..." if len(types) > 5 else "")
        hints = [h for h in (_conversion(t, x) for t in types) if h is not None]
        if len(types) > 1:
            hint = (f"one type per column; {x}.astype(str) if text is what you want"
                    + (f", or first make them one type: {hints[0]}" if hints else ""))
        elif hints:
            hint = hints[0]
        else:
            hint = f"{x}.astype(str), or drop the column"
        return UnsupportedTypeError(
            f"{where} has dtype object holding Python {names} values, which mmcache cannot "
            f"store; convert it before save(): {hint}"
        )
    if isinstance(dtype, pd.SparseDtype):
        hint = f"{x}.sparse.to_dense()"
    elif isinstance(dtype, pd.ArrowDtype):
        hint = (f"nested Arrow types are not stored; flatten it, or serialise it, e.g. "
                f"{x}.astype(str)")
    else:
        hint = f"{x}.astype(...) a dtype listed in the README's 'Supported dtypes', or drop it"
    return UnsupportedTypeError(
        f"{where} has dtype {dtype}, which mmcache cannot store; convert it before save(): "
        f"{hint}"
    )


# --- arrays: decode -----------------------------------------------------------------------


def _decode_np(spec: Spec, m: Mapped) -> np.ndarray:
    return m.get(spec["v"])


def tz_dtype(stored: Any, tz: Any, m: Mapped) -> pd.DatetimeTZDtype:
    """The pandas dtype of tz-aware values stored as ``stored`` (datetime64[unit])."""
    if not isinstance(stored, np.dtype) or stored.kind != "M":
        raise CorruptEntryError(f"{m.where}: tz-aware datetimes stored as {stored}")
    return pd.DatetimeTZDtype(unit=np.datetime_data(stored)[0], tz=tz_from_json(tz))


def _decode_dttz(spec: Spec, m: Mapped) -> Any:
    values = m.get(spec["v"])
    # The public constructors copy; _simple_new wraps the mapped values as they are.
    return pd.arrays.DatetimeArray._simple_new(values, dtype=tz_dtype(values.dtype, spec["tz"], m))


def _decode_masked(spec: Spec, m: Mapped) -> Any:
    dtype = pd.api.types.pandas_dtype(spec["dtype"])
    values, mask = m.get(spec["v"]), m.get(spec["m"], "|b1")
    if len(values) != len(mask):
        raise CorruptEntryError(f"{m.where}: values and mask differ in length")
    return dtype.construct_array_type()(values, mask, copy=False)


def _decode_cat(spec: Spec, m: Mapped) -> Any:
    codes = m.get(spec["codes"])
    if codes.dtype.kind != "i":  # pandas would convert (copy) codes of another kind
        raise CorruptEntryError(f"{m.where}: category codes stored as {codes.dtype}")
    cats_id = spec["cats"]
    cats = m.shared.get(cats_id)
    if cats is None:
        if not isinstance(cats_id, int) or not 0 <= cats_id < len(m.shared_specs):
            raise CorruptEntryError(f"{m.where}: bad categories reference {cats_id!r}")
        cats = m.shared[cats_id] = decode_index(m.shared_specs[cats_id], m, labels=True)
    # The checked constructor hashes the categories again (~100 µs a column); they were
    # unique when saved and the metadata is checksummed.
    dtype = _compat.categorical_dtype(cats, bool(spec["ordered"]))
    # Not checking the codes' range: that would read every page of the column.
    return _compat.categorical(codes, dtype)


def _decode_str(spec: Spec, m: Mapped) -> Any:
    arr = _validate_arrow(_decode_arrow(spec["arrow"], m), m)
    if arr.type != pa.large_string():
        raise CorruptEntryError(f"{m.where}: string column stored as Arrow {arr.type}")
    na = pd.NA if spec["na"] == "NA" else np.nan
    return _compat.string_array(arr, na)


def _decode_arrow_col(spec: Spec, m: Mapped) -> Any:
    arr = _validate_arrow(_decode_arrow(spec["arrow"], m), m)
    return pd.arrays.ArrowExtensionArray(arr)


def _decode_period(spec: Spec, m: Mapped) -> Any:
    dtype = pd.api.types.pandas_dtype(spec["dtype"])
    return pd.arrays.PeriodArray._simple_new(m.get(spec["v"], "<i8"), dtype=dtype)


def _decode_interval(spec: Spec, m: Mapped) -> Any:
    left, right = decode_array(spec["l"], m), decode_array(spec["r"], m)
    left_idx, right_idx = pd.Index(left, copy=False), pd.Index(right, copy=False)
    dtype = pd.IntervalDtype(left_idx.dtype, closed=spec["closed"])
    return pd.arrays.IntervalArray._simple_new(left_idx._values, right_idx._values, dtype=dtype)


_DECODERS: dict[str, Callable[[Spec, Mapped], Any]] = {
    "np": _decode_np,
    "obj0": lambda spec, m: np.empty(0, dtype=object),
    "null": _decode_nulls,
    "dttz": _decode_dttz,
    "masked": _decode_masked,
    "cat": _decode_cat,
    "str": _decode_str,
    "arrow": _decode_arrow_col,
    "period": _decode_period,
    "interval": _decode_interval,
}


def decode_array(spec: Spec, m: Mapped) -> Any:
    try:
        decoder = _DECODERS[spec["c"]]
    except (KeyError, TypeError) as exc:
        raise CorruptEntryError(f"{m.where}: unknown column codec in {spec!r:.80}") from exc
    try:
        return decoder(spec, m)
    except CorruptEntryError:
        raise
    except BAD_LAYOUT as exc:
        raise CorruptEntryError(f"{m.where}: metadata does not describe a column: {exc}") from exc


# --- indexes --------------------------------------------------------------------------------


def encode_index(index: pd.Index, pool: Pool, where: str, *, labels: bool = False) -> Spec:
    """Encode an Index. ``labels=True`` (column labels) keeps object dtype exactly, as JSON."""
    name = label_to_json(index.name, f"{where} name") if index.nlevels == 1 else None
    if isinstance(index, pd.RangeIndex):
        return {"c": "range", "start": index.start, "stop": index.stop, "step": index.step,
                "name": name}
    if isinstance(index, pd.MultiIndex):
        return {
            "c": "multi",
            "names": [label_to_json(n, f"{where} name") for n in index.names],
            "levels": [encode_index(lev, pool, f"{where} level", labels=labels)
                       for lev in index.levels],
            "codes": [pool.add(c) for c in index.codes],
        }
    if _is_object(index.dtype) and (labels or not _only_str(index)):
        return {"c": "json", "name": name,
                "values": [label_to_json(v, f"{where} label") for v in index]}
    spec: Spec = {"c": "index", "name": name, "values": encode_array(index._values, pool, where)}
    freq = getattr(index, "freq", None)
    if freq is not None and not isinstance(index, pd.PeriodIndex):
        spec["freq"] = freq_to_json(freq, where)
    return spec


class _Held:
    """What a frozen object array views: the array that holds its items' references, out
    of reach of numpy's flags (no buffer protocol, so a view of it stays read-only)."""

    __slots__ = ("__array_interface__", "_items")

    def __init__(self, items: np.ndarray) -> None:
        self._items = items
        self.__array_interface__ = {
            "shape": items.shape, "typestr": items.dtype.str, "strides": items.strides,
            "data": (items.__array_interface__["data"][0], True), "version": 3}


def frozen_objects(values: list[Any]) -> np.ndarray:
    """An object array of ``values`` that cannot be made writable: labels built from JSON
    are decoded once per version and shared by every frame of it, and an array that owns its
    memory lets ``arr.flags.writeable = True`` undo a read-only flag (numpy refuses it for a
    view of an object without a writable buffer). Items are kept exactly (tuples stay
    tuples)."""
    items = np.fromiter(values, dtype=object, count=len(values))
    items.flags.writeable = False
    if not len(items):
        return items
    return np.asarray(_Held(items))


def decode_index(spec: Spec, m: Mapped, *, labels: bool = False) -> pd.Index:
    """Rebuild an Index. ``labels`` (column labels, categories: small, and hashed at once)
    also checks Arrow string data in full, so damage is a CorruptEntryError, not a raw
    UnicodeDecodeError from deep inside pandas."""
    try:
        kind = spec["c"]
        if kind == "range":
            return pd.RangeIndex(spec["start"], spec["stop"], spec["step"],
                                 name=label_from_json(spec["name"]))
        if kind == "multi":
            levels = [decode_index(s, m, labels=labels) for s in spec["levels"]]
            codes = [m.get(c) for c in spec["codes"]]
            if any(c.dtype.kind != "i" for c in codes):
                raise CorruptEntryError(f"{m.where}: MultiIndex codes not integers")
            for level, c in zip(levels, codes, strict=True):
                # pandas indexes levels with these codes unchecked (verify_integrity=False,
                # which skips far costlier checks): a damaged code would crash the process.
                # One pass over small integers: the price of never segfaulting.
                if len(c) and (c.min() < -1 or c.max() >= len(level)):
                    raise CorruptEntryError(f"{m.where}: MultiIndex codes out of range")
            return pd.MultiIndex(
                levels=levels,
                codes=codes,
                names=[label_from_json(n) for n in spec["names"]],
                verify_integrity=False,
            )
        if kind == "json":
            return pd.Index(frozen_objects([label_from_json(v) for v in spec["values"]]),
                            dtype=object, copy=False, name=label_from_json(spec["name"]),
                            tupleize_cols=False)
        if kind == "index":
            values = decode_array(spec["values"], m)
            name = label_from_json(spec["name"])
            if isinstance(values, pd.arrays.ArrowExtensionArray):
                if labels:
                    _validate_arrow_full(values._pa_array, m)
                # A plain Index is the right class for Arrow data; skip the constructor's
                # inference (~50 µs, which adds up over 10,000 columns' categories).
                index = pd.Index._simple_new(values, name=name)
            else:
                index = pd.Index(values, name=name, copy=False)
            if "freq" in spec:
                # The public setter checks the freq against every value (O(rows) at each
                # open); it was valid when saved, so set it as pandas' own constructors do.
                _compat.set_freq(index, freq_from_json(spec["freq"]))
            return index
    except CorruptEntryError:
        raise
    except BAD_LAYOUT as exc:
        raise CorruptEntryError(f"{m.where}: metadata does not describe an index: {exc}") from exc
    raise CorruptEntryError(f"{m.where}: unknown index codec {kind!r}")
