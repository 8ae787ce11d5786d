"""Faults (issue 5, part 2): a read-only cache dir, another user's entry files, the
file-descriptor limit, a lock held by a dead process, a disk-backed (non-tmpfs) cache dir,
entry files removed behind a reader's back, and a reader racing a delete.

Each fault is expected to give a specific ``MmcacheError`` with a message that names what is
wrong, leave nothing half-written and lose nothing. The permission faults need a real
unprivileged user (root ignores file modes), so they run in a child that drops to uid/gid
65534 and are skipped unless the tests run as root. Children are fresh interpreters running
this file (``python -m tests.test_faults ROLE JSON``), so a crash or SIGBUS shows as an exit
status; every wait is bounded and every child is killed on the way out.

Out of scope: truncating a file that a reader has mapped SIGBUSes that reader (the kernel's
rule for every mapping, see SECURITY.md). What is tested is that mmcache's own operations
(delete, re-save, clean) never truncate: a reader holding a frame reads all of it afterwards.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import mmcache
from mmcache import _cache, _store
from mmcache._paths import entry_name
from tests import _pd
from tests._dirs import fs_type, shm_tempdir
from tests._robust_workers import Child, exc_report
from tests._stress_workers import assemble, base_parts, problem
from tests._zerocopy import assert_zero_copy, maps_under

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534
CHILD_TIMEOUT = 90.0
TEN_YEARS = dt.timedelta(days=3650)
needs_root = pytest.mark.skipif(not IS_ROOT, reason="dropping to another uid needs root")


# --- helpers (also used by the children) -----------------------------------------------------


def small_frame(seed: int, nrows: int = 200) -> pd.DataFrame:
    """Five kinds of column (several files per entry): float, int, str with nulls, category,
    nullable int."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "x": rng.random(nrows),
            "i": np.arange(nrows, dtype=np.int64) * seed,
            "s": pd.array([None if j % 7 == 0 else f"{seed}-{j}" for j in range(nrows)],
                          dtype="str"),
            "c": pd.Categorical.from_codes(np.arange(nrows, dtype=np.int8) % 3,
                                           categories=["a", "b", "c"]),
            "n": pd.array([None if j % 5 == 0 else j for j in range(nrows)], dtype="Int32"),
        }
    )


def listing(d: Path) -> list[str]:
    """Every path below ``d``, relative, with a trailing / for directories."""
    out = []
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        out.append(rel + "/" if p.is_dir() and not p.is_symlink() else rel)
    return out


def leftovers(d: Path) -> list[str]:
    """Names no readable metadata accounts for (data of failed saves, temp files)."""
    live = set()
    for meta in d.glob("*.json"):
        with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
            live.add(json.loads(meta.read_bytes())["data"])
    return sorted(p.name for p in d.iterdir()
                  if not (p.name.endswith((".json", ".lock")) or p.name in live))


def intact(d: Path, key: str, expected: pd.DataFrame) -> bool | str:
    """True if ``key`` opens (afresh) as ``expected``, else why not."""
    _cache._MEMO.clear()
    try:
        _pd.assert_frame_equal(mmcache.open(key, cache_dir=d), expected)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        _cache._MEMO.clear()
    return True


def attempt(call: Any) -> dict[str, Any]:
    t = time.monotonic()
    try:
        call()
        out: dict[str, Any] = {"ok": True}
    except Exception as exc:
        out = exc_report(exc)
    out["seconds"] = round(time.monotonic() - t, 3)
    return out


def drop_privileges(uid: int) -> None:
    """Become ``uid`` (group too, no supplementary groups) for good. Done after the imports:
    the interpreter may live where that user cannot read (a pyenv under /root)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    assert os.getuid() == os.geteuid() == uid


def run_child(role: str, args: dict[str, Any], *, as_nobody: bool = False) -> dict[str, Any]:
    """Run ``role`` of this file in a fresh interpreter (as uid/gid 65534 if asked); return
    the JSON object it printed last, plus its exit status and stderr."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("MMCACHE_DIR", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if as_nobody:
        env["HOME"] = args["home"]
        args = {**args, "drop_to": NOBODY}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_faults", role, json.dumps(args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False,
    )  # run() kills the child when the timeout expires
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if proc.returncode == 0 and lines else {}
    report["returncode"] = proc.returncode
    report["stderr"] = proc.stderr[-3000:]
    assert proc.returncode == 0, f"{role} exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return report


def assert_clean_error(r: dict[str, Any], where: Path, what: str, *, kind: str) -> None:
    """``r`` (from :func:`attempt`) failed with an MmcacheError of ``kind`` naming a path."""
    assert not r.get("ok"), f"{what}: succeeded?"
    assert "MmcacheError" in r["mro"], (
        f"{what}: raw {r['type']} instead of an MmcacheError: {r['message']}"
    )
    assert kind in r["mro"], f"{what}: {r['type']} ({r['mro']}), expected a {kind}: {r['message']}"
    assert str(where) in r["message"], f"{what}: message names no path: {r['message']}"


# --- 1. read-only cache directory --------------------------------------------------------------

READ_ONLY_VERBS = ["save new key", "save existing key", "delete", "clean(keys)", "clean()"]


def child_read_only(a: dict[str, Any]) -> None:
    """As uid 65534: fill a cache dir of our own, chmod it 0500, then try every writing verb
    (each must fail cleanly and change nothing) and open (must still work)."""
    d = Path(a["cache_dir"])
    kept, other = small_frame(1), small_frame(2)
    mmcache.save(kept, "kept", cache_dir=d)
    mmcache.save(other, "other", cache_dir=d)
    before = listing(d)
    os.chmod(d, 0o500)
    calls = {
        "save new key": lambda: mmcache.save(small_frame(3), "new", cache_dir=d),
        "save existing key": lambda: mmcache.save(small_frame(4), "kept", cache_dir=d),
        "delete": lambda: mmcache.delete("kept", cache_dir=d),
        "clean(keys)": lambda: mmcache.clean(["kept"], cache_dir=d),
        "clean()": lambda: mmcache.clean(cache_dir=d),
    }
    out: dict[str, Any] = {"uid": os.getuid(), "verbs": {}}
    for verb, call in calls.items():
        _cache._MEMO.clear()
        r = attempt(call)
        r["unchanged"] = listing(d) == before
        r["kept_intact"] = intact(d, "kept", kept)
        r["other_intact"] = intact(d, "other", other)
        out["verbs"][verb] = r
    out["open"] = attempt(lambda: _pd.assert_frame_equal(
        mmcache.open("other", cache_dir=d), other))
    out["entries"] = sorted(e.key for e in mmcache.entries(cache_dir=d))
    print(json.dumps(out))


@pytest.fixture(scope="module")
def read_only_report() -> Iterator[tuple[Path, dict[str, Any]]]:
    if not IS_ROOT:
        pytest.skip("a read-only directory stops only an unprivileged user: needs root to drop")
    with shm_tempdir("mmcache-ro-") as top:
        d = top / "cache"
        d.mkdir(mode=0o700)
        os.chown(top, NOBODY, NOBODY)
        os.chown(d, NOBODY, NOBODY)
        yield d, run_child("child_read_only", {"cache_dir": str(d), "home": str(top)},
                           as_nobody=True)


def test_read_only_cache_dir_still_opens(read_only_report):
    _d, r = read_only_report
    assert r["uid"] == NOBODY
    assert r["open"]["ok"], r["open"]
    assert r["entries"] == ["kept", "other"]


@pytest.mark.parametrize("verb", READ_ONLY_VERBS)
def test_read_only_cache_dir_refuses_writes_cleanly(read_only_report, verb):
    d, r = read_only_report
    v = r["verbs"][verb]
    # Nothing half-written, nothing lost, whatever the error.
    assert v["unchanged"], f"{verb}: the read-only cache dir changed"
    assert v["kept_intact"] is True, f"{verb}: entry 'kept' lost: {v['kept_intact']}"
    assert v["other_intact"] is True, f"{verb}: entry 'other' lost: {v['other_intact']}"
    # A clear, specific error: an MmcacheError that is a PermissionError, naming the dir.
    assert_clean_error(v, d, verb, kind="PermissionError")
    assert v["seconds"] < 5, f"{verb}: took {v['seconds']} s"


# --- 2. another user's entry files --------------------------------------------------------------

FOREIGN = {
    # what is unreadable to the user: how the entry's files are left (as root saved them)
    "metadata (0600)": "all",
    "data directory (0700)": "data_dir",
    "data files (0600)": "data_files",
}


def child_foreign(a: dict[str, Any]) -> None:
    """As uid 65534, in our own cache dir holding entries written by root: open each; list;
    clean(older_than=10 years), which must remove no entry."""
    d = Path(a["cache_dir"])
    out: dict[str, Any] = {"uid": os.getuid(), "open": {}}
    for key in a["keys"]:
        _cache._MEMO.clear()
        out["open"][key] = attempt(lambda key=key: mmcache.open(key, cache_dir=d))
    out["entries"] = attempt(lambda: mmcache.entries(cache_dir=d))
    out["clean_older"] = attempt(lambda: mmcache.clean(older_than=TEN_YEARS, cache_dir=d))
    print(json.dumps(out))


@pytest.fixture(scope="module")
def foreign_report() -> Iterator[tuple[Path, dict[str, Any]]]:
    if not IS_ROOT:
        pytest.skip("files of another user need root to make and a uid to drop to")
    with shm_tempdir("mmcache-foreign-") as top:
        d = top / "cache"
        d.mkdir(mode=0o700)
        for i, (key, how) in enumerate(FOREIGN.items()):
            mmcache.save(small_frame(10 + i), key, cache_dir=d)
            meta = json.loads((d / f"{entry_name(key)}.json").read_bytes())
            data = d / meta["data"]
            if how != "all":
                os.chmod(d / f"{entry_name(key)}.json", 0o644)
            if how == "data_files":
                os.chmod(data, 0o755)
        _cache._MEMO.clear()
        before = listing(d)
        os.chown(top, NOBODY, NOBODY)
        os.chown(d, NOBODY, NOBODY)  # the user's own dir; the entries in it are root's
        report = run_child("child_foreign", {"cache_dir": str(d), "home": str(top),
                                             "keys": list(FOREIGN)}, as_nobody=True)
        report["before"] = before
        # Back to the owner of the entries, who must still have them all (as root here, a
        # directory owned by another user is refused by design).
        os.chown(d, 0, 0)
        os.chown(top, 0, 0)
        yield d, report


@pytest.mark.parametrize("key", list(FOREIGN))
def test_unreadable_entry_gives_a_permission_error(foreign_report, key):
    d, r = foreign_report
    assert r["uid"] == NOBODY
    # Not "corrupt" (whose advice, delete the entry, would destroy someone's good data) and not
    # a raw OSError: a permission problem, said as such, naming the file.
    assert_clean_error(r["open"][key], d, f"open of an entry whose {key} is root's",
                       kind="PermissionError")


def test_unreadable_entries_are_not_lost(foreign_report):
    d, r = foreign_report
    assert listing(d) == r["before"], "clean(older_than=10 years) by the user removed files"
    for i, key in enumerate(FOREIGN):
        assert intact(d, key, small_frame(10 + i)) is True  # their owner still has them
    assert r["entries"]["ok"], r["entries"]
    c = r["clean_older"]
    assert c["ok"] or "MmcacheError" in c["mro"], (
        f"clean(older_than=10 years) among another user's files: raw {c['type']}: {c['message']}"
    )


# --- 3. file-descriptor limit -------------------------------------------------------------------

FD_OPS = ["save", "open", "delete", "entries", "clean(older_than)"]
FREE_FDS = range(0, 6)  # descriptors left free when the operation starts
# Entries held open at once: far more than the spare descriptors (12), so they cannot be holding
# one each; each exhaustion step re-checks every one of them (200 took ~30 s of CI time).
FD_ENTRIES = 50


def wide_frame() -> pd.DataFrame:
    """2,000 columns of five kinds (str, nullable and category columns among them)."""
    rng = np.random.default_rng(7)
    cols: dict[str, Any] = {}
    for j in range(2000):
        kind = j % 5
        if kind == 0:
            cols[f"f{j}"] = rng.random(50)
        elif kind == 1:
            cols[f"i{j}"] = np.arange(50, dtype=np.int32) + j
        elif kind == 2:
            cols[f"s{j}"] = pd.array([f"{j}-{k}" for k in range(50)], dtype="str")
        elif kind == 3:
            cols[f"n{j}"] = pd.array([None if k % 9 == 0 else k + j for k in range(50)],
                                     dtype="Int64")
        else:
            cols[f"c{j}"] = pd.Categorical.from_codes(np.arange(50, dtype=np.int8) % 2,
                                                      categories=[f"a{j}", f"b{j}"])
    return pd.DataFrame(cols)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def fds_left(free: int) -> Iterator[None]:
    """Use up every descriptor but ``free`` (RLIMIT_NOFILE already lowered)."""
    hog: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:
                hog.append(os.open("/dev/null", os.O_RDONLY))
        for _ in range(min(free, len(hog))):
            os.close(hog.pop())
        yield
    finally:
        for fd in hog:
            os.close(fd)


def child_fd_limit(a: dict[str, Any]) -> None:
    """Lower RLIMIT_NOFILE to a few more than are open; open a wide frame and many entries;
    then run each operation with 0..5 descriptors left and check what it did."""
    d = Path(a["cache_dir"])
    wide = wide_frame()
    mmcache.save(wide, "wide", cache_dir=d)
    smalls = {f"k{i}": small_frame(100 + i, 20) for i in range(a["entries"])}
    for key, df in smalls.items():
        mmcache.save(df, key, cache_dir=d)
    gc.collect()
    _cache._MEMO.clear()
    spare = 12
    limit = open_fds() + spare
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    out: dict[str, Any] = {"limit": limit, "spare": spare}

    # Mapped files hold no descriptor: all of these open and stay open at this limit.
    held: list[pd.DataFrame] = []
    r = attempt(lambda: held.append(mmcache.open("wide", cache_dir=d)))
    for key in smalls:
        if not r["ok"]:
            break
        r = attempt(lambda key=key: held.append(mmcache.open(key, cache_dir=d)))
    out["open_many"] = {
        **r, "held": len(held), "fds_after": open_fds(), "fds_before": limit - spare,
        "wide_equal": bool(held) and held[0].equals(_pd.as_opened(wide)),
        "all_equal": [f.equals(_pd.as_opened(e))
                      for f, e in zip(held[1:], smalls.values(), strict=False)]
        == [True] * len(smalls),
    }
    out["save_at_limit"] = attempt(lambda: mmcache.save(wide, "wide2", cache_dir=d))
    held.clear()
    gc.collect()

    # Exhaustion: each operation with 0..5 descriptors left.
    k0 = {"now": smalls["k0"]}  # what k0 holds: a successful save replaces it
    gone: set[str] = set()  # keys the delete op was asked to remove
    calls = {
        "save": lambda free: mmcache.save(small_frame(500 + free, 20), "k0", cache_dir=d),
        "open": lambda free: mmcache.open("k1", cache_dir=d),
        "delete": lambda free: mmcache.delete(f"k{10 + free}", cache_dir=d),
        "entries": lambda free: mmcache.entries(cache_dir=d),
        "clean(older_than)": lambda free: mmcache.clean(older_than=TEN_YEARS, cache_dir=d),
    }
    results: dict[str, list[dict[str, Any]]] = {}
    for op, call in calls.items():
        for free in a["free"]:
            names_before = set(os.listdir(d))
            _cache._MEMO.clear()
            with fds_left(free):
                r = attempt(lambda call=call, free=free: call(free))
            gc.collect()
            r["free"] = free
            if op == "save" and r["ok"]:
                k0["now"] = small_frame(500 + free, 20)
            if op == "delete":
                gone.add(f"k{10 + free}")  # asked to go: gone or not, either is fine
            lost = []
            for key, df in smalls.items():
                if key in gone:
                    continue
                ok = intact(d, key, k0["now"] if key == "k0" else df)
                if ok is not True:
                    lost.append(f"{key}: {ok}")
            r["lost"] = lost
            r["new_leftovers"] = sorted(set(leftovers(d)) - names_before)
            results.setdefault(op, []).append(r)
    out["exhaustion"] = results
    print(json.dumps(out))


@pytest.fixture(scope="module")
def fd_report() -> Iterator[dict[str, Any]]:
    with shm_tempdir("mmcache-fd-") as top:
        yield run_child("child_fd_limit", {"cache_dir": str(top / "cache"), "entries": FD_ENTRIES,
                                           "free": list(FREE_FDS)})


def test_fd_limit_wide_frame_and_many_entries_open(fd_report):
    r = fd_report["open_many"]
    assert r["ok"], f"at RLIMIT_NOFILE={fd_report['limit']}: {r}"
    assert r["held"] == FD_ENTRIES + 1 and r["wide_equal"] and r["all_equal"], r
    assert r["fds_after"] <= r["fds_before"] + 2, f"mapped entries hold descriptors: {r}"
    assert fd_report["save_at_limit"]["ok"], fd_report["save_at_limit"]


@pytest.mark.parametrize("op", FD_OPS)
def test_fd_exhaustion_gives_a_clear_error_never_a_hang(fd_report, op):
    for r in fd_report["exhaustion"][op]:
        what = f"{op} with {r['free']} descriptor(s) left"
        assert r["seconds"] < 10, f"{what}: took {r['seconds']} s"
        if not r["ok"]:
            assert "MmcacheError" in r["mro"], (
                f"{what}: raw {r['type']} instead of an MmcacheError: {r['message']}"
            )
            assert "Too many open files" in r["message"] or "descriptor" in r["message"], (
                f"{what}: the message does not say descriptors ran out: {r['message']}"
            )


@pytest.mark.parametrize("op", FD_OPS)
def test_fd_exhaustion_loses_nothing_and_leaves_nothing(fd_report, op):
    for r in fd_report["exhaustion"][op]:
        what = f"{op} with {r['free']} descriptor(s) left"
        assert r["lost"] == [], f"{what} ({r.get('type', 'ok')}) lost entries: {r['lost']}"
        assert r["new_leftovers"] == [], f"{what} left {r['new_leftovers']} behind"


def test_fd_exhaustion_is_not_reported_as_corruption(fd_report):
    # "corrupt ... remove it with `mmcache clean`" about a healthy entry invites deleting it.
    for op in FD_OPS:
        for r in fd_report["exhaustion"][op]:
            if not r["ok"]:
                assert "CorruptEntryError" not in r["mro"], (
                    f"{op} with {r['free']} descriptor(s) left calls a healthy entry corrupt: "
                    f"{r['message']}"
                )


# --- 4. a lock held by a dead process ------------------------------------------------------------


def test_lock_of_a_killed_holder_does_not_block(tmp_path):
    d = tmp_path / "cache"
    mmcache.save(small_frame(1), "k", cache_dir=d)
    lock = d / f"{entry_name('k')}.lock"
    orphan = d / f"{entry_name('orphan')}.lock"
    for path in (lock, orphan):
        with Child("hold_lock", {"lock": str(path)}) as holder:
            holder.expect("locked", timeout=30)
            holder.kill()
            assert holder.proc.returncode == -signal.SIGKILL
    assert lock.exists() and orphan.exists()  # the dead holder's lock files stay behind

    t = time.monotonic()
    mmcache.save(small_frame(2), "k", cache_dir=d)
    assert time.monotonic() - t < 5, "save waited for a dead process's lock"
    assert intact(d, "k", small_frame(2)) is True
    t = time.monotonic()
    assert mmcache.delete("k", cache_dir=d) is True
    assert time.monotonic() - t < 5, "delete waited for a dead process's lock"
    t = time.monotonic()
    mmcache.save(small_frame(3), "orphan", cache_dir=d)
    assert time.monotonic() - t < 5
    mmcache.clean(cache_dir=d)
    assert os.listdir(d) == [], "clean() left the dead holder's lock files"


# --- 5. a cache dir on a disk (not tmpfs) ---------------------------------------------------------


MEMORY_FS = {"tmpfs", "ramfs", "devtmpfs", "?"}


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    for candidate in (tmp_path, Path("/var/tmp")):
        if fs_type(candidate) not in MEMORY_FS and os.access(candidate, os.W_OK):
            break
    else:
        pytest.skip("no disk-backed (non-tmpfs) writable directory here")
    d = Path(tempfile.mkdtemp(prefix="mmcache-disk-", dir=candidate))
    try:
        yield d
    finally:
        _cache._MEMO.clear()
        shutil.rmtree(d, ignore_errors=True)


def test_cache_dir_on_disk_round_trips_zero_copy(disk_dir):
    kind = fs_type(disk_dir)
    assert kind not in MEMORY_FS
    d = disk_dir / "cache"
    df = assemble(base_parts(3, 100_000), 42, "disk")
    entry = mmcache.save(df, "on disk", cache_dir=d)
    assert entry.nrows == len(df)
    _cache._MEMO.clear()
    got = mmcache.open("on disk", cache_dir=d)
    _pd.assert_frame_equal(got, df)
    assert problem(got) is None
    assert_zero_copy(got, d, include_index=True)
    assert {os.path.dirname(p) for _, _, p in maps_under(d)} == {str(d / json.loads(
        entry.path.read_bytes())["data"])}, f"mapped from elsewhere on {kind}"
    del got
    assert mmcache.delete("on disk", cache_dir=d)
    mmcache.clean(cache_dir=d)
    assert os.listdir(d) == []


# --- 6. entry files removed behind a reader's back ------------------------------------------------

HOLD_ROWS = 400_000  # ~22 MB: many pages, some reused by the saves that follow


def child_hold(a: dict[str, Any]) -> None:
    """Open the key, read all of it, say which files are mapped, wait for a line on stdin,
    then read all of it again (a lost or truncated page would be a SIGBUS) and report."""
    d = a["cache_dir"]
    df = mmcache.open(a["key"], cache_dir=d)
    first = problem(df)
    print(json.dumps({"mapped": sorted({p for _, _, p in maps_under(d)}), "first": first}),
          flush=True)
    sys.stdin.readline()
    _cache._MEMO.clear()
    gc.collect()
    with open("/proc/self/maps") as f:
        deleted = sum(1 for line in f if line.rstrip().endswith(" (deleted)") and d in line)
    again = problem(df)
    print(json.dumps({"ok": first is None and again is None, "first": first, "again": again,
                      "deleted_maps": deleted, "ver": df.attrs.get("ver")}), flush=True)


def _outside_rm(d: Path, key: str) -> None:
    # Another program (not mmcache) removes the entry's files: unlink, not truncate.
    meta = json.loads((d / f"{entry_name(key)}.json").read_bytes())
    shutil.rmtree(d / meta["data"])
    os.unlink(d / f"{entry_name(key)}.json")


BEHIND_BACK = {
    "delete": lambda d, k, nxt: mmcache.delete(k, cache_dir=d),
    "re-save": lambda d, k, nxt: mmcache.save(nxt(), k, cache_dir=d),
    "re-save twice, then clean()": lambda d, k, nxt: (
        mmcache.save(nxt(), k, cache_dir=d), mmcache.save(nxt(), k, cache_dir=d),
        mmcache.clean(cache_dir=d)),
    "clean(keys)": lambda d, k, nxt: mmcache.clean([k], cache_dir=d),
    "clean(max_bytes=0)": lambda d, k, nxt: mmcache.clean(max_bytes=0, cache_dir=d),
    "unlinked by another program": lambda d, k, nxt: _outside_rm(d, k),
}


@pytest.mark.parametrize("how", list(BEHIND_BACK))
def test_reader_keeps_its_data_when_files_go(how, tmp_path):
    key = "held"
    parts = base_parts(5, HOLD_ROWS)
    counter = iter(range(2, 100))

    def nxt() -> pd.DataFrame:
        return assemble(parts, next(counter), "next")

    with shm_tempdir("mmcache-held-") as top:
        d = top / "cache"
        mmcache.save(assemble(parts, 1, "held"), key, cache_dir=d)
        args = {"cache_dir": str(d), "key": key}
        child = _HoldChild(args, tmp_path / "child.err")
        try:
            first = child.read_json(timeout=60)
            assert first["first"] is None, first
            assert first["mapped"], "the reader maps no cache file"
            BEHIND_BACK[how](d, key, nxt)
            _cache._MEMO.clear()
            # Reuse the freed tmpfs pages: a reader that lost its pages would now see this.
            mmcache.save(assemble(base_parts(6, HOLD_ROWS), 99, "filler"), "filler",
                         cache_dir=d)
            child.send("go")
            report = child.read_json(timeout=60)
            rc = child.wait(timeout=30)
        finally:
            child.kill()
        # Once the reader is gone, clean() frees whatever it kept mapped.
        mmcache.clean(cache_dir=d)
        assert os.listdir(d) == []
    assert rc != -signal.SIGBUS, f"{how}: the reader died of SIGBUS"
    assert rc == 0, f"{how}: the reader exited with {rc}:\n{child.stderr()}"
    assert report["ok"], f"{how}: {report}"
    assert report["ver"] == 1
    if how == "unlinked by another program":
        assert report["deleted_maps"] >= 1, "the held files were not removed (vacuous test)"
    else:
        # mmcache keeps a version's files while a live process maps them (a frame pickled
        # by reference from it must still unpickle to exactly it); they cost no extra RAM.
        assert report["deleted_maps"] == 0, f"{how}: mmcache removed files a reader maps"


class _HoldChild:
    """``child_hold`` in a fresh interpreter, with line-based JSON on stdout."""

    def __init__(self, args: dict[str, Any], err_path: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env.pop("MMCACHE_DIR", None)
        self._err_path = err_path
        with open(err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.test_faults", "child_hold", json.dumps(args)],
                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                text=True,
            )

    def read_json(self, timeout: float) -> dict[str, Any]:
        import selectors

        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"no answer within {timeout} s:\n{self.stderr()}")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise AssertionError(f"child exited ({self.proc.returncode}):\n{self.stderr()}")
        return json.loads(line)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self._err_path.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


# --- 7. a reader racing a delete ------------------------------------------------------------------


class _Race:
    """Run ``action`` once, from inside open(), just before the wrapped step runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, action: Any) -> None:
        self.real = getattr(_store, name)
        self.action = action
        self.fired = False
        monkeypatch.setattr(_store, name, self)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        if not self.fired:
            self.fired = True
            self.action()
        return self.real(*args, **kw)


def test_delete_between_stat_and_reading_metadata_is_not_found(tmp_path, monkeypatch):
    # Another process deletes the entry after open() stat'ed its metadata and before it read
    # it: the entry is simply gone (EntryNotFoundError), not a crash inside mmcache.
    d = tmp_path / "cache"
    mmcache.save(small_frame(1), "k", cache_dir=d)
    race = _Race(monkeypatch, "read_meta", lambda: mmcache.delete("k", cache_dir=d))
    with pytest.raises(mmcache.EntryNotFoundError):
        mmcache.open("k", cache_dir=d)
    assert race.fired


def test_overwrite_then_delete_during_one_open_is_not_found(tmp_path, monkeypatch):
    # open() read version 1's metadata; before it mapped the files, another process saved
    # version 2 (removing version 1's files) and then a third deleted the key just as open()
    # looked again. The answer is "not found", not "corrupt, delete the entry".
    d = tmp_path / "cache"
    mmcache.save(small_frame(1), "k", cache_dir=d)
    deleting = _Race(monkeypatch, "read_meta", lambda: None)
    deleting.fired = True  # armed by the overwrite below, for open()'s second look

    def overwrite() -> None:
        mmcache.save(small_frame(2), "k", cache_dir=d)
        deleting.fired = False
        deleting.action = lambda: mmcache.delete("k", cache_dir=d)

    race = _Race(monkeypatch, "map_files", overwrite)
    with pytest.raises(mmcache.EntryNotFoundError):
        mmcache.open("k", cache_dir=d)
    assert race.fired and deleting.fired


# --- children: python -m tests.test_faults ROLE JSON ----------------------------------------------

ROLES = {f.__name__: f for f in (child_read_only, child_foreign, child_fd_limit, child_hold)}

if __name__ == "__main__":
    _args = json.loads(sys.argv[2])
    if "drop_to" in _args:
        drop_privileges(_args["drop_to"])
    ROLES[sys.argv[1]](_args)
