"""Child processes of the stress test (tests/test_stress.py), and the frames they trade.

Every child is a fresh interpreter started with :func:`launch` (``python -m
tests._stress_workers ROLE JSON_ARGS`` from the repository root), so a SIGBUS shows up as exit
status -7 and the parent's SIGKILL hits exactly one writer. Importing this module has no side
effects.

Frames check themselves: ``df.attrs`` holds a digest of every column's bytes and of the index,
the dtypes, the row count and a save id that is also the value of every row of the ``ver``
column. A frame assembled from the files of two saves, a file cut short, a mapping of the
wrong file or a column of the wrong version fails :func:`problem`.

Children talk to the parent through append-only log files, one line per event, written with
a single ``os.write`` (so a SIGKILL never leaves half a line):

    ready                 the child is set up (writers: about to save)
    B VER KEYIDX          a writer starts saving save id VER under KEYS[KEYIDX]
    D VER KEYIDX          ... and that save returned
    X MESSAGE             a violation: an invariant failed or an unexpected exception
    R JSON                the child's final counts (readers, cleaner, writers that stopped)

A writer also keeps a one-byte status file: ``S`` while inside ``mmcache.save``, ``I``
outside, so the parent can aim its SIGKILLs at saves in progress.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tests import _pd

REPO = Path(__file__).resolve().parent.parent

# Keys with characters that need encoding ("/", space), so the stress also covers naming.
KEYS = ["alpha", "beta/2", "gamma gamma"]
COLUMNS = ["ver", "x", "i", "f32", "s", "cat", "n"]
INDEX = "<index>"
MAX_VIOLATION_LINES = 50  # per child: enough to diagnose, never a flood


# --- frames that carry their own checksum ----------------------------------------------------


def _digest_str(arr: Any) -> str:
    """Digest of an Arrow-backed string array's content (offsets, bytes, nulls), independent
    of where its buffers start: reads every data byte, so a lost page cannot go unnoticed."""
    pa_arr = arr._pa_array
    if isinstance(pa_arr, pa.ChunkedArray):
        pa_arr = pa_arr.combine_chunks()  # one chunk: no copy
    large = pa.types.is_large_string(pa_arr.type)
    _validity, offsets_buf, data_buf = pa_arr.buffers()
    n = len(pa_arr)
    offsets = np.frombuffer(offsets_buf, dtype=np.int64 if large else np.int32)
    offsets = offsets[pa_arr.offset : pa_arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, "u1")
    h = hashlib.blake2b(digest_size=16)
    h.update(b"str")
    h.update(offsets - offsets[0])
    h.update(np.ascontiguousarray(data[offsets[0] : offsets[-1]]))
    h.update(pa_arr.is_null().to_numpy(zero_copy_only=False))
    return h.hexdigest()


def digest(values: pd.Series | pd.Index) -> str:
    """Digest of one column's (or the index's) content, by its bytes."""
    arr = values.array
    h = hashlib.blake2b(digest_size=16)
    if isinstance(values.dtype, pd.CategoricalDtype):
        h.update(b"cat")
        h.update(np.ascontiguousarray(arr.codes))
        h.update(json.dumps([str(c) for c in arr.categories]).encode())
        h.update(b"ordered" if arr.ordered else b"unordered")
    elif hasattr(arr, "_mask"):  # pandas nullable: values + mask
        h.update(b"masked")
        h.update(np.ascontiguousarray(arr._data))
        h.update(np.ascontiguousarray(arr._mask))
    elif isinstance(values.dtype, pd.StringDtype):
        return _digest_str(arr)
    else:
        h.update(b"np")
        h.update(np.ascontiguousarray(values.to_numpy()))
    return h.hexdigest()


def base_parts(seed: int, nrows: int) -> dict[str, Any]:
    """Random content for a frame (everything except its save id): columns of seven kinds,
    a shuffled int64 index, and their digests."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 9, nrows)
    offsets = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    chars = rng.integers(ord("a"), ord("z") + 1, int(offsets[-1])).astype(np.uint8)
    valid = rng.random(nrows) > 0.05
    strs = pa.LargeStringArray.from_buffers(
        nrows, pa.py_buffer(offsets), pa.py_buffer(chars),
        pa.py_buffer(np.packbits(valid, bitorder="little")), null_count=int((~valid).sum()),
    )
    n_mask = rng.random(nrows) < 0.1
    n_vals = rng.integers(-1000, 1000, nrows).astype(np.int32)
    n_vals[n_mask] = 0  # what lies under the mask is not data
    cols: dict[str, Any] = {
        "x": rng.random(nrows),
        "i": rng.integers(-(2**62), 2**62, nrows),
        "f32": rng.standard_normal(nrows).astype(np.float32),
        "s": pd.Series(strs, dtype=_pd.STR).array,
        "cat": pd.Categorical.from_codes(
            rng.integers(0, 5, nrows).astype(np.int8),
            categories=[f"c{seed}-{j}" for j in range(5)],
        ),
        "n": pd.arrays.IntegerArray(n_vals, n_mask),
    }
    index = pd.Index(rng.permutation(nrows).astype(np.int64) * 3 + seed, copy=False)
    frame = pd.DataFrame(cols, index=index, copy=False)
    sums = {c: digest(frame[c]) for c in cols}
    sums[INDEX] = digest(index)
    return {"cols": cols, "index": index, "sums": sums, "nrows": nrows}


def assemble(parts: dict[str, Any], ver: int, tag: str) -> pd.DataFrame:
    """A frame of ``parts`` stamped with save id ``ver`` (column and attrs); cheap."""
    n = parts["nrows"]
    cols = {"ver": np.full(n, ver, dtype=np.int64), **parts["cols"]}
    df = pd.DataFrame(cols, index=parts["index"], copy=False)
    df.attrs = {
        "ver": ver,
        "tag": tag,
        "nrows": n,
        "sums": parts["sums"],
        "dtypes": {c: str(df[c].dtype) for c in df.columns},
    }
    return df


def problem(df: Any, columns: list[str] | None = None) -> str | None:
    """None if ``df`` is exactly one frame made by :func:`assemble` (or those ``columns`` of
    it), else what is wrong. Reads every byte of every column."""
    if not isinstance(df, pd.DataFrame):
        return f"got a {type(df).__name__}, not a DataFrame"
    a = df.attrs
    try:
        ver, nrows, sums, dtypes = a["ver"], a["nrows"], a["sums"], a["dtypes"]
    except KeyError as exc:
        return f"attrs lack {exc}: {sorted(a)}"
    want = COLUMNS if columns is None else list(columns)
    if list(df.columns) != want:
        return f"save {ver}: columns {list(df.columns)}, expected {want}"
    if len(df) != nrows:
        return f"save {ver}: {len(df)} rows, metadata says {nrows}"
    if digest(df.index) != sums[INDEX]:
        return f"save {ver}: index differs from its checksum"
    for c in want:
        col = df[c]
        if str(col.dtype) != dtypes[c]:
            return f"save {ver}: column {c} has dtype {col.dtype}, saved as {dtypes[c]}"
        if c == "ver":
            got = col.to_numpy()
            if not (got == ver).all():
                return f"save {ver}: ver column holds {sorted(set(got.tolist()))[:5]} (a mix)"
        elif digest(col) != sums[c]:
            return f"save {ver}: column {c} differs from its checksum (a mix or damage)"
    return None


# --- the children ---------------------------------------------------------------------------


class Log:
    """Append-only event log; each line is one write, so it survives a SIGKILL whole."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.violations = 0

    def line(self, text: str) -> None:
        os.write(self.fd, (text.replace("\n", " | ") + "\n").encode())

    def violation(self, text: str) -> None:
        self.violations += 1
        if self.violations <= MAX_VIOLATION_LINES:
            self.line(f"X {text}")

    def report(self, stats: dict[str, Any]) -> None:
        self.line("R " + json.dumps({**stats, "violations": self.violations}, sort_keys=True))


def _stopped(a: dict[str, Any], deadline: float) -> bool:
    return os.path.exists(a["stop"]) or time.monotonic() > deadline


def writer(a: dict[str, Any]) -> None:
    """Re-save random keys with new self-checking frames until the stop file appears (or the
    parent kills it). Save ids are unique across writers and their restarts."""
    import mmcache

    log = Log(a["log"])
    rng = random.Random(a["seed"])
    parts = [base_parts(a["seed"] * 10 + j, n) for j, n in enumerate(a["sizes"])]
    status = os.open(a["status"] + ".tmp", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.pwrite(status, b"I", 0)
    os.rename(a["status"] + ".tmp", a["status"])  # exists = ready
    log.line("ready")
    deadline = time.monotonic() + a["max_seconds"]
    seq = saves = 0
    while not _stopped(a, deadline):
        seq += 1
        ver = a["ver_base"] + seq
        k = rng.randrange(len(KEYS))
        df = assemble(rng.choice(parts), ver, f"w{a['writer']}")
        log.line(f"B {ver} {k}")
        os.pwrite(status, b"S", 0)
        try:
            mmcache.save(df, KEYS[k], cache_dir=a["cache_dir"])
        except Exception as exc:
            log.violation(f"writer {a['writer']}: save {KEYS[k]!r}: {type(exc).__name__}: {exc}")
        else:
            saves += 1
            log.line(f"D {ver} {k}")
        os.pwrite(status, b"I", 0)
        del df
        time.sleep(rng.uniform(0, 0.01))  # let the cleaner at the lock now and then
    log.report({"saves": saves})


def reader(a: dict[str, Any]) -> None:
    """Open random keys in a loop and check every frame against its own checksum; re-check
    the last few frames too (their files may have been replaced, deleted or cleaned since)."""
    import mmcache
    from mmcache import _cache

    log = Log(a["log"])
    rng = random.Random(a["seed"])
    stats: collections.Counter[str] = collections.Counter()
    versions: set[int] = set()
    held: collections.deque[tuple[pd.DataFrame, list[str] | None]] = collections.deque(maxlen=4)
    log.line("ready")
    deadline = time.monotonic() + a["max_seconds"]
    while not _stopped(a, deadline):
        key = rng.choice(KEYS)
        if rng.random() < 0.25:
            _cache._MEMO.clear()  # map afresh, not from this process's memo
            stats["memo_clears"] += 1
        cols = None
        if rng.random() < 0.2:
            cols = [c for c in COLUMNS if rng.random() < 0.5] or ["x"]
            stats["subset_opens"] += 1
        try:
            df = mmcache.open(key, cache_dir=a["cache_dir"], columns=cols)
        except mmcache.EntryNotFoundError:
            stats["not_found"] += 1
            time.sleep(0.002)
            continue
        except Exception as exc:  # any other error, MmcacheError included, is a violation
            stats["errors"] += 1
            log.violation(f"reader {a['reader']}: open {key!r}: {type(exc).__name__}: {exc}")
            continue
        stats["opens"] += 1
        why = problem(df, cols)
        if why:
            log.violation(f"reader {a['reader']}: open {key!r}: {why}")
            continue
        stats["verified"] += 1
        versions.add(int(df.attrs["ver"]))
        log.line(f"V {df.attrs['ver']}")  # progress, for the parent's minimum counts
        held.append((df, cols))
        del df
        if stats["opens"] % 8 == 0:
            for old, old_cols in held:
                stats["held_rechecks"] += 1
                why = problem(old, old_cols)
                if why:
                    log.violation(f"reader {a['reader']}: a frame held since its open: {why}")
    log.report({**stats, "versions_seen": len(versions)})


CLEANER_OPS = {
    "clean_all": 1, "clean_keys": 2, "delete": 3, "clean_older": 2, "clean_max_bytes": 1,
    "dry_run": 1, "entries": 1,
}


def cleaner(a: dict[str, Any]) -> None:
    """Run clean()/delete()/entries() with random selectors at random moments."""
    import mmcache

    log = Log(a["log"])
    rng = random.Random(a["seed"])
    d = a["cache_dir"]
    stats: collections.Counter[str] = collections.Counter()
    ops, weights = zip(*CLEANER_OPS.items(), strict=True)
    log.line("ready")
    deadline = time.monotonic() + a["max_seconds"]
    while not _stopped(a, deadline):
        time.sleep(rng.uniform(*a["pause"]))
        op = rng.choices(ops, weights)[0]
        key = rng.choice(KEYS)
        try:
            if op == "clean_all":
                removed = mmcache.clean(cache_dir=d)
            elif op == "clean_keys":
                removed = mmcache.clean([key], cache_dir=d)
            elif op == "delete":
                removed = [key] if mmcache.delete(key, cache_dir=d) else []
            elif op == "clean_older":
                removed = mmcache.clean(older_than=rng.uniform(0, 1.0), cache_dir=d)
            elif op == "clean_max_bytes":
                removed = mmcache.clean(max_bytes=rng.randrange(0, 60 << 20), cache_dir=d)
            elif op == "dry_run":
                mmcache.clean(dry_run=True, cache_dir=d)
                removed = []
            else:
                mmcache.entries(cache_dir=d)
                removed = []
        except Exception as exc:
            log.violation(f"cleaner: {op} ({key!r}): {type(exc).__name__}: {exc}")
            continue
        stats[op] += 1
        stats["removed"] += len(removed)
        log.line(f"C {op}")  # progress, for the parent's minimum counts
    log.report(dict(stats))


ROLES = {f.__name__: f for f in (writer, reader, cleaner)}


def launch(role: str, args: dict[str, Any], stderr_path: Path) -> subprocess.Popen[bytes]:
    """Start ``role`` in a fresh interpreter; its stdout and stderr go to ``stderr_path``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("MMCACHE_DIR", None)
    with open(stderr_path, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "tests._stress_workers", role, json.dumps(args)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
        )


if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
