"""What ``ingest`` reads: any source kind as one stream of Arrow record batches, checked first.

Every kind (a parquet file or directory, a CSV file, a ``pyarrow.dataset.Dataset``,
``pq.ParquetFile``, ``pa.Table``, ``pa.RecordBatchReader``) becomes a :class:`Stream`: the
schema every batch must have, the row count when the source knows it (for the progress bar's
ETA), and an iterator of batches. Whatever can be checked before reading data is checked here
(nested types, parquet files of one directory or dataset that disagree on a column's type), so
such an ingest fails before anything is written.

Memory: a parquet file given by path is read by a few streams of a few columns each
(``column_parallel``: one ``ParquetFile.iter_batches`` per stream, decoded by a thread pool
at most ``AHEAD`` batches ahead; a wide one in passes of a few columns over all its rows,
``column_passes``, as a reader holds a few MB per column read), a ``ParquetFile`` the caller
made by its own ``iter_batches``: a read buffer per column plus a few batches. A CSV file is read by
``pyarrow.csv.open_csv`` in blocks of 1 MB (it decodes ~38 blocks ahead: ~40 MB) with the
types inferred from its first 16 MB. A reader's batches are sliced to at most ``BATCH_ROWS``
rows (a ``Table``'s by ``to_batches``; the parquet and dataset readers make batches of that
size).
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.dataset as pa_ds
import pyarrow.parquet as pq

from ._errors import InvalidArgumentError, MmcacheError, UnsupportedTypeError

# Rows per batch: big enough that per-batch Python work is noise, small enough that a batch
# of wide string rows stays a few tens of MB (the memory bound is one row group + one batch).
BATCH_ROWS = 65_536
# CSV: Arrow infers the column types from the first CSV_BLOCK bytes; the file is then read
# in blocks of CSV_READ_BLOCK (pyarrow's reader holds ~38 blocks ahead: ~40 MB).
CSV_BLOCK = 16 << 20
CSV_READ_BLOCK = 1 << 20
# Parquet column chunks are read through a buffer of this size (pyarrow's default, 0, reads
# each whole chunk: a 1Mi-row group of 8-byte values holds 8 MB per column at once).
READ_BUFFER = 1 << 20
_TSV_SUFFIXES = (".tsv", ".tsv.gz", ".tsv.bz2")
_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", *_TSV_SUFFIXES)


@dataclass
class Stream:
    """Batches of one schema, and how many rows there are if known up front."""

    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]
    nrows: int | None
    what: str  # names the source in errors: "parquet file '/data/x.parquet'"
    # Whether batches after the first may hold only some of the columns (a wide parquet
    # file read in column passes, see column_passes); the first always holds them all.
    parts: bool = False


def open_source(source: Any, columns: Sequence[str] | None) -> Stream:
    """The :class:`Stream` of ``source``, checked; raises before reading any data."""
    if columns is not None:
        if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
            raise InvalidArgumentError(
                f"columns= takes a list of column names (str), got {columns!r}"
            )
        columns = list(columns)
        twice = [c for c, n in collections.Counter(columns).items() if n > 1]
        if twice:
            raise InvalidArgumentError(
                f"columns= names {twice[0]!r} more than once; name each column once"
            )
    if isinstance(source, str | os.PathLike):
        return _path_stream(Path(source), columns)
    if isinstance(source, pq.ParquetFile):
        return _parquet_stream([source], columns, "parquet file")
    if isinstance(source, pa_ds.Dataset):
        return _dataset_stream(source, columns)
    if isinstance(source, pa.Table):
        schema = _select(source.schema, columns, "table")
        table = source if columns is None else source.select(schema.names)
        return Stream(schema, iter(_table_batches(table)), table.num_rows, "table")
    if isinstance(source, pa.RecordBatchReader):
        schema = _select(source.schema, columns, "record batch reader")
        batches = (b.select(schema.names) if columns is not None else b for b in source)
        return Stream(schema, sliced(batches), None, "record batch reader")
    raise InvalidArgumentError(
        f"ingest() takes a parquet file or directory, a CSV file, a pyarrow Dataset, "
        f"ParquetFile, Table or RecordBatchReader; got {type(source).__name__}"
    )


def sliced(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``batches``, each cut into slices of at most ``BATCH_ROWS`` rows (zero-copy views):
    a reader of a few huge batches is converted a slice at a time, so the conversion holds a
    few slices' worth, not several times the caller's batch."""
    for batch in batches:
        if batch.num_rows <= BATCH_ROWS:
            yield batch
            continue
        for start in range(0, batch.num_rows, BATCH_ROWS):
            yield batch.slice(start, BATCH_ROWS)


def _path_stream(path: Path, columns: list[str] | None) -> Stream:
    if path.is_dir():
        # Sorted as pyarrow and pandas list a directory: by the path as a string.
        files = sorted((p for p in path.rglob("*") if p.is_file()
                        and not p.name.startswith((".", "_"))), key=str)
        if not files:
            raise InvalidArgumentError(f"directory {str(path)!r} holds no parquet files")
        hive = sorted({d.name for f in files for d in f.relative_to(path).parents
                       if "=" in d.name})
        if hive:
            # pd.read_parquet turns `name=value` folders into columns: reading the files
            # alone would silently drop them.
            raise InvalidArgumentError(
                f"directory {str(path)!r} is partitioned ({hive[0]!r}, ...): ingest does not "
                "read partition folders as columns yet; nothing was written. Use "
                "pd.read_parquet(path) and mmcache.save(), or ingest each partition's "
                "folder under its own key"
            )
        return _parquet_stream(files, columns, f"parquet directory {str(path)!r}")
    if not path.exists():
        raise InvalidArgumentError(f"source {str(path)!r} does not exist")
    if path.name.lower().endswith(_CSV_SUFFIXES):
        return _csv_stream(path, columns)
    return _parquet_stream([path], columns, f"parquet file {str(path)!r}")


def _parquet_file(source: Any, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    # pre_buffer=False: with it (pyarrow's default) iter_batches reads ahead without bound,
    # holding most of the file (measured: 289 MB of Arrow memory for a 220 MB file, against
    # 17 MB without); local files gain nothing from it.
    return pq.ParquetFile(source, pre_buffer=False, buffer_size=READ_BUFFER,
                          metadata=metadata)


@dataclass
class _Footer:
    """A parquet file's footer, read first, and which file it was read from."""

    path: Path
    meta: pq.FileMetaData
    identity: tuple[int, ...]  # device, inode, size, mtime: the file as its footer says

    @classmethod
    def read(cls, path: Path) -> _Footer:
        before = _identity(path)
        meta = pq.read_metadata(path)
        if _identity(path) != before:
            raise _changed(path)
        return cls(path, meta, before)

    def changed(self) -> bool:
        """Whether the file is no longer the one the footer was read from."""
        try:
            return _identity(self.path) != self.identity
        except MmcacheError:  # removed
            return True

    def open(self) -> pa.NativeFile:
        """The file, opened now; raises if it is not the file the footer was read from (it
        was replaced or rewritten since: its data would not match the footer)."""
        if _identity(self.path) != self.identity:
            raise _changed(self.path)
        source = pa.OSFile(str(self.path))
        if _identity(self.path) != self.identity:  # replaced while being opened
            source.close()
            raise _changed(self.path)
        return source


def _identity(path: Path) -> tuple[int, ...]:
    """What changes when a file's bytes do (not its mode: chmod changes only the ctime)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _changed(path) from None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _changed(path: Path) -> MmcacheError:
    return InvalidArgumentError(
        f"parquet file {str(path)!r} changed while it was being ingested (replaced, "
        "rewritten or removed); nothing was written. Ingest again once the files stop "
        "changing"
    )


def _parquet_stream(files: list[pq.ParquetFile] | list[Path], columns: list[str] | None,
                    what: str) -> Stream:
    """Files given by path are opened only while read (a directory of thousands of files
    would otherwise hold a descriptor each: EMFILE at 1,024), their footers read first."""
    footers = [f if isinstance(f, pq.ParquetFile) else _Footer.read(f) for f in files]
    metas = [f.metadata if isinstance(f, pq.ParquetFile) else f.meta for f in footers]
    schemas = [m.schema.to_arrow_schema() for m in metas]
    schema = _unique(_select(schemas[0], columns, what), what)
    for other in schemas[1:]:  # footers only: a directory that disagrees fails before any write
        _same_types(schema, other, what)
    nrows = sum(m.num_rows for m in metas)
    # A file given by path is read by several streams of a few columns each, decoded in
    # parallel (column_parallel); a ParquetFile the caller made by its own iter_batches, as
    # the caller set it up. A wide one is read in passes of a few columns at a time
    # (column_passes), unless it has index columns, which every batch's rows need.
    index = {c for c in (schema.pandas_metadata or {}).get("index_columns", [])
             if isinstance(c, str)}
    parts = len(schema.names) > 1 and not index & set(schema.names)

    def batches() -> Iterator[pa.RecordBatch]:
        head = True  # no batch yet: the next must hold every column
        widths: dict[str, float] | None = None  # measured on the first file's first rows
        for f, meta in zip(footers, metas, strict=True):
            try:
                with (contextlib.nullcontext(None) if isinstance(f, pq.ParquetFile)
                      else f.open()) as source:
                    read = _reader(f if source is None else source, meta, schema)
                    if parts and meta.num_rows and widths is None:
                        widths = _widths(read, meta, schema.names)
                    passes = (_passes(meta, schema.names, widths or {})
                              if parts and meta.num_rows else [schema.names])
                    if len(passes) > 1:
                        yield from column_passes(read, meta, schema, passes, widths or {},
                                                 head=head)
                    else:  # (a file of one batch gains little, and would pay a pool)
                        yield from _counted(read(schema.names, BATCH_ROWS,
                                                 meta.num_rows > BATCH_ROWS),
                                            meta, schema.names)
            except Exception as exc:  # a file cut or rewritten while read: say so
                if isinstance(f, _Footer) and f.changed():
                    raise _changed(f.path) from exc
                raise
            # Rewritten in place while read (same inode, e.g. between two passes): its
            # batches may mix both contents.
            if isinstance(f, _Footer) and f.changed():
                raise _changed(f.path)
            head = head and not meta.num_rows

    return Stream(schema, batches(), nrows, what, parts=parts)


Reader = Callable[[list[str], int, bool], Iterator[pa.RecordBatch]]


def _reader(source: pq.ParquetFile | pa.NativeFile, meta: pq.FileMetaData,
            schema: pa.Schema) -> Reader:
    """``read(names, batch_rows, threads)``: batches of those columns of a parquet file,
    an open file's decoded by column streams in parallel if ``threads``; a ParquetFile the
    caller made is read by its own ``iter_batches``, as the caller set it up."""
    if isinstance(source, pq.ParquetFile):
        def read_theirs(names: list[str], rows: int, threads: bool) -> Iterator[pa.RecordBatch]:
            return source.iter_batches(batch_size=rows, columns=names)

        return read_theirs

    def read(names: list[str], rows: int, threads: bool) -> Iterator[pa.RecordBatch]:
        if threads and len(names) > 1:
            sub = pa.schema([schema.field(c) for c in names], metadata=schema.metadata)
            return column_parallel(source, meta, sub, batch_rows=rows)
        return _parquet_file(source, meta).iter_batches(batch_size=rows, columns=names,
                                                        use_threads=threads)

    return read


def _dataset_stream(dataset: pa_ds.Dataset, columns: list[str] | None) -> Stream:
    what = "dataset"
    schema = _unique(_select(dataset.schema, columns, what), what)
    # Files that disagree with the first on a column's type are refused (the scan would cast
    # them to the first's type unasked), unless the dataset's schema gives that column
    # another type than the first file has: a cast asked for (dataset(path, schema=...)).
    first: pa.Schema | None = None
    for fragment in dataset.get_fragments():
        physical = getattr(fragment, "physical_schema", None)
        if physical is None:
            continue
        if first is None:
            first = physical
            asked = [f.name for f in schema if (i := first.get_field_index(f.name)) >= 0
                     and not first.field(i).type.equals(f.type)]
            unasked = pa.schema([f for f in schema if f.name not in asked])
        _same_types(unasked, physical, f"{what} file {getattr(fragment, 'path', '?')!r}")
    # One fragment and a batch or two ahead at a time: the scanner's defaults (4 files,
    # 16 batches) would hold many row groups at once.
    options = {}
    if isinstance(dataset, pa_ds.FileSystemDataset) and isinstance(
            dataset.format, pa_ds.ParquetFileFormat):
        options["fragment_scan_options"] = pa_ds.ParquetFragmentScanOptions(
            pre_buffer=False, buffer_size=READ_BUFFER, use_buffered_stream=True)
    batches = dataset.to_batches(columns=schema.names, batch_size=BATCH_ROWS,
                                 batch_readahead=1, fragment_readahead=1, **options)
    return Stream(schema, sliced(batches), dataset.count_rows(), what)


def _csv_stream(path: Path, columns: list[str] | None) -> Stream:
    what = f"CSV file {str(path)!r}"
    # The column types are inferred from the first CSV_BLOCK bytes, read here alone (the
    # first block of a reader of that block size: the same rows, the same types); the file
    # is then streamed in blocks of CSV_READ_BLOCK with those types given. pyarrow's
    # streaming reader decodes about 38 blocks ahead of its consumer, without a knob, and
    # keeps doing so after close(): with 16 MB blocks that is the whole of a 200 MB file
    # (measured: 604 MB of Arrow memory for a 950 MB file), with 1 MB blocks ~38 MB.
    with pa.input_stream(path) as f:  # decompresses .gz / .bz2 as open_csv does
        head = f.read(CSV_BLOCK)
    if len(head) == CSV_BLOCK:  # cut after the last whole row, as Arrow cuts its blocks
        head = head[: max(head.rfind(b"\n"), head.rfind(b"\r")) + 1]
    parse = pa_csv.ParseOptions(
        delimiter="\t" if path.name.lower().endswith(_TSV_SUFFIXES) else ",")
    header = pa_csv.open_csv(pa.BufferReader(head),
                             read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK),
                             parse_options=parse)
    inferred = header.schema
    del header, head
    names = inferred.names  # the file's columns, in its order (errors give a position)
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise InvalidArgumentError(
                f"columns= names {missing!r}, which the source does not have; it has "
                f"{names!r}"
            )
        inferred = pa.schema([inferred.field(c) for c in dict.fromkeys(columns)])
    schema = _select(inferred, None, what)
    # columns=[]: the rows alone (pyarrow reads every column for an empty include_columns);
    # one column is read to count them.
    if columns == []:
        convert = pa_csv.ConvertOptions(column_types={names[0]: pa.string()},
                                        include_columns=names[:1])
    else:
        convert = pa_csv.ConvertOptions(
            column_types=schema, include_columns=None if columns is None else schema.names)
    try:  # this reads and converts the first block
        reader = pa_csv.open_csv(
            path, read_options=pa_csv.ReadOptions(block_size=CSV_READ_BLOCK),
            parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        if (err := _csv_error(exc, names, schema, what)) is None:
            raise
        raise err from exc
    return Stream(schema, _csv_batches(reader, names, schema, what), None, what)


_CSV_COLUMN = re.compile(r"In CSV column #(\d+)")


def _csv_batches(reader: Any, names: list[str], schema: pa.Schema,
                 what: str) -> Iterator[pa.RecordBatch]:
    """A CSV reader's batches, gathered to about ``BATCH_ROWS`` rows (a 1 MB block is a few
    thousand rows: fewer, larger batches cost less per row downstream); a value that does not
    fit the type inferred from the first block becomes an error naming the column
    (``names``: the file's columns, as the error counts them)."""
    pending: list[pa.RecordBatch] = []
    rows = size = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as exc:
            if (err := _csv_error(exc, names, schema, what)) is None:
                raise
            raise err from exc
        if not schema.names:  # columns=[]: the rows alone
            yield batch.select([])
            continue
        pending.append(batch)
        rows += batch.num_rows
        size += batch.nbytes
        if rows >= BATCH_ROWS or size >= CSV_READ_BLOCK * 8:
            yield _concat(pending)
            pending, rows, size = [], 0, 0
    if pending:
        yield _concat(pending)


def _csv_error(exc: pa.ArrowInvalid, names: list[str], schema: pa.Schema,
               what: str) -> UnsupportedTypeError | None:
    """A value that does not fit its column's inferred type, as an error naming the column
    (None for any other error)."""
    m = _CSV_COLUMN.search(str(exc))
    pos = int(m.group(1)) if m else -1
    if not 0 <= pos < len(names):
        return None
    name = names[pos]
    i = schema.get_field_index(name)
    typ = schema.field(i).type if i >= 0 else "?"
    return UnsupportedTypeError(
        f"{what}: column {name!r} changes type after the first {CSV_BLOCK:,} bytes (Arrow "
        f"inferred {typ} from them): {exc}; nothing was "
        "written. Fix the data, or read it yourself with explicit column types (pyarrow.csv."
        "open_csv(..., convert_options=ConvertOptions(column_types=...))) and ingest that "
        "reader"
    )


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """One batch of ``batches`` (a copy of them: a few MB)."""
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def _with_index_columns(schema: pa.Schema, columns: list[str] | None) -> pa.Schema:
    """``schema`` limited to ``columns`` plus the index columns its pandas metadata names,
    as ``pd.read_parquet(columns=...)`` keeps the index."""
    if columns is None:
        return schema
    meta = schema.pandas_metadata or {}
    index = [c for c in meta.get("index_columns", []) if isinstance(c, str)]
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InvalidArgumentError(
            f"columns= names {missing!r}, which the source does not have; it has "
            f"{schema.names!r}"
        )
    keep = list(dict.fromkeys([*columns, *(c for c in index if c in schema.names)]))
    return pa.schema([schema.field(c) for c in keep], metadata=schema.metadata)


def _is_binary(t: pa.DataType) -> bool:
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or pa.types.is_fixed_size_binary(t)
            or getattr(pa.types, "is_binary_view", lambda _: False)(t))


# Arrow types pandas converts to object columns of Python values, which save() refuses
# (mmcache stores no Python objects): what pandas makes of them, and the cast to use.
_OBJECT_TYPES = [
    (pa.types.is_date, "datetime.date", "pa.timestamp('s') (pandas makes it datetime64)"),
    (pa.types.is_decimal, "decimal.Decimal", "pa.float64(), or pa.string() to keep every digit"),
    (_is_binary, "bytes", "pa.string() if it holds UTF-8 text"),
    (pa.types.is_time, "datetime.time", "pa.int64() (units since midnight) or pa.string()"),
    (pa.types.is_interval, "pandas.DateOffset", None),  # Arrow casts it to nothing
]


def _cast_recipe(what: str, name: str) -> str:
    """How to read column ``name`` of the source ``what`` names with another type."""
    if what.startswith("CSV file"):
        return ("mmcache.ingest(pyarrow.csv.open_csv(path, read_options=pyarrow.csv."
                "ReadOptions(block_size=1 << 20), convert_options=pyarrow.csv.ConvertOptions("
                f"column_types={{{name!r}: <type>}})), key)")
    if what.startswith(("parquet", "dataset")):
        return ("s = pyarrow.parquet.read_schema(path); mmcache.ingest(pyarrow.dataset."
                f"dataset(path, schema=s.set(s.get_field_index({name!r}), pa.field({name!r}, "
                "<type>))), key)")
    return "table.cast(schema) (a reader: each batch)"


def _table_batches(table: pa.Table) -> list[pa.RecordBatch]:
    """``table``'s batches of at most BATCH_ROWS rows (zero-copy slices), its empty chunks'
    dictionaries kept: ``to_batches`` drops empty chunks, whose dictionaries pandas still
    unifies into the categories, so such columns are unified first (a copy of their
    indices, only then); a table of no rows gives one empty batch with its dictionaries."""
    if any(pa.types.is_dictionary(col.type) and any(len(c) == 0 for c in col.chunks)
           for col in table.columns):
        table = table.unify_dictionaries()
    batches = table.to_batches(max_chunksize=BATCH_ROWS)
    if not batches and table.num_columns:
        batches = [pa.RecordBatch.from_arrays(
            [pa.concat_arrays(c.chunks) if c.num_chunks else pa.array([], c.type)
             for c in table.columns], schema=table.schema)]
    return batches


def _select(schema: pa.Schema, columns: list[str] | None, what: str) -> pa.Schema:
    """``schema`` (or its ``columns``), refusing what mmcache cannot store."""
    if columns is not None:
        schema = _with_index_columns(schema, columns)
    for field in schema:
        t = field.type
        if pa.types.is_dictionary(t):
            t = t.value_type
        for test, python, cast in _OBJECT_TYPES:
            if test(t):
                name = field.name
                how = "" if cast is None else (
                    f"Cast it while reading, to {cast}: {_cast_recipe(what, name)}; "
                    "or leave")
                raise UnsupportedTypeError(
                    f"{what}: column {name!r} has the Arrow type {field.type}, which pandas "
                    f"(pd.read_parquet) makes an object column of Python {python} values; "
                    "mmcache stores no such column (save() refuses it too), so nothing was "
                    f"written. {how or 'Leave'} it out with columns=[...]"
                )
        if pa.types.is_nested(t) or isinstance(t, pa.ExtensionType):
            raise UnsupportedTypeError(
                f"{what}: column {field.name!r} has the nested Arrow type {field.type}, which "
                "mmcache does not store; nothing was written. Leave it out with "
                "columns=[...], or flatten it first (e.g. pyarrow.compute.struct_field, "
                "or serialise it to a string)"
            )
    return schema


def _unique(schema: pa.Schema, what: str) -> pa.Schema:
    """``schema``, refused if a column name repeats: parquet readers select columns by name,
    so such a file cannot be read column by column (``pd.read_parquet`` refuses it too)."""
    twice = [name for name, n in collections.Counter(schema.names).items() if n > 1]
    if twice:
        raise UnsupportedTypeError(
            f"{what}: the column name {twice[0]!r} appears more than once, so its columns "
            "cannot be told apart by name (pd.read_parquet refuses it too); nothing was "
            "written. Read it with pyarrow.parquet.read_table(...), rename the columns "
            "(Table.rename_columns) and ingest that Table"
        )
    return schema


def _same_types(schema: pa.Schema, other: pa.Schema, what: str) -> None:
    _unique(other, what)
    for field in schema:
        i = other.get_field_index(field.name)
        if i < 0:
            raise UnsupportedTypeError(
                f"{what}: column {field.name!r} is missing from a file whose columns are "
                f"{other.names!r} (the schema changes between files); nothing was written"
            )
        if not other.field(i).type.equals(field.type):
            raise UnsupportedTypeError(
                f"{what}: column {field.name!r} is {field.type} in the first file but "
                f"{other.field(i).type} in another (the schema changes between files); "
                "nothing was written. Rewrite the files with one schema, or cast while "
                "reading (a pyarrow Dataset with an explicit schema=)"
            )


def check_batch(schema: pa.Schema, batch: pa.RecordBatch, what: str,
                parts: bool = False) -> None:
    """Raise if ``batch`` does not have ``schema``'s column names and types (``parts``:
    or some of them, in order: a column pass)."""
    names = batch.schema.names
    if parts and len(names) < len(schema.names):
        schema = pa.schema([f for f in schema if f.name in set(names)])
    if names != schema.names:
        raise UnsupportedTypeError(
            f"{what}: a batch has columns {names!r}, the first had "
            f"{schema.names!r} (the schema changes); nothing was written"
        )
    for field, got in zip(schema, batch.schema, strict=True):
        if not got.type.equals(field.type):
            raise UnsupportedTypeError(
                f"{what}: column {field.name!r} is {field.type} in the first batch but "
                f"{got.type} in a later one (the schema changes); nothing was written"
            )


class SourceError(Exception):
    """Reading the source failed (pyarrow says a damaged page, a vanished file, a denied
    read as OSError, like the cache's own failures): raised as this, so that ingest names
    the source to check, not the cache directory."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


_DONE = object()
# column_parallel: at most this many streams per file (each a few columns), and batches
# decoded at most this many ahead of the consumer.
STREAMS = 16
AHEAD = 3


def column_parallel(source: pa.NativeFile, metadata: pq.FileMetaData, schema: pa.Schema, *,
                    workers: int | None = None, ahead: int = AHEAD,
                    batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
    """The batches of ``schema``'s columns of the open parquet file ``source`` (read at
    positions: the streams share it), each column group read by its own stream, the streams
    decoded by ``workers`` threads (Arrow's CPU count).

    Why: ``iter_batches`` decodes a batch's columns in parallel but waits for the slowest
    column (a text column) before it starts the next batch, so its threads idle; here each
    stream runs up to ``AHEAD`` batches ahead of the consumer, so the threads stay busy
    while memory stays bounded (``AHEAD`` batches and each column's read buffer). Streams
    may cut their batches at other rows (a dictionary column's end with each row group):
    each batch holds the rows all streams have at hand, as zero-copy slices."""
    names = schema.names
    nstreams = min(len(names), STREAMS)
    groups = [names[g::nstreams] for g in range(nstreams)]  # a text column is not alone
    files = [_parquet_file(source, metadata) for _ in groups]
    streams = [f.iter_batches(batch_size=batch_rows or BATCH_ROWS, columns=cols,
                              use_threads=False) for f, cols in zip(files, groups, strict=True)]
    busy = [threading.Lock() for _ in groups]  # a stream is read by one thread at a time
    got: list[collections.deque[Any]] = [collections.deque() for _ in groups]
    ready = threading.Condition()

    def read(g: int) -> None:
        with busy[g]:  # queued in the order read, before the stream's next read
            item: Any
            try:
                item = next(streams[g], _DONE)
            except BaseException as exc:  # raised to the consumer, which stops
                item = exc
            with ready:
                got[g].append(item)
                ready.notify()

    pool = ThreadPoolExecutor(workers or min(nstreams, pa.cpu_count()),
                              thread_name_prefix="mmcache-ingest-column")

    def take(g: int) -> Any:  # stream g's next non-empty batch (or _DONE); one more read
        while True:
            with ready:
                ready.wait_for(lambda: got[g])
                part = got[g].popleft()
            if isinstance(part, BaseException):
                raise part
            if part is _DONE:
                return part
            pool.submit(read, g)
            if part.num_rows:
                return part

    # Streams need not cut alike (a dictionary column's batches end where its row groups
    # end): each batch goes as far as the shortest of the streams' current parts.
    current: list[Any] = [None] * nstreams
    offset = [0] * nstreams
    try:
        for _ in range(ahead):
            for g in range(nstreams):
                pool.submit(read, g)
        while True:
            for g in range(nstreams):
                if current[g] is None or (current[g] is not _DONE
                                          and offset[g] == current[g].num_rows):
                    current[g], offset[g] = take(g), 0
            ended = [part is _DONE for part in current]
            if all(ended):
                return
            if any(ended):  # never seen: every stream reads the same row groups
                raise MmcacheError(
                    "a parquet file's columns ended at different rows; nothing was "
                    "written (please report this)"
                )
            n = min(part.num_rows - at for part, at in zip(current, offset, strict=True))
            columns: dict[str, pa.Array] = {}
            for g, part in enumerate(current):
                piece = part.slice(offset[g], n)  # zero-copy
                offset[g] += n
                columns.update(zip(piece.schema.names, piece.columns, strict=True))
            yield pa.RecordBatch.from_arrays([columns[c] for c in names], schema=schema)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for f in files:
            f.close()


# Column passes. A parquet reader holds, for each column it reads, about a page of it
# decoded, its dictionary and its read buffer (up to ~3 MB, whatever the batch size): read
# all at once, a file of 600 columns in large row groups held 2.4 GB in pyarrow alone
# (measured, pyarrow 26). Such a file is read in passes, each of consecutive columns whose
# readers and batches fit PASS_BUDGET, each pass over all the file's rows.
PASS_BUDGET = 128 << 20
COLUMN_STATE = 4 << 20  # at most, per column: dictionary, decoded page, read buffer


PROBE_ROWS = 1024  # rows of each column read first to measure what its batches weigh


def _widths(read: Reader, meta: pq.FileMetaData, names: list[str]) -> dict[str, float]:
    """Bytes per row of each column once decoded, measured on its first rows (read a few
    columns at a time, as the footer's sizes plan): the footer cannot say it for
    dictionary-encoded text (70 KB on disk for a chunk 20 MB decoded)."""
    widths: dict[str, float] = {}
    for group in _passes(meta, names, {}):
        reader = read(group, PROBE_ROWS, False)
        try:
            probe = next(reader, None)
        finally:
            reader.close()  # type: ignore[attr-defined]
        if probe is not None and probe.num_rows:
            widths.update((name, col.nbytes / probe.num_rows)
                          for name, col in zip(probe.schema.names, probe.columns, strict=True))
    return widths


def _passes(meta: pq.FileMetaData, names: list[str],
            widths: dict[str, float]) -> list[list[str]]:
    """``names`` cut into consecutive passes that fit PASS_BUDGET (one pass: read at once):
    each column costs its reader's state (at most COLUMN_STATE) and AHEAD + 2 batches of
    it, weighed from its decoded ``widths`` or, where larger, the footer's sizes."""
    cost: dict[str, float] = {}
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for i in range(group.num_columns):
            chunk = group.column(i)
            name, size = chunk.path_in_schema, chunk.total_uncompressed_size
            per_row = max(size / max(1, chunk.num_values), widths.get(name, 0.0))
            est = min(size, COLUMN_STATE) + (AHEAD + 2) * BATCH_ROWS * per_row
            cost[name] = max(cost.get(name, 0.0), est)
    passes: list[list[str]] = [[]]
    used = 0.0
    for name in names:
        if passes[-1] and used + cost.get(name, 0.0) > PASS_BUDGET:
            passes.append([])
            used = 0.0
        passes[-1].append(name)
        used += cost.get(name, 0.0)
    return passes


def column_passes(read: Reader, metadata: pq.FileMetaData, schema: pa.Schema,
                  passes: list[list[str]], widths: dict[str, float], *,
                  head: bool) -> Iterator[pa.RecordBatch]:
    """A parquet file read pass by pass (see ``_passes``): the batches of each pass's
    columns over all the rows, one pass after the other; ``read(names, batch_rows,
    parallel)`` reads the file's ``names``. ``head``: first a batch of every column (the
    first rows, read pass by pass, a few MB), which the ingest plans from; the passes then
    start after those rows."""
    skip = 0
    if head:
        first = metadata.row_group(0)
        width = max(sum(first.column(i).total_uncompressed_size
                        for i in range(first.num_columns)) / max(1, first.num_rows),
                    sum(widths.values()))
        rows = max(1, min(BATCH_ROWS, int(PASS_BUDGET // 4 // max(1.0, width))))
        columns: dict[str, pa.Array] = {}
        for names in passes:
            reader = read(names, rows, False)
            try:
                part = next(reader)
            finally:
                reader.close()  # type: ignore[attr-defined]
            columns.update(zip(part.schema.names, part.columns, strict=True))
        skip = min(len(a) for a in columns.values())
        yield pa.RecordBatch.from_arrays([columns[c].slice(0, skip) for c in schema.names],
                                         schema=schema)
    for names in passes:
        seen = 0
        for batch in _counted(read(names, BATCH_ROWS, True), metadata, names):
            start, seen = max(0, skip - seen), seen + batch.num_rows
            if start < batch.num_rows:
                yield batch.slice(start)


def _counted(batches: Iterator[pa.RecordBatch], metadata: pq.FileMetaData,
             names: list[str]) -> Iterator[pa.RecordBatch]:
    """``batches`` of a parquet file's ``names``, raising at the end unless they held the
    rows its footer announces (pyarrow reads a file cut short as fewer rows, no error)."""
    seen = 0
    for batch in batches:
        seen += batch.num_rows
        yield batch
    if seen != metadata.num_rows:
        raise MmcacheError(
            f"a parquet file's columns {names[:3]!r} gave {seen} rows where its footer "
            f"says {metadata.num_rows}; nothing was written. Was the file cut or rewritten "
            "while it was read? Check it (pyarrow.parquet.read_table) and ingest again"
        )


def prefetched(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``batches``, read one ahead in a thread: Arrow decodes the next batch (without the
    GIL) while the caller converts and writes this one. Memory: one more batch. An error
    of the reader is raised here (a failure to read as :class:`SourceError`); leaving
    early stops the thread and closes ``batches``."""
    ahead: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_DONE)
        except MmcacheError as exc:  # already says what is wrong
            put(exc)
        except (OSError, pa.ArrowException) as exc:
            put(SourceError(exc))
        except BaseException as exc:
            put(exc)

    thread = threading.Thread(target=read, name="mmcache-ingest-reader", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
        # Closed now, not when collected: an error kept by the caller (its traceback holds
        # this generator's caller) would keep the source's threads and files open.
        close = getattr(batches, "close", None)
        if close is not None:
            close()
