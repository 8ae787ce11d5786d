"""The public API's behaviour in one process: writes, memoisation, columns=, the verbs."""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import os
import pickle

import numpy as np
import pandas as pd
import pytest

import mmcache
from mmcache._compat import writes_in_place
from mmcache._paths import entry_name
from tests import _pd
from tests._zerocopy import array_buffers, assert_zero_copy, maps_under


def _mixed(n: int = 50) -> pd.DataFrame:
    df = pd.DataFrame({
        "a": np.arange(n, dtype=float),
        "b": np.arange(n, dtype=np.int64),
        "f2": np.arange(n, dtype=float) * 2,
        "s": pd.Series([f"s{i}" if i % 7 else None for i in range(n)], dtype="str"),
        "c": pd.Categorical(["x", "y"] * (n // 2)),
        "i": pd.array([i if i % 5 else None for i in range(n)], dtype="Int64"),
        "t": pd.date_range("2021", periods=n, freq="min", tz="UTC"),
    })
    df.attrs = {"unit": "m"}
    return df


def _digest(cache_dir) -> str:
    h = hashlib.sha256()
    for p in sorted(cache_dir.rglob("*.npy")):
        h.update(p.read_bytes())
    return h.hexdigest()


def _iadd(d: pd.DataFrame, col: str) -> None:
    d[col] += 1


WRITES = {
    "loc-float": lambda d: d.loc.__setitem__((0, "a"), 99.0),
    "loc-int": lambda d: d.loc.__setitem__((1, "b"), -5),
    "iloc": lambda d: d.iloc.__setitem__((2, 0), 7.5),
    "at": lambda d: d.at.__setitem__((3, "f2"), 1.25),
    "iadd": lambda d: _iadd(d, "b"),
    "iadd-float": lambda d: _iadd(d, "a"),
    "fillna-inplace": lambda d: d.fillna({"i": 0, "s": "none"}, inplace=True),
    "mask-setitem": lambda d: d.__setitem__(d["b"] > 10, d[d["b"] > 10]),
    "loc-str": lambda d: d.loc.__setitem__((0, "s"), "changed"),
    "loc-cat": lambda d: d.loc.__setitem__((0, "c"), "y"),
    "loc-Int64": lambda d: d.loc.__setitem__((0, "i"), 123),
    "loc-tz": lambda d: d.loc.__setitem__((0, "t"), pd.Timestamp("1999", tz="UTC")),
    "loc-row-slice": lambda d: d.loc.__setitem__((slice(0, 5), "a"), 0.0),
    "iloc-all-columns": lambda d: d.iloc.__setitem__(0, d.iloc[1]),
    "update": lambda d: d.update(pd.DataFrame({"a": [1.0, 2.0]})),
    "del-column": lambda d: d.__delitem__("a"),
}


@pytest.mark.parametrize("name", list(WRITES))
def test_in_place_writes_work_and_never_reach_the_cache(cache_dir, name):
    df = _mixed()
    mmcache.save(df, "k")
    before = _digest(cache_dir)
    other = mmcache.open("k")
    mine = mmcache.open("k")
    expected = df.copy()
    WRITES[name](expected)
    WRITES[name](mine)  # must not raise "assignment destination is read-only"
    _pd.assert_frame_equal(mine, expected)
    _pd.assert_frame_equal(other, df)  # an edit in one frame never shows in another
    _pd.assert_frame_equal(mmcache.open("k"), df)
    assert _digest(cache_dir) == before
    mmcache._cache._MEMO.clear()
    _pd.assert_frame_equal(mmcache.open("k"), df)


def test_index_name_edit_stays_in_its_frame(cache_dir):
    mmcache.save(_mixed(), "k")
    a, b = mmcache.open("k"), mmcache.open("k")
    a.index.name = "renamed"
    a.columns.name = "cols"
    assert b.index.name is None and b.columns.name is None
    assert mmcache.open("k").index.name is None


@pytest.mark.parametrize(
    "write",
    [
        lambda d: d["a"].to_numpy().__setitem__(0, 1.0),
        lambda d: d["b"].values.__setitem__(0, 1),
        lambda d: d["i"].array._data.__setitem__(0, 1),
    ],
    ids=["to_numpy", "values", "masked-data"],
)
def test_writing_into_raw_arrays_raises(cache_dir, write):
    """Raw arrays are read-only where pandas copies on write; on pandas 2 without it they are
    writable, as a plain frame's are, and the write stays in this frame (its own private
    mapping): never in the cache or another frame, and the frame pickles with the edit."""
    df = _mixed()
    mmcache.save(df, "k")
    got = mmcache.open("k")
    other = mmcache.open("k")
    if writes_in_place():
        write(got)
        blob = pickle.dumps(got)
        assert len(blob) > 1000  # the edited data, not a reference to the cache's
        back = pickle.loads(blob)
        pd.testing.assert_frame_equal(back, got)
        assert array_buffers(back["a"]) != array_buffers(got["a"])
    else:
        with pytest.raises(ValueError, match="read-only"):
            write(got)
    _pd.assert_frame_equal(other, df)
    _pd.assert_frame_equal(mmcache.open("k"), df)
    mmcache._cache._MEMO.clear()
    _pd.assert_frame_equal(mmcache.open("k"), df)


def test_open_is_memoised_and_each_call_returns_its_own_frame(cache_dir):
    mmcache.save(_mixed(1000), "k")
    first = mmcache.open("k")
    maps = maps_under(cache_dir)
    second = mmcache.open("k")
    assert first is not second
    if writes_in_place():
        # pandas 2 without copy-on-write: each frame its own private mapping of the files
        assert len(maps_under(cache_dir)) > len(maps)
        assert array_buffers(first["a"]._values) != array_buffers(second["a"]._values)
    else:
        assert maps_under(cache_dir) == maps  # no new mapping
        assert array_buffers(first["a"]._values) == array_buffers(second["a"]._values)


def test_resave_is_seen_and_old_frames_keep_old_data(cache_dir):
    df1, df2 = _mixed(), _mixed().assign(a=-1.0)
    mmcache.save(df1, "k")
    old = mmcache.open("k")
    mmcache.save(df2, "k")
    _pd.assert_frame_equal(mmcache.open("k"), df2)
    _pd.assert_frame_equal(old, df1)
    versions = [p.name for p in cache_dir.iterdir() if p.is_dir()]
    assert len(versions) == 2, versions  # the old one stays on disk while `old` maps it
    mmcache.delete("k")
    _pd.assert_frame_equal(old, df1)  # mapped pages outlive the delete
    del old
    gc.collect()
    mmcache.clean()  # nobody maps it now: the next sweep frees it
    assert list(cache_dir.iterdir()) == []


def test_columns_maps_only_those(cache_dir):
    df = _mixed()
    mmcache.save(df, "k")
    got = mmcache.open("k", columns=["s", "a", "i"])
    _pd.assert_frame_equal(got, df[["s", "a", "i"]])
    assert_zero_copy(got, cache_dir)
    both = mmcache.open("k", columns=["f2", "a"])  # two float columns, reversed
    _pd.assert_frame_equal(both, df[["f2", "a"]])
    assert_zero_copy(both, cache_dir)
    with pytest.raises(mmcache.ColumnNotFoundError, match="'nope'") as info:
        mmcache.open("k", columns=["a", "nope"])
    assert isinstance(info.value, KeyError)
    with pytest.raises(TypeError, match="list of column labels"):
        mmcache.open("k", columns="a")
    _pd.assert_frame_equal(mmcache.open("k", columns=iter(["b"])), df[["b"]])
    empty = mmcache.open("k", columns=[])
    assert empty.shape == (len(df), 0) and empty.index.equals(df.index)
    mmcache.save(df["a"], "series")
    with pytest.raises(TypeError, match="Series"):
        mmcache.open("series", columns=["a"])


def test_columns_with_duplicate_and_multiindex_labels(cache_dir):
    dup = pd.DataFrame(np.arange(12.0).reshape(3, 4), columns=["a", "b", "a", "c"])
    mmcache.save(dup, "dup")
    _pd.assert_frame_equal(mmcache.open("dup", columns=["a"]), dup[["a"]])
    multi = pd.DataFrame(np.arange(12.0).reshape(3, 4),
                         columns=pd.MultiIndex.from_product([["x", "y"], [1, 2]]))
    mmcache.save(multi, "multi")
    _pd.assert_frame_equal(mmcache.open("multi", columns=[("y", 1)]), multi[[("y", 1)]])


def test_missing_key_is_a_keyerror_that_says_what_to_do(cache_dir):
    with pytest.raises(mmcache.EntryNotFoundError) as info:
        mmcache.open("nothing-here")
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, mmcache.MmcacheError)
    assert "nothing-here" in str(err) and "save" in str(err)
    assert err.key == "nothing-here"


def test_exists_delete_entries(cache_dir):
    assert not mmcache.exists("k")
    assert mmcache.delete("k") is False
    e = mmcache.save(_mixed(10), "k")
    assert mmcache.exists("k")
    assert (e.key, e.nrows, e.ncols) == ("k", 10, 7)
    on_disk = {(p.stat().st_ino, p.stat().st_size) for p in cache_dir.rglob("*")
               if p.is_file() and p.suffix != ".lock"}  # (the metadata has two names)
    assert e.nbytes == sum(size for _, size in on_disk)
    assert e.path.parent == cache_dir
    assert e.created <= dt.datetime.now(dt.UTC)
    mmcache.save(pd.Series([1, 2]), "s")
    listed = {x.key: x for x in mmcache.entries()}
    assert set(listed) == {"k", "s"} and listed["s"].nrows == 2
    assert mmcache.delete("k") is True
    assert not mmcache.exists("k")
    assert [x.key for x in mmcache.entries()] == ["s"]
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(entry_name("k") + ".")
                and not p.name.endswith(".lock")]


def test_entry_is_a_small_picklable_reference(cache_dir):
    df = _mixed(100_000)
    entry = mmcache.save(df, "k")
    blob = pickle.dumps(entry)
    assert len(blob) < 1000
    _pd.assert_frame_equal(pickle.loads(blob).open(), df)
    _pd.assert_frame_equal(entry.open(columns=["a"]), df[["a"]])


def test_opened_frame_pickles_as_reference_until_modified(cache_dir):
    df = _mixed(100_000)
    mmcache.save(df, "k")
    got = mmcache.open("k")
    blob = pickle.dumps(got)
    assert len(blob) < 1000
    back = pickle.loads(blob)
    assert type(back) is pd.DataFrame
    _pd.assert_frame_equal(back, df)
    assert_zero_copy(back, cache_dir)
    series = mmcache.open("k")["a"] + 0.0  # computed: pickled in full (views: test_views.py)
    assert len(pickle.dumps(series)) > 100_000 * 8
    got.loc[0, "a"] = -1.0
    blob = pickle.dumps(got)
    assert len(blob) > 100_000 * 8
    _pd.assert_frame_equal(pickle.loads(blob), got)
    attrs_changed = mmcache.open("k")
    attrs_changed.attrs["unit"] = "km"
    assert pickle.loads(pickle.dumps(attrs_changed)).attrs == {"unit": "km"}
    renamed = mmcache.open("k")
    renamed.index.name = "row"
    assert pickle.loads(pickle.dumps(renamed)).index.name == "row"


def test_pickled_reference_refuses_a_resaved_key(cache_dir):
    mmcache.save(_mixed(), "k")
    blob = pickle.dumps(mmcache.open("k"))
    mmcache.save(_mixed().assign(a=0.0), "k")
    with pytest.raises(mmcache.EntryChangedError, match="re-saved"):
        pickle.loads(blob)


def test_frame_of_a_replaced_entry_pickles_in_full(cache_dir):
    """A frame still held after its key was re-saved or deleted ships its (old) data."""
    old = mmcache.open("k", build=_mixed)
    mmcache.save(_mixed().assign(a=0.0), "k")
    _pd.assert_frame_equal(pickle.loads(pickle.dumps(old)), _mixed())
    mmcache.delete("k")
    _pd.assert_frame_equal(pickle.loads(pickle.dumps(old)), _mixed())


def test_editing_an_arrow_array_in_place_stays_in_its_frame(cache_dir):
    df = _mixed()
    mmcache.save(df, "k")
    mine, other = mmcache.open("k"), mmcache.open("k")
    mine["s"].array[0] = "edited"  # Arrow arrays accept raw writes by swapping their data
    assert mine.loc[0, "s"] == "edited"
    _pd.assert_frame_equal(other, df)
    _pd.assert_frame_equal(mmcache.open("k"), df)
    assert pickle.loads(pickle.dumps(mine)).loc[0, "s"] == "edited"


def test_series_round_trip_and_pickle(cache_dir):
    s = pd.Series(np.arange(100_000.0), name="x")
    mmcache.save(s, "s")
    got = mmcache.open("s")
    assert type(got) is pd.Series
    assert len(pickle.dumps(got)) < 1000
    got.name = "y"
    assert pickle.loads(pickle.dumps(got)).name == "y"


def test_share_removes_entry_on_exit_and_on_error(cache_dir):
    df = _mixed()
    with mmcache.share(df) as ref:
        assert mmcache.exists(ref.key)
        _pd.assert_frame_equal(ref.open(), df)
    assert not mmcache.exists(ref.key)
    with pytest.raises(RuntimeError), mmcache.share(df) as ref2:
        raise RuntimeError("boom")
    assert not mmcache.exists(ref2.key)
    assert ref.key != ref2.key


def test_build_runs_only_when_missing(cache_dir):
    calls = []

    def build():
        calls.append(1)
        return _mixed()

    _pd.assert_frame_equal(mmcache.open("k", build=build), _mixed())
    _pd.assert_frame_equal(mmcache.open("k", build=build), _mixed())
    assert calls == [1]
    with pytest.raises(mmcache.UnsupportedTypeError, match="build="):
        mmcache.open("other", build=lambda: [1, 2])


def test_cache_class_and_cache_dir_argument(tmp_path, monkeypatch):
    monkeypatch.delenv("MMCACHE_DIR", raising=False)
    c = mmcache.Cache(tmp_path / "explicit")
    c.save(_mixed(), "k")
    assert c.exists("k") and not mmcache.exists("k", cache_dir=tmp_path / "elsewhere")
    assert mmcache.exists("k", cache_dir=tmp_path / "explicit")
    assert [e.key for e in c.entries()] == ["k"]
    assert (tmp_path / "explicit").stat().st_mode & 0o777 == 0o700
    monkeypatch.setenv("MMCACHE_DIR", str(tmp_path / "from-env"))
    mmcache.save(_mixed(), "e")
    assert c.exists("e") is False and mmcache.Cache().exists("e")
    assert (tmp_path / "from-env").is_dir()


def test_clean_selectors(cache_dir):
    for k in ("a", "b", "c"):
        mmcache.save(_mixed(1000), k)
    sizes = {e.key: e.nbytes for e in mmcache.entries()}
    old = (dt.datetime.now() - dt.timedelta(hours=3)).timestamp()
    os.utime(mmcache.entries()[0].path, (old, os.stat(mmcache.entries()[0].path).st_mtime))
    assert [e.key for e in mmcache.clean(dry_run=True)] == ["a", "b", "c"]
    assert len(mmcache.entries()) == 3
    assert [e.key for e in mmcache.clean(older_than=dt.timedelta(hours=2))] == ["a"]
    assert [e.key for e in mmcache.clean(max_bytes=sizes["c"])] == ["b"]
    assert [e.key for e in mmcache.clean(["c"])] == ["c"]
    assert mmcache.entries() == []


def test_errors_pickle_with_their_attributes():
    err = mmcache.EntryNotFoundError("gone", key="k", path="/x")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is mmcache.EntryNotFoundError
    assert (str(back), back.key, back.path) == ("gone", "k", "/x")
    assert isinstance(back, KeyError) and isinstance(back, FileNotFoundError)
    for cls, base in [(mmcache.InvalidKeyError, ValueError),
                      (mmcache.CorruptEntryError, ValueError),
                      (mmcache.UnsupportedTypeError, TypeError),
                      (mmcache.CacheFullError, OSError),
                      (mmcache.LockTimeoutError, TimeoutError),
                      (mmcache.CacheDirError, PermissionError)]:
        assert issubclass(cls, base) and issubclass(cls, mmcache.MmcacheError)


def test_wide_frame_is_few_files_one_block_and_no_descriptors(cache_dir):
    n = 10_000
    df = pd.DataFrame(np.random.default_rng(0).random((1000, n)),
                      columns=[f"c{i}" for i in range(n)])
    df["s"] = "text"
    mmcache.save(df, "wide")
    assert len(list(cache_dir.rglob("*.npy"))) <= 4  # per dtype, not per column
    fds = len(os.listdir("/proc/self/fd"))
    frames = [mmcache.open("wide") for _ in range(3)]
    mmcache._cache._MEMO.clear()
    frames.append(mmcache.open("wide"))  # a fresh mapping, still no descriptor kept
    assert len(os.listdir("/proc/self/fd")) <= fds
    got = frames[-1]
    assert len(got._mgr.blocks) == 2  # one consolidated float block + the str column
    _pd.assert_frame_equal(got, df)
    for label in ["c0", "c9999", "s"]:  # (a list selection is a copy in pandas 2)
        assert_zero_copy(got[label], cache_dir)


@pytest.mark.parametrize("cut", ["head", "tail", "mask"])
def test_slices_store_only_their_rows(cache_dir, cut):
    """A slice still points into its parent's buffers (Arrow strings included): only the
    rows it holds are written."""
    big = _mixed(200_000)
    part = {"head": big.head(100), "tail": big.tail(100), "mask": big[big["b"] % 2000 == 0]}[cut]
    entry = mmcache.save(part, "part")
    assert entry.nbytes < 100_000
    _pd.assert_frame_equal(mmcache.open("part"), part)


def _age(entry: mmcache.Entry, seconds: float) -> None:
    os.utime(entry.path, (dt.datetime.now().timestamp() - seconds, entry.path.stat().st_mtime))


def test_max_bytes_evicts_lru_with_entries_in_use_last(cache_dir):
    cache = mmcache.Cache(cache_dir)
    frames = {k: _mixed(20_000) for k in "abc"}
    made = {k: cache.save(f, k) for k, f in frames.items()}
    unit = made["a"].nbytes
    _age(made["a"], 300)  # a: least recently used, but this process maps it (in use)
    _age(made["b"], 200)
    _age(made["c"], 100)
    held = cache.open("a")
    limited = mmcache.Cache(cache_dir, max_bytes=int(3.5 * unit))
    limited.save(_mixed(20_000), "d")
    assert {e.key for e in cache.entries()} == {"a", "c", "d"}  # b went, not a (in use)
    limited.save(_mixed(20_000), "e")
    assert {e.key for e in cache.entries()} == {"a", "d", "e"}
    assert sum(e.nbytes for e in cache.entries()) <= 3.5 * unit
    _pd.assert_frame_equal(held, frames["a"])


def test_max_bytes_refuses_an_entry_larger_than_the_limit(cache_dir):
    mmcache.save(_mixed(10), "small")
    with pytest.raises(mmcache.CacheFullError, match="size limit"):
        mmcache.Cache(cache_dir, max_bytes=1000).save(_mixed(10_000), "big")
    assert not mmcache.exists("big") and mmcache.exists("small")


def test_max_bytes_from_environment(cache_dir, monkeypatch):
    unit = mmcache.save(_mixed(20_000), "a").nbytes
    mmcache.save(_mixed(20_000), "b")
    monkeypatch.setenv("MMCACHE_MAX_BYTES", f"{2.5 * unit / 1000:.0f}KB")
    mmcache.save(_mixed(20_000), "c")
    assert {e.key for e in mmcache.entries()} == {"b", "c"}
    monkeypatch.setenv("MMCACHE_MAX_BYTES", "lots")
    with pytest.raises(mmcache.MmcacheError, match="MMCACHE_MAX_BYTES"):
        mmcache.save(_mixed(10), "d")


# --- found by an independent review ---------------------------------------------------------


def test_clean_with_one_key_as_a_string(cache_dir):
    for k in ("prices", "p", "r"):
        mmcache.save(_mixed(10), k)
    assert [e.key for e in mmcache.clean("prices")] == ["prices"]
    assert {e.key for e in mmcache.entries()} == {"p", "r"}


def test_deleted_entries_release_their_mappings(cache_dir):
    import gc
    df = _mixed(100_000)
    for _ in range(5):
        with mmcache.share(df) as ref:
            assert float(ref.open()["a"].sum()) == float(df["a"].sum())
    gc.collect()
    assert maps_under(cache_dir) == []  # nothing deleted stays mapped by the memo
    mmcache.save(df, "k")
    held = mmcache.open("k")
    mmcache.Cache(cache_dir).delete("k")
    _pd.assert_frame_equal(held, df)  # a live frame keeps its pages
    del held
    gc.collect()
    assert maps_under(cache_dir) == []


def test_entries_deleted_by_another_process_are_released(cache_dir):
    # Issue 8 item 10: the memo holds nothing; the last frame to go unmaps, with no open().
    import gc
    import subprocess
    import sys
    mmcache.save(_mixed(1000), "gone")
    held = mmcache.open("gone")
    assert maps_under(cache_dir)
    subprocess.run([sys.executable, "-c", f"import mmcache; mmcache.delete('gone', "
                    f"cache_dir={str(cache_dir)!r})"], check=True, timeout=60)
    assert maps_under(cache_dir)  # the live frame keeps its pages
    del held
    gc.collect()
    assert maps_under(cache_dir) == []


def test_flat_index_of_tuples_stays_flat(cache_dir):
    df = pd.DataFrame([[1, 2]], columns=pd.Index([("a", 1), ("b", 2)], tupleize_cols=False))
    mmcache.save(df, "k")
    _pd.assert_frame_equal(mmcache.open("k"), df)


def test_empty_object_columns_stay_object(cache_dir):
    df = pd.DataFrame(columns=["a", "b"])
    mmcache.save(df, "k")
    _pd.assert_frame_equal(mmcache.open("k"), df)
    s = pd.Series([], dtype=object)
    mmcache.save(s, "s")
    _pd.assert_series_equal(mmcache.open("s"), s)


def test_object_categories_stay_object(cache_dir):
    df = pd.DataFrame({"c": pd.Categorical(["x", "y", None],
                                           categories=pd.Index(["x", "y"], dtype=object))})
    mmcache.save(df, "k")
    _pd.assert_frame_equal(mmcache.open("k"), df)


@pytest.mark.parametrize(
    "call",
    [
        lambda: mmcache.open("k", columns="a"),
        lambda: mmcache.open("k", columns=[["a"]]),
        lambda: mmcache.open("s", columns=["a"]),
        lambda: mmcache.clean(older_than="soon"),
        lambda: mmcache.clean(older_than=-5),
        lambda: mmcache.clean(max_bytes="lots"),
        lambda: mmcache.clean(max_bytes=[1]),
        lambda: mmcache.Cache(max_bytes="1 parsec"),
    ],
    ids=["columns-str", "columns-unhashable", "columns-on-series", "older-than-text",
         "older-than-negative", "max-bytes-text", "max-bytes-list", "cache-max-bytes"],
)
def test_bad_arguments_are_mmcache_errors(cache_dir, call):
    mmcache.save(_mixed(10), "k")
    mmcache.save(pd.Series([1.0]), "s")
    with pytest.raises(mmcache.InvalidArgumentError) as info:
        call()
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_sizes_and_durations_as_text(cache_dir):
    mmcache.save(_mixed(10), "old")
    _age(mmcache.entries()[0], 7200)
    assert [e.key for e in mmcache.clean(older_than="1h", max_bytes="10GB")] == []
    assert [e.key for e in mmcache.clean(older_than="1h")] == ["old"]


def test_no_lock_file_outlives_a_failed_or_empty_operation(cache_dir):
    mmcache.save(_mixed(10), "live")
    with pytest.raises(mmcache.CacheFullError):
        mmcache.Cache(cache_dir, max_bytes=1000).save(_mixed(10_000), "big")
    assert mmcache.delete("never-saved") is False
    with pytest.raises(ZeroDivisionError):
        mmcache.open("broken", build=lambda: 1 / 0)
    with pytest.raises(mmcache.UnsupportedTypeError):
        mmcache.open("not-a-frame", build=lambda: 1)
    names = sorted(p.name for p in cache_dir.iterdir() if p.suffix == ".lock")
    assert names in ([], [f"{entry_name('live')}.lock"])


def test_reading_never_creates_the_cache_dir(tmp_path):
    missing = tmp_path / "typo" / "deep"
    assert mmcache.exists("k", cache_dir=missing) is False
    assert mmcache.entries(cache_dir=missing) == []
    assert mmcache.delete("k", cache_dir=missing) is False
    assert mmcache.clean(cache_dir=missing) == []
    with pytest.raises(mmcache.EntryNotFoundError):
        mmcache.open("k", cache_dir=missing)
    assert not (tmp_path / "typo").exists()
    mmcache.save(_mixed(10), "k", cache_dir=missing)  # saving creates it
    assert mmcache.exists("k", cache_dir=missing)


def test_cache_dir_in_the_way_gets_a_clear_error(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(mmcache.CacheDirError, match="is a file, not a directory"):
        mmcache.entries(cache_dir=a_file)
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(mmcache.CacheDirError, match="symlink to a missing path"):
        mmcache.save(_mixed(10), "k", cache_dir=dangling)


def test_to_pickle_writes_the_data_not_a_reference(cache_dir, tmp_path):
    """A pickle file is meant to outlive the entry: DataFrame.to_pickle ships the data."""
    df = _mixed(1000)
    mmcache.save(df, "k")
    path = tmp_path / "frame.pkl"
    mmcache.open("k").to_pickle(path)
    mmcache.open("k")["a"].to_pickle(tmp_path / "series.pkl")
    mmcache.delete("k")
    _pd.assert_frame_equal(pd.read_pickle(path), df)
    _pd.assert_series_equal(pd.read_pickle(tmp_path / "series.pkl"), df["a"])


def test_tz_aware_columns_of_one_zone_form_one_block(cache_dir):
    t = pd.date_range("2020", periods=50, freq="h", tz="Europe/Paris")
    df = pd.DataFrame({"t1": t, "x": np.arange(50.0), "t2": t + pd.Timedelta("1D"),
                       "u": t.tz_convert("UTC"), "t3": t})
    mmcache.save(df, "k")
    got = mmcache.open("k")
    _pd.assert_frame_equal(got, df)
    assert_zero_copy(got, cache_dir)
    tz_blocks = [b for b in got._mgr.blocks if isinstance(b.dtype, pd.DatetimeTZDtype)]
    assert sorted(b.shape[0] for b in tz_blocks) == [1, 3]  # Paris x3 in one block, UTC alone
    _pd.assert_frame_equal(mmcache.open("k", columns=["t3", "u", "t1"]),
                                  df[["t3", "u", "t1"]])
    got.loc[0, "t2"] = pd.Timestamp("1999", tz="Europe/Paris")  # copy-on-write of one column
    _pd.assert_frame_equal(mmcache.open("k"), df)


@pytest.mark.parametrize(("col", "value"), [("i", 5), ("c", "y"),
                                           ("t", pd.Timestamp("1999", tz="UTC"))])
def test_raw_array_writes_to_mapped_extension_columns_raise(cache_dir, col, value):
    """As README says: raw writes into nullable, categorical and tz-aware arrays raise; the
    cache and the frame are unchanged (df.loc is the way to edit). On pandas 2 without
    copy-on-write they work as on a plain frame, in this frame only."""
    df = _mixed()
    mmcache.save(df, "k")
    got = mmcache.open("k")
    if writes_in_place():
        got[col].array[0] = value
        expected = df.copy()
        expected[col].array[0] = value
        _pd.assert_frame_equal(got, expected)
        _pd.assert_frame_equal(pickle.loads(pickle.dumps(got)), expected)
    else:
        with pytest.raises(ValueError, match="read-only"):
            got[col].array[0] = value
        _pd.assert_frame_equal(got, df)
    _pd.assert_frame_equal(mmcache.open("k"), df)


# --- found by an independent review of the pandas 2 support -------------------------------------


def test_a_column_asked_for_twice_is_two_columns(cache_dir):
    """open(columns=["a", "a"]) gives two columns; an edit of one never shows in the other
    (pandas 2 without copy-on-write writes in place: each must be its own memory)."""
    df = pd.DataFrame({"a": [1.0, 2.0], "m": pd.array([1, 2], dtype="Int64"),
                       "iv": pd.arrays.IntervalArray.from_breaks([0, 1, 2])})
    mmcache.save(df, "k")
    for col, value in (("a", -9.0), ("m", -9), ("iv", pd.Interval(-2, -1))):
        got = mmcache.open("k", columns=[col, col])
        plain = df[[col, col]].copy()
        got.iloc[0, 0] = value
        plain.iloc[0, 0] = value
        _pd.assert_frame_equal(got, plain)
    _pd.assert_frame_equal(mmcache.open("k"), df)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.attrs.__setitem__("unit", 1),  # was "m"
        lambda d: d.attrs.__setitem__("n", 1.0),  # was 1: equal, not the same
        lambda d: d.attrs.__setitem__("flag", 0),  # was False
        lambda d: setattr(d.index, "name", 1.0),  # was 1
        lambda d: setattr(d.index, "freq", None),  # was <Day>
    ],
    ids=["attr", "attr-int-to-float", "attr-bool-to-int", "index-name-type", "freq"],
)
def test_edits_that_compare_equal_still_pickle_in_full(cache_dir, edit):
    df = pd.DataFrame({"a": np.arange(4.0)},
                      index=pd.date_range("2020", periods=4, freq="D", name=1))
    df.attrs = {"unit": "m", "n": 1, "flag": False}
    mmcache.save(df, "k")
    got = mmcache.open("k")
    edit(got)
    back = pickle.loads(pickle.dumps(got))
    assert back.attrs == got.attrs and [type(v) for v in back.attrs.values()] == [
        type(v) for v in got.attrs.values()]
    assert type(back.index.name) is type(got.index.name) and back.index.freq == got.index.freq
    assert mmcache.open("k").index.freq == "D"  # and the cache is unchanged


def test_read_only_operations_keep_a_frame_pickling_as_a_reference(cache_dir):
    """cumsum on a masked column with missing values writes scratch values into its input:
    over a private mapping (pandas 2 without copy-on-write) that must not mark the frame
    edited, nor on any pandas raise on read-only memory."""
    df = pd.DataFrame({"m": pd.array([1, None, 3], dtype="Int64"), "o": [None] * 3})
    mmcache.save(df, "k")
    got = mmcache.open("k")
    _pd.assert_series_equal(got["m"].cumsum(), df["m"].cumsum())
    assert got.memory_usage(deep=True).sum() > 0  # pandas 2 needed a writable object array
    assert len(pickle.dumps(got)) < 1000


def test_without_copy_on_write_an_edit_copies_one_page_not_the_column(cache_dir):
    """README (pandas 2 without copy-on-write): an in-place edit copies the 4 KB page it
    touches into the process, not the column; counted in the kernel's page table."""
    if not writes_in_place():
        pytest.skip("pandas copies on write here: the edit copies the column (pandas' own)")
    n = 1_000_000  # 8 MB per column
    mmcache.save(pd.DataFrame({"a": np.zeros(n), "b": np.ones(n)}), "k")
    got = mmcache.open("k")
    assert float(got["a"].sum() + got["b"].sum()) == n  # every page read: all mapped now
    got.iloc[10, 0] = 5.0
    start, end = min((s, e) for s, e, _ in maps_under(cache_dir) if s <= array_buffers(
        got["a"])[0][0] < e)
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // page * 8)
        entries = np.frombuffer(f.read((end - start) // page * 8), dtype="<u8")
    present, file_page = (entries >> 63) & 1, (entries >> 61) & 1
    assert int(((present == 1) & (file_page == 0)).sum()) == 1  # one private page, 4 KB
    assert got["a"].iloc[10] == 5.0 and mmcache.open("k")["a"].iloc[10] == 0.0


def test_open_pauses_the_garbage_collector_only_while_it_builds_the_frame(cache_dir, monkeypatch):
    """Wide frames open faster with collections paused (benchmarks); the collector's state
    is the caller's again afterwards, also when open fails or the caller had paused it."""
    from mmcache import _frame

    mmcache.save(pd.DataFrame({"a": [1.0, 2.0], "c": pd.Categorical(["x", "y"])}), "k")
    seen = []
    decode = _frame.decode
    monkeypatch.setattr(_frame, "decode", lambda *a: (seen.append(gc.isenabled()), decode(*a))[1])
    assert gc.isenabled()
    mmcache.open("k", columns=["c"])
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        mmcache.open("k", columns=["a"])
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(mmcache.MmcacheError):
        mmcache.open("k", columns=["nope"])
    assert gc.isenabled()


def test_public_annotations_resolve_at_run_time():
    """typing.get_type_hints (Sphinx autodoc, pydantic.validate_call, beartype) on every
    public function and method: pandas and pyarrow load on first use, yet the annotations
    that name them resolve (helper-32: NameError on save, open, open_arrow, Entry, Cache)."""
    import inspect
    import typing

    import mmcache.dask

    checked = []
    for module in (mmcache, mmcache.dask):
        for name in getattr(module, "__all__", dir(module)):
            obj = getattr(module, name)
            if getattr(obj, "__module__", "").startswith("mmcache") and (
                    inspect.isfunction(obj) or inspect.isclass(obj)):
                targets = [obj] + ([m for n, m in inspect.getmembers(obj, inspect.isfunction)
                                    if m.__module__.startswith("mmcache")
                                    and not n.startswith("_")]
                                   if inspect.isclass(obj) else [])
                for target in targets:
                    typing.get_type_hints(target)
                    checked.append(target.__qualname__)
    assert {"save", "open", "open_arrow", "ingest", "Entry.open", "Cache.open"} <= set(checked)
