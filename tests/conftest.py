"""Shared fixtures: every test gets its own cache directory and a clean per-process memo."""

from __future__ import annotations

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
