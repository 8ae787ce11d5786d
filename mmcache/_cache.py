"""The public verbs: save, open, exists, delete, entries, clean, share; Cache and Entry."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import functools
import gc
import os
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

# pandas, pyarrow and the modules that build frames (_frame, _arrow, _compat) load on first
# use: `mmcache ls` and `mmcache clean` list and remove files and never need them.
from . import _clean, _memo, _save, _store
from ._entry import Entry, Frame, not_found
from ._errors import (
    CacheDirError,
    CacheIOError,
    EntryNotFoundError,
    InvalidArgumentError,
    LockTimeoutError,
    MmcacheError,
    UnsupportedTypeError,
)
from ._lock import locked
from ._paths import (
    ENV_DIR,
    check_key,
    checked_default,
    default_places,
    entry_name,
    is_default,
    resolve_cache_dir,
    resolve_places,
)
from ._survey import Survey, merged, survey
from ._units import parse_duration, parse_size

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
else:  # imported on first use, so the annotations resolve at run time too
    from ._lazy import pa, pd

ENV_MAX_BYTES = _save.ENV_MAX_BYTES
LOCK_TIMEOUT = _save.LOCK_TIMEOUT

# Tests and tools reach the memo as mmcache._cache._MEMO.
_MEMO = _memo._MEMO
# The default cache has two places (RAM, then disk for what does not fit), and a re-save can
# move a key from one to the other: publish in the new place, then unpublish in the old. A
# reader looks RAM, disk, RAM, ... and calls a key missing only after this many rounds found
# it in neither: a false "missing" would take 2 x rounds - 1 moves of that key meanwhile.
FIND_ROUNDS = 3


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused: building a wide frame makes a few objects
    per column and none of them cyclic garbage, yet the allocations set off full
    collections that walk every object in the process (10,000 categorical columns opened
    in 1.6 s instead of 3.0 s with it paused)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _columns_key(columns: Sequence[Any] | None) -> Any:
    return None if columns is None else tuple(columns)


_F = TypeVar("_F", bound=Callable[..., Any])


def _api(method: _F) -> _F:
    """Say operating-system failures as MmcacheErrors that name the path and the fix.

    Inside, OSErrors travel raw (FileNotFoundError is how races are noticed); at the public
    boundary no raw PermissionError or "Too many open files" reaches the caller.
    """

    @functools.wraps(method)
    def wrapper(self: Cache, *args: Any, **kwargs: Any) -> Any:
        key = next((a for a in args[:2] if isinstance(a, str)), None)  # open(key), save(obj, key)
        try:
            return method(self, *args, **kwargs)
        except MmcacheError as exc:
            # Errors raised deep inside (codecs, decoding) learn the key and directory here.
            if exc.key is None:
                exc.key = key
            if exc.path is None:
                with contextlib.suppress(MmcacheError, OSError):
                    exc.path = os.fspath(self.dir)
            raise
        except OSError as exc:
            if exc.__dict__.get("_mmcache_user"):
                raise
            raise _os_error(exc, key, self._given) from exc

    return wrapper  # type: ignore[return-value]


def _os_error(exc: OSError, key: str | None, given: Any) -> MmcacheError:
    where = exc.filename or given or "the cache directory"
    about = f"key {key!r}: " if key else ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheDirError(
            f"{about}{exc.strerror} on {str(where)!r}; the cache directory and its files must "
            f"be yours and writable (chmod u+rwx), or set {ENV_DIR} to one that is",
            key=key, path=where,
        )
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return CacheIOError(
            f"{about}{exc.strerror} ({str(where)!r}): the process ran out of file descriptors; "
            "close some files or raise the limit (ulimit -n); nothing was changed",
            key=key, path=where,
        )
    if full := _store.full_error(exc, key, where):
        return full
    return CacheIOError(f"{about}{exc.strerror or exc} ({str(where)!r})", key=key, path=where)


class Cache:
    """A cache directory and the verbs on it; the module functions use ``Cache(None)``.

    ``cache_dir`` is resolved at each call (argument, ``$MMCACHE_DIR``, per-user default on
    ``/dev/shm``), so a ``Cache`` is cheap and can be made anywhere. The per-user default
    has two places: ``<shm>/mmcache-UID`` in RAM (``<shm>`` is ``$MMCACHE_SHM``, else
    ``/dev/shm``) and ``<tempdir>/mmcache-UID`` on disk, where ``save`` puts an entry that
    does not fit in RAM (warning once per process); every verb covers both, and a key lives
    in exactly one of them. A directory named by the argument or ``$MMCACHE_DIR`` is the
    only place, and never falls back.
    """

    def __init__(
        self, cache_dir: str | os.PathLike[str] | None = None, *,
        max_bytes: int | str | None = None,
    ) -> None:
        self._given = cache_dir
        self._max_bytes = None if max_bytes is None else _size_arg(max_bytes, "max_bytes")

    def __repr__(self) -> str:
        return f"Cache({self._given!r}, max_bytes={self._max_bytes!r})"

    @property
    def max_bytes(self) -> int | None:
        """Size limit: the argument, else ``$MMCACHE_MAX_BYTES`` (e.g. ``10GB``), else none."""
        if self._max_bytes is not None:
            return self._max_bytes
        env = os.environ.get(ENV_MAX_BYTES)
        if not env:
            return None
        try:
            return parse_size(env)
        except ValueError as exc:
            raise InvalidArgumentError(f"${ENV_MAX_BYTES}={env!r}: {exc}") from None

    @property
    def dir(self) -> Path:
        """The resolved cache directory, checked for safety; the first save creates it.
        (The default cache's RAM place: its disk place is the second of ``_places()``.)

        Reading, listing and cleaning never create it: a missing directory holds nothing.
        """
        return resolve_cache_dir(self._given, create=False)

    def _write_dir(self) -> Path:
        return resolve_cache_dir(self._given)

    def _places(self, *, create: bool = False) -> list[Path]:
        """Every directory this cache reads: the resolved one, or both default places (RAM
        first). ``create``: make the first one (saving and deleting lock keys there)."""
        return resolve_places(self._given, create=create)

    @classmethod
    def _holding(cls, cache_dir: Path) -> Cache:
        """The cache an entry of ``cache_dir`` belongs to: the default cache (both places) if
        it is one of this process's default places, else that directory alone."""
        if is_default(None):
            with contextlib.suppress(MmcacheError):
                if cache_dir in default_places():
                    return cls(None)
        return cls(cache_dir)

    @property
    def lock_timeout(self) -> float:
        """How long save() and delete() wait for another process holding the key's lock."""
        return LOCK_TIMEOUT

    # --- save -------------------------------------------------------------------------------

    @_api
    def save(self, obj: Frame, key: str) -> Entry:
        """Write ``obj`` under ``key``, replacing any previous entry atomically.

        Cost: one pass writing the data (plus a copy only of columns that are not already
        contiguous, e.g. Python-held strings). Concurrency: writers of one key take turns on
        a per-key file lock; readers never wait and see the old entry or the new one, never a
        mix; a reader that mapped the old entry keeps reading it intact. A process killed
        mid-save leaves no visible entry (its leftovers go with ``clean``).
        """
        from . import _frame

        check_key(key)
        places = self._places(create=True)
        cache_dir = places[0]
        layout, pool = _frame.encode(obj)  # refuses unsupported data before touching disk
        name = entry_name(key)
        files = _save.make_room(self, places, key, pool)  # before locking: fail fast, leave nothing
        # With two places, the RAM place's lock is the key's lock (see _save.write).
        with locked(cache_dir, name, key, LOCK_TIMEOUT):
            return _save.write(places, name, key, layout, pool, files)

    @_api
    def ingest(
        self, source: Any, key: str, *, columns: Sequence[str] | None = None,
        progress: bool | None = None,
    ) -> Entry:
        """Write an Arrow source (parquet, CSV, Dataset, Table, RecordBatchReader) under
        ``key`` batch by batch; see :func:`mmcache.ingest`."""
        from . import _ingest

        try:
            return _ingest.ingest(self, source, key, columns, progress)
        except OSError as exc:  # said here: _api would take a str source for the key
            if isinstance(exc, MmcacheError):
                raise
            raise _os_error(exc, key, self._given) from exc

    # --- open -------------------------------------------------------------------------------

    @_api
    def open(
        self,
        key: str,
        *,
        columns: Sequence[Any] | None = None,
        build: Callable[[], Frame] | None = None,
    ) -> Frame:
        """Map ``key``'s entry and return a new DataFrame (or Series) over it, copying nothing.

        Cost: O(columns), not O(rows): a few mmap calls and metadata parsing. Opening the same
        unchanged entry again in this process (or in a child forked after it) costs one
        ``stat`` and reuses the mapping. Every call returns its own frame: edits copy the
        touched column (pandas copy-on-write) and never reach the cache or other frames.

        ``columns`` maps only those columns. ``build``: if the key is missing, ``build()``
        makes the frame, which is saved and opened; across racing processes it runs once
        (the others wait on the key's lock and open the result).
        """
        check_key(key)
        columns = _columns_arg(key, columns)
        try:
            return self._open(key, columns)
        except EntryNotFoundError:
            if build is None:
                raise
        from . import _frame

        places = self._places(create=True)
        cache_dir = places[0]
        name = entry_name(key)
        with locked(cache_dir, name, key, float("inf")):
            if self._where(places, name) is None:
                try:
                    obj = build()
                except BaseException as exc:
                    exc.__dict__["_mmcache_user"] = True  # the caller's error: pass it on as is
                    raise
                if not isinstance(obj, pd.DataFrame | pd.Series):
                    raise UnsupportedTypeError(
                        f"build= for key {key!r} returned {type(obj).__name__}; it must return "
                        "a pandas DataFrame or Series",
                        key=key,
                    )
                layout, pool = _frame.encode(obj)
                files = _save.make_room(self, places, key, pool)
                _save.write(places, name, key, layout, pool, files)
        return self._open(key, columns)

    @_api
    def open_arrow(self, key: str, *, columns: Sequence[Any] | None = None) -> pa.Table:
        """``key``'s entry as a ``pyarrow.Table`` over the same mapped files; see
        :func:`mmcache.open_arrow`."""
        check_key(key)
        return self._open(key, _columns_arg(key, columns), arrow=True)

    def _open(self, key: str, columns: Sequence[Any] | None, *, arrow: bool = False) -> Any:
        places = self._places()
        name = entry_name(key)
        if len(places) > 1:
            places = _newest_first(places, key, name)
        for _ in range(FIND_ROUNDS if len(places) > 1 else 1):
            for cache_dir in places:
                for _ in range(_memo.OPEN_RETRIES):
                    try:
                        version = _memo.load(cache_dir, key, name)
                    except EntryNotFoundError:
                        break  # not there (or moved meanwhile): look in the other place
                    if arrow:  # immutable: over the shared mapping on every pandas
                        from . import _arrow

                        return _arrow.table(self._base(version, columns), key)
                    try:
                        return self._hand_out(cache_dir, version, columns)
                    except FileNotFoundError:
                        # A private mapping (pandas 2 without copy-on-write) opens the files
                        # again: a version re-saved or deleted as load() mapped it may be gone.
                        _memo.forget(cache_dir, key)
        raise not_found(key, *places)

    @staticmethod
    def _where(places: list[Path], name: str, *, lexists: bool = False) -> Path | None:
        """The place holding entry ``name`` now (a ``stat`` or a few), or None. ``lexists``:
        any ``NAME.json`` counts, a planted symlink too (delete removes it)."""
        probe = os.path.lexists if lexists else os.path.exists
        for _ in range(FIND_ROUNDS if len(places) > 1 else 1):
            for cache_dir in places:
                if probe(cache_dir / f"{name}.json"):
                    return cache_dir
        return None

    def _hand_out(self, cache_dir: Path, version: _memo.Version, columns: Any) -> Frame:
        with no_gc():
            return self._hand_out_now(cache_dir, version, columns)

    def _hand_out_now(self, cache_dir: Path, version: _memo.Version, columns: Any) -> Frame:
        from . import _frame
        from ._compat import writes_in_place

        ckey = _columns_key(columns)
        if writes_in_place():
            # pandas 2 without copy-on-write edits arrays in place: this frame gets its own
            # copy-on-write mapping (pages stay shared until written), so edits work and reach
            # no other frame, process or the cache.
            private = _store.map_files(version.data_dir, version.meta["files"], version.key,
                                       version.mapped.where, private=True)
            base = _frame.decode(version.meta["layout"], private, columns)
            return _frame.hand_out(base, cache_dir, version, ckey, private=private)
        if ckey not in version.frames and version.first_open(ckey):
            # The first open of these columns decodes a frame for itself and hands it out as
            # is: nothing in it is shared (see _frame.decode), so the owned copy hand_out
            # would make of a kept base is not needed, which on a wide frame is a fifth of
            # the cold open. Only a second open keeps a base to copy from.
            fresh = _frame.decode(version.meta["layout"], version.mapped, columns)
            return _frame.hand_out(fresh, cache_dir, version, ckey, fresh=True)
        return _frame.hand_out(self._base(version, columns), cache_dir, version, ckey)

    @staticmethod
    def _base(version: _memo.Version, columns: Any) -> Frame:
        """The version's private frame over its shared mapping (decoded once per process),
        never handed out as is."""
        ckey = _columns_key(columns)
        base = version.frames.get(ckey)
        if base is None:
            from . import _frame

            base = _frame.decode(version.meta["layout"], version.mapped, columns)
            base = version.frames.setdefault(ckey, base)
        return base

    def _current_token(self, key: str) -> str | None:
        """The version ``key`` holds now, or None."""
        try:
            meta = _store.read_meta(self.dir / f"{entry_name(key)}.json", key)
        except (FileNotFoundError, MmcacheError):
            return None
        return str(meta["token"])

    def _open_version(self, key: str, token: str, columns: Any) -> Frame | None:
        """Open exactly version ``token`` of ``key`` (unpickling a reference), or None."""
        cache_dir = self.dir
        version = _memo.load_version(cache_dir, key, entry_name(key), token)
        if version is None:
            return None
        try:
            return self._hand_out(cache_dir, version, columns)
        except FileNotFoundError:  # its files went just as it was mapped (see _open)
            return None

    def _describe(self, key: str) -> tuple[Entry, list[tuple[str, str]], str, list[Any]]:
        """For ``mmcache info``: the entry, (column, dtype) pairs, the index, the files.

        Reads without counting as a use (last_used is left alone).
        """
        check_key(key)
        # Counted before this process maps the entry itself.
        entry = next((e for e in self.entries() if e.key == key), None)
        if entry is None:
            raise not_found(key, *self._places())
        from . import _frame

        version = _memo.load(entry.cache_dir, key, entry_name(key), use=False)
        obj = _frame.decode(version.meta["layout"], version.mapped, None)
        if isinstance(obj, pd.Series):
            dtypes = [(str(obj.name), str(obj.dtype))]
        else:
            dtypes = [(str(c), str(t)) for c, t in obj.dtypes.items()]
        index = f"{type(obj.index).__name__} ({obj.index.dtype}, {len(obj.index):,} rows)"
        return entry, dtypes, index, version.meta["files"]

    # --- the rest ---------------------------------------------------------------------------

    @_api
    def exists(self, key: str) -> bool:
        """True if ``key`` has an entry (a cheap ``stat``; nothing is read or mapped)."""
        check_key(key)
        return self._where(self._places(), entry_name(key)) is not None

    @_api
    def delete(self, key: str) -> bool:
        """Remove ``key``'s entry; True if there was one. Readers that mapped it keep going
        (the memory returns when the last of them unmaps)."""
        check_key(key)
        places = self._places()
        if len(places) == 1:
            return self._delete(places[0], key, timeout=LOCK_TIMEOUT)
        name = entry_name(key)
        for cache_dir in places:
            _memo.forget(cache_dir, key)
        if self._where(places, name, lexists=True) is None:
            return False  # nothing to delete (a save in progress has not published yet)
        # Under the RAM place's lock, the key's lock in the default cache (see _save_placed):
        # a save moving the key between places cannot slip between the two removals.
        ram, disk = places
        checked_default(ram, create=True)  # the lock's directory
        with locked(ram, name, key, LOCK_TIMEOUT):
            removed = False
            # The older copy first (both exist only after a save killed mid-move): a delete
            # killed between the two removals must not leave the older one as the key.
            for cache_dir in reversed(_newest_first(places, key, name)):
                if cache_dir == ram:
                    removed = _clean.delete_locked(ram, name, key) or removed
                elif os.path.lexists(disk / f"{name}.json"):
                    with locked(disk, name, key, LOCK_TIMEOUT):
                        removed = _clean.delete_locked(disk, name, key) or removed
        return removed

    def _delete(
        self, cache_dir: Path, key: str, *, timeout: float, names: list[str] | None = None,
        unused_since: float | None = None, defer: list[tuple[str, str]] | None = None,
    ) -> bool:
        """Delete under the key's lock; with ``timeout=0`` give up (False) if it is busy.

        ``names``: the key's own file names from the caller's listing of the directory
        (``clean`` lists it once for all keys instead of once per key). ``unused_since``:
        delete only if the entry was not used (or re-saved) at or after that time, checked
        under the lock (an entry chosen by age may have been opened since it was listed).
        ``defer``: a batch's list; the unpublished version is left there to be swept after
        one fresh scan of /proc (see _clean.delete_locked).
        """
        name = entry_name(key)
        _memo.forget(cache_dir, key)
        if not os.path.lexists(cache_dir / f"{name}.json"):
            return False  # nothing to delete (a save in progress has not published yet)
        try:
            with locked(cache_dir, name, key, timeout):
                return _clean.delete_locked(cache_dir, name, key, names, unused_since, defer)
        except LockTimeoutError:
            if timeout == 0:
                return False
            raise

    @_api
    def entries(self) -> list[Entry]:
        """Every complete entry, oldest first, with sizes and times (reads only metadata)."""
        return _clean.entries(self)

    @_api
    def clean(
        self,
        keys: str | Sequence[str] | None = None,
        *,
        older_than: float | str | dt.timedelta | None = None,
        max_bytes: int | str | None = None,
        dry_run: bool = False,
    ) -> list[Entry]:
        """Remove entries and every stale leftover; return the entries removed.

        With no selector every entry goes. ``keys`` limits to those keys; ``older_than``
        (seconds, a timedelta or ``"2h"``) to entries not used for that long; ``max_bytes``
        (bytes or ``"10GB"``) evicts least recently used entries until the rest fits, entries
        mapped by live processes last. ``dry_run`` removes nothing and returns
        what would go. Leftovers of killed saves are removed only when no live process holds
        their key's lock, so a save in progress is never touched. Only names mmcache writes
        are removed (see ``_paths.own_name``): other files in the directory are never touched.
        Cost: one listing of the directory and one /proc scan, whatever the number of entries.
        """
        if isinstance(keys, str):
            keys = [keys]
        return self._clean_report(
            keys,
            None if older_than is None else _duration_arg(older_than),
            None if max_bytes is None else _size_arg(max_bytes, "max_bytes"),
            dry_run,
        ).entries

    @_api
    def _clean_report(
        self, keys: Sequence[str] | None, older_than: float | None, max_bytes: int | None,
        dry_run: bool, *, stale_only: bool = False,
    ) -> _clean.Cleaned:
        """For ``mmcache clean``: :meth:`clean`, also saying which damaged entries and
        leftovers went (or would go)."""
        return _clean.clean(self, keys, older_than, max_bytes, dry_run, stale_only=stale_only)

    @_api
    def _survey(self) -> Survey:
        """For ``mmcache ls``: entries, damaged entries and leftovers (changes nothing),
        of both default places together when the cache has two."""
        return merged([survey(d) for d in self._places()])

    @_api
    def share(self, obj: Frame) -> Entry:
        """Save ``obj`` under a fresh unique key; use as ``with cache.share(df) as ref:``.

        The entry lives until the block exits (also on an exception), then it is deleted.
        """
        return self.save(obj, f"share-{uuid.uuid4().hex}")


def _columns_arg(key: str, columns: Any) -> list[Any] | None:
    """``columns=`` as a list of labels, or None; raise InvalidArgumentError if it is not."""
    if columns is None:
        return None
    if isinstance(columns, str | bytes) or not isinstance(columns, Iterable):
        raise InvalidArgumentError(
            f"columns= takes a list of column labels, got {columns!r}", key=key
        )
    columns = list(columns)
    for label in columns:
        if not isinstance(label, Hashable):
            raise InvalidArgumentError(
                f"columns= holds {label!r}, which cannot be a column label; pass a "
                "flat list of labels",
                key=key,
            )
    return columns


def _size_arg(value: object, what: str) -> int:
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise InvalidArgumentError(f"{what}={value!r}: {exc}") from None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise InvalidArgumentError(
        f"{what} takes a number of bytes or a size like '10GB', got {value!r}"
    )


def _duration_arg(value: object) -> float:
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise InvalidArgumentError(f"older_than={value!r}: {exc}") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        seconds = -1.0
    if not seconds >= 0:
        raise InvalidArgumentError(
            f"older_than takes seconds, a timedelta or a duration like '2h', got {value!r}"
        )
    return seconds


def _newest_first(places: list[Path], key: str, name: str) -> list[Path]:
    """The default places, the one holding the newer save of ``key`` first: a save killed
    while moving a key between them leaves it in both until the key's next save or delete,
    and the newer one is what that save published. Only when both hold it (2 stats, else)
    is the metadata read: its ``created`` time, as listings compare (file times can be
    coarser than the time between two saves)."""
    found = [d for d in places if os.path.exists(d / f"{name}.json")]
    if len(found) < 2:
        return found + [d for d in places if d not in found]

    def created(d: Path) -> float:
        try:
            return float(_store.read_meta(d / f"{name}.json", key)["created"])
        except (OSError, MmcacheError, KeyError, TypeError, ValueError):
            return float("-inf")

    return sorted(places, key=created, reverse=True)
