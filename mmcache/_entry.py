"""``Entry``: the small picklable handle on a cache entry, and how one is made."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from ._errors import EntryNotFoundError

if TYPE_CHECKING:  # pandas loads on first use (see _cache)
    import pandas as pd
    import pyarrow as pa
else:  # imported on first use, so the annotations resolve at run time too
    from ._lazy import pa, pd

Frame: TypeAlias = "pd.DataFrame | pd.Series"


@dataclass(frozen=True)
class Entry:
    """A small, picklable handle on a cache entry: a reference, never the data.

    Pass it to ``Pool.map``, ``ProcessPoolExecutor.submit`` or joblib at no cost and call
    :meth:`open` in the worker. Used as a context manager (``with mmcache.share(df) as ref``)
    it deletes the entry on exit, also when the block raises.
    """

    key: str
    path: Path  # the metadata file; its directory is the cache directory
    nbytes: int
    nrows: int
    ncols: int
    created: dt.datetime
    last_used: dt.datetime
    # Live processes mapping this version right now (Linux /proc); None when not known.
    in_use: int | None = None

    @property
    def cache_dir(self) -> Path:
        return self.path.parent

    def open(self, *, columns: Sequence[Any] | None = None) -> Frame:
        """Map the entry's current version in this process (see :func:`mmcache.open`).

        An entry of the default cache is looked up in both default places (RAM and disk), so
        the handle still works after a re-save moved the key from one to the other.
        """
        from ._cache import Cache

        return Cache._holding(self.cache_dir).open(self.key, columns=columns)

    def open_arrow(self, *, columns: Sequence[Any] | None = None) -> pa.Table:
        """The entry as a ``pyarrow.Table`` over the same mapped files (see
        :func:`mmcache.open_arrow`)."""
        from ._cache import Cache

        return Cache._holding(self.cache_dir).open_arrow(self.key, columns=columns)

    def delete(self) -> bool:
        from ._cache import Cache

        return Cache._holding(self.cache_dir).delete(self.key)

    def __enter__(self) -> Entry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def entry_from_meta(
    path: Path, meta: dict[str, Any], last_used: float, meta_bytes: int,
    in_use: int | None = None,
) -> Entry:
    layout = meta.get("layout", {})
    created = float(meta["created"])
    return Entry(
        key=str(meta["key"]),
        path=path,
        nbytes=int(meta["nbytes"]) + meta_bytes,  # data files + metadata: what delete frees
        nrows=int(layout.get("nrows", 0)),
        ncols=int(layout.get("ncols", 0)),
        created=dt.datetime.fromtimestamp(created, dt.UTC),
        last_used=dt.datetime.fromtimestamp(last_used, dt.UTC),
        in_use=in_use,
    )


def not_found(key: str, cache_dir: Path, *more: Path) -> EntryNotFoundError:
    """The error for a missing key; ``more``: other directories that were looked in too."""
    where = " or ".join(repr(str(d)) for d in (cache_dir, *more))
    return EntryNotFoundError(
        f"no entry for key {key!r} in {where}; save it first with "
        "mmcache.save(df, key), or pass build= to open() to create it on demand",
        key=key, path=cache_dir,
    )
