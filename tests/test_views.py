"""Row ranges and column subsets of an opened frame pickle as references (README "Chunks and
views"); anything else derived from it pickles in full, and a view never arrives as other data.

A reference pickles to a call of ``mmcache._frame._reopen``: a payload without that name
carries the data itself. Round trips are compared with pandas' strict helpers, so a
reference that rebuilt other data (another dtype, time zone, categories, labels, rows)
fails here even when the payload looks right.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmcache
from mmcache import _compat
from mmcache._compat import writes_in_place
from tests import _pd, examples

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


def test_a_view_a_worker_cannot_open_goes_on_as_that_view(cache_dir):
    """Found by an attack: in a worker that cannot open a view's version (here: out of
    descriptors), the stand-in it unpickles to pickled again as a reference to the whole
    frame, so a task handing it back gave the parent the whole frame. It is the view's own
    reference: the parent, which can open the version, gets the view back."""
    mmcache.save(pd.DataFrame({"a": np.arange(8.0), "b": np.arange(8) * 10}), "k",
                 cache_dir=cache_dir)
    df = mmcache.open("k", cache_dir=cache_dir)
    views = [df.iloc[2:5], df["b"].iloc[1:4]]
    if not writes_in_place():  # (pandas 2 without copy-on-write copies column subsets)
        views.append(df.iloc[2:5][["b"]])
    pool = mp.get_context("spawn").Pool(1, initializer=_workers.exhaust_descriptors)
    try:
        for view in views:
            assert REF in pickle.dumps(view)
            back = pool.apply_async(_workers.echo, (view,)).get(WAIT)
            assert_same(back, view)
    finally:
        pool.terminate()
        pool.join()


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


def test_pickling_looks_at_a_few_of_many_mappings(cache_dir, monkeypatch):
    """Found by an attack: with 500 entries open, every frame pickled in the process paid
    ~0.4 ms, as looking up its buffers sorted every live mapping each time. A lookup now
    reads O(log n) of them: here at most a handful of 200."""
    from mmcache import _mmap

    held = []
    for i in range(100):
        mmcache.save(pd.DataFrame({"a": np.arange(3.0), "b": np.arange(3)}), f"k{i}",
                     cache_dir=cache_dir)
        held.append(mmcache.open(f"k{i}", cache_dir=cache_dir))
    reads = 0

    def counted(name: str) -> property:
        slot = _mmap._Region.__dict__[name]

        def get(region: Any) -> Any:
            nonlocal reads
            reads += 1
            return slot.__get__(region)

        return property(get, slot.__set__)

    plain = pd.DataFrame({"a": np.arange(5.0), "b": np.arange(5)})
    views = [held[50].iloc[1:3], held[7]["a"], held[99].iloc[:2]]
    for name in ("address", "size"):
        monkeypatch.setattr(_mmap._Region, name, counted(name))
    for obj, is_view in [(plain, False), (plain["a"], False), *((v, True) for v in views)]:
        reads = 0
        payload = pickle.dumps(obj)
        assert (REF in payload) == is_view
        assert reads <= 40, reads
        assert_same(pickle.loads(payload), obj)


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


# --- labels: nothing shared, nothing taken as equal that the receiver would rebuild otherwise


def _labelled() -> pd.DataFrame:
    """Labels of every kind mmcache rebuilds from JSON or maps: object column labels,
    categories, a string index."""
    n = 40
    df = pd.DataFrame({
        "x": np.arange(n, dtype=np.float64),
        "cat": pd.Categorical.from_codes(np.arange(n) % 3, categories=["lo", "mid", "hi"]),
        ("t", 1): np.arange(n, dtype=np.int64),
    }, index=pd.Index([f"r{i}" for i in range(n)], name="row"))
    df.columns.name = "col"
    return df


def _labels(df: pd.DataFrame) -> list[Any]:
    cats = df["cat"].cat.categories
    return [list(df.index), df.index.name, list(df.columns), df.columns.name, list(cats),
            cats.name]


def _cat_name(df: pd.DataFrame) -> None:
    df["cat"].cat.categories.name = "renamed"


def _cat_rename_inplace(df: pd.DataFrame) -> None:
    df["cat"].cat.categories.rename("renamed", inplace=True)


def _index_rename_inplace(df: pd.DataFrame) -> None:
    df.index.rename("renamed", inplace=True)


def _columns_name(df: pd.DataFrame) -> None:
    df.columns.name = "renamed"


def _index_array(df: pd.DataFrame) -> None:
    df.index.array[0] = "changed"


def _columns_array(df: pd.DataFrame) -> None:
    df.columns.array[0] = "changed"


def _categories_array(df: pd.DataFrame) -> None:
    df["cat"].cat.categories.array[0] = "changed"


IN_PLACE: dict[str, Callable[[pd.DataFrame], None]] = {
    "categories name": _cat_name,
    "categories rename inplace": _cat_rename_inplace,
    "index rename inplace": _index_rename_inplace,
    "columns name": _columns_name,
    "index array": _index_array,
    "columns array": _columns_array,
    "categories array": _categories_array,
}


@pytest.mark.parametrize("edit", list(IN_PLACE))
def test_labels_changed_in_place_reach_no_other_frame_and_pickle_as_they_are(edit, cache_dir):
    """Found by an attack on the first round: an opened frame's categories were the
    process's cached base's, so renaming them in place reached every later open, and a
    reference then rebuilt other labels in the receiver. pandas 2 with copy-on-write also
    let ``Index.array[i] = x`` write into label arrays."""
    original = _labelled()
    mmcache.save(original, "k", cache_dir=cache_dir)
    df = mmcache.open("k", cache_dir=cache_dir)
    # refused (read-only labels) is fine, as long as nothing changed elsewhere
    with contextlib.suppress(ValueError, TypeError, RuntimeError):
        IN_PLACE[edit](df)
    for again in (mmcache.open("k", cache_dir=cache_dir), mmcache.open("k", cache_dir=cache_dir)):
        assert _labels(again) == _labels(original), edit
    for obj in (df, df.iloc[3:9], df[["cat", "x"]], df["cat"], df.iloc[2:5]["cat"]):
        back = pickle.loads(pickle.dumps(obj))
        assert_same(back, obj)
        if isinstance(obj, pd.Series):
            assert back.cat.categories.name == obj.cat.categories.name
        else:
            assert back["cat"].cat.categories.name == obj["cat"].cat.categories.name
    changed = _labels(df) != _labels(original)
    assert (REF in pickle.dumps(df)) != changed, edit


def _columns_set_names(df: pd.DataFrame) -> None:
    df.columns.set_names(["renamed"], inplace=True)


@pytest.mark.parametrize("edit", [*IN_PLACE, "columns set_names"])
def test_labels_changed_in_place_on_a_received_view_reach_no_other_frame(edit, cache_dir):
    """Found by an attack: on pandas 2 with copy-on-write, a row range keeps its frame's
    columns Index (``df.iloc[a:b].columns is df.columns``), so a chunk unpickled in a process
    shared its column labels with that process's decoded version: renaming them reached
    every later open, whose references then arrived with the old name. Each unpickled view
    owns its label objects."""
    change = _columns_set_names if edit == "columns set_names" else IN_PLACE[edit]
    original = _labelled()
    mmcache.save(original, "k", cache_dir=cache_dir)
    df = mmcache.open("k", cache_dir=cache_dir)
    views = [df.iloc[0:5], df[2:], df.iloc[:, :]]
    if not writes_in_place():  # (pandas 2 without copy-on-write copies column subsets)
        views += [df[["cat", "x"]]]
    for view in views:
        payload = pickle.dumps(view)
        assert REF in payload
        received = pickle.loads(payload)
        with contextlib.suppress(ValueError, TypeError, RuntimeError):
            change(received)
        for again in (mmcache.open("k", cache_dir=cache_dir), df):
            assert _labels(again) == _labels(original), edit
            for obj in (again, again.iloc[1:4]):
                back = pickle.loads(pickle.dumps(obj))
                assert _labels(back) == _labels(obj), edit
        back = pickle.loads(pickle.dumps(received))  # its own labels, edited or not
        assert _full_labels(back) == _full_labels(received), edit


def test_names_set_on_a_received_view_of_multiindex_labels_stay_in_it(cache_dir):
    """The same with MultiIndex columns and a row index of labels (the attack's variant)."""
    f = pd.DataFrame(np.arange(12.0).reshape(4, 3), columns=pd.MultiIndex.from_tuples(
        [("A", 1), ("A", 2), ("B", 1)], names=["L0", "L1"]),
        index=pd.Index([10, 20, 30, 40], name="ix"))
    mmcache.save(f, "k", cache_dir=cache_dir)
    df = mmcache.open("k", cache_dir=cache_dir)

    def names(obj: pd.DataFrame) -> Any:
        return list(obj.columns.names), obj.index.name

    edits = [lambda c: setattr(c.columns, "names", ["X", "Y"]),
             lambda c: c.columns.set_names(["P", "Q"], inplace=True),
             lambda c: setattr(c.index, "name", "Z")]
    for edit in edits:
        chunk = pickle.loads(pickle.dumps(df.iloc[0:2]))
        edit(chunk)
        later = mmcache.open("k", cache_dir=cache_dir)
        assert names(later) == names(f)
        for obj in (later, later.iloc[1:3], chunk):
            assert names(pickle.loads(pickle.dumps(obj))) == names(obj)


def _label_arrays(obj: Any) -> list[tuple[str, np.ndarray]]:
    """Every numpy array behind an object's labels: axes, MultiIndex levels and codes,
    categories."""
    out: list[tuple[str, np.ndarray]] = []

    def walk(index: pd.Index, what: str) -> None:
        if isinstance(index, pd.RangeIndex):
            return
        if isinstance(index, pd.MultiIndex):
            for i, level in enumerate(index.levels):
                walk(level, f"{what} level {i}")
            out.extend((f"{what} codes {i}", c) for i, c in enumerate(index.codes))
            return
        values = index._values
        for arr in (values, getattr(values, "_ndarray", None), getattr(values, "_codes", None)):
            if isinstance(arr, np.ndarray):
                out.append((what, arr))

    walk(obj.index, "index")
    walk(obj.columns, "columns")
    for i in range(obj.shape[1]):
        if isinstance(obj.dtypes.iloc[i], pd.CategoricalDtype):
            walk(obj.iloc[:, i].cat.categories, f"column {i} categories")
    return out


def test_label_arrays_cannot_be_made_writable(cache_dir):
    """Found by an attack (low): label arrays built from JSON (object column labels and row
    index, object categories on pandas 2) were read-only by a flag that
    ``arr.flags.writeable = True`` undid, as they owned their memory, and a write then
    reached every later open of the version in the process. numpy now refuses the flag
    (pandas 2 without copy-on-write: each open has labels of its own anyway)."""
    f = pd.DataFrame({"a": np.arange(4.0), 7: np.arange(4),
                      "c": pd.Categorical([10, 20, 10, 20]),
                      "o": pd.Categorical(np.array(["x", "y", "x", "y"], dtype=object))},
                     index=pd.Index([1, "a", 2.5, None], dtype=object, name="ix"))
    g = pd.DataFrame(np.arange(12.0).reshape(4, 3), columns=pd.MultiIndex.from_tuples(
        [("A", 1), ("A", 2), ("B", 1)]), index=pd.MultiIndex.from_arrays(
        [[1, 1, 2, 2], ["a", "b", "a", "b"]]))
    for key, frame in (("f", f), ("g", g)):
        mmcache.save(frame, key, cache_dir=cache_dir)
        df = mmcache.open(key, cache_dir=cache_dir)
        view = pickle.loads(pickle.dumps(df.iloc[1:3]))
        arrays = _label_arrays(df) + _label_arrays(view)
        assert key == "g" or any(arr.dtype == object for _, arr in arrays)
        saved = _full_labels(df)
        for what, arr in arrays:
            try:
                arr.flags.writeable = True
            except ValueError:
                assert not arr.flags.writeable, (key, what)
                continue
            # pandas 2 without copy-on-write: each open decodes its own labels over its
            # own private mapping; writing into them changes that frame only
            assert writes_in_place(), (key, what)
            arr[0] = "changed" if arr.dtype == object else arr[-1]
        assert _full_labels(mmcache.open(key, cache_dir=cache_dir)) == saved


# name -> (what the entry holds, a label equal to it that the receiver would not rebuild)
EQUAL_NOT_SAME = {
    "-0.0": (0.0, -0.0),
    "NaT for NaN": (np.nan, pd.NaT),
    "True for 1": (1, True),
    "tuple (True,)": (("a", 1), ("a", True)),
    "float for int": (1, 1.0),
}


@pytest.mark.parametrize("kind", list(EQUAL_NOT_SAME))
def test_labels_equal_but_not_the_same_pickle_in_full(kind, cache_dir):
    stored, other = EQUAL_NOT_SAME[kind]
    df = pd.DataFrame({"x": np.arange(10.0), "y": np.arange(10)})
    df.index.name = stored
    mmcache.save(df, "k", cache_dir=cache_dir)
    opened = mmcache.open("k", cache_dir=cache_dir)
    assert REF in pickle.dumps(opened)
    for make in (lambda d: d, lambda d: d.iloc[2:5], lambda d: d[["y"]], lambda d: d["x"]):
        obj = make(mmcache.open("k", cache_dir=cache_dir))
        obj.index.name = other
        payload = pickle.dumps(obj)
        assert REF not in payload, kind
        back = pickle.loads(payload)
        assert type(back.index.name) is type(other)
        assert repr(back.index.name) == repr(other)
    view = mmcache.open("k", cache_dir=cache_dir)["x"]
    view.name = 0.0 if kind != "-0.0" else -0.0
    assert REF not in pickle.dumps(view)


def test_a_one_column_frame_and_its_column_are_references(cache_dir):
    """Found by the attack: ``df[["a"]]`` and ``df["a"]`` of a one-column entry pickled in
    full."""
    mmcache.save(pd.DataFrame({"a": np.arange(100.0)}), "k", cache_dir=cache_dir)
    df = mmcache.open("k", cache_dir=cache_dir)
    views = [df["a"], df["a"].iloc[5:9]]
    if not writes_in_place():  # pandas 2 without copy-on-write copies column subsets
        views += [df[["a"]], df.iloc[5:9, [0]]]
    for obj in views:
        payload = pickle.dumps(obj)
        assert REF in payload and len(payload) <= 1024
        assert_same(pickle.loads(payload), obj)


# --- property: view kinds x modifications ---------------------------------------------


def _small_zoo() -> pd.DataFrame:
    df = _labelled()
    n = len(df)
    df["n"] = pd.array(np.where(np.arange(n) % 7 == 0, None, np.arange(n)), dtype="Int64")
    df["t"] = pd.date_range("2024-01-01", periods=n, freq="min", tz="Europe/Paris")
    df["s"] = pd.Series([f"s{i}" for i in range(n)], index=df.index, dtype=_pd.STR)
    df["y"] = np.arange(n, dtype=np.float64) / 3
    df.attrs = {"source": "zoo"}
    return df


def _mod_index_name(obj: Any) -> Any:
    obj.index.name = "other"
    return obj


def _mod_rename(obj: Any) -> Any:
    if isinstance(obj, pd.Series):
        return obj.rename("other")
    return obj.rename(columns={obj.columns[0]: "other"})


def _mod_edit(obj: Any) -> Any:
    with warnings.catch_warnings():
        # pandas 2 without copy-on-write warns that the edit goes to a copy of a column
        # subset (df.iloc[:, [0]]), as for any frame: the edit is the point here
        copy_warning = getattr(pd.errors, "SettingWithCopyWarning", None)  # (not pandas 3)
        if copy_warning is not None:
            warnings.simplefilter("ignore", copy_warning)
        if isinstance(obj, pd.Series):
            obj.iloc[0] = obj.iloc[-1]  # may equal the old value: still an edit (a copy)
        else:
            obj.iloc[0, 0] = obj.iloc[-1, 0]
    return obj


def _mod_attrs(obj: Any) -> Any:
    obj.attrs["source"] = "other"
    return obj


def _mod_categories(obj: Any) -> Any:
    columns = [obj] if isinstance(obj, pd.Series) else [
        obj.iloc[:, i] for i in range(obj.shape[1])]
    cats = [c for c in columns if isinstance(c.dtype, pd.CategoricalDtype)]
    if not cats:
        return None  # nothing to rename: not this case
    cats[0].cat.categories.name = "other"
    return obj


MODS: dict[str, Callable[[Any], Any] | None] = {
    "none": None,
    "index name": _mod_index_name,
    "renamed": _mod_rename,
    "edited": _mod_edit,
    "attrs": _mod_attrs,
    "categories name": _mod_categories,
}


def _full_labels(obj: Any) -> Any:
    out: list[Any] = [repr(obj.index.name), list(obj.index), repr(obj.attrs)]
    series = [obj] if isinstance(obj, pd.Series) else [obj.iloc[:, i] for i in range(obj.shape[1])]
    out += [repr(obj.name) if isinstance(obj, pd.Series) else list(obj.columns)]
    for s in series:
        if isinstance(s.dtype, pd.CategoricalDtype):
            out.append((list(s.cat.categories), s.cat.categories.name))
    return out


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_views_and_their_modifications_round_trip_exactly(cache_dir, data):
    """Any row range and any column subset (reordered, repeated), or a column, of an opened
    frame, modified or not: pickled and unpickled it is exactly what was pickled; a
    reference exactly when unmodified; and no later open sees the modification."""
    original = _small_zoo()
    if not mmcache.exists("z", cache_dir=cache_dir):
        mmcache.save(original, "z", cache_dir=cache_dir)
    df = mmcache.open("z", cache_dir=cache_dir)
    n, ncols = df.shape
    a = data.draw(st.integers(0, n - 1), label="a")
    b = data.draw(st.integers(a + 1, n), label="b")
    kind = data.draw(st.sampled_from(["rows", "columns", "rows+columns", "column"]), label="kind")
    cols = data.draw(st.lists(st.integers(0, ncols - 1), min_size=1, max_size=2 * ncols),
                     label="cols")
    if kind == "rows":
        obj = df.iloc[a:b]
    elif kind == "column":
        obj = df.iloc[a:b, cols[0]]
    else:
        obj = df.iloc[:, cols] if kind == "columns" else df.iloc[a:b, cols]
    mod = data.draw(st.sampled_from(list(MODS)), label="mod")
    change = MODS[mod]
    if change is not None:
        changed = change(obj)
        if changed is None:
            return
        obj = changed
    payload = pickle.dumps(obj)
    back = pickle.loads(payload)
    assert_same(back, obj)
    assert _full_labels(back) == _full_labels(obj)
    if mod != "none":
        assert REF not in payload
    elif not writes_in_place() and len(set(cols)) == len(cols):
        assert REF in payload and len(payload) <= 1024  # (repeated columns: pandas copies)
    # the parent, whatever the view's modification did to it, and the next open
    back = pickle.loads(pickle.dumps(df))
    assert_same(back, df)
    assert _full_labels(back) == _full_labels(df)
    assert _full_labels(mmcache.open("z", cache_dir=cache_dir)) == _full_labels(original)


# --- wide frames: references within 1 KB, recognition independent of the width ----------

WIDE = 1_000


@pytest.fixture
def wide(cache_dir):
    """A frame of WIDE nullable columns (a block each, as pandas keeps extension columns):
    column subsets of it are views in any order."""
    df = pd.DataFrame({f"c{i}": pd.array([i, None, 2], dtype="Int64") for i in range(WIDE)})
    mmcache.save(df, "wide", cache_dir=cache_dir)
    return mmcache.open("wide", cache_dir=cache_dir)


@pytest.mark.skipif("writes_in_place()", reason="pandas 2 without copy-on-write copies "
                    "column subsets: not views")
def test_column_subsets_of_a_wide_frame_pickle_within_1kb_or_in_full(wide):
    """Found by the attack: a reference listed its column runs one by one and passed 1 KB
    past ~150 runs. Subsets are now encoded compactly; a subset no encoding can fit (a
    random permutation of 1,000 columns needs far more than 1 KB) pickles in full."""
    rng = np.random.default_rng(3)
    must = {
        "every other": np.arange(0, WIDE, 2),
        "reversed": np.arange(WIDE)[::-1],
        "every third, reversed": np.arange(0, WIDE, 3)[::-1],
        "100 at random, in order": np.sort(rng.choice(WIDE, 100, replace=False)),
        "950 at random, in order": np.sort(rng.choice(WIDE, 950, replace=False)),
        "runs of 50, shuffled": (rng.permutation(WIDE // 50)[:, None] * 50
                                 + np.arange(50)).ravel(),
    }
    for name, cols in must.items():
        view = wide.iloc[1:3, cols]
        # the bound holds under each protocol (0 and 2 wrote the encoding's bytes longer)
        for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
            payload = pickle.dumps(view, protocol=protocol)
            assert REF in payload and len(payload) <= 1024, (name, protocol, len(payload))
        assert_same(pickle.loads(payload), view)
    for cols in (rng.permutation(WIDE), rng.choice(WIDE, 500, replace=False)):
        view = wide.iloc[:, cols]
        payload = pickle.dumps(view)
        assert REF not in payload
        assert_same(pickle.loads(payload), view)


def test_recognising_a_view_of_one_wide_block_looks_at_the_block(cache_dir, monkeypatch):
    """Found by an attack: a row range of a 10,000-column float frame took 120-200 ms to
    pickle (a check per column, though the columns form one 2-D block). The block is now
    placed and compared as one array: a bounded number of array checks whatever the width."""
    from mmcache import _views

    mmcache.save(pd.DataFrame(np.arange(5.0 * WIDE).reshape(5, WIDE),
                              columns=[f"c{i}" for i in range(WIDE)]), "w", cache_dir=cache_dir)
    df = mmcache.open("w", cache_dir=cache_dir)
    views = [df.iloc[2:5], df[1:], df["c7"], df.iloc[1:3]["c999"]]
    if not writes_in_place():  # (pandas 2 without copy-on-write copies column ranges)
        views += [df.iloc[1:4, 10:900], df.loc[:, "c3":"c500"]]
    for view in views:
        pickle.dumps(view)  # the first builds the version's index
    calls = 0

    def counting(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            return real(*args)

        return call

    for name in ("_row0", "_same_array", "_same_memory"):
        monkeypatch.setattr(_views, name, counting(getattr(_views, name)))
    for view in views:
        calls = 0
        payload = pickle.dumps(view)
        assert REF in payload
        assert calls <= 20, calls
        assert_same(pickle.loads(payload), view)


def test_recognising_a_column_does_not_look_at_the_others(wide, monkeypatch):
    """Found by the attack: recognition compared every column of the version with every
    column of the view (one Series of a 10,000-column frame: 74 ms). Now it looks up the
    view's own columns in an index built once per version."""
    from mmcache import _views

    pickle.dumps(wide["c1"])  # builds the index
    calls = 0
    real = _views._row0

    def counting(values: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(values)

    monkeypatch.setattr(_views, "_row0", counting)
    for label in ("c0", "c500", "c999"):
        calls = 0
        payload = pickle.dumps(wide[label].iloc[1:])
        assert REF in payload
        assert calls <= 4, calls
    if not writes_in_place():  # (pandas 2 without copy-on-write copies column ranges)
        calls = 0
        assert REF in pickle.dumps(wide.iloc[:, 10:20])
        assert calls <= 4 * 10, calls


def test_a_plain_frame_pickles_when_the_view_check_cannot_even_be_imported(monkeypatch):
    """A spawn worker out of descriptors cannot import the view check (attack: the pool
    hung as the worker died returning a plain frame); the frame pickles in full."""
    import sys

    df = pd.DataFrame({"a": np.arange(5)})
    monkeypatch.setitem(sys.modules, "mmcache._views", None)  # importing it raises
    pd.testing.assert_frame_equal(pickle.loads(pickle.dumps(df)), df)


def test_category_names_and_freqs_set_on_one_opened_frame_reach_no_later_open(cache_dir):
    """Third attack: `df.index.categories.name = x` on a CategoricalIndex (pandas 3; pandas 2
    with copy-on-write) and `df.index.freq = "D"` on an index saved without a freq (pandas 2
    with copy-on-write) renamed or set them on what every later open shares."""
    cat = pd.DataFrame({"x": np.arange(4)}, index=pd.CategoricalIndex(list("abab")))
    days = pd.DataFrame({"x": np.arange(4)},
                        index=pd.DatetimeIndex(pd.date_range("2024-01-01", periods=4),
                                               freq=None))
    mmcache.save(cat, "cat", cache_dir=cache_dir)
    mmcache.save(days, "days", cache_dir=cache_dir)
    df = mmcache.open("cat", cache_dir=cache_dir)
    df.index.categories.name = "renamed"
    assert mmcache.open("cat", cache_dir=cache_dir).index.categories.name is None
    df = mmcache.open("days", cache_dir=cache_dir)
    df.index.freq = "D"
    assert mmcache.open("days", cache_dir=cache_dir).index.freq is None


def _axis_marks(obj: Any) -> list[Any]:
    """What an in-place edit of an axis or of categories can set: freqs, categories' names
    and freqs (of CategoricalIndex axes and categorical columns), MultiIndex levels' freqs."""
    axes = [obj.index] + ([obj.columns] if isinstance(obj, pd.DataFrame) else [])
    out: list[Any] = []
    for index in axes:
        if isinstance(index, pd.MultiIndex):
            out.append(("sortorder", index.sortorder))
        for level in index.levels if isinstance(index, pd.MultiIndex) else [index]:
            if isinstance(level, pd.CategoricalIndex):
                out.append((level.categories.name, getattr(level.categories, "freq", None)))
            else:
                out.append(getattr(level, "freq", None))
    columns = [obj] if isinstance(obj, pd.Series) else [obj.iloc[:, i]
                                                       for i in range(obj.shape[1])]
    for s in columns:
        if isinstance(s.dtype, pd.CategoricalDtype):
            out.append((s.cat.categories.name, getattr(s.cat.categories, "freq", None)))
    return out


_DAYS = pd.DatetimeIndex(pd.date_range("2024-01-01", periods=3).values)  # freq None
# name -> (frame, edit in place): third attack, findings 1 to 3, and a MultiIndex level's
# freq (the same hole one level down)
AXIS_EDITS: dict[str, tuple[Callable[[], pd.DataFrame], Callable[[pd.DataFrame], None]]] = {
    "CategoricalIndex categories name": (
        lambda: pd.DataFrame({"a": np.arange(6.0), "b": np.arange(6)},
                             index=pd.CategoricalIndex(list("xyzxyz"))),
        lambda df: setattr(df.index.categories, "name", "renamed")),
    "CategoricalIndex columns categories name": (
        lambda: pd.DataFrame(np.arange(12.0).reshape(4, 3),
                             columns=pd.CategoricalIndex(list("abc"))),
        lambda df: setattr(df.columns.categories, "name", "renamed")),
    "DatetimeIndex freq": (
        lambda: pd.DataFrame({"a": np.arange(3.0), "b": np.arange(3)}, index=_DAYS),
        lambda df: setattr(df.index, "freq", "D")),
    "TimedeltaIndex freq": (
        lambda: pd.DataFrame({"a": np.arange(3.0), "b": np.arange(3)},
                             index=pd.TimedeltaIndex(pd.to_timedelta(np.arange(3), "s").values)),
        lambda df: setattr(df.index, "freq", "s")),
    "datetime categories freq": (
        lambda: pd.DataFrame({"c": pd.Categorical(_DAYS.repeat(2)), "a": np.arange(6.0)}),
        lambda df: setattr(df["c"].cat.categories, "freq", "D")),
    "MultiIndex categorical level categories name": (
        lambda: pd.DataFrame({"a": np.arange(4.0), "b": np.arange(4)},
                             index=pd.MultiIndex.from_arrays([pd.CategoricalIndex(list("abab")),
                                                              np.arange(4)])),
        lambda df: setattr(df.index.levels[0].categories, "name", "renamed")),
    "MultiIndex level freq": (
        lambda: pd.DataFrame({"a": np.arange(6.0), "b": np.arange(6)},
                             index=pd.MultiIndex.from_arrays([_DAYS.repeat(2), np.arange(6)])),
        lambda df: setattr(df.index.levels[0], "freq", "D")),
    "MultiIndex sortorder": (  # fourth attack, finding 1
        lambda: pd.DataFrame({"a": np.arange(4.0), "b": np.arange(4)},
                             index=pd.MultiIndex.from_arrays([list("aabb"), np.arange(4)])),
        lambda df: setattr(df.index, "sortorder", 1)),
}


@pytest.mark.parametrize("edit", list(AXIS_EDITS))
def test_freqs_and_categories_names_set_in_place_make_a_frame_pickle_in_full(edit, cache_dir):
    """Third attack: `df.index.categories.name = x` (a CategoricalIndex, rows or columns),
    `df["c"].cat.categories.freq = x` and `df.index.levels[0].freq = x` left an opened frame
    pickling as a reference, which arrived without the edit (the unmodified check looked
    at none of them); on pandas 2 with copy-on-write `df.index.freq = x` (and a level's or
    datetime categories' freq) also reached later opens, whose references then arrived
    without it. Each frame and view arrives as it is; the edited frame pickles in full; a
    later open is untouched and still a reference."""
    make, change = AXIS_EDITS[edit]
    mmcache.save(make(), "k", cache_dir=cache_dir)
    df = mmcache.open("k", cache_dir=cache_dir)
    original = _axis_marks(df)
    change(df)
    assert _axis_marks(df) != original, edit  # the edit took
    later = mmcache.open("k", cache_dir=cache_dir)
    assert _axis_marks(later) == original, edit
    views = [df.iloc[1:3], df.iloc[:, :1], df.iloc[:, 0]]
    for obj in [df, *views, later, later.iloc[1:3], later.iloc[:, :1]]:
        back = pickle.loads(pickle.dumps(obj))
        assert _axis_marks(back) == _axis_marks(obj), edit
        assert_same(back, obj)
    assert REF not in pickle.dumps(df)
    assert REF in pickle.dumps(later)


@pytest.mark.skipif(not _compat.PANDAS_2, reason="pandas 3's datetime arrays have no freq")
def test_a_series_array_freq_set_in_place_never_reaches_a_later_open(cache_dir):
    """Fourth attack, finding 2: on pandas 2 a Series keeps its freq on the block's array
    itself; `s.array.freq = x` on an opened Series reached every later open with
    copy-on-write on. (Its reference arrives without the freq, as pandas' own pickle of a
    Series drops it.)"""
    mmcache.save(pd.Series(pd.date_range("2024-01-01", periods=12, freq="h"), name="s"), "k",
                 cache_dir=cache_dir)
    s = mmcache.open("k", cache_dir=cache_dir)
    assert s.array.freq is None
    s.array.freq = "h"
    assert s.array.freq == "h"
    later = mmcache.open("k", cache_dir=cache_dir)
    assert later.array.freq is None
    assert REF in pickle.dumps(later)


# (key, cache directory under the test's): names whose characters pickle protocols write in
# more than one byte (protocol 0: a 6- or 10-byte escape for anything not ASCII, and for
# backslashes and line breaks; protocols 1 to 5: 2 to 4 bytes of UTF-8)
NAMES = {
    "ascii, longest": ("k" * 200, "c"),
    "2-byte characters, longest": ("\u0416" * 200, "c"),
    "3-byte characters, longest": ("\u6f22" * 200, "c"),
    "4-byte characters, longest": ("\U0001f600" * 200, "c"),
    "4-byte characters": ("\U0001f600" * 100, "c"),
    "escaped ascii": ("a\\b\nc\rd\x1ae" * 20, "c"),
    "non-ascii directory": ("k", "d\u00efr-\U0001f600-" + "\u6f22" * 40),
}


@pytest.mark.parametrize("name", list(NAMES))
def test_a_view_reference_stays_within_1kb_under_every_pickle_protocol(name, cache_dir):
    """Third attack, finding 5: the 1 KB bound was checked under the highest protocol only;
    under protocol 0 (a 6- or 10-byte escape a non-ASCII character) a view of a key of 200
    emoji pickled as a 2.1 KB reference, and protocols 1 and 2 wrote the column encoding's
    bytes at up to twice their size. The key, the directory and the columns now go as ASCII
    (Base85 where they are not), and the bound holds under every protocol: a reference
    that would pass it (a key of 200 4-byte characters, ~1 KB of Base85) pickles in full.
    Each comes back as it was, and the realistic cases stay references."""
    key, sub = NAMES[name]
    where = cache_dir / sub
    # nullable columns, a block each: any subset of them is a view
    wide = pd.DataFrame({f"c{i}": pd.array(np.arange(20) + i, dtype="Int64") for i in range(200)})
    mmcache.save(wide, key, cache_dir=where)
    df = mmcache.open(key, cache_dir=where)
    rng = np.random.default_rng(0)
    views = {"rows": df.iloc[2:9], "column": df["c5"], "every 3rd column": df.iloc[2:9, ::3],
             "reversed columns": df.iloc[:, ::-1],
             "80 at random, in order": df.iloc[:, np.sort(rng.choice(200, 80, replace=False))]}
    fits = name != "4-byte characters, longest"
    for kind, view in views.items():
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            payload = pickle.dumps(view, protocol=protocol)
            # (other views may be copies, by pandas, or name too many columns to fit)
            if fits and kind in ("rows", "column"):
                assert REF in payload, (kind, protocol, len(payload))
            if not fits:
                assert REF not in payload, (kind, protocol, len(payload))
            if REF in payload:
                assert len(payload) <= 1024, (kind, protocol, len(payload))
            assert_same(pickle.loads(payload), view)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # a whole frame: the names unpacked
        assert_same(pickle.loads(pickle.dumps(df, protocol=protocol)), df)


def test_a_gone_reference_of_packed_names_says_which_key_and_directory(cache_dir):
    """A key and a directory packed as Base85 (not plain ASCII) come back as they were in
    the error of a reference whose version is gone, and in a Dask stand-in's repr."""
    from mmcache._frame import _Forward

    key, where = "cl\u00e9 \U0001f600\\", cache_dir / "d\u00efr"
    mmcache.save(pd.DataFrame({"x": np.arange(50.0)}), key, cache_dir=where)
    df = mmcache.open(key, cache_dir=where)
    payloads = [pickle.dumps(df, protocol=0), pickle.dumps(df.iloc[10:20], protocol=0)]
    assert all(REF in p for p in payloads)
    assert key.encode() not in payloads[1] and "\U0001f600".encode("raw_unicode_escape") \
        not in payloads[1]  # packed
    assert repr(key) in repr(_Forward(*_frame_args(df.iloc[10:20])))
    del df
    gc.collect()
    mmcache.delete(key, cache_dir=where)
    for payload in payloads:
        with pytest.raises(mmcache.EntryChangedError) as caught:
            pickle.loads(payload)
        assert caught.value.key == key and repr(key) in str(caught.value)
        assert repr(str(where)) in str(caught.value)


def _frame_args(obj: Any) -> tuple[Any, ...]:
    from mmcache._views import reference

    args = reference(obj)
    assert args is not None
    return args
