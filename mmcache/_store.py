"""Files of one entry: writing them so no reader sees half of one, and mapping them safely.

Durability model: an entry is published by ``os.replace`` of its metadata file, the only file
a reader looks up by name; the data files it points to are complete before that rename and
are never modified afterwards (an overwrite writes a new data directory, a delete unlinks).
A reader that mapped the old files keeps reading them intact. Files are not fsync'ed: this is
a cache, and after a machine crash ``open`` detects a truncated file by its size instead of
faulting (SIGBUS).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import stat
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import CacheFullError, CorruptEntryError, UnsupportedFormatError
from ._mmap import map_file, region_of
from ._paths import ENV_DIR
from ._units import human

if TYPE_CHECKING:  # _codecs (pandas) loads when an entry is mapped, not to list or clean
    from ._codecs import Mapped, Pool, Spec

# The newest storage format this mmcache reads and writes. 2: categorical columns of text
# categories stored in groups (see _categories). An entry is written in the oldest format that
# holds it (format_of), so entries without such columns stay readable by older releases.
FORMAT_VERSION = 2
# Room kept free beyond the entry's own bytes, for its metadata and file-system overhead, so a
# save never fills a tmpfs to the last page (other users of /dev/shm would start failing).
FREE_MARGIN = 1 << 20
# A .npy header is at most a few hundred bytes for a 1-D array; refuse anything bigger.
MAX_HEADER = 4096
# Metadata of a 10,000-column frame is about 1 MB; refuse absurd sizes instead of reading them.
MAX_META_BYTES = 256 << 20
_O_NOATIME = getattr(os, "O_NOATIME", 0)
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def new_token() -> str:
    return uuid.uuid4().hex[:16]


@functools.lru_cache(maxsize=4096)
def npy_header(dtype: np.dtype, count: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": (count,)}
    )
    return buf.getvalue()


def plan_files(pool: Pool) -> list[Spec]:
    """Name, dtype, item count and byte size of each file the pool will write."""
    out = []
    for i, key in enumerate(pool.order):
        dtype = np.dtype(key)
        count = pool.counts[key]
        size = len(npy_header(dtype, count)) + count * dtype.itemsize
        out.append({"name": f"{i}.npy", "dtype": key, "count": count, "size": size})
    return out


def check_room(cache_dir: Path, nbytes: int, key: str) -> None:
    """Raise CacheFullError unless the file system has room for ``nbytes`` more."""
    st = os.statvfs(cache_dir)
    free = st.f_bavail * st.f_frsize
    if nbytes + FREE_MARGIN > free:
        raise CacheFullError(
            f"cannot save key {key!r}: it needs {human(nbytes)} but the file system of "
            f"{str(cache_dir)!r} has {human(free)} free; free space with `mmcache clean`, or "
            f"set {ENV_DIR} to a directory on a bigger file system (in Docker, /dev/shm is "
            "64 MB unless started with --shm-size)",
            key=key,
            path=cache_dir,
        )


def full_error(
    exc: OSError, key: str | None, where: str | os.PathLike[str]
) -> CacheFullError | None:
    """The CacheFullError for a write that failed for lack of room, else None."""
    if exc.errno not in _FULL_ERRNOS:
        return None
    about = f"cannot save key {key!r}: " if key else ""
    return CacheFullError(
        f"{about}the file system of {os.fspath(where)!r} filled up while writing "
        f"({exc.strerror}); nothing was kept. Free space with `mmcache clean`, or set "
        f"{ENV_DIR} to a directory on a bigger file system (Docker: --shm-size)",
        key=key,
        path=where,
    )


def write_data(data_dir: Path, pool: Pool, files: list[Spec]) -> None:
    """Write the pool's files into a new directory ``data_dir`` (created here, mode 0700)."""
    os.mkdir(data_dir, 0o700)
    for key, spec in zip(pool.order, files, strict=True):
        path = data_dir / spec["name"]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        # Plain write() calls, never stores into a mapping: on a full file system write()
        # fails with ENOSPC where a mapping would SIGBUS. (Reserving with posix_fallocate
        # first cost ~10% of save time on tmpfs, which zero-fills the pages it reserves.)
        with open(fd, "wb", buffering=0, closefd=True) as f:
            f.write(npy_header(np.dtype(key), spec["count"]))
            for arr in pool.files[key]:
                write_all(f, arr)


def write_all(f: io.RawIOBase, arr: np.ndarray) -> None:
    """Write all of ``arr``'s bytes to the unbuffered file ``f``."""
    view = memoryview(arr.view(np.uint8))  # type: ignore[arg-type]
    while view:  # a raw write may be partial
        n = f.write(view)
        if n is None:  # pragma: no cover - only for non-blocking files
            raise OSError(errno.EAGAIN, "short write")
        view = view[n:]


def _dumps(meta: Spec) -> bytes:
    return json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()


_SIGNED = b'{"sha256":"'


def sign(meta: Spec) -> bytes:
    """The metadata file's bytes: JSON whose first field is a SHA-256 of all the rest.

    Checked over the raw bytes at open (no re-serialisation: ~2 ms for the 1 MB metadata of
    a 10,000-column frame, against ~10 ms to re-encode it).
    """
    body = _dumps(meta)
    return _SIGNED + hashlib.sha256(body).hexdigest().encode() + b'",' + body[1:]


def _intact(raw: bytes) -> bool:
    n = len(_SIGNED)
    if not raw.startswith(_SIGNED) or raw[n + 64 : n + 66] != b'",':
        return False
    return hashlib.sha256(b"{" + raw[n + 66 :]).hexdigest().encode() == raw[n : n + 64]


def publish_meta(cache_dir: Path, name: str, token: str, meta: Spec, version_meta: Path) -> int:
    """Atomically make ``meta`` the entry's metadata (write aside, then one rename).

    The same file is first hard-linked as ``version_meta`` inside the version's data
    directory: the version can then be opened by its token after the key is re-saved (a
    reference pickled from it), and sharing one inode tells which version is current.
    Returns the metadata's size in bytes."""
    tmp = cache_dir / f"{name}.json.{token}.tmp"
    data = sign(meta)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
        try:
            os.link(tmp, version_meta)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EXDEV):
                raise
            _write_new(version_meta, data)  # a file system without hard links: a copy
        os.replace(tmp, cache_dir / f"{name}.json")
    except BaseException:
        _unlink(tmp)
        raise
    return len(data)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(fd, "wb", closefd=True) as f:
        f.write(data)


def format_of(layout: Spec) -> int:
    """The oldest storage format that holds ``layout``."""
    return 2 if "cats" in layout else 1


def read_meta(path: Path, key: str | None) -> Spec:
    """Read and check an entry's metadata. FileNotFoundError passes through."""
    # O_NOATIME: the atime records last use (set by open()); listing must not bump it.
    # O_NONBLOCK: a FIFO planted under this name must not block the reader (it is refused
    # below as not a regular file); it changes nothing for a regular file.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | _O_NOATIME)
        except PermissionError:  # O_NOATIME needs ownership; others' readers just read
            fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise  # not found, no permission, no descriptors: not damage; the caller says
        # ELOOP: a planted symlink, which mmcache never follows
        raise CorruptEntryError(
            f"metadata {str(path)!r} cannot be read ({exc.strerror}; a symlink?); remove it "
            "with `mmcache clean`",
            key=key, path=path,
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_META_BYTES:
            # (checked before wrapping the descriptor: io refuses a directory with an
            # IsADirectoryError that names the descriptor, not the path)
            raise CorruptEntryError(
                f"metadata {str(path)!r} is not a regular file of sane size (a directory or "
                "a pipe someone put there?); remove it, or delete the entry and save it again",
                key=key, path=path,
            )
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb", closefd=True) as f:
        raw = f.read()
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptEntryError(
            f"metadata {str(path)!r} is not valid JSON ({exc}); delete the entry "
            "(mmcache.delete or `mmcache clean KEY`) and save it again",
            key=key, path=path,
        ) from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise CorruptEntryError(
            f"metadata {str(path)!r} has no format version; delete the entry and save it again",
            key=key, path=path,
        )
    if not 1 <= meta["format"] <= FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"entry {str(path)!r} uses storage format {meta['format']}, this mmcache reads "
            f"formats 1 to {FORMAT_VERSION}; upgrade mmcache, or delete the entry and save it "
            "again",
            key=key, path=path,
        )
    meta.pop("sha256", None)
    if not _intact(raw):
        # Damage anywhere in the metadata (a flipped byte, a truncated write on a crashed
        # disk) would otherwise be read as a different, valid-looking layout.
        raise CorruptEntryError(
            f"metadata {str(path)!r} fails its checksum (damaged); delete the entry and save "
            "it again",
            key=key, path=path,
        )
    types: dict[str, type | tuple[type, ...]] = {
        "key": str, "token": str, "data": str, "files": list, "layout": dict,
        "created": (int, float), "nbytes": int,
    }
    if any(not isinstance(meta.get(k), t) for k, t in types.items()):
        raise CorruptEntryError(
            f"metadata {str(path)!r} lacks fields; delete the entry and save it again",
            key=key, path=path,
        )
    return meta


def map_files(
    data_dir: Path, files: list[Spec], key: str, where: str, *, private: bool = False
) -> Mapped:
    """Map each file read-only after checking it against the metadata (``private``: as
    writable copy-on-write mappings, see _mmap.map_file).

    Sizes and ``.npy`` headers are checked before any data page is touched, so a truncated or
    altered file raises CorruptEntryError instead of a SIGBUS or a wrongly shaped array.
    FileNotFoundError passes through (the entry was replaced or deleted meanwhile).
    Mappings keep no file descriptor open (see _mmap): an entry of any width, and any number
    of entries, cost no descriptors.
    """
    from ._codecs import BAD_LAYOUT, Mapped

    st = os.lstat(data_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise CorruptEntryError(
            f"{where}: data {str(data_dir)!r} is not a directory; delete the entry",
            key=key, path=data_dir,
        )
    arrays = []
    for spec in files:
        try:
            name, dtype, count, size = spec["name"], np.dtype(spec["dtype"]), spec["count"], \
                int(spec["size"])
        except BAD_LAYOUT as exc:
            raise _bad_file_entry(where, spec, key) from exc
        # Saves write plain dtypes only: fields, subarrays and 0-byte items are damage (and a
        # view of the file as one would raise numpy's errors, not CorruptEntryError).
        if (dtype.hasobject or dtype.names is not None or dtype.subdtype is not None
                or dtype.itemsize == 0 or not isinstance(name, str) or "/" in name
                or name.startswith(".") or type(count) is not int or count < 0):
            raise _bad_file_entry(where, spec, key)
        path = data_dir / name
        fst = os.lstat(path)
        if not stat.S_ISREG(fst.st_mode):
            raise CorruptEntryError(
                f"{where}: {str(path)!r} is not a regular file (a symlink?); delete the entry",
                key=key, path=path,
            )
        if fst.st_size != size:
            raise CorruptEntryError(
                f"{where}: {str(path)!r} has {fst.st_size} bytes, metadata says {size} "
                "(truncated or overwritten); delete the entry and save it again",
                key=key, path=path,
            )
        arr = _map_npy(path, dtype, count, size, key, private)
        region = region_of(arr)
        if region is not None:  # how a derived frame's buffers name their version
            region.owner = (str(data_dir.parent), key, data_dir.name.rpartition(".")[2], name)
        arrays.append(arr)
    return Mapped(arrays, where)


def _bad_file_entry(where: str, spec: Any, key: str) -> CorruptEntryError:
    return CorruptEntryError(
        f"{where}: bad file entry {spec!r:.100} in the metadata; delete the entry and save it "
        "again", key=key)


def _map_npy(
    path: Path, dtype: np.dtype, count: int, size: int, key: str, private: bool
) -> np.ndarray:
    def corrupt(why: str) -> CorruptEntryError:
        return CorruptEntryError(
            f"{str(path)!r}: {why}; delete the entry and save it again", key=key, path=path
        )

    try:
        buf = map_file(path, size, private=private)
    except ValueError as exc:
        raise corrupt(str(exc)) from None
    # The header this mmcache writes for that dtype and count, byte for byte: nothing to
    # parse (numpy's parser evaluates the header text, ~80 us a file, most of a small open).
    mine = npy_header(dtype, count)
    if size == len(mine) + count * dtype.itemsize and buf[:len(mine)].tobytes() == mine:
        return buf[len(mine):].view(dtype)
    # Any other header (another numpy's spacing, or damage): numpy's parser, then checks.
    head = io.BytesIO(buf[:MAX_HEADER].tobytes())
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, got = np.lib.format.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran, got = np.lib.format.read_array_header_2_0(head)
        else:
            raise ValueError(f"npy version {version}")
    except Exception as exc:  # numpy's parser of untrusted bytes raises many kinds
        raise corrupt(f"bad .npy header ({type(exc).__name__}: {exc})") from exc
    if got != dtype or fortran or shape != (count,):
        raise corrupt(f".npy header says {got} {shape}, metadata says {dtype} ({count},)")
    offset = head.tell()
    if offset + count * dtype.itemsize != size:
        raise corrupt("data size does not match the header")
    # A plain read-only ndarray over the mapping (never np.memmap, which pandas treats as a
    # foreign class); it keeps the mapping alive for as long as any view of it lives.
    return buf[offset:].view(dtype)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
