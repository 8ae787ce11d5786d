"""The `mmcache` command, run for real in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mmcache
from mmcache._paths import entry_name
from tests import _pd

TIMEOUT = 60


def run(*args: str, cache_dir=None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mmcache", *args]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


def _frame(n: int, value: float = 1.0) -> pd.DataFrame:
    return pd.DataFrame({"x": np.full(n, value), "s": pd.array(["v"] * n, dtype="str")})


def _age(cache_dir, key: str, seconds: float) -> None:
    """Make ``key`` look last used ``seconds`` ago (the metadata's atime records last use)."""
    path = cache_dir / f"{entry_name(key)}.json"
    os.utime(path, (time.time() - seconds, path.stat().st_mtime))


def test_ls_table_json_and_empty(cache_dir):
    r = run("ls", cache_dir=cache_dir)
    assert r.returncode == 0 and "0 entries" in r.stdout
    mmcache.save(_frame(1000), "alpha")
    mmcache.save(pd.Series(np.arange(5)), "beta")
    r = run("ls", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["KEY", "SIZE", "ROWS", "COLS", "CREATED", "LAST", "USED", "IN",
                                "USE"]
    assert any(line.startswith("alpha ") and "1,000" in line for line in lines)
    assert "2 entries" in lines[-1]
    data = json.loads(run("ls", "--json", cache_dir=cache_dir).stdout)
    assert data["cache_dir"] == str(cache_dir)
    by_key = {e["key"]: e for e in data["entries"]}
    assert set(by_key) == {"alpha", "beta"}
    assert by_key["alpha"]["nrows"] == 1000 and by_key["alpha"]["ncols"] == 2
    assert data["total_bytes"] == sum(e["nbytes"] for e in data["entries"])
    assert by_key["alpha"]["in_use"] == 0


def test_info_table_json_and_missing_key(cache_dir):
    mmcache.save(_frame(10), "alpha")
    r = run("info", "alpha", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    assert "float64" in r.stdout and "str" in r.stdout and ".npy" in r.stdout
    data = json.loads(run("info", "alpha", "--json", cache_dir=cache_dir).stdout)
    assert data["columns"] == [{"name": "x", "dtype": "float64"},
                               {"name": "s", "dtype": str(_pd.STR)}]
    assert sum(f["size"] for f in data["files"]) < data["nbytes"]
    r = run("info", "missing", cache_dir=cache_dir)
    assert r.returncode == 1
    assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "missing" in r.stderr and "Traceback" not in r.stderr


def test_info_does_not_count_as_use(cache_dir):
    mmcache.save(_frame(10), "alpha")
    _age(cache_dir, "alpha", 7200)
    assert run("info", "alpha", cache_dir=cache_dir).returncode == 0
    assert run("ls", cache_dir=cache_dir).returncode == 0
    r = run("clean", "--older-than", "1h", cache_dir=cache_dir)
    assert "removed alpha" in r.stdout


def test_clean_everything_and_leftovers(cache_dir):
    mmcache.save(_frame(1000), "a")
    mmcache.save(_frame(1000), "b")
    stale = cache_dir / f"{entry_name('c')}.0123456789abcdef"  # a killed save's data dir
    stale.mkdir()
    (stale / "0.npy").write_bytes(b"x" * 4096)
    (cache_dir / f"{entry_name('d')}.lock").touch()  # an orphaned lock file
    r = run("clean", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    assert "removed a" in r.stdout and "removed b" in r.stdout
    assert "stale leftovers" in r.stdout and "freed" in r.stdout
    assert list(cache_dir.iterdir()) == []


def test_clean_by_key_and_dry_run(cache_dir):
    for k in ("a", "b"):
        mmcache.save(_frame(100), k)
    r = run("clean", "--dry-run", cache_dir=cache_dir)
    assert r.returncode == 0 and "would remove a" in r.stdout and "would remove b" in r.stdout
    assert {e.key for e in mmcache.entries()} == {"a", "b"}
    r = run("clean", "b", cache_dir=cache_dir)
    assert "removed b" in r.stdout and "removed a" not in r.stdout
    assert [e.key for e in mmcache.entries()] == ["a"]


def test_clean_older_than(cache_dir):
    for k in ("old", "new"):
        mmcache.save(_frame(100), k)
    _age(cache_dir, "old", 3 * 3600)
    r = run("clean", "--older-than", "2h", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    assert [e.key for e in mmcache.entries()] == ["new"]


def test_clean_max_size_evicts_least_recently_used_first(cache_dir):
    for i, k in enumerate(["k0", "k1", "k2", "k3"]):
        mmcache.save(_frame(100_000), k)
        _age(cache_dir, k, 100 - i * 10)  # k0 least recently used ... k3 most
    _age(cache_dir, "k1", 1)  # k1 used just now
    one = mmcache.entries()[0].nbytes
    r = run("clean", "--max-size", str(2 * one + 10), cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("removed k")] \
        == ["k0", "k2"]
    assert {e.key for e in mmcache.entries()} == {"k1", "k3"}


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["clean", "--max-size", "ten"], "not a size"),
        (["clean", "--max-size", "5XB"], "not a size"),
        (["clean", "--older-than", "2x"], "not a duration"),
        (["clean", "--older-than=-1h"], "not a duration"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_usage_exits_2(cache_dir, args, words):
    r = run(*args)
    assert r.returncode == 2
    assert words in r.stderr and "Traceback" not in r.stderr


def test_bad_cache_dir_exits_1(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    r = run("ls", cache_dir=not_a_dir)
    assert r.returncode == 1 and r.stderr.startswith("Error: ")
    world = tmp_path / "world"
    world.mkdir()
    world.chmod(0o777)
    r = run("ls", cache_dir=world)
    assert r.returncode == 1 and "writable by every user" in r.stderr


def test_bad_key_exits_1(cache_dir):
    r = run("info", "", cache_dir=cache_dir)
    assert r.returncode == 1 and "key" in r.stderr


def test_console_script_is_installed(cache_dir):
    exe = os.path.join(os.path.dirname(sys.executable), "mmcache")
    r = subprocess.run([exe, "ls", "--cache-dir", str(cache_dir)], capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 0 and "0 entries" in r.stdout


HOLDER = """
import sys, time, mmcache
df = mmcache.open("held", cache_dir=sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()          # wait until the parent has cleaned
print(float(df["x"].sum()), flush=True)
"""


def test_ls_counts_live_users_and_clean_leaves_readers_intact(cache_dir):
    mmcache.save(_frame(100_000, 2.0), "held")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        data = json.loads(run("ls", "--json", cache_dir=cache_dir).stdout)
        assert data["entries"][0]["in_use"] == 1
        r = run("clean", cache_dir=cache_dir)
        assert r.returncode == 0 and "removed held" in r.stdout and "live processes" in r.stdout
        assert not mmcache.exists("held")
        out, _ = proc.communicate("go\n", timeout=TIMEOUT)
        assert float(out.strip()) == 200_000.0  # the reader still sees its data
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)


def test_clean_reports_missing_keys_and_escapes_odd_ones(cache_dir):
    mmcache.save(_frame(10), "line\nbreak")
    r = run("ls", cache_dir=cache_dir)
    assert "'line\\nbreak'" in r.stdout and len(r.stdout.splitlines()) == 3
    r = run("clean", "nope", "line\nbreak", cache_dir=cache_dir)
    assert r.returncode == 0
    assert "no entry for key nope" in r.stdout and "removed 'line\\nbreak'" in r.stdout


def test_ls_of_a_missing_dir_creates_nothing(tmp_path):
    r = run("ls", cache_dir=tmp_path / "typo" / "deep")
    assert r.returncode == 0 and "0 entries" in r.stdout
    assert not (tmp_path / "typo").exists()


def test_ingest_with_columns_and_exit_codes(cache_dir, tmp_path):
    df = pd.DataFrame({"a": np.arange(50), "b": np.arange(50) * 0.5,
                       "s": [f"w{i}" for i in range(50)]})
    parquet = tmp_path / "d.parquet"
    df.to_parquet(parquet, row_group_size=20)
    r = run("ingest", str(parquet), "p", "--columns", "a,s", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ingested p: 50 rows, 2 columns") and r.stderr == ""
    _pd.assert_frame_equal(mmcache.open("p"), df[["a", "s"]])
    r = run("ingest", str(tmp_path / "missing.parquet"), "m", cache_dir=cache_dir)
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert run("ingest", str(parquet), cache_dir=cache_dir).returncode == 2  # no KEY


def _imports(*argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime ARGV``: the result and the top-level modules it loaded."""
    r = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True,
                       text=True, timeout=TIMEOUT, cwd=Path(mmcache.__file__).parent.parent)
    return r, {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}


def test_ls_and_clean_never_import_pandas_or_pyarrow(cache_dir):
    """`mmcache ls` and `clean` read metadata and remove files: they start without loading
    pandas or pyarrow (about 0.6 CPU-s a command), through `python -m mmcache` and the
    installed `mmcache` script alike; a program that imports mmcache gets the modules that
    build frames at import, not in its first open (a spawned worker's first task)."""
    mmcache.save(_frame(10), "alpha")
    script = Path(sys.executable).parent / "mmcache"
    starts = [["-m", "mmcache"]] + ([[str(script)]] if script.exists() else [])
    for start in starts:
        for argv in (["ls"], ["ls", "--json"], ["clean", "--dry-run"], ["clean", "gone"]):
            r, loaded = _imports(*start, *argv, "--cache-dir", str(cache_dir))
            assert r.returncode == 0, r.stderr[-2000:]
            assert "mmcache._cli" in loaded or "mmcache.__main__" in loaded, sorted(loaded)
            assert not loaded & {"pandas", "pyarrow", "mmcache._frame"}, (start, argv)
    r, loaded = _imports(*starts[-1], "clean", "--cache-dir", str(cache_dir))
    assert r.returncode == 0 and not loaded & {"pandas", "pyarrow"}, r.stderr[-2000:]
    assert not mmcache.exists("alpha")
    r, loaded = _imports("-c", "import mmcache")
    assert r.returncode == 0 and {"mmcache._frame", "pandas"} <= loaded, r.stderr[-2000:]
