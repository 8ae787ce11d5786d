"""What a cache directory holds: entries, damaged entries, leftovers, saves in progress.

Reads only: one listing of the directory, one ``lstat`` per entry and per data file (checked
against the metadata's sizes), metadata read only when its file changed since this process
last read it (damaged metadata included), ``/proc`` scanned at most once. Only mmcache's own
names (:func:`_paths.own_name`, of the file type mmcache gives them) are ever looked at;
a FIFO or directory under such a name is not mmcache's and is never opened. Removing is
``_clean``'s.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _store
from ._entry import Entry, entry_from_meta
from ._errors import CorruptEntryError, MmcacheError, UnsupportedFormatError
from ._inuse import mapping_pids
from ._paths import entry_name, own_data_file, own_name, own_type

if TYPE_CHECKING:
    pass



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
    # The directories surveyed: cache_dir, or, merged (see merged()), both default places.
    places: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.places:
            self.places = [self.cache_dir]

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


def merged(surveys: list[Survey]) -> Survey:
    """One report of several directories (the default cache's RAM and disk places): entries
    oldest first, everything else in order of the directories. For reporting only: ``names``,
    ``data`` and ``blocked`` are per directory, so a merged survey leaves them empty."""
    if len(surveys) == 1:
        return surveys[0]
    out = Survey(surveys[0].cache_dir, places=[s.cache_dir for s in surveys])
    for s in surveys:
        out.entries += s.entries
        out.problems += s.problems
        out.stale += s.stale
        out.kept += s.kept
        out.saving += s.saving
    out.entries = newest_per_key(out.entries)
    return out


def newest_per_key(entries: list[Entry]) -> list[Entry]:
    """``entries`` oldest first, one per key: the newest, where a save killed while moving a
    key between the default places left it in both (the older one goes with the key's next
    save or delete; open() takes the newer one too)."""
    newest: dict[str, Entry] = {}
    for e in entries:
        if e.key not in newest or e.created > newest[e.key].created:
            newest[e.key] = e
    return sorted(newest.values(), key=lambda e: e.created)


def entry_sizes(cache_dir: Path) -> dict[str, int]:
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
        why = data_damage(cache_dir, summary.data, summary.files)
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


def data_damage(cache_dir: str, data: str, files: Sequence[tuple[str, int]]) -> str | None:
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
            found = summarise(stem, path, _store.read_meta(Path(path), None))
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


def summarise(stem: str, path: str, meta: dict[str, Any]) -> _Summary:
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
            nbytes, own, foreign = data_bytes(path)
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


def data_bytes(path: Path) -> tuple[int, int, int]:
    """Bytes of the files mmcache wrote in a data directory (what removing it frees), how
    many such files it holds, and how many others (which stay, and keep the directory)."""
    total = own = foreign = 0
    with contextlib.suppress(OSError), os.scandir(path) as it:
        for item in it:
            st = None
            if own_data_file(item.name):
                with contextlib.suppress(OSError):
                    st = item.stat(follow_symlinks=False)
            if st is not None and own_data_type(st.st_mode):
                total += st.st_size
                own += 1
            else:
                foreign += 1
    return total, own, foreign


def own_data_type(mode: int) -> bool:
    # mmcache writes regular files in a data directory; a symlink planted there is removed
    # (never followed); a directory or FIFO under a data file's name is left alone.
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)
