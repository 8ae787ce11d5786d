"""Security: keys cannot escape the cache dir, unsafe cache dirs are refused, files are private,
nothing from the cache is unpickled, planted symlinks are never followed (DESIGN.md,
"Storage" and "Security")."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mmcache
from mmcache import _cache, _paths
from mmcache._paths import entry_name
from tests import _pd

pytestmark = pytest.mark.timeout(120)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534


def small_frame(seed: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "x": np.arange(50, dtype=np.float64) + seed,
            "n": np.arange(50, dtype=np.int64) * seed,
            "s": pd.array([f"{seed}-{i}" for i in range(50)], dtype="str"),
        }
    )


def tree(root: Path) -> set[Path]:
    """Every path below ``root`` (not following symlinks)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(Path(dirpath) / name)
    return out


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """``umask(mask)`` sets the process umask; the old one is restored after the test."""
    old = os.umask(0o022)
    os.umask(old)
    try:
        yield os.umask
    finally:
        os.umask(old)


# --- 7. keys ----------------------------------------------------------------------------------

# "\ud83d\ude00": a surrogate pair as two code points, which the JSON metadata would read
# back as the one character they encode (fourth views attack, finding 3)
BAD_KEYS = ["", "k" * 201, 123, None, b"x", "a\0b", "\0", "a\ud83d\ude00b"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
@pytest.mark.parametrize("verb", ["save", "open", "exists", "delete", "clean"])
def test_bad_key_is_refused(tmp_path, key, verb):
    d = tmp_path / "cache"
    calls = {
        "save": lambda: mmcache.save(small_frame(1), key, cache_dir=d),
        "open": lambda: mmcache.open(key, cache_dir=d),
        "exists": lambda: mmcache.exists(key, cache_dir=d),
        "delete": lambda: mmcache.delete(key, cache_dir=d),
        "clean": lambda: mmcache.clean([key], cache_dir=d),
    }
    with pytest.raises(mmcache.InvalidKeyError) as info:
        calls[verb]()
    assert isinstance(info.value, ValueError)
    assert not d.exists() or os.listdir(d) == []


HOSTILE_KEYS = [
    "../x",
    "../../x",
    "/etc/passwd",
    "a/b",
    ".",
    "..",
    "~",
    "~root/.bashrc",
    ".hidden",
    "x.json",
    "x.lock",
    "-rf",
    "a b\tc\nd",
    "$(touch pwned)",
    "ünïcödé ключ 鍵 🔑",
    "k" * 200,
    "é" * 200,
    "\udcff",
    "a\udcffb/..",
    "a\ude00\ud83db",  # lone surrogates, not a pair: kept as they are
]


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
def test_hostile_key_round_trips_inside_the_cache_dir(tmp_path, monkeypatch, key):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    d = tmp_path / "sub" / "cache"  # "../x" from inside would land in sub/
    before = tree(tmp_path)
    passwd = os.stat("/etc/passwd")
    df = small_frame(7)

    entry = mmcache.save(df, key, cache_dir=d)
    assert entry.key == key
    assert mmcache.exists(key, cache_dir=d)
    _pd.assert_frame_equal(mmcache.open(key, cache_dir=d), df)
    assert [e.key for e in mmcache.entries(cache_dir=d)] == [key]

    created = tree(tmp_path) - before
    assert d.parent in created and d in created
    real_d = os.path.realpath(d) + os.sep
    for path in created - {d.parent, d}:
        assert d in path.parents, f"{path} is outside the cache dir {d}"
        assert not path.is_symlink(), path
        assert os.path.realpath(path).startswith(real_d), path
    assert os.listdir(cwd) == []
    after = os.stat("/etc/passwd")
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        passwd.st_ino, passwd.st_size, passwd.st_mtime_ns,
    )

    assert mmcache.delete(key, cache_dir=d)
    assert not mmcache.exists(key, cache_dir=d)
    assert [p.name for p in d.iterdir() if not p.name.endswith(".lock")] == []


def test_keys_that_sanitise_alike_do_not_collide(tmp_path):
    d = tmp_path / "cache"
    keys = ["a/b", "a_b", "a\\b", "a b", "a.b", "a?b", "A_b", "é", "e\u0301", "k" * 200,
            "k" * 199 + "j", "\udcff", "\udcfe"]
    for i, key in enumerate(keys):
        mmcache.save(small_frame(i), key, cache_dir=d)
    _cache._MEMO.clear()
    for i, key in enumerate(keys):
        _pd.assert_frame_equal(mmcache.open(key, cache_dir=d), small_frame(i))
    assert sorted(e.key for e in mmcache.entries(cache_dir=d)) == sorted(keys)


# --- 8. the cache directory -------------------------------------------------------------------


@pytest.fixture
def default_dir(tmp_path, monkeypatch) -> Path:
    """Point the per-user default cache dir at a fresh path; no MMCACHE_DIR. (Its disk-backed
    fallback place too, so no test here looks at the real temp dir's.)"""
    monkeypatch.delenv("MMCACHE_DIR", raising=False)
    target = tmp_path / "mmcache-uid"
    monkeypatch.setattr(_paths, "default_cache_dir", lambda: target)
    monkeypatch.setattr(_paths, "disk_cache_dir", lambda: tmp_path / "disk" / "mmcache-uid")
    return target


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077], ids=oct)
def test_default_cache_dir_is_created_private(default_dir, umask, mask):
    umask(mask)
    mmcache.save(small_frame(1), "k")
    st = os.lstat(default_dir)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.getuid()
    assert (default_dir / f"{entry_name('k')}.json").exists()
    _pd.assert_frame_equal(mmcache.open("k"), small_frame(1))


def _refused(path: Path, call) -> mmcache.CacheDirError:
    with pytest.raises(mmcache.CacheDirError) as info:
        call()
    assert isinstance(info.value, PermissionError)
    assert str(path) in str(info.value), str(info.value)
    return info.value


def _default_verbs():
    return [
        lambda: mmcache.save(small_frame(1), "k"),
        lambda: mmcache.open("k"),
        lambda: mmcache.entries(),
        lambda: mmcache.clean(),
    ]


def test_default_cache_dir_symlink_is_refused(default_dir, tmp_path):
    real = tmp_path / "planted"
    real.mkdir(mode=0o700)
    os.chmod(real, 0o700)
    default_dir.symlink_to(real)
    for call in _default_verbs():
        _refused(default_dir, call)
    assert os.listdir(real) == []


def test_default_cache_dir_dangling_symlink_is_refused(default_dir, tmp_path):
    target = tmp_path / "not-yet"
    default_dir.symlink_to(target)
    _refused(default_dir, lambda: mmcache.save(small_frame(1), "k"))
    assert not target.exists()


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
def test_default_cache_dir_owned_by_another_user_is_refused(default_dir):
    default_dir.mkdir(mode=0o700)
    os.chown(default_dir, NOBODY, NOBODY)
    for call in _default_verbs():
        _refused(default_dir, call)
    assert os.listdir(default_dir) == []


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o750, 0o707, 0o701], ids=oct)
def test_default_cache_dir_open_to_others_is_refused(default_dir, mode):
    default_dir.mkdir()
    os.chmod(default_dir, mode)
    for call in _default_verbs():
        _refused(default_dir, call)
    assert os.listdir(default_dir) == []


def test_default_cache_dir_that_is_a_file_is_refused(default_dir):
    default_dir.write_bytes(b"not a directory")
    _refused(default_dir, lambda: mmcache.save(small_frame(1), "k"))
    assert default_dir.read_bytes() == b"not a directory"


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o703], ids=oct)
@pytest.mark.parametrize("via", ["argument", "MMCACHE_DIR"])
def test_explicit_world_writable_cache_dir_is_refused(tmp_path, monkeypatch, mode, via):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    if via == "argument":
        _refused(d, lambda: mmcache.save(small_frame(1), "k", cache_dir=d))
    else:
        monkeypatch.setenv("MMCACHE_DIR", str(d))
        _refused(d, lambda: mmcache.save(small_frame(1), "k"))
    assert os.listdir(d) == []


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
@pytest.mark.parametrize("via", ["argument", "MMCACHE_DIR"])
def test_explicit_cache_dir_owned_by_another_user_is_refused(tmp_path, monkeypatch, via):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    if via == "argument":
        _refused(d, lambda: mmcache.save(small_frame(1), "k", cache_dir=d))
    else:
        monkeypatch.setenv("MMCACHE_DIR", str(d))
        _refused(d, lambda: mmcache.save(small_frame(1), "k"))
    assert os.listdir(d) == []


def test_explicit_private_cache_dir_is_accepted(tmp_path):
    # The positive control for the refusals above.
    d = tmp_path / "mine"
    d.mkdir()
    os.chmod(d, 0o755)
    mmcache.save(small_frame(1), "k", cache_dir=d)
    _pd.assert_frame_equal(mmcache.open("k", cache_dir=d), small_frame(1))


# --- 9. nothing is unpickled ------------------------------------------------------------------


class _Trap:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _pickle_npy(path: Path, marker: Path, size: int | None = None) -> None:
    """An object-dtype .npy whose loading with allow_pickle=True creates ``marker``."""
    arr = np.empty(1, dtype=object)
    arr[0] = _Trap(marker)
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=True)
    if size is not None:
        raw = path.read_bytes()
        assert len(raw) <= size
        path.write_bytes(raw + b"\0" * (size - len(raw)))


def _payload_is_live(tmp_path: Path, size: int | None) -> None:
    """Check in a child that the payload really fires when numpy unpickles it."""
    probe = tmp_path / "probe.npy"
    probe_marker = tmp_path / "probe-fired"
    _pickle_npy(probe, probe_marker, size)
    code = f"import numpy as np; np.load({str(probe)!r}, allow_pickle=True)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)
    assert probe_marker.exists(), "the pickle payload does not fire: the test proves nothing"


@pytest.mark.parametrize("variant", ["as is", "padded to the expected size", "metadata says O"])
def test_pickled_payload_in_a_data_file_is_never_loaded(tmp_path, variant):
    d = tmp_path / "cache"
    mmcache.save(small_frame(1), "k", cache_dir=d)
    meta_path = d / f"{entry_name('k')}.json"
    meta = json.loads(meta_path.read_bytes())
    spec = next(f for f in meta["files"] if f["dtype"] == "<f8")
    target = d / meta["data"] / spec["name"]
    marker = tmp_path / "fired"
    size = spec["size"] if variant == "padded to the expected size" else None
    _payload_is_live(tmp_path, size)
    target.unlink()
    _pickle_npy(target, marker, size)
    if variant == "metadata says O":
        spec["dtype"] = "|O"
        spec["size"] = target.stat().st_size
        spec["count"] = 1
        meta_path.write_bytes(json.dumps(meta).encode())
    _cache._MEMO.clear()
    with pytest.raises(mmcache.MmcacheError):
        mmcache.open("k", cache_dir=d)
    assert not marker.exists(), "mmcache unpickled data from the cache"
    mmcache.delete("k", cache_dir=d)
    assert not marker.exists()


def test_pickled_metadata_is_never_loaded(tmp_path):
    d = tmp_path / "cache"
    mmcache.save(small_frame(1), "k", cache_dir=d)
    marker = tmp_path / "fired"
    payload = pickle.dumps(_Trap(marker))
    meta_path = d / f"{entry_name('k')}.json"
    meta_path.write_bytes(payload)
    _cache._MEMO.clear()
    with pytest.raises(mmcache.CorruptEntryError):
        mmcache.open("k", cache_dir=d)
    mmcache.entries(cache_dir=d)
    assert not marker.exists()
    pickle.loads(payload)  # the control: this payload does fire
    assert marker.exists()


# --- 10. file modes ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o000, 0o022], ids=oct)
def test_entry_files_are_private(tmp_path, umask, mask):
    umask(mask)
    d = tmp_path / "cache"
    for i in range(2):  # also after an overwrite
        mmcache.save(small_frame(i), "k", cache_dir=d)
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        name = entry_name("k")
        meta_path = d / f"{name}.json"
        assert stat.S_IMODE(os.lstat(meta_path).st_mode) == 0o600
        data = d / json.loads(meta_path.read_bytes())["data"]
        assert stat.S_IMODE(os.lstat(data).st_mode) == 0o700
        files = list(data.iterdir())
        assert files
        for f in files:
            assert stat.S_ISREG(os.lstat(f).st_mode)
            assert stat.S_IMODE(os.lstat(f).st_mode) == 0o600, f
        for p in tree(d):
            assert stat.S_IMODE(os.lstat(p).st_mode) & 0o077 == 0, (p, oct(os.lstat(p).st_mode))


# --- planted symlinks inside the cache dir ----------------------------------------------------


@pytest.mark.parametrize("what", ["metadata", "lock"])
def test_planted_symlink_in_the_cache_dir_is_never_followed(tmp_path, what):
    # The cache dir is private, so only its owner (or a bug) could plant these; still, mmcache
    # opens its own names with O_NOFOLLOW: the target must stay untouched, and the caller
    # should get either a working save or a clear MmcacheError.
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    os.chmod(victim, 0o644)
    name = entry_name("k")
    (d / {"metadata": f"{name}.json", "lock": f"{name}.lock"}[what]).symlink_to(victim)
    error: BaseException | None = None
    try:
        mmcache.save(small_frame(1), "k", cache_dir=d)
    except Exception as exc:
        error = exc
    assert victim.read_bytes() == b"precious\n"
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o644
    if error is None:
        _pd.assert_frame_equal(mmcache.open("k", cache_dir=d), small_frame(1))
        assert victim.read_bytes() == b"precious\n"
    else:
        assert isinstance(error, mmcache.MmcacheError), (
            f"planted {what} symlink: raw {type(error).__name__}: {error}"
        )
