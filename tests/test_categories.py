"""Categorical columns of text categories, stored in groups (storage format 2).

Their codes form one 2-D block per codes dtype and their categories runs of one Arrow text
table (mmcache/_categories.py); every other categorical keeps its own spec. Each test builds
frames that mix both, so a column landing in the wrong place, or a group decoding the wrong
list of categories for a column, shows as a difference from the plain frame.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

import mmcache
from mmcache import _cache, _categories, _store
from mmcache._paths import entry_name
from tests import _pd
from tests._zerocopy import array_buffers, assert_zero_copy, maps_under

STR = _pd.STR  # pandas' Arrow-backed text with NaN: pandas 3's str
N = 40


def _text(words, dtype=STR) -> pd.Index:
    return pd.Index(words, dtype=dtype)


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)

    def cat(dtype, n_cats):
        codes = rng.integers(-1, n_cats, N)  # -1: missing
        return pd.Categorical.from_codes(codes, dtype=dtype)

    shared = pd.CategoricalDtype(_text(["x", "y", "z"]))
    many = [f"w{i}" for i in range(297)] + ["é", "日本", ""]  # 300: int16 codes
    cols = {
        "a": cat(shared, 3),
        "f": rng.standard_normal(N),
        "b": cat(shared, 3),  # the same categories as "a": stored once
        "rev": cat(pd.CategoricalDtype(_text(["z", "y", "x"])), 3),  # same words, other order
        "ord": cat(pd.CategoricalDtype(_text(["lo", "mid", "hi"]), ordered=True), 3),
        "wide": cat(pd.CategoricalDtype(_text(many)), 300),
        "c126": cat(pd.CategoricalDtype(_text([f"v{i}" for i in range(126)])), 126),  # int8
        "c127": cat(pd.CategoricalDtype(_text([f"v{i}" for i in range(127)])), 127),  # int16
        "none": pd.Categorical([None] * N, categories=_text([])),
        "na": cat(pd.CategoricalDtype(_text(["p", "q"], "string[pyarrow]")), 2),
        "num": pd.Categorical(rng.integers(0, 5, N)),  # number categories: their own spec
        "obj": cat(pd.CategoricalDtype(pd.Index(["o1", "o2"], dtype=object)), 2),
    }
    for i in range(60):  # many columns, each with its own categories
        cols[f"own{i}"] = cat(pd.CategoricalDtype(_text([f"c{i}-{k}" for k in range(5)])), 5)
    return pd.DataFrame(cols)


GROUPED = ({"a", "b", "rev", "ord", "wide", "c126", "c127", "none", "na"}
           | {f"own{i}" for i in range(60)})


def _meta(cache_dir, key="k") -> dict:
    return json.loads((cache_dir / f"{entry_name(key)}.json").read_text())


def _assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    _pd.assert_frame_equal(got, want)
    for i, c in enumerate(want.columns):  # categories' own dtype and order, and ordered
        g, w = got.iloc[:, i], want.iloc[:, i]
        assert g.dtype == w.dtype, c
        if isinstance(w.dtype, pd.CategoricalDtype):
            assert g.cat.categories.dtype == w.cat.categories.dtype, c
            assert list(g.cat.categories) == list(w.cat.categories), c
            assert g.cat.ordered == w.cat.ordered, c


def test_text_categoricals_round_trip_in_groups_zero_copy(cache_dir):
    df = _frame()
    mmcache.save(df, "k")
    meta = _meta(cache_dir)
    assert meta["format"] == 2
    layout = meta["layout"]
    names = list(df.columns)
    in_groups = {names[p] for g in layout["cats"]["groups"] for p in g["cols"]}
    assert in_groups == GROUPED
    assert not GROUPED & {names[int(p)] for p in layout["ext"]}
    # int8 and int16 codes (the 300 categories), NaN and NA text: separate groups
    assert {(g["dtype"], g["na"]) for g in layout["cats"]["groups"]} == {
        ("|i1", "nan"), ("<i2", "nan"), ("|i1", "NA")}
    got = mmcache.open("k")
    _assert_same(got, df)
    assert_zero_copy(got, cache_dir)  # codes and categories inside the mapped files
    assert got["a"].dtype == got["b"].dtype


def test_second_open_and_other_processes_agree(cache_dir):
    df = _frame()
    mmcache.save(df, "k")
    first, second = mmcache.open("k"), mmcache.open("k")  # fresh decode, then a kept base
    _assert_same(first, df)
    _assert_same(second, df)
    assert_zero_copy(second, cache_dir)
    # A reference (pickled unmodified) opens in full elsewhere too
    payload = pickle.dumps(first)
    assert len(payload) < 1024
    _cache._MEMO.clear()
    _assert_same(pickle.loads(payload), df)


@pytest.mark.parametrize("columns", [["wide", "a", "num"], ["own3", "own3", "f", "own59"],
                                     ["num", "obj"], ["na"]])
def test_column_subsets_reorders_and_repeats(cache_dir, columns):
    df = _frame()
    mmcache.save(df, "k")
    got = mmcache.open("k", columns=columns)
    _assert_same(got, df[columns])
    # (a repeat over pandas 2's private mapping without copy-on-write is a copy, as pandas
    # makes it: only first occurrences must lie in the cache's mappings)
    ranges = maps_under(cache_dir)
    for i, c in enumerate(columns):
        if columns.index(c) == i:
            assert all(any(s <= a and a + n <= e for s, e, _ in ranges)
                       for a, n in array_buffers(got.iloc[:, i]._values)), c


def test_frames_without_text_categoricals_keep_format_1(cache_dir):
    """An entry is written in the oldest format that holds it: older releases read it."""
    df = _frame()[["f", "num", "obj"]]
    mmcache.save(df, "k")
    meta = _meta(cache_dir)
    assert meta["format"] == 1 and "cats" not in meta["layout"]
    _assert_same(mmcache.open("k"), df)


def test_format_1_entries_of_text_categoricals_still_open(cache_dir, monkeypatch):
    """Entries saved before the groups (every categorical its own spec) open as before."""
    df = _frame()
    with monkeypatch.context() as m:
        m.setattr(_categories, "groupable", lambda values: None)
        mmcache.save(df, "k")
    meta = _meta(cache_dir)
    assert meta["format"] == 1 and "cats" not in meta["layout"]
    assert sum(s["c"] == "cat" for s in meta["layout"]["ext"].values()) == df.shape[1] - 1
    got = mmcache.open("k")
    _assert_same(got, df)
    assert_zero_copy(got, cache_dir)


def test_edits_of_the_first_open_reach_no_later_open(cache_dir):
    """The first open hands out the frame it decoded: its categories must be its own."""
    df = _frame()
    mmcache.save(df, "k")
    first = mmcache.open("k")
    first["a"].cat.categories.name = "renamed"  # in place, on the dtype's own Index
    first["own0"].cat.categories.name = "renamed"
    first["num"].cat.categories.name = "renamed"  # per-column specs: decoded once a decode
    first["obj"].cat.categories.name = "renamed"
    later = mmcache.open("k")
    for c in ("a", "own0", "num", "obj"):
        assert later[c].cat.categories.name is None, c
    _assert_same(later, df)
    # the edited frame pickles in full, with its edit
    back = pickle.loads(pickle.dumps(first))
    assert back["own0"].cat.categories.name == "renamed"
    # and a frame of the kept base is no different
    third = mmcache.open("k")
    third["b"].cat.categories.name = "again"
    assert mmcache.open("k")["b"].cat.categories.name is None


def test_columns_with_equal_categories_keep_their_own_index(cache_dir):
    """"a" and "b" share one dtype, and so one categories Index, in the saved frame; "c"
    has equal categories built apart. Renaming one column's categories in place renames no
    other column's that the saved frame did not link (the first open used to give equal
    lists one Index)."""
    cats = _text(["x", "y"])
    shared = pd.CategoricalDtype(cats)
    df = pd.DataFrame({"a": pd.Categorical.from_codes([0, 1], dtype=shared),
                       "c": pd.Categorical.from_codes([1, 0], categories=_text(["x", "y"]))})
    mmcache.save(df, "k")
    for _ in range(2):  # the first open (decoded for itself), then one of the kept base
        got = mmcache.open("k")
        got["a"].cat.categories.name = "renamed"
        assert got["c"].cat.categories.name is None
        back = pickle.loads(pickle.dumps(got[["c"]]))
        assert back["c"].cat.categories.name is None


def test_private_writes_into_categories_reach_no_later_open(cache_dir):
    """Writing into the Arrow text behind a frame's categories (private: ``._data[i] =``
    swaps its data in place) changes that frame only, whichever open gave it."""
    df = _frame()
    mmcache.save(df, "k")
    for _ in range(2):
        got = mmcache.open("k")
        try:
            got["own1"].cat.categories._data[0] = "zz"
        except (TypeError, ValueError, NotImplementedError):
            pytest.skip("this pandas refuses the write")
        assert got["own1"].cat.categories[0] == "zz"
        later = mmcache.open("k")
        assert list(later["own1"].cat.categories) == list(df["own1"].cat.categories)
        # the edited frame pickles in full, with its edit
        assert pickle.loads(pickle.dumps(got))["own1"].cat.categories[0] == "zz"


def test_a_dtypes_ordered_flag_set_in_place_pickles_in_full(cache_dir):
    """``dtype._ordered`` (private) set in place: the frame is modified, so it pickles in
    full and arrives ordered (its reference arrived unordered)."""
    mmcache.save(_frame(), "k")
    got = mmcache.open("k")
    got["own2"].dtype._ordered = True
    payload = pickle.dumps(got)
    assert len(payload) > 1024
    assert pickle.loads(payload)["own2"].cat.ordered


def _signed_open(cache_dir, meta):
    meta.pop("sha256", None)
    (cache_dir / f"{entry_name('k')}.json").write_bytes(_store.sign(meta))
    _cache._MEMO.clear()
    return mmcache.open("k")


@pytest.mark.parametrize("damage", [
    lambda g, t: g.update(na="x"),
    lambda g, t: g.update(ordered=[10**6]),
    lambda g, t: g.update(ordered=[True]),
    lambda g, t: g.update(dtype="<f8"),
    lambda g, t: g["codes"].update(n=g["codes"]["n"] - 1),
    lambda g, t: g["cats"].update(n=g["cats"]["n"] - 1),
    lambda g, t: g["cols"].append(g["cols"][0]),
    lambda g, t: g["cols"].pop(),
    lambda g, t: t.update(starts=t["offsets"]),
    lambda g, t: t["offsets"].update(n=t["offsets"]["n"] - 1),
    lambda g, t: t["data"].update(n=max(0, t["data"]["n"] - 3)),
    lambda g, t: t.update(data=t["starts"]),
    "width",
], ids=["na", "ordered-range", "ordered-type", "codes-dtype", "codes-size", "cats-size",
        "cols-repeat", "cols-missing", "starts", "offsets", "data-short", "data-elsewhere",
        "width"])
def test_damaged_group_metadata_is_refused(cache_dir, damage):
    """Metadata rewritten with a valid checksum: a clear CorruptEntryError, never a frame
    of other data. "width": int16 codes pointed at lists of 3 categories, whose codes pandas
    makes int8 (converting them gave a copy out of the mapped files, out of range)."""
    df = _frame()
    mmcache.save(df, "k")
    meta = _meta(cache_dir)
    groups = meta["layout"]["cats"]["groups"]
    group = max(groups, key=lambda g: len(g["cols"]))
    if damage == "width":
        wide = next(g for g in groups if g["dtype"] == "<i2")
        wide["cats"] = {**group["cats"], "n": len(wide["cols"])}
    else:
        damage(group, meta["layout"]["cats"]["table"])
    with pytest.raises(mmcache.CorruptEntryError):
        _signed_open(cache_dir, meta)


def test_invalid_text_in_the_table_is_refused(cache_dir):
    """A flipped byte in the categories' text (not UTF-8 any more) is a CorruptEntryError,
    not a UnicodeDecodeError from inside pandas."""
    df = _frame()
    mmcache.save(df, "k")
    meta = _meta(cache_dir)
    ref = meta["layout"]["cats"]["table"]["data"]
    f = meta["files"][ref["f"]]
    path = cache_dir / meta["data"] / f["name"]
    raw = bytearray(path.read_bytes())
    assert f["dtype"] == "|u1" and ref["n"] > 0
    start = len(raw) - f["count"]  # after the .npy header
    raw[start + ref["o"]] = 0xFF
    path.write_bytes(bytes(raw))
    _cache._MEMO.clear()
    with pytest.raises(mmcache.CorruptEntryError):
        mmcache.open("k")



def test_automatic_collections_go_on_across_opens(cache_dir):
    """Opens pause the collector while they build a frame and must leave it as they found
    it: a program that opens a frame per task while making cyclic garbage still has that
    garbage collected (moving young objects to the oldest generation with gc.freeze() and
    gc.unfreeze() reset its counters: no collection ran again, 286 MB piled up)."""
    import gc

    mmcache.save(pd.DataFrame({"x": np.arange(10)}), "k")
    gc.collect()
    before = sum(s["collections"] for s in gc.get_stats())
    for _ in range(300):
        for _ in range(100):
            cycle: list = []
            cycle.append(cycle)
        mmcache.open("k")
    assert gc.isenabled()
    assert sum(s["collections"] for s in gc.get_stats()) - before >= 10
    assert gc.get_count()[0] < 5000  # young objects do not pile up
