"""Small /dev/shm (Docker's 64 MB): the default cache falls back to a disk-backed place.

Runs against a real 8 MB tmpfs (mounted here as root; skipped, saying why, where mounting is
not permitted) that ``MMCACHE_SHM`` points the default RAM place at, and a private directory
on a disk file system that ``TMPDIR`` points the disk place at. Children run as
``python -m tests.test_shm_fallback ROLE JSON``; every wait is bounded and every child is
killed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing as mp
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import mmcache
from mmcache import _cache, _memo, _paths, _save, _store
from mmcache._paths import entry_name
from tests import _pd
from tests._dirs import fs_type, mounted_tmpfs
from tests._zerocopy import assert_zero_copy, frame_in_cache, maps_under

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 90.0
UID = os.getuid()
SMALL_ROWS = 1_000  # ~8 KB
BIG_ROWS = 2_500_000  # 20 MB of float64: more than the whole 8 MB tmpfs
MEMORY_FS = {"tmpfs", "ramfs", "devtmpfs", "?"}


def small_frame(seed: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"a": np.arange(SMALL_ROWS, dtype=np.float64) + seed})


def big_frame(seed: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"a": np.arange(BIG_ROWS, dtype=np.float64) + seed})


def own(d: Path, key: str) -> list[str]:
    """``key``'s names in ``d`` (none when ``d`` does not exist)."""
    prefix = f"{entry_name(key)}."
    return sorted(n for n in os.listdir(d) if n.startswith(prefix)) if d.is_dir() else []


def published(d: Path, key: str) -> bool:
    return (d / f"{entry_name(key)}.json").exists()


def data_dirs(d: Path, key: str) -> list[str]:
    return [n for n in own(d, key) if (d / n).is_dir()]


@dataclass
class Places:
    shm: Path  # the small tmpfs ($MMCACHE_SHM)
    tmp: Path  # the private temp dir on disk ($TMPDIR)
    ram: Path  # the default RAM place
    disk: Path  # the default disk place

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in ("MMCACHE_DIR", "MMCACHE_MAX_BYTES"):
            env.pop(var, None)
        env.update(MMCACHE_SHM=str(self.shm), TMPDIR=str(self.tmp))
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Places]:
    """The default cache on an 8 MB tmpfs (RAM) and a private disk directory (fallback)."""
    for parent in (tmp_path, Path("/var/tmp")):
        if fs_type(parent) not in MEMORY_FS and os.access(parent, os.W_OK):
            break
    else:
        pytest.skip("no disk-backed (non-tmpfs) writable directory for the disk place")
    tmp = Path(tempfile.mkdtemp(prefix="mmcache-tmpdir-", dir=parent))
    try:
        with mounted_tmpfs(tmp_path / "shm", "8m") as shm:
            monkeypatch.delenv("MMCACHE_DIR", raising=False)
            monkeypatch.delenv("MMCACHE_MAX_BYTES", raising=False)
            monkeypatch.setenv("MMCACHE_SHM", str(shm))
            monkeypatch.setenv("TMPDIR", str(tmp))
            monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # gettempdir() caches $TMPDIR
            monkeypatch.setattr(_save, "_fallback_warned", False)
            p = Places(shm, tmp, shm / f"mmcache-{UID}", tmp / f"mmcache-{UID}")
            assert _paths.default_places() == [p.ram, p.disk]
            assert fs_type(p.shm) == "tmpfs" and fs_type(p.tmp) not in MEMORY_FS
            yield p
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_big(frame: pd.DataFrame, key: str, **kwargs: Any) -> mmcache.Entry:
    """Save a frame that cannot fit in RAM, expecting the one fallback warning."""
    with pytest.warns(mmcache.MmcacheWarning):
        return mmcache.save(frame, key, **kwargs)


@contextlib.contextmanager
def no_mmcache_warning() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    assert [str(w.message) for w in seen if issubclass(w.category, mmcache.MmcacheWarning)] \
        == []


def cli(p: Places, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mmcache", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=p.env(), cwd=REPO, check=False)


# --- where saves go ----------------------------------------------------------------------------


def test_small_entry_goes_to_ram_big_one_to_disk_with_one_warning(places):
    p = places
    with no_mmcache_warning():
        e = mmcache.save(small_frame(), "small")
    assert e.cache_dir == p.ram and published(p.ram, "small")
    assert not p.disk.exists(), "a save that fit in RAM created the disk place"

    with pytest.warns(mmcache.MmcacheWarning) as record:
        e = mmcache.save(big_frame(), "big")
    assert len(record) == 1
    msg = str(record[0].message)
    for part in ("--shm-size", "MMCACHE_DIR", "MMCACHE_SHM", str(p.ram), str(p.disk), "'big'"):
        assert part in msg, f"{part!r} not in {msg!r}"
    assert record[0].filename == __file__, "the warning should point at the caller's line"
    assert e.cache_dir == p.disk
    assert published(p.disk, "big") and own(p.ram, "big") == []
    st = os.lstat(p.disk)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700

    # Once per process: the next entry that does not fit goes to disk silently, and one that
    # fits still goes to RAM.
    with no_mmcache_warning():
        assert mmcache.save(big_frame(1), "big2").cache_dir == p.disk
        assert mmcache.save(small_frame(1), "small2").cache_dir == p.ram


def child_warnings(a: dict[str, Any]) -> None:
    """Save three big entries in a fresh process; report the warnings and where they went."""
    import mmcache

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dirs = [str(mmcache.save(big_frame(i), f"big{i}").cache_dir) for i in range(3)]
    print(json.dumps({"dirs": dirs, "warnings": [
        str(w.message) for w in seen if issubclass(w.category, mmcache.MmcacheWarning)
    ]}))


def run_child(p: Places, role: str, args: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_shm_fallback", role, json.dumps(args)],
        capture_output=True, text=True, timeout=TIMEOUT, env=p.env(), cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_fresh_process_warns_once(places):
    r = run_child(places, "child_warnings", {})
    assert r["dirs"] == [str(places.disk)] * 3
    assert len(r["warnings"]) == 1, r["warnings"]


def test_write_that_fills_ram_midway_is_retried_on_disk(places, monkeypatch):
    """The free-space check passed (another process freed room, or lied) but the write hits
    ENOSPC: what was written in RAM goes, and the entry is written on disk."""
    p = places
    mmcache.save(small_frame(), "small")
    monkeypatch.setattr(_store, "check_room", lambda *a: None)  # the race, made certain
    e = save_big(big_frame(), "big")
    assert e.cache_dir == p.disk
    assert own(p.ram, "big") in ([], [f"{entry_name('big')}.lock"])
    assert [n for n in own(p.ram, "big") if not n.endswith(".lock")] == []
    _cache._MEMO.clear()
    pd.testing.assert_frame_equal(mmcache.open("big"), big_frame())
    pd.testing.assert_frame_equal(mmcache.open("small"), small_frame())


def test_explicit_cache_dir_and_mmcache_dir_never_fall_back(places, monkeypatch):
    p = places
    with no_mmcache_warning():
        with pytest.raises(mmcache.CacheFullError, match="MMCACHE_DIR"):
            mmcache.save(big_frame(), "big", cache_dir=p.shm / "explicit")
        with pytest.raises(mmcache.CacheFullError, match="MMCACHE_DIR"):
            mmcache.Cache(p.shm / "explicit").save(big_frame(), "big")
        monkeypatch.setenv("MMCACHE_DIR", str(p.shm / "from-env"))
        with pytest.raises(mmcache.CacheFullError, match="MMCACHE_DIR"):
            mmcache.save(big_frame(), "big")
        assert not mmcache.exists("big")
    assert not p.disk.exists(), "an explicit directory fell back to the disk place"
    for d in (p.shm / "explicit", p.shm / "from-env"):
        assert [n for n in os.listdir(d) if not n.endswith(".lock")] == []


def test_both_places_full_raises_cache_full_naming_both(places, tmp_path, monkeypatch):
    p = places
    with mounted_tmpfs(tmp_path / "tiny-tmp", "4m") as tiny:
        monkeypatch.setattr(tempfile, "tempdir", str(tiny))
        disk = tiny / f"mmcache-{UID}"
        with no_mmcache_warning(), pytest.raises(mmcache.CacheFullError) as info:
            mmcache.save(big_frame(), "big")
        msg = str(info.value)
        for part in (str(p.ram), str(disk), "--shm-size", "MMCACHE_DIR"):
            assert part in msg, f"{part!r} not in {msg!r}"
        assert not mmcache.exists("big")
        assert not disk.exists() or os.listdir(disk) == []


# --- every verb sees both places -----------------------------------------------------------------


@pytest.fixture
def two_entries(places):
    """'small' in RAM, 'big' on disk."""
    mmcache.save(small_frame(), "small")
    save_big(big_frame(), "big")
    _cache._MEMO.clear()
    return places


def test_open_exists_entries_info_see_the_disk_entry(two_entries):
    p = two_entries
    assert mmcache.exists("big") and mmcache.exists("small")
    assert mmcache.Cache().exists("big") and mmcache.Cache(None).exists("big")
    got = mmcache.open("big")
    pd.testing.assert_frame_equal(got, big_frame())
    # Zero-copy from the disk place's file: the buffers lie in a mapping of a file there.
    assert_zero_copy(got, p.disk)
    assert frame_in_cache(got, p.disk) and not frame_in_cache(got, p.ram)
    data = json.loads((p.disk / f"{entry_name('big')}.json").read_bytes())["data"]
    assert {os.path.dirname(f) for _, _, f in maps_under(p.disk)} == {str(p.disk / data)}
    pd.testing.assert_frame_equal(mmcache.open("small"), small_frame())
    pd.testing.assert_frame_equal(mmcache.open("big", columns=["a"]), big_frame())

    listed = {e.key: e for e in mmcache.entries()}
    assert set(listed) == {"small", "big"}
    assert listed["small"].cache_dir == p.ram and listed["big"].cache_dir == p.disk
    assert [e.key for e in mmcache.Cache().entries()] == ["small", "big"]  # oldest first
    assert listed["big"].nrows == BIG_ROWS
    entry, dtypes, _, _ = mmcache.Cache()._describe("big")
    assert entry.cache_dir == p.disk and dtypes == [("a", "float64")]
    with pytest.raises(mmcache.EntryNotFoundError) as info:
        mmcache.open("nope")
    assert str(p.ram) in str(info.value) and str(p.disk) in str(info.value)


def test_delete_and_clean_reach_the_disk_place(two_entries):
    p = two_entries
    assert [e.key for e in mmcache.clean(["big"], dry_run=True)] == ["big"]
    assert mmcache.delete("big") is True
    assert not mmcache.exists("big") and own(p.disk, "big") == []
    assert mmcache.delete("big") is False
    with no_mmcache_warning():  # warned once already
        mmcache.save(big_frame(), "big")
    assert [e.key for e in mmcache.clean(["big"])] == ["big"]
    assert own(p.disk, "big") == [] and mmcache.exists("small")
    with no_mmcache_warning():
        mmcache.save(big_frame(), "big")
    assert sorted(e.key for e in mmcache.clean()) == ["big", "small"]
    assert mmcache.entries() == []
    assert os.listdir(p.ram) == [] and os.listdir(p.disk) == []


def test_delete_removes_a_planted_metadata_symlink_in_the_disk_place(places, tmp_path):
    p = places
    p.disk.mkdir(mode=0o700)
    target = tmp_path / "yours"
    target.write_text("not mmcache's")
    (p.disk / f"{entry_name('k')}.json").symlink_to(target)
    assert mmcache.delete("k") is True
    assert own(p.disk, "k") == [] and target.read_text() == "not mmcache's"


def test_max_bytes_counts_both_places(places):
    p = places
    mid = pd.DataFrame({"a": np.arange(625_000, dtype=np.float64)})  # 5 MB: fits in RAM
    big = save_big(big_frame(), "big")
    # Each place alone is under 24 MB; together they are not: the least recently used
    # entry goes, although it is in the other place.
    cache = mmcache.Cache(max_bytes="24MB")
    e = cache.save(mid, "mid")
    assert e.cache_dir == p.ram
    assert [x.key for x in cache.entries()] == ["mid"] and own(p.disk, "big") == []

    # clean(max_bytes=) too: the disk entry alone and the RAM entry alone fit the limit.
    with no_mmcache_warning():
        big = mmcache.save(big_frame(), "big")
    mmcache.open("mid")  # now the most recently used
    limit = big.nbytes + e.nbytes - 1
    assert [x.key for x in mmcache.clean(max_bytes=limit)] == ["big"]
    assert [x.key for x in mmcache.entries()] == ["mid"]


def test_cli_ls_info_clean_cover_both_places(two_entries):
    p = two_entries
    r = cli(p, "ls")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert str(p.ram) in lines[0] and str(p.disk) in lines[0], r.stdout
    assert lines[1].split() == ["KEY", "SIZE", "ROWS", "COLS", "CREATED", "LAST", "USED",
                                "IN", "USE", "WHERE"]
    rows = {line.split()[0]: line.split()[-1] for line in lines[2:4]}
    assert rows == {"small": "ram", "big": "disk"}, r.stdout
    assert "2 entries" in lines[-1] and str(p.ram) in lines[-1] and str(p.disk) in lines[-1]

    r = cli(p, "ls", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cache_dirs"] == [str(p.ram), str(p.disk)]
    assert {e["key"]: e["cache_dir"] for e in out["entries"]} == {
        "small": str(p.ram), "big": str(p.disk)}

    r = cli(p, "info", "big")
    assert r.returncode == 0, r.stderr
    assert str(p.disk / f"{entry_name('big')}.json") in r.stdout

    r = cli(p, "clean", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would remove big" in r.stdout and "would remove small" in r.stdout
    r = cli(p, "clean", "big")
    assert r.returncode == 0, r.stderr
    assert "removed big" in r.stdout and not mmcache.exists("big")
    assert mmcache.exists("small")
    r = cli(p, "clean")
    assert r.returncode == 0, r.stderr
    assert "removed small" in r.stdout and str(p.disk) in r.stdout.splitlines()[-1]
    assert mmcache.entries() == []


def test_cli_help_names_the_environment(places):
    r = cli(places, "--help")
    assert r.returncode == 0
    assert "MMCACHE_SHM" in r.stdout and "MMCACHE_DIR" in r.stdout


# --- a key lives in one place --------------------------------------------------------------------


def test_resave_moves_the_key_and_old_frames_stay_intact(places):
    p = places
    e_ram = mmcache.save(small_frame(), "k")
    small_held = mmcache.open("k")
    e = save_big(big_frame(), "k")  # RAM -> disk
    assert e.cache_dir == p.disk
    assert not published(p.ram, "k") and published(p.disk, "k")
    assert [x.key for x in mmcache.entries()] == ["k"]
    pd.testing.assert_frame_equal(small_held, small_frame())  # mapped from RAM: intact
    small_held.loc[0, "a"] = -1.0  # in-place edits still work
    assert data_dirs(p.ram, "k"), "the old version was swept while still mapped"
    pd.testing.assert_frame_equal(mmcache.open("k"), big_frame())
    # The handle returned by the first save follows the key to its new place.
    pd.testing.assert_frame_equal(e_ram.open(), big_frame())

    big_held = mmcache.open("k")
    del small_held
    gc.collect()
    assert own(p.ram, "k") == [], "the old RAM version outlived its last frame"

    e = mmcache.save(small_frame(2), "k")  # disk -> RAM
    assert e.cache_dir == p.ram
    assert published(p.ram, "k") and not published(p.disk, "k")
    assert [(x.key, x.cache_dir) for x in mmcache.entries()] == [("k", p.ram)]
    pd.testing.assert_frame_equal(big_held, big_frame())  # mapped from disk: intact
    assert float(big_held["a"].sum()) == float(big_frame()["a"].sum())
    pd.testing.assert_frame_equal(mmcache.open("k"), small_frame(2))
    del big_held
    gc.collect()
    assert own(p.disk, "k") == [], "the old disk version outlived its last frame"


@pytest.mark.parametrize("verb", ["open", "exists"])
def test_a_key_moved_while_being_looked_up_is_found(places, monkeypatch, verb):
    """The reader looks where the key is (exists: RAM first; open: the place holding it),
    then a save moves the key to RAM (publish there, then unpublish on disk) before the
    reader finds it: it must look in the other place again rather than call it missing."""
    p = places
    save_big(big_frame(), "k")
    ram_meta = str(p.ram / f"{entry_name('k')}.json")
    moved = []

    def move() -> None:
        if not moved:
            moved.append(mmcache.save(small_frame(), "k").cache_dir)

    if verb == "open":
        real_load = _memo.load

        def load(cache_dir, key, name, **kwargs):
            # The reader chose where to look first (disk: the key is there), then the key
            # moves to RAM before it looks: not found there, it must look in RAM.
            move()
            return real_load(cache_dir, key, name, **kwargs)

        monkeypatch.setattr(_memo, "load", load)
        pd.testing.assert_frame_equal(mmcache.open("k"), small_frame())
    else:
        real_exists = os.path.exists

        def exists(path):
            found = real_exists(path)
            if not found and os.fspath(path) == ram_meta:
                move()
            return found

        monkeypatch.setattr(os.path, "exists", exists)
        assert mmcache.exists("k")
    assert moved == [p.ram]
    assert not published(p.disk, "k")


def test_open_with_build_falls_back_too(places):
    p = places
    calls = []

    def build() -> pd.DataFrame:
        calls.append(1)
        return big_frame()

    with pytest.warns(mmcache.MmcacheWarning):
        got = mmcache.open("built", build=build)
    pd.testing.assert_frame_equal(got, big_frame())
    assert published(p.disk, "built") and calls == [1]
    pd.testing.assert_frame_equal(mmcache.open("built", build=build), big_frame())
    assert calls == [1]


def child_saver(a: dict[str, Any]) -> None:
    """Wait for the start file, then save the key ``rounds`` times (big or small frames)."""
    import mmcache

    warnings.simplefilter("ignore")
    make = big_frame if a["big"] else small_frame
    frames = [make(i) for i in range(a["rounds"])]
    _wait_for(Path(a["start"]))
    for f in frames:
        mmcache.save(f, a["key"])
    print(json.dumps({"ok": True}))


def child_reader(a: dict[str, Any]) -> None:
    """Probe and open the key until the stop file appears; count opens, misses (from open
    or exists) and wrong frames."""
    import mmcache

    _wait_for(Path(a["start"]))
    opens = missing = wrong = 0
    stop = Path(a["stop"])
    while not stop.exists():
        # exists() is the cheap probe (a stat or a few): many chances to fall between a move's
        # publish in one place and its unpublish in the other.
        missing += sum(not mmcache.exists(a["key"]) for _ in range(50))
        try:
            df = mmcache.open(a["key"])
        except mmcache.EntryNotFoundError:
            missing += 1
            continue
        n = len(df)
        values = df["a"].to_numpy()
        first = float(values[0])
        # Every version holds arange(n) + seed: check the whole column is one version.
        if n not in (SMALL_ROWS, BIG_ROWS) or not np.array_equal(
            values, np.arange(n, dtype=np.float64) + first
        ):
            wrong += 1
        opens += 1
        del df, values
    print(json.dumps({"opens": opens, "missing": missing, "wrong": wrong}))


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)


def test_concurrent_saves_to_both_places_end_in_one_place(places, tmp_path):
    """One process saves the key big (disk), another small (RAM), a third keeps opening it:
    the writers take turns, the reader never finds the key missing or mixed, and the key
    ends in exactly one place with no half entries."""
    p = places
    mmcache.save(small_frame(), "k")
    start, stop = tmp_path / "start", tmp_path / "stop"
    common = {"key": "k", "start": str(start), "stop": str(stop), "rounds": 8}
    procs: list[subprocess.Popen[str]] = []
    try:
        for role, extra in (("child_saver", {"big": True}), ("child_saver", {"big": False}),
                            ("child_reader", {})):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.test_shm_fallback", role,
                 json.dumps({**common, **extra})],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=p.env(),
                cwd=REPO,
            ))
        time.sleep(0.5)  # let them import
        start.touch()
        outs = []
        for proc in procs[:2]:
            out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, err
            outs.append(out)
        stop.touch()
        out, err = procs[2].communicate(timeout=TIMEOUT)
        assert procs[2].returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    r = json.loads(out.strip().splitlines()[-1])
    assert r["missing"] == 0 and r["wrong"] == 0 and r["opens"] > 0, r

    assert published(p.ram, "k") + published(p.disk, "k") == 1
    listed = mmcache.entries()
    assert [e.key for e in listed] == ["k"]
    got = mmcache.open("k")
    assert len(got) in (SMALL_ROWS, BIG_ROWS)
    del got
    _cache._MEMO.clear()
    gc.collect()
    s = mmcache.Cache()._survey()
    assert s.problems == [] and s.saving == [], s
    mmcache.clean()
    assert os.listdir(p.ram) == [] and os.listdir(p.disk) == []


# --- references to entries on the disk place -----------------------------------------------------


def reopen_in_child(payload: bytes) -> dict[str, Any]:
    """Spawned worker: unpickle a frame or Entry, read it, say where its buffers live."""
    obj = pickle.loads(payload)
    df = obj.open() if isinstance(obj, mmcache.Entry) else obj
    disk = os.path.join(tempfile.gettempdir(), f"mmcache-{os.getuid()}")
    return {"sum": float(df["a"].sum()), "rows": len(df),
            "on_disk": frame_in_cache(df, disk)}


def test_pickled_reference_to_a_disk_entry_opens_in_a_spawn_child(places):
    p = places
    entry = save_big(big_frame(), "big")
    df = mmcache.open("big")
    payload = pickle.dumps(df)
    assert len(payload) < 1024, "an opened frame should pickle as a reference"
    expected = {"sum": float(big_frame()["a"].sum()), "rows": BIG_ROWS, "on_disk": True}
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(1)
    try:
        assert pool.apply_async(reopen_in_child, (payload,)).get(timeout=TIMEOUT) == expected
        got = pool.apply_async(reopen_in_child, (pickle.dumps(entry),)).get(timeout=TIMEOUT)
        assert got == expected
    finally:
        pool.terminate()
        pool.join()
    assert entry.cache_dir == p.disk


# --- configuration -------------------------------------------------------------------------------


def test_default_places(tmp_path, monkeypatch):
    monkeypatch.delenv("MMCACHE_SHM", raising=False)
    monkeypatch.delenv("MMCACHE_DIR", raising=False)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    disk = tmp / f"mmcache-{UID}"
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        assert _paths.default_places() == [shm / f"mmcache-{UID}", disk]
        assert _paths.default_cache_dir() == shm / f"mmcache-{UID}"
    # No usable RAM file system: the disk place is the only default, as before.
    monkeypatch.setattr(_paths, "shm_root", lambda: None)
    assert _paths.default_places() == [disk]
    assert mmcache.Cache()._places() == [disk]
    monkeypatch.undo()
    # A temp dir on the RAM file system is one place, not two.
    monkeypatch.delenv("MMCACHE_DIR", raising=False)
    monkeypatch.setenv("MMCACHE_SHM", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    assert _paths.default_places() == [disk]
    # MMCACHE_DIR or an argument: one place, whatever the defaults.
    monkeypatch.setenv("MMCACHE_DIR", str(tmp_path / "env"))
    assert mmcache.Cache()._places() == [tmp_path / "env"]
    assert mmcache.Cache(tmp_path / "arg")._places() == [tmp_path / "arg"]


def test_mmcache_shm_that_is_not_a_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MMCACHE_DIR", raising=False)
    monkeypatch.setenv("MMCACHE_SHM", str(tmp_path / "missing"))
    for call in (lambda: mmcache.save(small_frame(), "k"), lambda: mmcache.open("k"),
                 mmcache.entries):
        with pytest.raises(mmcache.CacheDirError, match="MMCACHE_SHM"):
            call()
    assert not (tmp_path / "missing").exists()


def test_unsafe_disk_place_is_never_used_and_ram_keeps_working(places, tmp_path):
    """Another user may plant a directory or symlink where the disk place goes (a sticky /tmp
    the victim cannot clean): it is never read nor written, entries in RAM stay usable, and
    only a save that needs the disk place fails, saying why."""
    p = places
    mmcache.save(small_frame(), "small")
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    p.disk.symlink_to(planted)
    (planted / f"{entry_name('small')}.json").write_text("{}")  # bait: never read
    with pytest.raises(mmcache.CacheDirError, match="symlink"):
        mmcache.save(big_frame(), "big")
    _pd.assert_frame_equal(mmcache.open("small"), small_frame())
    assert [e.key for e in mmcache.entries()] == ["small"]
    assert mmcache.exists("small") and not mmcache.exists("big")
    mmcache.save(small_frame(1), "small2")  # fits in RAM: saved there
    assert published(p.ram, "small2")
    assert sorted(os.listdir(planted)) == [f"{entry_name('small')}.json"]


@pytest.mark.parametrize("move", ["ram-to-disk", "disk-to-ram"])
def test_save_killed_while_moving_a_key_leaves_the_newer_one_found(places, move):
    """A save killed after publishing the key in its new place and before removing it from
    the old one leaves it in both: open(), exists() and entries() give the newer one only,
    and the key's next save removes the older."""
    p = places
    first, second = ("small", "big") if move == "ram-to-disk" else ("big", "small")
    with no_mmcache_warning() if first == "small" else pytest.warns(mmcache.MmcacheWarning):
        mmcache.save(small_frame(1) if first == "small" else big_frame(1), "k")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_shm_fallback", "child_killed_mid_move",
         json.dumps({"size": second})],
        capture_output=True, text=True, timeout=TIMEOUT, env=p.env(), cwd=REPO, check=False)
    assert proc.returncode == 9, proc.stderr  # died between publishing and unpublishing
    assert published(p.ram, "k") and published(p.disk, "k")  # the state the kill left
    newer = small_frame(2) if second == "small" else big_frame(2)
    _cache._MEMO.clear()
    _pd.assert_frame_equal(mmcache.open("k"), newer)
    assert mmcache.exists("k")
    (listed,) = mmcache.entries()
    assert listed.key == "k" and listed.cache_dir == (p.disk if second == "big" else p.ram)
    dry = mmcache.Cache()._clean_report(None, None, None, dry_run=True)  # `mmcache clean -n`
    assert dry.entries and [x.path for x in dry.stale] == [
        (p.ram if second == "big" else p.disk) / f"{entry_name('k')}.json"]
    if move == "ram-to-disk":
        # clean() by size with the older copy in use by this process: the older copy goes,
        # never the newer one (each copy is not a key of its own)
        held = mmcache.open("k")
        mmcache.clean(max_bytes=10**12)
        assert published(p.disk, "k") and not published(p.ram, "k")
        _pd.assert_frame_equal(mmcache.open("k"), newer)
        del held
    mmcache.save(small_frame(3), "k")  # the next save leaves one place
    assert published(p.ram, "k") and not published(p.disk, "k")
    _pd.assert_frame_equal(mmcache.open("k"), small_frame(3))


def child_killed_mid_move(a: dict[str, Any]) -> None:
    """Save k (big or small) and die right after publishing it, as a SIGKILL there would."""
    import warnings

    from mmcache import _clean

    warnings.simplefilter("ignore", mmcache.MmcacheWarning)
    _clean.delete_locked = lambda *args, **kwargs: os._exit(9)
    mmcache.save(big_frame(2) if a["size"] == "big" else small_frame(2), "k")
    os._exit(0)  # the key was not in the other place: no kill happened


# --- children: python -m tests.test_shm_fallback ROLE JSON ---------------------------------------

ROLES = {f.__name__: f for f in (child_warnings, child_saver, child_reader,
                                 child_killed_mid_move)}

if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
