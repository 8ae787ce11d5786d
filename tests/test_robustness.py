"""Robustness: crashes mid-save, concurrent writers and readers, corruption, full disks,
unsupported data (DESIGN.md, "Storage").

Every child is a fresh interpreter (tests/_robust_workers.py run as a script): a SIGBUS shows
as exit status -7 instead of killing the test run, every wait is bounded, and every child is
killed on the way out. The stress tests run on /dev/shm (tmpfs, as in production, and where
gigabytes of repeated saves cost no disk I/O) in a private directory removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import filelock
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import mmcache
from mmcache import _cache, _store
from mmcache._paths import entry_name
from tests import _pd
from tests._dirs import mounted_tmpfs
from tests._robust_workers import Child, assert_is_frame, const_problem, make_frame

pytestmark = pytest.mark.timeout(180)

SIGBUS_EXIT = -signal.SIGBUS


# --- helpers -------------------------------------------------------------------------------


def unreferenced(d: Path) -> list[str]:
    """Names in the cache dir that are neither metadata, a lock, nor data a metadata file
    points to: the leftovers of interrupted saves."""
    live = set()
    for meta in d.glob("*.json"):
        with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
            live.add(json.loads(meta.read_bytes())["data"])
    return sorted(
        p.name
        for p in d.iterdir()
        if not (p.name.endswith((".json", ".lock")) or p.name in live)
    )


def assert_complete_or_absent(d: Path, key: str, versions: set[int], nrows: int) -> int | None:
    """``key`` is absent, or opens as exactly one of the complete frames saved under it."""
    _cache._MEMO.clear()
    if not mmcache.exists(key, cache_dir=d):
        return None
    df = mmcache.open(key, cache_dir=d)
    v = int(df["version"].iloc[0])
    assert v in versions, f"{key!r} opened as version {v}, never saved under it ({versions})"
    assert_is_frame(df, v, nrows)
    del df
    _cache._MEMO.clear()
    return v


def meta_of(d: Path, key: str) -> dict:
    return json.loads((d / f"{entry_name(key)}.json").read_bytes())


def names_of(d: Path, key: str) -> list[str]:
    prefix = f"{entry_name(key)}."
    return sorted(p.name for p in d.iterdir() if p.name.startswith(prefix))


# --- 1. SIGKILL in the middle of saves -------------------------------------------------------

BIG_ROWS = 2_000_000  # 6 columns, 5 dtypes: about 62 MB per frame
K = "victim"
OTHER = "other/key"


@pytest.mark.slow
def test_sigkill_mid_save_leaves_old_or_new_entry_and_clean_removes_leftovers(shm_dir):
    d = shm_dir / "cache"
    rng = random.Random(20240611)
    delays = [0.0, 0.02, 0.05, 0.1, 0.17, 0.25, 0.4, 0.6]
    versions: dict[str, set[int]] = {K: set(), OTHER: set()}
    saw_leftovers = False
    for rnd, delay in enumerate(delays):
        plan = [[K, [10 * rnd, 10 * rnd + 1]], [OTHER, [10 * rnd + 2, 10 * rnd + 3]]]
        for key, vs in plan:
            versions[key].update(vs)
        with Child("save_loop", {"cache_dir": str(d), "nrows": BIG_ROWS, "plan": plan}) as child:
            child.expect("ready", timeout=60)
            time.sleep(delay + rng.uniform(0, 0.03))
            assert child.proc.poll() is None, f"saver died by itself:\n{child.stderr}"
            child.kill()
            assert child.proc.returncode == -signal.SIGKILL, child.stderr
        # The kernel released the dead saver's lock: the key is not stuck.
        for key in (K, OTHER):
            lock = filelock.FileLock(d / f"{entry_name(key)}.lock", timeout=5)
            lock.acquire()
            lock.release()
            assert_complete_or_absent(d, key, versions[key], BIG_ROWS)
        assert {e.key for e in mmcache.entries(cache_dir=d)} <= {K, OTHER}
        saw_leftovers = saw_leftovers or bool(unreferenced(d))
    # Eight kills at spread-out moments of a loop that is mostly writing: if none left a
    # leftover, the test did not exercise what it claims to.
    assert saw_leftovers, "no kill landed mid-save; the test exercised nothing"
    assert mmcache.exists(K, cache_dir=d) and mmcache.exists(OTHER, cache_dir=d)

    # clean(keys=[K]) removes K, and leaves the other key intact.
    removed = mmcache.clean([K], cache_dir=d)
    assert [e.key for e in removed] == [K]
    assert not mmcache.exists(K, cache_dir=d)
    assert assert_complete_or_absent(d, OTHER, versions[OTHER], BIG_ROWS) is not None

    # clean() with no selector removes every entry and every leftover: only locks remain.
    mmcache.clean(cache_dir=d)
    left = sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock"))
    assert left == [], f"clean() left {left}"
    assert mmcache.entries(cache_dir=d) == []

    # And the keys are usable again.
    small = make_frame(7, 1000)
    mmcache.save(small, K, cache_dir=d)
    _pd.assert_frame_equal(mmcache.open(K, cache_dir=d), small)


def test_clean_spares_leftovers_of_a_save_in_progress(tmp_path):
    d = tmp_path / "cache"
    mmcache.save(make_frame(1, 100), "idle", cache_dir=d)
    busy, idle = entry_name("busy"), entry_name("idle")
    # What a live save of "busy" looks like: its data dir and metadata being written.
    fakes = {}
    for stem in (busy, idle):
        data = d / f"{stem}.0123456789abcdef"
        data.mkdir(mode=0o700)
        (data / "0.npy").write_bytes(b"partial")
        tmp = d / f"{stem}.json.0123456789abcdef.tmp"
        tmp.write_bytes(b"{")
        fakes[stem] = [data, tmp]
    with Child("hold_lock", {"lock": str(d / f"{busy}.lock")}) as holder:
        holder.expect("locked", timeout=30)
        mmcache.clean(cache_dir=d)
        for path in fakes[busy]:
            assert path.exists(), f"clean() removed {path.name} while its key's lock was held"
        for path in fakes[idle]:
            assert not path.exists(), f"clean() kept unlocked leftover {path.name}"
        assert not mmcache.exists("idle", cache_dir=d)
        holder.send("release")
        report = holder.result(timeout=30)
        assert report["returncode"] == 0, report["stderr"]
    mmcache.clean(cache_dir=d)
    for path in fakes[busy]:
        assert not path.exists(), f"clean() kept {path.name} after the saver went away"
    assert sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")) == []


# --- 2. concurrent writers of one key --------------------------------------------------------


def test_concurrent_writers_of_one_key(shm_dir):
    d = shm_dir / "cache"
    key = "contended"
    nrows = 200_000  # ~6 MB per frame
    writer_versions = [101, 202, 303, 404]
    children = []
    try:
        for v in writer_versions:
            children.append(
                Child(
                    "writer_same_key",
                    {"cache_dir": str(d), "key": key, "version": v, "nrows": nrows, "times": 10},
                )
            )
        for c in children:
            c.expect("ready", timeout=60)
        for c in children:
            c.send("go")
        for c in children:
            report = c.result(timeout=120)
            assert report["returncode"] == 0 and report.get("ok"), report["stderr"]
    finally:
        for c in children:
            c.kill()
    final = assert_complete_or_absent(d, key, set(writer_versions), nrows)
    assert final is not None
    assert [e.key for e in mmcache.entries(cache_dir=d)] == [key]
    live = meta_of(d, key)["data"]
    stem = entry_name(key)
    assert names_of(d, key) == sorted([f"{stem}.json", f"{stem}.lock", live])
    assert unreferenced(d) == []


# --- 3. readers during overwrites and deletes --------------------------------------------------


def test_readers_never_see_a_mix_during_overwrites(shm_dir):
    d = shm_dir / "cache"
    stop = shm_dir / "stop"
    key = "hot"
    readers: list[Child] = []
    with Child(
        "alternating_writer",
        {"cache_dir": str(d), "key": key, "nrows": 500_000, "seconds": 3.0, "min_saves": 10},
    ) as writer:
        try:
            writer.expect("ready", timeout=60)
            for _ in range(2):
                readers.append(
                    Child(
                        "reader_loop",
                        {"cache_dir": str(d), "key": key, "stop": str(stop), "max_seconds": 60},
                    )
                )
            for r in readers:
                r.expect("ready", timeout=60)
            writer.send("go")
            wrote = writer.result(timeout=90)
            stop.touch()
            results = [r.result(timeout=60) for r in readers]
        finally:
            for r in readers:
                r.kill()
    assert wrote["returncode"] == 0 and wrote.get("ok"), wrote["stderr"]
    assert wrote["saves"] >= 10, wrote
    for res in results:
        assert res["returncode"] != SIGBUS_EXIT, "a reader died of SIGBUS"
        assert res["returncode"] == 0 and res.get("ok"), res
        # Readers overlapped the writer: each saw several versions come and go.
        assert len(res["versions"]) >= 2, res
    _cache._MEMO.clear()
    final = mmcache.open(key, cache_dir=d)
    assert const_problem(final) is None
    assert int(final["version"].iloc[0]) == wrote["saves"] + 1
    # Versions the readers mapped stayed on disk while they did; the next save or delete of
    # the key sweeps them now that nobody maps them.
    del final
    mmcache.delete(key, cache_dir=d)
    assert unreferenced(d) == []


def test_frame_survives_delete_overwrite_and_clean(shm_dir):
    args = {"cache_dir": str(shm_dir / "cache"), "key": "k", "nrows": 300_000}
    with Child("hold_after_delete", args) as child:
        report = child.result(timeout=60)
    assert report["returncode"] != SIGBUS_EXIT, "reader died of SIGBUS after delete()"
    assert report["returncode"] == 0 and report.get("ok"), report["stderr"]


# --- 4. corruption ----------------------------------------------------------------------------

CKEY = "corrupt me/1"
CROWS = 1000


def _file(d: Path, meta: dict, dtype: str) -> Path:
    spec = next(f for f in meta["files"] if f["dtype"] == dtype)
    return d / meta["data"] / spec["name"]


def _patch_header(path: Path, old: bytes, new: bytes) -> None:
    assert len(old) == len(new)
    raw = path.read_bytes()
    head = raw[:256]
    assert head.count(old) == 1, (old, head)
    path.write_bytes(head.replace(old, new) + raw[256:])


def _write_meta(d: Path, meta: dict | bytes) -> None:
    path = d / f"{entry_name(CKEY)}.json"
    path.write_bytes(meta if isinstance(meta, bytes) else json.dumps(meta).encode())


def _move_and_link(src: Path, dst: Path) -> None:
    shutil.move(src, dst)
    src.symlink_to(dst)


def _append(path: Path, extra: bytes) -> None:
    with path.open("ab") as f:
        f.write(extra)


def _shape(n: int) -> bytes:
    return f"({n},)".encode()


CORRUPTIONS: dict[str, tuple[str, Callable[[Path, dict, Path], None]]] = {
    "data truncated": (
        "CorruptEntryError",
        lambda d, m, t: os.truncate(_file(d, m, "<f8"), _file(d, m, "<f8").stat().st_size // 2),
    ),
    "data truncated to empty": (
        "CorruptEntryError", lambda d, m, t: os.truncate(_file(d, m, "<f8"), 0)
    ),
    "data extended": (
        "CorruptEntryError",
        lambda d, m, t: _append(_file(d, m, "<f8"), b"\0" * 4096),
    ),
    "header claims another dtype": (
        "CorruptEntryError", lambda d, m, t: _patch_header(_file(d, m, "<f8"), b"'<f8'", b"'<i8'")
    ),
    "header claims fewer items": (
        "CorruptEntryError",
        lambda d, m, t: _patch_header(_file(d, m, "<f8"), _shape(CROWS), b"( 999,)"),
    ),
    "header claims more items": (
        "CorruptEntryError",
        lambda d, m, t: _patch_header(_file(d, m, "<f8"), _shape(CROWS), b"(9999,)"),
    ),
    "metadata not JSON": ("CorruptEntryError", lambda d, m, t: _write_meta(d, b"{not json")),
    "metadata cut in half": (
        "CorruptEntryError",
        lambda d, m, t: _write_meta(d, json.dumps(m).encode()[: len(json.dumps(m)) // 2]),
    ),
    "metadata format 99": (
        "UnsupportedFormatError", lambda d, m, t: _write_meta(d, {**m, "format": 99})
    ),
    "metadata data points to ../x": (
        "CorruptEntryError",
        lambda d, m, t: (
            shutil.copytree(d / m["data"], d.parent / "x"),
            _write_meta(d, {**m, "data": "../x"}),
        ),
    ),
    "metadata key mismatch": (
        "CorruptEntryError", lambda d, m, t: _write_meta(d, {**m, "key": "someone else"})
    ),
    "data file is a symlink": (
        "CorruptEntryError",
        lambda d, m, t: _move_and_link(_file(d, m, "<f8"), t / "elsewhere.npy"),
    ),
    "data dir is a symlink": (
        "CorruptEntryError", lambda d, m, t: _move_and_link(d / m["data"], t / "elsewhere")
    ),
    "data file deleted": ("MmcacheError", lambda d, m, t: _file(d, m, "<f8").unlink()),
    "data dir deleted": ("MmcacheError", lambda d, m, t: shutil.rmtree(d / m["data"])),
    "metadata is a symlink": (
        "MmcacheError",
        lambda d, m, t: _move_and_link(d / f"{entry_name(CKEY)}.json", t / "meta.json"),
    ),
}


def _corrupt_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "a": np.arange(CROWS) * 1.5,
            "b": np.arange(CROWS, dtype=np.int64),
            "s": pd.array([f"s{i}" for i in range(CROWS)], dtype="str"),
        }
    )


@pytest.fixture
def corrupt_setup(tmp_path):
    """A cache with the entry to damage and a healthy neighbour."""
    d = tmp_path / "cache"
    outside = tmp_path / "outside"
    outside.mkdir()
    mmcache.save(_corrupt_frame(), CKEY, cache_dir=d)
    mmcache.save(make_frame(5, 100), "healthy", cache_dir=d)

    def damage(case: str) -> str:
        expected, mutate = CORRUPTIONS[case]
        mutate(d, meta_of(d, CKEY), outside)
        return expected

    return d, damage


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_entry_raises_a_clear_error_and_never_crashes(corrupt_setup, case):
    d, damage = corrupt_setup
    expected = damage(case)
    with Child("open_report", {"cache_dir": str(d), "key": CKEY}) as child:
        report = child.result(timeout=60)
    assert report["returncode"] != SIGBUS_EXIT, f"{case}: open() died of SIGBUS"
    assert report["returncode"] == 0, f"{case}: open() crashed:\n{report['stderr']}"
    assert not report["ok"], f"{case}: open() returned data {report.get('shape')}"
    assert "MmcacheError" in report["mro"], f"{case}: raw {report['type']}: {report['message']}"
    assert expected in report["mro"], f"{case}: {report['type']}, expected {expected}"
    msg = report["message"]
    assert CKEY in msg or str(d) in msg, f"{case}: message names neither key nor path: {msg}"
    # The damage stays local: the neighbour opens, and in this process too.
    _cache._MEMO.clear()
    _pd.assert_frame_equal(mmcache.open("healthy", cache_dir=d), make_frame(5, 100))


@pytest.mark.parametrize("case", ["data truncated", "header claims fewer items",
                                  "metadata key mismatch", "metadata format 99"])
def test_corrupt_entry_in_process_raises_the_specific_class(corrupt_setup, case):
    d, damage = corrupt_setup
    expected = getattr(mmcache, damage(case))
    _cache._MEMO.clear()
    with pytest.raises(expected) as info:
        mmcache.open(CKEY, cache_dir=d)
    assert info.value.key == CKEY or info.value.path is not None


def test_corruption_after_open_is_seen_by_the_next_open(corrupt_setup):
    # open() is memoised by the metadata file's identity; a damaged data file is caught when
    # the metadata changes (re-save) or in a fresh process, never mapped half-way.
    d, damage = corrupt_setup
    mmcache.open(CKEY, cache_dir=d)
    damage("metadata not JSON")
    with pytest.raises(mmcache.CorruptEntryError):
        mmcache.open(CKEY, cache_dir=d)


REMOVABLE = {
    "metadata not JSON": lambda d, m, t: _write_meta(d, b"{not json"),
    "metadata fields of the wrong type": lambda d, m, t: _write_meta(
        d, {**m, "created": "yesterday", "nbytes": "lots", "layout": []}
    ),
    "metadata is a symlink": CORRUPTIONS["metadata is a symlink"][1],
    "data truncated": CORRUPTIONS["data truncated"][1],
}


@pytest.mark.parametrize("case", list(REMOVABLE))
def test_corrupt_entry_does_not_break_listing(corrupt_setup, tmp_path, case):
    d, _ = corrupt_setup
    REMOVABLE[case](d, meta_of(d, CKEY), tmp_path / "outside")
    listed = {e.key for e in mmcache.entries(cache_dir=d)}
    assert listed in ({"healthy"}, {"healthy", CKEY})


@pytest.mark.parametrize("how", ["delete", "clean(keys)", "clean()"])
@pytest.mark.parametrize("case", list(REMOVABLE))
def test_corrupt_entry_can_be_removed(corrupt_setup, tmp_path, case, how):
    # The error messages say "delete the entry (mmcache.delete or `mmcache clean KEY`)":
    # that advice must work, and one bad entry must not stop clean() from cleaning.
    d, _ = corrupt_setup
    REMOVABLE[case](d, meta_of(d, CKEY), tmp_path / "outside")
    if how == "delete":
        assert mmcache.delete(CKEY, cache_dir=d) is True
    elif how == "clean(keys)":
        mmcache.clean([CKEY], cache_dir=d)
    else:
        mmcache.clean(cache_dir=d)
    left = [n for n in names_of(d, CKEY) if not n.endswith(".lock")]
    assert left == [], f"{how} left {left}"
    assert not mmcache.exists(CKEY, cache_dir=d)
    if how != "clean()":
        _pd.assert_frame_equal(mmcache.open("healthy", cache_dir=d), make_frame(5, 100))
    mmcache.save(_corrupt_frame(), CKEY, cache_dir=d)  # the key is usable again
    _pd.assert_frame_equal(mmcache.open(CKEY, cache_dir=d), _corrupt_frame())


# --- 5. full file system ----------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Path]:
    """A 20 MB tmpfs (root only); skipped where mounting is not permitted."""
    with mounted_tmpfs(tmp_path / "small", "20m") as mnt:
        yield mnt


def test_full_file_system_refuses_cleanly(small_tmpfs):
    d = small_tmpfs
    big = make_frame(1, 1_700_000)  # ~51 MB on a 20 MB file system
    with pytest.raises(mmcache.CacheFullError) as info:
        mmcache.save(big, "big", cache_dir=d)
    assert isinstance(info.value, OSError)
    assert "MMCACHE_DIR" in str(info.value)
    assert "big" in str(info.value) or str(d) in str(info.value)
    assert [n for n in os.listdir(d) if not n.endswith(".lock")] == []
    assert not mmcache.exists("big", cache_dir=d)

    # A frame that fits still saves; a second one that does not leaves the first intact, and
    # so does an overwrite that does not fit next to the old version.
    mid = make_frame(2, 400_000)  # ~12 MB
    mmcache.save(mid, "mid", cache_dir=d)
    with pytest.raises(mmcache.CacheFullError):
        mmcache.save(make_frame(3, 400_000), "mid2", cache_dir=d)
    with pytest.raises(mmcache.CacheFullError):
        mmcache.save(make_frame(4, 400_000), "mid", cache_dir=d)
    _cache._MEMO.clear()
    _pd.assert_frame_equal(mmcache.open("mid", cache_dir=d), mid)
    assert not mmcache.exists("mid2", cache_dir=d)
    assert unreferenced(d) == []

    small = make_frame(5, 10_000)
    mmcache.save(small, "small", cache_dir=d)
    _pd.assert_frame_equal(mmcache.open("small", cache_dir=d), small)
    assert unreferenced(d) == []


def test_tmpfs_filling_up_during_the_write_fails_cleanly(small_tmpfs, monkeypatch):
    """Another process fills the file system after the room check: the write itself gets
    ENOSPC (plain write() calls, never stores into a mapping: no SIGBUS), nothing is kept."""
    d = small_tmpfs
    mid = make_frame(2, 200_000)
    mmcache.save(mid, "mid", cache_dir=d)
    monkeypatch.setattr(_store, "check_room", lambda *a: None)  # the race, made certain
    with pytest.raises(mmcache.CacheFullError, match="MMCACHE_DIR"):
        mmcache.save(make_frame(1, 1_700_000), "big", cache_dir=d)
    assert not mmcache.exists("big", cache_dir=d)
    assert unreferenced(d) == []
    _cache._MEMO.clear()
    _pd.assert_frame_equal(mmcache.open("mid", cache_dir=d), mid)


def test_write_failure_after_the_room_check_raises_cache_full(tmp_path):
    # RLIMIT_FSIZE makes writes fail with EFBIG although statvfs reports plenty of room: the
    # same path as a tmpfs filling up between the check and the write.
    d = tmp_path / "cache"
    args = {"cache_dir": str(d), "nrows_big": 300_000, "nrows_small": 10_000, "limit": 1 << 20}
    with Child("save_fsize_limited", args) as child:
        report = child.result(timeout=60)
    assert report["returncode"] == 0, report["stderr"]
    assert not report["ok"], "a save bigger than RLIMIT_FSIZE succeeded?"
    assert "CacheFullError" in report["mro"], f"raw {report['type']}: {report['message']}"
    assert "MMCACHE_DIR" in report["message"]
    assert report["small_ok"], report.get("small_error")
    assert [n for n in names_of(d, "big") if not n.endswith(".lock")] == []
    assert unreferenced(d) == []


# --- 6. unsupported data ----------------------------------------------------------------------

UNSUPPORTED = {
    "dicts": pd.Series([{"a": 1}, {"b": 2}, None], dtype=object),
    "sparse": pd.Series(pd.arrays.SparseArray([0.0, 1.0, 0.0])),
    "nested list": pd.Series(
        pd.array([[1, 2], [3], None], dtype=pd.ArrowDtype(pa.list_(pa.int64())))
    ),
    "struct": pd.Series(
        pd.array([{"a": 1}, {"a": 2}, None], dtype=pd.ArrowDtype(pa.struct([("a", pa.int64())])))
    ),
    "mixed objects": pd.Series(["a", 1, None], dtype=object),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_unsupported_column_is_refused_before_writing(tmp_path, kind):
    d = tmp_path / "cache"
    col = f"bad column {kind}"
    values = UNSUPPORTED[kind]
    df = pd.DataFrame({"fine": np.arange(3.0)})
    df[col] = values.to_numpy() if values.dtype == object else values.array
    dtype = str(df[col].dtype)
    with pytest.raises(mmcache.UnsupportedTypeError) as info:
        mmcache.save(df, "k", cache_dir=d)
    assert isinstance(info.value, TypeError)
    msg = str(info.value)
    assert col in msg, msg
    assert dtype in msg, f"{dtype!r} not in {msg!r}"
    assert not d.exists() or os.listdir(d) == [], os.listdir(d)
    assert not mmcache.exists("k", cache_dir=d)
