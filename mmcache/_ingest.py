"""``ingest``: write an Arrow source into an entry batch by batch, in bounded memory.

How: each batch is converted as ``pd.read_parquet`` converts a table (``_compat.
arrow_to_pandas``) and encoded by the same codecs ``save`` uses (``_frame.encode``); each
buffer of that small layout is appended to a slot. When the source announces its row count
(parquet, ``Dataset``, ``Table``), the slots of the 2-D block columns (numbers, timestamps:
most of a frame's bytes) are regions of preallocated files, one per dtype, laid out as the
entry's files will be, so those bytes are written once, at their final place, and each file
is renamed into the entry. Every other slot (text, category codes, validity, or any slot
when the count is unknown or proves wrong) is its own *staged* file, copied into the entry's
files in the kernel (``sendfile``) once the source is exhausted and unlinked as soon as it
has been copied. The entry is published exactly as ``save`` publishes (``_save.write``:
free-space check, atomic rename, sweep of old versions, the default cache's RAM/disk places).

Memory: one batch in Arrow form, its pandas conversion and its encoding (a few times
``BATCH_ROWS`` rows), plus what the reader holds (a parquet row group); never the dataset.
File-system room: the data once, plus the largest staged slot while packing.

Atomicity: the whole ingest holds the key's lock, and everything is written under names a
killed save also leaves (``NAME.TOKEN/<n>.npy``), so a failure removes them and a kill leaves
stale leftovers that ``clean`` removes; readers see the old entry or the new one.

Across batches the codecs' output must agree, with three differences ingest bridges:
Arrow validity bitmaps and string offsets (staged one byte a row / rebased, packed at the
end), categories (each batch's are appended to the column's running categories, so earlier
codes stay valid; codes are staged as int32 and narrowed to pandas' dtype at the end), and an
integer column that holds nulls only in some batches (pandas makes it float64, as
``read_parquet`` of the whole table does: earlier batches are converted).
"""

from __future__ import annotations

import errno
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from . import _clean, _compat, _frame, _save, _store
from ._codecs import Pool, Spec, _arrow_type_from_json, check_attrs, encode_index
from ._entry import Entry
from ._errors import InvalidArgumentError, MmcacheError, UnsupportedTypeError
from ._lock import locked
from ._paths import check_key, entry_name
from ._sources import Stream, check_batch, open_source, prefetched
from ._units import human

# Items per read when converting a staged file while packing it (bits, codes, promotion):
# bounds that step's memory to a few MB whatever the column's size.
CHUNK_ITEMS = 1 << 21
# The progress bar appears only once an ingest has run this long (seconds): short ones print
# nothing.
PROGRESS_DELAY = 2.0
_DATA = "data"  # a slot copied as is
_BITS = "bits"  # one byte (0/1) a row, packed to an Arrow bitmap at the end
_CODES = "codes"  # int32 category codes, narrowed to pandas' codes dtype at the end


class _Slot:
    """One staged buffer: a file in the staging directory that batches append to, or a
    *region* of a preallocated file (``at``: that file and the byte offset where the slot's
    items start; ``cap``: how many items fit), where batches are written at their final
    place so the data are written once (see :meth:`_Stager.plan_direct`)."""

    __slots__ = ("at", "cap", "count", "dtype", "final", "kind", "path")

    def __init__(self, path: Path, dtype: np.dtype, kind: str) -> None:
        self.path = path
        self.dtype = dtype
        self.kind = kind
        self.count = 0
        self.final = np.dtype(np.uint8) if kind == _BITS else dtype
        self.at: tuple[Path, int] | None = None
        self.cap = 0

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if self.at is not None and self.count + len(arr) > self.cap:
            self.leave_region()  # more rows than the source announced
        if self.at is not None:
            path, start = self.at
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                _pwrite_all(fd, arr, start + self.count * self.dtype.itemsize)
            finally:
                os.close(fd)
        else:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                         0o600)
            with open(fd, "wb", buffering=0, closefd=True) as f:
                _store.write_all(f, arr)
        self.count += len(arr)

    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize

    def chunks(self) -> Any:
        path, start = self.at or (self.path, 0)
        left = self.nbytes()
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            while left and (chunk := f.read(min(left, CHUNK_ITEMS * self.dtype.itemsize))):
                left -= len(chunk)
                yield np.frombuffer(chunk, dtype=self.dtype)

    def enter_region(self, path: Path, start: int, cap: int) -> None:
        """From now on, write into ``path`` from byte ``start`` (room for ``cap`` items);
        what is staged so far (one batch) moves there."""
        staged = [chunk.copy() for chunk in self.chunks()] if self.path.exists() else []
        self.path.unlink(missing_ok=True)
        self.at, self.cap, self.count = (path, start), cap, 0
        for chunk in staged:
            self.append(chunk)

    def leave_region(self) -> None:
        """Move what is written in the region to the slot's own staged file."""
        if self.at is not None:
            with open(self.path, "wb", buffering=0) as out:
                self.copy_region(out)
            self.at = None

    def promote(self, dtype: np.dtype) -> None:
        """Convert what is staged to ``dtype`` (an int column that met its first null)."""
        # A name clean knows (``<n>.npy``), beyond any slot's: a kill leaves nothing foreign.
        tmp = self.path.with_name(f"{int(self.path.stem) + (1 << 40)}.npy")
        with open(tmp, "wb", buffering=0) as out:
            for chunk in self.chunks():
                _store.write_all(out, chunk.astype(dtype))
        os.replace(tmp, self.path)
        self.at = None
        self.dtype = self.final = dtype

    def final_count(self) -> int:
        return (self.count + 7) // 8 if self.kind == _BITS else self.count

    def copy_region(self, out: io.RawIOBase) -> None:
        path, start = self.at or (self.path, 0)
        _copy_file(path, start, self.nbytes(), out)

    def copy_to(self, out: io.RawIOBase) -> None:
        """Append this slot to ``out`` in its final form, then unlink its staged file
        (room: the data once, plus one slot)."""
        if self.kind != _BITS and self.final == self.dtype:
            self.copy_region(out)
        else:
            carry = np.empty(0, dtype=np.uint8)
            for chunk in self.chunks():
                if self.kind == _BITS:
                    chunk = np.concatenate([carry, chunk])
                    whole = len(chunk) - len(chunk) % 8
                    carry = chunk[whole:]
                    chunk = np.packbits(chunk[:whole], bitorder="little")
                _store.write_all(out, chunk.astype(self.final))
            if len(carry):
                _store.write_all(out, np.packbits(carry, bitorder="little"))
        if self.at is None:
            os.unlink(self.path)


def _pwrite_all(fd: int, arr: np.ndarray, offset: int) -> None:
    view = memoryview(arr.view(np.uint8))  # type: ignore[arg-type]
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_file(path: Path, start: int, size: int, out: io.RawIOBase) -> None:
    """Append ``size`` bytes of ``path`` from ``start`` to ``out`` in the kernel (no pages
    through this process)."""
    with open(path, "rb", buffering=0) as src:
        offset, end = start, start + size
        try:
            while offset < end:
                sent = os.sendfile(out.fileno(), src.fileno(), offset, end - offset)
                if sent == 0:
                    raise OSError(errno.EIO, f"{path} shrank while copying")
                offset += sent
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS) or offset != start:
                raise
            src.seek(start)
            while offset < end and (chunk := src.read(min(CHUNK_ITEMS, end - offset))):
                _store.write_all(out, np.frombuffer(chunk, dtype=np.uint8))
                offset += len(chunk)


class _Stager:
    """Appends each batch's buffers to slots; at the end, the entry's layout and files."""

    def __init__(self, stage_dir: Path, stream: Stream) -> None:
        self.dir = stage_dir
        self.what = stream.what
        self.schema = stream.schema
        self.slots: list[_Slot] = []
        self.cols: list[Spec] | None = None  # per column position: the template spec
        self.index: Spec | None = None
        self.cats: dict[str, pd.Index] = {}  # running categories, by where ("column 'a'")
        self.nrows = 0
        self.first: pd.DataFrame | None = None  # first batch's empty frame (labels, attrs)
        self.expect = stream.nrows  # rows the source announces, if it knows
        # Per final dtype file: the preallocated file its block columns are written into,
        # and the length of the .npy header it is planned with (see plan_direct).
        self.direct: dict[str, tuple[Path, int]] = {}

    # --- one batch -------------------------------------------------------------------------

    def add(self, batch: pa.RecordBatch) -> None:
        table = pa.Table.from_batches([batch]).replace_schema_metadata(self.schema.metadata)
        df = self._same_categories(_compat.arrow_to_pandas(table))
        if isinstance(df.index, pd.MultiIndex):
            raise UnsupportedTypeError(
                f"{self.what}: its pandas metadata makes a MultiIndex "
                f"({list(df.index.names)!r}), which ingest does not build yet; nothing was "
                "written. Ingest with columns=[...] naming the data columns (the index "
                "columns come back as columns), or read it with pd.read_parquet and save()"
            )
        layout, pool = _frame.encode(df)
        arrays = _arrays(pool)
        cols = _per_column(layout)
        planned = self.cols is not None
        if self.cols is None:
            self.first = df.iloc[:0]
            self.cols = [{} for _ in cols]
            self.index = {}
        for pos, (t, spec) in enumerate(zip(self.cols, cols, strict=True)):
            self.cols[pos] = self._take(spec, t or None, arrays, f"column {df.columns[pos]!r}")
        assert self.index is not None
        self.index = self._take(layout["index"], self.index or None, arrays, "the index")
        self.nrows += len(df)
        if not planned:
            self.plan_direct()

    def _block_groups(self) -> dict[tuple[str, str], list[tuple[int, Spec]]]:
        """The columns of each 2-D block of the entry (one per dtype and time zone), in
        the order :meth:`finish` writes them."""
        assert self.cols is not None
        blocks: dict[tuple[str, str], list[tuple[int, Spec]]] = {}
        for pos, t in enumerate(self.cols):
            if t.get("c") == "blk":
                dtype = self.slots[t["v"]["slot"]].final.str
                blocks.setdefault((dtype, repr(t.get("tz"))), []).append((pos, t))
        return blocks

    def plan_direct(self) -> None:
        """When the source announces its row count, give each block column's slot its
        final place in a preallocated file of its dtype (blocks come first in their file,
        see :meth:`finish`), so these (most of a frame's bytes) are written once and the
        file is renamed into the entry instead of copied. Anything the plan did not foresee
        (fewer or more rows, an int column promoted to float) only costs the copy."""
        if not self.expect or self.nrows > self.expect:
            return
        pool = Pool()
        places = []
        for cols in self._block_groups().values():
            for i, (_, t) in enumerate(cols):
                slot = self.slots[t["v"]["slot"]]
                places.append((slot, pool.put(slot.final, self.expect, slot, align=i == 0)))
        for f, key in enumerate(pool.order):
            path = self.dir / f"{(1 << 41) + f}.npy"  # a name clean knows, beyond any slot's
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            self.direct[key] = (path, len(_store.npy_header(np.dtype(key), pool.counts[key])))
        for slot, ref in places:
            path, head = self.direct[pool.order[ref["f"]]]
            slot.enter_region(path, head + ref["o"] * slot.dtype.itemsize, self.expect)

    def _same_categories(self, df: pd.DataFrame) -> pd.DataFrame:
        """Recode each categorical so its categories extend the running ones (earlier
        batches' codes stay valid), as Arrow unifies dictionaries across chunks."""
        cat: list[int | str] = [i for i, t in enumerate(df.dtypes)
                                if isinstance(t, pd.CategoricalDtype)]
        for pos in [*cat, "index"]:
            values = df.index if pos == "index" else df.iloc[:, pos]
            if not isinstance(values.dtype, pd.CategoricalDtype):
                continue
            cats = values.dtype.categories
            where = _where(df, pos)
            running = self.cats.get(where)
            if running is not None:
                extra = cats[~cats.isin(running)]
                running = running.append(extra) if len(extra) else running
            else:
                running = cats
            self.cats[where] = running
            if not cats.equals(running):
                # Recoded by hand: astype() keeps the codes when the categories are the same
                # set in another order (equal dtypes when unordered), which would give the
                # codes other labels.
                dtype = pd.CategoricalDtype(running, ordered=values.dtype.ordered)
                codes = np.asarray(values.array.codes)
                moved = running.get_indexer(cats)
                recoded = pd.Categorical.from_codes(
                    np.where(codes >= 0, moved[np.maximum(codes, 0)], -1), dtype=dtype)
                if pos == "index":
                    df.index = pd.CategoricalIndex(recoded, name=df.index.name)
                else:
                    df.isetitem(pos, pd.Series(recoded, index=df.index, name=values.name))
        return df

    def _slot(self, dtype: np.dtype, kind: str = _DATA) -> Spec:
        self.slots.append(_Slot(self.dir / f"{len(self.slots)}.npy", np.dtype(dtype), kind))
        return {"slot": len(self.slots) - 1}

    def _mismatch(self, where: str, detail: str) -> UnsupportedTypeError:
        return UnsupportedTypeError(
            f"{self.what}: {where} converts to different pandas data in a later batch "
            f"({detail}); nothing was written. Give the column one type in every file"
        )

    def _take(self, spec: Any, t: Any, arrays: dict[Any, np.ndarray], where: str) -> Any:
        """Append ``spec``'s buffers to the slots of template ``t`` (None: make them);
        return the template."""
        if isinstance(spec, dict) and set(spec) == {"f", "o", "n"}:
            arr = arrays[spec["f"], spec["o"]]
            t = t or self._slot(arr.dtype)
            self._append(t, arr, where)
            return t
        if isinstance(spec, dict) and "bufs" in spec:
            return self._take_arrow(spec, t, arrays, where)
        if isinstance(spec, dict) and spec.get("c") == "range":
            return t or spec  # each batch's own 0..n: the whole table's is made at the end
        if isinstance(spec, dict) and spec.get("c") == "cat":
            t = t or {"c": "cat", "ordered": spec["ordered"], "codes": self._slot(
                np.dtype(np.int32), _CODES), "cats": where}
            codes = arrays[spec["codes"]["f"], spec["codes"]["o"]]
            self.slots[t["codes"]["slot"]].append(codes)  # widened to int32
            return t
        if isinstance(spec, dict):
            if t is not None and set(t) != set(spec):
                raise self._mismatch(where, f"{sorted(t)} against {sorted(spec)}")
            return {k: self._take(v, None if t is None else t[k], arrays, where)
                    for k, v in spec.items()}
        if isinstance(spec, list):
            if t is not None and len(t) != len(spec):
                raise self._mismatch(where, "buffer count")
            return [self._take(v, None if t is None else t[i], arrays, where)
                    for i, v in enumerate(spec)]
        if t is not None and t != spec:
            raise self._mismatch(where, f"{t!r} against {spec!r}")
        return spec

    def _append(self, t: Spec, arr: np.ndarray, where: str) -> None:
        slot = self.slots[t["slot"]]
        if arr.dtype != slot.dtype:
            kinds = {arr.dtype.kind, slot.dtype.kind}
            if slot.kind != _DATA or not kinds <= set("iuf") or "f" not in kinds:
                raise self._mismatch(where, f"{slot.dtype} against {arr.dtype}")
            # pandas gives an int column float64 in the batches where it has nulls: the
            # whole column is float64, as read_parquet of the whole table makes it.
            if slot.dtype.kind != "f":
                slot.promote(np.dtype(np.float64))
        slot.append(arr)

    def _take_arrow(self, spec: Spec, t: Spec | None, arrays: dict[Any, np.ndarray],
                    where: str) -> Spec:
        typ = _arrow_type_from_json(spec["type"])
        n = int(spec["len"])
        bufs: list[Any] = [None if b is None else arrays[b["f"], b["o"]] for b in spec["bufs"]]
        if t is None:
            slots: list[Any] = [None] * len(bufs)
            t = {"type": spec["type"], "len": 0, "nulls": 0, "bufs": slots, "base": 0}
            if len(bufs) > 1:
                t["bufs"][1:] = [self._slot(np.dtype(np.uint8)) for _ in bufs[1:]]
        elif t["type"] != spec["type"]:
            raise self._mismatch(where, f"Arrow type {typ}")
        if bufs[0] is not None and t["bufs"][0] is None:  # the first nulls: earlier rows valid
            valid_slot = self._slot(np.dtype(np.uint8), _BITS)
            t["bufs"][0] = valid_slot
            _append_ones(self.slots[valid_slot["slot"]], t["len"])
        if t["bufs"][0] is not None:
            valid = (np.ones(n, dtype=np.uint8) if bufs[0] is None
                     else np.unpackbits(bufs[0], count=n, bitorder="little"))
            self.slots[t["bufs"][0]["slot"]].append(valid)
        if pa.types.is_large_string(typ) or pa.types.is_large_binary(typ):
            offsets = bufs[1].view(np.int64)[: n + 1]
            start = int(offsets[0])
            rebased = offsets - (start - t["base"])
            staged = self.slots[t["bufs"][1]["slot"]]
            staged.append((rebased[1:] if staged.count else rebased).view(np.uint8))
            t["base"] += int(offsets[-1]) - start
            self.slots[t["bufs"][2]["slot"]].append(bufs[2][start : int(offsets[-1])])
        elif len(bufs) == 2 and typ.bit_width % 8 == 0 and not pa.types.is_boolean(typ):
            self.slots[t["bufs"][1]["slot"]].append(bufs[1][: n * typ.bit_width // 8])
        else:
            raise UnsupportedTypeError(
                f"{self.what}: {where} is Arrow {typ}, which ingest does not store yet; "
                "nothing was written. Leave it out with columns=[...]"
            )
        t["len"] += n
        t["nulls"] += int(spec["nulls"])
        return t

    # --- the end ---------------------------------------------------------------------------

    def finish(self) -> tuple[Spec, Pool]:
        """The entry's layout, and a pool whose items are slots (copied by :func:`fill`)
        or small arrays (labels, categories)."""
        assert self.cols is not None and self.index is not None and self.first is not None
        pool = Pool()
        out_blocks = []
        for (dtype, _), cols in self._block_groups().items():
            first = None
            for _, t in cols:
                ref = self._final(t["v"], pool, align=first is None)
                first = first or ref
            assert first is not None
            block: Spec = {"dtype": dtype, "v": {"f": first["f"], "o": first["o"],
                                                 "n": len(cols) * self.nrows},
                           "cols": [pos for pos, _ in cols]}
            if "tz" in cols[0][1]:
                block["tz"] = cols[0][1]["tz"]
            out_blocks.append(block)
        # after the blocks, which plan_direct placed first in their files
        ext = {str(pos): self._final(t, pool) for pos, t in enumerate(self.cols)
               if t.get("c") != "blk"}
        layout: Spec = {"kind": "frame", "nrows": self.nrows, "ncols": len(self.cols),
                        "blocks": out_blocks, "ext": ext}
        layout["columns"] = encode_index(self.first.columns, pool, "column labels", labels=True)
        if self.index.get("c") == "range":
            layout["index"] = encode_index(self._range_index(), pool, "index")
        else:
            layout["index"] = self._final(self.index, pool)
        layout["shared"] = pool.shared_specs
        layout["attrs"] = check_attrs(dict(self.first.attrs))
        return layout, pool

    def _range_index(self) -> pd.RangeIndex:
        """What read_parquet makes of a RangeIndex in the pandas metadata: that range if it
        has the table's length, else a default one."""
        descr = (self.schema.pandas_metadata or {}).get("index_columns") or [None]
        if isinstance(descr[0], dict) and descr[0].get("kind") == "range":
            r = pd.RangeIndex(descr[0]["start"], descr[0]["stop"], descr[0]["step"],
                              name=descr[0].get("name"))
            if len(r) == self.nrows:
                return r
        return pd.RangeIndex(self.nrows)

    def _final(self, t: Any, pool: Pool, *, align: bool = True) -> Any:
        if isinstance(t, dict) and "slot" in t:
            slot = self.slots[t["slot"]]
            return pool.put(slot.final, slot.final_count(), slot, align=align)
        if isinstance(t, dict) and "bufs" in t:
            return {"type": t["type"], "len": t["len"], "nulls": t["nulls"],
                    "bufs": [None if b is None else self._final(b, pool) for b in t["bufs"]]}
        if isinstance(t, dict) and t.get("c") == "cat":
            dtype = pd.CategoricalDtype(self.cats[t["cats"]], ordered=t["ordered"])
            codes = self.slots[t["codes"]["slot"]]
            codes.final = pd.Categorical([], dtype=dtype).codes.dtype
            cats = pool.shared.get(dtype)
            if cats is None:
                pool.shared_specs.append(encode_index(dtype.categories, pool,
                                                      f"{t['cats']} categories", labels=True))
                cats = pool.shared[dtype] = len(pool.shared_specs) - 1
            return {"c": "cat", "ordered": t["ordered"], "codes": self._final(t["codes"], pool),
                    "cats": cats}
        if isinstance(t, dict):
            return {k: self._final(v, pool) for k, v in t.items()}
        if isinstance(t, list):
            return [self._final(v, pool) for v in t]
        return t


def _where(df: pd.DataFrame, pos: int | str) -> str:
    return "the index" if pos == "index" else f"column {df.columns[pos]!r}"


def _append_ones(slot: _Slot, n: int) -> None:
    for start in range(0, n, CHUNK_ITEMS):
        slot.append(np.ones(min(CHUNK_ITEMS, n - start), dtype=np.uint8))


def _arrays(pool: Pool) -> dict[tuple[int, int], np.ndarray]:
    """Each array the pool holds, by (file, offset): what a ref of one buffer names."""
    out = {}
    for f, key in enumerate(pool.order):
        offset = 0
        for arr in pool.files[key]:
            out[f, offset] = arr
            offset += arr.size
    return out


def _per_column(layout: Spec) -> list[Spec]:
    """The layout's column specs by position; a 2-D block's columns each become
    ``{"c": "blk", "v": ref}`` (plus ``tz``), regrouped into blocks at the end."""
    nrows = layout["nrows"]
    cols: list[Spec] = [{}] * layout["ncols"]
    for blk in layout["blocks"]:
        for j, pos in enumerate(blk["cols"]):
            v = blk["v"]
            cols[pos] = {"c": "blk", "v": {"f": v["f"], "o": v["o"] + j * nrows, "n": nrows}}
            if "tz" in blk:
                cols[pos]["tz"] = blk["tz"]
    for k, spec in layout["ext"].items():
        cols[int(k)] = spec
    return cols


def renamable(stager: _Stager, pool: Pool) -> dict[str, tuple[Path, int, int]]:
    """The preallocated files that hold their final file's first items at their final
    offsets: per dtype, (path, items held, bytes from the header to the last of them)."""
    out = {}
    for key, (path, head) in stager.direct.items():
        held = {id(s) for s in stager.slots if s.at is not None and s.at[0] == path}
        if not held or key not in pool.files or head != len(
                _store.npy_header(np.dtype(key), pool.counts[key])):
            continue
        offset, n, seen = 0, 0, 0
        for i, item in enumerate(pool.files[key]):
            if isinstance(item, _Slot) and id(item) in held:
                assert item.at is not None
                if item.at[1] != head + offset:
                    break
                n, seen = i + 1, seen + 1
            elif isinstance(item, _Slot) or item.any():  # only zero padding may come between
                break
            offset += item.final_count() * item.final.itemsize if isinstance(
                item, _Slot) else item.nbytes
            if seen == len(held):
                out[key] = (path, n, offset)
                break
    return out


def fill(pool: Pool, files: list[Spec], data_dir: Path,
         direct: dict[str, tuple[Path, int, int]]) -> None:
    """Write the entry's files: headers, small arrays, and the slots copied in; a file whose
    first items were written in place (``direct``, see :func:`renamable`) is renamed in and
    completed. On failure the renamed files go back, for a write to the other place."""
    os.mkdir(data_dir, 0o700)
    moved: list[tuple[Path, Path]] = []
    try:
        for key, spec in zip(pool.order, files, strict=True):
            target = data_dir / spec["name"]
            items = pool.files[key]
            header = _store.npy_header(np.dtype(key), spec["count"])
            if key in direct:
                path, n, nbytes = direct[key]
                try:
                    os.rename(path, target)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:  # another file system: copied below
                        raise
                else:
                    moved.append((target, path))
                    fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW)
                    with open(fd, "wb", buffering=0, closefd=True) as f:
                        os.pwrite(fd, header, 0)
                        f.seek(len(header) + nbytes)
                        _write_items(f, items[n:])
                        f.truncate(spec["size"])
                    continue
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with open(fd, "wb", buffering=0, closefd=True) as f:
                f.write(header)
                _write_items(f, items)
    except BaseException:
        for target, path in moved:
            os.rename(target, path)
        raise


def _write_items(f: io.RawIOBase, items: list[Any]) -> None:
    for item in items:
        if isinstance(item, _Slot):
            item.copy_to(f)
        else:
            _store.write_all(f, item)


def _progress(progress: bool | None, total: int | None, key: str) -> Any:
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, unit="rows", unit_scale=True, desc=f"ingest {key!r}",
                disable=not show, file=sys.stderr, delay=0 if progress else PROGRESS_DELAY,
                mininterval=0.5, dynamic_ncols=True, leave=bool(progress))


def ingest(cache: Any, source: Any, key: str, columns: Sequence[str] | None,
           progress: bool | None) -> Entry:
    """See :func:`mmcache.ingest`. Errors name the key (and a source Arrow cannot read)."""
    try:
        return _ingest(cache, source, key, columns, progress)
    except MmcacheError as exc:
        if exc.key is None:
            exc.key = key
        raise
    except pa.ArrowException as exc:  # a damaged or unreadable source
        shown = (repr(os.fspath(source)) if isinstance(source, str | os.PathLike)
                 else f"the {type(source).__name__}")
        raise InvalidArgumentError(
            f"key {key!r}: cannot read {shown}: {exc}; nothing was written. Check the "
            "file (e.g. pyarrow.parquet.read_metadata(path))",
            key=key,
        ) from exc


def _ingest(cache: Any, source: Any, key: str, columns: Sequence[str] | None,
            progress: bool | None) -> Entry:
    check_key(key)
    stream = open_source(source, columns)  # checks what it can before writing anything
    places = cache._places(create=True)
    place = places[0]
    name = entry_name(key)
    with locked(place, name, key, _save.LOCK_TIMEOUT):
        stage_dir = place / f"{name}.{_store.new_token()}"
        os.mkdir(stage_dir, 0o700)
        try:
            stager = _Stager(stage_dir, stream)
            nbytes = 0
            with _progress(progress, stream.nrows, key) as bar:
                for batch in prefetched(stream.batches):
                    check_batch(stream.schema, batch, stream.what)
                    if batch.num_rows or stager.cols is None:
                        stager.add(batch)
                    nbytes += batch.nbytes
                    bar.set_postfix_str(human(nbytes), refresh=False)
                    bar.update(batch.num_rows)
            if stager.cols is None:  # no batch at all: an empty frame of the schema
                stager.add(pa.RecordBatch.from_pylist([], schema=stream.schema))
            layout, pool = stager.finish()
            files = _store.plan_files(pool)
            total = sum(f["size"] for f in files)
            _save._fit_limit(cache, places, key, total)
            direct = renamable(stager, pool)
            renamed = {direct[k][0] for k in direct}
            # The staged data are already counted as used; a slot copied (not renamed)
            # is removed once copied, a region once its whole file is.
            copied = max((s.nbytes() for s in stager.slots if s.at is None), default=0)
            copied += sum(s.nbytes() for s in stager.slots
                          if s.at is not None and s.at[0] not in renamed)

            def room(where: Path) -> int:
                return copied if where == place else total

            return _save.write(places, name, key, layout, pool, files,
                               fill=lambda d: fill(pool, files, d, direct), room=room)
        finally:
            _clean.remove_data_dir(stage_dir)
