"""``ingest``: write an Arrow source into an entry batch by batch, in bounded memory.

How: the first batch is converted as ``pd.read_parquet`` converts a table (``_compat.
arrow_to_pandas``) and encoded by the same codecs ``save`` uses (``_frame.encode``); each
buffer of that small layout becomes a slot (``_slots``) that later batches append to. Later
batches take the *fast path* where they can (see ``_Stager._plan_fast``): numbers and
timestamps whose Arrow values are byte for byte what pandas made of the first batch, text,
and dictionary columns are appended straight from their Arrow buffers; pandas converts only
the rest (bools, the index, a column meeting its first nulls or a new dictionary). So the
work per byte is one read and one write, and the entry is what converting every batch would
give (a property test checks it). When the source announces its row count (parquet,
``Dataset``, ``Table``), the block columns are written at their final place in preallocated
files renamed into the entry (``_slots.renamable``); the rest are staged and copied in. The
entry is published exactly as ``save`` publishes (``_save.write``: free-space check, atomic
rename, sweep of old versions, the default cache's RAM/disk places).

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
from ._slots import BITS, CODES, DATA, Fds, Slot, append_ones, fill, renamable
from ._sources import SourceError, Stream, check_batch, open_source, prefetched
from ._units import human

# The progress bar appears only once an ingest has run this long (seconds): short ones print
# nothing.
PROGRESS_DELAY = 2.0

class _Stager:
    """Appends each batch's buffers to slots; at the end, the entry's layout and files."""

    def __init__(self, stage_dir: Path, stream: Stream) -> None:
        self.dir = stage_dir
        self.what = stream.what
        self.schema = stream.schema
        self.slots: list[Slot] = []
        self.fds = Fds()
        self.cols: list[Spec] | None = None  # per column position: the template spec
        self.index: Spec | None = None
        self.cats: dict[int | str, pd.Index] = {}  # running categories, by position/"index"
        self.nrows = 0
        self.first: pd.DataFrame | None = None  # first batch's empty frame (labels, attrs)
        self.where: list[str] = []  # per column position, how errors name it
        self.expect = stream.nrows  # rows the source announces, if it knows
        # Per final dtype file: the preallocated file its block columns are written into,
        # and the length of the .npy header it is planned with (see plan_direct).
        self.direct: dict[str, tuple[Path, int]] = {}
        # The fast path (see _plan_fast): per column position, its Arrow field and how it
        # is appended; per dictionary column, the dictionary last seen and how its codes
        # map to the running categories (None: as they are).
        self.fields: list[int] = []
        self.index_fields: list[str] = []
        self.fast: dict[int, str] = {}
        self.view: dict[int, np.dtype] = {}  # "num" columns: their values' numpy dtype
        self.dicts: dict[int, tuple[pa.Array, np.ndarray | None]] = {}
        self.moved: dict[int | str, np.ndarray | None] = {}

    # --- one batch -------------------------------------------------------------------------

    def add(self, batch: pa.RecordBatch) -> None:
        if self.cols is None:  # the first batch: all through pandas, which sets the plan
            df = self._convert(batch, None)
            self._plan_fast(batch, df)
            self.nrows += batch.num_rows
            self.plan_direct()
            return
        fields: dict[int, int | None]
        part = batch.num_columns < len(self.schema)
        if part:  # a column pass: these columns' next rows
            if not self.fields or self.index_fields:  # never: the source checks for these
                raise MmcacheError(f"{self.what}: a column pass the plan cannot take; "
                                   "nothing was written (please report this)")
            at = {name: i for i, name in enumerate(batch.schema.names)}
            names = self.schema.names
            fields = {pos: at[names[f]] for pos, f in enumerate(self.fields)
                      if names[f] in at}
        else:
            fields = dict(enumerate(self.fields)) if self.fields else {
                pos: None for pos in range(len(self.cols))}
        if not batch.num_rows:
            # Only its dictionaries count (pandas unifies every chunk's); its other columns
            # may convert to other dtypes than rows would (an empty bool column is bool).
            new = [pos for pos, f in fields.items()
                   if self.cols[pos].get("c") == "cat" and not self._add_fast(pos, batch, f)]
            if new and self.fields:
                self._convert(batch, new, [fields[pos] for pos in new])
            return
        slow = [pos for pos, f in fields.items() if not self._add_fast(pos, batch, f)]
        if slow or self.index_fields:
            if self.fields:
                self._convert(batch, slow, [fields[pos] for pos in slow])
            else:  # no plan by field: all through pandas
                self._convert(batch, None)
        if not part or 0 in fields:  # (a pass without the first column: rows counted)
            self.nrows += batch.num_rows

    def _convert(self, batch: pa.RecordBatch, positions: list[int] | None,
                 fields: list[Any] | None = None) -> pd.DataFrame:
        """Append the columns at ``positions`` (None: all; the index always), ``batch``'s
        ``fields`` (default: the plan's), as pandas converts them; the first call sets the
        templates."""
        whole, field_of = batch, {}
        if positions is not None:
            fields = fields or [self.fields[p] for p in positions]
            field_of = dict(zip(positions, fields, strict=True))
            batch = batch.select(fields + self.index_fields)
        table = pa.Table.from_batches([batch]).replace_schema_metadata(self.schema.metadata)
        try:
            converted = _compat.arrow_to_pandas(table)
        except (ValueError, TypeError, NotImplementedError, pa.ArrowException) as exc:
            raise UnsupportedTypeError(
                f"{self.what}: pandas cannot make a frame of it ({type(exc).__name__}: "
                f"{exc}), as pd.read_parquet could not either; nothing was written. Leave "
                "the column out with columns=[...] or fix it in the source"
            ) from exc
        df = self._same_categories(converted, positions)
        if isinstance(df.index, pd.MultiIndex):
            raise UnsupportedTypeError(
                f"{self.what}: its pandas metadata makes a MultiIndex "
                f"({list(df.index.names)!r}), which ingest does not build yet; nothing was "
                "written. Ingest with columns=[...] naming the data columns (the index "
                "columns come back as columns), or read it with pd.read_parquet and save()"
            )
        layout, pool = _frame.encode(df, group=False)
        arrays = _arrays(pool)
        cols = _per_column(layout)
        if self.cols is None:
            self.first = df.iloc[:0]
            self.where = [f"column {label!r}" for label in df.columns]
            self.cols = [{} for _ in cols]
            self.index = {}
        for pos, spec in zip(positions or range(len(cols)), cols, strict=True):
            self.cols[pos] = self._take(spec, self.cols[pos] or None, arrays, self.where[pos],
                                        pos)
            if pos in self.dicts:  # a new dictionary: how it maps to the running categories
                self.dicts[pos] = (whole.column(field_of.get(pos, self.fields[pos])).dictionary,
                                   self.moved.get(pos))
        assert self.index is not None
        self.index = self._take(layout["index"], self.index or None, arrays, "the index",
                                "index")
        return df

    # --- the fast path: columns whose Arrow buffers are what pandas would give --------------

    def _plan_fast(self, batch: pa.RecordBatch, df: pd.DataFrame) -> None:
        """Decide, from the first batch, which columns later batches append straight from
        their Arrow buffers, without pandas: numbers and timestamps whose Arrow values are
        byte for byte what pandas made of them, text (Arrow strings either way) and
        dictionary columns (the indices are the codes). Each later batch still takes the
        pandas path for a column it cannot take this way (nulls in numbers, a new
        dictionary), so the entry is what converting every batch would give."""
        assert self.cols is not None
        meta = self.schema.pandas_metadata or {}
        names = batch.schema.names
        self.index_fields = [c for c in meta.get("index_columns", [])
                             if isinstance(c, str) and c in names]
        fields = [i for i, n in enumerate(names) if n not in self.index_fields]
        if len(fields) != len(self.cols):
            self.fields = []
            return
        self.fields = fields
        for pos, field in enumerate(fields):
            col, t = batch.column(field), self.cols[pos]
            if str(df.columns[pos]) != names[field]:
                continue
            typ = col.type
            if t.get("c") == "blk" and _fixed_width(typ) and not col.null_count:
                values = df.iloc[:, pos].array
                arr = getattr(values, "_ndarray", None)
                if (isinstance(arr, np.ndarray) and arr.dtype == self.slots[
                        t["v"]["slot"]].dtype and np.array_equal(
                        arr.view(np.uint8), _values(col, arr.dtype).view(np.uint8))):
                    self.fast[pos] = "num"
                    self.view[pos] = arr.dtype  # the slot's dtype may change (promotion)
            elif (t.get("c") == "cat" and pa.types.is_dictionary(typ)
                  and pa.types.is_signed_integer(typ.index_type)
                  and not col.dictionary.null_count):
                self.fast[pos] = "cat"
                self.dicts[pos] = (col.dictionary, self.moved.get(pos))
            elif (t.get("c") == "str" and isinstance(t.get("arrow"), dict)
                  and _arrow_type_from_json(t["arrow"]["type"]) == pa.large_string()
                  and typ in (pa.string(), pa.large_string())):
                self.fast[pos] = "str"

    def _add_fast(self, pos: int, batch: pa.RecordBatch, field: int | None) -> bool:
        """Append column ``pos`` of the entry, ``batch``'s ``field``, from its Arrow
        buffers if it can be; False if it must go through pandas."""
        kind = self.fast.get(pos)
        if kind is None or field is None:
            return False
        assert self.cols is not None
        col, t = batch.column(field), self.cols[pos]
        if not len(col) and kind != "cat":  # an empty batch adds nothing but dictionaries
            return True
        where = self.where[pos]
        if kind == "num":
            if col.null_count:
                return False
            self._append(t["v"], _values(col, self.view[pos]), where)
        elif kind == "cat":
            seen, moved = self.dicts[pos]
            if col.dictionary is not seen and not col.dictionary.equals(seen):
                return False
            indices = col.indices
            codes = (indices.fill_null(-1) if indices.null_count else indices).to_numpy()
            if moved is not None:
                codes = _recode(codes, moved)
            self.slots[t["codes"]["slot"]].append(codes)
        else:  # text: string or large_string, appended as large_string
            n, off = len(col), col.offset
            bits, offsets, data = col.buffers()
            width = np.int64 if col.type == pa.large_string() else np.int32
            # widened by numpy: Arrow's cast to large_string cost ~20x more (measured)
            offs = np.frombuffer(offsets, dtype=width)[off : off + n + 1]
            views: list[Any] = [None, offs.astype(np.int64, copy=False).view(np.uint8),
                                np.frombuffer(data or b"", dtype=np.uint8)]
            if col.null_count:  # the validity bits of these rows, from bit 0
                v = np.frombuffer(bits, dtype=np.uint8)
                views[0] = v[off // 8 :] if off % 8 == 0 else np.packbits(
                    np.unpackbits(v, count=off + n, bitorder="little")[off:],
                    bitorder="little")
            refs: list[Any] = [None if v is None else {"f": 0, "o": i, "n": v.size}
                               for i, v in enumerate(views)]
            arrays = {(0, i, v.size): v for i, v in enumerate(views) if v is not None}
            t = t["arrow"]
            self._take_arrow({"type": t["type"], "len": len(col), "nulls": col.null_count,
                              "bufs": refs}, t, arrays, where)
        return True

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

    def _same_categories(self, df: pd.DataFrame, positions: list[int] | None) -> pd.DataFrame:
        """Recode each categorical so its categories extend the running ones (earlier
        batches' codes stay valid), as Arrow unifies dictionaries across chunks. Running
        categories are kept by the column's position in the entry (``positions``: of each
        of ``df``'s columns; None: the same), as labels may repeat."""
        cat: list[int | str] = [i for i, t in enumerate(df.dtypes)
                                if isinstance(t, pd.CategoricalDtype)]
        for pos in [*cat, "index"]:
            values = df.index if pos == "index" else df.iloc[:, pos]
            if not isinstance(values.dtype, pd.CategoricalDtype):
                continue
            cats = values.dtype.categories
            where = pos if isinstance(pos, str) or positions is None else positions[pos]
            running = self.cats.get(where)
            if running is not None:
                extra = cats[~cats.isin(running)]
                running = running.append(extra) if len(extra) else running
            else:
                running = cats
            self.cats[where] = running
            self.moved[where] = None
            if not cats.equals(running):
                # Recoded by hand: astype() keeps the codes when the categories are the same
                # set in another order (equal dtypes when unordered), which would give the
                # codes other labels.
                dtype = pd.CategoricalDtype(running, ordered=values.dtype.ordered)
                codes = np.asarray(values.array.codes)
                moved = self.moved[where] = running.get_indexer(cats)
                recoded = pd.Categorical.from_codes(
                    _recode(codes, moved), dtype=dtype)
                if pos == "index":
                    df.index = pd.CategoricalIndex(recoded, name=df.index.name)
                else:
                    df.isetitem(pos, pd.Series(recoded, index=df.index, name=values.name))
        return df

    def _slot(self, dtype: np.dtype, kind: str = DATA) -> Spec:
        self.slots.append(Slot(self.dir / f"{len(self.slots)}.npy", np.dtype(dtype), kind,
                                self.fds))
        return {"slot": len(self.slots) - 1}

    def _mismatch(self, where: str, detail: str) -> UnsupportedTypeError:
        return UnsupportedTypeError(
            f"{self.what}: {where} converts to different pandas data in a later batch "
            f"({detail}); nothing was written. Give the column one type in every file"
        )

    def _take(self, spec: Any, t: Any, arrays: dict[Any, np.ndarray], where: str,
              key: int | str) -> Any:
        """Append ``spec``'s buffers to the slots of template ``t`` (None: make them);
        return the template. ``where`` names the column in errors; ``key`` is its position
        (or "index"), which keys its running categories."""
        if isinstance(spec, dict) and set(spec) == {"f", "o", "n"}:
            arr = _ref(arrays, spec)
            t = t or self._slot(arr.dtype)
            self._append(t, arr, where)
            return t
        if isinstance(spec, dict) and "bufs" in spec:
            return self._take_arrow(spec, t, arrays, where)
        if isinstance(spec, dict) and spec.get("c") == "range":
            return t or spec  # each batch's own 0..n: the whole table's is made at the end
        if isinstance(spec, dict) and spec.get("c") == "cat":
            t = t or {"c": "cat", "ordered": spec["ordered"], "codes": self._slot(
                np.dtype(np.int32), CODES), "cats": key, "where": where}
            codes = _ref(arrays, spec["codes"])
            self.slots[t["codes"]["slot"]].append(codes)  # widened to int32
            return t
        if isinstance(spec, dict):
            if t is not None and set(t) != set(spec):
                raise self._mismatch(where, f"{sorted(t)} against {sorted(spec)}")
            return {k: self._take(v, None if t is None else t[k], arrays, where, key)
                    for k, v in spec.items()}
        if isinstance(spec, list):
            if t is not None and len(t) != len(spec):
                raise self._mismatch(where, "buffer count")
            return [self._take(v, None if t is None else t[i], arrays, where, key)
                    for i, v in enumerate(spec)]
        if t is not None and t != spec:
            raise self._mismatch(where, f"{t!r} against {spec!r}")
        return spec

    def _append(self, t: Spec, arr: np.ndarray, where: str) -> None:
        slot = self.slots[t["slot"]]
        if arr.dtype != slot.dtype:
            kinds = {arr.dtype.kind, slot.dtype.kind}
            if slot.kind != DATA or not kinds <= set("iuf") or "f" not in kinds:
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
        bufs: list[Any] = [None if b is None else _ref(arrays, b) for b in spec["bufs"]]
        if t is None:
            slots: list[Any] = [None] * len(bufs)
            t = {"type": spec["type"], "len": 0, "nulls": 0, "bufs": slots, "base": 0}
            if len(bufs) > 1:
                t["bufs"][1:] = [self._slot(np.dtype(np.uint8)) for _ in bufs[1:]]
        elif t["type"] != spec["type"]:
            raise self._mismatch(where, f"Arrow type {typ}")
        if bufs[0] is not None and t["bufs"][0] is None:  # the first nulls: earlier rows valid
            valid_slot = self._slot(np.dtype(np.uint8), BITS)
            t["bufs"][0] = valid_slot
            append_ones(self.slots[valid_slot["slot"]], t["len"])
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
            return {"c": "cat", "ordered": t["ordered"], "codes": self._final(t["codes"], pool),
                    "cats": pool.categories(dtype, t["where"])}
        if isinstance(t, dict):
            return {k: self._final(v, pool) for k, v in t.items()}
        if isinstance(t, list):
            return [self._final(v, pool) for v in t]
        return t


def _recode(codes: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """Category codes of a batch's categories as codes of the running ones (-1 stays)."""
    if not len(moved):  # no categories (an all-null chunk): every code is -1
        return np.full(len(codes), -1, dtype=codes.dtype)
    return np.where(codes >= 0, moved[np.maximum(codes, 0)], -1)


def _fixed_width(typ: pa.DataType) -> bool:
    return (pa.types.is_integer(typ) or pa.types.is_floating(typ)
            or pa.types.is_timestamp(typ) or pa.types.is_duration(typ))


def _values(col: pa.Array, dtype: np.dtype) -> np.ndarray:
    """The values buffer of fixed-width Arrow array ``col`` as ``dtype``, without a copy."""
    if not len(col):  # an empty array may have no buffer
        return np.empty(0, dtype=dtype)
    return np.frombuffer(col.buffers()[1], dtype=dtype)[col.offset : col.offset + len(col)]


def _arrays(pool: Pool) -> dict[tuple[int, int, int], np.ndarray]:
    """Each array the pool holds, by (file, offset, size): what a ref of one buffer names.
    (The size too: an empty array and the next one start at the same offset.)"""
    out = {}
    for f, key in enumerate(pool.order):
        offset = 0
        for arr in pool.files[key]:
            out[f, offset, arr.size] = arr
            offset += arr.size
    return out


def _ref(arrays: dict[tuple[int, int, int], np.ndarray], ref: Spec) -> np.ndarray:
    return arrays[ref["f"], ref["o"], ref["n"]]


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
    except (pa.ArrowException, SourceError) as exc:  # a damaged or unreadable source
        error = exc.error if isinstance(exc, SourceError) else exc
        path = isinstance(source, str | os.PathLike)
        shown = repr(os.fspath(source)) if path else f"the {type(source).__name__}"
        check = ("Check the file (e.g. pyarrow.parquet.read_metadata(path))" if path
                 else "Check what feeds it (the error above it says more)")
        raise InvalidArgumentError(
            f"key {key!r}: cannot read {shown}: {error}; nothing was written. {check}",
            key=key,
        ) from error


def _ingest(cache: Any, source: Any, key: str, columns: Sequence[str] | None,
            progress: bool | None) -> Entry:
    check_key(key)
    try:
        stream = open_source(source, columns)  # checks what it can before writing anything
    except OSError as exc:  # the source's, not the cache's: a denied or damaged file
        if isinstance(exc, MmcacheError):
            raise
        raise SourceError(exc) from exc
    if not stream.schema.names:
        return _rows_only(cache, stream, key, progress)
    places = cache._places(create=True)
    place = places[0]
    name = entry_name(key)
    with locked(place, name, key, _save.LOCK_TIMEOUT):
        stage_dir = place / f"{name}.{_store.new_token()}"
        os.mkdir(stage_dir, 0o700)
        stager: _Stager | None = None
        try:
            stager = _Stager(stage_dir, stream)
            nbytes = 0
            with _progress(progress, stream.nrows, key) as bar:
                width, done = len(stream.schema), 0.0
                for batch in prefetched(stream.batches):
                    check_batch(stream.schema, batch, stream.what, stream.parts)
                    stager.add(batch)  # even empty: its dictionaries count, as in pandas
                    nbytes += batch.nbytes
                    bar.set_postfix_str(human(nbytes), refresh=False)
                    # A column pass's rows count for the share of the columns it holds;
                    # the bar moves by whole rows, and ends on the total.
                    done += batch.num_rows * batch.num_columns / width
                    bar.update(round(done) - bar.n)
            if stager.cols is None:  # no batch at all: an empty frame of the schema
                stager.add(pa.RecordBatch.from_pylist([], schema=stream.schema))
            stager.fds.close()
            layout, pool = stager.finish()
            files = _store.plan_files(pool)
            total = sum(f["size"] for f in files)
            _save._fit_limit(cache, places, key, total)
            direct = renamable(stager.slots, stager.direct, pool)
            renamed = {direct[k][0] for k in direct}
            # The staged data are already counted as used; a slot copied (not renamed)
            # is removed once copied, a region once its whole file is.
            copied = max((s.nbytes() for s in stager.slots if s.at is None), default=0)
            copied += sum(s.nbytes() for s in stager.slots
                          if s.at is not None and s.at[0] not in renamed)

            def room(where: Path) -> int:
                return copied if where == place else total

            return _save.write(places, name, key, layout, pool, files,
                               fill=lambda d: fill(pool, files, d, direct, key), room=room)
        finally:
            if stager is not None:
                stager.fds.close()
            _clean.remove_data_dir(stage_dir)


def _rows_only(cache: Any, stream: Stream, key: str, progress: bool | None) -> Entry:
    """A source of no columns (``columns=[]``, or a table of rows without columns): the
    frame of its row count, as ``pd.read_parquet(source, columns=[])`` gives, saved.
    (Batch by batch, the rows would be lost: pyarrow's ``Table.replace_schema_metadata``
    makes a table without columns 0 rows long.)"""
    nrows = 0
    with _progress(progress, stream.nrows, key) as bar:
        for batch in prefetched(stream.batches):  # a read failure said as the source's
            check_batch(stream.schema, batch, stream.what)
            nrows += batch.num_rows
            bar.update(batch.num_rows)
    rows = pa.record_batch([pa.nulls(nrows)], names=["_"]).select([])  # no data buffers
    table = pa.Table.from_batches([rows.replace_schema_metadata(stream.schema.metadata)])
    frame = _compat.arrow_to_pandas(table)
    if len(frame) != nrows:  # pyarrow's row count of a table without columns, checked
        frame = pd.DataFrame(index=pd.RangeIndex(nrows))
    return cache.save(frame, key)
