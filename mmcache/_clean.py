"""Listing and freeing the cache: entries, clean, stale leftovers, the size limit.

Everything here reads or removes what saves left; nothing here writes an entry. Three rules:

- **Only mmcache's own names** (:func:`_paths.own_name`, :func:`_paths.own_data_file`) are
  ever removed: a cache directory that also holds other files, or is reached through a
  symlink, never loses them; a data directory holding anything else is left in place.
- **Removal happens under the key's lock** (see _lock), so a save in progress is never
  touched, and a lock file is unlinked only by its holder as its last act.
- **A version's data that a live process still maps is kept** (its memory would not return
  anyway, and a frame pickled by reference from it must still unpickle to exactly it).

Cost: one listing of the cache directory per call, one ``lstat`` per entry, metadata read only
when its file changed since this process last read it, ``/proc`` scanned at most once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _store
from ._entry import Entry, entry_from_meta
from ._errors import CacheDirError, CorruptEntryError, MmcacheError, UnsupportedFormatError
from ._inuse import mapping_pids, one_scan, rescan
from ._lock import KeyLock
from ._paths import check_key, entry_name, own_data_file, own_name

if TYPE_CHECKING:
    from ._cache import Cache


# --- what the cache directory holds -----------------------------------------------------------


@dataclass(frozen=True)
class Stray:
    """A file or directory of mmcache's that no entry uses (or an old version still mapped)."""

    path: Path
    nbytes: int  # what removing it frees: only mmcache's own files count
    what: str
    is_dir: bool = False


@dataclass(frozen=True)
class Problem:
    """An entry whose metadata cannot be listed: damaged, unreadable, or of a newer format."""

    name: str  # the file-name stem (NAME)
    key: str | None  # when it can still be read from the metadata
    path: Path  # the metadata file
    nbytes: int  # the metadata plus, for a damaged entry, the data removing it frees
    kind: str  # "damaged" (clean removes it), "unreadable" or "newer" (left alone)
    why: str


@dataclass
class Survey:
    """One pass over a cache directory: see :func:`survey`."""

    cache_dir: Path
    entries: list[Entry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    stale: list[Stray] = field(default_factory=list)  # clean removes these now
    kept: list[Stray] = field(default_factory=list)  # old versions live processes map
    saving: list[Stray] = field(default_factory=list)  # saves in progress (lock held)
    names: dict[str, list[str]] = field(default_factory=dict)  # NAME -> own names listed
    data: dict[str, str] = field(default_factory=dict)  # NAME -> its entry's data directory

    @property
    def nbytes(self) -> int:
        """Bytes of everything of mmcache's in the directory."""
        return (sum(e.nbytes for e in self.entries) + sum(p.nbytes for p in self.problems)
                + sum(s.nbytes for s in [*self.stale, *self.kept, *self.saving]))


class _Summary(NamedTuple):
    """What listing needs of one metadata file (a 10,000-column entry's metadata is ~1 MB)."""

    key: str
    data: str
    created: float
    nbytes: int
    nrows: int
    ncols: int


# Per process: cache dir -> {metadata file identity -> summary}. A metadata file is never
# rewritten in place (a save replaces it by rename, a last-use update changes only its atime),
# so (st_dev, st_ino, st_mtime_ns, st_size) names one content; each listing keeps only the
# files it saw, so the memo holds at most one summary per entry.
_SUMMARIES: dict[str, dict[tuple[int, int, int, int], _Summary]] = {}


def own_names(cache_dir: Path) -> dict[str, list[str]]:
    """NAME -> mmcache's own names in ``cache_dir``, from one listing. A missing directory
    holds nothing; an unreadable one raises PermissionError (never "0 entries")."""
    try:
        listing = os.listdir(cache_dir)
    except FileNotFoundError:
        return {}
    groups: dict[str, list[str]] = {}
    for name in listing:
        own = own_name(name)
        if own is not None:
            groups.setdefault(own[0], []).append(name)
    return groups


def survey(cache_dir: Path, *, users: bool = True, strays: bool = True) -> Survey:
    """Entries, damaged entries and leftovers in ``cache_dir``; nothing is changed.

    ``users``: count the processes mapping each entry (one /proc scan). ``strays``: also
    classify what no entry uses, probing each such key's lock without taking it (a held lock
    is a save in progress, not a leftover).
    """
    out = Survey(cache_dir)
    out.names = own_names(cache_dir)
    if not out.names:
        return out
    pids = mapping_pids(cache_dir) if users or strays else None
    where = os.fspath(cache_dir)
    seen_before = _SUMMARIES.get(where, {})
    seen: dict[tuple[int, int, int, int], _Summary] = {}
    for stem, names in out.names.items():
        problem: Problem | None = None
        has_meta = f"{stem}.json" in names
        if has_meta:
            found = _read_entry(where, stem, seen_before, seen)
            if found is None:
                has_meta = False  # deleted since the listing
            elif isinstance(found, Problem):
                problem = found
                if problem.kind != "damaged":
                    out.problems.append(problem)
                    continue  # not ours to judge: leave everything of this key alone
            else:
                summary, st = found
                out.data[stem] = summary.data
                in_use = None if pids is None or not users else len(pids.get(summary.data, ()))
                out.entries.append(entry_from_meta(
                    cache_dir / f"{stem}.json",
                    {"key": summary.key, "created": summary.created, "nbytes": summary.nbytes,
                     "layout": {"nrows": summary.nrows, "ncols": summary.ncols}},
                    st.st_atime, st.st_size, in_use,
                ))
        if strays:
            extra = _classify(out, cache_dir, stem, names, has_meta, problem is not None,
                              pids or {})
            if problem is not None:
                out.problems.append(replace(problem, nbytes=problem.nbytes + extra))
        elif problem is not None:
            out.problems.append(problem)
    _SUMMARIES[where] = seen
    out.entries.sort(key=lambda e: e.created)
    return out


def _sizes(cache_dir: Path) -> dict[str, int]:
    """Key -> bytes (data and metadata) of every listable entry: what the size limit needs
    before each save, so only a listing and one ``lstat`` per entry when nothing changed."""
    where = os.fspath(cache_dir)
    try:
        listing = os.listdir(where)
    except FileNotFoundError:
        return {}
    before = _SUMMARIES.get(where, {})
    seen: dict[tuple[int, int, int, int], _Summary] = {}
    out = {}
    for name in listing:
        if not name.endswith(".json"):
            continue
        own = own_name(name)
        if own is None:
            continue
        found = _read_entry(where, own[0], before, seen)
        if isinstance(found, tuple):
            summary, st = found
            out[summary.key] = summary.nbytes + st.st_size  # as entry_from_meta counts
    _SUMMARIES[where] = seen
    return out


def _read_entry(
    cache_dir: str, stem: str, before: dict[tuple[int, int, int, int], _Summary],
    seen: dict[tuple[int, int, int, int], _Summary],
) -> tuple[_Summary, os.stat_result] | Problem | None:
    """``stem``'s entry as listing needs it: from the memo when its metadata file is the one
    parsed before, else read (and remembered). None if it is gone. Hot: plain str paths."""
    path = f"{cache_dir}/{stem}.json"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return Problem(stem, None, Path(path), 0, "damaged",
                       "the metadata file is a symlink, which mmcache never follows")
    sig = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    summary = before.get(sig)
    if summary is None:
        try:
            summary = _summarise(stem, path, _store.read_meta(Path(path), None))
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            return Problem(stem, None, Path(path), st.st_size, "unreadable",
                           f"its metadata cannot be read ({exc.strerror}): another user's?")
        except UnsupportedFormatError as exc:
            return Problem(stem, _key_hint(path, stem), Path(path), st.st_size, "newer",
                           _why(exc))
        except CorruptEntryError as exc:
            return Problem(stem, _key_hint(path, stem), Path(path), st.st_size, "damaged",
                           _why(exc))
        try:
            if _sig(os.lstat(path)) != sig:
                return summary, st  # replaced while being read: do not remember it
        except FileNotFoundError:
            return None
    seen[sig] = summary
    return summary, st


def _sig(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _summarise(stem: str, path: str, meta: dict[str, Any]) -> _Summary:
    key, data = meta["key"], meta["data"]  # str: read_meta checked the types
    if entry_name(key) != stem:
        raise CorruptEntryError(
            f"metadata {path!r} holds key {key!r}, which belongs in another file",
            path=path,
        )
    if not data.startswith(f"{stem}.") or "/" in data:  # the rule open() applies
        raise CorruptEntryError(f"metadata {path!r} points outside its entry", path=path)
    layout = meta["layout"]
    try:
        return _Summary(key, data, float(meta["created"]), int(meta["nbytes"]),
                        int(layout.get("nrows", 0)), int(layout.get("ncols", 0)))
    except (TypeError, ValueError, OverflowError) as exc:
        raise CorruptEntryError(f"metadata {path!r} has fields of the wrong type",
                                path=path) from exc


def _why(exc: MmcacheError) -> str:
    # Messages read "what is wrong; what to do": listings give their own advice.
    return exc.message.split("; ")[0]


def _key_hint(path: str, stem: str) -> str | None:
    """The key a damaged metadata file still names, if it does and it belongs here."""
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            raw = f.read(_store.MAX_META_BYTES + 1)
        meta = json.loads(raw)
        key = meta.get("key") if isinstance(meta, dict) else None
        if isinstance(key, str) and entry_name(key) == stem:
            return key
    return None


def _classify(
    out: Survey, cache_dir: Path, stem: str, names: list[str], has_meta: bool, damaged: bool,
    pids: dict[str, set[int]],
) -> int:
    """Sort ``stem``'s names that its entry does not use into stale / kept / saving.

    For a damaged entry, what removing it would free is returned instead of listed (its
    removal takes them along).
    """
    live = out.data.get(stem)
    held: bool | None = None
    extra = 0
    for name in names:
        kind = own_name(name)[1]  # type: ignore[index]
        if kind == "meta" or name == live:
            continue
        path = cache_dir / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            nbytes, what = 0, "a planted symlink (never followed)"
        elif kind == "lock":
            if has_meta:
                continue  # the entry's own lock
            nbytes, what = st.st_size, "lock file of a key with no entry"
        elif kind == "data" and stat.S_ISDIR(st.st_mode):
            nbytes = _data_bytes(path)
            if pids.get(name):
                n = len(pids[name])
                out.kept.append(
                    Stray(path, nbytes, f"old version mapped by {n} live process(es)", True)
                )
                continue
            what = "data no entry points to"  # an interrupted save, or a version let go
        elif kind == "tmp":
            nbytes, what = st.st_size, "metadata of an interrupted save"
        else:
            nbytes, what = st.st_size, "not a directory"
        is_dir = stat.S_ISDIR(st.st_mode)
        if not stat.S_ISLNK(st.st_mode):
            if held is None:
                held = _lock_held(cache_dir, stem)
            if held is not False:  # held: a save in progress; None: cannot tell, leave it
                if held and kind != "lock":
                    out.saving.append(Stray(path, nbytes, "a save in progress", is_dir))
                continue
        if damaged:
            extra += nbytes
        else:
            out.stale.append(Stray(path, nbytes, what, is_dir))
    return extra


def _lock_held(cache_dir: Path, stem: str) -> bool | None:
    """True if a process holds ``stem``'s lock now, False if none does, None if unknown.

    Probes with a shared, non-blocking ``flock`` on the existing file, so it creates nothing
    and unlinks nothing (the lock protocol in _lock stays intact); it holds the lock only for
    the instant of the probe.
    """
    try:
        fd = os.open(cache_dir / f"{stem}.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # a holder keeps its lock file until its last act
    except OSError as exc:
        return False if exc.errno == errno.ELOOP else None  # nobody can hold a symlink
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _data_bytes(path: Path) -> int:
    """Bytes of the files mmcache wrote in a data directory (what removing it frees)."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(path) as it:
        for item in it:
            if own_data_file(item.name):
                with contextlib.suppress(OSError):
                    total += item.stat(follow_symlinks=False).st_size
    return total


# --- the verbs ---------------------------------------------------------------------------------


def entries(cache: Cache) -> list[Entry]:
    """Every complete entry, oldest first, with sizes and times (reads only metadata)."""
    return survey(cache.dir, strays=False).entries


@dataclass
class Cleaned:
    """What :func:`clean` removed (or, dry, would remove)."""

    entries: list[Entry]
    damaged: list[Problem]
    stale: list[Stray]
    nbytes_before: int  # all of mmcache's bytes in the directory before


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
    opens, only damaged entries and leftovers."""
    cache_dir = cache.dir
    listed_at = time.time()
    with one_scan():
        s = survey(cache_dir)
        chosen = [] if stale_only else s.entries
        damaged = [p for p in s.problems if p.kind == "damaged"]
        stale = s.stale
        wanted: set[str] = set()
        if keys is not None:
            wanted = {check_key(k) for k in keys}
            chosen = [e for e in chosen if e.key in wanted]
            stems = {entry_name(k) for k in wanted}
            selector = older_than is None and max_bytes is None
            damaged = [p for p in damaged if selector and p.name in stems]
            stale = []
        unused_since = None  # chosen by use: re-checked under each key's lock
        if older_than is not None:
            unused_since = cutoff = time.time() - older_than
            chosen = [e for e in chosen if e.last_used.timestamp() < cutoff]
        if max_bytes is not None:
            unused_since = listed_at if unused_since is None else min(unused_since, listed_at)
            total = sum(e.nbytes for e in s.entries)
            lru = sorted(chosen, key=lambda e: (bool(e.in_use), e.last_used))
            chosen = []
            for e in lru:
                if total <= max_bytes:
                    break
                chosen.append(e)
                total -= e.nbytes
        if dry_run:
            return Cleaned(chosen, damaged, stale, s.nbytes)
        deferred: list[tuple[str, str]] = []
        removed = [e for e in chosen if _delete_or_skip(
            cache, cache_dir, e.key, names=s.names.get(entry_name(e.key)),
            unused_since=unused_since, defer=deferred,
        )]
        _sweep_deferred(cache_dir, deferred)
        done = {entry_name(e.key) for e in removed}
        gone: list[Problem] = []
        if keys is not None:
            if older_than is None and max_bytes is None:
                # Named keys that do not list (damaged, a newer format): delete() copes.
                for k in wanted - {e.key for e in s.entries}:
                    name = entry_name(k)
                    if name in s.names and cache._delete(
                        cache_dir, k, timeout=cache.lock_timeout, names=s.names[name]
                    ):
                        gone.extend(p for p in damaged if p.name == name)
        else:
            for stem in sorted(({p.name for p in damaged} | {_stem(x) for x in stale}) - done):
                if _remove_stale(cache_dir, stem, s.names.get(stem, [])) and not \
                        os.path.lexists(cache_dir / f"{stem}.json"):
                    gone.extend(p for p in damaged if p.name == stem)
        left = [x for x in stale if not os.path.lexists(x.path)]
    return Cleaned(removed, gone, left, s.nbytes)


def _delete_or_skip(
    cache: Cache, cache_dir: Path, key: str, names: list[str] | None,
    unused_since: float | None, defer: list[tuple[str, str]],
) -> bool:
    """One key of a clean: a key whose lock cannot be taken at all (a directory planted in
    place of its lock file) is skipped, not allowed to stop the clean of every other key."""
    try:
        return cache._delete(cache_dir, key, timeout=cache.lock_timeout, names=names,
                             unused_since=unused_since, defer=defer)
    except CacheDirError:
        return False


def _stem(stray: Stray) -> str:
    return own_name(stray.path.name)[0]  # type: ignore[index]


def fit_limit(cache: Cache, cache_dir: Path, key: str, nbytes: int, limit: int) -> None:
    """Evict least recently used entries until ``nbytes`` more fit under ``limit``.

    Entries mapped by live processes go last: removing them frees nothing until those
    processes exit. Victims whose lock is busy are skipped, never waited for, so two
    saving processes cannot deadlock evicting each other's keys. Cost when nothing must go:
    one listing and one ``lstat`` per entry (metadata is re-read only when it changed);
    /proc is scanned only when something must go.
    """
    sizes = _sizes(cache_dir)
    if sum(n for k, n in sizes.items() if k != key) + nbytes <= limit:
        return
    with one_scan():
        s = survey(cache_dir, users=False, strays=False)
        others = [e for e in s.entries if e.key != key]
        total = sum(e.nbytes for e in others)
        pids = mapping_pids(cache_dir) or {}
        in_use = {e.key: len(pids.get(s.data.get(entry_name(e.key), ""), ())) for e in others}
        deferred: list[tuple[str, str]] = []
        for victim in sorted(others, key=lambda e: (bool(in_use[e.key]), e.last_used)):
            if total + nbytes <= limit:
                break
            name = entry_name(victim.key)
            if cache._delete(cache_dir, victim.key, timeout=0, names=s.names.get(name),
                             defer=deferred):
                total -= victim.nbytes
        _sweep_deferred(cache_dir, deferred)


# --- removal (always under the key's lock) -------------------------------------------------------


def _remove_stale(cache_dir: Path, stem: str, names: list[str]) -> bool:
    """Remove ``stem``'s names that no entry uses, if its lock is free right now.

    False (nothing done) when the lock is held, i.e. a save of that key is in progress, or
    cannot be taken (another user's). A planted symlink in place of the lock file is removed
    first: nobody can hold it (locks are opened with O_NOFOLLOW), and it blocks the key.
    """
    lock_path = cache_dir / f"{stem}.lock"
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.lstat(lock_path).st_mode):
            os.unlink(lock_path)
    lock = KeyLock(lock_path)
    try:
        if not lock.acquire(0):
            return False
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP, errno.EISDIR):
            return False  # not ours to touch, or a symlink planted again meanwhile
        raise
    try:
        sweep(cache_dir, stem, [cache_dir / n for n in names])
    finally:
        lock.release(unlink=not os.path.lexists(cache_dir / f"{stem}.json"))
    return True


def release_version(cache_dir: Path, name: str, data: str) -> None:
    """Remove the old version ``data`` of ``name`` if no process but this one maps it and
    the key's lock is free (never waits: a busy lock means a save or delete that sweeps)."""
    lock = KeyLock(cache_dir / f"{name}.lock")
    if not lock.acquire(0):
        return
    try:
        sweep(cache_dir, name, [cache_dir / data], ignore_pid=os.getpid())
    finally:
        lock.release(unlink=not os.path.lexists(cache_dir / f"{name}.json"))


def sweep(
    cache_dir: Path, name: str, paths: list[Path], *, ignore_pid: int = 0
) -> list[str]:
    """With ``name``'s lock held: remove the paths its metadata does not point to, except
    data directories that live processes still map (a later sweep removes them), and except
    anything that is not one of ``name``'s own names. Returns the names removed.

    The lock file itself is left to the lock's holder (see _lock: unlinking it is safe only
    as the holder's last act).
    """
    meta_path = cache_dir / f"{name}.json"
    try:
        live = _store.read_meta(meta_path, None)["data"]
    except FileNotFoundError:
        live = None
    except UnsupportedFormatError:
        return []  # a newer mmcache's entry: leave all of it
    except MmcacheError:
        live = None
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

    Never follows a symlink (the directory is opened with O_NOFOLLOW and its files unlinked
    relative to it). Out of descriptors, it still removes ``0.npy``, ``1.npy``, ... by path,
    so a delete that already unpublished the entry does not leave its data behind.
    """
    freed = 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            return 0  # gone, a symlink, not a directory, or not ours to read: leave it
        return _remove_numbered(path)
    try:
        try:
            names = os.listdir(fd)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                return 0
            os.close(fd)
            fd = -1
            return _remove_numbered(path)
        for name in names:
            if not own_data_file(name):
                continue
            try:
                size = os.stat(name, dir_fd=fd, follow_symlinks=False).st_size
                os.unlink(name, dir_fd=fd)
            except OSError:  # gone meanwhile, or a directory under an own name: leave it
                continue
            freed += size
    finally:
        if fd >= 0:
            os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(path)  # fails when something that is not mmcache's is left inside
    return freed


def _remove_numbered(path: Path) -> int:
    # No descriptor to list the directory with: data files are numbered 0..n-1, so unlink by
    # name up to the first missing number, then meta.json.
    freed = 0
    for i in itertools.count():
        size = _unlink_sized(path / f"{i}.npy")
        if size is None:
            break
        freed += size
    freed += _unlink_sized(path / "meta.json") or 0
    with contextlib.suppress(OSError):
        os.rmdir(path)
    return freed


def _unlink_sized(path: Path) -> int | None:
    try:
        size = os.lstat(path).st_size
        os.unlink(path)
    except OSError:
        return None
    return size


def delete_locked(
    cache_dir: Path, name: str, key: str, names: list[str] | None = None,
    unused_since: float | None = None, defer: list[tuple[str, str]] | None = None,
) -> bool:
    """With ``name``'s lock held: unpublish the entry, then sweep its versions.

    ``names``: the key's own names from a listing made by the caller (``clean`` lists the
    directory once for all keys); else the directory is listed here.
    """
    meta_path = cache_dir / f"{name}.json"
    if unused_since is not None:
        try:
            if os.stat(meta_path).st_atime >= unused_since:
                return False  # used (or re-saved) since it was chosen: keep it
        except FileNotFoundError:
            return False
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
