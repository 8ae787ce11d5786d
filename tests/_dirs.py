"""Scratch directories for tests that need a real tmpfs."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mmcache import _cache


@contextlib.contextmanager
def shm_tempdir(prefix: str) -> Iterator[Path]:
    """A fresh directory on /dev/shm (else the temp dir), removed afterwards, also when a
    test left parts of it unreadable (chmod 000)."""
    shm = Path("/dev/shm")
    parent = str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield d
    finally:
        _cache._MEMO.clear()
        for p in [d, *d.rglob("*")]:
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    os.chmod(p, 0o700)
        shutil.rmtree(d, ignore_errors=True)
