"""Frames derived from opened frames that still pickle by reference: row ranges and column
subsets.

``df.iloc[a:b]``, ``df[["x", "y"]]`` or ``df["x"]`` of an opened frame are views of its mapped
pages, but they are plain pandas objects: nothing in pandas says where they came from. So a
view is recognised by what it *is*, never by how it was made:

1. its first column's buffer lies in a mapping of a cache file: that names the version;
2. each column's row-0 address places it in one column of that version, at one row offset
   ``a`` shared by all columns: a guess at ``(columns, a, b)``;
3. the frame the receiver will build for that guess (:func:`cut` of the full version, the
   very function the receiver runs) is built here too and compared with the view, part by
   part: same classes and dtypes, labels, names, attrs and flags by value; buffers the same
   memory or the same bytes of the same cache file; small unmapped ones (categories, labels)
   by value. Anything not understood compares unequal.

So a view pickles as a reference only when the receiver provably rebuilds the same data: a
renamed, re-indexed, re-typed or edited view (pandas copy-on-write copies an edited column
out of the mapping) pickles in full. On pandas 2 without copy-on-write, edits write into the
frame's private mapping: any written page of a view's mappings makes it pickle in full.
"""

from __future__ import annotations

import base64
import bisect
import copy
import pickle
import zlib
from typing import Any

import numpy as np
import pandas as pd

from ._frame import pack_name
from ._mmap import any_mapped, find_region, regions_written

# Unmapped arrays (categories and labels rebuilt from JSON, all-missing object columns)
# compared by value up to this many items; a larger one makes the view pickle in full.
SMALL = 1 << 16


class _Where:
    """Finds which mapped cache file, and where in it, an address lies (O(log mappings) a
    lookup: this runs for every frame pickled in a process that maps an entry)."""

    def __init__(self) -> None:
        self.private: set[Any] = set()  # regions of the view that are private mappings

    def find(self, address: int, nbytes: int) -> Any:
        r = find_region(address, max(nbytes, 1))
        return None if r is None or r.owner is None else r

    def place(self, address: int, nbytes: int) -> tuple[Any, int] | None:
        """(file, offset) of these bytes in a cache file, or None."""
        r = self.find(address, nbytes)
        return None if r is None else (r.owner, address - r.address)


def reference(obj: pd.DataFrame | pd.Series) -> tuple[Any, ...] | None:
    """``(cache_dir, key, token, None, spec)`` for :func:`_frame._reopen` if ``obj`` is an
    unmodified view of a saved version that is still on disk and its reference fits in
    :data:`LIMIT` bytes, else None (pickle in full). Cost: O(blocks of ``obj``) (a 2-D
    block of 10,000 columns as one) once the version's block index is built (O(blocks of
    the version), once per process), plus O(columns) for what comes apart from the version's
    blocks (columns taken one by one, labels that are not the version's own objects)."""
    if type(obj) not in (pd.DataFrame, pd.Series) or len(obj) == 0:
        return None
    if not any_mapped():
        return None
    where = _Where()
    # Any one column outside the mappings settles it, before looking at the others (this
    # runs for every frame pickled in a process that has an entry open).
    if isinstance(obj, pd.Series):
        first = _row0(obj._values)
    elif obj.shape[1] and obj._mgr.blocks:
        values = obj._mgr.blocks[0].values
        first = _row0(values[0] if values.ndim == 2 else values)
    else:
        return None
    region = None if first is None else where.find(first[0], first[1])
    if region is None:
        return None
    cache_dir, key, token, _ = region.owner
    base = _full(cache_dir, key, token)
    if base is None:
        return None
    guess = _guess(obj, base, where)
    if guess is None:
        return None
    positions, a = guess
    series = isinstance(obj, pd.Series)
    if isinstance(base, pd.Series) or (not series and len(positions) == base.shape[1]
                                        and (positions == np.arange(len(positions))).all()):
        cols = None
    else:
        cols = encode_positions(positions, base.shape[1])
    spec = (cols, a, a + len(obj), series)
    args = (pack_name(cache_dir, path=True), pack_name(key, path=False), token, None, spec)
    if _size(args) > LIMIT - _CALL:
        # e.g. a random half of 10,000 columns (no encoding fits), a long cache directory
        return None
    rebuilt = cut(base, spec)
    if not _same_object(obj, rebuilt, where):
        return None
    # pandas 2 without copy-on-write writes edits into the frame's own private mapping: a
    # written page anywhere in the view's mappings (conservative) means it may differ.
    if where.private and regions_written(list(where.private)):
        return None
    return args


# The contract's bound on a view's pickled reference, under every pickle protocol; and what
# the call around the arguments adds (the global ``mmcache._frame _reopen``: 29 to 31 bytes
# whatever the protocol) with room to spare for the memo bookkeeping a reference inside a
# larger pickle may add (a few bytes for each of its ~8 objects).
LIMIT = 1024
_CALL = 64


def _size(args: tuple[Any, ...]) -> int:
    """The most bytes ``args`` take pickled under any protocol: the pickler does not tell a
    reducer which protocol it uses. Their strings are ASCII (:func:`pack_name`,
    :func:`encode_positions`), so protocols differ by their framing only. ~5 µs."""
    return max(len(pickle.dumps(args, protocol=p)) for p in range(pickle.HIGHEST_PROTOCOL + 1))


def _full(cache_dir: str, key: str, token: str) -> Any:
    """The whole frame of this version, decoded over this process's shared mapping of it
    (never handed out: it is only compared against), if the version is still on disk."""
    from pathlib import Path

    from . import _memo
    from ._cache import Cache, no_gc
    from ._paths import entry_name

    version = _memo.load_version(Path(cache_dir), key, entry_name(key), token)
    if version is None or not (version.data_dir / _memo.VERSION_META).exists():
        return None  # written before versions linked their metadata: not openable by token
    with no_gc():
        return Cache._base(version, None)


def rebuild(cache_dir: str, key: str, token: str, spec: tuple[Any, ...]) -> Any:
    """The receiver's side: the view ``spec`` of version ``token``, over this process's
    shared mapping, with label objects of its own; None if the version is gone."""
    from pathlib import Path

    from . import _memo
    from ._cache import Cache, no_gc
    from ._frame import own
    from ._paths import entry_name

    version = _memo.load_version(Path(cache_dir), key, entry_name(key), token)
    if version is None:
        return None
    with no_gc():
        obj = own(cut(Cache._base(version, None), spec))
    # Like a frame open() returned, the view keeps this process's mapping of its version
    # (and the decoded base) while it lives: more views of it map and decode nothing.
    object.__setattr__(obj, "_mmcache_version", version)
    return obj


def cut(frame: pd.DataFrame | pd.Series, spec: tuple[Any, ...]) -> pd.DataFrame | pd.Series:
    """Rows ``a:b`` and the columns ``cols`` (:func:`encode_positions`; None: all) of
    ``frame``, as views of its buffers; a Series when ``series``. The sender builds this
    to check a view, the receiver to rebuild it: one function, so both build the same.
    O(columns taken): consecutive columns of one 2-D block stay one block."""
    from ._compat import frame_from_blocks
    from ._frame import pin

    cols, a, b, series = spec
    if not 0 <= a <= b <= len(frame):
        raise ValueError(f"rows {a}:{b} out of a frame of {len(frame)}")
    if isinstance(frame, pd.Series) or cols is None:
        return frame.iloc[a:b]
    positions = np.asarray(decode_positions(cols, frame.shape[1]), dtype=np.intp)
    if series:
        (p,) = positions.tolist()
        return frame._ixs(p, axis=1).iloc[a:b]
    mgr = frame._mgr
    blknos, blklocs = mgr.blknos[positions], mgr.blklocs[positions]
    # Runs of positions that are consecutive columns of one block: each is one view.
    breaks = np.flatnonzero((blknos[1:] != blknos[:-1]) | (blklocs[1:] != blklocs[:-1] + 1)) + 1
    firsts = [0, *breaks.tolist()] if len(positions) else []
    ends = [*breaks.tolist(), len(positions)] if len(positions) else []
    blocks: list[tuple[Any, np.ndarray]] = []
    for i, j in zip(firsts, ends, strict=True):
        loc = int(blklocs[i])
        values = mgr.blocks[int(blknos[i])].values
        part = values[loc : loc + j - i, a:b] if values.ndim == 2 else values[a:b]
        blocks.append((part, np.arange(i, j, dtype=np.intp)))
    out = frame_from_blocks(blocks, index=frame.index[a:b],
                            columns=frame.columns.take(positions))
    out.attrs = copy.deepcopy(frame.attrs)
    out.flags.allows_duplicate_labels = frame.flags.allows_duplicate_labels
    pin(out)
    return out


# --- column positions, compactly --------------------------------------------------------
# A reference names its columns by position in the version. Three encodings, the shortest
# wins: "r" runs of consecutive positions as varints (start relative to the previous run's
# end, zigzag-signed, so reorders and repeats cost little), "z" the same deflated, and "b"
# a deflated bitmap (increasing positions only). Chunks of all columns need none. The
# winner's bytes go as Base85 text after its letter: every pickle protocol stores ASCII in
# one byte a character, where bytes would cost up to twice that in protocols 0 to 2.


def encode_positions(positions: Any, ncols: int) -> str:
    """O(runs) in Python (the runs are found with numpy)."""
    pos = np.asarray(positions, dtype=np.int64)
    breaks = np.flatnonzero(pos[1:] != pos[:-1] + 1) + 1
    firsts = np.concatenate([[0], breaks]).astype(np.int64) if len(pos) else breaks
    lengths = np.diff(np.concatenate([firsts, [len(pos)]])) if len(pos) else breaks
    raw = bytearray()
    prev = 0
    for start, length in zip(pos[firsts].tolist(), lengths.tolist(), strict=True):
        delta = start - prev
        _varint(raw, (delta << 1) ^ (delta >> 63))
        _varint(raw, length - 1)
        prev = start + length
    options = [b"r" + bytes(raw), b"z" + zlib.compress(bytes(raw), 9)]
    if len(raw) > 16 and bool((pos[1:] > pos[:-1]).all()):
        mask = np.zeros(ncols, dtype=bool)
        mask[pos] = True
        options.append(b"b" + zlib.compress(np.packbits(mask).tobytes(), 9))
    best = min(options, key=len)
    return chr(best[0]) + base64.b85encode(best[1:]).decode("ascii")


def decode_positions(text: str, ncols: int) -> list[int]:
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("column positions are not a reference's text")
    kind, data = text[:1].encode("ascii"), base64.b85decode(text[1:])
    if kind == b"b":
        bits = np.unpackbits(np.frombuffer(zlib.decompress(data), dtype=np.uint8))
        if bits[ncols:].any():
            raise ValueError("column bitmap past the version's columns")
        return np.flatnonzero(bits[:ncols]).tolist()
    if kind == b"z":
        data = zlib.decompress(data)
    elif kind != b"r":
        raise ValueError(f"unknown column encoding {kind!r}")
    numbers = _varints(data)
    if len(numbers) % 2:
        raise ValueError("column runs cut short")
    out: list[int] = []
    prev = 0
    for z, extra in zip(numbers[::2], numbers[1::2], strict=True):
        start = prev + ((z >> 1) ^ -(z & 1))
        if start < 0 or start + extra >= ncols:
            raise ValueError("column run past the version's columns")
        out.extend(range(start, start + extra + 1))
        prev = start + extra + 1
    return out


def _varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _varints(data: bytes) -> list[int]:
    out, v, shift = [], 0, 0
    for byte in data:
        v |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            out.append(v)
            v, shift = 0, 0
    if shift:
        raise ValueError("varint cut short")
    return out


def _columns(obj: pd.DataFrame | pd.Series) -> list[Any]:
    """Each column's 1-D array, by position (whatever the blocks)."""
    if isinstance(obj, pd.Series):
        return [obj._values]
    out: list[Any] = [None] * obj.shape[1]
    for blk in obj._mgr.blocks:
        values = blk.values
        for row, pos in enumerate(blk.mgr_locs.as_array.tolist()):
            out[pos] = values[row] if values.ndim == 2 else values
    return out


def _row0(values: Any) -> tuple[int, int] | None:
    """(address of row 0, bytes a row) of the buffer that runs along an array's rows."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or not len(values):
            return None
        return values.__array_interface__["data"][0], values.strides[0]
    if isinstance(values, pd.Categorical):
        return _row0(values._codes)
    if isinstance(values, pd.arrays.IntervalArray):
        return _row0(_unindex(values._left))
    for attr in ("_mask", "_ndarray"):  # masked arrays: their values; numpy-backed ones
        if hasattr(values, attr):
            return _row0(values._data if attr == "_mask" else values._ndarray)
    chunked = getattr(values, "_pa_array", None)
    if chunked is None or chunked.num_chunks != 1:
        return None
    import pyarrow as pa

    chunk = chunked.chunk(0)
    t = chunk.type
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        width = 8
    elif pa.types.is_string(t) or pa.types.is_binary(t):
        width = 4
    elif t.num_fields == 0 and not pa.types.is_boolean(t) and t.bit_width % 8 == 0:
        width = t.bit_width // 8
    else:
        return None
    buf = chunk.buffers()[1]
    return (None if buf is None else (buf.address + chunk.offset * width, width))


def _grid(values: Any) -> np.ndarray | None:
    """The 2-D numpy array of a block of several columns (numpy dtypes; datetimes, tz-aware
    ones included, keep theirs in ``_ndarray``), else None (a 1-D extension array)."""
    if isinstance(values, np.ndarray):
        return values if values.ndim == 2 else None
    arr = getattr(values, "_ndarray", None)
    return arr if isinstance(arr, np.ndarray) and arr.ndim == 2 else None


class _Span:
    """Where one block of the decoded version lies in its cache file: ``rows`` columns of
    ``n`` values each, column ``r`` value ``i`` at ``offset + r * step + i * stride``."""

    __slots__ = ("locs", "n", "offset", "rows", "step", "stride")

    def __init__(self, offset: int, step: int, stride: int, rows: int, n: int,
                 locs: np.ndarray) -> None:
        self.offset, self.step, self.stride = offset, step, stride
        self.rows, self.n, self.locs = rows, n, locs


def _block_index(base: Any, where: _Where) -> dict[Any, tuple[list[int], list[_Span]]]:
    """Where each block of ``base`` lies in its cache file, built once per decoded version
    (O(blocks)) and kept on it; each lookup is then a bisection:
    ``{file: (sorted start offsets, [_Span])}``."""
    found = base.__dict__.get("_mmcache_blocks")
    if found is not None:
        return found
    table: dict[Any, list[tuple[int, _Span]]] = {}
    n = len(base)
    if isinstance(base, pd.Series):
        blocks = [(base._values, np.zeros(1, dtype=np.intp))]
    else:
        blocks = [(blk.values, blk.mgr_locs.as_array) for blk in base._mgr.blocks]
    for values, locs in blocks:
        grid = _grid(values)
        if grid is not None:
            if not grid.size:
                continue
            row0: tuple[int, int] | None = (grid.__array_interface__["data"][0],
                                            grid.strides[1])
            step = grid.strides[0]
        else:
            row0 = _row0(values)
            step = 0
        place = None if row0 is None else where.place(row0[0], row0[1])
        if row0 is None or place is None:
            continue
        span = _Span(place[1], step, row0[1], len(locs), n, locs)
        table.setdefault(place[0], []).append((place[1], span))
    index = {}
    for owner, entries in table.items():
        entries.sort(key=lambda e: e[0])
        index[owner] = ([e[0] for e in entries], [e[1] for e in entries])
    object.__setattr__(base, "_mmcache_blocks", index)  # base is never handed out
    return index


def _locate(index: dict[Any, tuple[list[int], list[_Span]]], where: _Where, address: int,
            stride: int) -> tuple[_Span, int, int] | None:
    """(block, column of it, first row) of ``base`` whose values start at ``address``, one
    value every ``stride`` bytes, or None."""
    place = where.place(address, stride)
    if place is None or place[0] not in index:
        return None
    starts, spans = index[place[0]]
    i = bisect.bisect_right(starts, place[1]) - 1
    if i < 0:
        return None
    span = spans[i]
    if stride != span.stride or span.stride <= 0:
        return None
    skip = place[1] - span.offset
    if span.rows > 1:
        if span.step <= 0:
            return None
        r, skip = divmod(skip, span.step)
    else:
        r = 0
    row, rest = divmod(skip, span.stride)
    if rest or not 0 <= r < span.rows or row >= span.n:
        return None
    return span, r, row


def _guess(obj: Any, base: Any, where: _Where) -> tuple[np.ndarray, int] | None:
    """Which of ``base``'s columns each of ``obj``'s is, and at which row it starts.
    O(blocks of ``obj``): the columns of a 2-D block are placed at once."""
    index = _block_index(base, where)
    if isinstance(obj, pd.Series):
        blocks = [(obj._values, np.zeros(1, dtype=np.intp))]
    else:
        blocks = [(blk.values, blk.mgr_locs.as_array) for blk in obj._mgr.blocks]
    positions = np.full(1 if isinstance(obj, pd.Series) else obj.shape[1], -1, dtype=np.intp)
    start: int | None = None
    for values, locs in blocks:
        grid = _grid(values)
        if grid is not None:
            if grid.shape[1] == 0 or grid.shape[0] != len(locs):
                return None
            found = _locate(index, where, grid.__array_interface__["data"][0],
                            grid.strides[1])
            if found is None:
                return None
            span, r, row = found
            k = grid.shape[0]
            if k > 1:
                step, rest = divmod(grid.strides[0], span.step)
                if rest or step == 0:
                    return None
            else:
                step = 1
            last = r + step * (k - 1)
            if not 0 <= last < span.rows:
                return None
            rows = np.arange(r, last + (1 if step > 0 else -1), step, dtype=np.intp)
        else:
            row0 = _row0(values)
            found = None if row0 is None else _locate(index, where, row0[0], row0[1])
            if found is None or len(locs) != 1:
                return None
            span, r, row = found
            rows = np.array([r], dtype=np.intp)
        if (start is not None and row != start) or row + len(obj) > len(base):
            return None
        start = row
        positions[locs] = span.locs[rows]
    if start is None or (positions < 0).any():
        return None
    return positions, start


# --- comparing a view with what the receiver rebuilds ----------------------------------


def _same_object(x: Any, y: Any, where: _Where) -> bool:
    from ._frame import _same_json, _same_label

    if type(x) is not type(y) or x.shape != y.shape:
        return False
    if isinstance(x, pd.Series):
        if not _same_label(x.name, y.name):
            return False
    elif not _same_index(x.columns, y.columns, where):
        return False
    return (_same_index(x.index, y.index, where)
            and _same_json(x.attrs, y.attrs)
            and x.flags.allows_duplicate_labels == y.flags.allows_duplicate_labels
            and _same_values(x, y, where))


def _same_values(x: Any, y: Any, where: _Where) -> bool:
    """The same data column by column; O(blocks) where both place the same columns in
    blocks alike (a 2-D block compared as one array), column by column elsewhere."""
    if isinstance(x, pd.Series):
        return _same_array(x._values, y._values, where)
    theirs = {int(blk.mgr_locs.as_array[0]): blk for blk in y._mgr.blocks if len(blk.mgr_locs)}
    apart: list[int] = []  # columns of x whose blocks y does not have alike
    for blk in x._mgr.blocks:
        locs = blk.mgr_locs.as_array
        other = theirs.get(int(locs[0])) if len(locs) else None
        if (other is not None and type(blk.values) is type(other.values)
                and np.array_equal(locs, other.mgr_locs.as_array)):
            if not _same_array(blk.values, other.values, where):
                return False
        else:
            apart.extend(locs.tolist())
    if apart:
        xs, ys = _columns(x), _columns(y)
        return all(_same_array(xs[p], ys[p], where) for p in apart)
    return True


def _same_index(x: Any, y: Any, where: _Where) -> bool:
    from ._frame import _same_label, _same_labels

    if x is y:
        return True
    if type(x) is not type(y) or not _same_labels(list(x.names), list(y.names)):
        return False
    if isinstance(x, pd.RangeIndex):
        return (x.start, x.stop, x.step) == (y.start, y.stop, y.step)
    if isinstance(x, pd.MultiIndex):
        return (x.sortorder == y.sortorder
                and len(x.levels) == len(y.levels)
                and all(_same_index(a, b, where) for a, b in zip(x.levels, y.levels, strict=True))
                and all(_same_array(a, b, where) for a, b in zip(x.codes, y.codes, strict=True)))
    return (_same_label(getattr(x, "freq", None), getattr(y, "freq", None))
            and _same_array(x._values, y._values, where))


def _same_dtype(x: Any, y: Any) -> bool:
    if type(x) is not type(y) or x != y or str(x) != str(y):
        return False
    tz = getattr(x, "tz", None)
    if tz is not None and (type(tz) is not type(y.tz) or str(tz) != str(y.tz)):
        return False
    na = getattr(x, "na_value", None)
    return na is None or repr(na) == repr(y.na_value)


def _same_array(x: Any, y: Any, where: _Where) -> bool:
    """Same class, dtype and length, and the same data: the same memory, the same bytes of
    the same cache file, or (small and unmapped) equal values."""
    if type(x) is not type(y) or len(x) != len(y):
        return False
    if isinstance(x, np.ndarray):
        return x.dtype == y.dtype and x.dtype.str == y.dtype.str and _same_memory(x, y, where)
    if isinstance(x, pd.Categorical):
        return (x.dtype.ordered == y.dtype.ordered
                and _same_index(x.categories, y.categories, where)
                and _same_array(x._codes, y._codes, where))
    if isinstance(x, pd.arrays.IntervalArray):
        return _same_dtype(x.dtype, y.dtype) and all(
            _same_array(_unindex(getattr(x, s)), _unindex(getattr(y, s)), where)
            for s in ("_left", "_right"))
    if not _same_dtype(x.dtype, y.dtype):
        return False
    if hasattr(x, "_mask"):
        return _same_array(x._data, y._data, where) and _same_array(x._mask, y._mask, where)
    if hasattr(x, "_ndarray"):
        from ._frame import _same_label

        return (_same_label(getattr(x, "freq", None), getattr(y, "freq", None))
                and _same_array(x._ndarray, y._ndarray, where))
    if hasattr(x, "_pa_array"):
        return _same_arrow(x._pa_array, y._pa_array, where)
    return False


def _unindex(values: Any) -> Any:
    return values._values if isinstance(values, pd.Index) else values


def _same_memory(x: np.ndarray, y: np.ndarray, where: _Where) -> bool:
    from ._frame import _same_labels

    if x.shape != y.shape or x.strides != y.strides:
        return False
    if x.size == 0:
        return True
    px = x.__array_interface__["data"][0]
    py = y.__array_interface__["data"][0]
    # the bytes the array spans, whatever its strides (a 2-D block, reversed columns)
    ends = [(d - 1) * s for d, s in zip(x.shape, x.strides, strict=True)]
    span = x.itemsize + sum(abs(e) for e in ends)
    low = sum(min(0, e) for e in ends)
    lo_x, lo_y = px + low, py + low
    rx, ry = where.find(lo_x, span), where.find(lo_y, span)
    if (rx is not None and ry is not None and rx.owner == ry.owner
            and lo_x - rx.address == lo_y - ry.address):
        if rx.private:
            where.private.add(rx)
        return True  # the same bytes of the same file
    if px == py and rx is None and ry is None:
        return True  # the same memory, outside any mapping
    if x.size > SMALL:
        return False
    if x.dtype == object:
        return _same_labels(x.ravel().tolist(), y.ravel().tolist())
    return bool(x.tobytes() == y.tobytes())


def _same_arrow(x: Any, y: Any, where: _Where) -> bool:
    import pyarrow as pa

    if x.num_chunks != y.num_chunks:
        return False
    for cx, cy in zip(x.chunks, y.chunks, strict=True):
        t = cx.type
        if not t.equals(cy.type) or t.num_fields or pa.types.is_dictionary(t):
            return False
        bx, by = cx.buffers(), cy.buffers()
        mx = [None if b is None or not b.size else where.find(b.address, b.size) for b in bx]
        my = [None if b is None or not b.size else where.find(b.address, b.size) for b in by]
        same_slice = (cx.offset, len(cx), cx.null_count) == (cy.offset, len(cy), cy.null_count)
        if same_slice and len(bx) == len(by) and all(
                (a is None and b is None) or (a is not None and b is not None
                                              and a.size == b.size and (not a.size or (
                                                  ra is not None and rb is not None
                                                  and ra.owner == rb.owner
                                                  and a.address - ra.address
                                                  == b.address - rb.address)))
                for a, b, ra, rb in zip(bx, by, mx, my, strict=True)):
            where.private.update(r for r in mx if r is not None and r.private)
        elif len(cx) > SMALL or not cx.equals(cy):  # e.g. labels pandas built: by value
            return False
    return True
