"""Dask distributed: one copy of a frame per node, and memory accounting that knows it.

::

    import mmcache.dask as mdask
    mdask.register(client)              # plugins on every current and future worker
    ref = mdask.share(client, df)       # one copy per node; ref is small and picklable
    client.submit(lambda r: r.open()["a"].sum(), ref)
    ref.delete()                        # every node's copy (or: with mdask.share(...) as ref:)

A **node** is one host and cache directory: the workers of one host that resolve the same
cache directory share one copy; workers given another ``MMCACHE_DIR`` get their own.

Why a plugin: Dask measures a worker's memory as its resident set (RSS), which counts every
page a worker maps from a cache entry, although the node holds one copy for all of them. A
few workers reading a 1 GB entry each "use" 1 GB more, and Dask pauses, spills and restarts
them for memory they do not own. :func:`register` installs, through ``distributed``'s plugin
API, a measure that leaves those pages out: in the worker's monitor (pause, spill, the
dashboard) and in the nanny's restart check. ``dask.sizeof`` of a frame over cache files
counts only its private buffers, so Dask's managed memory does not count them either.

Requires the ``distributed`` package (``pip install "mmcache[dask]"``).
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, TypeAlias

import numpy as np
import pandas as pd

try:
    import distributed
    from dask.sizeof import sizeof
    from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin
except ImportError as _exc:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "mmcache.dask needs the distributed package: pip install 'mmcache[dask]'"
    ) from _exc

from . import _mmap
from ._cache import Cache
from ._errors import EntryChangedError, EntryNotFoundError, InvalidArgumentError, MmcacheError
from ._paths import MAPS_DATA_FILE, check_key

__all__ = ["ShareError", "Shared", "mapped_nbytes", "node", "own_bytes", "register", "share"]

_Frame: TypeAlias = pd.DataFrame | pd.Series
_PLUGIN = "mmcache-memory"


class ShareError(MmcacheError):
    """``share`` could not give every node its copy (workers kept dying, or timed out)."""


# --- what a node is ---------------------------------------------------------------------


def node() -> str:
    """This process's node: ``host:cache-dir``. Processes with the same node share one copy."""
    return f"{socket.gethostname()}:{Cache().dir}"


# --- the handle -------------------------------------------------------------------------


class Shared:
    """A frame shared with every node of a cluster under ``key``: small and picklable.

    ``open()`` maps the copy of the node it runs on: exactly the version ``share`` wrote
    there (a copy replaced since, or left by an earlier share while the node was away, is
    never taken for it). ``delete()`` removes every node's copy; ``with mdask.share(client,
    df) as ref:`` deletes on exit, also on an exception.
    """

    __slots__ = ("_client", "build", "id", "key", "versions")

    def __init__(self, key: str, build: Callable[[], _Frame] | None = None,
                 versions: dict[str, tuple[str, str]] | None = None, id: str = "",
                 client: distributed.Client | None = None) -> None:
        self.key = key
        self.build = build
        # node -> (cache dir of its copy, version token): what share() wrote there
        self.versions = dict(versions or {})
        self.id = id or uuid.uuid4().hex  # tells two shares of one key apart (Dask tokens)
        self._client = client

    def __repr__(self) -> str:
        return f"Shared(key={self.key!r}, nodes={len(self.versions)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Shared, (self.key, self.build, self.versions, self.id))  # never the client

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Shared) and (self.key, self.id) == (other.key, other.id)

    def __hash__(self) -> int:
        return hash((self.key, self.id))

    def __dask_tokenize__(self) -> Any:
        return ("mmcache.dask.Shared", self.key, self.id)

    def open(self, columns: Sequence[Any] | None = None) -> _Frame:
        """This node's copy, mapped without copying (``columns``: only those).

        Shared with ``build=``, a node that joined later builds its copy on first use (once
        per node; an entry an earlier share left under the key there is used as it is).
        Shared from a frame, a node that joined later has no copy: the error says so and
        names the node."""
        where = node()
        if where in self.versions:
            cache_dir, token = self.versions[where]
            obj = Cache(cache_dir)._open_version(self.key, token, columns)
            if obj is not None:
                return obj
            raise EntryChangedError(
                f"key {self.key!r} on node {where!r}: the copy share() wrote here was "
                "deleted or replaced since (ref.delete(), another save or share of the key, "
                "or mmcache clean); share the frame again",
                key=self.key, path=cache_dir,
            )
        if self.build is not None:
            return Cache().open(self.key, columns=columns, build=self.build)
        raise EntryNotFoundError(
            f"key {self.key!r} is not on node {where!r} (host:cache dir): share() gave a copy "
            "to the nodes of the cluster at the time, and this worker's node was not one of "
            "them (a worker that joined later, or one given another MMCACHE_DIR), or the key "
            "was deleted; call mmcache.dask.share(client, df, key=...) again now that it is "
            "here, or share(client, build=fn, key=...), which builds on new nodes by itself",
            key=self.key, path=where.split(":", 1)[1],
        )

    def delete(self, client: distributed.Client | None = None) -> int:
        """Remove every node's copy; the number of nodes that had one. Frames already open
        stay valid (their pages live until the last one is closed). A node none of whose
        workers is in the cluster any more keeps its copy (``mmcache clean`` there; ``open``
        never takes it for a later share's)."""
        client = client or self._client or distributed.get_client()
        removed = client.run(_delete_here, self.key, on_error="ignore")
        return len({n for n, gone in removed.values() if gone})

    def __enter__(self) -> Shared:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def _delete_here(key: str) -> tuple[str, bool]:
    return node(), Cache().delete(key)


# --- sharing ------------------------------------------------------------------------------


def share(
    client: distributed.Client,
    obj: _Frame | None = None,
    key: str | None = None,
    *,
    build: Callable[[], _Frame] | None = None,
    timeout: float = 600,
) -> Shared:
    """Give every node of ``client``'s cluster one copy of ``obj`` under ``key`` (a fresh
    unique key by default), or one built there by ``build()`` (then ``key`` is required).

    ``obj`` travels to each node once, to one of its workers, which writes the entry (an
    existing entry of ``key`` is replaced atomically); ``build`` runs once per node. A
    worker that dies while writing leaves nothing visible, and another worker of its node
    (or the one its nanny restarts) does the job instead. Raises ShareError if a node has
    no copy within ``timeout`` seconds, after removing the copies already written. Returns
    the handle tasks receive.
    """
    if (obj is None) == (build is None):
        raise InvalidArgumentError("share() takes a frame or build=, exactly one of them")
    if obj is not None and not isinstance(obj, pd.DataFrame | pd.Series):
        raise InvalidArgumentError(
            f"share() shares a pandas DataFrame or Series, got {type(obj).__name__}")
    if build is not None and key is None:
        raise InvalidArgumentError(
            "share(build=...) needs key=: the key names what build() makes on every node")
    key = check_key(key if key is not None else f"dask-{uuid.uuid4().hex}")
    if obj is not None:
        # A frame from mmcache.open would travel as a reference to this host's cache, which
        # other hosts cannot open: the copy of the frame object sends its data.
        obj = obj.copy(deep=False)
    try:
        versions = _give_every_node(client, key, obj, build, timeout)
    except BaseException:
        with contextlib.suppress(Exception):  # no copy left behind on the nodes that got one
            client.run(_delete_here, key, on_error="ignore")
        raise
    return Shared(key, build, versions, client=client)


def _save_here(obj: _Frame | None, key: str,
               build: Callable[[], _Frame] | None) -> tuple[str, str, str]:
    """Write the entry on this worker's node: (node, cache dir of the copy, its version)."""
    entry = Cache().save(build() if build is not None else obj, key)  # type: ignore[arg-type]
    token = Cache(entry.cache_dir)._current_token(key)
    return node(), str(entry.cache_dir), token or ""


def _give_every_node(client: distributed.Client, key: str, obj: _Frame | None,
                     build: Callable[[], _Frame] | None,
                     timeout: float) -> dict[str, tuple[str, str]]:
    """Write a copy on every node the cluster has (or had, while this runs): one worker
    per node at a time, another after a failure, until each has one or the deadline."""
    deadline = time.monotonic() + timeout
    done: dict[str, tuple[str, str]] = {}
    tried: set[str] = set()
    failures: list[str] = []
    wanted: set[str] = set()
    while True:
        nodes = _nodes(client, failures)
        wanted |= set(nodes)  # a node whose workers are all restarting stays wanted
        missing = sorted(wanted - set(done))
        if not missing:
            return done
        if time.monotonic() > deadline:
            raise ShareError(
                f"key {key!r}: no copy could be written on node(s) {missing} within "
                f"{timeout:g} s ({'; '.join(failures[-3:]) or 'no live worker there'}); "
                "the copies written elsewhere were removed. Check those workers' logs and "
                "cache directories (free space, MMCACHE_DIR), then share again",
                key=key,
            )
        chosen = {}
        for n in missing:
            addrs = nodes.get(n)
            if addrs:  # else: wait for its workers to come back (a nanny restarting one)
                fresh = [a for a in addrs if a not in tried]
                chosen[(fresh or addrs)[0]] = n
        if not chosen:
            time.sleep(0.5)
            continue
        tried.update(chosen)
        data: Any = obj
        running = {}
        try:
            if obj is not None:
                # To the chosen workers only, at once: once per node. Each writes the
                # entry; then the data are released.
                data = _scatter(client, obj, list(chosen), deadline)
            for addr in chosen:
                running[addr] = client.submit(
                    _save_here, data, key, build, workers=[addr], allow_other_workers=False,
                    pure=False, key=f"mmcache-share-{uuid.uuid4().hex}")
        except Exception as exc:  # a worker died since it was listed: try others
            failures.append(f"{sorted(chosen)}: {exc!r}")
        _wait_alive(client, running, deadline)
        for addr, fut in running.items():
            if fut.status == "finished":
                n, cache_dir, token = fut.result()
                done[n] = (cache_dir, token)
            else:
                failures.append(f"{addr}: {_why(fut)}")
                fut.cancel()
        if data is not obj:
            data.release()


def _scatter(client: distributed.Client, obj: _Frame, addrs: list[str],
             deadline: float) -> Any:
    """``obj`` to the workers at ``addrs``: straight there when the client can reach them,
    else through the scheduler (twice the traffic)."""
    timeout = max(deadline - time.monotonic(), 1)
    try:
        return client.scatter(obj, workers=addrs, broadcast=True, hash=False, direct=True,
                              timeout=timeout)
    except OSError:
        return client.scatter(obj, workers=addrs, broadcast=True, hash=False, direct=False,
                              timeout=timeout)


def _nodes(client: distributed.Client, failures: list[str]) -> dict[str, list[str]]:
    """Each node of the cluster and its workers' addresses (sorted: stable choices); a
    worker that cannot say (dying, or broken) is left out and its error noted."""
    where = client.run(node, on_error="return")
    nodes: dict[str, list[str]] = {}
    for addr in sorted(where):
        if isinstance(where[addr], BaseException):
            failures.append(f"{addr}: {where[addr]!r}")
        else:
            nodes.setdefault(where[addr], []).append(addr)
    return nodes


def _wait_alive(client: distributed.Client, running: dict[str, Any], deadline: float) -> None:
    """Until every task ends, its worker leaves the cluster, or the deadline."""
    while time.monotonic() < deadline:
        alive = set(client.scheduler_info(n_workers=-1)["workers"])
        pending = [addr for addr, fut in running.items()
                   if fut.status == "pending" and addr in alive]
        if not pending:
            return
        # Time out, or a task cancelled (its data lost with a dead worker): look again.
        with contextlib.suppress(Exception):
            distributed.wait([running[a] for a in pending], timeout=0.5)


def _why(fut: Any) -> str:
    if fut.status == "error":
        with contextlib.suppress(Exception):
            return repr(fut.exception(timeout=1))
    return f"task {fut.status} (worker gone or timed out)"


# --- memory accounting --------------------------------------------------------------------


def register(client: distributed.Client) -> None:
    """Make Dask's view of memory understand sharing, on every current and future worker
    (idempotent): the worker's monitor (pause, spill, the dashboard) and the nanny's
    restart check leave out pages mapped from cache entries, and ``dask.sizeof`` of a frame
    counts only its private buffers."""
    _register_sizeof()
    client.register_plugin(_WorkerMemory(), name=_PLUGIN)
    with contextlib.suppress(ValueError):  # no nannies (workers started without one)
        client.register_plugin(_NannyMemory(), name=_PLUGIN + "-nanny")


class _OwnMemory:
    """A worker's own memory, as Dask should see it: :func:`own_bytes`, for the worker's
    monitor (called) and for its nanny's restart check (:meth:`reading`).

    Reading it costs a walk of the process's mappings (~15 ms with pandas loaded and a GB
    mapped), and Dask asks every 100 ms: it is read again after a second, or at once when
    the resident set moved by more than 64 MB since the last reading (so pages of an entry
    being read never count for more than that); in between, what the resident set gained or
    lost since is added to the last reading, so heap growth shows at once."""

    _EVERY, _MOVED = 1.0, 64 << 20

    def __init__(self, proc: Any = None) -> None:
        self.proc = proc
        self.pid: int | None = None
        self.when = -1.0e9
        self.rss_then = 0
        self.own_then = 0

    def __call__(self) -> int:
        rss = self.proc.memory_info().rss
        own = self.reading(self.proc.pid, rss)
        return rss if own is None else own  # smaps unreadable: Dask's own measure

    def reading(self, pid: int, rss: int) -> int | None:
        """Process ``pid``'s own memory, given its RSS now; None if it cannot be read."""
        now = time.monotonic()
        if (pid != self.pid or now - self.when > self._EVERY
                or abs(rss - self.rss_then) > self._MOVED):
            own = own_bytes(pid)
            if own is None:
                self.pid = None
                return None
            self.pid, self.when, self.rss_then, self.own_then = pid, now, rss, own
        return max(self.own_then + rss - self.rss_then, 0)


class _WorkerMemory(WorkerPlugin):
    """The worker's monitor measures :class:`_OwnMemory` (``get_process_memory`` is the
    one measure its memory manager, heartbeats and dashboard read)."""

    def setup(self, worker: Any) -> None:
        _register_sizeof()
        monitor = worker.monitor
        if not isinstance(monitor.get_process_memory, _OwnMemory):
            monitor.get_process_memory = _OwnMemory(monitor.proc)

    def teardown(self, worker: Any) -> None:
        with contextlib.suppress(AttributeError):
            del worker.monitor.get_process_memory  # back to the class's own


class _NannyMemory(NannyPlugin):
    """The nanny restarts a worker whose RSS passes the terminate fraction of its limit.
    Its check runs as before; only when RSS is past the limit is the worker's own memory
    (:func:`own_bytes`) measured, and the restart goes ahead only if that is too."""

    restart = False

    def setup(self, nanny: Any) -> None:
        pcs = nanny.periodic_callbacks
        old = pcs.get("memory_monitor")
        if old is None or getattr(old, "_mmcache", False):
            return
        from tornado.ioloop import PeriodicCallback

        manager = nanny.memory_manager
        pc = PeriodicCallback(partial(_nanny_check, nanny, manager), old.callback_time)
        pc._mmcache = True  # type: ignore[attr-defined]
        pc._mmcache_old = old  # type: ignore[attr-defined]
        was_running = old.is_running()
        old.stop()
        pcs["memory_monitor"] = pc
        if was_running:
            pc.start()

    def teardown(self, nanny: Any) -> None:
        pc = nanny.periodic_callbacks.get("memory_monitor")
        old = getattr(pc, "_mmcache_old", None)
        if old is not None:
            pc.stop()
            nanny.periodic_callbacks["memory_monitor"] = old
            old.start()


def _nanny_check(nanny: Any, manager: Any) -> None:
    process = getattr(getattr(nanny, "process", None), "process", None)
    pid = getattr(process, "pid", None)
    limit, fraction = manager.memory_limit, manager.memory_terminate_fraction
    if pid is None or not limit or fraction is False:
        return
    try:
        import psutil

        rss = psutil.Process(pid).memory_info().rss
    except Exception:  # gone, or not ours to read: the nanny's own check says the same
        return
    if rss / limit <= fraction:
        return
    reader = getattr(nanny, "_mmcache_own", None)
    if reader is None:
        reader = nanny._mmcache_own = _OwnMemory()
    own = reader.reading(pid, rss)
    if own is None or own / limit > fraction:
        manager.memory_monitor(nanny)


_PRIVATE = re.compile(rb"^Private_\w+:\s+(\d+) kB", re.MULTILINE)
_ANONYMOUS = re.compile(rb"^Anonymous:\s+(\d+) kB", re.MULTILINE)


def own_bytes(pid: int) -> int | None:
    """Memory that is ``pid``'s own: its private pages (what its exit would free: USS),
    leaving out pages of cache files, which belong to the node's one copy whoever maps them
    (a page a private mapping wrote is an anonymous copy: that one is counted). Shared
    library pages are left out too, as USS does. None if ``/proc/PID/smaps`` is unreadable.

    A file is a cache file by mmcache's names for entry data, wherever its directory is."""
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            smaps = f.read()
    except OSError:
        return None
    kb = sum(map(int, _PRIVATE.findall(smaps)))
    for m in MAPS_DATA_FILE.finditer(smaps):
        end = smaps.find(b"\nVmFlags:", m.end())  # each mapping's last line
        block = smaps[m.end():end if end >= 0 else len(smaps)]
        kb += sum(map(int, _ANONYMOUS.findall(block))) - sum(map(int, _PRIVATE.findall(block)))
    return kb * 1024


# --- dask.sizeof ----------------------------------------------------------------------------

_registered = False


def _register_sizeof() -> None:
    """``sizeof`` of pandas objects minus their buffers that lie in cache files."""
    global _registered
    if _registered:
        return
    sizeof(pd.DataFrame())  # dask registers pandas lazily, on first use: not over ours later
    for cls in (pd.DataFrame, pd.Series, pd.Index):
        sizeof.register(cls)(partial(_private_sizeof, sizeof.dispatch(cls)))
    _registered = True


def _private_sizeof(full: Callable[[Any], int], obj: Any) -> int:
    return max(full(obj) - mapped_nbytes(obj), 400)


def mapped_nbytes(obj: _Frame | pd.Index) -> int:
    """Bytes of ``obj``'s buffers that lie in cache files this process maps and shares:
    memory of every process of its node, not its own. (An Arrow array counts as its
    ``nbytes``, the part of its buffers it spans, as ``sizeof`` counts it, when all its
    buffers lie there.)"""
    ranges = _mmap.mapped_ranges()
    if not ranges:
        return 0
    starts = np.array([s for s, _ in ranges], dtype=np.uint64)
    ends = [e for _, e in ranges]

    def inside(address: int, size: int) -> bool:
        i = int(np.searchsorted(starts, np.uint64(address), side="right")) - 1
        return i >= 0 and address + size <= ends[i]

    seen: set[tuple[int, int]] = set()
    total = 0
    for address, size, buffers in _buffers(obj):
        if size <= 0 or (address, size) in seen:
            continue
        seen.add((address, size))
        if all(inside(a, n) for a, n in buffers):
            total += size
    return total


def _buffers(obj: Any) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """``(address, nbytes as sizeof counts it, the memory it lies in)`` of each array of a
    pandas object, without building any."""
    if isinstance(obj, pd.DataFrame):
        for blk in obj._mgr.blocks:
            yield from _buffers(blk.values)
        for ax in obj.axes:
            yield from _buffers(ax)
    elif isinstance(obj, pd.Series):
        yield from _buffers(obj._values)
        yield from _buffers(obj.index)
    elif isinstance(obj, pd.RangeIndex):
        return
    elif isinstance(obj, pd.MultiIndex):
        for codes in obj.codes:
            yield from _buffers(codes)
    elif isinstance(obj, pd.Index):
        yield from _buffers(obj._values)
    elif isinstance(obj, np.ndarray):
        if obj.dtype != object:
            address = obj.__array_interface__["data"][0]
            yield address, obj.nbytes, [(address, obj.nbytes)]
    elif isinstance(obj, pd.Categorical):
        yield from _buffers(obj.codes)
    elif hasattr(obj, "_pa_array"):
        for chunk in obj._pa_array.chunks:
            bufs = [(b.address, b.size) for b in chunk.buffers() if b is not None and b.size]
            if bufs:
                yield bufs[0][0] + chunk.offset, chunk.nbytes, bufs
    else:
        for name in ("_ndarray", "_data", "_mask", "_left", "_right"):
            part = getattr(obj, name, None)
            if part is not None:
                yield from _buffers(part)
