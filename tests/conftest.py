"""Shared fixtures: every test gets its own cache directory and a clean per-process memo;
a test marked ``system_memory`` runs while no other test of the run does (xdist workers
included)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
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


# --- system_memory tests run alone ------------------------------------------------------------
#
# A test that measures system-wide memory (MemAvailable) must not share the machine with
# another test of the same run allocating or freeing hundreds of MB: under pytest-xdist
# (README: `python -m pytest -n 2`) the other worker would do exactly that. Every test holds
# the file MMCACHE_TEST_LOCK shared, from its setup (module fixtures included) to its
# teardown; a ``system_memory`` test holds it exclusively. The controller (or a plain run)
# makes the file and passes it to the workers through the environment; a caller may set
# MMCACHE_TEST_LOCK itself to extend this to several runs at once.

LOCK_ENV = "MMCACHE_TEST_LOCK"
EXCLUSIVE_WAIT = 600.0  # then the test goes on with the lock shared (its retries remain)

_held: list[int] = []  # this process's descriptors of the lock files


def _drop_held() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


# A forked child (fork start method, a Pool worker) never keeps its copies: the parent's
# explicit unlock releases the lock whatever the child does.
os.register_at_fork(after_in_child=_drop_held)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or os.environ.get(LOCK_ENV):
        return  # an xdist worker (it got the controller's), or set by the caller
    fd, path = tempfile.mkstemp(prefix="mmcache-tests-", suffix=".lock")
    os.close(fd)
    os.environ[LOCK_ENV] = path
    config.stash[_made_key] = path


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_made_key, None)
    if path:
        os.environ.pop(LOCK_ENV, None)
        for p in (path, path + ".turn"):
            with contextlib.suppress(OSError):
                os.unlink(p)


_made_key = pytest.StashKey[str]()


@contextlib.contextmanager
def _test_lock(exclusive: bool) -> Iterator[None]:
    """Hold MMCACHE_TEST_LOCK shared, or exclusively. A turnstile file keeps a waiting
    exclusive taker from being starved by a stream of shared ones."""
    path = os.environ.get(LOCK_ENV)
    if not path:
        yield
        return
    turn = os.open(path + ".turn", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    main = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    _held.extend([turn, main])
    try:
        fcntl.flock(turn, fcntl.LOCK_EX)
        if exclusive:
            deadline = time.monotonic() + EXCLUSIVE_WAIT
            while True:
                try:
                    fcntl.flock(main, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        fcntl.flock(main, fcntl.LOCK_SH)
                        break
                    time.sleep(0.05)
        else:
            fcntl.flock(main, fcntl.LOCK_SH)
        fcntl.flock(turn, fcntl.LOCK_UN)
        yield
    finally:
        for fd in (main, turn):
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(ValueError):
                _held.remove(fd)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    with _test_lock(item.get_closest_marker("system_memory") is not None):
        yield
