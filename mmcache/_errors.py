"""Every exception mmcache raises on purpose.

Each one also inherits the builtin a caller would naturally catch, so ``except KeyError`` or
``except ValueError`` keep working around code that starts using mmcache::

    MmcacheError (Exception)
    ├── EntryNotFoundError (KeyError, FileNotFoundError)   the key is not in the cache
    ├── ColumnNotFoundError (KeyError)                     open(columns=[...]) names a missing one
    ├── EntryChangedError                                  a pickled frame's entry was re-saved
    ├── InvalidArgumentError (ValueError, TypeError)       an argument of the wrong type or value
    │   └── InvalidKeyError                                the key cannot name an entry
    ├── CorruptEntryError (ValueError)                     files do not match the metadata
    │   └── UnsupportedFormatError                         written by a newer mmcache
    ├── UnsupportedTypeError (TypeError)                   a column mmcache cannot store
    ├── CacheDirError (PermissionError)                    unsafe or unusable cache directory
    ├── CacheFullError (OSError)                           not enough room to save
    ├── CacheIOError (OSError)                             the system refused (descriptors, I/O)
    └── LockTimeoutError (TimeoutError)                    another writer held the key too long

Every exception carries the key and/or path it is about as attributes and survives pickling, so
a worker process can raise it back to its parent intact.

Warnings (``warnings.warn``, never raised): ``MmcacheWarning (UserWarning)``, for what works
but not as well as it should (a save that did not fit in RAM went to the disk-backed default).
"""

from __future__ import annotations

import os
from typing import Any


class MmcacheError(Exception):
    """Root of every exception mmcache raises on purpose."""

    def __init__(
        self, message: str, *, key: str | None = None, path: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.path = os.fspath(path) if path is not None else None

    def __str__(self) -> str:
        # KeyError would otherwise print the message with quotes around it.
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.key, self.path))


def _rebuild(
    cls: type[MmcacheError], message: str, key: str | None, path: str | None
) -> MmcacheError:
    return cls(message, key=key, path=path)


class EntryNotFoundError(MmcacheError, KeyError, FileNotFoundError):
    """The key has no entry in the cache directory."""


class ColumnNotFoundError(MmcacheError, KeyError):
    """``open(columns=...)`` asked for a column the entry does not have."""


class EntryChangedError(MmcacheError):
    """A frame pickled by reference can no longer be opened: its key was re-saved or deleted."""


class InvalidArgumentError(MmcacheError, ValueError, TypeError):
    """An argument has the wrong type or value (``columns="a"``, ``older_than="soon"``)."""


class InvalidKeyError(InvalidArgumentError):
    """The key is not a non-empty str of at most 200 characters without NUL."""


class CorruptEntryError(MmcacheError, ValueError):
    """The entry's files do not match its metadata (truncated, damaged or tampered with)."""


class UnsupportedFormatError(CorruptEntryError):
    """The entry was written in a storage format this version of mmcache does not know."""


class UnsupportedTypeError(MmcacheError, TypeError):
    """The object, a column, its index or its attrs hold something mmcache cannot store."""


class CacheDirError(MmcacheError, PermissionError):
    """The cache directory is unsafe (symlink, foreign owner, writable by others) or unusable."""


class CacheFullError(MmcacheError, OSError):
    """The cache directory's file system has no room for the entry."""


class CacheIOError(MmcacheError, OSError):
    """The operating system refused an operation (out of file descriptors, an I/O error)."""


class LockTimeoutError(MmcacheError, TimeoutError):
    """Another process held the key's lock for longer than the allowed wait."""


class MmcacheWarning(UserWarning):
    """Something worked, but not as well as it should: say how to fix it (shown once)."""
