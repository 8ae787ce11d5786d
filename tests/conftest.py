"""Shared fixtures: every test gets its own cache directory and a clean per-process memo."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mmcache import _cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private cache directory, also set as MMCACHE_DIR so the default API uses it."""
    d = tmp_path / "cache"
    monkeypatch.setenv("MMCACHE_DIR", str(d))
    return d


@pytest.fixture(autouse=True)
def _fresh_memo():
    """open() memoises per process; tests must not see each other's mappings."""
    _cache._MEMO.clear()
    yield
    _cache._MEMO.clear()


@pytest.fixture
def shm_dir(tmp_path):
    """A private directory on /dev/shm (tmpfs, as in production) when there is one, else
    tmp_path; removed afterwards, so multi-GB tests never leave RAM behind."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK | os.X_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="mmcache-test-", dir=shm))
    try:
        yield d
    finally:
        _cache._MEMO.clear()
        shutil.rmtree(d, ignore_errors=True)
