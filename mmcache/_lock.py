"""The per-key writer lock: ``flock(2)`` on ``NAME.lock``, exclusive across processes.

Lock files come and go (a key with no entry leaves none behind), and unlinking a lock file
is where lock-file schemes lose exclusivity: a process that opened the old file before it
was unlinked can lock that orphaned inode while a newcomer locks a fresh file at the same
path. Two rules keep exactly one holder at a time:

- **Acquire** = open (create if missing, never following a symlink), ``flock(LOCK_EX)``,
  then check that the path still names the inode just locked. If it does not (a holder
  unlinked it meanwhile), close and start again.
- **Unlink** only as the holder's very last act before unlocking, and only once.

So the inode the path names is locked by at most one process, and a process inside its
critical section always holds the inode the path names. The kernel drops the lock if the
holder dies, so a killed process never blocks the key.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from ._errors import CacheDirError, LockTimeoutError

# Polling interval bounds while waiting with a finite timeout (an infinite wait blocks in
# the kernel instead).
_MIN_SLEEP = 0.001
_MAX_SLEEP = 0.02


class KeyLock:
    """One process's hold on one lock file. Not reentrant; not shared between threads."""

    # Lock files this process holds right now (so code running inside a hold, such as a
    # finalizer triggered by garbage collection, can tell instead of waiting on itself).
    _held_here: ClassVar[set[str]] = set()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    @classmethod
    def held_here(cls, path: Path) -> bool:
        return str(path) in cls._held_here

    def acquire(self, timeout: float) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds (0: one try; inf: no limit).

        Returns False on time-out. OSErrors (ELOOP for a planted symlink, EACCES, EMFILE)
        pass through to the caller.
        """
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        deadline = time.monotonic() + timeout
        sleep = _MIN_SLEEP
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o600)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    # A FIFO, socket or device planted under the lock's name: not ours.
                    raise OSError(errno.EISDIR, "not a regular file", str(self.path))
                if timeout == float("inf"):
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    got = True
                else:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        got = True
                    except BlockingIOError:
                        got = False
                if got and self._names(fd):
                    self._fd = fd
                    KeyLock._held_here.add(str(self.path))
                    return True
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if got:
                continue  # locked an inode that was unlinked meanwhile: try the new one at once
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(min(sleep, deadline - now))
            sleep = min(sleep * 2, _MAX_SLEEP)

    def _names(self, fd: int) -> bool:
        """True if the path still names the inode open on ``fd``."""
        try:
            pst = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return os.path.samestat(pst, os.fstat(fd))

    def release_key(self) -> None:
        """Unlock, removing the lock file when its key has no entry (no ``NAME.json`` beside
        it), so keys that are gone leave no lock files behind."""
        self.release(unlink=not os.path.lexists(self.path.with_suffix(".json")))

    def release(self, *, unlink: bool = False) -> None:
        """Unlock; with ``unlink``, remove the lock file first (safe only here, see above)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        KeyLock._held_here.discard(str(self.path))
        try:
            if unlink:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            # Explicitly: a child forked inside the critical section shares this open file
            # description, and closing our descriptor alone would leave the lock held.
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


@contextlib.contextmanager
def locked(cache_dir: Path, name: str, key: str, timeout: float) -> Iterator[KeyLock]:
    """Hold ``name``'s lock for a block; on exit, release it with :meth:`KeyLock.release_key`.
    """
    lock = KeyLock(cache_dir / f"{name}.lock")
    try:
        got = lock.acquire(timeout)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR):
            raise  # no permission, no descriptors: said at the API boundary
        what = "a symlink, which mmcache never follows" if exc.errno == errno.ELOOP else \
            "not a regular file (a directory or a pipe?), which mmcache never creates there"
        raise CacheDirError(
            f"key {key!r}: lock file {str(lock.path)!r} is {what}; remove it "
            "(`mmcache clean` removes planted symlinks; a directory is left to you)",
            key=key, path=lock.path,
        ) from exc
    if not got:
        raise LockTimeoutError(
            f"key {key!r}: another process has held {str(lock.path)!r} for over "
            f"{timeout:.0f} s; wait for it, or if no process is saving this key, run "
            "`mmcache clean`",
            key=key, path=lock.path,
        )
    try:
        yield lock
    finally:
        lock.release_key()
