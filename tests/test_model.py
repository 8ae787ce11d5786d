"""A model-based test of the entry lifecycle across processes (hypothesis stateful testing).

Two long-lived worker processes save, open, pickle, unpickle, edit, drop, delete and clean
on two keys in one cache directory, as hypothesis' state machine directs; a plain dict is the
model of what each should see. Checked at every step:

- ``open`` gives exactly the model's version of the key, or EntryNotFoundError;
- a frame pickled in one process unpickles in the other to exactly its own version (its
  sender holds it, so it can always be opened), with its in-place edits when it was edited;
- ``delete`` and ``clean`` report exactly what the model says existed; ``entries`` lists
  exactly the model's keys;
- no two processes ever hold one key's lock at once (each hold creates a marker file with
  O_EXCL; see tests/_trust_workers.instrument_lock).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

import mmcache

from . import _trust_workers as tw
from . import examples

WAIT = 60.0
KEYS = ["a", "b"]

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/maps"), reason="needs Linux /proc"
)


class _Worker:
    def __init__(self, ctx: Any, markers: str) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=tw.model_server, args=(child, markers), daemon=True)
        self.proc.start()

    def call(self, cmd: str, args: Any = None) -> tuple[str, Any]:
        self.conn.send((cmd, args))
        if not self.conn.poll(WAIT):
            raise AssertionError(f"worker did not answer {cmd!r} within {WAIT} s")
        return self.conn.recv()

    def ok(self, cmd: str, args: Any = None) -> Any:
        status, out = self.call(cmd, args)
        assert status == "ok", f"{cmd}{args!r:.200}: {out}"
        return out

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(("stop", None))
                self.proc.join(timeout=10)
        finally:
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=10)


@pytest.fixture(scope="module")
def workers():
    top = Path(tempfile.mkdtemp(prefix="mmcache-model-", dir="/dev/shm"
                                if os.access("/dev/shm", os.W_OK) else None))
    markers = top / "markers"
    markers.mkdir()
    ctx = mp.get_context("spawn")
    ws = [_Worker(ctx, str(markers)) for _ in range(2)]
    try:
        yield top, ws
    finally:
        for w in ws:
            w.close()
        shutil.rmtree(top, ignore_errors=True)


def test_lifecycle_matches_the_model(workers):
    top, ws = workers
    counter = iter(range(1, 10**9))

    class Lifecycle(RuleBasedStateMachine):
        handles = Bundle("handles")

        def __init__(self) -> None:
            super().__init__()
            self.dir = Path(tempfile.mkdtemp(dir=top)) / "cache"
            self.model: dict[str, int] = {}
            # handle -> (worker index, version, edited)
            self.held: dict[int, tuple[int, int, bool]] = {}
            self.next_handle = 0

        def teardown(self) -> None:
            for w in ws:
                w.ok("reset")
            shutil.rmtree(self.dir.parent, ignore_errors=True)

        def _handle(self) -> int:
            self.next_handle += 1
            return self.next_handle

        @rule(w=st.integers(0, 1), key=st.sampled_from(KEYS))
        def save(self, w: int, key: str) -> None:
            v = next(counter)
            ws[w].ok("save", (str(self.dir), key, v))
            self.model[key] = v

        @rule(target=handles, w=st.integers(0, 1), key=st.sampled_from(KEYS))
        def open(self, w: int, key: str) -> Any:
            h = self._handle()
            status, out = ws[w].call("open", (str(self.dir), key, h))
            if key not in self.model:
                assert (status, out[0]) == ("err", "EntryNotFoundError"), out
                return None
            assert status == "ok", out
            assert out == (self.model[key], False), (out, self.model)
            self.held[h] = (w, self.model[key], False)
            return h

        @rule(target=handles, h=handles)
        def send_to_the_other(self, h: int | None) -> Any:
            if h not in self.held:
                return None
            src, version, edited = self.held[h]
            payload = ws[src].ok("pickle", h)
            if not edited:
                assert len(payload) < 1000, "an unmodified frame pickles as a reference"
            new = self._handle()
            out = ws[1 - src].ok("unpickle", (payload, new))
            assert out == (version, edited), (out, version, edited)
            self.held[new] = (1 - src, version, edited)
            return new

        @rule(h=handles)
        def edit(self, h: int | None) -> None:
            if h not in self.held:
                return
            w, version, _ = self.held[h]
            assert ws[w].ok("edit", h) == (version, True)
            self.held[h] = (w, version, True)

        @rule(h=consumes(handles))
        def drop(self, h: int | None) -> None:
            if h not in self.held:
                return
            w, _, _ = self.held.pop(h)
            ws[w].ok("drop", h)

        @rule(w=st.integers(0, 1), key=st.sampled_from(KEYS))
        def delete(self, w: int, key: str) -> None:
            assert ws[w].ok("delete", (str(self.dir), key)) is (key in self.model)
            self.model.pop(key, None)

        @rule(w=st.integers(0, 1), key=st.sampled_from(KEYS))
        def clean_key(self, w: int, key: str) -> None:
            removed = ws[w].ok("clean", (str(self.dir), [key]))
            assert removed == ([key] if key in self.model else [])
            self.model.pop(key, None)

        @rule(w=st.integers(0, 1))
        def clean_all(self, w: int) -> None:
            assert ws[w].ok("clean", (str(self.dir), None)) == sorted(self.model)
            self.model.clear()

        @invariant()
        def listing_matches_the_model(self) -> None:
            keys = sorted(e.key for e in mmcache.entries(cache_dir=self.dir))
            assert keys == sorted(self.model)

        @invariant()
        def lock_never_had_two_holders(self) -> None:
            for w in ws:
                assert w.ok("violations") == []

    Lifecycle.TestCase.settings = settings(
        max_examples=examples(int(os.environ.get("MMCACHE_MODEL_EXAMPLES", "30"))),
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=not os.environ.get("MMCACHE_MODEL_RANDOM"),
    )
    Lifecycle.TestCase().runTest()
