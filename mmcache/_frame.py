"""A DataFrame or Series as metadata + buffers, and back; frames that pickle by reference.

Columns of one plain numpy dtype are written next to each other, so at open they form one
consolidated 2-D pandas block over the mapped file (a wide frame of one dtype behaves like a
normal consolidated frame: ``df.sum()`` over 10,000 columns is one call, not 10,000).
"""

from __future__ import annotations

import base64
import copy
import copyreg
import json
import operator
import os
import sys
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import _categories
from ._codecs import (
    BAD_LAYOUT,
    Mapped,
    Pool,
    Spec,
    check_attrs,
    decode_array,
    decode_index,
    encode_array,
    encode_index,
    label_from_json,
    label_to_json,
    tz_dtype,
)
from ._compat import (
    PANDAS_2,
    categorical_dtype,
    frame_from_blocks,
    own_freq,
    writes_in_place,
)
from ._errors import (
    ColumnNotFoundError,
    CorruptEntryError,
    EntryChangedError,
    InvalidArgumentError,
    MmcacheError,
    UnsupportedTypeError,
)
from ._memo import VERSION_META
from ._mmap import written
from ._time import tz_to_json


def encode(obj: pd.DataFrame | pd.Series, *, group: bool = True) -> tuple[Spec, Pool]:
    """Describe ``obj`` as a JSON-able layout plus the buffers to write. ``group=False``:
    every column has its own spec in ``ext`` (ingest merges them batch by batch), no
    categorical groups (see _categories).

    Raises UnsupportedTypeError before anything is written if any part cannot be stored.
    """
    try:
        return _encode(obj, group)
    except RecursionError as exc:
        # Labels (tuples) or values nested absurdly deep: say so instead of a raw RecursionError.
        raise UnsupportedTypeError(
            f"cannot save this {type(obj).__name__}: something in it (labels, names or attrs) "
            "is nested too deeply for Python's recursion limit; flatten it before save()"
        ) from exc


def _encode(obj: pd.DataFrame | pd.Series, group: bool) -> tuple[Spec, Pool]:
    pool = Pool()
    if isinstance(obj, pd.Series):
        layout: Spec = {
            "kind": "series",
            "nrows": len(obj),
            "ncols": 1,
            "name": label_to_json(obj.name, "Series name"),
            "values": encode_array(obj._values, pool, f"Series {obj.name!r}", code="s"),
        }
    elif isinstance(obj, pd.DataFrame):
        layout = {"kind": "frame", "nrows": len(obj), "ncols": obj.shape[1]}
        layout.update(_encode_columns(obj, pool, group))
        layout["columns"] = encode_index(obj.columns, pool, "column labels", labels=True)
    else:
        raise UnsupportedTypeError(
            f"mmcache.save() takes a pandas DataFrame or Series, got {type(obj).__name__}; "
            "wrap it with pd.DataFrame(...) first"
        )
    layout["index"] = encode_index(obj.index, pool, "index")
    layout["shared"] = pool.shared_specs
    layout["attrs"] = check_attrs(dict(obj.attrs))
    if not obj.flags.allows_duplicate_labels:
        # Only when set: layouts without "flags" (all older ones) mean pandas' default.
        layout["flags"] = {"allows_duplicate_labels": False}
    return layout, pool


def _encode_columns(df: pd.DataFrame, pool: Pool, group: bool) -> Spec:
    # Walk pandas' own blocks: one pass over 2-D blocks, no Series per column. Columns of a
    # numpy dtype are grouped per dtype and written in column order so they re-form a block.
    # (numpy dtype, time zone as JSON or None) -> [(position, values)]
    by_dtype: dict[tuple[str, str | None], list[tuple[int, np.ndarray]]] = {}
    ext: list[tuple[int, Any]] = []
    for blk in df._mgr.blocks:
        positions = blk.mgr_locs.as_array
        values = blk.values
        tz = None
        if isinstance(values, pd.arrays.DatetimeArray | pd.arrays.TimedeltaArray):
            if getattr(values, "tz", None) is not None:
                # tz-aware columns of one zone and unit form one 2-D block too
                tz = json.dumps(tz_to_json(values.tz, f"column {df.columns[positions[0]]!r}"))
            values = values._ndarray.reshape(len(positions), -1)
        if isinstance(values, np.ndarray) and values.dtype.kind in "biufcmM":
            for row, pos in enumerate(positions):
                by_dtype.setdefault((values.dtype.str, tz), []).append((int(pos), values[row]))
        elif values.ndim == 2:
            for row, pos in enumerate(positions):
                ext.append((int(pos), values[row]))
        else:
            ext.append((int(positions[0]), values))
    blocks = []
    for (dtype, tz), cols in by_dtype.items():
        cols.sort(key=lambda c: c[0])
        block = {
            "dtype": dtype,
            "v": pool.add_run([arr for _, arr in cols]),
            "cols": [pos for pos, _ in cols],
        }
        if tz is not None:
            block["tz"] = json.loads(tz)
        blocks.append(block)
    # Categoricals of text categories go in groups (format 2: see _categories)
    grouped = [(pos, values, na) for pos, values in ext
               if group and (na := _categories.groupable(values)) is not None]
    if grouped:
        done = {pos for pos, _, _ in grouped}
        ext = [(pos, values) for pos, values in ext if pos not in done]
    columns: list[Spec | None] = [None] * df.shape[1]
    for pos, values in sorted(ext, key=lambda c: c[0]):
        label = df.columns[pos]
        columns[pos] = encode_array(values, pool, f"column {label!r}", code=f"df[{label!r}]")
    out = {"blocks": blocks, "ext": {str(i): c for i, c in enumerate(columns) if c is not None}}
    if grouped:
        out["cats"] = _categories.encode(grouped, pool)
    return out


def decode(layout: Spec, m: Mapped, columns: Sequence[Any] | None) -> pd.DataFrame | pd.Series:
    """Rebuild the object over mapped buffers; only the requested columns are touched."""
    if columns is not None and layout.get("kind") == "series":
        raise InvalidArgumentError(f"{m.where} holds a Series; open it without columns=")
    try:
        # Decoded categories are shared by the columns of this frame only: a frame handed
        # out as decoded (the first open) must share no label object with later ones.
        m = m.for_layout(layout["shared"])
        nrows = int(layout["nrows"])
        index = decode_index(layout["index"], m)
        if len(index) != nrows:
            raise CorruptEntryError(f"{m.where}: index has {len(index)} rows, expected {nrows}")
        if layout["kind"] == "series":
            values = decode_array(layout["values"], m)
            _check_len(values, nrows, m)
            # dtype=object: pandas would infer datetime64 from an object array of NaT
            dtype = object if isinstance(values, np.ndarray) and values.dtype == object else None
            obj: pd.DataFrame | pd.Series = pd.Series(
                values, index=index, name=label_from_json(layout["name"]), dtype=dtype,
                copy=False,
            )
        else:
            obj = _decode_frame(layout, m, index, nrows, columns)
        obj.attrs = layout["attrs"]
        flags = layout.get("flags")
        if flags is not None:
            # Setting it checks the labels are unique, as they were at save.
            obj.flags.allows_duplicate_labels = bool(flags["allows_duplicate_labels"])
        pin(obj)
        freeze(obj)
        return obj
    except MmcacheError:
        raise
    except BAD_LAYOUT as exc:
        raise CorruptEntryError(f"{m.where}: metadata does not describe a frame: {exc}") from exc


def _check_len(values: Any, nrows: int, m: Mapped) -> None:
    if len(values) != nrows:
        raise CorruptEntryError(f"{m.where}: a column has {len(values)} rows, expected {nrows}")


def _decode_frame(
    layout: Spec, m: Mapped, index: pd.Index, nrows: int, columns: Sequence[Any] | None
) -> pd.DataFrame:
    all_labels = decode_index(layout["columns"], m, labels=True)
    ncols = int(layout["ncols"])
    if len(all_labels) != ncols:
        raise CorruptEntryError(f"{m.where}: {len(all_labels)} column labels, expected {ncols}")
    if columns is None:
        wanted = np.arange(ncols)
        labels = all_labels
    else:
        wanted = _positions(all_labels, columns, m.where)
        labels = all_labels.take(wanted)
    new_pos: dict[int, list[int]] = {}
    for new, old in enumerate(wanted.tolist()):
        new_pos.setdefault(old, []).append(new)

    blocks: list[tuple[Any, np.ndarray]] = []
    for blk in layout["blocks"]:
        cols = blk["cols"]
        arr2d = m.get(blk["v"], blk["dtype"])
        if arr2d.size != len(cols) * nrows:
            raise CorruptEntryError(f"{m.where}: block of {blk['dtype']} has a wrong size")
        arr2d = arr2d.reshape(len(cols), nrows)
        wrap = _tz_wrapper(blk, m)
        # Rows of the block that are wanted, as runs of consecutive rows: each run is a view.
        picks = [(row, new) for row, old in enumerate(cols) for new in new_pos.get(old, ())]
        if len(picks) == len(cols) and all(r == i for i, (r, _) in enumerate(picks)):
            blocks.append((wrap(arr2d), np.array([n for _, n in picks], dtype=np.intp)))
            continue
        used: set[int] = set()
        for row, new in picks:
            rows = arr2d[row : row + 1]
            if row in used and m.private:
                rows = rows.copy()  # a repeated column over a private mapping: its own memory
            used.add(row)
            blocks.append((wrap(rows), np.array([new], dtype=np.intp)))
    columns_out: list[tuple[Any, list[int]]] = []  # (values, new positions)
    for key, spec in layout["ext"].items():  # (fewer than the columns, in a wide frame)
        old = int(key)
        news = new_pos.get(old)
        if news is None or key != str(old):
            continue
        values = decode_array(spec, m)
        _check_len(values, nrows, m)
        if isinstance(values, np.ndarray):
            values = values.reshape(1, -1)  # a numpy column outside the blocks (empty object)
        columns_out.append((values, news))
    if "cats" in layout:
        columns_out += _categories.decode(layout["cats"], m, nrows, new_pos)
    for values, news in columns_out:
        for i, new in enumerate(news):
            # Columns asked for twice: over a private mapping (pandas 2 without copy-on-write
            # writes in place) each must be its own memory, as pandas makes them.
            own = values.copy() if i and m.private else values
            blocks.append((own, np.array([new], dtype=np.intp)))
    placed = np.sort(np.concatenate([p for _, p in blocks])) if blocks else np.zeros(0, int)
    if not np.array_equal(placed, np.arange(len(wanted))):
        raise CorruptEntryError(f"{m.where}: blocks do not cover the columns exactly once")
    return frame_from_blocks(blocks, index=index, columns=labels)




def _tz_wrapper(blk: Spec, m: Mapped) -> Any:
    """For a block of tz-aware datetimes, wrap its int64-like values without a copy."""
    if "tz" not in blk:
        return lambda values: values
    dtype = tz_dtype(np.dtype(blk["dtype"]), blk["tz"], m)
    return lambda values: pd.arrays.DatetimeArray._simple_new(values, dtype=dtype)


def _positions(all_labels: pd.Index, columns: Sequence[Any], where: str) -> np.ndarray:
    out: list[int] = []
    for label in columns:
        try:
            loc = all_labels.get_loc(label)
        except (KeyError, TypeError):
            raise ColumnNotFoundError(
                f"{where}: no column {label!r}; it has {list(all_labels)[:10]!r}"
                f"{' ...' if len(all_labels) > 10 else ''}: pick columns that exist"
            ) from None
        if isinstance(loc, slice):
            out.extend(range(*loc.indices(len(all_labels))))
        elif isinstance(loc, np.ndarray):
            out.extend(np.flatnonzero(loc).tolist())
        else:
            out.append(int(loc))
    return np.array(out, dtype=np.intp)


# --- frames that pickle by reference --------------------------------------------------------


class _Ref:
    """What a mapped frame needs to pickle as a reference and to tell if it was modified."""

    __slots__ = (
        "attrs",
        "axes",
        "axis_data",
        "cache_dir",
        "columns",
        "flags",
        "key",
        "name",
        "names",
        "private",
        "token",
        "values",
        "version",
    )

    def __init__(self, obj: Any, cache_dir: str, version: Any, columns: Any,
                 private: Mapped | None) -> None:
        self.cache_dir, self.columns = cache_dir, columns
        # The frame's own copy-on-write mapping (pandas 2 without copy-on-write), whose
        # written pages tell an in-place edit: None when the frame is over the shared one.
        self.private = private
        self.key, self.token = version.key, version.token
        # The frame keeps this process's mapping of its version alive, and only the frame
        # does (the memo holds it weakly): the last frame to go unmaps it.
        self.version = version
        self.axes = list(obj._mgr.axes)
        self.names = [list(ax.names) for ax in self.axes]
        # What an axis can lose or swap in place (see _axis_state).
        self.axis_data = [_axis_state(ax) for ax in self.axes]
        self.name = obj.name if isinstance(obj, pd.Series) else None
        self.attrs = copy.deepcopy(obj.attrs)
        self.flags = obj.flags.allows_duplicate_labels  # setting it is an edit too
        # Arrow-backed arrays are edited by swapping their _pa_array (no read-only buffer
        # stops it), so that identity is part of "unmodified" too.
        self.values = [(blk.values, _label_state(blk.values), blk.mgr_locs.as_array.tolist())
                       for blk in obj._mgr.blocks]

    def openable(self) -> bool:
        """The receiver can map this version: its files are on disk, and kept there while
        this process maps them (an old version is removed only once nobody maps it)."""
        if not self.version.maps_files:
            return False  # nothing mapped keeps the files: pickling the data is tiny anyway
        if os.path.exists(self.version.data_dir / VERSION_META):
            return True
        # Written before versions linked their metadata: openable only while current.
        from ._cache import Cache

        return Cache(self.cache_dir)._current_token(self.key) == self.token

    def unmodified(self, obj: Any) -> bool:
        mgr = obj._mgr
        if len(mgr.axes) != len(self.axes) or len(mgr.blocks) != len(self.values):
            return False
        if any(a is not b or not _same_labels(list(a.names), n)
               or not _same_objects(_axis_state(a), state)
               for a, b, n, state
               in zip(mgr.axes, self.axes, self.names, self.axis_data, strict=True)):
            return False
        for blk, (values, state, locs) in zip(mgr.blocks, self.values, strict=True):
            if (blk.values is not values
                    or not _same_state(_label_state(values), state)
                    or blk.mgr_locs.as_array.tolist() != locs):
                return False
        if isinstance(obj, pd.Series) and not _same_label(obj.name, self.name):
            return False
        if not _same_json(obj.attrs, self.attrs) or \
                obj.flags.allows_duplicate_labels != self.flags:
            return False
        # Edits in place (pandas 2 without copy-on-write) keep every object as it was: the
        # pages they wrote tell them.
        return self.private is None or not (written(self.private.arrays)
                                             or self.private.edited())


def _label_state(values: Any) -> Any:
    """What an array's own objects can change in place: the Arrow data an Arrow-backed
    array holds (``.array[i] = x`` swaps it), a categorical's categories' name, freq
    (datetime categories: ``.cat.categories.freq = x``) and Arrow data, and its dtype's own
    categories and ordered flag (private attributes, set in place). None for the rest
    (numpy buffers are read-only). A µs a column: it runs for every column at every open."""
    if type(values) is pd.Categorical:
        dtype = values.dtype
        categories = dtype.categories
        if isinstance(categories, pd.MultiIndex):
            return (tuple(categories.names), None, None, categories, dtype.ordered)
        return (categories._name, getattr(categories, "freq", None),
                getattr(categories._data, "_pa_array", None), categories, dtype.ordered)
    return getattr(values, "_pa_array", None)


def _same_state(a: Any, b: Any) -> bool:
    """Freqs, Arrow data, categories and ordered flags by identity (setting any makes a new
    object or flips a singleton), names as labels."""
    if type(a) is tuple and type(b) is tuple:
        return _same_label(a[0], b[0]) and all(x is y for x, y in zip(a[1:], b[1:], strict=True))
    return a is b


def _axis_state(index: pd.Index) -> list[Any]:
    """The objects an axis holds that can be set or swapped in place, to be compared by
    identity (setting any makes a new object): its freq (pandas 2 keeps it on the array),
    an Arrow-backed one's data (``Index.array[i] = x`` on pandas 2), a CategoricalIndex's
    categories' names and theirs (``df.index.categories.name = x``, ``.freq = x``), a
    MultiIndex's levels' (``df.index.levels[0].freq = x``). O(levels): never ``_values``
    of a RangeIndex or MultiIndex (see :func:`_axis_arrow`)."""
    if isinstance(index, pd.RangeIndex):
        return []
    if isinstance(index, pd.MultiIndex):  # (`df.index.sortorder = 1` sets it in place)
        return [index.sortorder, *(x for level in index.levels for x in _axis_state(level))]
    values = index._values
    out = [getattr(index, "freq", None), getattr(values, "_pa_array", None)]
    if type(values) is pd.Categorical:
        categories = values.dtype.categories
        out.extend(categories.names)
        out.extend(_axis_state(categories))
    return out


def _same_objects(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _axis_arrow(index: pd.Index) -> Any:
    """An index's Arrow data, if it has any. Never ``_values`` of a RangeIndex or MultiIndex:
    pandas would build them (8 bytes a row, tuples) and keep them."""
    if isinstance(index, pd.RangeIndex | pd.MultiIndex):
        return None
    return getattr(index._values, "_pa_array", None)


def _same_label(a: Any, b: Any) -> bool:
    """The same label as the receiver would rebuild: the same type, and for numbers the
    same bits (``-0.0`` is not ``0.0``; ``True`` is not ``1``; ``NaT`` is not ``NaN``);
    tuples item by item. (Saved labels and names are str, int, float, bool, None or tuples
    of those; anything else is of another type than what the receiver rebuilds.)"""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same_label(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | complex | np.floating | np.complexfloating):
        return bool(np.asarray(a).tobytes() == np.asarray(b).tobytes()) or (a != a and b != b)
    try:
        return bool(a == b) or (a != a and b != b)
    except (TypeError, ValueError):
        return False


def _same_labels(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    # the same objects (labels taken from one decoded version): no need to look at them
    return all(map(operator.is_, a, b)) or all(
        _same_label(x, y) for x, y in zip(a, b, strict=True))


def _same_json(a: Any, b: Any) -> bool:
    """Equal and of the same types throughout (``1`` is not ``1.0`` nor ``True``): attrs
    the receiver would get back from the entry must be exactly the sender's."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):  # keys too: {1: x} is not {1.0: x}
        return {(type(k), k) for k in a} == {(type(k), k) for k in b} and all(
            _same_json(v, b[k]) for k, v in a.items())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return _same_label(a, b)


# Protocol 0 writes these as 6-byte escapes (and every non-ASCII character as a 6- or 10-byte
# one); protocols 1-5 write a non-ASCII character as 2 to 4 bytes of UTF-8.
_ESCAPED = ("\\", "\n", "\r", "\x1a")


def pack_name(name: str, *, path: bool) -> str:
    """A reference's key or cache directory as a str every pickle protocol stores in one
    byte a character: as it is when it is plain ASCII, else a NUL (which no key and no path
    holds) and Base85 of its bytes (5 characters for 4 bytes). So a reference's size hardly
    depends on the protocol (README "Chunks and views"). ``path``: a file system path (its
    bytes as the OS has them), else a key (UTF-8). O(characters)."""
    if name.isascii() and not any(c in name for c in _ESCAPED):
        return name
    raw = os.fsencode(name) if path else name.encode("utf-8", "surrogatepass")
    return "\0" + base64.b85encode(raw).decode("ascii")


def unpack_name(name: Any, *, path: bool) -> Any:
    """:func:`pack_name` undone (anything else as it came)."""
    if not isinstance(name, str) or not name.startswith("\0"):
        return name
    raw = base64.b85decode(name[1:])
    return os.fsdecode(raw) if path else raw.decode("utf-8", "surrogatepass")


def _reopen(cache_dir: str, key: str, token: str, columns: Any, view: Any = None) -> Any:
    """Unpickle a reference: exactly version ``token``, or EntryChangedError. ``view``:
    the rows and columns of it a derived frame was (see _views.cut). ``cache_dir`` and
    ``key`` as :func:`pack_name` packed them."""
    from ._cache import Cache, _os_error

    # The reference as it came (a view's spec included): what a stand-in pickles back to.
    args = (cache_dir, key, token, columns) if view is None else (
        cache_dir, key, token, columns, view)
    cache_dir, key = unpack_name(cache_dir, path=True), unpack_name(key, path=False)
    if _in_dask_scheduler():
        # The scheduler only passes task arguments on to workers: never map there (it may
        # be on a host without the entry), hand the reference on as it came.
        return _Forward(*args)
    error: MmcacheError
    try:
        if view is None:
            obj = Cache(cache_dir)._open_version(key, token, columns)
        elif writes_in_place():
            # pandas 2 without copy-on-write: the view is cut from a frame over its own
            # private mapping, where edits may write in place
            from ._views import cut

            obj = Cache(cache_dir)._open_version(key, token, columns)
            obj = None if obj is None else cut(obj, view)
        else:
            from ._views import rebuild

            obj = rebuild(cache_dir, key, token, view)
    except MmcacheError as exc:  # damaged files, an unusable directory, ...
        obj, error = None, exc
    except OSError as exc:  # out of descriptors or memory, no permission
        obj, error = None, _os_error(exc, key, cache_dir)
    else:
        if obj is not None:
            return obj
        error = EntryChangedError(
            f"key {key!r} in {cache_dir!r}: the version a frame was pickled from is gone (the "
            "key was re-saved or deleted and no process maps that version any more); open the "
            "key again in the worker (Entry.open()), or keep a frame of it alive in the "
            "sender until the workers are done" + _dask_hint(cache_dir),
            key=key,
            path=cache_dir,
        )
    if _in_task_loop() or _in_dask_comm():
        # Raising here would kill a Pool worker while it reads its task: Pool.map would wait
        # forever, ProcessPoolExecutor would break. The task gets a stand-in that raises
        # this error on first use, so it reaches the caller as the task's own error.
        return Unavailable(error, args)
    raise error


# Pool and executor loops that lose a task or a result when unpickling it raises (Pool: a
# worker dies and map() waits forever, or the result thread dies; executors break with
# BrokenProcessPool): (function name, end of its file's path). Worker loops read tasks,
# the others read results sent back by workers (a worker may return an opened frame).
_TASK_LOOPS = (
    ("worker", os.path.join("multiprocessing", "pool.py")),
    ("_handle_results", os.path.join("multiprocessing", "pool.py")),
    ("_process_worker", os.path.join("concurrent", "futures", "process.py")),
    ("wait_result_broken_or_wakeup", os.path.join("concurrent", "futures", "process.py")),
    ("_process_worker", os.path.join("loky", "process_executor.py")),
    ("wait_result_broken_or_wakeup", os.path.join("loky", "process_executor.py")),
)


class _Forward:
    """A reference passing through a Dask scheduler: pickles as it came, maps nothing."""

    __slots__ = ("args",)

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, self.args)

    def __repr__(self) -> str:
        what = "reference" if len(self.args) < 5 else "view reference"
        key = unpack_name(self.args[1], path=False)
        return f"<mmcache {what} to key {key!r}, version {self.args[2]}>"


def _in_dask_scheduler() -> bool:
    return "distributed" in sys.modules and _called_from(
        lambda code: code.co_name == "update_graph"
        and code.co_filename.endswith(os.path.join("distributed", "scheduler.py")),
        depth=40,
    )


def _in_dask_comm() -> bool:
    """distributed unpickles task arguments (and results) while reading a message: an
    error raised there breaks the connection instead of failing the task."""
    return "distributed" in sys.modules and _called_from(
        lambda code: code.co_name == "loads"
        and code.co_filename.endswith(os.path.join("distributed", "protocol", "pickle.py")),
        depth=40,
    )


def _dask_hint(cache_dir: str) -> str:
    """Where a Dask worker is, and the way to give its node a copy; "" elsewhere."""
    if "distributed" not in sys.modules:
        return ""
    import socket

    import distributed

    try:
        address = distributed.get_worker().address
    except ValueError:  # not running a task: reading one (or not a worker at all)
        worker = next(iter(distributed.Worker._instances), None)
        if worker is None:
            return ""
        address = worker.address
    return (f". This is Dask worker {address} on node {socket.gethostname()!r}, where "
            f"{cache_dir!r} does not hold that version: a frame opened on one node can only "
            "be opened on that node; give every node its own copy with "
            "mmcache.dask.share(client, df) and pass the handle it returns")


def _in_task_loop() -> bool:
    return _called_from(
        lambda code: any(code.co_name == n and code.co_filename.endswith(f)
                         for n, f in _TASK_LOOPS),
        depth=40,
    )


def _called_from(matches: Callable[[types.CodeType], bool], depth: int) -> bool:
    """True if one of the ``depth`` frames above the caller runs code that ``matches``."""
    frame: types.FrameType | None = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if matches(frame.f_code):
            return True
        frame = frame.f_back
    return False


class Unavailable:
    """Stands in for a frame whose pickled version could not be opened inside a pool: any
    use raises the error that says why (EntryChangedError, or CorruptEntryError for damaged
    files, ...), naming the key.

    Attribute access is the one thing that does not raise: it gives another stand-in, so a
    task that unpickles into ``getattr(frame, "query")`` (a bound method sent as the task)
    still reaches the point where it is used, and raises there, as the task's own error.
    ``repr`` says what it is, for debugging; ``str`` and formatting raise, like any use.
    """

    __slots__ = ("_mmcache_args", "_mmcache_error")

    def __init__(self, error: MmcacheError, args: tuple[Any, ...] | None = None) -> None:
        object.__setattr__(self, "_mmcache_error", error)
        # The reference it came from: pickled again, it is that reference (a Dask worker
        # asked for it by another, on a host that may hold the version), never an error.
        object.__setattr__(self, "_mmcache_args", args)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        e = object.__getattribute__(self, "_mmcache_error")
        raise type(e)(e.message, key=e.key, path=e.path)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            return self._fail()  # protocol probes (e.g. __array_interface__): a use
        return Unavailable(object.__getattribute__(self, "_mmcache_error"))

    def __repr__(self) -> str:
        return f"<mmcache.Unavailable: {object.__getattribute__(self, '_mmcache_error')}>"


for _name in (
    "__getitem__", "__setitem__", "__delitem__", "__len__", "__iter__", "__reversed__",
    "__contains__", "__bool__", "__array__", "__array_ufunc__", "__array_function__",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__call__",
    "__str__", "__format__", "__bytes__", "__int__", "__float__", "__complex__", "__index__",
    "__round__", "__trunc__", "__floor__", "__ceil__", "__neg__", "__pos__", "__abs__",
    "__invert__", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__",
    "__mul__", "__rmul__", "__imul__", "__matmul__", "__rmatmul__", "__truediv__",
    "__rtruediv__", "__itruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__",
    "__divmod__", "__rdivmod__", "__pow__", "__rpow__", "__ipow__", "__lshift__", "__rshift__",
    "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__setattr__",
    "__delattr__", "__reduce__", "__reduce_ex__", "__copy__", "__deepcopy__",
    "__getstate__", "__enter__", "__exit__", "__dataframe__", "__arrow_c_stream__",
    "__dir__", "__sizeof__", "__fspath__",
):
    setattr(Unavailable, _name, Unavailable._fail)


def _unavailable_reduce(self: Unavailable, *protocol: Any) -> Any:
    args = object.__getattribute__(self, "_mmcache_args")
    if args is None:
        return self._fail()
    return (_reopen, args)


Unavailable.__reduce__ = _unavailable_reduce  # type: ignore[method-assign,assignment]
Unavailable.__reduce_ex__ = _unavailable_reduce  # type: ignore[method-assign,assignment]


def _reduce(obj: Any) -> Any:
    """Pickle reducer for DataFrame and Series (registered with copyreg).

    A frame handed out by open(), unmodified, whose entry still holds its version pickles as
    a reference (key, cache directory, version: a few hundred bytes) and the receiving
    process maps the same files; so does an unmodified row range or column subset of one
    (see _views.py). Anything else pickles exactly as pandas pickles it.

    A hook on the exact classes, rather than a subclass, keeps ``type(mmcache.open(k))`` a
    plain ``pd.DataFrame``: pandas' testing helpers and user code that compare classes work.
    """
    ref = obj.__dict__.get("_mmcache_ref")
    if ref is not None:
        if ref.unmodified(obj) and ref.openable() and not _persisting():
            return (_reopen, (pack_name(ref.cache_dir, path=True),
                              pack_name(ref.key, path=False), ref.token, ref.columns))
    else:
        try:  # (the import too: a process out of descriptors cannot import)
            from ._views import reference

            view = reference(obj)  # a row range or column subset of an opened frame?
        except Exception:  # the check must never break pickling: then the data go
            view = None
        if view is not None and not _persisting():
            return (_reopen, view)
    return obj.__reduce_ex__(2)


def _persisting() -> bool:
    """True inside ``DataFrame.to_pickle``: a file meant to outlive the entry gets the data."""
    return _called_from(
        lambda code: code.co_name == "to_pickle" and f"pandas{os.sep}" in code.co_filename,
        depth=9,
    )


copyreg.pickle(pd.DataFrame, _reduce)
copyreg.pickle(pd.Series, _reduce)


# A reference that never dies, added to the copy-on-write bookkeeping of every block over
# mapped memory (see pin()).
class _Anchor:
    pass


_ANCHOR = _Anchor()
_PIN = weakref.ref(_ANCHOR)


def pin(obj: pd.DataFrame | pd.Series) -> None:
    """Make pandas copy-on-write copy before any in-place write into ``obj``'s blocks.

    pandas writes in place into a block no other live block references; over read-only
    mapped memory that raises "assignment destination is read-only". Each block's shared
    reference list gets one permanent extra entry, so every frame derived from it, at any
    time (after the base frame, the memo or the entry itself are gone), copies the touched
    column first instead.
    """
    for blk in obj._mgr.blocks:
        blk.refs.referenced_blocks.append(_PIN)


def own(obj: Any) -> Any:
    """``obj`` (a shallow copy of a decoded frame) given label objects and array wrappers of
    its own, over the same data: nothing a user can change in place on it (an axis's or a
    categorical's categories' name, an index's freq, the Arrow data an ``.array[i] = x``
    swaps) is shared with the process's decoded base, the next ``open`` or another frame.
    Numpy label arrays need no copy: :func:`freeze` made them read-only. O(blocks).

    Always new axis objects: pandas 2 with copy-on-write keeps a row range's columns Index
    (``df.iloc[a:b].columns is df.columns``), so a view cut from the decoded base would
    share its labels' names with every later open."""
    obj.index = _own_index(obj.index, always=True)
    if isinstance(obj, pd.DataFrame):
        obj.columns = _own_index(obj.columns, always=True)
    for blk in obj._mgr.blocks:
        values = blk.values
        if isinstance(values, pd.arrays.ArrowExtensionArray):
            # `df["s"].array[0] = x` swaps the wrapper's data in place
            blk.values = values.view()
        elif isinstance(values, pd.Categorical):
            # `df["c"].cat.categories.name = x` renames the dtype's own Index in place
            dtype = categorical_dtype(_own_index(values.dtype.categories, always=True),
                                      values.dtype.ordered)
            blk.values = pd.Categorical._simple_new(values._codes, dtype)  # type: ignore[attr-defined]
        elif PANDAS_2 and isinstance(values, pd.arrays.DatetimeArray | pd.arrays.TimedeltaArray):
            # pandas 2: `s.array.freq = x` sets a Series' freq on the block's array itself
            # (with copy-on-write on, it reached every later open); a slice keeps the freq
            blk.values = values[:]
    return obj


def _own_index(index: pd.Index, *, always: bool = False) -> pd.Index:
    """A new Index object over the same data when the data are Arrow-backed (their wrapper is
    swappable in place), or a MultiIndex has such levels; ``always``: in any case."""
    if isinstance(index, pd.MultiIndex):
        # pandas 2: a datetime level's freq lives on its array, shared by _view()
        # (`df.index.levels[0].freq = x` reached every later open with copy-on-write on);
        # a categorical level's categories are its dtype's (`.categories.name = x` too)
        if not any(_axis_arrow(level) is not None or isinstance(level, pd.CategoricalIndex)
                   or (PANDAS_2 and isinstance(level, pd.DatetimeIndex | pd.TimedeltaIndex))
                   for level in index.levels):
            return index._view() if always else index
        return pd.MultiIndex(levels=[own_freq(_own_index(level)) for level in index.levels],
                             codes=index.codes, sortorder=index.sortorder,
                             names=index.names, verify_integrity=False)
    if isinstance(index, pd.CategoricalIndex):
        # `df.index.categories.name = x` renames the dtype's own Index in place (third attack)
        values = index._values
        dtype = categorical_dtype(_own_index(values.dtype.categories, always=True),
                                  values.dtype.ordered)
        return pd.CategoricalIndex._simple_new(  # type: ignore[attr-defined]
            pd.Categorical._simple_new(values._codes, dtype), name=index.name)  # type: ignore[attr-defined]
    if (PANDAS_2 or always) and _axis_arrow(index) is not None:
        # pandas 2's Index.array is the Index's own array (pandas 3 hands out a read-only
        # view): `.array[i] = x` swaps its Arrow data in place; on pandas 3 the private
        # `._data[i] = x` still does (categories of a kept base reached every later open)
        return type(index)._simple_new(index._values.view(), name=index.name)  # type: ignore[attr-defined]
    if not always:
        return index
    # pandas 2 keeps a DatetimeIndex's freq on its array, which _view() shares: datetime
    # categories (`df["c"].cat.categories.freq = x`) and datetime axes need their own
    owned = own_freq(index)
    return index._view() if owned is index else owned


def freeze(obj: Any) -> None:
    """Make the label arrays of a decoded frame read-only (its axes, MultiIndex levels and
    codes, categories): built from JSON they are writable, and pandas 2 with copy-on-write
    lets ``Index.array[i] = x`` write into them, which would reach every frame of the
    version. Mapped ones are read-only already."""
    indexes = [obj.index] + ([obj.columns] if isinstance(obj, pd.DataFrame) else [])
    seen: set[int] = set()
    for blk in obj._mgr.blocks:
        values = blk.values
        if isinstance(values, pd.Categorical):
            cats = values.dtype.categories
            # Arrow text holds no numpy array to freeze; columns may share their categories
            if id(cats) not in seen:
                seen.add(id(cats))
                if not isinstance(cats._values, pd.arrays.ArrowStringArray):
                    indexes.append(cats)
    while indexes:
        index = indexes.pop()
        if isinstance(index, pd.RangeIndex):
            continue  # no array: ``_values`` would build one (8 bytes a row) and keep it
        if isinstance(index, pd.MultiIndex):
            indexes.extend(index.levels)
            arrays = list(index.codes)
        else:
            values = index._values
            if isinstance(values, np.ndarray):
                arrays = [values]
            elif hasattr(values, "_mask"):  # nullable numbers and booleans
                arrays = [values._mask, values._data]
            else:
                arrays = [values._ndarray] if hasattr(values, "_ndarray") else []
            if isinstance(values, pd.Categorical):
                arrays.append(values._codes)
                indexes.append(values.categories)
        for arr in arrays:
            arr.flags.writeable = False


def hand_out(
    base: pd.DataFrame | pd.Series, cache_dir: str | os.PathLike[str], version: Any,
    columns: Any, *, private: Mapped | None = None, fresh: bool = False,
) -> pd.DataFrame | pd.Series:
    """A new frame object over ``base``'s buffers: edits copy (pandas copy-on-write, see
    pin()), so neither the cache nor other frames ever see them. ``private``: ``base`` lies
    over this frame's own copy-on-write mapping (pandas 2 without copy-on-write writes in
    place: the kernel copies each written page instead). ``fresh``: ``base`` was decoded
    for this frame alone and is handed out itself."""
    obj = base if fresh else own(base.copy(deep=False))
    obj.attrs = copy.deepcopy(base.attrs)
    object.__setattr__(obj, "_mmcache_ref",
                       _Ref(obj, os.fspath(cache_dir), version, columns, private))
    return obj
