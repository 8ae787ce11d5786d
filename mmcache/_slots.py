"""Slots: the files ``ingest`` appends a batch's buffers to, and how they become an entry's.

A slot is one buffer of the entry's layout (a column's values, a text column's offsets or
characters, validity, category codes) growing batch by batch: either its own *staged* file
(appended to), or a *region* of a preallocated file of the entry's layout (the 2-D block
columns when the source announces its row count), written at its final place so the file is
renamed into the entry rather than copied (:func:`renamable`, :func:`fill`). Staged slots
are copied into the entry's files in the kernel (``sendfile``) and unlinked as soon as they
are copied, so the file system holds the data once plus one slot.
"""

from __future__ import annotations

import errno
import io
import os
import resource
from pathlib import Path
from typing import Any

import numpy as np

from . import _store
from ._codecs import Pool, Spec
from ._errors import CacheIOError

# Items per read when converting a staged file while packing it (bits, codes, promotion):
# bounds that step's memory to a few MB whatever the column's size.
CHUNK_ITEMS = 1 << 21
DATA = "data"  # a slot copied as is
BITS = "bits"  # one byte (0/1) a row, packed to an Arrow bitmap at the end
CODES = "codes"  # int32 category codes, narrowed to pandas' codes dtype at the end


class Fds:
    """Write descriptors of staged files, kept open across batches (opening a file for
    each of a batch's buffers cost as much as writing them), a bounded number at a time:
    a wide source has thousands of slots."""

    def __init__(self) -> None:
        self.open: dict[Path, int] = {}  # least recently used first
        # at most 128, and an eighth of the process's limit (`ulimit -n`): the reader,
        # the interpreter and the caller need theirs
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max = 128 if soft == resource.RLIM_INFINITY else max(4, min(128, soft // 8))

    def get(self, path: Path, flags: int) -> int:
        fd = self.open.pop(path, None)
        if fd is None:
            if len(self.open) >= self.max:
                os.close(self.open.pop(next(iter(self.open))))
            fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
        self.open[path] = fd
        return fd

    def close(self, path: Path | None = None) -> None:
        """Close ``path``'s descriptor (before it is replaced or unlinked), or all."""
        for p in [path] if path is not None else list(self.open):
            fd = self.open.pop(p, None)
            if fd is not None:
                os.close(fd)


class Slot:
    """One staged buffer: a file in the staging directory that batches append to, or a
    *region* of a preallocated file (``at``: that file and the byte offset where the slot's
    items start; ``cap``: how many items fit), where batches are written at their final
    place so the data are written once (see :meth:`_Stager.plan_direct`)."""

    __slots__ = ("at", "cap", "count", "dtype", "fds", "final", "kind", "path")

    def __init__(self, path: Path, dtype: np.dtype, kind: str, fds: Fds) -> None:
        self.path = path
        self.fds = fds
        self.dtype = dtype
        self.kind = kind
        self.count = 0
        self.final = np.dtype(np.uint8) if kind == BITS else dtype
        self.at: tuple[Path, int] | None = None
        self.cap = 0

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if self.at is not None and self.count + len(arr) > self.cap:
            self.leave_region()  # more rows than the source announced
        if self.at is not None:
            path, start = self.at
            _pwrite_all(self.fds.get(path, os.O_WRONLY), arr,
                        start + self.count * self.dtype.itemsize)
        else:
            fd = self.fds.get(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            _pwrite_all(fd, arr, None)
        self.count += len(arr)

    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize

    def chunks(self) -> Any:
        path, start = self.at or (self.path, 0)
        left = self.nbytes()
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            while left and (chunk := f.read(min(left, CHUNK_ITEMS * self.dtype.itemsize))):
                left -= len(chunk)
                yield np.frombuffer(chunk, dtype=self.dtype)

    def enter_region(self, path: Path, start: int, cap: int) -> None:
        """From now on, write into ``path`` from byte ``start`` (room for ``cap`` items);
        what is staged so far (one batch) moves there."""
        staged = [chunk.copy() for chunk in self.chunks()] if self.path.exists() else []
        self.fds.close(self.path)
        self.path.unlink(missing_ok=True)
        self.at, self.cap, self.count = (path, start), cap, 0
        for chunk in staged:
            self.append(chunk)

    def leave_region(self) -> None:
        """Move what is written in the region to the slot's own staged file."""
        if self.at is not None:
            self.fds.close(self.path)
            with open(self.path, "wb", buffering=0) as out:
                self.copy_region(out)
            self.at = None

    def promote(self, dtype: np.dtype) -> None:
        """Convert what is staged to ``dtype`` (an int column that met its first null)."""
        # A name clean knows (``<n>.npy``), beyond any slot's: a kill leaves nothing foreign.
        tmp = self.path.with_name(f"{int(self.path.stem) + (1 << 40)}.npy")
        with open(tmp, "wb", buffering=0) as out:
            for chunk in self.chunks():
                _store.write_all(out, chunk.astype(dtype))
        self.fds.close(self.path)
        os.replace(tmp, self.path)
        self.at = None
        self.dtype = self.final = dtype

    def final_count(self) -> int:
        return (self.count + 7) // 8 if self.kind == BITS else self.count

    def copy_region(self, out: io.RawIOBase) -> None:
        path, start = self.at or (self.path, 0)
        copy_file(path, start, self.nbytes(), out)

    def copy_to(self, out: io.RawIOBase) -> None:
        """Append this slot to ``out`` in its final form, then unlink its staged file
        (room: the data once, plus one slot)."""
        if self.kind != BITS and self.final == self.dtype:
            self.copy_region(out)
        else:
            carry = np.empty(0, dtype=np.uint8)
            for chunk in self.chunks():
                if self.kind == BITS:
                    chunk = np.concatenate([carry, chunk])
                    whole = len(chunk) - len(chunk) % 8
                    carry = chunk[whole:]
                    chunk = np.packbits(chunk[:whole], bitorder="little")
                _store.write_all(out, chunk.astype(self.final))
            if len(carry):
                _store.write_all(out, np.packbits(carry, bitorder="little"))
        if self.at is None:
            self.fds.close(self.path)
            os.unlink(self.path)


def _pwrite_all(fd: int, arr: np.ndarray, offset: int | None) -> None:
    """Write all of ``arr`` at ``offset`` (None: where ``fd`` is, e.g. appending)."""
    view = memoryview(arr.view(np.uint8))  # type: ignore[arg-type]
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def copy_file(path: Path, start: int, size: int, out: io.RawIOBase) -> None:
    """Append ``size`` bytes of ``path`` from ``start`` to ``out`` in the kernel (no pages
    through this process)."""
    with open(path, "rb", buffering=0) as src:
        offset, end = start, start + size
        try:
            while offset < end:
                sent = os.sendfile(out.fileno(), src.fileno(), offset, end - offset)
                if sent == 0:
                    raise OSError(errno.EIO, f"{path} shrank while copying")
                offset += sent
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS) or offset != start:
                raise
            src.seek(start)
            while offset < end and (chunk := src.read(min(CHUNK_ITEMS, end - offset))):
                _store.write_all(out, np.frombuffer(chunk, dtype=np.uint8))
                offset += len(chunk)


def append_ones(slot: Slot, n: int) -> None:
    for start in range(0, n, CHUNK_ITEMS):
        slot.append(np.ones(min(CHUNK_ITEMS, n - start), dtype=np.uint8))


def renamable(slots: list[Slot], direct: dict[str, tuple[Path, int]],
              pool: Pool) -> dict[str, tuple[Path, int, int]]:
    """Of the preallocated files (``direct``: per dtype, path and planned header length),
    those that hold their final file's first items at their final offsets: per dtype,
    (path, items held, bytes from the header to the last of them)."""
    out = {}
    for key, (path, head) in direct.items():
        held = {id(s) for s in slots if s.at is not None and s.at[0] == path}
        if not held or key not in pool.files or head != len(
                _store.npy_header(np.dtype(key), pool.counts[key])):
            continue
        offset, n, seen = 0, 0, 0
        for i, item in enumerate(pool.files[key]):
            if isinstance(item, Slot) and id(item) in held:
                assert item.at is not None
                if item.at[1] != head + offset:
                    break
                n, seen = i + 1, seen + 1
            elif isinstance(item, Slot) or item.any():  # only zero padding may come between
                break
            offset += item.final_count() * item.final.itemsize if isinstance(
                item, Slot) else item.nbytes
            if seen == len(held):
                out[key] = (path, n, offset)
                break
    return out


def fill(pool: Pool, files: list[Spec], data_dir: Path,
         direct: dict[str, tuple[Path, int, int]], key: str) -> None:
    """Write the entry's files: headers, small arrays, and the slots copied in; a file whose
    first items were written in place (``direct``, see :func:`renamable`) is renamed in and
    completed. On failure the renamed files go back, for a write to the other place; but
    staged slots are unlinked as they are copied (room: the data once), so a write that
    failed after copying some cannot be tried again elsewhere: that raises
    ``CacheIOError`` saying so (the first place ran out of room after its free-space check,
    e.g. another process filled it)."""
    gone = [item.path for items in pool.files.values() for item in items
            if isinstance(item, Slot) and item.at is None and not item.path.exists()]
    if gone:
        raise CacheIOError(
            f"cannot ingest key {key!r}: the RAM cache ran out of room while the entry was "
            "packed (after its free-space check: something else took the room), and the "
            "data ingest had staged there were already moved into that failed copy, so it "
            f"cannot be written to {str(data_dir.parent)!r} instead; nothing was written. "
            "Free room (`mmcache clean`) and ingest again, or ingest with cache_dir= on a "
            "bigger file system", key=key, path=gone[0],
        )
    os.mkdir(data_dir, 0o700)
    moved: list[tuple[Path, Path]] = []
    try:
        for key, spec in zip(pool.order, files, strict=True):
            target = data_dir / spec["name"]
            items = pool.files[key]
            header = _store.npy_header(np.dtype(key), spec["count"])
            if key in direct:
                path, n, nbytes = direct[key]
                try:
                    os.rename(path, target)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:  # another file system: copied below
                        raise
                else:
                    moved.append((target, path))
                    fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW)
                    with open(fd, "wb", buffering=0, closefd=True) as f:
                        os.pwrite(fd, header, 0)
                        f.seek(len(header) + nbytes)
                        _write_items(f, items[n:])
                        f.truncate(spec["size"])
                    continue
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with open(fd, "wb", buffering=0, closefd=True) as f:
                f.write(header)
                _write_items(f, items)
    except BaseException:
        for target, path in moved:
            os.rename(target, path)
        raise


def _write_items(f: io.RawIOBase, items: list[Any]) -> None:
    for item in items:
        if isinstance(item, Slot):
            item.copy_to(f)
        else:
            _store.write_all(f, item)
