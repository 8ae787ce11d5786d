"""Share one large pandas DataFrame between many processes without copies.

``save(df, key)`` writes the frame once into a cache directory (``/dev/shm`` by default, the
temp dir for an entry that does not fit there);
``open(key)`` in any process maps those files and builds a DataFrame over them without
copying, so every worker shares one physical copy through the OS page cache.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys as _sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._cache import Cache, Entry
from ._errors import (
    CacheDirError,
    CacheFullError,
    CacheIOError,
    ColumnNotFoundError,
    CorruptEntryError,
    EntryChangedError,
    EntryNotFoundError,
    InvalidArgumentError,
    InvalidKeyError,
    LockTimeoutError,
    MmcacheError,
    MmcacheWarning,
    UnsupportedFormatError,
    UnsupportedTypeError,
)

if TYPE_CHECKING:
    import pandas as _pd
    import pyarrow as _pa
else:  # imported on first use, so the annotations resolve at run time too
    from ._lazy import pa as _pa
    from ._lazy import pd as _pd

# The modules that build frames (and pandas, pyarrow) load here, as a program that works
# with frames needs them, so its first save or open (a spawned worker's first task) does not
# pay for their import; but not in the command line (`mmcache ...`, `python -m mmcache ...`:
# while the package loads, argv[0] is the script or "-m"), whose `ls` and `clean` list and
# remove files and never need them.
_ARGV = getattr(_sys, "argv", None)  # absent or odd in some embedding programs
_ARGV0 = _ARGV[0] if isinstance(_ARGV, list) and _ARGV and isinstance(_ARGV[0], str) else ""
if "pandas" in _sys.modules or not (_ARGV0 == "-m" or os.path.basename(_ARGV0) == "mmcache"):
    from . import _arrow, _frame, _views  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "CacheDirError",
    "CacheFullError",
    "CacheIOError",
    "ColumnNotFoundError",
    "CorruptEntryError",
    "Entry",
    "EntryChangedError",
    "EntryNotFoundError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "LockTimeoutError",
    "MmcacheError",
    "MmcacheWarning",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
    "clean",
    "delete",
    "entries",
    "exists",
    "ingest",
    "open",
    "open_arrow",
    "save",
    "share",
]

_PathArg = str | os.PathLike[str] | None


def save(obj: _pd.DataFrame | _pd.Series, key: str, *, cache_dir: _PathArg = None) -> Entry:
    """Write ``obj`` under ``key`` once, atomically replacing any previous entry."""
    return Cache(cache_dir).save(obj, key)


def open(
    key: str,
    *,
    cache_dir: _PathArg = None,
    columns: Sequence[Any] | None = None,
    build: Callable[[], _pd.DataFrame | _pd.Series] | None = None,
) -> _pd.DataFrame | _pd.Series:
    """Map ``key``'s entry and return a DataFrame (or Series) over it without copying."""
    return Cache(cache_dir).open(key, columns=columns, build=build)


def open_arrow(
    key: str, *, columns: Sequence[Any] | None = None, cache_dir: _PathArg = None
) -> _pa.Table:
    """Map ``key``'s entry and return it as a ``pyarrow.Table`` over the mapped files.

    Numbers, timestamps (with their zone), durations, Arrow strings and category codes are
    not copied; validity bitmaps (from masks, NaN, NaT), booleans and category labels are
    converted (see the README's "Arrow in and out"). The index is stored as
    ``pa.Table.from_pandas`` stores it (columns plus pandas metadata; a RangeIndex only in
    the metadata), so ``table.to_pandas()`` gives the frame back. Memoised like ``open``.
    """
    return Cache(cache_dir).open_arrow(key, columns=columns)


def exists(key: str, *, cache_dir: _PathArg = None) -> bool:
    """True if ``key`` has an entry."""
    return Cache(cache_dir).exists(key)


def delete(key: str, *, cache_dir: _PathArg = None) -> bool:
    """Remove ``key``'s entry; True if something was removed."""
    return Cache(cache_dir).delete(key)


def entries(*, cache_dir: _PathArg = None) -> list[Entry]:
    """What is cached, with sizes and times."""
    return Cache(cache_dir).entries()


def clean(
    keys: str | Sequence[str] | None = None,
    *,
    older_than: float | str | _dt.timedelta | None = None,
    max_bytes: int | str | None = None,
    dry_run: bool = False,
    cache_dir: _PathArg = None,
) -> list[Entry]:
    """Remove entries (all, or those selected) and stale leftovers; return what was removed."""
    return Cache(cache_dir).clean(
        keys, older_than=older_than, max_bytes=max_bytes, dry_run=dry_run
    )


def share(obj: _pd.DataFrame | _pd.Series, *, cache_dir: _PathArg = None) -> Entry:
    """Save ``obj`` under a fresh unique key for the life of a ``with`` block."""
    return Cache(cache_dir).share(obj)


def ingest(
    source: Any,
    key: str,
    *,
    columns: Sequence[str] | None = None,
    cache_dir: _PathArg = None,
    progress: bool | None = None,
) -> Entry:
    """Write a parquet file or directory, a CSV file, or a pyarrow ``Dataset``,
    ``ParquetFile``, ``Table`` or ``RecordBatchReader`` under ``key``, batch by batch.

    The entry opens as the frame ``pd.read_parquet(source)`` gives (index and categoricals
    from the pandas metadata), zero-copy, like one written by :func:`save`; but the data never
    sit in this process whole: memory stays about one batch (65,536 rows) plus what the
    reader holds (a parquet row group; a CSV's 1 MB blocks, ~38 of them decoded ahead: a
    235 MB CSV adds 76-90 MB of peak RSS). Atomic like ``save``: a failure or a kill leaves no
    visible entry (a kill leaves leftovers ``clean`` removes). Nested Arrow types, types pandas
    makes Python objects of (dates, decimals, binary: ``save`` refuses them too) and a schema
    that changes between files or batches raise an error naming the column; nothing is
    written. ``progress``: a bar on stderr (rows, bytes, rate, ETA) for ingests longer than
    two seconds, by default only when stderr is a terminal; ``False`` never, ``True`` always.
    """
    return Cache(cache_dir).ingest(source, key, columns=columns, progress=progress)
