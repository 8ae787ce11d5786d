"""Row ranges and column subsets of an opened frame pickle as references (README "Chunks and
views"); anything else derived from it pickles in full, and a view never arrives as other data.

A reference pickles to a call of ``mmcache._frame._reopen``: a payload without that name
carries the data itself. Round trips are compared with pandas' strict helpers, so a
reference that rebuilt other data (another dtype, time zone, categories, labels, rows)
fails here even when the payload looks right.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

import mmcache
from mmcache._compat import writes_in_place
from tests import _pd

from . import _workers
from ._zerocopy import array_buffers, maps_under

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/maps"), reason="needs Linux /proc"
)

WAIT = 60.0  # seconds: bound on any one wait for the spawned workers
ROWS = 2_000
REF = b"_reopen"  # in every reference payload, in no full one


def zoo(index: str) -> pd.DataFrame:
    """The mixed frame plus a nullable and a tz-aware column, over one kind of index."""
    df = _workers.make_mixed_frame(ROWS, seed=5)
    df["n"] = pd.array(np.where(np.arange(ROWS) % 7 == 0, None, np.arange(ROWS)), dtype="Int64")
    df["t"] = pd.date_range("2024-01-01", periods=ROWS, freq="min", tz="Europe/Paris")
    if index == "datetime":
        df.index = pd.date_range("2020-01-01", periods=ROWS, freq="h", name="when")
    elif index == "multi":
        df.index = pd.MultiIndex.from_arrays(
            [np.arange(ROWS) // 100, [f"r{i}" for i in range(ROWS)]], names=["g", "r"])
    df.attrs = {"source": "zoo"}
    return df


# kind -> (how the view is made, True if pandas 2 without copy-on-write copies it)
VIEWS: dict[str, tuple[Callable[[pd.DataFrame], Any], bool]] = {
    "iloc rows": (lambda df: df.iloc[100:700], False),
    "df[a:b]": (lambda df: df[1500:], False),
    "column subset": (lambda df: df[["s", "a", "cat"]], True),
    "loc columns": (lambda df: df.loc[:, ["b", "n", "t"]], True),
    "rows then columns": (lambda df: df.iloc[50:90][["t", "i", "s"]], True),
    "columns then rows": (lambda df: df[["cat", "n"]].iloc[3:40], True),
    "contiguous columns": (lambda df: df.iloc[7:600, 1:4], True),
    "column": (lambda df: df["s"], False),
    "column rows": (lambda df: df["n"].iloc[10:30], False),
    "rows column": (lambda df: df.iloc[10:300, 6], False),
    "rows of rows": (lambda df: df.iloc[100:900].iloc[5:50], False),
}


def assert_same(back: Any, view: Any) -> None:
    if isinstance(view, pd.Series):
        pd.testing.assert_series_equal(back, view, check_exact=True, check_freq=True)
    else:
        pd.testing.assert_frame_equal(back, view, check_exact=True, check_freq=True)
    assert type(back) is type(view)
    assert back.attrs == view.attrs
    assert back.flags.allows_duplicate_labels == view.flags.allows_duplicate_labels


@pytest.fixture(scope="module")
def spawned():
    """Two ``spawn`` workers shared by this file's tests (starting them is the slow part)."""
    p = mp.get_context("spawn").Pool(2)
    try:
        yield p
    finally:
        p.terminate()
        p.join()


def test_views_pickle_small_and_map_the_same_pages_in_a_spawned_worker(spawned, cache_dir):
    tasks, want = [], []
    for index in ("range", "datetime", "multi"):
        mmcache.save(zoo(index), index, cache_dir=cache_dir)
        df = mmcache.open(index, cache_dir=cache_dir)
        for kind, (make, copied) in VIEWS.items():
            if copied and writes_in_place():
                continue  # pandas 2 without copy-on-write copies these: not views
            view = make(df)
            payload = pickle.dumps(view)
            assert REF in payload and len(payload) <= 1024, (index, kind, len(payload))
            assert_same(pickle.loads(payload), view)
            tasks.append((view, str(cache_dir)))
            want.append((index, kind, view))
        s = zoo(index)["s"].iloc[: ROWS // 2]
        mmcache.save(s, f"{index}-series", cache_dir=cache_dir)
        view = mmcache.open(f"{index}-series", cache_dir=cache_dir).iloc[100:200]
        assert len(pickle.dumps(view)) <= 1024
        tasks.append((view, str(cache_dir)))
        want.append((index, "saved Series rows", view))
    results = spawned.map_async(_workers.view_task, tasks, chunksize=1).get(WAIT)
    for (index, kind, view), got in zip(want, results, strict=True):
        assert got["zero_copy"], (index, kind)
        assert_same(got["copy"], view)


def _swap_categories(df: pd.DataFrame) -> pd.Series:
    """The same mapped codes under other categories."""
    s = df["cat"].iloc[1:20]
    cats = pd.Categorical.from_codes(s.array.codes, dtype=pd.CategoricalDtype(list("RGBY")))
    out = pd.Series(cats, index=s.index, name="cat", copy=False)
    out.attrs = dict(s.attrs)
    return out


def _move_range_index(df: pd.DataFrame) -> pd.DataFrame:
    out = df.iloc[5:10]
    return out.set_axis(pd.RangeIndex(1000, 1005))


def _relabel(df: pd.DataFrame) -> pd.DataFrame:
    out = df.iloc[:, [0, 1]]
    out.columns = ["b", "a"]
    return out


def _edited(df: pd.DataFrame) -> pd.DataFrame:
    out = df.iloc[10:20]
    out.iloc[0, 0] = -1.0
    return out


def _attrs(df: pd.DataFrame) -> pd.DataFrame:
    out = df.iloc[10:20]
    out.attrs["source"] = "other"
    return out


def _index_renamed(df: pd.DataFrame) -> pd.DataFrame:
    out = df.iloc[10:20]
    out.index = out.index.rename("other")
    return out


# Derived by something else than a row range or a column subset: pickled in full.
NOT_VIEWS: dict[str, Callable[[pd.DataFrame], Any]] = {
    "filter": lambda df: df[df["a"] > 0.5],
    "sort": lambda df: df.sort_values("a"),
    "step slice": lambda df: df.iloc[::2],
    "reversed rows": lambda df: df.iloc[::-1],
    "take rows": lambda df: df.iloc[[5, 3, 4]],
    "renamed columns": lambda df: df.iloc[1:9].rename(columns={"a": "z"}),
    "relabelled columns": _relabel,
    "new index": lambda df: df.iloc[1:4].set_axis([7, 8, 9]),
    "index renamed": _index_renamed,
    "astype": lambda df: df[["j"]].iloc[1:9].astype("int32"),
    "computed": lambda df: df["a"].iloc[1:9] * 1,
    "edited": _edited,
    "attrs changed": _attrs,
    "tz_convert": lambda df: df["t"].iloc[1:9].dt.tz_convert("UTC"),
    "tz_localize(None)": lambda df: df["t"].iloc[1:9].dt.tz_localize(None),
    "categories renamed": lambda df: df["cat"].iloc[1:20].cat.rename_categories(list("RGBY")),
    "categories swapped": _swap_categories,
    "string dtype changed": lambda df: df["s"].iloc[1:9].astype("string[pyarrow]"),
    "range index moved": _move_range_index,
    "flags": lambda df: df.iloc[1:9].set_flags(allows_duplicate_labels=False),
    "column added": lambda df: df.iloc[1:9].assign(z=1),
    "series renamed": lambda df: df["a"].iloc[1:9].rename("z"),
    "concat": lambda df: pd.concat([df.iloc[:3], df.iloc[10:13]]),
    "head": lambda df: df.head(20) if not writes_in_place() else df.iloc[[0, 1]],
}


# These keep a mapped buffer of the entry on pandas 3 (only what pandas says about it
# differs): only the comparison of everything but the buffers tells them from views.
SHARING = {"renamed columns", "relabelled columns", "new index", "index renamed",
           "attrs changed", "tz_convert", "categories swapped", "range index moved", "flags",
           "series renamed", "string dtype changed"}


@pytest.mark.parametrize("kind", list(NOT_VIEWS))
def test_other_derived_frames_pickle_in_full_and_exactly(kind, cache_dir):
    mmcache.save(zoo("range" if kind == "range index moved" else "datetime"), "k",
                 cache_dir=cache_dir)
    df = mmcache.open("k", cache_dir=cache_dir)
    derived = NOT_VIEWS[kind](df)
    if kind in SHARING and not _pd.PANDAS_2:
        ranges = maps_under(cache_dir)
        cols = [derived] if isinstance(derived, pd.Series) else [
            derived.iloc[:, i] for i in range(derived.shape[1])]
        assert any(s <= a < e for c in cols for a, _ in array_buffers(c._values)
                   for s, e, _ in ranges), kind
    payload = pickle.dumps(derived)
    assert REF not in payload, kind
    assert_same(pickle.loads(payload), derived)


def test_a_view_whose_parent_is_edited_in_place_pickles_what_it_shows(cache_dir):
    """pandas 2 without copy-on-write writes the edit into the pages the view shares:
    then the view shows it and must pickle in full; with copy-on-write the parent copies its
    column and the view still is the file's data."""
    mmcache.save(zoo("range"), "k", cache_dir=cache_dir)
    df = mmcache.open("k", cache_dir=cache_dir)
    view = df.iloc[10:20]
    df.iloc[12, 0] = -1.0
    assert (view.iloc[2, 0] == -1.0) == writes_in_place()
    payload = pickle.dumps(view)
    assert (REF in payload) != writes_in_place()
    assert_same(pickle.loads(payload), view)


def test_a_view_of_a_resaved_version_keeps_its_data_or_says_it_is_gone(cache_dir):
    original = zoo("range")
    mmcache.save(original, "k", cache_dir=cache_dir)
    df = mmcache.open("k", cache_dir=cache_dir)
    view = df.iloc[100:200][["a", "s"]] if not writes_in_place() else df.iloc[100:200]
    mmcache.save(zoo("range").assign(a=0.0), "k", cache_dir=cache_dir)
    payload = pickle.dumps(view)
    assert REF in payload
    assert_same(pickle.loads(payload), view)  # the version it was cut from, not the new one
    del df, view
    gc.collect()
    # Nobody maps that version now: the delete removes its files, and the reference says so.
    mmcache.delete("k", cache_dir=cache_dir)
    assert not any(p.is_dir() for p in cache_dir.iterdir())
    with pytest.raises(mmcache.EntryChangedError, match="'k'"):
        pickle.loads(payload)


def test_a_gone_view_fails_its_pool_task_not_the_pool(spawned, cache_dir):
    """Unpickled in a Pool worker, a view of a version that is gone raises EntryChangedError
    as the task's own error (raising while the worker reads its task would hang the map)."""
    from . import _trust_workers as tw

    mmcache.save(pd.DataFrame({"x": np.arange(50.0)}), "k", cache_dir=cache_dir)
    payload = pickle.dumps(mmcache.open("k", cache_dir=cache_dir).iloc[10:20])
    assert REF in payload
    gc.collect()
    mmcache.delete("k", cache_dir=cache_dir)
    result = spawned.map_async(tw.sum_column, [tw.Deferred(payload)] * 2, chunksize=1)
    with pytest.raises(mmcache.EntryChangedError, match="'k'"):
        result.get(WAIT)
    mmcache.save(pd.DataFrame({"x": np.arange(50.0)}), "k", cache_dir=cache_dir)
    view = mmcache.open("k", cache_dir=cache_dir).iloc[10:20]
    assert spawned.map(tw.sum_column, [view]) == [float(np.arange(10.0, 20.0).sum())]


def test_chunked_pool_map_over_an_opened_frame_matches_the_plain_frame(spawned, cache_dir):
    plain = _workers.make_mixed_frame(20_000, seed=9)
    mmcache.save(plain, "k", cache_dir=cache_dir)
    df = mmcache.open("k", cache_dir=cache_dir)
    n = 3_000
    chunks = [df.iloc[i : i + n] for i in range(0, len(df), n)]
    assert all(len(pickle.dumps(c)) <= 1024 for c in chunks)
    assert len(pickle.dumps(plain.iloc[:n])) > 100 * 1024  # what a plain chunk ships
    got = spawned.map_async(_workers.chunk_task, chunks, chunksize=1).get(WAIT)
    assert got == [_workers.chunk_task(plain.iloc[i : i + n]) for i in range(0, len(plain), n)]


def test_plain_frames_and_views_of_other_memory_pickle_as_pandas_does(cache_dir):
    """Frames over memory that is not a cache mapping never become references, also while
    some entry is mapped (the hook looks up every pickled frame's buffers)."""
    mmcache.save(zoo("range"), "k", cache_dir=cache_dir)
    df = mmcache.open("k", cache_dir=cache_dir)
    plain = zoo("range")
    for obj in (plain, plain.iloc[10:20], plain["a"], df.copy(), df.iloc[5:9].copy()):
        payload = pickle.dumps(obj)
        assert REF not in payload
        assert_same(pickle.loads(payload), obj)
    assert maps_under(cache_dir) and array_buffers(df["a"]._values)


def test_a_failing_view_check_pickles_the_data(cache_dir, monkeypatch):
    """Whatever goes wrong while recognising a view (here: its entry cannot be read), the
    frame still pickles, in full."""
    from mmcache import _views

    mmcache.save(zoo("range"), "k", cache_dir=cache_dir)
    view = mmcache.open("k", cache_dir=cache_dir).iloc[3:30]

    def broken(*args: Any) -> Any:
        raise OSError("unreadable")

    monkeypatch.setattr(_views, "_full", broken)
    payload = pickle.dumps(view)
    assert REF not in payload
    assert_same(pickle.loads(payload), view)
