"""What pandas 2 without copy-on-write costs mmcache, next to copy-on-write on (pandas 3's
only mode): open, pickling a reference, an in-place edit, and memory after the edit.

    python scripts/bench_cow.py [--mb 1024]

Run it under pandas 2 (both modes are measured, each in a fresh process) or pandas 3 (copy-
on-write only). One run, median of a few repeats; a noisy 2-core VM: read ratios, not µs.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

ROWS_PER_MB = 1024 * 1024 // (8 * 8)  # 8 float64 columns


def _median(f, n: int = 7) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _rss_private_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    kb = sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))
    return kb / 1024


def child(cache_dir: str, cow: bool) -> dict[str, float]:
    if int(pd.__version__.split(".")[0]) < 3:
        pd.options.mode.copy_on_write = cow
    import mmcache

    first = mmcache.open("bench", cache_dir=cache_dir)  # maps; later opens may reuse it
    keep = [first]
    out = {
        "open_ms": _median(lambda: keep.append(mmcache.open("bench", cache_dir=cache_dir)))
        * 1e3,
        "pickle_ref_ms": _median(lambda: pickle.dumps(first)) * 1e3,
        "ref_bytes": len(pickle.dumps(first)),
    }
    keep.clear()
    df = mmcache.open("bench", cache_dir=cache_dir)
    before = _rss_private_mb()
    t = time.perf_counter()
    df.iloc[0, 0] = -1.0  # one value of a column in a consolidated 2-D block
    out["edit_ms"] = (time.perf_counter() - t) * 1e3
    out["private_mb_added_by_edit"] = _rss_private_mb() - before
    t = time.perf_counter()
    blob = pickle.dumps(df)
    out["pickle_edited_ms"] = (time.perf_counter() - t) * 1e3
    out["edited_pickle_mb"] = len(blob) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "on")))
        return
    import mmcache

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="mmcache-bench-cow-", dir=shm) as d:
        n = args.mb * ROWS_PER_MB
        df = pd.DataFrame(np.random.default_rng(0).random((n, 8)),
                          columns=[f"c{i}" for i in range(8)])
        mmcache.save(df, "bench", cache_dir=d)
        del df
        modes = ["on", "off"] if int(pd.__version__.split(".")[0]) < 3 else ["on"]
        print(f"pandas {pd.__version__}, numpy {np.__version__}, {args.mb} MB frame "
              "(8 float64 columns, one block)")
        rows = {}
        for mode in modes:
            r = subprocess.run([sys.executable, __file__, "--child", d, mode],
                               capture_output=True, text=True, timeout=600, check=True)
            rows[mode] = json.loads(r.stdout)
        keys = list(next(iter(rows.values())))
        print(f"{'':28}" + "".join(f"{'CoW ' + m:>14}" for m in rows))
        for k in keys:
            print(f"{k:28}" + "".join(f"{rows[m][k]:>14.3f}" for m in rows))


if __name__ == "__main__":
    main()
