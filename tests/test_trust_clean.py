"""Issue 8, cleaning and the CLI: what `clean` may touch, what `ls`/`info` must say, how the
cost grows with the number of entries, and relative cache directories.

Each test is named after the issue's item it covers. Children run as real processes with
bounded waits and are killed on the way out. Nothing here times anything: complexity is shown
by counting directory listings, metadata reads and /proc scans (the wall times live in
``scripts/bench_clean.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import mmcache
from mmcache import _paths
from mmcache._paths import entry_name
from mmcache._units import human
from tests._dirs import shm_tempdir
from tests._robust_workers import Child

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MMCACHE_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def run(*args: str, cache_dir: Path | str | None = None, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mmcache", *args]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                          env=env or _env(), cwd=cwd or REPO)


def frame(n: int, value: float = 1.0) -> pd.DataFrame:
    return pd.DataFrame({"x": np.full(n, value), "i": np.arange(n, dtype=np.int64)})


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path below ``root`` (not following links) -> its bytes (None for a directory)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = (
                os.readlink(p).encode() if os.path.islink(p) else Path(p).read_bytes()
            )
    return out


# --- item 1: clean touches only mmcache's own names ------------------------------------------

# The test's own statement of DESIGN.md's rule, to check the library's against.
OWN = re.compile(
    r"[A-Za-z0-9_-]{1,48}-[0-9a-f]{24}\.(json|lock|[0-9a-f]{16}|json\.[0-9a-f]{16}\.tmp)"
)


def own(rel: str) -> bool:
    """Is the top-level name of ``rel`` one of mmcache's own names?"""
    return OWN.fullmatch(rel.split(os.sep)[0]) is not None


STEM = entry_name("alpha")
HEX16 = "0123456789abcdef"
FOREIGN = {
    ".git/HEAD": b"ref: refs/heads/main\n",
    ".git/config": b"[core]\n",
    "report.csv": b"a,b\n1,2\n",
    "id_ed25519": b"-----BEGIN OPENSSH PRIVATE KEY-----\n",
    "known_hosts.old": b"host key\n",
    ".hidden.json": b"{}",
    "notes.lock": b"",
    "x.0123456789abcdef/0.npy": b"not ours: no stem",
    f"{STEM}.json.bak": b"a backup someone made",
    f"{STEM}.txt": b"notes",
    f"{STEM}.lock~": b"",
    f"{STEM}.0123456789ABCDEF/0.npy": b"upper-case token: not mmcache's",
    f"{STEM}.0123456789abcde/0.npy": b"15 hex digits: not mmcache's",
    f"{STEM}.json.0123456789abcdef.tmp.orig": b"",
    f"{'k' * 49}-{'0' * 24}.json": b"prefix too long",
    f"notes-{'0' * 23}.lock": b"hash too short",
    f"notes-{'0' * 24}": b"no suffix",
    f"{entry_name('dead')}.{HEX16}/notes.txt": b"someone's file inside a data dir",
}


class Planted:
    """A directory of someone's files that is also (directly or through a symlink) a cache
    dir with two entries and the leftovers of killed saves."""

    def __init__(self, tmp_path: Path, via: str) -> None:
        self.victim = victim = tmp_path / "home"  # someone's ~/.ssh, or a project directory
        victim.mkdir(mode=0o700)
        for rel, data in FOREIGN.items():
            (victim / rel).parent.mkdir(parents=True, exist_ok=True)
            (victim / rel).write_bytes(data)
        (victim / "link-out").symlink_to(tmp_path / "elsewhere")
        if via == "plain directory":
            self.d = victim
        else:
            self.d = tmp_path / "link"
            self.d.symlink_to(victim)
        self.cli_dir = None if via == "MMCACHE_DIR symlink" else self.d
        self.env = _env(MMCACHE_DIR=str(self.d)) if via == "MMCACHE_DIR symlink" else _env()

        mmcache.save(frame(1000), "alpha", cache_dir=self.d)
        mmcache.save(frame(2000), "beta", cache_dir=self.d)
        self.beta = json.loads((victim / f"{entry_name('beta')}.json").read_bytes())["data"]
        (victim / self.beta / "README").write_bytes(b"foreign file inside a live entry's data")
        # A killed save's data directory, holding mmcache's files and a foreign one.
        self.dead = victim / f"{entry_name('dead')}.{HEX16}"
        (self.dead / "0.npy").write_bytes(b"\0" * 5000)
        (self.dead / "meta.json").write_bytes(b"{}")
        # Another killed save's data directory and metadata being written: only mmcache's.
        self.gone = victim / f"{entry_name('gone')}.{'f' * 16}"
        self.gone.mkdir()
        (self.gone / "0.npy").write_bytes(b"\0" * 7000)
        (self.gone / "1.npy").write_bytes(b"\0" * 3000)
        self.tmp_meta = victim / f"{entry_name('gone')}.json.{'e' * 16}.tmp"
        self.tmp_meta.write_bytes(b"{" * 100)
        self.foreign = {k: v for k, v in snapshot(victim).items() if not own(k) or k in FOREIGN}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        r = run(*args, cache_dir=self.cli_dir, env=self.env)
        assert r.returncode == 0, r.stderr
        return r


VIA = ["plain directory", "--cache-dir symlink", "MMCACHE_DIR symlink"]


@pytest.mark.parametrize("via", VIA)
def test_item1_clean_never_touches_foreign_files(tmp_path, via):
    p = Planted(tmp_path, via)
    p.run("clean")
    after = snapshot(p.victim)
    lost = {k for k in p.foreign if after.get(k) != p.foreign[k]}
    assert lost == set(), f"clean removed or changed files it never wrote: {sorted(lost)}"
    # Only mmcache's own names went; a data dir holding a foreign file stays, with just that.
    assert sorted(k for k in after if own(k)) == sorted(
        [p.dead.name, f"{p.dead.name}/notes.txt", p.beta, f"{p.beta}/README"])
    assert mmcache.entries(cache_dir=p.d) == []

    # The API verb and delete() follow the same rule.
    mmcache.save(frame(10), "alpha", cache_dir=p.d)
    mmcache.save(frame(10), "beta", cache_dir=p.d)
    mmcache.delete("beta", cache_dir=p.d)
    mmcache.clean(cache_dir=p.d)
    assert {k: v for k, v in snapshot(p.victim).items() if k in p.foreign} == p.foreign


@pytest.mark.parametrize("via", VIA[:2])
def test_item1_dry_run_lists_every_leftover_with_its_size(tmp_path, via):
    p = Planted(tmp_path, via)
    before = snapshot(p.victim)
    r = p.run("clean", "--dry-run")
    assert snapshot(p.victim) == before
    lines = r.stdout.splitlines()
    for name, size in [(p.dead.name, 5000 + 2), (p.gone.name, 10_000), (p.tmp_meta.name, 100)]:
        assert any(name in line and human(size) in line for line in lines), (name, r.stdout)
    assert "would remove alpha" in r.stdout and "would remove beta" in r.stdout
    assert not any(k.split("/")[0] in r.stdout for k in FOREIGN if not k.startswith(p.dead.name))
    # What the dry run announced is what clean then frees.
    expected = r.stdout.splitlines()[-1].split()[2:4]
    r = p.run("clean")
    assert f"freed {' '.join(expected)};" in r.stdout, (expected, r.stdout)


def test_item1_own_name_rule_matches_every_name_mmcache_writes(tmp_path):
    own_name, own_data_file = _paths.own_name, _paths.own_data_file  # type: ignore[attr-defined]
    d = tmp_path / "cache"
    wide = pd.DataFrame({f"c{i}": np.arange(5).astype(dt) for i, dt in
                         enumerate(["f8", "i8", "i4", "u1", "f4", "i2", "u8", "c16", "?",
                                    "u2", "u4", "i1"])})
    for key in ["k", "a/b", "x" * 200, "-", "é", "\n"]:
        mmcache.save(wide, key, cache_dir=d)
        mmcache.save(wide, key, cache_dir=d)
    names = os.listdir(d)
    assert names and all(own_name(n) is not None for n in names), names
    for n in names:
        if (d / n).is_dir():
            inside = os.listdir(d / n)
            assert len(inside) >= 10 and all(own_data_file(f) for f in inside), inside
    stem = entry_name("k")
    assert own_name(f"{stem}.json.{HEX16}.tmp") == (stem, "tmp")  # what publishing writes
    assert own_name(f"{stem}.json") == (stem, "meta")
    assert own_name(f"{stem}.lock") == (stem, "lock")
    assert own_name(f"{stem}.{HEX16}") == (stem, "data")
    for rel in FOREIGN:
        assert (own_name(rel.split("/")[0]) is not None) == own(rel), rel
        assert own(rel) == rel.startswith(f"{entry_name('dead')}."), rel
    assert own_data_file("meta.json") and own_data_file("12.npy")
    assert not any(own_data_file(n) for n in ["notes.txt", "01.npy", "x.npy", ".npy", "0.npy~"])


# --- item 11: the CLI says what is there ------------------------------------------------------


UNPRIVILEGED = """
import os, sys
from mmcache._cli import main
if os.geteuid() == 0:  # drop after importing: the interpreter may live where nobody can read
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args", [["ls"], ["ls", "--json"], ["info", "alpha"], ["clean"],
                                  ["clean", "--dry-run"], ["clean", "alpha"]])
def test_item11_unreadable_cache_dir_is_an_error(args):
    # Root reads any directory whatever its mode: as root, the child drops to uid 65534 (who
    # owns the directory and made it unreadable, as `chmod 000` by its owner does).
    with shm_tempdir("mmcache-unreadable-") as top:
        d = top / "cache"
        mmcache.save(frame(10), "alpha", cache_dir=d)
        if IS_ROOT:
            for p in [top, d, *d.rglob("*")]:
                os.chown(p, NOBODY, NOBODY, follow_symlinks=False)
        os.chmod(top, 0o755)
        os.chmod(d, 0o000)
        before = sorted(os.listdir(d))  # root can still look
        r = subprocess.run([sys.executable, "-c", UNPRIVILEGED, *args, "--cache-dir", str(d)],
                           capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd="/")
        os.chmod(d, 0o700)
        assert sorted(os.listdir(d)) == before
    if not IS_ROOT and os.access(d, os.R_OK):  # pragma: no cover - e.g. CAP_DAC_OVERRIDE
        pytest.skip("this user reads directories whatever their mode")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Permission denied" in r.stderr and str(d) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "0 entries" not in r.stdout


def _damage(d: Path, key: str, how: str) -> Path:
    path = d / f"{entry_name(key)}.json"
    raw = bytearray(path.read_bytes())
    if how == "flipped byte":  # still JSON, still names its key; the checksum catches it
        i = raw.index(b'"nrows":') + len(b'"nrows":')
        raw[i] = ord("7") if raw[i] != ord("7") else ord("8")
    else:  # truncated: the key cannot be read any more
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))
    return path


def test_item11_damaged_entries_are_shown_by_ls_and_info(cache_dir):
    mmcache.save(frame(1000), "alpha")
    mmcache.save(frame(1000), "beta")
    mmcache.save(frame(1000), "gamma")
    _damage(cache_dir, "beta", "flipped byte")
    _damage(cache_dir, "gamma", "truncated")

    r = run("ls", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    beta = [line for line in lines if "beta" in line]
    assert len(beta) == 1 and "DAMAGED" in beta[0] and "mmcache clean beta" in beta[0], r.stdout
    gamma = [line for line in lines if entry_name("gamma") in line]
    assert len(gamma) == 1 and "DAMAGED" in gamma[0] and "mmcache clean" in gamma[0], r.stdout
    assert "1 entry" in lines[-1]

    data = json.loads(run("ls", "--json", cache_dir=cache_dir).stdout)
    assert [e["key"] for e in data["entries"]] == ["alpha"]
    problems = {p["name"]: p for p in data["problems"]}
    assert set(problems) == {entry_name("beta"), entry_name("gamma")}
    assert problems[entry_name("beta")]["key"] == "beta"
    assert all(p["kind"] == "damaged" and p["remedy"] and p["problem"] for p in problems.values())

    for key in ("beta", "gamma"):
        r = run("info", key, cache_dir=cache_dir)
        assert r.returncode == 1 and r.stderr.startswith("Error: "), r
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "damaged" in r.stderr and "no entry" not in r.stderr, r.stderr
        assert f"mmcache clean {key}" in r.stderr, r.stderr

    # The advice works: the unnamed one with --stale (which spares healthy entries) ...
    r = run("clean", "--stale", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    assert "damaged entry" in r.stdout
    assert [e.key for e in mmcache.entries()] == ["alpha"]
    assert json.loads(run("ls", "--json", cache_dir=cache_dir).stdout)["problems"] == []
    # ... and by key.
    mmcache.save(frame(10), "beta")
    _damage(cache_dir, "beta", "flipped byte")
    r = run("clean", "beta", cache_dir=cache_dir)
    assert r.returncode == 0 and "removed damaged entry beta" in r.stdout, r.stdout
    assert "no entry" not in r.stdout
    assert sorted(os.listdir(cache_dir)) == sorted(
        n for n in os.listdir(cache_dir) if n.startswith(entry_name("alpha")))


KILLED_SAVE = """
import os, signal, sys
import numpy as np, pandas as pd
import mmcache
real_replace = os.replace
def replace(src, dst, *a, **k):  # die at the commit point: data written, never published
    if str(dst).endswith(".json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
os.replace = replace
mmcache.save(pd.DataFrame({"x": np.arange(2_000_000.0)}), "killed", cache_dir=sys.argv[1])
"""


def test_item11_leftovers_of_a_killed_save_are_shown(cache_dir):
    mmcache.save(frame(100), "alpha")
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(cache_dir)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not mmcache.exists("killed")
    data_dirs = [p for p in cache_dir.iterdir()
                 if p.is_dir() and p.name.startswith(entry_name("killed"))]
    assert len(data_dirs) == 1
    size = sum(f.stat().st_size for f in data_dirs[0].iterdir())
    assert size >= 16_000_000

    data = json.loads(run("ls", "--json", cache_dir=cache_dir).stdout)
    stale = data["leftovers"]
    assert stale["count"] == len(stale["items"]) >= 1
    assert stale["nbytes"] >= size, stale
    assert str(data_dirs[0]) in {x["path"] for x in stale["items"]}
    r = run("ls", cache_dir=cache_dir)
    line = next((x for x in r.stdout.splitlines() if "stale leftovers" in x), "")
    assert f"{stale['count']}, {human(stale['nbytes'])}" in line, r.stdout
    r = run("clean", "--dry-run", cache_dir=cache_dir)
    assert any(data_dirs[0].name in x and human(size) in x for x in r.stdout.splitlines()), (
        r.stdout)
    assert "would free" in r.stdout and "stale leftover" in r.stdout.splitlines()[-1]

    # While a process holds the key's lock it is a save in progress, not a leftover.
    with Child("hold_lock", {"lock": str(cache_dir / f"{entry_name('killed')}.lock")}) as holder:
        holder.expect("locked", timeout=30)
        data = json.loads(run("ls", "--json", cache_dir=cache_dir).stdout)
        assert data["leftovers"]["count"] == 0 and data["saving"]["count"] >= 1, data
        r = run("clean", "--dry-run", cache_dir=cache_dir)
        assert data_dirs[0].name not in r.stdout
        r = run("clean", "--stale", cache_dir=cache_dir)
        assert r.returncode == 0 and data_dirs[0].exists()
        holder.send("release")
        assert holder.result(timeout=30)["returncode"] == 0

    r = run("clean", "--stale", cache_dir=cache_dir)
    assert r.returncode == 0 and not data_dirs[0].exists(), r.stdout
    assert [e.key for e in mmcache.entries()] == ["alpha"]  # --stale spares entries


# --- item 12: cost linear in the number of entries --------------------------------------------


class _Count:
    def __init__(self, d: Path) -> None:
        self.real = os.path.realpath(d)
        self.listings = 0  # listings of the cache directory
        self.listed = 0  # names those listings returned
        self.meta_opens = 0  # opens of metadata files (NAME.json)
        self.proc_scans = 0  # listings of /proc

    def work(self) -> int:
        return self.listed + self.meta_opens


class _CountingScandir:
    def __init__(self, it: Any, count: _Count) -> None:
        self.it, self.count = it, count

    def __enter__(self) -> _CountingScandir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.it.close()

    def __iter__(self) -> _CountingScandir:
        return self

    def __next__(self) -> Any:
        item = next(self.it)
        self.count.listed += 1
        return item

    def close(self) -> None:
        self.it.close()


@contextlib.contextmanager
def counting(d: Path) -> Iterator[_Count]:
    """Count the directory listings, metadata opens and /proc scans made in the block."""
    c = _Count(d)
    real_scandir, real_listdir, real_open = os.scandir, os.listdir, os.open

    def names(arg: Any) -> str | None:
        return os.fspath(arg) if isinstance(arg, str | os.PathLike) else None

    def scandir(path: Any = ".") -> Any:
        it = real_scandir(path)
        p = names(path)
        if p == "/proc":
            c.proc_scans += 1
        if p is not None and os.path.realpath(p) == c.real:
            c.listings += 1
            return _CountingScandir(it, c)
        return it

    def listdir(path: Any = ".") -> list[Any]:
        out = real_listdir(path)
        p = names(path)
        if p == "/proc":
            c.proc_scans += 1
        if p is not None and os.path.realpath(p) == c.real:
            c.listings += 1
            c.listed += len(out)
        return out

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        p = names(path)
        if p is not None and p.endswith(".json") and dir_fd is None and \
                os.path.dirname(os.path.realpath(p)) == c.real:
            c.meta_opens += 1
        return real_open(path, flags, mode, dir_fd=dir_fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "scandir", scandir)
        mp.setattr(os, "listdir", listdir)
        mp.setattr(os, "open", open_)
        yield c


def _fill(d: Path, n: int, *, cache: mmcache.Cache | None = None) -> None:
    cache = cache or mmcache.Cache(d)
    small = frame(3)
    for i in range(n):
        cache.save(small, f"k{i}")
    for i in range(n // 4):  # leftovers of killed saves
        (d / f"{entry_name(f'dead{i}')}.{HEX16}").mkdir()
        (d / f"{entry_name(f'dead{i}')}.{HEX16}" / "0.npy").write_bytes(b"x")


N = 40


def test_item12_clean_and_ls_are_linear_in_the_number_of_entries(tmp_path, capsys):
    from mmcache._cli import main

    counts = {}
    for n in (N, 4 * N):
        d = tmp_path / f"c{n}"
        _fill(d, n)
        names = len(os.listdir(d))
        with counting(d) as ls_cold:
            assert main(["ls", "--cache-dir", str(d)]) == 0
        with counting(d) as ls_warm:
            assert main(["ls", "--cache-dir", str(d)]) == 0
        with counting(d) as cl:
            removed = mmcache.clean(cache_dir=d)
        capsys.readouterr()
        assert len(removed) == n and os.listdir(d) == []
        for what, c in [("ls", ls_cold), ("ls again", ls_warm), ("clean", cl)]:
            # A constant number of listings and /proc scans, each name looked at a few times.
            assert c.listings <= 2, f"{what} of {n} entries listed the directory {c.listings}x"
            # (clean scans twice: before choosing, and once after unpublishing what it
            # removes, so no version a process mapped meanwhile is swept under it)
            assert c.proc_scans <= 2, f"{what} of {n} entries scanned /proc {c.proc_scans}x"
            assert c.listed <= 2 * names, f"{what}: {c.listed} names listed for {names}"
            assert c.meta_opens <= 4 * n, f"{what}: {c.meta_opens} metadata opens for {n}"
        # What this process parsed before is not read again while it is unchanged.
        assert ls_warm.meta_opens == 0, ls_warm.meta_opens
        counts[n] = (ls_cold.work(), cl.work())
    for i, what in enumerate(["ls", "clean"]):
        ratio = counts[4 * N][i] / counts[N][i]
        assert ratio <= 4.5, f"{what}: 4x the entries cost {ratio:.1f}x the work ({counts})"


def test_item12_save_under_a_size_limit_costs_no_scan_of_all_entries(tmp_path):
    for n in (N, 4 * N):
        d = tmp_path / f"c{n}"
        cache = mmcache.Cache(d, max_bytes="1GB")
        _fill(d, n, cache=cache)
        with counting(d) as c:
            cache.save(frame(3), "one more")
        assert c.proc_scans == 0, f"a save with room to spare scanned /proc ({n} entries)"
        assert c.meta_opens <= 3, f"a save read {c.meta_opens} metadata files ({n} entries)"
        assert c.listings <= 1 and c.listed <= len(os.listdir(d)), (c.listings, c.listed)

    # When something must go: one /proc scan, and the least recently used entry goes.
    d = tmp_path / "evict"
    one = mmcache.save(frame(1000), "probe", cache_dir=d).nbytes
    mmcache.delete("probe", cache_dir=d)
    cache = mmcache.Cache(d, max_bytes=3 * one + one // 2)
    for key in ("a", "b", "c"):
        cache.save(frame(1000), key)
    cache.open("a")
    os.utime(d / f"{entry_name('b')}.json", (1, os.stat(d / f"{entry_name('b')}.json").st_mtime))
    with counting(d) as c:
        cache.save(frame(1000), "d")
    # One scan to rank the victims, one after unpublishing them (before sweeping their files)
    assert c.proc_scans == 2
    assert sorted(e.key for e in cache.entries()) == ["a", "c", "d"]


RESAVE = """
import sys, numpy as np, pandas as pd, mmcache
mmcache.save(pd.DataFrame({"x": np.arange(int(sys.argv[2]), dtype=float)}), "a",
             cache_dir=sys.argv[1])
"""


def test_item12_remembered_metadata_follows_changes_by_other_processes(tmp_path):
    # The per-process memo of parsed metadata must never hide a re-save made elsewhere.
    d = tmp_path / "cache"
    mmcache.save(frame(10), "a", cache_dir=d)
    mmcache.save(frame(10), "b", cache_dir=d)
    small = {e.key: e.nbytes for e in mmcache.entries(cache_dir=d)}
    r = subprocess.run([sys.executable, "-c", RESAVE, str(d), "100000"], capture_output=True,
                       text=True, timeout=TIMEOUT, env=_env())
    assert r.returncode == 0, r.stderr
    big = {e.key: e for e in mmcache.entries(cache_dir=d)}
    assert big["a"].nbytes > small["a"] + 700_000 and big["a"].nrows == 100_000
    # ... and a size limit counts the new size: "b" must go to make room for "c" (whose data
    # alone, without metadata, is over 300 bytes).
    cache = mmcache.Cache(d, max_bytes=big["a"].nbytes + small["b"] + 300)
    cache.save(frame(10), "c")
    assert sorted(e.key for e in cache.entries()) == ["a", "c"]


# --- item 14: escaping, the empty key, relative cache directories ------------------------------


def test_item14_info_escapes_control_characters(cache_dir):
    key = "evil\nkey\x1b[2J\r"
    df = pd.DataFrame({"a\nb": [1, 2], "\x1b[31mred": [1.0, 2.0], "plain": [3, 4]})
    mmcache.save(df, key)
    r = run("info", key, cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\r" not in r.stdout
    assert repr(key) in r.stdout and repr("a\nb") in r.stdout and repr("\x1b[31mred") in r.stdout
    lines = r.stdout.splitlines()
    # 9 fields, blank, COLUMN header + 3 columns, blank, FILE header + one line per file.
    nfiles = len(json.loads(run("info", key, "--json", cache_dir=cache_dir).stdout)["files"])
    assert len(lines) == 9 + 1 + 4 + 1 + 1 + nfiles, r.stdout
    assert not any(line in ("b", "key") for line in lines)


@pytest.mark.parametrize("command", [["clean", ""], ["info", ""], ["clean", "ok", ""]])
def test_item14_empty_key_is_called_empty(cache_dir, command):
    r = run(*command, cache_dir=cache_dir)
    assert r.returncode == 1 and r.stderr.startswith("Error: "), r
    assert "empty" in r.stderr and "shorter" not in r.stderr, r.stderr
    with pytest.raises(mmcache.InvalidKeyError, match="empty"):
        mmcache.save(frame(1), "")
    with pytest.raises(mmcache.InvalidKeyError, match="shorter"):
        mmcache.save(frame(1), "k" * 201)


UNPICKLE = """
import pickle, sys
entry, df = pickle.loads(sys.stdin.buffer.read())
print(float(entry.open()["x"].sum()), float(df["x"].sum()), entry.path.is_absolute())
"""


@pytest.mark.parametrize("via", ["Cache('rel/dir')", "MMCACHE_DIR=rel/dir"])
def test_item14_relative_cache_dir_is_resolved_once(tmp_path, monkeypatch, via):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    if via.startswith("Cache"):
        cache = mmcache.Cache("rel/dir")
    else:
        monkeypatch.setenv("MMCACHE_DIR", "rel/dir")
        cache = mmcache.Cache()
    df = frame(100_000, 2.0)
    entry = cache.save(df, "k")
    assert entry.path.is_absolute() and entry.path.parent == here / "rel" / "dir"
    assert cache.dir == here / "rel" / "dir"
    opened = cache.open("k")
    payload = pickle.dumps((entry, opened))
    assert len(payload) < 4096, "the frame was not pickled by reference"
    r = subprocess.run([sys.executable, "-c", UNPICKLE], input=payload, capture_output=True,
                       timeout=TIMEOUT, env=_env(), cwd=elsewhere)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().split() == ["200000.0", "200000.0", "True"]
    assert not (elsewhere / "rel").exists()
    assert stat.S_ISDIR(os.stat(here / "rel" / "dir").st_mode)


# --- review of clean/ls/info (review-edges FINDINGS.md): one test per finding ------------------


def _killed_save_leftovers(d: Path, key: str, token: str, nbytes: int) -> list[Path]:
    """What a save of ``key`` killed before publishing leaves: its data directory and the
    metadata it was writing."""
    data = d / f"{entry_name(key)}.{token}"
    data.mkdir(mode=0o700)
    (data / "0.npy").write_bytes(b"\0" * nbytes)
    tmp = d / f"{entry_name(key)}.json.{token}.tmp"
    tmp.write_bytes(b"{" * 37)
    return [data, tmp]


def test_review_dry_run_with_keys_lists_the_leftovers_it_removes(cache_dir):
    cache = mmcache.Cache(cache_dir)
    cache.save(frame(100_000), "k")
    cache.save(frame(10), "other")
    mine = _killed_save_leftovers(cache_dir, "k", "feed" * 4, 5_000_000)
    theirs = _killed_save_leftovers(cache_dir, "other", "beef" * 4, 3000)
    only = _killed_save_leftovers(cache_dir, "nothing saved", "face" * 4, 7000)
    sizes = {mine[0]: 5_000_000, mine[1]: 37, only[0]: 7000, only[1]: 37}

    # The Python API's dry run lists them (with sizes) ...
    report = cache._clean_report(["k", "nothing saved"], None, None, True)
    assert [e.key for e in report.entries] == ["k"]
    assert {x.path: x.nbytes for x in report.stale} == sizes
    before = snapshot(cache_dir)

    # ... and so does the CLI's: every name, every size.
    r = run("clean", "k", "nothing saved", "--dry-run", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    assert snapshot(cache_dir) == before
    for path, size in sizes.items():
        assert any(f"would remove stale leftover {path.name}" in line and human(size) in line
                   for line in r.stdout.splitlines()), (path.name, r.stdout)
    assert "other" not in r.stdout and theirs[0].name not in r.stdout
    k_bytes = report.entries[0].nbytes
    would = human(k_bytes + sum(sizes.values()))
    assert f"would free {would} in 1 entry and 4 stale leftovers" in r.stdout, r.stdout

    # The real run removes exactly those, and says so, one line each.
    r = run("clean", "k", "nothing saved", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    for path, size in sizes.items():
        assert any(f"removed stale leftover {path.name}" in line and human(size) in line
                   for line in r.stdout.splitlines()), (path.name, r.stdout)
        assert not path.exists()
    assert f"freed {would};" in r.stdout, r.stdout
    gone = set(before) - set(snapshot(cache_dir))
    assert {g.split("/")[0] for g in gone} == {p.name for p in sizes} | {
        f"{entry_name('k')}.json", f"{entry_name('k')}.lock",
        json.loads(before[f"{entry_name('k')}.json"] or b"")["data"]}
    assert all(p.exists() for p in theirs) and [e.key for e in cache.entries()] == ["other"]


def _damage_data(d: Path, key: str, how: str) -> None:
    meta = json.loads((d / f"{entry_name(key)}.json").read_bytes())
    data = d / meta["data"]
    if how == "truncated file":
        os.truncate(data / "0.npy", 100)
    elif how == "missing file":
        (data / meta["files"][-1]["name"]).unlink()
    else:
        shutil.rmtree(data)


DATA_DAMAGE = ["truncated file", "missing file", "missing directory"]


def test_review_entry_with_damaged_data_files_is_shown_and_cleaned(cache_dir):
    mmcache.save(frame(1000), "alpha")
    for how in DATA_DAMAGE:
        mmcache.save(frame(1000), how)
        _damage_data(cache_dir, how, how)
        with pytest.raises(mmcache.CorruptEntryError):
            mmcache.open(how)

    # ls: each one DAMAGED, saying what is wrong and what to do; never a healthy entry.
    r = run("ls", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    for how in DATA_DAMAGE:
        line = next((x for x in r.stdout.splitlines() if x.startswith(f"DAMAGED {how} ")), "")
        assert f"mmcache clean '{how}'` removes it" in line, r.stdout
        assert ("missing" if "missing" in how else "truncated") in line, line
    assert r.stdout.splitlines()[-1].startswith("1 entry"), r.stdout
    data = json.loads(run("ls", "--json", cache_dir=cache_dir).stdout)
    assert [e["key"] for e in data["entries"]] == ["alpha"]
    assert {p["key"]: p["kind"] for p in data["problems"]} == dict.fromkeys(DATA_DAMAGE,
                                                                            "damaged")
    assert [e.key for e in mmcache.entries()] == ["alpha"]

    # info: damaged, and the remedy (not "no entry", not a raw error about a file).
    for how in DATA_DAMAGE:
        r = run("info", how, cache_dir=cache_dir)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r
        assert f"entry '{how}' is damaged" in r.stderr and "mmcache clean" in r.stderr, r.stderr

    # clean --stale: the dry run lists them, the real run removes them (and spares alpha).
    r = run("clean", "--stale", "--dry-run", cache_dir=cache_dir)
    for how in DATA_DAMAGE:
        assert f"would remove damaged entry {how} " in r.stdout, r.stdout
    r = run("clean", "--stale", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    for how in DATA_DAMAGE:
        assert f"removed damaged entry {how} " in r.stdout, r.stdout
    assert {own(n) and n.startswith(entry_name("alpha")) for n in os.listdir(cache_dir)} == {
        True}
    assert [e.key for e in mmcache.entries()] == ["alpha"]
    assert json.loads(run("ls", "--json", cache_dir=cache_dir).stdout)["problems"] == []

    # By key too; and a healthy entry is never taken for damaged under the lock.
    mmcache.save(frame(10), "beta")
    _damage_data(cache_dir, "beta", "truncated file")
    r = run("clean", "beta", cache_dir=cache_dir)
    assert "removed damaged entry beta" in r.stdout and not mmcache.exists("beta"), r.stdout
    from mmcache import _clean, _survey
    names = _survey.own_names(cache_dir)[entry_name("alpha")]
    assert _clean._remove_stale(cache_dir, entry_name("alpha"), names, damaged=True)
    assert mmcache.open("alpha")["i"].sum() == frame(1000)["i"].sum()


def test_review_clean_is_linear_in_the_number_of_damaged_entries(tmp_path, monkeypatch):
    # The cost is counted, not timed: how often a damaged entry's name is looked at.
    from mmcache import _clean, _survey

    looked = [0]

    class CountingProblem(_clean.Problem):
        def __getattribute__(self, attr: str) -> Any:
            if attr == "name":
                looked[0] += 1
            return super().__getattribute__(attr)

    monkeypatch.setattr(_clean, "Problem", CountingProblem)
    monkeypatch.setattr(_survey, "Problem", CountingProblem)
    counts = {}
    for n in (50, 200):
        for by_key in (False, True):
            d = tmp_path / f"c{n}{by_key}"
            d.mkdir()
            keys = [f"k{i}" for i in range(n)]
            for k in keys:
                (d / f"{entry_name(k)}.json").write_bytes(b'{"key": "%s", broken' % k.encode())
            cache = mmcache.Cache(d)
            looked[0] = 0
            report = cache._clean_report(keys if by_key else None, None, None, False)
            assert len(report.damaged) == n and os.listdir(d) == []
            counts[n, by_key] = looked[0]
    for by_key in (False, True):
        ratio = counts[200, by_key] / counts[50, by_key]
        assert ratio <= 4.5, f"4x the damaged entries cost {ratio:.1f}x the work ({counts})"


OUT_OF_DESCRIPTORS = """
import os, pathlib, resource, sys
from mmcache import _clean
base = pathlib.Path(sys.argv[1])
victim, cache = base / "victim", base / "cache"
planted = cache / "k-0123456789abcdef01234567.0123456789abcdef"
real = cache / "k-0123456789abcdef01234567.fedcba9876543210"
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
def exhaust(leave):
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    for _ in range(leave):
        os.close(held.pop())
def release():
    while held:
        os.close(held.pop())
out = []
exhaust(0)  # no descriptor at all: the fallback by path
out.append(_clean.remove_data_dir(planted))
release()
print(sorted(os.listdir(victim)), flush=True)
exhaust(0)
out.append(_clean._remove_numbered(planted, None))
out.append(_clean.remove_data_dir(real))
release()
os.mkdir(real); (real / "0.npy").write_bytes(b"x" * 10); (real / "1.npy").write_bytes(b"y")
exhaust(1)  # the directory opens, listing it does not: relative to its descriptor
out.append(_clean.remove_data_dir(real))
release()
print(out, sorted(os.listdir(victim)), os.path.exists(real))
"""


def test_review_out_of_descriptors_removal_never_follows_a_symlinked_data_dir(tmp_path):
    victim, cache = tmp_path / "victim", tmp_path / "cache"
    victim.mkdir()
    cache.mkdir(mode=0o700)
    for n in ("0.npy", "1.npy", "meta.json", "keep.txt"):
        (victim / n).write_text("user data")
    (cache / "k-0123456789abcdef01234567.0123456789abcdef").symlink_to(victim)
    real = cache / "k-0123456789abcdef01234567.fedcba9876543210"
    real.mkdir()
    (real / "0.npy").write_bytes(b"\0" * 100)
    (real / "meta.json").write_bytes(b"{}")
    r = subprocess.run([sys.executable, "-c", OUT_OF_DESCRIPTORS, str(tmp_path)],
                       capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    every = "['0.npy', '1.npy', 'keep.txt', 'meta.json']"
    assert r.stdout.splitlines()[:1] == [every], (r.stdout, r.stderr)  # through the symlink
    assert r.returncode == 0, r.stderr
    # Through the symlink: nothing, either way. The real directory: removed either way.
    assert r.stdout.splitlines()[1:] == [f"[0, 0, 102, 11] {every} False"], r.stdout


def test_review_size_limit_save_remembers_damaged_metadata(tmp_path):
    from mmcache import _survey

    for n in (N, 4 * N):
        d = tmp_path / f"c{n}"
        cache = mmcache.Cache(d, max_bytes="1GB")
        _fill(d, n, cache=cache)
        for i in range(0, n, 2):  # half of them damaged (left by a crash)
            (d / f"{entry_name(f'k{i}')}.json").write_bytes(b'{"key": "k%d", broken' % i)
        _survey._SUMMARIES.clear()  # as a fresh process
        with counting(d) as first:
            cache.save(frame(3), "one more")
        assert first.meta_opens <= 2 * n, first.meta_opens  # every file once (+ key hints)
        for j in range(3):
            with counting(d) as c:
                cache.save(frame(3), f"and {j}")
            assert c.meta_opens <= 3, f"save {j}: {c.meta_opens} metadata reads ({n} entries)"
            assert c.proc_scans == 0


def _wrong_types(d: Path) -> dict[str, str]:
    """Names mmcache writes, each of a type it never gives that name, holding user data."""
    made = {}
    for name in (f"{entry_name('a')}.lock", f"{entry_name('b')}.json.{HEX16}.tmp",
                 f"{entry_name('c')}.json", f"{entry_name('d')}.{HEX16}"):
        (d / name).mkdir()
        (d / name / "user.txt").write_text("mine")
        made[name] = "directory"
    for name in (f"{entry_name('e')}.{HEX16}", ):  # a file where mmcache makes a directory
        (d / name).write_text("mine")
        made[name] = "file"
    os.mkfifo(d / f"{entry_name('f')}.json.{HEX16}.tmp")
    made[f"{entry_name('f')}.json.{HEX16}.tmp"] = "fifo"
    # A FIFO under a data file's name inside a killed save's data directory.
    dead = d / f"{entry_name('g')}.{HEX16}"
    dead.mkdir()
    (dead / "0.npy").write_bytes(b"\0" * 1000)
    os.mkfifo(dead / "1.npy")
    return made


def test_review_names_of_the_wrong_file_type_are_not_mmcaches(cache_dir):
    mmcache.save(frame(10), "ok")
    cache_dir_names = set(os.listdir(cache_dir))
    made = _wrong_types(cache_dir)
    dead = f"{entry_name('g')}.{HEX16}"

    data = json.loads(run("ls", "--json", cache_dir=cache_dir).stdout)
    assert [x["path"] for x in data["leftovers"]["items"]] == [str(cache_dir / dead)], data
    assert data["leftovers"]["nbytes"] == 1000 and data["problems"] == []
    r = run("ls", cache_dir=cache_dir)
    assert "stale leftovers (of interrupted saves, or versions no longer mapped): 1, " in r.stdout
    r = run("clean", "--dry-run", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    assert not any(name in r.stdout for name in made), r.stdout
    assert f"would remove stale leftover {dead}/" in r.stdout
    assert "would free" in r.stdout and "1 entry and 1 stale leftover" in r.stdout, r.stdout

    r = run("clean", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    assert not any(name in r.stdout for name in made), r.stdout
    assert f"removed stale leftover {dead}/" in r.stdout and "files not mmcache's" in r.stdout
    for name, kind in made.items():
        st = os.lstat(cache_dir / name)
        assert {"directory": stat.S_ISDIR, "file": stat.S_ISREG, "fifo": stat.S_ISFIFO}[kind](
            st.st_mode), name
        if kind == "directory":
            assert (cache_dir / name / "user.txt").read_text() == "mine"
    assert os.listdir(cache_dir / dead) == ["1.npy"]  # the FIFO stays, 0.npy went
    assert set(os.listdir(cache_dir)) == set(made) | {dead}
    assert not cache_dir_names & set(os.listdir(cache_dir))

    # Nothing is left to report as removable.
    data = json.loads(run("ls", "--json", cache_dir=cache_dir).stdout)
    assert data["leftovers"]["count"] == 0 and data["entries"] == [], data
    r = run("clean", "--dry-run", cache_dir=cache_dir)
    assert r.stdout.strip() == "would free 0 B in 0 entries", r.stdout


def test_review_fifo_named_like_metadata_or_lock_never_blocks(cache_dir):
    mmcache.save(frame(10), "good")
    mmcache.save(frame(10), "locked out")
    lock = cache_dir / f"{entry_name('locked out')}.lock"
    lock.unlink(missing_ok=True)
    os.mkfifo(lock)  # in place of an entry's lock file
    os.mkfifo(cache_dir / f"{entry_name('ff')}.json")  # in place of a key's metadata
    os.mkdir(cache_dir / f"{entry_name('ff')}.{HEX16}")  # with a killed save's data dir
    os.mkfifo(cache_dir / f"{entry_name('gg')}.lock")  # a FIFO lock of a key with leftovers
    gg = cache_dir / f"{entry_name('gg')}.{HEX16}"
    gg.mkdir()
    (gg / "0.npy").write_bytes(b"x")
    fifos = [lock, cache_dir / f"{entry_name('ff')}.json", cache_dir / f"{entry_name('gg')}.lock"]

    # Each command is bounded (subprocess timeout): a blocking open would fail the test.
    for args in (["ls"], ["ls", "--json"], ["info", "locked out"], ["clean", "--dry-run"],
                 ["clean", "--stale"], ["clean", "locked out", "ff", "gg"], ["clean"]):
        r = run(*args, cache_dir=cache_dir)
        assert r.returncode == 0, (args, r.stderr)
        said = [x for x in r.stdout.splitlines() if not x.startswith("cannot remove ")]
        assert not any(f.name in x for f in fifos for x in said), (args, r.stdout)
    assert f"cannot remove locked out: its lock {lock.name} is not a regular file" in r.stdout
    assert all(stat.S_ISFIFO(os.lstat(f).st_mode) for f in fifos)
    assert gg.exists() and not (cache_dir / f"{entry_name('ff')}.{HEX16}").exists()
    assert [e.key for e in mmcache.entries()] == ["locked out"]  # its key cannot be locked
    assert mmcache.open("locked out")["i"].sum() == frame(10)["i"].sum()
