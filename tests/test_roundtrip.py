"""Every supported dtype, index and label kind round-trips exactly, and zero-copy.

Zero-copy is checked from outside, as DESIGN.md says: the address of every buffer behind every
column lies in a range of /proc/self/maps that maps a file under the cache directory.
"""

from __future__ import annotations

import datetime as dt
import decimal

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mmcache
from tests import _pd, examples
from tests._zerocopy import assert_zero_copy

N = 7  # rows in zoo columns: small, odd, and with a missing value where the dtype allows one


def _zoo() -> dict[str, pd.Series | pd.api.extensions.ExtensionArray | np.ndarray]:
    rng = np.random.default_rng(0)
    z: dict[str, object] = {"bool": rng.random(N) > 0.5}
    for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        info = np.iinfo(t)
        z[t] = np.array([info.min, info.max, 0, 1, 2, 3, 4], dtype=t)
    for t in ("float16", "float32", "float64"):
        z[t] = np.array([np.nan, -0.0, np.inf, -np.inf, 1.5, 2, 3], dtype=t)
    for t in ("complex64", "complex128"):
        z[t] = np.arange(N, dtype=t) * (1 + 2j)
    for unit in ("s", "ms", "us", "ns"):
        z[f"datetime64[{unit}]"] = pd.Series(
            pd.date_range("1969-12-31 23:59:58", periods=N, freq="s", unit=unit)
        ).where(lambda s: s.index != 3)
        z[f"timedelta64[{unit}]"] = pd.Series(
            pd.to_timedelta(np.arange(N), unit="s").as_unit(unit)
        ).where(lambda s: s.index != 2)
    z["datetime-tz-utc"] = pd.date_range("2020-03-29", periods=N, freq="h", tz="UTC")
    z["datetime-tz-paris-ns"] = pd.date_range(
        "2020-03-29", periods=N, freq="h", tz="Europe/Paris", unit="ns"
    )
    z["datetime-tz-fixed"] = pd.date_range(
        "2020-01-01", periods=N, tz=dt.timezone(dt.timedelta(hours=-3, minutes=-30))
    )
    for t in ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
              "Float32", "Float64"):
        z[t] = pd.array([1, None, 3, 4, 5, None, 0], dtype=t)
    z["boolean"] = pd.array([True, False, None, True, True, False, None], dtype="boolean")
    z["category-str"] = pd.Categorical(["a", "b", None, "a", "c", "b", "a"])
    z["category-ordered-int"] = pd.Categorical([3, 1, 2, 3, 1, 2, 3], categories=[3, 2, 1],
                                               ordered=True)
    z["category-datetime"] = pd.Categorical(pd.date_range("2021", periods=N, freq="D"))
    z["str"] = pd.Series(["x", None, "", "ünïcödé ✓", "long " * 50, "x", "\0nul"], dtype="str")
    z["string-pyarrow"] = pd.array(["a", None, "", "b", "ö", "c", "d"], dtype="string[pyarrow]")
    z["arrow-int64"] = pd.array([1, None, 3, 4, 5, 6, 7], dtype=pd.ArrowDtype(pa.int64()))
    z["arrow-float32"] = pd.array([1.5, None, 3, 4, 5, 6, 7], dtype=pd.ArrowDtype(pa.float32()))
    z["arrow-bool"] = pd.array([True, None, False] * 2 + [True], dtype=pd.ArrowDtype(pa.bool_()))
    z["arrow-string"] = pd.array(["a", None, "c", "d", "", "f", "g"],
                                 dtype=pd.ArrowDtype(pa.string()))
    z["arrow-large-string"] = pd.array(["a", None, "c", "d", "", "f", "g"],
                                       dtype=pd.ArrowDtype(pa.large_string()))
    z["arrow-timestamp-tz"] = pd.array(
        pd.date_range("2020", periods=N, tz="Asia/Tokyo"),
        dtype=pd.ArrowDtype(pa.timestamp("ms", tz="Asia/Tokyo")),
    )
    z["arrow-date32"] = pd.array([dt.date(2020, 1, i + 1) for i in range(N)],
                                 dtype=pd.ArrowDtype(pa.date32()))
    z["arrow-decimal"] = pd.array([decimal.Decimal(f"{i}.25") for i in range(N)],
                                  dtype=pd.ArrowDtype(pa.decimal128(10, 2)))
    z["arrow-binary"] = pd.array([b"a", b"", None, b"\x00\xff", b"x", b"y", b"z"],
                                 dtype=pd.ArrowDtype(pa.binary()))
    z["period-M"] = pd.period_range("2020-01", periods=N, freq="M")
    z["period-D"] = pd.Series(pd.period_range("2020-01-01", periods=N, freq="D")).where(
        lambda s: s.index != 1
    )
    z["interval-int"] = pd.arrays.IntervalArray.from_breaks(np.arange(N + 1))
    z["interval-float-left"] = pd.arrays.IntervalArray.from_arrays(
        np.arange(N, dtype=float), np.arange(N, dtype=float) + 0.5, closed="left"
    )
    z["interval-datetime"] = pd.arrays.IntervalArray.from_breaks(
        pd.date_range("2020", periods=N + 1)
    )
    return {k: pd.Series(v).array
            for k, v in z.items()}


ZOO = _zoo()


def _frame(values) -> pd.DataFrame:
    return pd.DataFrame({"col": values, "n": np.arange(N)}, index=pd.RangeIndex(N))


@pytest.mark.parametrize("name", list(ZOO))
def test_column_round_trips_exactly_and_zero_copy(cache_dir, name):
    df = _frame(ZOO[name])
    mmcache.save(df, name)
    got = mmcache.open(name)
    _pd.assert_frame_equal(got, df)
    assert_zero_copy(got, cache_dir)


@pytest.mark.parametrize("name", list(ZOO))
def test_series_round_trips_as_series(cache_dir, name):
    s = pd.Series(ZOO[name], name=name, index=pd.Index(list("abcdefg"), name="letters"))
    mmcache.save(s, "s")
    got = mmcache.open("s")
    assert isinstance(got, pd.Series)
    _pd.assert_series_equal(got, s)
    assert_zero_copy(got, cache_dir)


def test_whole_zoo_in_one_frame(cache_dir):
    df = pd.DataFrame(ZOO)
    df.attrs = {"source": "zoo", "n": N, "nested": {"a": [1, 2.5, None, True]}}
    mmcache.save(df, "zoo")
    got = mmcache.open("zoo")
    _pd.assert_frame_equal(got, df)
    assert got.attrs == df.attrs
    assert list(got.columns) == list(df.columns)
    assert_zero_copy(got, cache_dir)


@pytest.mark.parametrize(
    ("values", "expected_dtype"),
    [
        (np.array(["a", None, "c"], dtype=object), _pd.STR),
        (np.array(["a", np.nan, "c"], dtype=object), _pd.STR),
        (pd.array(["a", None, "c"], dtype="string[python]"), "string[pyarrow]"),
    ],
    ids=["object-of-str-None", "object-of-str-nan", "string-python"],
)
def test_strings_become_arrow_backed(cache_dir, values, expected_dtype):
    """The documented price of zero-copy: object-of-str opens as str, string[python] as
    string[pyarrow]; values and missing entries are kept."""
    df = pd.DataFrame({"s": values})
    mmcache.save(df, "k")
    got = mmcache.open("k")
    expected = df.astype({"s": expected_dtype})
    _pd.assert_frame_equal(got, expected)
    assert_zero_copy(got, cache_dir)


INDEXES = {
    "range-step": pd.RangeIndex(10, 10 + 3 * N, 3, name="r"),
    "int64": pd.Index([5, 3, 3, 9, -1, 0, 2], name="i"),
    "uint8": pd.Index(np.arange(N, dtype="uint8")),
    "float": pd.Index([0.5, np.nan, 1, 2, 3, 4, 5]),
    "str": pd.Index(list("gfedcba"), name="s"),
    "str-dup": pd.Index(list("aabbccd")),
    "bool": pd.Index([True, False] * 3 + [True]),
    "datetime-freq": pd.date_range("2020", periods=N, freq="D", name="when"),
    "datetime-tz-freq": pd.date_range("2020", periods=N, freq="h", tz="US/Eastern"),
    "datetime-nofreq": pd.DatetimeIndex(["2020-01-03", "2020-01-01", "NaT"] * 2 + ["2021"]),
    "timedelta-freq": pd.timedelta_range("1s", periods=N, freq="s"),
    "period": pd.period_range("2020Q1", periods=N, freq="Q"),
    "category": pd.CategoricalIndex(list("abcabca"), name="c"),
    "interval": pd.IntervalIndex.from_breaks(np.arange(N + 1) * 1.5),
    "Int64": pd.Index(pd.array(list(range(N)), dtype="Int64")),
    "multi": pd.MultiIndex.from_arrays(
        [list("aabbccd"), np.arange(N), pd.date_range("2020", periods=N)],
        names=["l", None, ("tuple", "name")],
    ),
    "object-mixed": pd.Index([1, "a", 2.5, None, True, ("t", 1), "z"], dtype=object),
}


@pytest.mark.parametrize("name", list(INDEXES))
def test_index_round_trips(cache_dir, name):
    df = pd.DataFrame({"x": np.arange(N, dtype=float)}, index=INDEXES[name])
    mmcache.save(df, "k")
    got = mmcache.open("k")
    _pd.assert_frame_equal(got, df, check_index_type=True)
    if name != "object-mixed":
        assert_zero_copy(got, cache_dir, include_index=True)


COLUMN_LABELS = {
    "int": [3, 1, 2],
    "float": [0.5, np.nan, 2.0],
    "str-dup": ["a", "a", "b"],
    "object-mixed": [1, "a", None],
    "tuple": pd.MultiIndex.from_tuples([("a", 1), ("a", 2), ("b", 1)], names=["top", "sub"]),
    "datetime": pd.date_range("2020", periods=3),
    "bool": [True, False, True],
}


@pytest.mark.parametrize("name", list(COLUMN_LABELS))
def test_column_labels_round_trip(cache_dir, name):
    df = pd.DataFrame(np.arange(9, dtype=float).reshape(3, 3), columns=COLUMN_LABELS[name])
    df.columns.name = "cols" if df.columns.nlevels == 1 else None
    mmcache.save(df, "k")
    got = mmcache.open("k")
    _pd.assert_frame_equal(got, df, check_column_type=True)


@pytest.mark.parametrize(
    "df",
    [
        pd.DataFrame(),
        pd.DataFrame({"a": pd.Series([], dtype="float64"), "s": pd.Series([], dtype="str"),
                      "c": pd.Categorical([])}),
        pd.DataFrame(index=pd.date_range("2020", periods=3, name="t")),
        pd.DataFrame(columns=pd.Index([], dtype="str")),
    ],
    ids=["0x0", "0-rows", "0-columns", "0x0-str-columns"],
)
def test_empty_frames(cache_dir, df):
    mmcache.save(df, "k")
    _pd.assert_frame_equal(mmcache.open("k"), df)


def test_consolidated_2d_and_f_ordered_input(cache_dir):
    """A frame built from a 2-D array (one F-ordered block) opens equal, as one block."""
    arr = np.arange(40.0).reshape(10, 4)
    df = pd.DataFrame(arr, columns=list("abcd"))
    df["i"] = np.arange(10)
    df["e"] = np.arange(10.0)  # a second float block, written next to the first
    mmcache.save(df, "k")
    got = mmcache.open("k")
    _pd.assert_frame_equal(got, df)
    assert [b.dtype for b in got._mgr.blocks].count(np.dtype("float64")) == 1
    assert_zero_copy(got, cache_dir)


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (np.array([{"a": 1}, None], dtype=object), ["'bad'", "object", "dict"]),
        (np.array([1, "a"], dtype=object), ["'bad'", "object", "int"]),
        (pd.arrays.SparseArray([0, 1]), ["'bad'", "Sparse"]),
        (pd.array([[1], [2]], dtype=pd.ArrowDtype(pa.list_(pa.int64()))), ["'bad'", "list"]),
        (pd.array([{"x": 1}, {"x": 2}],
                  dtype=pd.ArrowDtype(pa.struct([("x", pa.int64())]))), ["'bad'", "struct"]),
    ],
    ids=["object-dict", "object-mixed", "sparse", "arrow-list", "arrow-struct"],
)
def test_unsupported_column_named_and_nothing_written(cache_dir, values, words):
    df = pd.DataFrame({"ok": [1.0, 2.0], "bad": values})
    with pytest.raises(mmcache.UnsupportedTypeError) as info:
        mmcache.save(df, "k")
    assert isinstance(info.value, TypeError)
    for w in words:
        assert w in str(info.value)
    assert not mmcache.exists("k")
    assert [p for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize(
    "attrs", [{"when": dt.date(2020, 1, 1)}, {"t": (1, 2)}, {1: "int key"}, {"x": float("nan")}],
    ids=["date", "tuple", "int-key", "nan"],
)
def test_attrs_that_json_cannot_hold_exactly_are_refused(cache_dir, attrs):
    df = pd.DataFrame({"a": [1]})
    df.attrs = attrs
    with pytest.raises(mmcache.UnsupportedTypeError, match="attrs"):
        mmcache.save(df, "k")
    assert not mmcache.exists("k")


def test_non_pandas_object_refused(cache_dir):
    with pytest.raises(mmcache.UnsupportedTypeError, match="DataFrame or Series"):
        mmcache.save(np.arange(3), "k")  # type: ignore[arg-type]


# --- properties -----------------------------------------------------------------------------

_dtypes = st.sampled_from(["int8", "int64", "uint16", "float32", "float64", "bool",
                           "datetime64[ms]", "timedelta64[us]", "complex128"])


@st.composite
def frames(draw):
    nrows = draw(st.integers(0, 20))
    ncols = draw(st.integers(0, 6))
    cols = {}
    for i in range(ncols):
        kind = draw(st.sampled_from(["np", "str", "Int64", "category"]))
        if kind == "np":
            dtype = draw(_dtypes)
            arr = draw(hnp.arrays(np.dtype(dtype), nrows))
        elif kind == "str":
            arr = pd.array(draw(st.lists(st.none() | st.text(max_size=8), min_size=nrows,
                                         max_size=nrows)), dtype="str")
        elif kind == "Int64":
            arr = pd.array(draw(st.lists(st.none() | st.integers(-(2**63), 2**63 - 1),
                                         min_size=nrows, max_size=nrows)), dtype="Int64")
        else:
            arr = pd.Categorical(draw(st.lists(st.sampled_from(["x", "y", None]),
                                               min_size=nrows, max_size=nrows)))
        cols[draw(st.sampled_from([f"c{i}", i, "dup"]))] = arr
    return pd.DataFrame(cols, index=pd.RangeIndex(nrows)) if cols else pd.DataFrame(
        index=pd.RangeIndex(nrows))


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(df=frames())
def test_property_any_frame_round_trips(cache_dir, df):
    mmcache.save(df, "prop")
    got = mmcache.open("prop")
    _pd.assert_frame_equal(got, df)
    assert_zero_copy(got, cache_dir)
