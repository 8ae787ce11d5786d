"""mmcache.dask on a real distributed cluster: worker processes under nannies, grouped in
two simulated nodes (each group its own MMCACHE_DIR), as the contract's "Scale-out on Dask
distributed" asks: one copy per node, memory accounting that leaves shared pages out, plain
references that fail clearly where their version is not."""

from __future__ import annotations

import gc
import os
import pickle
import threading
import time
from functools import partial

import pandas as pd
import psutil
import pytest

pytest.importorskip("distributed")

import mmcache
import mmcache.dask as mdask
from mmcache._compat import writes_in_place
from tests import _dask_workers as w
from tests._dirs import shm_tempdir

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def nodes():
    with shm_tempdir("mmc-dask-a-") as a, shm_tempdir("mmc-dask-b-") as b:
        yield [a, b]


@pytest.fixture(scope="module")
def client(nodes):
    with w.cluster(nodes) as c:
        yield c


@pytest.fixture
def here(cache_dir):
    """The client's own cache directory (never a node's)."""
    return cache_dir


def node_map(client):
    return client.run(w.node_of)  # worker address -> its node's cache dir


def entries_per_node(nodes):
    return {str(d): sorted(e.key for e in mmcache.entries(cache_dir=d)) for d in nodes}


def test_share_gives_each_node_one_copy_that_every_worker_maps(client, nodes, here):
    df = w.frame(100_000)
    from distributed import get_task_stream

    with get_task_stream(client) as stream:
        ref = mdask.share(client, df)
    try:
        # One worker of each node received the frame and wrote its node's copy.
        assert w.save_tasks_per_node(client, stream.data) == {str(d): 1 for d in nodes}
        assert len(pickle.dumps(ref)) < 1000
        assert entries_per_node(nodes) == {str(d): [ref.key] for d in nodes}
        assert mmcache.entries(cache_dir=here) == []  # nothing written where the client is
        where = node_map(client)
        assert len(where) == 4 and len(set(where.values())) == 2
        for addr, node_dir in where.items():
            for column in ("a", "s"):
                got = client.submit(w.sum_zero_copy, ref, column, workers=[addr],
                                    pure=False).result(timeout=60)
                expect = float(df[column].str.len().sum() if column == "s" else df[column].sum())
                assert got == (node_dir, expect, True), (addr, column)
    finally:
        assert ref.delete() == 2
    assert entries_per_node(nodes) == {str(d): [] for d in nodes}


def test_share_as_context_manager_deletes_on_exception(client, nodes, here):
    with pytest.raises(RuntimeError, match="inside"), \
            mdask.share(client, w.frame(100), key="ctx") as ref:
        assert entries_per_node(nodes) == {str(d): ["ctx"] for d in nodes}
        raise RuntimeError("inside")
    assert ref.key == "ctx"
    assert entries_per_node(nodes) == {str(d): [] for d in nodes}


def test_build_runs_once_per_node(client, nodes, here, tmp_path):
    log = tmp_path / "builds.log"
    ref = mdask.share(client, build=partial(w.build_logged, str(log)), key="built")
    try:
        calls = log.read_text().split()
        assert sorted(calls[0::2]) == sorted(str(d) for d in nodes)  # one per node
        sums = client.gather([client.submit(w.sum_zero_copy, ref, "a", workers=[a],
                                            pure=False) for a in node_map(client)])
        assert {s for _, s, _ in sums} == {float(w.frame(1000)["a"].sum())}
        assert all(inside for _, _, inside in sums)
        assert len(log.read_text().split()) == 4  # opening built nothing more
    finally:
        ref.delete()


def test_share_refuses_bad_arguments(client):
    with pytest.raises(mmcache.InvalidArgumentError, match="exactly one"):
        mdask.share(client)
    with pytest.raises(mmcache.InvalidArgumentError, match="needs key"):
        mdask.share(client, build=partial(w.frame, 3))
    with pytest.raises(mmcache.InvalidArgumentError, match="DataFrame or Series"):
        mdask.share(client, [1, 2, 3])


def test_handle_opens_only_the_copy_share_wrote_on_its_node(client, nodes, here):
    ref = mdask.share(client, w.frame(100), key="partial")
    try:
        assert sorted(d for d, _ in ref.versions.values()) == sorted(str(d) for d in nodes)
        where = node_map(client)
        b_addr = next(a for a, d in where.items() if d == str(nodes[1]))
        # Node b's copy replaced behind the handle's back (another save of the key, or a
        # copy an earlier share left while b was away): never taken for the shared one.
        mmcache.save(w.frame(7), "partial", cache_dir=nodes[1])
        with pytest.raises(mmcache.EntryChangedError) as info:
            client.submit(w.sum_zero_copy, ref, "a", workers=[b_addr],
                          pure=False).result(timeout=60)
        assert "partial" in str(info.value) and str(nodes[1]) in str(info.value)
        # A node the share did not reach (joined later): the error names it.
        only_a = mdask.Shared("partial", versions={
            n: v for n, v in ref.versions.items() if v[0] == str(nodes[0])})
        with pytest.raises(mmcache.EntryNotFoundError) as info:
            client.submit(w.sum_zero_copy, only_a, "a", workers=[b_addr],
                          pure=False).result(timeout=60)
        msg = str(info.value)
        assert "partial" in msg and str(nodes[1]) in msg and "mmcache.dask.share" in msg
    finally:
        ref.delete()


def test_two_shares_of_one_key_are_different_tasks(client, here):
    """Dask caches results by token: a handle of a new share must not reuse the old one's."""
    first = mdask.share(client, w.frame(10), key="daily")
    one = client.submit(w.sum_zero_copy, first, "a").result(timeout=60)[1]
    second = mdask.share(client, w.frame(20), key="daily")
    try:
        assert client.submit(w.sum_zero_copy, second, "a").result(timeout=60)[1] != one
    finally:
        second.delete()


def test_share_of_an_opened_frame_sends_its_data(client, nodes, here):
    """An opened frame would travel as a reference to the client's cache (unopenable on
    another host): share sends the data."""
    mmcache.save(w.frame(1000), "mine")
    opened = mmcache.open("mine")
    ref = mdask.share(client, opened, timeout=60)
    try:
        assert entries_per_node(nodes) == {str(d): [ref.key] for d in nodes}
        assert all(d != str(here) for d, _ in ref.versions.values())
    finally:
        ref.delete()


def test_plain_reference_travels_and_a_missing_version_fails_the_task_only(
        client, nodes, here):
    df = w.frame(50_000)
    mmcache.save(df, "plain")
    opened = mmcache.open("plain")
    # An opened frame passed straight to submit travels as a reference: right answer.
    assert client.submit(w.column_sum, opened, "a", pure=False).result(timeout=60) == \
        float(df["a"].sum())
    pids = client.run(os.getpid)
    # A reference whose version is gone by the time a worker reads it (as on a node without
    # that entry): the task fails with an error naming the worker's node and the way out;
    # the worker's connection survives (distributed unpickles arguments while reading).
    payload = w.Raw(pickle.dumps(opened))
    del opened
    gc.collect()
    mmcache.delete("plain")
    fut = client.submit(w.column_sum, payload, "a", pure=False)
    with pytest.raises(mmcache.EntryChangedError) as info:
        fut.result(timeout=60)
    msg = str(info.value)
    assert "'plain'" in msg and "Dask worker tcp://" in msg and "mmcache.dask.share" in msg
    assert client.submit(w.column_sum, w.frame(10), "a", pure=False).result(timeout=60) == 45
    assert client.run(os.getpid) == pids  # no worker died or restarted


def test_a_view_passed_to_submit_arrives_as_that_view(client, here):
    """Found by an attack: the scheduler forwards the references it unpickles, and the
    forward dropped a view's rows and columns, so a chunk arrived as the whole frame (a
    Series as a DataFrame). Each view arrives as itself, over the same pages."""
    df = w.frame(5_000)
    mmcache.save(df, "views")
    opened = mmcache.open("views")
    views = {"rows": opened.iloc[1_000:1_500], "column rows": opened["a"].iloc[10:20],
             "column": opened["s"]}
    if not writes_in_place():  # (pandas 2 without copy-on-write copies column subsets)
        views["rows of columns"] = opened.iloc[100:200][["b", "a"]]
    for kind, view in views.items():
        assert b"_reopen" in pickle.dumps(view), kind
        got = client.submit(w.view_received, view, str(here),
                            pure=False).result(timeout=60)
        assert got["type"] == type(view).__name__, kind
        if isinstance(view, pd.Series):
            pd.testing.assert_series_equal(got["copy"], view, check_exact=True)
        else:
            pd.testing.assert_frame_equal(got["copy"], view, check_exact=True)
        assert got["zero_copy"], kind


def test_worker_killed_while_writing_leaves_nothing_and_another_finishes(client, nodes, here):
    target = str(nodes[0])
    df = w.big_frame(12_000_000)  # ~100 MB: the write lasts long enough to be caught
    where = node_map(client)
    pids = client.run(os.getpid)
    node_pids = [pids[a] for a, d in where.items() if d == target]
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["ref"] = mdask.share(client, df, key="killed")
        except BaseException as exc:  # reported below
            import traceback

            result["error"] = "".join(traceback.format_exception(exc))

    sharer = threading.Thread(target=run, daemon=True)
    sharer.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and sharer.is_alive() and time.monotonic() < deadline:
        pid = w.writer_pid(node_pids, target)
        if pid is not None:
            os.kill(pid, 9)
            killed = pid
            visible = mmcache.exists("killed", cache_dir=target)
    sharer.join(timeout=120)
    assert not sharer.is_alive()
    assert killed is not None, "the write ended before it could be interrupted"
    assert not visible  # killed mid-write: nothing published
    assert "error" not in result, result.get("error")
    ref = result["ref"]
    try:
        assert entries_per_node(nodes) == {str(d): ["killed"] for d in nodes}
        client.wait_for_workers(4, timeout=60)  # the nanny restarted the killed one
        for addr in node_map(client):
            got = client.submit(w.column_sum, mmcache.dask.Shared("killed"), "x",
                                workers=[addr], pure=False)
            with pytest.raises(TypeError):  # a handle is not a frame: tasks open it
                got.result(timeout=60)
            assert client.submit(w.sum_zero_copy, ref, "x", workers=[addr],
                                 pure=False).result(timeout=60)[1] == float(df["x"].sum())
    finally:
        ref.delete()


ROWS = 32_000_000  # 256 MB of float64: the entry each worker holds


def test_register_leaves_shared_pages_out_of_dasks_memory(here):
    """Two workers of one node each hold a 256 MB opened frame, read in full, under a
    limit at which their RSS passes both the pause (50%) and the nanny's terminate (60%)
    fractions. After register: Dask sees each worker's own memory, never pauses nor
    restarts them, and sizeof counts no shared buffer. Without the worker plugin, the same
    workers pause at once."""
    import dask

    limit = 600 << 20
    config = {"distributed.worker.memory.target": False,
              "distributed.worker.memory.spill": False,
              "distributed.worker.memory.pause": 0.5,
              "distributed.worker.memory.terminate": 0.6}
    with shm_tempdir("mmc-dask-mem-") as node, dask.config.set(config), \
            w.cluster([node], memory_limit=limit) as client:
        mdask.register(client)
        mdask.register(client)  # idempotent
        # Written from here: a worker building 256 MB in its heap would pass the limit.
        mmcache.save(w.big_frame(ROWS), "big", cache_dir=node)
        gc.collect()
        ref = mdask.Shared("big", build=partial(w.big_frame, ROWS), client=client)
        pids = client.run(os.getpid)
        held = client.gather([client.submit(w.hold, ref, workers=[a], pure=False)
                              for a in pids])
        assert held == [ROWS * 8] * 2
        statuses = client.run(w.statuses_over, 1.5)
        views = client.run(w.memory_view)  # a second on: Dask's measure has caught up
        for addr, view in views.items():
            assert view["rss"] > 0.6 * limit, view  # the kernel's count passes both limits
            assert view["dask"] < 0.5 * limit, view  # Dask's does not
            assert view["dask"] < view["rss"] - 0.8 * ROWS * 8, view
            assert abs(view["dask"] - view["uss"]) < 0.25 * view["uss"] + (16 << 20), view
            assert view["sizeof"] < 0.01 * ROWS * 8, view  # no shared buffer counted
            assert statuses[addr] == ["running"], statuses  # never paused
            assert view["pid"] == pids[addr]  # never restarted
        # The scheduler's view (heartbeats, the dashboard) is the same measure.
        reported = {a: i["metrics"]["memory"]
                    for a, i in client.scheduler_info(n_workers=-1)["workers"].items()}
        assert all(m < 0.5 * limit for m in reported.values()), reported
        # Without the worker plugin, Dask counts the mapped pages again: the workers pause.
        client.unregister_worker_plugin("mmcache-memory")
        statuses = client.run(w.statuses_over, 1.5)
        assert all("paused" in s for s in statuses.values()), statuses
        # Memory that is the worker's own still gets it restarted past the terminate
        # fraction, register or not (the nanny plugin only leaves out cache pages).
        before = len(client.get_events("worker-restart-memory"))
        victim = sorted(pids)[0]
        client.run(w.grow_heap, 400 << 20, workers=[victim], wait=False)  # it may die first
        deadline = time.monotonic() + 60
        while len(client.get_events("worker-restart-memory")) == before:
            assert time.monotonic() < deadline, "the nanny never restarted the worker"
            time.sleep(0.2)
        # The nanny records the restart, then terminates the process: on a loaded machine
        # it may still be running a moment after the event (seen in CI).
        def victim_gone() -> bool:
            try:
                return psutil.Process(pids[victim]).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        deadline = time.monotonic() + 30
        while not victim_gone():
            assert time.monotonic() < deadline, "the restarted worker's process lives on"
            time.sleep(0.2)
        ref.delete()


# --- the measures themselves, in this process (no cluster) ---------------------------------


def test_sizeof_counts_private_buffers_only(cache_dir):
    import numpy as np
    from dask.sizeof import sizeof

    mdask._register_sizeof()
    df = w.frame(200_000)
    df["c"] = df["b"].astype("category")
    mmcache.save(df, "sz")
    opened = mmcache.open("sz")
    full = sizeof(df)
    assert full > 3_000_000
    assert sizeof(opened) < 0.02 * full  # every buffer is in the mapped files
    assert sizeof(opened["a"]) < 0.02 * full
    assert sizeof(opened.iloc[10:1000]) < 0.02 * full  # views of mapped buffers too
    edited = opened.copy(deep=False)
    edited["a"] = edited["a"] + 1  # a private column: counted
    assert sizeof(edited) >= 200_000 * 8
    assert sizeof(pd_empty := opened.iloc[:0]) >= 0 and sizeof(pd_empty.index) >= 0
    assert sizeof(np.arange(10)) == 80  # not a pandas object: dask's own measure


def test_own_bytes_leaves_out_cache_pages_but_not_private_copies(cache_dir):
    import numpy as np
    import pandas as pd
    import psutil

    from mmcache import _compat

    n = 8_000_000  # 64 MB
    mmcache.save(pd.DataFrame({"x": np.arange(n, dtype="float64")}), "own")
    before = mdask.own_bytes(os.getpid())
    opened = mmcache.open("own")
    assert float(opened["x"].sum()) == n * (n - 1) / 2  # every page read
    uss = psutil.Process().memory_full_info().uss
    own = mdask.own_bytes(os.getpid())
    # This process is the only one mapping the entry: USS counts its pages, own_bytes not.
    assert uss - own > 0.9 * n * 8
    assert own - before < 0.1 * n * 8
    if _compat.writes_in_place():  # pandas 2 without copy-on-write: raw writes are allowed
        opened["x"].to_numpy()[:] = 1.0  # every page now a private copy: counted
        assert mdask.own_bytes(os.getpid()) - own > 0.9 * n * 8
        own = mdask.own_bytes(os.getpid())
    # 64 MB of new private memory: counted. Mapped here rather than from the allocator,
    # which may hand back pages this process already holds (and own_bytes already counts):
    # once in CI, np.ones(n) left own_bytes exactly unchanged.
    import mmap

    fresh = mmap.mmap(-1, n * 8)
    heap = np.frombuffer(fresh, dtype=np.float64)
    heap[:] = 1.0
    assert mdask.own_bytes(os.getpid()) - own > 0.9 * n * 8
    del heap, opened
    fresh.close()
