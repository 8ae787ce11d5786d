"""Stress: writers, readers, a cleaner and a killer on one cache at once (issue 5, part 1).

For a bounded time, on a private directory on /dev/shm (tmpfs, as in production):

- K=2 writer processes re-save three keys with new frames that carry a checksum of their
  own content (tests/_stress_workers.py: per-column digests and a save id in ``df.attrs``);
- R=2 reader processes open every key in a loop (some opens after clearing the per-process
  memo, some with ``columns=``) and check each frame against its checksum, and re-check the
  frames they still hold after those were overwritten, deleted or cleaned;
- a cleaner process runs ``clean()`` (all, by key, ``older_than``, ``max_bytes``, dry run),
  ``delete()`` and ``entries()`` at random (and stops a few seconds before the end, so the
  last kills' leftovers are still there for the final clean);
- the parent (the killer) SIGKILLs a random writer, aiming at a save in progress, every
  second or two, and starts a new one in its place.

Invariants: every successful open matches its checksum (never a mix of two saves, never
damaged); no reader dies (exit status 0: a SIGBUS would be -7) and nothing raises except
``EntryNotFoundError`` for a key that is deleted at that moment; after the run, one
``clean(older_than=<10 years>)`` (which removes stale leftovers but no entry) leaves only
complete entries, each a save some writer made, and nothing else; a final ``clean()``
empties the directory.

Duration: ``MMCACHE_STRESS_SECONDS`` (default 12, what CI runs), then as long as it takes
(up to ``EXTRA_SECONDS`` more) for the run to reach its minimum counts: saves, verified
opens, versions seen, cleaner operations and a kill inside ``save()``. The counts, not the
clock, say whether a run meant something, so a slow (loaded) machine runs longer instead of
failing. The long mode, for humans::

    MMCACHE_STRESS_SECONDS=600 python -m pytest tests/test_stress.py -s

The figures (saves, opens, kills, cleans, deletes, violations) are printed to the terminal
whatever the capture mode, recorded as the test's ``mmcache_stress`` property (JUnit XML),
written to ``stress-summary.json`` in the test's tmp_path, and included in every assertion
message.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import mmcache
from mmcache import _cache
from mmcache._paths import entry_name
from tests._stress_workers import KEYS, launch, problem

SECONDS = float(os.environ.get("MMCACHE_STRESS_SECONDS", "12"))
# After SECONDS, the run goes on until it reaches these counts (bounded by EXTRA_SECONDS).
MIN_SAVES = 10
MIN_VERIFIED = 10
MIN_VERSIONS_SEEN = 3  # distinct saves seen, summed over the readers
MIN_KILLS_MID_SAVE = 1
MIN_CLEANER_OPS = 1
EXTRA_SECONDS = 120.0
WRITERS = 2
READERS = 2
SIZES = (50_000, 250_000, 600_000)  # rows of the writers' frames: ~3, 14 and 33 MB
KILL_EVERY = (0.8, 2.0)  # seconds between two kills
# The cleaner stops this long before the end, so the last kills' leftovers are still there
# for the final clean to remove (else the cleaner has usually removed them already).
CLEANER_QUIET = 4.0
START_TIMEOUT = 90.0  # for all children to import pandas and say "ready" on 2 busy cores
STOP_TIMEOUT = 30.0  # for each child to notice the stop file and exit
# children stop by themselves after that
CHILD_MAX_SECONDS = SECONDS + EXTRA_SECONDS + START_TIMEOUT + 60

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(int(SECONDS + EXTRA_SECONDS + START_TIMEOUT + STOP_TIMEOUT + 120)),
]


def _log_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text()[-n:]
    except FileNotFoundError:
        return ""


class Run:
    """The children of one stress run, their files, and the parent's bookkeeping."""

    def __init__(self, cache_dir: Path, work: Path, seed: int) -> None:
        self.d = cache_dir
        self.work = work
        self.stop = work / "stop"
        self.stop_cleaner = work / "stop-cleaner"
        self.rng = random.Random(seed)
        self.seed = seed
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.writer_gen: dict[int, int] = {}  # writer -> incarnation
        self.kills = self.kills_mid_save = self.restarts = 0
        self.violations: list[str] = []
        self.exited: set[str] = set()  # children whose exit drive() has looked at

    def _args(self, name: str) -> dict[str, Any]:
        return {
            "cache_dir": str(self.d), "stop": str(self.stop), "log": str(self.work / f"{name}.log"),
            "max_seconds": CHILD_MAX_SECONDS,
        }

    def start_writer(self, w: int) -> None:
        inc = self.writer_gen[w] = self.writer_gen.get(w, -1) + 1
        name = f"writer{w}.{inc}"
        args = {
            **self._args(name), "writer": w, "seed": self.seed * 1000 + w * 100 + inc,
            "status": str(self.work / f"{name}.status"), "sizes": list(SIZES),
            "ver_base": (w * 1000 + inc) * 1_000_000,
        }
        self.procs[name] = launch("writer", args, self.work / f"{name}.err")

    def start(self) -> None:
        for w in range(WRITERS):
            self.start_writer(w)
        for r in range(READERS):
            self.procs[f"reader{r}"] = launch(
                "reader", {**self._args(f"reader{r}"), "reader": r, "seed": self.seed + r},
                self.work / f"reader{r}.err",
            )
        self.procs["cleaner"] = launch(
            "cleaner",
            {**self._args("cleaner"), "stop": str(self.stop_cleaner), "seed": self.seed,
             "pause": [0.1, 0.6]},
            self.work / "cleaner.err",
        )
        deadline = time.monotonic() + START_TIMEOUT
        for name, proc in self.procs.items():
            while "ready" not in _log_lines(self.work / f"{name}.log"):
                if proc.poll() is not None:
                    raise AssertionError(
                        f"{name} exited ({proc.returncode}) while starting:\n"
                        f"{_tail(self.work / f'{name}.err')}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} not ready after {START_TIMEOUT} s")
                time.sleep(0.05)

    def _current_writer(self, w: int) -> str:
        return f"writer{w}.{self.writer_gen[w]}"

    def _status(self, name: str) -> bytes:
        try:
            with open(self.work / f"{name}.status", "rb") as f:
                return f.read(1)
        except FileNotFoundError:
            return b""  # still starting

    def kill_one(self) -> None:
        """SIGKILL a writer, preferably while it is inside save(); start a new one."""
        ready = [w for w in range(WRITERS) if self._status(self._current_writer(w))]
        if not ready:
            return
        w = self.rng.choice(ready)
        name = self._current_writer(w)
        proc = self.procs[name]
        wait_until = time.monotonic() + 1.0
        while self._status(name) != b"S" and time.monotonic() < wait_until:
            time.sleep(0.001)
        time.sleep(self.rng.uniform(0, 0.03))
        mid_save = self._status(name) == b"S"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.returncode != -signal.SIGKILL:  # it had died by itself before the kill
            self.violations.append(f"{name} exited with {proc.returncode} before the kill:\n"
                                   f"{_tail(self.work / f'{name}.err')}")
        self.kills += 1
        self.kills_mid_save += mid_save
        self.start_writer(w)
        self.restarts += 1

    def progress(self) -> dict[str, int]:
        """The counts so far, from the children's logs."""
        saves = verified = versions = cleaner_ops = 0
        for name in self.procs:
            lines = _log_lines(self.work / f"{name}.log")
            if name.startswith("writer"):
                saves += sum(line.startswith("D ") for line in lines)
            elif name.startswith("reader"):
                seen = [line for line in lines if line.startswith("V ")]
                verified += len(seen)
                versions += len(set(seen))
            elif name == "cleaner":
                cleaner_ops += sum(line.startswith("C ") for line in lines)
        return {"saves": saves, "verified": verified, "versions_seen": versions,
                "cleaner_ops": cleaner_ops, "kills_mid_save": self.kills_mid_save}

    def drive(self, seconds: float) -> None:
        """The killer's loop, for ``seconds`` and then until the minimum counts are reached
        (or ``EXTRA_SECONDS`` more have gone by); also notices any child that dies by
        itself."""
        end = time.monotonic() + seconds
        hard_end = end + EXTRA_SECONDS
        quiet_from = end - min(CLEANER_QUIET, seconds / 4)
        next_kill = time.monotonic() + self.rng.uniform(*KILL_EVERY)
        next_look = 0.0
        counts: dict[str, int] = {}
        while time.monotonic() < hard_end:
            time.sleep(0.05)
            now = time.monotonic()
            if now >= quiet_from and now >= next_look:
                next_look = now + 0.5
                counts = self.progress()
                # The cleaner stops once it has done something; the run once every count
                # is reached (and the cleaner has had its quiet time before the end).
                if counts["cleaner_ops"] >= MIN_CLEANER_OPS and not self.stop_cleaner.exists():
                    self.stop_cleaner.touch()
                    end = max(end, now + min(CLEANER_QUIET, seconds / 4))
                if now >= end and self.stop_cleaner.exists() and (
                    counts["saves"] >= MIN_SAVES and counts["verified"] >= MIN_VERIFIED
                    and counts["versions_seen"] >= MIN_VERSIONS_SEEN
                    and counts["kills_mid_save"] >= MIN_KILLS_MID_SAVE
                ):
                    return
            for name, proc in self.procs.items():
                if proc.poll() is not None and name not in self.exited:
                    self.exited.add(name)
                    told = name == "cleaner" and self.stop_cleaner.exists()
                    if proc.returncode not in (-signal.SIGKILL, *((0,) if told else ())):
                        self.violations.append(
                            f"{name} exited early with status {proc.returncode}:\n"
                            f"{_tail(self.work / f'{name}.err')}"
                        )
            if time.monotonic() >= next_kill:
                self.kill_one()
                next_kill = time.monotonic() + self.rng.uniform(*KILL_EVERY)

    def finish(self) -> dict[str, int | None]:
        """Ask every child to stop; wait (bounded); return each exit status."""
        self.stop.touch()
        self.stop_cleaner.touch()
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + STOP_TIMEOUT
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.violations.append(f"{name} did not stop within {STOP_TIMEOUT} s")
                proc.kill()
                proc.wait(timeout=10)
            codes[name] = proc.returncode
        return codes

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def unreferenced(d: Path) -> list[str]:
    """Names in the cache dir that no readable metadata accounts for: leftovers."""
    live = set()
    for meta in d.glob("*.json"):
        with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
            live.add(json.loads(meta.read_bytes())["data"])
    return sorted(
        p.name for p in d.iterdir()
        if not (p.name.endswith((".json", ".lock")) or p.name in live)
    )


def _show(summary: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    lines = [
        f"mmcache stress: {summary['seconds']:.0f} s, {WRITERS} writers, {READERS} readers, "
        "1 cleaner, 1 killer",
        "  saves {saves} done / {save_attempts} begun; kills {kills} "
        "({kills_mid_save} inside save()), writer restarts {restarts}".format(**summary),
        "  opens {opens} verified {verified} (not found {not_found}, with columns= "
        "{subset_opens}, after a memo clear {memo_clears}); held frames re-checked "
        "{held_rechecks}; versions seen {versions_seen}".format(**summary),
        "  cleaner: {cleaner_ops} ops ({cleans} clean, {deletes} delete, {other_ops} other), "
        "{entries_removed} entries removed".format(**summary),
        "  end: {leftovers_before_final_clean} leftovers before the final clean, "
        "{final_entries} complete entries after it".format(**summary),
        f"  violations: {summary['violations']}",
    ]
    lines += [f"    {v[:500]}" for v in summary["violation_samples"]]
    text = "\n".join(lines)
    with capsys.disabled():
        print("\n" + text, flush=True)
    return text


def test_stress_writers_readers_cleaner_killer(shm_dir, tmp_path, capsys, record_property):
    d = shm_dir / "cache"
    work = tmp_path / "run"
    work.mkdir()
    seed = int(os.environ.get("MMCACHE_STRESS_SEED", random.randrange(1 << 30)))
    run = Run(d, work, seed)
    t0 = time.monotonic()
    try:
        run.start()
        run.drive(SECONDS)
        codes = run.finish()
    finally:
        run.kill_all()
    elapsed = time.monotonic() - t0
    violations = list(run.violations)

    # --- what the children said ----------------------------------------------------------
    attempted: dict[str, set[int]] = collections.defaultdict(set)
    saves = save_attempts = 0
    reader_stats: collections.Counter[str] = collections.Counter()
    cleaner_stats: dict[str, int] = {}
    for name in run.procs:
        reported = False
        for line in _log_lines(work / f"{name}.log"):
            kind, _, rest = line.partition(" ")
            if kind == "B":
                ver, k = rest.split()
                attempted[KEYS[int(k)]].add(int(ver))
                save_attempts += 1
            elif kind == "D":
                saves += 1
            elif kind == "X":
                violations.append(f"{name}: {rest}")
            elif kind == "R":
                reported = True
                stats = json.loads(rest)
                if name.startswith("reader"):
                    reader_stats.update({k: v for k, v in stats.items() if k != "violations"})
                elif name == "cleaner":
                    cleaner_stats = stats
        code = codes.get(name)
        killed = name.startswith("writer") and code == -signal.SIGKILL
        if code is not None and not killed:
            if code == -signal.SIGBUS:
                violations.append(f"{name} died of SIGBUS")
            elif code != 0:
                violations.append(f"{name} exited with {code}:\n{_tail(work / f'{name}.err')}")
            elif not reported:
                violations.append(f"{name} exited without its report")

    # --- the cache after the run ---------------------------------------------------------
    _cache._MEMO.clear()
    leftovers = unreferenced(d) if d.exists() else []
    metas = sorted(p.name for p in d.glob("*.json")) if d.exists() else []
    listed = mmcache.entries(cache_dir=d)
    if len(listed) != len(metas):
        violations.append(f"{len(metas)} metadata files but entries() lists {len(listed)}")
    removed = mmcache.clean(older_than=dt.timedelta(days=3650), cache_dir=d)
    if removed:
        violations.append(f"clean(older_than=10 years) removed entries {removed}")
    final = mmcache.entries(cache_dir=d)
    expected_names = set()
    for e in final:
        name = entry_name(e.key)
        expected_names |= {f"{name}.json", f"{name}.lock"}
        try:
            df = mmcache.open(e.key, cache_dir=d)
        except Exception as exc:
            violations.append(f"final open {e.key!r}: {type(exc).__name__}: {exc}")
            continue
        why = problem(df)
        if why:
            violations.append(f"final {e.key!r}: {why}")
        elif df.attrs["ver"] not in attempted[e.key]:
            violations.append(f"final {e.key!r} holds save {df.attrs['ver']}, never begun on it")
        expected_names.add(json.loads(e.path.read_bytes())["data"])
        del df
    extra = sorted(set(os.listdir(d)) - expected_names)
    if extra:
        violations.append(f"after clean(older_than=...) the cache dir still holds {extra}")
    _cache._MEMO.clear()
    mmcache.clean(cache_dir=d)
    if os.listdir(d):
        violations.append(f"after clean() the cache dir still holds {sorted(os.listdir(d))}")

    # --- figures -----------------------------------------------------------------------------
    cleans = sum(v for k, v in cleaner_stats.items() if k.startswith("clean"))
    summary: dict[str, Any] = {
        "seconds": elapsed, "stress_seconds": SECONDS, "seed": seed,
        "saves": saves, "save_attempts": save_attempts,
        "kills": run.kills, "kills_mid_save": run.kills_mid_save, "restarts": run.restarts,
        **{k: reader_stats.get(k, 0) for k in (
            "opens", "verified", "not_found", "subset_opens", "memo_clears", "held_rechecks",
            "versions_seen", "errors")},
        "cleaner_ops": sum(v for k, v in cleaner_stats.items() if k != "removed"),
        "cleans": cleans, "deletes": cleaner_stats.get("delete", 0),
        "other_ops": cleaner_stats.get("dry_run", 0) + cleaner_stats.get("entries", 0),
        "entries_removed": cleaner_stats.get("removed", 0),
        "leftovers_before_final_clean": len(leftovers),
        "final_entries": len(final),
        "violations": len(violations), "violation_samples": violations[:10],
    }
    (tmp_path / "stress-summary.json").write_text(json.dumps(summary, indent=2))
    record_property("mmcache_stress", json.dumps(summary))
    text = _show(summary, capsys)

    assert not violations, text
    # The run did what it claims: enough of each kind of operation to mean something (the
    # run went on until it had them, up to EXTRA_SECONDS past its duration).
    assert saves >= MIN_SAVES and summary["verified"] >= MIN_VERIFIED, text
    assert run.kills_mid_save >= MIN_KILLS_MID_SAVE, f"no kill landed inside save()\n{text}"
    assert summary["versions_seen"] >= MIN_VERSIONS_SEEN, text
    assert summary["cleaner_ops"] >= MIN_CLEANER_OPS, text
