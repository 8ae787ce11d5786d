"""Listing and freeing the cache: entries, clean, stale leftovers, the size limit.

Everything here reads or removes what saves left; nothing here writes an entry. Three rules:

- **Only mmcache's own names** (:func:`_paths.own_name`, :func:`_paths.own_data_file`) are
  ever removed: a cache directory that also holds other files, or is reached through a
  symlink, never loses them; a data directory holding anything else is left in place.
- **Removal happens under the key's lock** (see _lock), so a save in progress is never
  touched, and a lock file is unlinked only by its holder as its last act.
- **A version's data that a live process still maps is kept** (its memory would not return
  anyway, and a frame pickled by reference from it must still unpickle to exactly it).

Cost: one listing of the cache directory per call, one ``lstat`` per entry and per data file
(checked against the metadata's sizes), metadata read only when its file changed since this
process last read it (damaged metadata included), ``/proc`` scanned at most once.
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
from ._paths import check_key, entry_name, own_data_file, own_name, own_type

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
    # NAMEs whose lock name is taken by something not mmcache's (a directory, a FIFO): the
    # key cannot be locked, so clean leaves all of it alone (and says nothing about it).
    blocked: set[str] = field(default_factory=set)

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
    files: tuple[tuple[str, int], ...]  # (name, bytes) of each data file


_Sig = tuple[int, int, int, int]

# Per process: cache dir -> {metadata file identity -> summary, or what is wrong with it}. A
# metadata file is never rewritten in place (a save replaces it by rename, a last-use update
# changes only its atime), so (st_dev, st_ino, st_mtime_ns, st_size) names one content; each
# listing keeps only the files it saw, so the memo holds at most one result per entry.
_SUMMARIES: dict[str, dict[_Sig, _Summary | Problem]] = {}


def own_names(cache_dir: Path) -> dict[str, list[str]]:
    """NAME -> mmcache's own names in ``cache_dir``, from one listing. A missing directory
    holds nothing; an unreadable one raises PermissionError (never "0 entries")."""
    return _listing(cache_dir)[0]


def _listing(cache_dir: Path) -> tuple[dict[str, list[str]], set[str]]:
    """:func:`own_names`, and the NAMEs whose lock name is of a type mmcache never creates.

    Names of the wrong file type for their suffix (see ``_paths.own_type``) are left out,
    judged by the type the listing reports (no ``stat`` on most file systems); every remover
    checks the type again with ``lstat`` before acting.
    """
    groups: dict[str, list[str]] = {}
    blocked: set[str] = set()
    try:
        it = os.scandir(cache_dir)
    except FileNotFoundError:
        return groups, blocked
    with it:
        for item in it:
            own = own_name(item.name)
            if own is None:
                continue
            try:
                ok = item.is_symlink() or (item.is_dir(follow_symlinks=False) if own[1] == "data"
                                           else item.is_file(follow_symlinks=False))
            except OSError:
                continue  # gone meanwhile
            if ok:
                groups.setdefault(own[0], []).append(item.name)
            elif own[1] == "lock":
                blocked.add(own[0])
    return groups, blocked


def survey(cache_dir: Path, *, users: bool = True, strays: bool = True) -> Survey:
    """Entries, damaged entries and leftovers in ``cache_dir``; nothing is changed.

    ``users``: count the processes mapping each entry (one /proc scan). ``strays``: also
    classify what no entry uses, probing each such key's lock without taking it (a held lock
    is a save in progress, not a leftover).
    """
    out = Survey(cache_dir)
    out.names, out.blocked = _listing(cache_dir)
    if not out.names:
        return out
    pids = mapping_pids(cache_dir) if users or strays else None
    where = os.fspath(cache_dir)
    seen_before = _SUMMARIES.get(where, {})
    seen: dict[_Sig, _Summary | Problem] = {}
    for stem, names in out.names.items():
        problem: Problem | None = None
        has_meta = f"{stem}.json" in names
        if has_meta:
            found = _checked_entry(where, stem, seen_before, seen)
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
    seen: dict[_Sig, _Summary | Problem] = {}
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


def _checked_entry(
    cache_dir: str, stem: str, before: dict[_Sig, _Summary | Problem],
    seen: dict[_Sig, _Summary | Problem],
) -> tuple[_Summary, os.stat_result] | Problem | None:
    """:func:`_read_entry`, and each data file checked against the metadata (one ``lstat``
    per file): a missing or truncated one makes the entry damaged, as ``open`` would find.

    A failed check counts only if the metadata is still the one read: a save or delete that
    replaced it meanwhile removes the old version's files, which is not damage.
    """
    found = _read_entry(cache_dir, stem, before, seen)
    for _ in range(3):
        if not isinstance(found, tuple):
            return found
        summary, st = found
        why = _data_damage(cache_dir, summary.data, summary.files)
        if why is None:
            return found
        path = f"{cache_dir}/{stem}.json"
        try:
            if _sig(os.lstat(path)) == _sig(st):
                return Problem(stem, summary.key, Path(path), st.st_size, "damaged", why)
        except FileNotFoundError:
            return None  # deleted meanwhile
        found = _read_entry(cache_dir, stem, before, seen)
    return found  # replaced three times while being looked at: list it as read


def _data_damage(cache_dir: str, data: str, files: Sequence[tuple[str, int]]) -> str | None:
    """What is wrong with the data files of a version (``open`` would refuse it), or None.

    One ``lstat`` of the directory and of each file; nothing is opened. An ``lstat`` that
    fails for another reason than absence (no permission) cannot tell: None.
    """
    where = f"{cache_dir}/{data}"
    try:
        st = os.lstat(where)
    except FileNotFoundError:
        return f"its data directory {data} is missing"
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return f"its data {data} is not a directory"
    for name, size in files:
        try:
            fst = os.lstat(f"{where}/{name}")
        except FileNotFoundError:
            return f"its data file {data}/{name} is missing"
        except OSError:
            return None
        if not stat.S_ISREG(fst.st_mode):
            return f"its data file {data}/{name} is not a regular file"
        if fst.st_size != size:
            return (f"its data file {data}/{name} has {fst.st_size:,} bytes, the metadata "
                    f"says {size:,} (truncated or overwritten)")
    return None


def _read_entry(
    cache_dir: str, stem: str, before: dict[_Sig, _Summary | Problem],
    seen: dict[_Sig, _Summary | Problem],
) -> tuple[_Summary, os.stat_result] | Problem | None:
    """``stem``'s entry as listing needs it: from the memo when its metadata file is the one
    parsed before (damaged or not), else read (and remembered). None if it is gone, or if
    ``NAME.json`` is not a regular file (a directory or FIFO there is not mmcache's, and is
    never opened). Hot: plain str paths."""
    path = f"{cache_dir}/{stem}.json"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return Problem(stem, None, Path(path), 0, "damaged",
                       "the metadata file is a symlink, which mmcache never follows")
    if not stat.S_ISREG(st.st_mode):
        return None
    sig = _sig(st)
    found = before.get(sig)
    if found is None:
        try:
            found = _summarise(stem, path, _store.read_meta(Path(path), None))
        except FileNotFoundError:
            return None
        except PermissionError as exc:  # not remembered: a chmod leaves the signature as is
            return Problem(stem, None, Path(path), st.st_size, "unreadable",
                           f"its metadata cannot be read ({exc.strerror}): another user's?")
        except UnsupportedFormatError as exc:
            found = Problem(stem, _key_hint(path, stem), Path(path), st.st_size, "newer",
                            _why(exc))
        except CorruptEntryError as exc:
            found = Problem(stem, _key_hint(path, stem), Path(path), st.st_size, "damaged",
                            _why(exc))
        try:
            if _sig(os.lstat(path)) != sig:
                # replaced while being read: do not remember it
                return found if isinstance(found, Problem) else (found, st)
        except FileNotFoundError:
            return None
    seen[sig] = found
    return found if isinstance(found, Problem) else (found, st)


def _sig(st: os.stat_result) -> _Sig:
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
        files = tuple((spec["name"], int(spec["size"])) for spec in meta["files"])
        if not all(isinstance(n, str) and n and "/" not in n and not n.startswith(".")
                   for n, _ in files):
            raise ValueError("bad file name")
        return _Summary(key, data, float(meta["created"]), int(meta["nbytes"]),
                        int(layout.get("nrows", 0)), int(layout.get("ncols", 0)), files)
    except (TypeError, ValueError, OverflowError, KeyError) as exc:
        raise CorruptEntryError(f"metadata {path!r} has fields of the wrong type",
                                path=path) from exc


def _why(exc: MmcacheError) -> str:
    # Messages read "what is wrong; what to do": listings give their own advice.
    return exc.message.split("; ")[0]


def _key_hint(path: str, stem: str) -> str | None:
    """The key a damaged metadata file still names, if it does and it belongs here."""
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None  # never read a FIFO or device
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
        if not own_type(kind, st.st_mode):
            continue  # not mmcache's (a directory named NAME.lock, a FIFO): never counted
        if stat.S_ISLNK(st.st_mode):
            nbytes, what = 0, "a planted symlink (never followed)"
        elif kind == "lock":
            if has_meta:
                continue  # the entry's own lock
            nbytes, what = st.st_size, "lock file of a key with no entry"
        elif kind == "data":
            nbytes, own, foreign = _data_bytes(path)
            if foreign and not own:
                continue  # a directory of someone's files under a data name: not mmcache's
            if pids.get(name):
                n = len(pids[name])
                out.kept.append(
                    Stray(path, nbytes, f"old version mapped by {n} live process(es)", True)
                )
                continue
            what = "data no entry points to"  # an interrupted save, or a version let go
        else:
            nbytes, what = st.st_size, "metadata of an interrupted save"
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
    the instant of the probe. Only a regular file is opened (non-blocking): a directory, FIFO
    or device under the lock's name is not mmcache's, and nobody can take that key's lock
    (None: its names are left alone).
    """
    path = cache_dir / f"{stem}.lock"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False  # a holder keeps its lock file until its last act
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return False  # nobody can hold a symlink (locks are opened with O_NOFOLLOW)
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError as exc:
        return False if exc.errno == errno.ELOOP else None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # swapped since the lstat
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


def _data_bytes(path: Path) -> tuple[int, int, int]:
    """Bytes of the files mmcache wrote in a data directory (what removing it frees), how
    many such files it holds, and how many others (which stay, and keep the directory)."""
    total = own = foreign = 0
    with contextlib.suppress(OSError), os.scandir(path) as it:
        for item in it:
            st = None
            if own_data_file(item.name):
                with contextlib.suppress(OSError):
                    st = item.stat(follow_symlinks=False)
            if st is not None and _own_data_type(st.st_mode):
                total += st.st_size
                own += 1
            else:
                foreign += 1
    return total, own, foreign


def _own_data_type(mode: int) -> bool:
    # mmcache writes regular files in a data directory; a symlink planted there is removed
    # (never followed); a directory or FIFO under a data file's name is left alone.
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)


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
    cache_dir = cache.dir
    listed_at = time.time()
    with one_scan():
        s = survey(cache_dir)
        chosen = [] if stale_only else s.entries
        damaged = [p for p in s.problems if p.kind == "damaged"]
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
        # A key whose lock name is taken by something not mmcache's cannot be locked: left.
        skipped = [e for e in chosen if entry_name(e.key) in s.blocked]
        if skipped:
            chosen = [e for e in chosen if entry_name(e.key) not in s.blocked]
        if max_bytes is not None:
            skipped = []  # not chosen: the limit is met with others
            unused_since = listed_at if unused_since is None else min(unused_since, listed_at)
            total = sum(e.nbytes for e in s.entries)
            lru = sorted(chosen, key=lambda e: (bool(e.in_use), e.last_used))
            chosen = []
            for e in lru:
                if total <= max_bytes:
                    break
                chosen.append(e)
                total -= e.nbytes
        if keys is None:
            stale = s.stale
        else:  # the named keys' leftovers, and those of entries chosen by age or size
            stems |= {entry_name(e.key) for e in chosen}
            stale = [x for x in s.stale if _stem(x) in stems]
        if dry_run:
            return Cleaned(chosen, damaged, stale, s.nbytes, skipped)
        deferred: list[tuple[str, str]] = []
        removed = [e for e in chosen if _delete_or_skip(
            cache, cache_dir, e.key, names=s.names.get(entry_name(e.key)),
            unused_since=unused_since, defer=deferred,
        )]
        _sweep_deferred(cache_dir, deferred)
        done = {entry_name(e.key) for e in removed}
        by_name = {p.name: p for p in damaged}
        gone: list[Problem] = []
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
        todo = {_stem(x) for x in stale}
        if keys is None:
            todo |= by_name.keys()
        for stem in sorted(todo - done):
            if stem in s.blocked:
                continue
            is_damaged = stem in by_name
            if _remove_stale(cache_dir, stem, s.names.get(stem, []), damaged=is_damaged) \
                    and is_damaged and not os.path.lexists(cache_dir / f"{stem}.json"):
                gone.append(by_name[stem])
        left = [y for y in (_removed(x) for x in stale) if y is not None]
    return Cleaned(removed, gone, left, s.nbytes, skipped)


def _removed(x: Stray) -> Stray | None:
    """``x`` as removed, or None if it was left (mapped, locked, or swapped meanwhile). A
    data directory that also held files not mmcache's stays, emptied of mmcache's files."""
    if not os.path.lexists(x.path):
        return x
    if x.is_dir and x.nbytes and not _data_bytes(x.path)[1]:
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
            if name in s.blocked or not _lock_usable(cache_dir, name):
                continue  # its lock name is not mmcache's: the key cannot be locked
            if cache._delete(cache_dir, victim.key, timeout=0, names=s.names.get(name),
                             defer=deferred):
                total -= victim.nbytes
        _sweep_deferred(cache_dir, deferred)


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
        lock.release(unlink=not os.path.lexists(cache_dir / f"{stem}.json"))
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
        lock.release(unlink=not os.path.lexists(cache_dir / f"{name}.json"))


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
                summary = _summarise(name, os.fspath(meta_path), meta)
                if _data_damage(os.fspath(cache_dir), summary.data, summary.files):
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
        if not _own_data_type(st.st_mode):
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
