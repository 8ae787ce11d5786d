"""Wall times of `mmcache ls`, `mmcache clean` and of a save under a size limit, against the
number of entries in the cache directory (issue 8, item 12).

    python scripts/bench_clean.py                       # 1,000 / 2,000 / 5,000 entries
    python scripts/bench_clean.py --sizes 100,400 --saves 5
    PYTHONPATH=/other/checkout python scripts/bench_clean.py   # the same, another version

It measures whichever mmcache ``python`` imports (the report names it), so one command compares
two versions. Each size gets a fresh directory on /dev/shm (else the temp dir) holding N small
entries (3 rows each) plus N/10 leftovers of killed saves; the CLI commands run as the user
runs them (a fresh interpreter, so their times include its start-up, also reported alone).
"Save" is the mean of ``--saves`` saves of new keys into the N-entry directory made by this
process, after one warm-up save, with and without ``Cache(max_bytes=...)`` (a limit high
enough that nothing is evicted, so the figure is the limit's bookkeeping alone).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import mmcache
from mmcache._paths import entry_name

# The CLI children import the mmcache this process imported (`python -m` would otherwise put
# the working directory, perhaps another checkout, first on sys.path).
_HOME = str(Path(mmcache.__file__).resolve().parent.parent)
_ENV = {**os.environ, "PYTHONPATH": _HOME, "PYTHONDONTWRITEBYTECODE": "1"}


def _cli(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmcache", *args], check=True, env=_ENV,
                   cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL, timeout=3600)
    return time.perf_counter() - t


def _cli_home() -> str:
    code = "import mmcache, pathlib; print(pathlib.Path(mmcache.__file__).parent)"
    return subprocess.run([sys.executable, "-c", code], check=True, env=_ENV,
                          cwd=tempfile.gettempdir(), capture_output=True, text=True,
                          timeout=600).stdout.strip()


def _saves(cache: mmcache.Cache, df: pd.DataFrame, tag: str, n: int) -> float:
    cache.save(df, f"{tag}-warm-up")
    t = time.perf_counter()
    for i in range(n):
        cache.save(df, f"{tag}-{i}")
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,2000,5000", help="entry counts (default: %(default)s)")
    ap.add_argument("--saves", type=int, default=20, help="saves timed per size (%(default)s)")
    args = ap.parse_args()
    shm = Path("/dev/shm")
    parent = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    df = pd.DataFrame({"x": np.arange(3.0), "i": np.arange(3)})
    print(f"mmcache from {Path(mmcache.__file__).parent} (CLI children: {_cli_home()}); "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"files under {parent or tempfile.gettempdir()}")
    empty = Path(tempfile.mkdtemp(prefix="mmcache-bench-", dir=parent))
    try:
        alone = _cli("ls", "--cache-dir", str(empty))
        print(f"interpreter start-up + `mmcache ls` of an empty dir: {alone:.2f} s")
    finally:
        shutil.rmtree(empty)
    print()
    print("| entries | ls | clean --dry-run | clean | save | save with max_bytes |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in args.sizes.split(",")):
        top = Path(tempfile.mkdtemp(prefix="mmcache-bench-", dir=parent))
        try:
            d = top / "cache"
            plain = mmcache.Cache(d)
            for i in range(n):
                plain.save(df, f"k{i}")
            for i in range(n // 10):
                dead = d / f"{entry_name(f'dead{i}')}.{i:016x}"
                dead.mkdir()
                (dead / "0.npy").write_bytes(b"\0" * 1000)
            save = _saves(plain, df, "plain", args.saves)
            limited = _saves(mmcache.Cache(d, max_bytes="1TB"), df, "limited", args.saves)
            ls = _cli("ls", "--cache-dir", str(d))
            dry = _cli("clean", "--dry-run", "--cache-dir", str(d))
            clean = _cli("clean", "--cache-dir", str(d))
            assert not any(p.suffix == ".json" for p in d.iterdir()), "clean left entries"
            print(f"| {n:,} | {ls:.2f} s | {dry:.2f} s | {clean:.2f} s | {save * 1e3:.1f} ms "
                  f"| {limited * 1e3:.1f} ms |", flush=True)
        finally:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
