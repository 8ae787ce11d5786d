"""Listing and freeing the cache: entries, clean, stale leftovers, the size limit.

Everything here reads or removes what saves left; nothing here writes an entry. Removal is
always done under the key's lock (see _lock), so a save in progress is never touched, and
never removes a version's data that a live process still maps (its memory would not return
anyway, and a frame pickled by reference from it must still unpickle to exactly it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import _store
from ._entry import Entry, entry_from_meta
from ._errors import MmcacheError, UnsupportedFormatError
from ._inuse import mapping_pids
from ._lock import KeyLock
from ._paths import check_key

if TYPE_CHECKING:
    from ._cache import Cache


def entries(cache: Cache) -> list[Entry]:
    """Every complete entry, oldest first, with sizes and times (reads only metadata)."""
    cache_dir = cache.dir
    users = mapping_pids(cache_dir)
    out = []
    for path in cache_dir.glob("*.json"):
        try:
            st = os.stat(path)
            meta = _store.read_meta(path, None)
        except (FileNotFoundError, PermissionError, MmcacheError):
            continue  # gone, someone else's, or damaged: not a listable entry
        in_use = None if users is None else len(users.get(str(meta["data"]), ()))
        out.append(entry_from_meta(path, meta, st.st_atime, st.st_size, in_use))
    out.sort(key=lambda e: e.created)
    return out


def clean(
    cache: Cache,
    keys: Sequence[str] | None,
    older_than: float | None,
    max_bytes: int | None,
    dry_run: bool,
) -> list[Entry]:
    """See :meth:`Cache.clean` (arguments already parsed)."""
    cache_dir = cache.dir
    all_entries = entries(cache)
    chosen = all_entries
    if keys is not None:
        wanted = {check_key(k) for k in keys}
        chosen = [e for e in chosen if e.key in wanted]
        if not dry_run and older_than is None and max_bytes is None:
            # Entries entries() cannot read (damaged metadata) go too: delete() copes.
            for k in wanted - {e.key for e in chosen}:
                cache._delete(cache_dir, k, timeout=cache.lock_timeout)
    if older_than is not None:
        cutoff = time.time() - older_than
        chosen = [e for e in chosen if e.last_used.timestamp() < cutoff]
    if max_bytes is not None:
        total = sum(e.nbytes for e in all_entries)
        lru = sorted(chosen, key=lambda e: (bool(e.in_use), e.last_used))
        chosen = []
        for e in lru:
            if total <= max_bytes:
                break
            chosen.append(e)
            total -= e.nbytes
    if dry_run:
        return chosen
    removed = [e for e in chosen if cache._delete(cache_dir, e.key, timeout=cache.lock_timeout)]
    if keys is None:
        remove_leftovers(cache_dir, None)
    return removed


def fit_limit(cache: Cache, cache_dir: Path, key: str, nbytes: int, limit: int) -> None:
    """Evict least recently used entries until ``nbytes`` more fit under ``limit``.

    Entries mapped by live processes go last: removing them frees nothing until those
    processes exit. Victims whose lock is busy are skipped, never waited for, so two
    saving processes cannot deadlock evicting each other's keys.
    """
    others = [e for e in entries(cache) if e.key != key]
    total = sum(e.nbytes for e in others)
    for victim in sorted(others, key=lambda e: (bool(e.in_use), e.last_used)):
        if total + nbytes <= limit:
            return
        if cache._delete(cache_dir, victim.key, timeout=0):
            total -= victim.nbytes


def remove_leftovers(cache_dir: Path, name: str | None) -> None:
    """Remove data directories and temp files that no metadata points to.

    Safe against live saves: a leftover is removed only while holding its key's lock,
    which a saving process holds for the whole save (and the kernel releases if it dies).
    """
    pattern = f"{name}.*" if name else "*"
    groups: dict[str, list[Path]] = {}
    for path in cache_dir.glob(pattern):
        stem, _, rest = path.name.partition(".")
        if not rest:
            continue
        if path.is_symlink() and rest in ("json", "lock"):
            path.unlink()  # planted: mmcache never creates links, and never follows one
            continue
        if rest == "json":
            try:
                _store.read_meta(path, None)
                continue
            except FileNotFoundError:
                continue
            except UnsupportedFormatError:
                continue  # a newer mmcache's entry: not ours to judge
            except MmcacheError:
                pass  # damaged: removed below, under the key's lock
        elif rest == "lock" and (cache_dir / f"{stem}.json").exists():
            continue
        groups.setdefault(stem, []).append(path)
    for stem, paths in groups.items():
        lock = KeyLock(cache_dir / f"{stem}.lock")
        try:
            if not lock.acquire(0):
                continue  # a live process is saving this key
        except PermissionError:
            continue  # not ours to touch
        try:
            sweep(cache_dir, stem, paths)
        finally:
            lock.release(unlink=not (cache_dir / f"{stem}.json").exists())


def release_version(cache_dir: Path, name: str, data: str) -> None:
    """Remove the old version ``data`` of ``name`` if no process but this one maps it and
    the key's lock is free (never waits: a busy lock means a save or delete that sweeps)."""
    lock = KeyLock(cache_dir / f"{name}.lock")
    if not lock.acquire(0):
        return
    try:
        sweep(cache_dir, name, [cache_dir / data], ignore_pid=os.getpid())
    finally:
        lock.release(unlink=not (cache_dir / f"{name}.json").exists())


def sweep(cache_dir: Path, name: str, paths: list[Path], *, ignore_pid: int = 0) -> None:
    """With ``name``'s lock held: remove the paths its metadata does not point to, except
    data directories that live processes still map (a later sweep removes them).

    The lock file itself is left to the lock's holder (see _lock: unlinking it is safe only
    as the holder's last act).
    """
    meta_path = cache_dir / f"{name}.json"
    try:
        live = _store.read_meta(meta_path, None)["data"]
    except FileNotFoundError:
        live = None
    except UnsupportedFormatError:
        return  # a newer mmcache's entry: leave all of it
    except MmcacheError:
        live = None
        meta_path.unlink(missing_ok=True)  # damaged: the entry cannot be opened anyway
    lock = cache_dir / f"{name}.lock"
    users: dict[str, set[int]] | None = None
    for path in paths:
        if path.name == live or path in (meta_path, lock):
            continue
        if path.is_dir() and not path.is_symlink():
            if users is None:
                users = mapping_pids(cache_dir) or {}
            if users.get(path.name, set()) - {ignore_pid}:
                continue  # still mapped: a pickled reference to it must still open
            _store.remove_tree(path)
        else:
            path.unlink(missing_ok=True)


def versions(cache_dir: Path, name: str) -> list[Path]:
    """Every data directory of ``name`` on disk (current, old or left by a killed save)."""
    return [p for p in cache_dir.glob(f"{name}.*") if p.is_dir() and not p.is_symlink()]


def delete_locked(cache_dir: Path, name: str, key: str) -> bool:
    """With ``name``'s lock held: unpublish the entry, then sweep its versions."""
    meta_path = cache_dir / f"{name}.json"
    try:
        _store.read_meta(meta_path, key)
    except FileNotFoundError:
        return False
    except MmcacheError:
        pass
    os.unlink(meta_path)
    sweep(cache_dir, name, list(cache_dir.glob(f"{name}.*")))
    return True

