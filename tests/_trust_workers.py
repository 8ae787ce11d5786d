"""Child-process code for tests/test_trust.py (module level, importable by spawn children)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import mmcache
from mmcache import _lock

from ._zerocopy import maps_under


def version_frame(version: int, nrows: int = 2_000) -> pd.DataFrame:
    """Every value says which version the frame is: a mix can never pass for one version."""
    return pd.DataFrame({
        "v": np.full(nrows, version, dtype=np.int64),
        "x": np.arange(nrows, dtype=np.float64) + version * 1e6,
        "n": pd.array(np.full(nrows, version), dtype="Int64"),
        "s": pd.Series([f"v{version}"] * nrows, dtype="str"),
    })


def which_version(df: pd.DataFrame) -> int | None:
    """The version ``df`` holds, or None if its values do not all agree."""
    v = int(df["v"].iloc[0])
    ok = (
        bool((df["v"] == v).all())
        and bool((df["x"] == np.arange(len(df), dtype=np.float64) + v * 1e6).all())
        and bool((df["n"] == v).all())
        and bool((df["s"] == f"v{v}").all())
    )
    return v if ok else None


# --- item 2: the lock, instrumented -----------------------------------------------------------


def instrument_lock(marker_dir: Path, violations: list[str],
                    seen: dict[str, int] | None = None) -> None:
    """Make every KeyLock hold also create ``marker_dir/NAME.lock`` with O_EXCL: two
    holders of one key at once show up as a FileExistsError. ``seen["busy"]`` counts the
    acquires that began while another process held the key (its marker was there): the
    contention the test needs to mean something."""
    orig_acquire, orig_release = _lock.KeyLock.acquire, _lock.KeyLock.release
    seen = {} if seen is None else seen

    def acquire(self: _lock.KeyLock, timeout: float) -> bool:
        if os.path.lexists(marker_dir / self.path.name):
            seen["busy"] = seen.get("busy", 0) + 1
        got = orig_acquire(self, timeout)
        if got:
            try:
                os.close(os.open(marker_dir / self.path.name, os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                violations.append(f"pid {os.getpid()} entered {self.path.name} while held")
        return got

    def release(self: _lock.KeyLock, *, unlink: bool = False) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker_dir / self.path.name)
        orig_release(self, unlink=unlink)

    _lock.KeyLock.acquire = acquire  # type: ignore[method-assign]
    _lock.KeyLock.release = release  # type: ignore[method-assign]


def _wait_for_all(d: Path, prefix: str, n: int, deadline: float) -> bool:
    while len(list(d.glob(prefix + "*"))) < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def lock_churn(a: dict[str, Any]) -> None:
    """save / delete / open(build=) / clean on one key, ``a["ops"]`` operations; report.

    Load-proof: the processes start together (each waits until all are ready, so no one
    churns alone while the others still import pandas), and each keeps going after its own
    ``ops`` until every process has done its ``ops`` too, so every counted operation ran
    while all the others were still contending. ``max_seconds`` only bounds a hang."""
    violations: list[str] = []
    seen: dict[str, int] = {}
    instrument_lock(Path(a["markers"]), violations, seen)
    d, key = a["cache_dir"], a["key"]
    sync, me, n = Path(a["sync"]), a["seed"], a["procs"]
    rng = random.Random(me)
    frame = version_frame(me, 200)
    ops: dict[str, int] = {}
    errors: list[str] = []
    deadline = time.monotonic() + a["max_seconds"]
    (sync / f"ready-{me}").touch()
    started = _wait_for_all(sync, "ready-", n, deadline)
    done = 0
    while started and time.monotonic() < deadline:
        if done == a["ops"]:
            (sync / f"done-{me}").touch()
        if done >= a["ops"] and len(list(sync.glob("done-*"))) >= n:
            break
        op = rng.choice(["save", "save", "delete", "build", "clean_key", "clean_all"])
        try:
            if op == "save":
                mmcache.save(frame, key, cache_dir=d)
            elif op == "delete":
                mmcache.delete(key, cache_dir=d)
            elif op == "build":
                got = mmcache.open(key, cache_dir=d, build=lambda: frame)
                if which_version(got) is None:
                    errors.append("build: a mixed frame")
            elif op == "clean_key":
                mmcache.clean([key], cache_dir=d)
            else:
                mmcache.clean(cache_dir=d)
        except mmcache.EntryNotFoundError:
            pass  # deleted between two steps of open(build=): allowed
        except Exception as exc:
            errors.append(f"{op}: {type(exc).__name__}: {exc}")
        ops[op] = ops.get(op, 0) + 1
        done += 1
    Path(a["out"]).write_text(json.dumps({
        "started": started, "done": done, "ops": ops, "busy": seen.get("busy", 0),
        "violations": violations, "errors": errors[:20],
    }))


# --- item 3: references unpickled while another process re-saves ----------------------------


def resave_loop(a: dict[str, Any]) -> None:
    """Re-save ``key`` with versions 1, 2, 1, 2, ... until the stop file appears; the count
    so far in ``a["saves"]`` (a shared value), so the test can wait for enough of them."""
    frames = [version_frame(1), version_frame(2)]
    stop = Path(a["stop"])
    i = 0
    deadline = time.monotonic() + 240
    while not stop.exists() and time.monotonic() < deadline:
        mmcache.save(frames[i % 2], a["key"], cache_dir=a["cache_dir"])
        i += 1
        a["saves"].value = i
        # A breath between saves: a writer re-taking the key's lock at once starves the
        # checker's release of old versions (the lock is polled), which only made the test
        # slow (100 ms per unpickled reference), not harder.
        time.sleep(0.005)
    Path(a["out"]).write_text(json.dumps({"saves": i}))


def unpickle_check(conn: Any) -> None:
    """Receive (version, pickled frame) pairs; unpickle each and say what came back."""
    counts = {f"{kind}-{held}": 0 for kind in ("same", "changed", "wrong", "mixed")
              for held in ("held", "dropped")}
    while True:
        if not conn.poll(60):
            break
        msg = conn.recv()
        if msg is None:
            break
        want, payload, held = msg
        tag = "held" if held else "dropped"
        try:
            df = pickle.loads(payload)
        except mmcache.EntryChangedError:
            counts[f"changed-{tag}"] += 1
            continue
        got = which_version(df)
        kind = "same" if got == want else "mixed" if got is None else "wrong"
        counts[f"{kind}-{tag}"] += 1
        del df
    conn.send(counts)


# --- items 4 and 13: Pool tasks -----------------------------------------------------------------


class Deferred:
    """Pickles as ``pickle.loads(payload)``: a task argument that unpickles, in the worker,
    the reference pickled earlier (as a Pool does with a frame argument)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self) -> Any:
        return (pickle.loads, (self.payload,))


def sum_column(df: Any) -> float:
    return float(df["x"].sum())


def open_and_sum(arg: tuple[str, str]) -> float:
    key, cache_dir = arg
    return float(mmcache.open(key, cache_dir=cache_dir)["x"].sum())


def mapped_here(cache_dir: str) -> list[Any]:
    import gc

    gc.collect()
    return maps_under(cache_dir)


# --- the lifecycle model (tests/test_model.py) ----------------------------------------------


def describe(df: pd.DataFrame) -> tuple[int, bool] | None:
    """(version, edited) of a frame made by version_frame and maybe edited by ``edit``:
    None if any value belongs to no single version."""
    if df.empty:
        return None
    edited = bool(df["x"].iloc[0] == -1.0)
    probe = df.copy()
    if edited:
        probe.loc[0, "x"] = float(df["v"].iloc[0]) * 1e6
    v = which_version(probe)
    return None if v is None else (v, edited)


def model_server(conn: Any, marker_dir: str) -> None:
    """Run lifecycle commands sent by the model test until told to stop.

    Every KeyLock hold is checked for exclusivity (see instrument_lock); frames the test
    opens or unpickles are held here by handle until dropped.
    """
    violations: list[str] = []
    instrument_lock(Path(marker_dir), violations)
    held: dict[int, pd.DataFrame] = {}
    while conn.poll(300):
        cmd, args = conn.recv()
        try:
            if cmd == "stop":
                conn.send(("ok", None))
                return
            if cmd == "save":
                d, key, v = args
                mmcache.save(version_frame(v, 300), key, cache_dir=d)
                out: Any = None
            elif cmd == "delete":
                out = mmcache.delete(args[1], cache_dir=args[0])
            elif cmd == "open":
                d, key, handle = args
                held[handle] = mmcache.open(key, cache_dir=d)
                out = describe(held[handle])
            elif cmd == "pickle":
                out = pickle.dumps(held[args])
            elif cmd == "unpickle":
                payload, handle = args
                held[handle] = pickle.loads(payload)
                out = describe(held[handle])
            elif cmd == "edit":
                df = held[args]
                df.loc[0, "x"] = -1.0
                df.fillna(0, inplace=True)
                out = describe(df)
            elif cmd == "drop":
                del held[args]
                import gc

                gc.collect()
                out = None
            elif cmd == "clean":
                d, keys = args
                out = sorted(e.key for e in mmcache.clean(keys, cache_dir=d))
            elif cmd == "reset":
                held.clear()
                out = None
            elif cmd == "violations":
                out = list(violations)
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", out))
        except Exception as exc:
            conn.send(("err", (type(exc).__name__, str(exc))))


def return_deferred(payload: bytes) -> Deferred:
    """A task whose result unpickles, in the parent, the reference pickled earlier (as when
    a worker returns an opened frame and the version goes before the parent reads it)."""
    return Deferred(payload)


class BoundMethodOf:
    """Pickles as ``getattr(<the frame of payload>, name)``: a bound method sent as a task."""

    def __init__(self, payload: bytes, name: str) -> None:
        self.payload, self.name = payload, name

    def __reduce__(self) -> Any:
        return (getattr, (Deferred(self.payload), self.name))


def call(fn: Any) -> Any:
    return fn()


def hold_until(a: dict[str, Any]) -> None:
    """Open the key, say so, wait for the go file, drop the frame, wait, exit."""
    import gc

    df = mmcache.open(a["key"], cache_dir=a["cache_dir"])
    Path(a["ready"]).touch()
    deadline = time.monotonic() + 60
    while not Path(a["go"]).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    del df
    gc.collect()


def hold_and_exit(a: dict[str, Any]) -> None:
    """Open the key and exit while still holding the frame (multiprocessing's os._exit)."""
    global _KEPT
    _KEPT = mmcache.open(a["key"], cache_dir=a["cache_dir"])
    Path(a["ready"]).touch()
    deadline = time.monotonic() + 60
    while not Path(a["go"]).exists() and time.monotonic() < deadline:
        time.sleep(0.005)


_KEPT: Any = None
