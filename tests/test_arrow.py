"""``mmcache.open_arrow``: a pyarrow Table over the entry's mapped files, and the README's
polars and DuckDB recipes."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import mmcache
from tests import _pd
from tests._zerocopy import maps_under

N = 1_000


def _zoo(n: int = N) -> pd.DataFrame:
    """One column of each kind open_arrow wraps, with missing values where they can be."""
    f = np.linspace(0, 1, n)
    f[::7] = np.nan
    t = pd.date_range("2024-01-01", periods=n, freq="min", tz="Europe/Paris")
    return pd.DataFrame({
        "i": np.arange(n, dtype=np.int64),
        "u8": np.arange(n, dtype=np.uint8),
        "f": f,
        "s": pd.array([None if i % 5 == 0 else f"w{i}" for i in range(n)], dtype=_pd.STR),
        "c": pd.Categorical([("x", "y", None)[i % 3] for i in range(n)]),
        "t": t,
        "naive": t.tz_localize(None),
        "td": pd.to_timedelta(np.arange(n), unit="s"),
        "n": pd.array([None if i % 4 == 0 else i for i in range(n)], dtype="Int64"),
        "b": np.arange(n) % 2 == 0,
    }, index=pd.Index(np.arange(n) * 10, name="row"))


# Buffers open_arrow does not copy (by column: which of the Arrow array's buffers), and those
# it makes (validity bitmaps where pandas has masks, NaN or NaT; booleans as bits).
_SHARED = {"i": [1], "u8": [1], "f": [1], "s": [1, 2], "c": [1], "t": [1], "naive": [1],
           "td": [1], "n": [1], "row": [1]}
_MADE = {"f": [0], "s": [], "c": [0], "n": [0], "b": [1]}


def _in_cache(buf: pa.Buffer, ranges) -> bool:
    return any(s <= buf.address and buf.address + buf.size <= e for s, e, _ in ranges)


def test_open_arrow_maps_every_arrow_form_buffer_and_converts_only_the_listed(cache_dir):
    mmcache.save(_zoo(), "z")
    table = mmcache.open_arrow("z")
    ranges = maps_under(cache_dir)
    assert ranges
    for name in table.column_names:
        column = table.column(name)
        assert column.num_chunks == 1
        arr = column.chunk(0)
        if isinstance(arr, pa.DictionaryArray):
            arr = arr.indices
        bufs = arr.buffers()
        for i in _SHARED.get(name, []):
            assert _in_cache(bufs[i], ranges), (name, i)
        for i in _MADE.get(name, []):
            assert bufs[i] is not None and not _in_cache(bufs[i], ranges), (name, i)
    assert set(_SHARED) | set(_MADE) == set(table.column_names)
    assert table.schema.field("t").type == pa.timestamp(table.schema.field("t").type.unit,
                                                        tz="Europe/Paris")
    assert table.column("f").null_count == len(range(0, N, 7))  # NaN is null, as from_pandas


def test_open_arrow_round_trips_through_to_pandas(cache_dir):
    df = _zoo()
    mmcache.save(df, "z")
    table = mmcache.open_arrow("z")
    assert table.num_rows == N
    _pd.assert_frame_equal(mmcache.open("z"), table.to_pandas(), check_dtype=False)
    back = table.to_pandas()
    assert back.index.name == "row" and "row" in table.column_names
    # a RangeIndex stays metadata, with its start and step
    ranged = df.reset_index(drop=True).set_axis(pd.RangeIndex(5, 5 + 3 * N, 3))
    mmcache.save(ranged, "r")
    t2 = mmcache.open_arrow("r")
    assert t2.column_names == list(df.columns)
    pd.testing.assert_index_equal(t2.to_pandas().index, ranged.index)


def test_open_arrow_columns_entry_and_series(cache_dir):
    entry = mmcache.save(_zoo(), "z")
    table = entry.open_arrow(columns=["s", "i"])
    assert table.column_names == ["s", "i", "row"]
    assert table.column("i").to_pylist()[:3] == [0, 1, 2]
    mmcache.save(pd.Series(np.arange(4.0), name="x"), "ser")
    assert mmcache.open_arrow("ser").column("x").to_pylist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(mmcache.ColumnNotFoundError):
        mmcache.open_arrow("z", columns=["nope"])
    with pytest.raises(mmcache.EntryNotFoundError):
        mmcache.open_arrow("missing")


def test_open_arrow_of_an_ingested_parquet_file(tmp_path, cache_dir):
    df = _zoo().drop(columns=["td"])
    path = tmp_path / "z.parquet"
    df.to_parquet(path, row_group_size=300)
    mmcache.ingest(path, "z", progress=False)
    table = mmcache.open_arrow("z")
    ranges = maps_under(cache_dir)
    assert all(_in_cache(table.column(c).chunk(0).buffers()[1], ranges) for c in ("i", "f", "t"))
    with warnings.catch_warnings():
        # pandas 2.3's own testing: None (to_pandas of Arrow text) against NaN (read_parquet's
        # object text) are equal today, with a FutureWarning that they will not be.
        warnings.simplefilter("ignore", FutureWarning)
        _pd.assert_frame_equal(table.to_pandas(), pd.read_parquet(path), check_dtype=False)


def test_open_arrow_refuses_what_arrow_cannot_hold(cache_dir):
    mmcache.save(pd.DataFrame({"z": np.arange(3) + 1j}), "cplx")
    with pytest.raises(mmcache.UnsupportedTypeError, match=r"column 'z'.*complex"):
        mmcache.open_arrow("cplx")


@pytest.mark.parametrize("frame", [
    pd.DataFrame({0: [1, 2], 1: [3.0, 4.0]}),
    pd.DataFrame(np.ones((2, 3)), columns=pd.RangeIndex(10, 16, 2)),
    pd.DataFrame({1.5: [1, 2], 2.5: [3, 4]}),
    pd.DataFrame({pd.Timestamp("2024-01-01"): [3, 4]}),
    pd.DataFrame({("a", 1): [1, 2], ("b", 2): [3, 4]}),
    pd.DataFrame({0: [1, 2, 3]}, index=pd.RangeIndex(5, 11, 2, name="r")),
    pd.DataFrame({0: [1, 2]}, index=pd.Index([3, 4], name="i")).rename_axis("cols", axis=1),
    pd.Series([1, 2]),
], ids=["int", "range", "float", "timestamp", "tuples", "range-index", "named-axes",
        "series"])
def test_to_pandas_gives_the_labels_from_pandas_gives(frame, cache_dir):
    """Column labels that are not str come back as pa.Table.from_pandas(df).to_pandas() gives
    them (its pandas metadata says their type), not as their str field names."""
    mmcache.save(frame, "k")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pyarrow: non-str names become str
        df = frame.to_frame() if isinstance(frame, pd.Series) else frame
        expected = pa.Table.from_pandas(df).to_pandas()
    got = mmcache.open_arrow("k").to_pandas()
    pd.testing.assert_frame_equal(got, expected)
    assert list(got.columns) == list(df.columns)


def test_open_arrow_of_a_categorical_of_periods_works_as_from_pandas(cache_dir):
    df = pd.DataFrame({"p": pd.Categorical(pd.period_range("2024-01", periods=3, freq="M")),
                       "n": [1, 2, 3]},
                      index=pd.CategoricalIndex(pd.period_range("2020", periods=3, freq="Y")))
    mmcache.save(df, "per")
    try:
        expected = pa.Table.from_pandas(df)
    except pa.ArrowInvalid:  # pyarrow 15 (with pandas 2.2) refuses them: so does open_arrow
        with pytest.raises(mmcache.UnsupportedTypeError,
                           match=r"key 'per': column 'p' .*mmcache.open\('per'\)"):
            mmcache.open_arrow("per")
        return
    table = mmcache.open_arrow("per")
    assert table.schema.types == expected.schema.types
    assert table.column("p").equals(expected.column("p"))
    pd.testing.assert_frame_equal(table.to_pandas(), expected.to_pandas())


@pytest.mark.parametrize("frame, column", [
    (pd.DataFrame({"iv": pd.Categorical(pd.interval_range(0, 3))}), "'iv'"),
    (pd.DataFrame({"z": pd.Categorical([1j, 2j, 1j])}), "'z'"),
    (pd.DataFrame(np.arange(6).reshape(3, 2), columns=["a", "a"]), "'a'"),
    (pd.DataFrame({"a": [1, 2, 3]}, index=pd.CategoricalIndex(pd.interval_range(0, 3))),
     "the index"),
], ids=["interval-categories", "complex-categories", "duplicate-labels", "index"])
def test_open_arrow_says_what_arrow_cannot_hold_and_what_to_do(frame, column, cache_dir):
    mmcache.save(frame, "odd")
    with pytest.raises(mmcache.UnsupportedTypeError) as info:
        mmcache.open_arrow("odd")
    message = str(info.value)
    assert "'odd'" in message and column in message, message
    assert "mmcache.open('odd')" in message, message
    assert ("columns=[...]" in message) == (column != "the index"), message
    assert info.value.key == "odd"
    pd.testing.assert_frame_equal(mmcache.open("odd"), frame)  # the pandas way still works


# --- the README's recipes -----------------------------------------------------------------


def test_polars_recipe_shares_numbers_and_copies_text(cache_dir):
    pl = pytest.importorskip("polars")
    mmcache.save(_zoo(), "z")
    table = mmcache.open_arrow("z")
    frame = pl.from_arrow(table)
    assert frame.height == N
    ranges = maps_under(cache_dir)
    # numbers without nulls: polars keeps Arrow's buffer (to_numpy without copying works)
    ints = frame["i"].to_numpy(allow_copy=False)
    assert any(s <= ints.ctypes.data < e for s, e, _ in ranges)
    assert frame["f"].null_count() == len(range(0, N, 7))
    assert frame.group_by("c").len().sort("c")["len"].to_list() == [333, 334, 333]
    # text: polars stores string_view and rebuilds the column (a copy, in the README)
    assert frame["s"].to_list()[:2] == [None, "w1"]


def test_duckdb_recipe_queries_the_table(cache_dir):
    duckdb = pytest.importorskip("duckdb")
    df = _zoo()
    mmcache.save(df, "z")
    table = mmcache.open_arrow("z")
    con = duckdb.connect()
    con.register("z", table)
    got = con.execute("SELECT c, count(*), sum(i), max(s) FROM z GROUP BY c ORDER BY c").fetchall()
    expected = df.groupby("c", dropna=False, observed=True).agg(
        n=("i", "size"), total=("i", "sum"), top=("s", "max"))
    assert got[:2] == [(k, int(r.n), int(r.total), r.top) for k, r in expected.iloc[:2].iterrows()]
    assert got[2][0] is None
