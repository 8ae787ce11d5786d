"""Listing and freeing the cache: entries, clean, stale leftovers, the size limit.

Everything here reads or removes what saves left; nothing here writes an entry. Three rules:

- **Only mmcache's own names** (:func:`_paths.own_name`, :func:`_paths.own_data_file`) are
  ever removed: a cache directory that also holds other files, or is reached through a
  symlink, never loses them; a data directory holding anything else is left in place.
- **Removal happens under the key's lock** (see _lock), so a save in progress is never
  touched, and a lock file is unlinked only by its holder as its last act.
- **A version's data that a live process still maps is kept** (its memory would not return
  anyway, and a frame pickled by reference from it must still unpickle to exactly it).

What the directory holds is read by _survey (one listing per call); a clean scans ``/proc``
twice at most: before choosing, and after unpublishing what it removes.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import _store
from ._entry import Entry
from ._errors import CacheDirError, CorruptEntryError, MmcacheError, UnsupportedFormatError
from ._inuse import mapping_pids, one_scan, rescan
from ._lock import KeyLock
from ._paths import check_key, entry_name, own_data_file, own_name, own_type
from ._survey import (
    Problem,
    Stray,
    data_bytes,
    data_damage,
    entry_sizes,
    newest_per_key,
    own_data_type,
    own_names,
    summarise,
    survey,
)

if TYPE_CHECKING:
    from ._cache import Cache



# --- the verbs ---------------------------------------------------------------------------------


def entries(cache: Cache) -> list[Entry]:
    """Every complete entry, oldest first, with sizes and times (reads only metadata); of
    both default places together when the cache has two."""
    return newest_per_key([e for d in cache._places() for e in survey(d, strays=False).entries])


@dataclass
class Cleaned:
    """What :func:`clean` removed (or, dry, would remove)."""

    entries: list[Entry]
    damaged: list[Problem]
    stale: list[Stray]
    nbytes_before: int  # all of mmcache's bytes in the directory (or both places) before
    # Chosen entries left because their lock's name holds something mmcache never creates
    # there (a directory, a FIFO): the key cannot be locked.
    skipped: list[Entry] = field(default_factory=list)


def clean(
    cache: Cache,
    keys: Sequence[str] | None,
    older_than: float | None,
    max_bytes: int | None,
    dry_run: bool,
    *,
    stale_only: bool = False,
) -> Cleaned:
    """See :meth:`Cache.clean` (arguments already parsed). ``stale_only``: no entry that
    opens, only damaged entries and leftovers.

    A dry run lists exactly what the real run removes: with ``keys``, the leftovers of those
    keys (a killed save's data, its metadata being written) go with them, as deleting a key
    sweeps all of its names. The real run reports what is gone afterwards, not what it
    meant to remove. Cost: linear in the number of names in the directory.
    """
    listed_at = time.time()
    with one_scan():
        # Each place of the cache (the default cache has two: RAM, then disk) is surveyed;
        # entries are chosen across all of them (one size limit, one LRU order), and each is
        # removed in its own directory under that directory's lock.
        surveys = {d: survey(d) for d in cache._places()}
        listed = [e for s in surveys.values() for e in s.entries]
        every = newest_per_key(listed)  # one per key, oldest first
        # A save killed while moving a key between the two places left it in both: the older
        # copy is a leftover (never chosen as the key, never counted), removed below.
        newest = {id(e) for e in every}
        superseded = [e for e in listed if id(e) not in newest]
        chosen = [] if stale_only else every
        damaged = [p for s in surveys.values() for p in s.problems if p.kind == "damaged"]
        wanted: set[str] = set()
        stems: set[str] = set()
        selector = older_than is None and max_bytes is None
        if keys is not None:
            wanted = {check_key(k) for k in keys}
            chosen = [e for e in chosen if e.key in wanted]
            if selector:
                stems = {entry_name(k) for k in wanted}
            damaged = [p for p in damaged if p.name in stems]
        unused_since = None  # chosen by use: re-checked under each key's lock
        if older_than is not None:
            unused_since = cutoff = time.time() - older_than
            chosen = [e for e in chosen if e.last_used.timestamp() < cutoff]

        def blocked(e: Entry) -> bool:
            return entry_name(e.key) in surveys[e.cache_dir].blocked

        # A key whose lock name is taken by something not mmcache's cannot be locked: left.
        skipped = [e for e in chosen if blocked(e)]
        if skipped:
            chosen = [e for e in chosen if not blocked(e)]
        if max_bytes is not None:
            skipped = []  # not chosen: the limit is met with others
            unused_since = listed_at if unused_since is None else min(unused_since, listed_at)
            total = sum(e.nbytes for e in every)
            lru = sorted(chosen, key=lambda e: (bool(e.in_use), e.last_used))
            chosen = []
            for e in lru:
                if total <= max_bytes:
                    break
                chosen.append(e)
                total -= e.nbytes
        all_stale = [x for s in surveys.values() for x in s.stale]
        if keys is None:
            stale = all_stale
        else:  # the named keys' leftovers, and those of entries chosen by age or size
            stems |= {entry_name(e.key) for e in chosen}
            stale = [x for x in all_stale if _stem(x) in stems]
            superseded = [e for e in superseded if entry_name(e.key) in stems]
        older = {id(e): Stray(
            e.cache_dir / f"{entry_name(e.key)}.json", e.nbytes,
            f"older copy of key {e.key!r}, left in both places by a save killed while moving "
            "it between RAM and disk (the newer copy stays)") for e in superseded}
        reported = [*stale, *older.values()]
        nbytes_before = sum(s.nbytes for s in surveys.values())
        if dry_run:
            return Cleaned(chosen, damaged, reported, nbytes_before, skipped)
        deferred: dict[Path, list[tuple[str, str]]] = {d: [] for d in surveys}
        for e in superseded:  # unless re-saved since the listing (then it is the newer one)
            _delete_or_skip(cache, e.cache_dir, e.key,
                            names=surveys[e.cache_dir].names.get(entry_name(e.key)),
                            unused_since=listed_at, defer=deferred[e.cache_dir])
        removed = [e for e in chosen if _delete_or_skip(
            cache, e.cache_dir, e.key, names=surveys[e.cache_dir].names.get(entry_name(e.key)),
            unused_since=unused_since, defer=deferred[e.cache_dir],
        )]
        gone: list[Problem] = []
        for cache_dir, s in surveys.items():
            _sweep_deferred(cache_dir, deferred[cache_dir])
            done = {entry_name(e.key) for e in removed if e.cache_dir == cache_dir}
            by_name = {p.name: p for p in damaged if p.path.parent == cache_dir}
            if keys is not None and selector:
                # Named keys that do not list (damaged, a newer format): delete() copes.
                for k in wanted - {e.key for e in s.entries}:
                    name = entry_name(k)
                    if name in s.names and name not in s.blocked and cache._delete(
                        cache_dir, k, timeout=cache.lock_timeout, names=s.names[name]
                    ):
                        done.add(name)
                        if name in by_name:
                            gone.append(by_name[name])
            # Damaged entries not named by key, and leftovers of keys not deleted above.
            todo = {_stem(x) for x in stale if x.path.parent == cache_dir}
            if keys is None:
                todo |= by_name.keys()
            for stem in sorted(todo - done):
                if stem in s.blocked:
                    continue
                is_damaged = stem in by_name
                if _remove_stale(cache_dir, stem, s.names.get(stem, []), damaged=is_damaged) \
                        and is_damaged and not os.path.lexists(cache_dir / f"{stem}.json"):
                    gone.append(by_name[stem])
        left = [y for y in (_removed(x) for x in reported) if y is not None]
    return Cleaned(removed, gone, left, nbytes_before, skipped)


def _removed(x: Stray) -> Stray | None:
    """``x`` as removed, or None if it was left (mapped, locked, or swapped meanwhile). A
    data directory that also held files not mmcache's stays, emptied of mmcache's files."""
    if not os.path.lexists(x.path):
        return x
    if x.is_dir and x.nbytes and not data_bytes(x.path)[1]:
        return replace(x, what=f"{x.what}; the directory stays: it holds files not mmcache's")
    return None


def _delete_or_skip(
    cache: Cache, cache_dir: Path, key: str, names: list[str] | None,
    unused_since: float | None, defer: list[tuple[str, str]],
) -> bool:
    """One key of a clean: a key whose lock cannot be taken at all (a directory planted in
    place of its lock file) is skipped, not allowed to stop the clean of every other key."""
    if not _lock_usable(cache_dir, entry_name(key)):
        return False
    try:
        return cache._delete(cache_dir, key, timeout=cache.lock_timeout, names=names,
                             unused_since=unused_since, defer=defer)
    except CacheDirError:
        return False


def _lock_usable(cache_dir: Path, stem: str) -> bool:
    """False if ``stem``'s lock name holds something mmcache never creates there (a
    directory, a FIFO, a device): the key cannot be locked, so nothing of it is touched."""
    try:
        mode = os.lstat(cache_dir / f"{stem}.lock").st_mode
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return own_type("lock", mode)


def _stem(stray: Stray) -> str:
    return own_name(stray.path.name)[0]  # type: ignore[index]


def fit_limit(cache: Cache, places: list[Path], key: str, nbytes: int, limit: int) -> None:
    """Evict least recently used entries until ``nbytes`` more fit under ``limit``.

    The limit counts every place of the cache together (the default cache's RAM and disk
    places): it caps what the cache holds, wherever an entry went. Entries mapped by live
    processes go last: removing them frees nothing until those processes exit. Victims whose
    lock is busy are skipped, never waited for, so two saving processes cannot deadlock
    evicting each other's keys. Cost when nothing must go: one listing and one ``lstat`` per
    entry (metadata is re-read only when it changed); /proc is scanned only when something
    must go.
    """
    # The key's own entry is about to be replaced (and removed from the other place).
    held = sum(n for d in places for k, n in entry_sizes(d).items() if k != key)
    if held + nbytes <= limit:
        return
    with one_scan():
        surveys = {d: survey(d, users=False, strays=False) for d in places}
        others = [e for s in surveys.values() for e in s.entries if e.key != key]
        total = sum(e.nbytes for e in others)
        in_use: dict[int, int] = {}
        for d, s in surveys.items():
            pids = mapping_pids(d) or {}
            for e in s.entries:
                in_use[id(e)] = len(pids.get(s.data.get(entry_name(e.key), ""), ()))
        deferred: dict[Path, list[tuple[str, str]]] = {d: [] for d in places}
        for victim in sorted(others, key=lambda e: (bool(in_use[id(e)]), e.last_used)):
            if total + nbytes <= limit:
                break
            cache_dir = victim.cache_dir
            s = surveys[cache_dir]
            name = entry_name(victim.key)
            if name in s.blocked or not _lock_usable(cache_dir, name):
                continue  # its lock name is not mmcache's: the key cannot be locked
            if cache._delete(cache_dir, victim.key, timeout=0, names=s.names.get(name),
                             defer=deferred[cache_dir]):
                total -= victim.nbytes
        for d in places:
            _sweep_deferred(d, deferred[d])


# --- removal (always under the key's lock) -------------------------------------------------------


def _remove_stale(
    cache_dir: Path, stem: str, names: list[str], *, damaged: bool = False
) -> bool:
    """Remove ``stem``'s names that no entry uses, if its lock is free right now.

    ``damaged``: the entry was listed as damaged: its metadata goes too if, checked again
    under the lock, the entry still cannot be opened (its metadata or a data file is bad).

    False (nothing done) when the lock is held, i.e. a save of that key is in progress, or
    cannot be taken (another user's, or its name holds a directory or FIFO, which are not
    mmcache's). A planted symlink in place of the lock file is removed first: nobody can hold
    it (locks are opened with O_NOFOLLOW), and it blocks the key.
    """
    lock_path = cache_dir / f"{stem}.lock"
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.lstat(lock_path).st_mode):
            os.unlink(lock_path)
    if not _lock_usable(cache_dir, stem):
        return False
    lock = KeyLock(lock_path)
    try:
        if not lock.acquire(0):
            return False
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP, errno.EISDIR):
            return False  # not ours to touch, or a symlink planted again meanwhile
        raise
    try:
        sweep(cache_dir, stem, [cache_dir / n for n in names], check_data=damaged)
    finally:
        lock.release_key()
    return True


# How long a process letting go of an old version waits for its key's lock. Others letting
# go of it at the same moment hold it for a /proc scan each; waiting (not giving up) lets the
# last of them, which sees nobody mapping it, remove the files. A save holding it longer
# sweeps old versions itself once it is done.
RELEASE_WAIT = 1.0


def release_version(cache_dir: Path, name: str, data: str, *, ignore_self: bool) -> None:
    """Remove the old version ``data`` of ``name`` if no process maps it (``ignore_self``:
    but this one, which is exiting)."""
    if not _lock_usable(cache_dir, name):
        return  # a directory or FIFO under the lock's name: the key cannot be locked
    lock_path = cache_dir / f"{name}.lock"
    if KeyLock.held_here(lock_path):
        return  # this process is saving or deleting the key: that sweeps (and never waits)
    lock = KeyLock(lock_path)
    if not lock.acquire(RELEASE_WAIT):
        return
    try:
        sweep(cache_dir, name, [cache_dir / data],
              ignore_pid=os.getpid() if ignore_self else 0)
    finally:
        lock.release_key()


def sweep(
    cache_dir: Path, name: str, paths: list[Path], *, ignore_pid: int = 0,
    check_data: bool = False,
) -> list[str]:
    """With ``name``'s lock held: remove the paths its metadata does not point to, except
    data directories that live processes still map (a later sweep removes them), and except
    anything that is not one of ``name``'s own names (of the file type mmcache gives it).
    Returns the names removed.

    Damaged metadata is removed (the entry cannot be opened anyway); with ``check_data``,
    so is metadata whose data files are missing or of the wrong size. A ``NAME.json`` that
    is not a regular file or symlink (a directory, a FIFO) is not mmcache's: never opened,
    never removed. The lock file itself is left to the lock's holder (see _lock: unlinking it
    is safe only as the holder's last act).
    """
    meta_path = cache_dir / f"{name}.json"
    live = None
    try:
        mode = os.lstat(meta_path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and stat.S_ISLNK(mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(meta_path)  # a planted symlink: nobody's entry
    elif mode is not None and stat.S_ISREG(mode):
        try:
            meta = _store.read_meta(meta_path, None)
            if check_data:
                summary = summarise(name, os.fspath(meta_path), meta)
                if data_damage(os.fspath(cache_dir), summary.data, summary.files):
                    raise CorruptEntryError("its data is damaged", path=meta_path)
            live = meta["data"]
        except FileNotFoundError:
            pass
        except UnsupportedFormatError:
            return []  # a newer mmcache's entry: leave all of it
        except MmcacheError:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(meta_path)  # damaged: the entry cannot be opened anyway
    users: dict[str, set[int]] | None = None
    removed = []
    for path in paths:
        own = own_name(path.name)
        if (own is None or own[0] != name or own[1] in ("meta", "lock") or path.name == live
                or path.parent != cache_dir):
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not own_type(own[1], st.st_mode):
            continue  # a directory named NAME.json.TOKEN.tmp, a FIFO: not mmcache's
        if stat.S_ISDIR(st.st_mode):
            if users is None:
                users = mapping_pids(cache_dir) or {}
            if users.get(path.name, set()) - {ignore_pid}:
                continue  # still mapped: a pickled reference to it must still open
            remove_data_dir(path)
            if not os.path.lexists(path):
                removed.append(path.name)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path.name)
    return removed


def versions(cache_dir: Path, name: str) -> list[Path]:
    """Every data directory of ``name`` on disk (current, old or left by a killed save)."""
    return [p for p in cache_dir.glob(f"{name}.*") if p.is_dir() and not p.is_symlink()]


def remove_data_dir(path: Path) -> int:
    """Remove a data directory: the files mmcache writes in it (``<n>.npy``, ``meta.json``),
    then the directory if that emptied it. Anything else inside is left, and so is the
    directory holding it. Returns the bytes freed.

    Never follows a symlink: the directory is opened with O_NOFOLLOW and its files unlinked
    relative to it. Out of descriptors, it still removes ``0.npy``, ``1.npy``, ... so a
    delete that already unpublished the entry does not leave its data behind: relative to the
    directory's descriptor when it could be opened (only listing it failed), else by path,
    and then only while ``lstat`` shows the path is still that same real directory.
    """
    freed = 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            return 0  # gone, a symlink, not a directory, or not ours to read: leave it
        return _remove_numbered(path, None)
    try:
        try:
            names = os.listdir(fd)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                return 0
            return _remove_numbered(path, fd)
        for name in names:
            if not own_data_file(name):
                continue
            size = _unlink_sized(name, fd)
            if size is not None:
                freed += size
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(path)  # fails when something that is not mmcache's is left inside
    return freed


def _remove_numbered(path: Path, fd: int | None) -> int:
    """No descriptor to list the directory with: data files are numbered 0..n-1, so unlink
    by name up to the first missing number, then meta.json. With ``fd`` (the directory,
    opened without following links) relative to it; else by path, each unlink only after an
    ``lstat`` shows ``path`` is still the real directory first seen (never a symlink)."""
    if fd is None:
        try:
            first = os.lstat(path)
        except OSError:
            return 0
        if not stat.S_ISDIR(first.st_mode):
            return 0  # a symlink (or anything else) in place of the directory: leave it

        def unlink(name: str) -> int | None:
            try:
                now = os.lstat(path)
            except OSError:
                return None
            if not stat.S_ISDIR(now.st_mode) or \
                    (now.st_dev, now.st_ino) != (first.st_dev, first.st_ino):
                return None  # swapped meanwhile
            return _unlink_sized(os.path.join(path, name), None)
    else:
        def unlink(name: str) -> int | None:
            return _unlink_sized(name, fd)

    freed = 0
    for i in itertools.count():
        size = unlink(f"{i}.npy")
        if size is None:
            break
        freed += size
    freed += unlink("meta.json") or 0
    with contextlib.suppress(OSError):
        os.rmdir(path)
    return freed


def _unlink_sized(name: str, dir_fd: int | None) -> int | None:
    """Unlink a data file (relative to ``dir_fd`` if given) if it is a regular file or a
    symlink (mmcache writes regular files; a directory or FIFO under the name is not its);
    its size, or None when it is not there or was left."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not own_data_type(st.st_mode):
            return None
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        return None
    return st.st_size


def delete_locked(
    cache_dir: Path, name: str, key: str, names: list[str] | None = None,
    unused_since: float | None = None, defer: list[tuple[str, str]] | None = None,
) -> bool:
    """With ``name``'s lock held: unpublish the entry, then sweep its versions.

    ``names``: the key's own names from a listing made by the caller (``clean`` lists the
    directory once for all keys); else the directory is listed here. A ``NAME.json`` that is
    not a regular file or symlink (a directory, a FIFO) is not mmcache's: nothing is done.
    """
    meta_path = cache_dir / f"{name}.json"
    try:
        st = os.lstat(meta_path)
    except FileNotFoundError:
        return False
    if not own_type("meta", st.st_mode):
        return False
    if unused_since is not None and st.st_atime >= unused_since:
        return False  # used (or re-saved) since it was chosen: keep it
    data = None
    try:
        data = _store.read_meta(meta_path, key)["data"]
    except FileNotFoundError:
        return False
    except MmcacheError:
        pass
    os.unlink(meta_path)
    if names is None:
        names = own_names(cache_dir).get(name, [])
    if isinstance(data, str) and data not in names:
        names = [*names, data]  # saved after the caller's listing
    if defer is not None and isinstance(data, str):
        # Part of a batch that scanned /proc once, before this version stopped being
        # current: a process may have mapped it since. The batch sweeps it after one fresh
        # scan (see clean and fit_limit).
        names = [n for n in names if n != data]
        defer.append((name, data))
    sweep(cache_dir, name, [cache_dir / n for n in names])
    return True


def _sweep_deferred(cache_dir: Path, deferred: list[tuple[str, str]]) -> None:
    """Versions a batch unpublished: sweep them after one fresh scan of /proc."""
    if not deferred:
        return
    rescan(cache_dir)
    for name, data in deferred:
        _remove_stale(cache_dir, name, [data])
