"""Regression tests for the defects independent testers found (issue 8), one per item.

Items 1, 11, 12 and the CLI part of 14 are in test_trust_clean.py; 7, 8, 9 and the codec part
of 14 in test_trust_codecs.py. Every child process is bounded in time and killed in a
``finally``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import gc
import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mmcache
from mmcache import _frame
from mmcache._compat import writes_in_place
from mmcache._paths import entry_name
from tests import _pd

from . import _trust_workers as tw
from ._zerocopy import assert_zero_copy, maps_under

REPO = Path(__file__).resolve().parent.parent
WAIT = 60.0

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/maps"), reason="needs Linux /proc"
)


def _spawn_all(target, args_list):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(a,), daemon=True) for a in args_list]
    for p in procs:
        p.start()
    return procs


def _stop_all(procs):
    for p in procs:
        p.join(timeout=5)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


# --- item 2: at most one holder of a key's lock -----------------------------------------------


def test_item2_lock_is_exclusive_under_save_delete_build_clean(tmp_path):
    """Five processes churn one key (save, delete, open(build=), clean) at once, each lock
    hold marked with an O_EXCL file: two holders at once would be seen. Counts, not a time
    window: every process does its 40 operations while all the others are still running
    (tests/_trust_workers.lock_churn), however slowly a loaded machine runs them."""
    d, markers, sync = tmp_path / "cache", tmp_path / "markers", tmp_path / "sync"
    markers.mkdir()
    sync.mkdir()
    procs_n, ops = 5, 40
    args = [{"cache_dir": str(d), "key": "k", "markers": str(markers), "seed": i,
             "sync": str(sync), "procs": procs_n, "ops": ops, "max_seconds": 150.0,
             "out": str(tmp_path / f"out{i}.json")} for i in range(procs_n)]
    procs = _spawn_all(tw.lock_churn, args)
    deadline = time.monotonic() + 200  # a hang, not slowness: the children stop at 150 s
    try:
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 0.1))
            assert p.exitcode == 0, f"a churn process exited with {p.exitcode}"
    finally:
        _stop_all(procs)
    reports = [json.loads(Path(a["out"]).read_text()) for a in args]
    assert all(r["started"] and r["done"] >= ops for r in reports), reports
    # Enough contention to matter: acquires that found another process holding the key.
    assert sum(r["busy"] for r in reports) >= 10, reports
    assert [v for r in reports for v in r["violations"]] == []
    assert [e for r in reports for e in r["errors"]] == []


# --- item 3: a reference unpickles to exactly its version -------------------------------------


def test_item3_references_never_unpickle_to_another_version(shm_dir):
    """References pickled while another process re-saves the key, unpickled in a third.
    Counts, not a time window: it sends until both 100 references went out and the writer
    made 20 saves while they did (however slowly a loaded machine runs either)."""
    d = shm_dir / "cache"
    key = "flip"
    mmcache.save(tw.version_frame(1), key, cache_dir=d)
    stop = shm_dir / "stop"
    ctx = mp.get_context("spawn")
    saves_now = ctx.Value("i", 0, lock=False)
    writer_args = {"cache_dir": str(d), "key": key, "stop": str(stop), "saves": saves_now,
                   "out": str(shm_dir / "writer.json")}
    parent_conn, child_conn = ctx.Pipe()
    writer = ctx.Process(target=tw.resave_loop, args=(writer_args,), daemon=True)
    checker = ctx.Process(target=tw.unpickle_check, args=(child_conn,), daemon=True)
    writer.start()
    checker.start()
    min_sent, min_saves = 100, 20
    try:
        held: list[pd.DataFrame] = []
        sent = 0
        saves_at_first = None
        deadline = time.monotonic() + 150  # a hang, not slowness
        while saves_now.value == 0:  # the writer has imported pandas and is saving
            assert time.monotonic() < deadline and writer.is_alive(), writer.exitcode
            time.sleep(0.01)
        while sent < min_sent or saves_at_first is None or \
                saves_now.value - saves_at_first < min_saves:
            assert time.monotonic() < deadline, (sent, saves_at_first, saves_now.value)
            assert writer.is_alive(), f"the writer exited with {writer.exitcode}"
            try:
                df = mmcache.open(key, cache_dir=d)
            except mmcache.EntryNotFoundError:
                continue
            want = tw.which_version(df)
            assert want in (1, 2)
            payload = pickle.dumps(df)
            assert len(payload) < 1000  # a reference, not the data
            # Every other frame stays alive in the sender until the end; the others go at
            # once, so their versions may be swept before the checker gets to them.
            keep = sent % 2 == 0
            parent_conn.send((want, payload, keep))
            sent += 1
            if saves_at_first is None:
                saves_at_first = saves_now.value
            if keep:
                held.append(df)
            del df
            if sent >= min_sent:
                time.sleep(0.05)  # enough sent: leave the writer the CPU for its saves
        parent_conn.send(None)
        assert parent_conn.poll(WAIT), "the checker did not answer"
        counts = parent_conn.recv()
        stop.touch()
        writer.join(timeout=WAIT)
        assert writer.exitcode == 0
    finally:
        stop.touch()
        _stop_all([writer, checker])
    saves = json.loads(Path(writer_args["out"]).read_text())["saves"]
    assert saves >= min_saves and sent >= min_sent, (saves, sent)
    assert counts["wrong-held"] + counts["wrong-dropped"] == 0, counts
    assert counts["mixed-held"] + counts["mixed-dropped"] == 0, counts
    # A reference whose sender still holds its frame always opens, to exactly its version.
    assert counts["changed-held"] == 0, counts
    assert counts["same-held"] == (sent + 1) // 2, counts


def test_item3_reference_of_a_replaced_version_held_by_its_sender(cache_dir):
    mmcache.save(tw.version_frame(1), "k")
    old = mmcache.open("k")
    payload = pickle.dumps(old)
    mmcache.save(tw.version_frame(2), "k")  # old is still held: its version stays on disk
    code = (f"import pickle, sys; sys.path.insert(0, {str(REPO)!r}); "
            "from tests._trust_workers import which_version; "
            f"print(which_version(pickle.loads({payload!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=WAIT, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert len(payload) < 1000


# --- item 4: an unopenable reference never hangs or breaks a pool ------------------------------


def _gone_reference(cache_dir: Path) -> bytes:
    """A reference pickled from a frame whose version no process maps any more."""
    mmcache.save(tw.version_frame(1), "gone", cache_dir=cache_dir)
    df = mmcache.open("gone", cache_dir=cache_dir)
    payload = pickle.dumps(df)
    assert len(payload) < 1000
    del df
    gc.collect()
    mmcache.delete("gone", cache_dir=cache_dir)
    assert not any(p.is_dir() for p in cache_dir.iterdir())
    return payload


def test_item4_pool_map_gets_entry_changed_error_in_bounded_time(cache_dir):
    payload = _gone_reference(cache_dir)
    with mp.get_context("spawn").Pool(2) as pool:
        result = pool.map_async(tw.sum_column, [tw.Deferred(payload)] * 3)
        with pytest.raises(mmcache.EntryChangedError, match="'gone'") as info:
            result.get(WAIT)  # was: waited forever (the worker died reading its task)
        assert info.value.key == "gone"
        # The pool is still usable afterwards.
        mmcache.save(tw.version_frame(3), "ok")
        assert pool.map(tw.open_and_sum, [("ok", str(cache_dir))], chunksize=1)[0] > 0


def test_item4_process_pool_executor_is_not_broken(cache_dir):
    payload = _gone_reference(cache_dir)
    ctx = mp.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        fut = ex.submit(tw.sum_column, tw.Deferred(payload))
        with pytest.raises(mmcache.EntryChangedError, match="'gone'"):
            fut.result(WAIT)  # was: BrokenProcessPool
        mmcache.save(tw.version_frame(3), "ok")
        assert ex.submit(tw.open_and_sum, ("ok", str(cache_dir))).result(WAIT) > 0


def test_item4_joblib_loky_names_the_key(cache_dir):
    joblib = pytest.importorskip("joblib")
    payload = _gone_reference(cache_dir)
    with pytest.raises(mmcache.EntryChangedError, match="'gone'"):
        joblib.Parallel(n_jobs=2, backend="loky", timeout=WAIT)(
            joblib.delayed(tw.sum_column)(tw.Deferred(payload)) for _ in range(2)
        )


def test_item4_plain_unpickling_still_raises_at_once(cache_dir):
    payload = _gone_reference(cache_dir)
    with pytest.raises(mmcache.EntryChangedError, match="'gone'"):
        pickle.loads(payload)


def test_item4_stand_in_raises_on_any_use():
    err = mmcache.EntryChangedError("key 'k' is gone", key="k", path="/x")
    stand_in = _frame.Unavailable(err)
    for use in (lambda x: x["a"], lambda x: x.sum(), len, lambda x: x + 1, bool, pickle.dumps,
                lambda x: np.asarray(x), iter, str, lambda x: f"{x}", "{}".format,
                float, int, round, lambda x: 2 ** x, lambda x: x.query("a > 1"),
                lambda x: x.loc[0], lambda x: x.shape[0], lambda x: x == 1, hash):
        with pytest.raises(mmcache.EntryChangedError, match="'k'"):
            use(stand_in)
    assert "'k'" in repr(stand_in)


def test_item4_pool_result_whose_version_is_gone_does_not_hang(cache_dir):
    # Review finding: a worker returning an opened frame, whose version went before the
    # parent read the result, killed Pool's result thread (map() waited forever).
    payload = _gone_reference(cache_dir)
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.apply_async(tw.return_deferred, (payload,)).get(WAIT)
        with pytest.raises(mmcache.EntryChangedError, match="'gone'"):
            got["x"]
        mmcache.save(tw.version_frame(3), "ok")
        assert pool.map(tw.open_and_sum, [("ok", str(cache_dir))], chunksize=1)[0] > 0
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        got = ex.submit(tw.return_deferred, payload).result(WAIT)
        with pytest.raises(mmcache.EntryChangedError, match="'gone'"):
            got.sum()
        assert ex.submit(tw.open_and_sum, ("ok", str(cache_dir))).result(WAIT) > 0


def test_item4_bound_method_of_a_gone_version_as_a_task(cache_dir):
    # Review finding: getattr(frame, "sum") runs while the task is unpickled; it must not
    # raise there (the worker would die and the task be lost), but where it is called.
    payload = _gone_reference(cache_dir)
    with mp.get_context("spawn").Pool(1) as pool:
        result = pool.apply_async(tw.call, (tw.BoundMethodOf(payload, "sum"),))
        with pytest.raises(mmcache.EntryChangedError, match="'gone'"):
            result.get(WAIT)


# --- item 5: in-place edits after a re-save or delete -----------------------------------------

EDITS = {
    "loc": lambda df: df.loc.__setitem__((0, "x"), -5.0),
    "iloc": lambda df: df.iloc.__setitem__((1, 1), -5.0),
    "at": lambda df: df.at.__setitem__((2, "x"), -5.0),
    "fillna-inplace": lambda df: df.fillna(-5, inplace=True),
    "Int64-loc": lambda df: df.loc.__setitem__((0, "n"), -5),
    "iadd": lambda df: df.__setitem__("x", df["x"].__iadd__(1)),
    "str-loc": lambda df: df.loc.__setitem__((0, "s"), "edited"),
}
BEHIND = {
    "re-save": lambda key, d: mmcache.save(tw.version_frame(2), key, cache_dir=d),
    "delete": lambda key, d: mmcache.delete(key, cache_dir=d),
    "re-save by another process": lambda key, d: subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import mmcache; "
         "from tests._trust_workers import version_frame; "
         "mmcache.save(version_frame(2), 'k', cache_dir=sys.argv[2])", str(REPO), str(d)],
        check=True, timeout=WAIT),
}


@pytest.mark.parametrize("how", list(BEHIND))
@pytest.mark.parametrize("edit", list(EDITS))
def test_item5_in_place_edits_work_after_resave_or_delete(edit, how, cache_dir):
    original = tw.version_frame(1, 50)
    mmcache.save(original, "k")
    df = mmcache.open("k")  # the only frame of its version in this process
    mapped_x = df["x"].to_numpy()  # a raw view of the mapped column (no pandas reference)
    BEHIND[how]("k", cache_dir)
    with contextlib.suppress(mmcache.EntryNotFoundError):
        mmcache.open("k")  # the service opens the key again, as it would
    gc.collect()
    EDITS[edit](df)  # was: "assignment destination is read-only"
    expected = original.copy()
    expected_x = expected["x"].to_numpy()
    EDITS[edit](expected)
    _pd.assert_frame_equal(df, expected)
    if writes_in_place():
        # pandas 2 without copy-on-write: the frame's own private pages, which its raw view
        # shares exactly as a plain frame's does (never the cache's: see test_api)
        np.testing.assert_array_equal(mapped_x, expected_x)
    else:
        np.testing.assert_array_equal(mapped_x, original["x"].to_numpy())  # never written through


def test_item5_series_and_derived_frames_outliving_their_parent(cache_dir):
    original = tw.version_frame(1, 50)
    mmcache.save(original, "k")
    s = mmcache.open("k")["n"]  # the frame it came from is gone at once
    sub = mmcache.open("k")[["x", "v"]]
    mmcache.delete("k")
    gc.collect()
    s[0] = -5
    s.iloc[1] = -6
    sub.loc[0, "x"] = -5.0
    sub.fillna(0, inplace=True)
    assert s.tolist()[:3] == [-5, -6, 1]
    assert sub["x"].iloc[0] == -5.0
    mmcache.save(original, "k2")
    if not writes_in_place():  # (pandas 2 without copy-on-write: the frame's own pages)
        with pytest.raises(ValueError, match="read-only"):
            mmcache.open("k2")["x"].to_numpy()[0] = 1.0  # the raw buffer stays read-only


# --- item 6: last_used reflects every open, memoised or not -----------------------------------


def test_item6_memoised_opens_count_as_use(cache_dir):
    mmcache.save(tw.version_frame(1), "svc")
    held = mmcache.open("svc")
    meta = cache_dir / f"{entry_name('svc')}.json"
    st = os.stat(meta)
    hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(meta, ns=(hour_ago, st.st_mtime_ns))  # as if last used an hour ago
    again = mmcache.open("svc")  # served from the memo (held is alive)
    assert again._mmcache_ref.version is held._mmcache_ref.version
    (entry,) = mmcache.entries()
    assert entry.last_used > dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    assert mmcache.clean(older_than="5s") == []
    assert mmcache.exists("svc")


def test_item6_a_service_opening_every_second_survives_clean_older_than(cache_dir):
    mmcache.save(tw.version_frame(1), "svc")
    held = mmcache.open("svc")
    for _ in range(3):
        time.sleep(1.0)
        mmcache.open("svc")
        assert mmcache.clean(older_than=0.9) == []
    assert mmcache.open("svc")["v"].iloc[0] == 1
    del held


# --- items 10 and 13: nothing stays mapped once no frame uses it -------------------------------


@pytest.mark.parametrize("how", ["re-save", "delete", "left alone"])
def test_item10_last_frame_to_go_unmaps_without_another_open(how, cache_dir):
    mmcache.save(tw.version_frame(1, 100_000), "k")
    df = mmcache.open("k")
    view = df["x"]
    del df
    gc.collect()
    assert maps_under(cache_dir)  # a Series view keeps its pages
    if how == "re-save":
        mmcache.save(tw.version_frame(2, 10), "k")
    elif how == "delete":
        mmcache.delete("k")
    assert float(view.iloc[5]) == 5.0 + 1e6
    del view
    gc.collect()
    assert maps_under(cache_dir) == []  # was: kept until this process called open again


@pytest.mark.parametrize("how", ["re-save", "delete"])
def test_item10_old_version_files_go_when_its_last_frame_goes(how, cache_dir):
    mmcache.save(tw.version_frame(1, 10_000), "k")
    held = mmcache.open("k")
    if how == "re-save":
        mmcache.save(tw.version_frame(2, 10), "k")
    else:
        mmcache.delete("k")
    # The old version stays on disk while mapped (a reference pickled from `held` must
    # still open), at no memory cost ...
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == (2 if how == "re-save" else 1)
    del held
    gc.collect()
    # ... and goes as soon as its last frame does, with no other call.
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == (1 if how == "re-save" else 0)


def test_item10_old_version_stays_while_another_process_maps_it(cache_dir):
    mmcache.save(tw.version_frame(1, 10_000), "k")
    code = ("import sys, time, mmcache; df = mmcache.open('k', cache_dir=sys.argv[1]); "
            "print('ready', flush=True); sys.stdin.readline()")
    with subprocess.Popen([sys.executable, "-c", code, str(cache_dir)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout.readline().strip() == "ready"
            held = mmcache.open("k")
            mmcache.save(tw.version_frame(2, 10), "k")
            del held
            gc.collect()  # this process let go, the child did not: the version stays
            assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 2
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.wait(timeout=WAIT) == 0  # the child let go at exit: the version goes
            assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 1
        finally:
            child.kill()
            child.wait(timeout=WAIT)


def test_item13_pool_worker_keeps_nothing_mapped_after_its_task(cache_dir):
    mmcache.save(tw.version_frame(1, 100_000), "k")
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply_async(tw.open_and_sum, (("k", str(cache_dir)),)).get(WAIT) > 0
        # The same worker, after the task: no frame, so no mapping (the memo holds none).
        assert pool.apply_async(tw.mapped_here, (str(cache_dir),)).get(WAIT) == []


def test_item13_open_again_while_a_frame_lives_reuses_the_mapping(cache_dir):
    mmcache.save(tw.version_frame(1, 100_000), "k")
    first = mmcache.open("k")
    before = maps_under(cache_dir)
    second = mmcache.open("k")
    if writes_in_place():  # pandas 2 without copy-on-write: each frame its private mapping
        assert len(maps_under(cache_dir)) > len(before)
    else:
        assert maps_under(cache_dir) == before  # no new mapping
    assert_zero_copy(second, cache_dir)
    assert second is not first


# --- item 14: errors carry the key and the path ------------------------------------------------


def test_item14_errors_from_save_and_open_name_key_and_path(cache_dir):
    bad = pd.DataFrame({"o": [object()]})
    with pytest.raises(mmcache.UnsupportedTypeError) as info:
        mmcache.save(bad, "bad")
    assert info.value.key == "bad" and info.value.path == str(cache_dir)
    mmcache.save(tw.version_frame(1), "k")
    with pytest.raises(mmcache.ColumnNotFoundError) as info2:
        mmcache.open("k", columns=["nope"])
    assert info2.value.key == "k" and info2.value.path is not None
    with contextlib.suppress(Exception):
        pickle.loads(pickle.dumps(info2.value))
    again = pickle.loads(pickle.dumps(info2.value))
    assert (again.key, again.path) == ("k", info2.value.path)


def test_damaged_string_labels_are_a_corrupt_entry_not_a_raw_unicode_error(cache_dir):
    # Found by the fuzz test: data files are not checksummed, and invalid UTF-8 in the
    # Arrow buffer of column labels (or categories) used to escape as UnicodeDecodeError.
    df = pd.DataFrame({"alphabetical": [1, 2],
                       "zebra": pd.Categorical(pd.array(["quokka"] * 2, dtype=_pd.STR))})
    df.columns = pd.Index(df.columns, dtype=_pd.STR)  # Arrow strings on pandas 2 too
    mmcache.save(df, "k")
    for needle in (b"alphabetical", b"quokka"):
        damaged = False
        for f in cache_dir.rglob("*.npy"):
            raw = f.read_bytes()
            if needle in raw:
                os.chmod(f, 0o600)
                f.write_bytes(raw.replace(needle, b"\xff" * len(needle)))
                damaged = True
        assert damaged, needle
        mmcache._cache._MEMO.clear()
        with pytest.raises(mmcache.CorruptEntryError, match="damaged"):
            mmcache.open("k")
        mmcache.save(df, "k")  # intact again for the next needle


def test_item3_entries_of_the_previous_format_pickle_in_full_once_replaced(cache_dir):
    # Data directories written before versions linked their metadata cannot be opened by
    # token once the key moves on: a frame of one must then carry its data, not a reference.
    mmcache.save(tw.version_frame(1), "k")
    for link in cache_dir.glob("*/meta.json"):
        link.unlink()  # as an older mmcache wrote it
    mmcache._cache._MEMO.clear()
    old = mmcache.open("k")
    assert len(pickle.dumps(old)) < 1000  # still current: a reference
    mmcache.save(tw.version_frame(2), "k")
    payload = pickle.dumps(old)
    assert len(payload) > 10_000
    assert tw.which_version(pickle.loads(payload)) == 1


def test_item3_open_never_keeps_a_version_swept_while_it_was_being_mapped(cache_dir, monkeypatch):
    # Review finding: a reader that read NAME.json before a re-save published, and mapped
    # after the re-saver's /proc scan, kept a frame whose files were then removed (it could
    # only pickle in full; a reference to it could not be opened).
    from mmcache import _memo

    mmcache.save(tw.version_frame(1), "k")
    real_map = _memo._map
    raced = []

    def map_then_race(cache_dir_, key, data, meta):
        version = real_map(cache_dir_, key, data, meta)
        if not raced:
            raced.append(data)
            monkeypatch.setattr(_memo, "_map", real_map)
            mmcache.save(tw.version_frame(2), "k")
            # ... and a sweeper that had scanned /proc before this process mapped v1:
            for f in (Path(cache_dir_) / data).iterdir():
                f.unlink()
            (Path(cache_dir_) / data).rmdir()
        return version

    monkeypatch.setattr(_memo, "_map", map_then_race)
    got = mmcache.open("k")
    assert raced
    assert tw.which_version(got) == 2  # the current version, whose files are all there
    assert len(pickle.dumps(got)) < 1000


def test_item6_clean_by_age_rechecks_use_under_the_lock(cache_dir, monkeypatch):
    # Review finding: clean(older_than=) chose entries from one listing, then deleted them
    # one by one; an entry opened meanwhile was removed although used within the window.
    from mmcache import _clean

    for k in ("idle", "busy"):
        mmcache.save(tw.version_frame(1), k)
        meta = cache_dir / f"{entry_name(k)}.json"
        os.utime(meta, ns=(time.time_ns() - 7200 * 10**9, os.stat(meta).st_mtime_ns))
    real_survey = _clean.survey

    def survey_then_open(*args, **kwargs):
        listed = real_survey(*args, **kwargs)
        mmcache.open("busy")  # used after the listing, before the deletions
        return listed

    monkeypatch.setattr(_clean, "survey", survey_then_open)
    removed = [e.key for e in mmcache.clean(older_than="1h")]
    assert removed == ["idle"]
    assert mmcache.exists("busy")


def test_clean_goes_on_past_a_directory_planted_as_a_lock_file(cache_dir):
    # Review finding: one such key made clean() raise, so no other key was cleaned.
    for k in ("a", "b", "c"):
        mmcache.save(tw.version_frame(1), k)
    lock = cache_dir / f"{entry_name('b')}.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    removed = sorted(e.key for e in mmcache.clean())
    assert removed == ["a", "c"]
    with pytest.raises(mmcache.CacheDirError, match="not a regular file"):
        mmcache.save(tw.version_frame(2), "b")
    assert lock.is_dir()  # not ours: left alone


def test_item3_clean_never_sweeps_a_version_mapped_after_it_listed(cache_dir, monkeypatch):
    # Review finding: clean scanned /proc once, before choosing; a process that mapped a
    # version after that scan lost its files when clean removed the entry, so references
    # its sender still held could not be opened.
    from mmcache import _clean

    mmcache.save(tw.version_frame(1, 10_000), "k")
    code = ("import sys, mmcache; df = mmcache.open('k', cache_dir=sys.argv[1]); "
            "print('ready', flush=True); sys.stdin.readline()")
    real_survey = _clean.survey
    children = []

    def survey_then_map_elsewhere(*args, **kwargs):
        listed = real_survey(*args, **kwargs)
        if not children:
            child = subprocess.Popen([sys.executable, "-c", code, str(cache_dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            children.append(child)
            assert child.stdout.readline().strip() == "ready"
        return listed

    monkeypatch.setattr(_clean, "survey", survey_then_map_elsewhere)
    try:
        assert [e.key for e in mmcache.clean()] == ["k"]
        assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 1  # kept: mapped
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=WAIT)
            child.stdin.close()
            child.stdout.close()


# --- found by the independent review of clean, the CLI and the codecs ---------------------------


@pytest.mark.timeout(60)
def test_pipes_and_directories_under_own_names_never_block_or_crash(cache_dir):
    mmcache.save(tw.version_frame(1), "k")
    name = entry_name("k")
    meta = cache_dir / f"{name}.json"
    (data,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    npy = data / "0.npy"
    npy.unlink()
    os.mkfifo(npy)  # a reader would wait forever on a blocking open of a pipe
    mmcache._cache._MEMO.clear()
    with pytest.raises(mmcache.CorruptEntryError):
        mmcache.open("k")
    meta.unlink()
    meta.mkdir()  # a directory where the metadata goes
    (meta / "mine.txt").write_text("user data")
    with pytest.raises(mmcache.CorruptEntryError, match="not a regular file"):
        mmcache.open("k")
    assert mmcache.exists("k") in (True, False)
    lock = cache_dir / f"{entry_name('p')}.lock"
    os.mkfifo(lock)
    with pytest.raises(mmcache.CacheDirError, match="not a regular file"):
        mmcache.save(tw.version_frame(1), "p")
    assert (meta / "mine.txt").read_text() == "user data"


@pytest.mark.parametrize("missing", [np.float32("nan"), np.float16("nan"), pd.NaT, pd.NA])
def test_str_columns_with_any_kind_of_missing_value_save(missing, cache_dir):
    df = pd.DataFrame({"s": pd.Series(["x", missing, "y"], dtype=object)})
    mmcache.save(df, "k")  # was: a raw ArrowTypeError, or a refusal blaming the str values
    got = mmcache.open("k")
    assert got["s"].dtype == _pd.STR
    assert got["s"].tolist()[0] == "x" and got["s"].tolist()[2] == "y"
    assert pd.isna(got["s"].iloc[1])


def test_damaged_multiindex_codes_are_a_corrupt_entry_not_a_crash(cache_dir):
    # Review finding: pandas uses MultiIndex codes unchecked; a damaged byte crashed the
    # reading process with SIGSEGV. Open checks their range (one pass over small ints).
    idx = pd.MultiIndex.from_product([["a", "b"], [1, 2, 3]])
    mmcache.save(pd.DataFrame({"x": np.arange(6.0)}, index=idx), "k")
    meta = json.loads((cache_dir / f"{entry_name('k')}.json").read_bytes())
    codes = meta["layout"]["index"]["codes"][0]
    spec = meta["files"][codes["f"]]
    path = cache_dir / meta["data"] / spec["name"]
    raw = bytearray(path.read_bytes())
    itemsize = np.dtype(spec["dtype"]).itemsize
    start = len(raw) - spec["count"] * itemsize + codes["o"] * itemsize
    raw[start:start + itemsize] = (100).to_bytes(itemsize, "little")  # level has 2 values
    path.chmod(0o600)
    path.write_bytes(bytes(raw))
    mmcache._cache._MEMO.clear()
    with pytest.raises(mmcache.CorruptEntryError, match="MultiIndex codes out of range"):
        mmcache.open("k")


# --- found by the second review (of the fixes) ---------------------------------------------------


def test_review2_pool_result_of_a_damaged_version_is_a_stand_in_not_a_hang(cache_dir):
    mmcache.save(tw.version_frame(1), "k")
    held = mmcache.open("k")
    payload = pickle.dumps(held)
    (vmeta,) = cache_dir.glob("*/meta.json")
    vmeta.unlink()
    vmeta.mkdir()  # damaged: the version cannot be opened, and not because it is gone
    mmcache._cache._MEMO.clear()
    with mp.get_context("spawn").Pool(1) as pool:
        got = pool.apply_async(tw.return_deferred, (payload,)).get(WAIT)
        with pytest.raises(mmcache.CorruptEntryError):
            got.sum()
        assert pool.apply_async(tw.mapped_here, (str(cache_dir),)).get(WAIT) == []
    del held


def test_review2_two_mappings_of_one_version_in_one_process(cache_dir):
    mmcache.save(tw.version_frame(1), "k")
    f1 = mmcache.open("k")
    mmcache.save(tw.version_frame(2), "k")
    mmcache.open("k")
    g = pickle.loads(pickle.dumps(f1))  # the memo holds version 2: version 1 mapped again
    payload = pickle.dumps(g)
    del f1
    gc.collect()  # f1's mapping goes; g still maps version 1: its files must stay
    code = (f"import pickle, sys; sys.path.insert(0, {str(REPO)!r}); "
            "from tests._trust_workers import which_version; "
            f"print(which_version(pickle.loads({payload!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=WAIT, cwd=REPO)
    assert (out.returncode, out.stdout.strip()) == (0, "1"), out.stderr


@pytest.mark.parametrize("trial", range(3))
def test_review2_many_processes_letting_go_at_once_leave_no_old_version(trial, tmp_path,
                                                                         cache_dir):
    mmcache.save(tw.version_frame(1, 50_000), "k")
    go = tmp_path / "go"
    args = [{"cache_dir": str(cache_dir), "key": "k", "ready": str(tmp_path / f"r{i}"),
             "go": str(go)} for i in range(6)]
    procs = _spawn_all(tw.hold_until, args)
    try:
        deadline = time.monotonic() + WAIT
        while not all(Path(a["ready"]).exists() for a in args):
            assert time.monotonic() < deadline, "children did not open the key"
            time.sleep(0.01)
        mmcache.save(tw.version_frame(2, 10), "k")
        go.touch()
        for p in procs:
            p.join(timeout=WAIT)
            assert p.exitcode == 0
    finally:
        _stop_all(procs)
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 1


def test_review2_multiprocessing_child_exiting_with_a_frame_lets_go(tmp_path, cache_dir):
    mmcache.save(tw.version_frame(1, 50_000), "k")
    a = {"cache_dir": str(cache_dir), "key": "k", "ready": str(tmp_path / "ready"),
         "go": str(tmp_path / "go")}
    procs = _spawn_all(tw.hold_and_exit, [a])
    try:
        deadline = time.monotonic() + WAIT
        while not Path(a["ready"]).exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        mmcache.save(tw.version_frame(2, 10), "k")
        assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 2
        Path(a["go"]).touch()
        procs[0].join(timeout=WAIT)
        assert procs[0].exitcode == 0
    finally:
        _stop_all(procs)
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 1
