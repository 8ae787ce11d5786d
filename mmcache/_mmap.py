"""Read-only shared mappings of whole files that hold no file descriptor.

Why not the alternatives: Python's ``mmap`` keeps a duplicated descriptor per mapped file for
the mapping's life (``trackfd=False`` only exists from 3.13), so many entries or wide ones
exhaust ``ulimit -n``; ``np.load(mmap_mode="r")`` is built on it. Arrow's ``memory_map``
holds no descriptor but advises the kernel to read the whole file ahead
(``MADV_WILLNEED``) on every read: ~0.5 ms per GB on tmpfs, and on a disk-backed cache a
read of every column at open, even with ``columns=``. Here: one ``mmap`` call, the
descriptor closed at once, ``munmap`` when the last array viewing the mapping is freed.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import stat
import threading
import weakref
from typing import Any

import numpy as np

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int64]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Region:
    """Owns one mapping; numpy arrays built on it keep it alive through their ``base``."""

    __slots__ = ("__weakref__", "address", "owner", "private", "size")

    def __init__(self, address: int, size: int, private: bool) -> None:
        self.address = address
        self.size = size
        self.private = private
        # What the mapped file is, for telling a derived frame's buffers apart (see
        # _views.py): (cache dir, key, token, file name), set by whoever mapped it.
        self.owner: Any = None

    @property
    def __array_interface__(self) -> dict[str, object]:
        return {"shape": (self.size,), "typestr": "|u1",
                "data": (self.address, not self.private), "version": 3}

    def __del__(self) -> None:
        global _STALE
        munmap = getattr(_libc, "munmap", None)  # gone during interpreter shutdown
        size = self.size
        if munmap is not None and size:
            # Marked gone before the address can be mapped again: see _add.
            self.size = 0
            _STALE = True
            munmap(self.address, size)


def map_file(path: str | os.PathLike[str], size: int, *, private: bool = False) -> np.ndarray:
    """A read-only uint8 array over ``path``, which must be a regular file of exactly
    ``size`` bytes (else ValueError): a mapping past the end of a file faults with SIGBUS when
    touched, so the size is checked on the very descriptor that is mapped.

    ``private``: a writable copy-on-write mapping instead (``MAP_PRIVATE``). Pages are the
    shared page-cache pages until written; a write copies just that page into this process,
    and never reaches the file or any other mapping (see :func:`written`)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # no FIFO wait
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size or size <= 0:
            raise ValueError(f"is not a regular file of {size} bytes ({st.st_size} bytes)")
        if private:
            address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                                 mmap.MAP_PRIVATE, fd, 0)
        else:
            address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(path))
    region = _Region(address, size, private)
    _LIVE.add(region)
    _add(region)
    return np.asarray(region)


# Every mapping alive in this process: memory accounting that understands sharing
# (mmcache.dask) leaves them out.
_LIVE: weakref.WeakSet[_Region] = weakref.WeakSet()

# The same mappings sorted by address, for finding which one holds an address (derived
# frames' buffers, see _views.py) in O(log n): (start addresses, weak references), replaced
# as a whole on each map, so readers never see it half-changed and take no lock. Unmapping
# does not touch it (a finalizer may run in the middle of any code): a gone region stays
# listed, dead, until the next map drops it. It can be dropped in time because a region is
# marked gone (size 0, _STALE) before its address is unmapped, so before that address can
# be mapped again and listed twice.
_TABLE: tuple[list[int], list[weakref.ref[_Region]]] = ([], [])
_TABLE_LOCK = threading.Lock()
_STALE = False


def _add(region: _Region) -> None:
    global _TABLE, _STALE
    with _TABLE_LOCK:
        starts, refs = _TABLE
        if _STALE:
            _STALE = False  # before looking: a region gone meanwhile sets it again
            alive = [(s, r) for s, r in zip(starts, refs, strict=True)
                     if (x := r()) is not None and x.size]
            starts, refs = [s for s, _ in alive], [r for _, r in alive]
        else:
            starts, refs = list(starts), list(refs)
        i = bisect.bisect_right(starts, region.address)
        starts.insert(i, region.address)
        refs.insert(i, weakref.ref(region))
        _TABLE = (starts, refs)


def any_mapped() -> bool:
    """True if this process may map a file now (cheap: no search)."""
    return bool(_TABLE[0])


def find_region(address: int, nbytes: int) -> _Region | None:
    """The live mapping that holds the ``nbytes`` bytes at ``address``, or None.
    O(log mappings)."""
    starts, refs = _TABLE
    i = bisect.bisect_right(starts, address) - 1
    if i < 0:
        return None
    r = refs[i]()
    if r is None or not r.size or address + nbytes > starts[i] + r.size:
        return None
    return r


_PAGE = mmap.PAGESIZE
# /proc/self/pagemap: one little-endian u64 per virtual page (Documentation/admin-guide/mm/
# pagemap.rst); bit 63 page present, 62 swapped, 61 file page or shared anonymous.
_PRESENT, _SWAPPED, _FILE = np.uint64(1 << 63), np.uint64(1 << 62), np.uint64(1 << 61)


def region_of(arr: np.ndarray) -> _Region | None:
    base = arr.base
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, _Region) else None


def in_private_mapping(arr: np.ndarray) -> bool:
    """True if ``arr`` views a private mapping (``map_file(private=True)``)."""
    region = region_of(arr)
    return region is not None and region.private


def written(arrays: list[np.ndarray]) -> bool:
    """True if any page of these private mappings (``map_file(private=True)``) was written
    in this process, or if that cannot be told (then the caller must assume it was).

    A page of a private file mapping that was only read is the file's page-cache page; the
    first write replaces it with an anonymous copy (present, not a file page) that may later
    be swapped out. The kernel's page table says which, without touching the data.
    """
    found = []
    for arr in arrays:
        base = region_of(arr)
        if base is None:
            return True
        found.append(base)
    return regions_written(found)


def regions_written(found: list[_Region]) -> bool:
    """:func:`written` for the mappings themselves (each must be private, else True)."""
    regions: list[tuple[int, int]] = []
    for base in found:
        if not base.private:
            return True
        if base.size:
            regions.append((base.address, base.size))
    return _written(regions)


def _written(regions: list[tuple[int, int]]) -> bool:
    """True if a page of these ``(address, size)`` private mappings was written, or if
    that cannot be told."""
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        for address, size in regions:
            first, last = address // _PAGE, (address + size - 1) // _PAGE
            raw = os.pread(fd, (last - first + 1) * 8, first * 8)
            if len(raw) != (last - first + 1) * 8:
                return True
            e = np.frombuffer(raw, dtype="<u8")
            if ((e & _SWAPPED).any()
                    or (((e & _PRESENT) != 0) & ((e & _FILE) == 0)).any()):
                return True
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def mapped_ranges() -> list[tuple[int, int]]:
    """``(start, end)`` of every cache file this process maps now and shares with other
    processes, sorted: the shared mappings, and private ones none of whose pages was written
    (a written page is this process's own copy)."""
    regions = [r for r in list(_LIVE) if r.size]
    return sorted((r.address, r.address + r.size) for r in regions
                  if not r.private or not _written([(r.address, r.size)]))
