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

import ctypes
import mmap
import os
import stat

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

    __slots__ = ("address", "size")

    def __init__(self, address: int, size: int) -> None:
        self.address = address
        self.size = size

    @property
    def __array_interface__(self) -> dict[str, object]:
        return {"shape": (self.size,), "typestr": "|u1", "data": (self.address, True),
                "version": 3}

    def __del__(self) -> None:
        munmap = getattr(_libc, "munmap", None)  # gone during interpreter shutdown
        if munmap is not None and self.size:
            munmap(self.address, self.size)
            self.size = 0


def map_file(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """A read-only uint8 array over ``path``, which must be a regular file of exactly
    ``size`` bytes (else ValueError): a mapping past the end of a file faults with SIGBUS when
    touched, so the size is checked on the very descriptor that is mapped."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # no FIFO wait
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size or size <= 0:
            raise ValueError(f"is not a regular file of {size} bytes ({st.st_size} bytes)")
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(path))
    return np.asarray(_Region(address, size))
