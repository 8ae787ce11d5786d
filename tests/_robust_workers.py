"""Child processes for the robustness and security tests, and the parent's handle on them.

The tests never fork the pytest process: each child is a fresh interpreter running this file as
a script (``python tests/_robust_workers.py COMMAND JSON_ARGS``), so a SIGBUS or a hang in a
child shows up as its exit status (-7) or a bounded wait, never as a dead test run. Importing
this module has no side effects; the frames it builds are shared by parent and children so
the parent can tell exactly which complete frame it got back.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tests import _pd

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()

# --- frames that say which version they are -----------------------------------------------


def make_frame(version: int, nrows: int) -> pd.DataFrame:
    """A frame whose every column depends on ``version``: two versions never share a column,
    so a mix of two saves, or a partial one, cannot equal any ``make_frame(v, nrows)``."""
    base = np.arange(nrows, dtype=np.int64)
    return pd.DataFrame(
        {
            "version": np.full(nrows, version, dtype=np.int64),
            "f": base * 0.5 + version,
            "i": base ^ version,
            "s": ((base + version) % 100_000).astype(np.int32),
            "b": (base + version) % 3 == 0,
            "c": pd.Categorical.from_codes(
                ((base + version) % 4).astype(np.int8), categories=["w", "x", "y", "z"]
            ),
        },
        copy=False,
    )


def assert_is_frame(df: pd.DataFrame, version: int, nrows: int) -> None:
    """``df`` equals ``make_frame(version, nrows)`` exactly (fast for millions of rows:
    pandas compares categoricals value by value, so those go by codes and dtype)."""
    expected = make_frame(version, nrows)
    _pd.assert_frame_equal(df.drop(columns="c"), expected.drop(columns="c"))
    assert df["c"].dtype == expected["c"].dtype
    assert np.array_equal(df["c"].array.codes, expected["c"].array.codes)
    assert list(df.columns) == list(expected.columns)


def const_frame(version: int, nrows: int) -> pd.DataFrame:
    """Every value of every column is ``version`` (the category is the string of it)."""
    return pd.DataFrame(
        {
            "version": np.full(nrows, version, dtype=np.int64),
            "f": np.full(nrows, float(version)),
            "i32": np.full(nrows, version, dtype=np.int32),
            "cat": pd.Categorical.from_codes(
                np.zeros(nrows, dtype=np.int8), categories=[f"v{version}"]
            ),
        },
        copy=False,
    )


def const_problem(df: pd.DataFrame) -> str | None:
    """None if ``df`` is entirely one ``const_frame`` version, else what is wrong."""
    if list(df.columns) != ["version", "f", "i32", "cat"]:
        return f"columns {list(df.columns)}"
    v = int(df["version"].iloc[0])
    if not (df["version"].to_numpy() == v).all():
        return f"version column mixes values (first {v})"
    if not (df["f"].to_numpy() == float(v)).all():
        return f"column f is not all {v}"
    if not (df["i32"].to_numpy() == v).all():
        return f"column i32 is not all {v}"
    cat = df["cat"].array
    if list(cat.categories) != [f"v{v}"] or not (cat.codes == 0).all():
        return f"column cat is not all 'v{v}'"
    return None


# --- the parent's handle on a child ----------------------------------------------------------


class Child:
    """A worker process with line-based stdout, bounded waits, and a guaranteed kill."""

    def __init__(self, command: str, args: dict[str, Any], *, cwd: Path | None = None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
        )
        env.pop("MMCACHE_DIR", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), command, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump_out, daemon=True),
            threading.Thread(target=self._pump_err, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def expect(self, word: str, timeout: float) -> None:
        """Wait (bounded) for a stdout line equal to ``word``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(
                    f"child did not say {word!r} within {timeout} s; stderr:\n{self.stderr}"
                ) from None
            if line is None:
                self.proc.wait(timeout=10)
                raise AssertionError(
                    f"child exited ({self.proc.returncode}) before saying {word!r}; "
                    f"stderr:\n{self.stderr}"
                )
            if line == word:
                return

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float) -> tuple[int, list[str]]:
        """Wait (bounded) for exit; return the exit status and the stdout lines not read."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"child still running after {timeout} s; stderr:\n{self.stderr}"
            ) from None
        for t in self._threads:
            t.join(timeout=10)
        out = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                out.append(line)
        self._close()
        return self.proc.returncode, out

    def result(self, timeout: float) -> dict[str, Any]:
        """Exit status and the JSON object the child printed last."""
        rc, out = self.finish(timeout)
        report = json.loads(out[-1]) if out else {}
        report["returncode"] = rc
        report["stderr"] = self.stderr
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for t in self._threads:
            t.join(timeout=5)
        self._close()

    def _close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def exc_report(exc: BaseException) -> dict[str, Any]:
    return {
        "ok": False,
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc),
        "key": getattr(exc, "key", None),
        "path": getattr(exc, "path", None),
    }


# --- what the children do ------------------------------------------------------------------


def _say(line: str) -> None:
    print(line, flush=True)


def save_loop(a: dict[str, Any]) -> None:
    """Save prebuilt frames under several keys, round and round, until killed."""
    import mmcache

    frames = [(key, make_frame(v, a["nrows"])) for key, versions in a["plan"] for v in versions]
    _say("ready")
    while True:
        for key, df in frames:
            mmcache.save(df, key, cache_dir=a["cache_dir"])


def writer_same_key(a: dict[str, Any]) -> None:
    """Wait for 'go', then save one frame under one key ``times`` times."""
    import mmcache

    df = make_frame(a["version"], a["nrows"])
    _say("ready")
    sys.stdin.readline()
    for _ in range(a["times"]):
        mmcache.save(df, a["key"], cache_dir=a["cache_dir"])
    _say(json.dumps({"ok": True}))


def alternating_writer(a: dict[str, Any]) -> None:
    """Re-save ``key`` for ``seconds``: versions 2, 3, 4, ... (A, B, A, B, ... with a new
    constant at every save, so any mix of two saves is visible)."""
    import mmcache

    mmcache.save(const_frame(1, a["nrows"]), a["key"], cache_dir=a["cache_dir"])
    _say("ready")
    sys.stdin.readline()
    version = 1
    deadline = time.monotonic() + a["seconds"]
    # At least min_saves saves (within a minute more), however few CPU cycles this process
    # gets on a busy machine.
    while time.monotonic() < deadline or (
        version - 1 < a.get("min_saves", 0) and time.monotonic() < deadline + 60
    ):
        version += 1
        mmcache.save(const_frame(version, a["nrows"]), a["key"], cache_dir=a["cache_dir"])
    _say(json.dumps({"ok": True, "saves": version - 1}))


def reader_loop(a: dict[str, Any]) -> None:
    """open() the key in a loop until ``stop`` exists; check every frame is one version,
    also frames opened earlier (their files were removed by later saves)."""
    import mmcache

    seen: set[int] = set()
    kept: list[pd.DataFrame] = []
    opens = 0
    deadline = time.monotonic() + a["max_seconds"]
    _say("ready")
    while not os.path.exists(a["stop"]) and time.monotonic() < deadline:
        df = mmcache.open(a["key"], cache_dir=a["cache_dir"])
        opens += 1
        problem = const_problem(df)
        if problem:
            _say(json.dumps({"ok": False, "message": f"open #{opens}: {problem}"}))
            sys.exit(3)
        seen.add(int(df["version"].iloc[0]))
        kept = [*kept[-3:], df]
        for old in kept:
            problem = const_problem(old)
            if problem:
                _say(json.dumps({"ok": False, "message": f"kept frame changed: {problem}"}))
                sys.exit(3)
    _say(json.dumps({"ok": True, "opens": opens, "versions": sorted(seen)}))


def hold_after_delete(a: dict[str, Any]) -> None:
    """A frame opened before delete(), an overwrite and clean() still reads its own data."""
    import mmcache

    d, key, n = a["cache_dir"], a["key"], a["nrows"]
    mmcache.save(make_frame(1, n), key, cache_dir=d)
    df = mmcache.open(key, cache_dir=d)
    assert mmcache.delete(key, cache_dir=d)
    assert not mmcache.exists(key, cache_dir=d)
    mmcache.save(make_frame(2, n), key, cache_dir=d)  # may reuse freed pages and inodes
    mmcache.clean(cache_dir=d)
    mmcache.save(make_frame(3, n), key, cache_dir=d)
    assert_is_frame(df, 1, n)
    assert_is_frame(mmcache.open(key, cache_dir=d), 3, n)
    _say(json.dumps({"ok": True}))


def open_report(a: dict[str, Any]) -> None:
    """Open the key and touch all its data; report what happened as JSON."""
    import mmcache

    try:
        df = mmcache.open(a["key"], cache_dir=a["cache_dir"])
        total = 0.0
        for col in df.columns:
            values = df[col].to_numpy()
            total += float(np.asarray(values, dtype=object).size)
            if values.dtype.kind in "biuf":
                total += float(values.sum())
        _say(json.dumps({"ok": True, "shape": list(df.shape)}))
    except Exception as exc:
        _say(json.dumps(exc_report(exc)))


def hold_lock(a: dict[str, Any]) -> None:
    """Hold a key's lock (as a saving process does) until a line arrives on stdin."""
    import filelock

    lock = filelock.FileLock(a["lock"], timeout=10)
    with lock:
        _say("locked")
        sys.stdin.readline()
    _say(json.dumps({"ok": True}))


def save_fsize_limited(a: dict[str, Any]) -> None:
    """Save with RLIMIT_FSIZE below the frame's size: free space looks ample, writes fail."""
    import resource

    import mmcache

    big = make_frame(1, a["nrows_big"])
    small = make_frame(2, a["nrows_small"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (a["limit"], hard))
    report: dict[str, Any]
    try:
        mmcache.save(big, "big", cache_dir=a["cache_dir"])
        report = {"ok": True}
    except Exception as exc:
        report = exc_report(exc)
    try:
        mmcache.save(small, "small", cache_dir=a["cache_dir"])
        _pd.assert_frame_equal(mmcache.open("small", cache_dir=a["cache_dir"]), small)
        report["small_ok"] = True
    except Exception as exc:
        report["small_ok"] = False
        report["small_error"] = f"{type(exc).__name__}: {exc}"
    _say(json.dumps(report))


COMMANDS = {
    f.__name__: f
    for f in (
        save_loop,
        writer_same_key,
        alternating_writer,
        reader_loop,
        hold_after_delete,
        open_report,
        hold_lock,
        save_fsize_limited,
    )
}


if __name__ == "__main__":
    COMMANDS[sys.argv[1]](json.loads(sys.argv[2]))
