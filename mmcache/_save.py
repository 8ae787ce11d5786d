"""Writing an entry: where it goes (RAM, else the disk place, for the default cache), room
for it (size limit, free space), the write itself and its publication under the key's lock.

``Cache.save`` and ``Cache.open(build=)`` call :func:`make_room` before taking the lock (fail
fast, leave nothing), then :func:`write` with it held.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _clean, _memo, _store
from ._entry import Entry, entry_from_meta
from ._errors import CacheDirError, CacheFullError, MmcacheWarning
from ._lock import locked
from ._paths import ENV_DIR, ENV_SHM, checked_default, default_places, is_default
from ._units import human

ENV_MAX_BYTES = "MMCACHE_MAX_BYTES"
# How long save() waits for another process saving the same key. Saving even several GB to
# tmpfs takes seconds; ten minutes means the holder is stuck, and saying so beats hanging.
LOCK_TIMEOUT = 600.0
Fill = Callable[[Path], None]
Room = Callable[[Path], int]
# Set once this process has warned that an entry did not fit in RAM (warn once, not per save).
_fallback_warned = False


def make_room(cache: Any, places: list[Path], key: str, pool: _store.Pool) -> list[Any]:
    """Plan the files; evict for max_bytes and check free space, or raise CacheFullError.

    With two default places, the entry must fit in one of them.
    """
    files = _store.plan_files(pool)
    nbytes = sum(f["size"] for f in files)
    _fit_limit(cache, places, key, nbytes)
    try:
        _store.check_room(places[0], nbytes, key)
    except CacheFullError as full:
        if len(places) == 1:
            _disk_place_refused(cache, full)
            raise
        try:
            _store.check_room(_existing(places[1]), nbytes, key)
        except CacheFullError:
            raise _both_full(places, key, nbytes) from None
    return files


def write(
    places: list[Path], name: str, key: str, layout: dict[str, Any], pool: _store.Pool,
    files: list[Any], *, fill: Fill | None = None, room: Room | None = None,
) -> Entry:
    """With the key's lock held (in ``places[0]``): write the entry in the first place
    it fits in, then remove the key from the other place, if any.

    Two default places: RAM, and disk for what does not fit in RAM, up front (the free
    space check) or while writing (ENOSPC: what was written is removed first). Every
    save and delete of the default cache takes the RAM place's lock first, so two
    processes saving one key, one to each place, take turns, and a key ends in one place.
    Writing or removing anything in the disk place also takes that directory's own lock
    for the key, always after the RAM one (one order: no deadlock), because single-
    directory work there (clean of leftovers, a process letting go of an old version,
    ``Entry.delete``) knows only that lock. The new entry is published before the old
    place's is unpublished, so a reader looking in both always finds one (see
    FIND_ROUNDS); a reader that mapped the old one keeps it intact (it is swept like any
    old version: only once no live process maps it).

    ``fill(data_dir)`` writes the files instead of ``_store.write_data`` and ``room(place)``
    says how many bytes that needs free in a place (``ingest`` moves staged files).
    """
    if len(places) == 1:
        return _write_one(places[0], name, key, layout, pool, files, fill, room)
    ram, disk = places
    with contextlib.ExitStack() as held:
        disk_locked = False

        def lock_disk() -> None:
            nonlocal disk_locked
            if not disk_locked:
                checked_default(disk, create=True)  # made (0700) by the first save there
                held.enter_context(locked(disk, name, key, LOCK_TIMEOUT))
                disk_locked = True

        try:
            entry = _write_one(ram, name, key, layout, pool, files, fill, room)
            other = disk
        except CacheFullError as full:
            nbytes = sum(f["size"] for f in files)
            free = _free_bytes(ram)
            lock_disk()
            try:
                entry = _write_one(disk, name, key, layout, pool, files, fill, room)
            except CacheFullError:
                raise _both_full(places, key, nbytes) from full
            other = ram
            _warn_fallback(ram, disk, key, nbytes, free)
        _memo.forget(other, key)
        if os.path.lexists(other / f"{name}.json"):
            if other == disk:
                lock_disk()
            _clean.delete_locked(other, name, key)
        return entry


def _write_one(
    cache_dir: Path, name: str, key: str, layout: dict[str, Any], pool: _store.Pool,
    files: list[Any], fill: Fill | None = None, room: Room | None = None,
) -> Entry:
    nbytes = sum(f["size"] for f in files)
    # again: others may have saved meanwhile
    _store.check_room(cache_dir, nbytes if room is None else room(cache_dir), key)
    meta_path = cache_dir / f"{name}.json"
    old = os.path.lexists(meta_path)
    token = _store.new_token()
    data_dir = cache_dir / f"{name}.{token}"
    now = time.time()
    meta = {
        "format": _store.format_of(layout),
        "key": key,
        "token": token,
        "data": data_dir.name,
        "created": now,
        "nbytes": nbytes,
        "files": files,
        "layout": layout,
    }
    try:
        if fill is None:
            _store.write_data(data_dir, pool, files)
        else:
            fill(data_dir)
        meta_bytes = _store.publish_meta(cache_dir, name, token, meta,
                                          data_dir / _memo.VERSION_META)
    except BaseException as exc:
        _clean.remove_data_dir(data_dir)
        # write() errors carry no file name: say which directory filled up here.
        if isinstance(exc, OSError) and (full := _store.full_error(exc, key, cache_dir)):
            raise full from exc
        raise
    if old:
        # Every older version of the key goes, except those live processes still map.
        _clean.sweep(cache_dir, name, _clean.versions(cache_dir, name))
    return entry_from_meta(meta_path, meta, now, meta_bytes)


def _fit_limit(cache: Any, places: list[Path], key: str, nbytes: int) -> None:
    """Evict for the size limit, which counts every place of the cache together."""
    limit = cache.max_bytes
    if limit is None:
        return
    if nbytes > limit:
        raise CacheFullError(
            f"cannot save key {key!r}: it needs {human(nbytes)}, more than the "
            f"cache's size limit of {human(limit)} (max_bytes / ${ENV_MAX_BYTES}); "
            "raise the limit",
            key=key, path=places[0],
        )
    _clean.fit_limit(cache, places, key, nbytes, limit)


def _existing(path: Path) -> Path:
    """``path``, or its parent while it does not exist yet (for ``statvfs``)."""
    return path if os.path.lexists(path) else path.parent


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _both_full(places: list[Path], key: str, nbytes: int) -> CacheFullError:
    ram, disk = places
    return CacheFullError(
        f"cannot save key {key!r}: it needs {human(nbytes)}, but the RAM cache {str(ram)!r} "
        f"has {human(_free_bytes(ram))} free and the disk-backed fallback {str(disk)!r} has "
        f"{human(_free_bytes(disk))}; free space with `mmcache clean`, start the container "
        f"with a bigger --shm-size, or set {ENV_DIR} to a directory on a bigger file system",
        key=key, path=ram,
    )


def _warn_fallback(ram: Path, disk: Path, key: str, nbytes: int, free: int) -> None:
    """Say, once per process, that an entry did not fit in RAM and went to disk."""
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    warnings.warn(
        f"the RAM cache {str(ram)!r} has only {human(free)} free, so key {key!r} "
        f"({human(nbytes)}) was saved to {str(disk)!r} instead: on disk, processes still "
        "share one copy through the page cache, but saving is slower and the kernel may "
        "write it out and read it back under memory pressure. Give the RAM cache room: "
        "start the container with a bigger --shm-size (Docker's /dev/shm is 64 MB), or set "
        f"{ENV_DIR} to a directory with room (${ENV_SHM} to another RAM file system). "
        "This warning is shown once per process; entries that fit still go to RAM.",
        MmcacheWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside mmcache."""
    package = os.path.dirname(__file__) + os.sep
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def _disk_place_refused(cache: Any, full: CacheFullError) -> None:
    """Raise why the default cache's disk place cannot take an entry RAM has no room for,
    if it was left out as unsafe (see resolve_places); else return."""
    if not is_default(cache._given):
        return
    places = default_places()
    if len(places) > 1:
        try:
            checked_default(places[1], create=False)
        except CacheDirError as exc:
            raise CacheDirError(f"{full.message}; the disk-backed fallback cannot be used: "
                                f"{exc.message}", key=full.key, path=places[1]) from full
