"""Mapped versions of entries, and the per-process memo that finds them again.

A *version* is one saved state of a key: the data directory ``NAME.TOKEN`` and its metadata.
A :class:`Version` object owns this process's mappings of it. Every frame handed out by
``open`` (and every frame unpickled from a reference) holds its Version, and nothing else
does: the memo keeps only a weak reference. So a process maps a version exactly while it
holds frames from it; when the last one goes the files are unmapped at once, whether the key
was re-saved, deleted or left alone (an idle worker keeps nothing mapped).

While a frame is alive, ``open`` of the same unchanged entry costs one ``stat`` and reuses
the mapping; a child forked after the parent opened it reuses the parent's mapping.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing.util
import os
import re
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _store
from ._entry import Frame, not_found
from ._errors import CorruptEntryError

if TYPE_CHECKING:
    from ._codecs import Mapped

# open() retries when a concurrent overwrite or delete removes files between reading the
# metadata and mapping them; each retry sees a newer metadata file, so a few are plenty.
OPEN_RETRIES = 20
# Each data directory holds a copy of its version's metadata under this name, so a version
# can be opened by its token after the key was re-saved (unpickling a reference).
VERSION_META = "meta.json"
_TOKEN = re.compile(r"[0-9a-f]{16}")


class _Held:
    """What a Version owns: its mappings and the frames decoded over them. Kept apart from
    the Version so that the Version's finalizer can let go of them first (see _released)."""

    __slots__ = ("frames", "fresh", "mapped")

    def __init__(self, mapped: Mapped) -> None:
        self.mapped: Mapped | None = mapped
        # columns key -> the frame every open() hands out a shallow copy of
        self.frames: dict[Any, Frame] = {}
        # columns keys whose first open got a frame decoded for it alone (see first_open)
        self.fresh: set[Any] = set()


class Version:
    """This process's mappings of one saved version, and frames decoded over them."""

    __slots__ = ("__weakref__", "_held", "data_dir", "key", "meta", "token")

    def __init__(self, key: str, data_dir: Path, meta: dict[str, Any], mapped: Mapped) -> None:
        self.key = key
        self.data_dir = data_dir
        self.token = str(meta["token"])
        self.meta = meta
        self._held = _Held(mapped)

    @property
    def mapped(self) -> Mapped:
        assert self._held.mapped is not None  # only cleared once the Version is gone
        return self._held.mapped

    @property
    def frames(self) -> dict[Any, Frame]:
        return self._held.frames

    def first_open(self, ckey: Any) -> bool:
        """True the first time these columns of this version are opened in this process."""
        fresh = self._held.fresh
        if ckey in fresh:
            return False
        fresh.add(ckey)
        return True

    @property
    def maps_files(self) -> bool:
        return self._held.mapped is not None and bool(self._held.mapped.arrays)


# (cache dir, key) -> (signature of NAME.json when loaded, weak reference to the Version)
_MEMO: dict[tuple[str, str], tuple[tuple[int, ...], weakref.ref[Version]]] = {}
_MEMO_LOCK = threading.Lock()


def _reset_lock_after_fork() -> None:
    global _MEMO_LOCK
    _MEMO_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def _sig(st: os.stat_result) -> tuple[int, ...]:
    # mtime is kept by last-use updates (utime sets atime only); inode and size change on a
    # re-save; a new file's nanosecond mtime tells apart a recycled inode.
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def forget(cache_dir: Path, key: str) -> None:
    with _MEMO_LOCK:
        _MEMO.pop((str(cache_dir), key), None)


def _remember(memo_key: tuple[str, str], sig: tuple[int, ...], version: Version) -> None:
    with _MEMO_LOCK:
        _MEMO[memo_key] = (sig, weakref.ref(version))
        if len(_FINALIZERS) > 256:
            _drop_finalizer_refs()
        if len(_MEMO) > 64:  # drop entries whose versions are gone (keeps the dict small)
            for k in [k for k, (_, ref) in _MEMO.items() if ref() is None]:
                del _MEMO[k]


def touch(meta_path: Path, st: os.stat_result | None = None) -> None:
    """Record a use: last use is the metadata file's atime; its mtime (part of the memo
    signature) is kept."""
    with contextlib.suppress(OSError):
        if st is None:
            st = os.stat(meta_path)
        os.utime(meta_path, ns=(time.time_ns(), st.st_mtime_ns))


def _check(meta: dict[str, Any], key: str, name: str, meta_path: Path) -> str:
    """The data directory name ``meta`` points to, after checking it belongs to ``key``."""
    if meta["key"] != key:
        raise CorruptEntryError(
            f"{str(meta_path)!r} holds key {meta['key']!r}, not {key!r}; delete it",
            key=key, path=meta_path,
        )
    data = meta["data"]
    if not isinstance(data, str) or data != f"{name}.{meta['token']}" or \
            not _TOKEN.fullmatch(str(meta["token"])):
        raise CorruptEntryError(
            f"{str(meta_path)!r} points outside its entry ({data!r}); delete it",
            key=key, path=meta_path,
        )
    return data


def _map(cache_dir: Path, key: str, data: str, meta: dict[str, Any]) -> Version:
    data_dir = cache_dir / data
    where = f"entry {key!r} ({str(data_dir)!r})"
    version = Version(key, data_dir, meta, _store.map_files(data_dir, meta["files"], key, where))
    fin = weakref.finalize(
        version, _released, version._held, cache_dir, data.partition(".")[0], data
    )
    fin.atexit = False  # _at_exit runs it, knowing the process is exiting
    _FINALIZERS.add(fin)
    return version


# Finalizers of live Versions; run at exit by _at_exit (also in multiprocessing children,
# which end with os._exit and skip atexit), so a process that exits while holding frames
# of an old version still removes it.
_FINALIZERS: set[weakref.finalize] = set()
_EXITING = False


def _released(held: _Held, cache_dir: Path, name: str, data: str) -> None:
    """This process dropped its last frame of a version (or is exiting): let go of the
    mappings first, then, if the key was re-saved or deleted meanwhile and no process maps
    the version any more (this one included: views of it may outlive the frames), remove its
    files now. Else the last process to let go does, or the next save, delete or clean of
    the key. Never raises."""
    held.frames.clear()
    held.mapped = None  # unmapped here unless views of its columns are still alive
    try:
        vst = _stat(cache_dir / data / VERSION_META)
        if vst is None or _same(_stat(cache_dir / f"{name}.json"), vst):
            return  # gone already, or still the current version
        from . import _clean

        # At exit, this process's own remaining views die with it.
        _clean.release_version(cache_dir, name, data, ignore_self=_EXITING)
    except Exception:  # best effort, at garbage-collection time: never raise
        pass


def _at_exit() -> None:
    global _EXITING
    _EXITING = True
    for fin in list(_FINALIZERS):
        # detach() and call, not fin(): weakref's own exit hook (which runs before this
        # one) makes finalizers without atexit=True do nothing once it has run.
        found = fin.detach()
        if found is not None:
            _obj, func, args, kwargs = found
            func(*args, **kwargs)


def _drop_finalizer_refs() -> None:
    for fin in [f for f in _FINALIZERS if not f.alive]:
        _FINALIZERS.discard(fin)


def _register_exit() -> None:
    # multiprocessing children skip atexit (they end with os._exit) but run these, and a
    # forked child starts with the registry cleared, hence the after-fork re-registration.
    multiprocessing.util.Finalize(None, _at_exit, exitpriority=10)


class _ForkHook:
    pass


_FORK_HOOK = _ForkHook()
atexit.register(_at_exit)
_register_exit()
multiprocessing.util.register_after_fork(_FORK_HOOK, lambda _: _register_exit())


def load(cache_dir: Path, key: str, name: str, *, use: bool = True) -> Version:
    """The key's current version, mapped (from the memo when a frame of it is alive).

    ``use`` records the open as a use (last_used), memoised or not.
    """
    meta_path = cache_dir / f"{name}.json"
    memo_key = (str(cache_dir), key)
    missing_in: str | None = None
    superseded: Version | None = None
    for _ in range(OPEN_RETRIES):
        try:
            st = os.stat(meta_path)
        except FileNotFoundError:
            forget(cache_dir, key)
            if superseded is not None:
                return superseded  # deleted right after we mapped it: still a valid frame
            raise not_found(key, cache_dir) from None
        sig = _sig(st)
        if use:
            # Recorded before mapping, so clean(older_than=) checking under the key's lock
            # sees this open as soon as it started.
            touch(meta_path, st)
        with _MEMO_LOCK:
            hit = _MEMO.get(memo_key)
        version = hit[1]() if hit is not None and hit[0] == sig else None
        if version is None:
            try:
                meta = _store.read_meta(meta_path, key)
            except FileNotFoundError:
                continue  # deleted or replaced since the stat: the next stat tells which
            data = _check(meta, key, name, meta_path)
            try:
                version = _map(cache_dir, key, data, meta)
            except FileNotFoundError as exc:
                if missing_in == meta["token"]:  # the same version twice: files are gone
                    raise CorruptEntryError(
                        f"entry {key!r}: data files are missing ({exc.filename}); delete the "
                        "entry (mmcache.delete or `mmcache clean KEY`) and save it again",
                        key=key, path=cache_dir / data,
                    ) from None
                missing_in = meta["token"]
                continue  # replaced or deleted between stat and mapping: look again
            if not _still_current(meta_path, version):
                # Replaced between reading the metadata and mapping: a sweep may have found
                # no process mapping this version and removed its files under us (the frame
                # would be intact, but no reference to it could be opened). Take the newer.
                superseded = version
                continue
            _remember(memo_key, sig, version)
        return version
    if superseded is not None:
        return superseded  # re-saved faster than we could open: the last one we mapped
    raise not_found(key, cache_dir)


def _still_current(meta_path: Path, version: Version) -> bool:
    """True if ``NAME.json`` is (still) the metadata of ``version``: then no sweep removed
    it before this process mapped it (only versions no longer current are swept), and later
    sweeps see the mapping."""
    vst = _stat(version.data_dir / VERSION_META)
    if vst is None:
        # Written before versions linked their metadata (nothing to compare), or swept.
        return os.path.isdir(version.data_dir)
    return _same(_stat(meta_path), vst)


def load_version(cache_dir: Path, key: str, name: str, token: str) -> Version | None:
    """Version ``token`` of ``key``, mapped; None if its files are gone.

    Never another version: the data directory is named by the token, and its own link to
    the metadata is checked to name this key and token. (Entries written before data
    directories held that link can be opened this way only while they are current.)
    """
    if not _TOKEN.fullmatch(token):
        return None
    meta_path = cache_dir / f"{name}.json"
    data = f"{name}.{token}"
    vmeta = cache_dir / data / VERSION_META
    cst = _stat(meta_path)
    vst = _stat(vmeta)
    # NAME.json is a hard link to the current version's own metadata file.
    current = cst is not None and (vst is None or _same(cst, vst))
    memo_key = (str(cache_dir), key)
    with _MEMO_LOCK:
        hit = _MEMO.get(memo_key)
    version = hit[1]() if hit is not None else None
    if version is None or version.token != token:
        try:
            meta = _store.read_meta(vmeta if vst is not None else meta_path, key)
            if meta["token"] != token:
                return None
            _check(meta, key, name, vmeta)
            version = _map(cache_dir, key, data, meta)
        except FileNotFoundError:
            return None
        if current and cst is not None and vst is not None:
            _remember(memo_key, _sig(cst), version)
    if current and cst is not None:
        touch(meta_path, cst)
    return version


def _same(a: os.stat_result | None, b: os.stat_result) -> bool:
    """``a`` exists and is the file ``b`` (NAME.json names the version's own metadata)."""
    return a is not None and os.path.samestat(a, b)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
