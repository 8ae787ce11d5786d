"""Issue 8 (items 7, 8, 9, 14): what independent testers found the codecs get wrong.

Each test is named after its item. Time zones and index freqs of every common origin round-trip
exactly or are refused at save with a message that says what to do; masked columns of an opened
frame support every ordinary method; flags, odd strings, nested attrs, all-missing object
columns and refusal messages behave as a careful user expects.
"""

from __future__ import annotations

import datetime as dt
import decimal
import pickle
import warnings
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dateutil.relativedelta
import dateutil.tz
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pandas.tseries import offsets as O

import mmcache
from mmcache._compat import writes_in_place
from tests import _pd
from tests._zerocopy import assert_zero_copy


def _nothing_written(cache_dir: Path, key: str = "k") -> None:
    assert not mmcache.exists(key)
    if cache_dir.exists():
        assert [p for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == []


def _zone_file(name: str) -> Path:
    for base in zoneinfo.TZPATH:
        path = Path(base) / name
        if path.is_file():
            return path
    import importlib.resources

    return Path(str(importlib.resources.files("tzdata.zoneinfo").joinpath(name)))


# --- item 7: time zones -------------------------------------------------------------------

TZS = {
    "zoneinfo-utc": zoneinfo.ZoneInfo("UTC"),
    "zoneinfo-paris": zoneinfo.ZoneInfo("Europe/Paris"),
    "dateutil-tzutc": dateutil.tz.tzutc(),
    "dateutil-tzoffset": dateutil.tz.tzoffset("X", 3600),
    "dateutil-tzoffset-unnamed": dateutil.tz.tzoffset(None, -5400),
    "dateutil-tzlocal": dateutil.tz.tzlocal(),
    "dateutil-gettz-paris": dateutil.tz.gettz("Europe/Paris"),
    "dateutil-gettz-utc": dateutil.tz.gettz("UTC"),
    "timezone-utc": dt.UTC,
    "timezone-named": dt.timezone(dt.timedelta(hours=5, minutes=30), "IST"),
}


def _same_tz(got: Any, want: Any) -> None:
    assert type(got) is type(want), (got, want)
    assert repr(got) == repr(want)
    when = dt.datetime(2020, 7, 1, 12)
    assert got.utcoffset(when) == want.utcoffset(when)
    assert got.tzname(when) == want.tzname(when)


@pytest.mark.parametrize("name", list(TZS))
def test_item7_time_zones_round_trip(cache_dir, name):
    """Columns, a tz-aware 2-D block, an index and a Series: equal, and the same kind of tz."""
    tz = TZS[name]
    try:
        t = pd.date_range("2020-03-28", periods=6, freq="7h", tz=tz)
    except AttributeError:
        if not _pd.PANDAS_2:
            raise
        pytest.skip("pandas 2 itself cannot localize to this dateutil zone (python-dateutil 4)")
    df = pd.DataFrame({"a": t, "x": np.arange(6.0), "b": t + pd.Timedelta("1D"), "c": t},
                      index=pd.DatetimeIndex(t, name="when"))
    assert df._mgr.blocks[0].shape[0] in (1, 3)  # a, b, c form one tz block (pandas' doing)
    mmcache.save(df, "k")
    got = mmcache.open("k")
    _pd.assert_frame_equal(got, df)
    for col in ("a", "b", "c"):
        _same_tz(got[col].dt.tz, tz)
    _same_tz(got.index.tz, tz)
    assert_zero_copy(got, cache_dir)
    s = pd.Series(t, name="s")
    mmcache.save(s, "s")
    _pd.assert_series_equal(mmcache.open("s"), s)
    _same_tz(mmcache.open("s").dt.tz, tz)
    cat = pd.DataFrame({"cat": pd.Categorical(t[[0, 1, 0]])})
    mmcache.save(cat, "cat")
    _pd.assert_frame_equal(mmcache.open("cat"), cat)


def test_item7_pytz_zones_round_trip_as_pytz_or_their_standard_equal(cache_dir, monkeypatch):
    """pytz zones saved before (coming back as ZoneInfo) must not start being refused: they
    come back as pytz zones, or as the standard library's equal zone where pytz is missing."""
    pytz = pytest.importorskip("pytz")
    zones = [pytz.timezone("Europe/Paris"), pytz.utc, pytz.FixedOffset(90)]
    df = pd.DataFrame({f"t{i}": pd.date_range("2020-03-28", periods=4, freq="11h", tz=tz)
                       for i, tz in enumerate(zones)})
    mmcache.save(df, "k")
    mmcache.save(df, "elsewhere")
    got = mmcache.open("k")
    _pd.assert_frame_equal(got, df)
    for i, tz in enumerate(zones):
        assert got[f"t{i}"].dt.tz is tz
    if _pd.PANDAS_2:
        return  # pytz is one of pandas 2's own dependencies: never missing there
    monkeypatch.setitem(__import__("sys").modules, "pytz", None)  # a process without pytz
    got = mmcache.open("elsewhere")
    standard = [zoneinfo.ZoneInfo("Europe/Paris"), zoneinfo.ZoneInfo("UTC"),
                dt.timezone(dt.timedelta(minutes=90))]
    for i, tz in enumerate(standard):
        _same_tz(got[f"t{i}"].dt.tz, tz)
        _pd.assert_series_equal(got[f"t{i}"].dt.tz_convert("UTC"),
                                       df[f"t{i}"].dt.tz_convert("UTC"))


def test_item7_time_zones_from_parquet_round_trip(cache_dir, tmp_path):
    table = pa.table({
        "utc": pa.array([0, 10**6], pa.timestamp("us", tz="UTC")),
        "paris": pa.array([0, 10**6], pa.timestamp("us", tz="Europe/Paris")),
        "fixed": pa.array([0, 10**6], pa.timestamp("ms", tz="+05:30")),
    })
    pq.write_table(table, tmp_path / "t.parquet")
    df = pd.read_parquet(tmp_path / "t.parquet")
    mmcache.save(df, "k")
    got = mmcache.open("k")
    _pd.assert_frame_equal(got, df)
    for col in df.columns:
        _same_tz(got[col].dt.tz, df[col].dt.tz)


@pytest.mark.parametrize("where", ["column", "index", "series"])
def test_item7_unnameable_time_zone_refused(cache_dir, where):
    with open(_zone_file("Europe/Paris"), "rb") as f:
        tz = zoneinfo.ZoneInfo.from_file(f)  # key None: nothing to look it up by when opening
    t = pd.date_range("2020", periods=3, tz=tz)
    obj: Any = {
        "column": pd.DataFrame({"ok": [1, 2, 3], "when": t}),
        "index": pd.DataFrame({"ok": [1, 2, 3]}, index=t),
        "series": pd.Series(t, name="when"),
    }[where]
    with pytest.raises(mmcache.UnsupportedTypeError) as info:
        mmcache.save(obj, "k")
    msg = str(info.value)
    assert ("index" if where == "index" else "'when'") in msg
    assert "tz_convert" in msg
    _nothing_written(cache_dir)


# --- item 8: index freq ---------------------------------------------------------------------

_CAL = np.busdaycalendar(weekmask="1111110", holidays=["2020-01-02", "2020-01-09"])
FREQS = {
    "dateoffset-months": pd.DateOffset(months=1),
    "dateoffset-mixed": pd.DateOffset(months=1, days=2, hour=3),
    "dateoffset-n": pd.DateOffset(2, normalize=True, weeks=1),
    "dateoffset-weekday": pd.DateOffset(months=1, weekday=dateutil.relativedelta.MO(2)),
    "easter": O.Easter(),
    "custom-business-day-calendar": O.CustomBusinessDay(calendar=_CAL),
    "custom-business-day-holidays": O.CustomBusinessDay(2, holidays=["2020-01-03"],
                                                        weekmask="Mon Wed Fri"),
    "business-hour": O.BusinessHour(start="10:00", end="12:00"),
    "custom-business-hour": O.CustomBusinessHour(start=["09:00", "13:00"],
                                                 end=["12:00", "17:00"], holidays=["2020-01-06"]),
    "month-end-normalize": O.MonthEnd(normalize=True),
    "month-end-negative": O.MonthEnd(-2),
    "business-day-offset": O.BusinessDay(offset=pd.Timedelta(hours=1)),
    "custom-business-month-end": O.CustomBusinessMonthEnd(holidays=["2020-01-31"]),
    "week": O.Week(weekday=2),
    "week-of-month": O.WeekOfMonth(week=1, weekday=3),
    "last-week-of-month": O.LastWeekOfMonth(weekday=4),
    "semi-month-end": O.SemiMonthEnd(day_of_month=20),
    "quarter-end": O.QuarterEnd(startingMonth=2),
    "year-begin": O.YearBegin(month=3),
    "fy5253": O.FY5253(weekday=1, startingMonth=2, variation="last"),
    "fy5253-quarter": O.FY5253Quarter(weekday=1, startingMonth=2, qtr_with_extra_week=3,
                                      variation="nearest"),
    "hour": O.Hour(3),
    "minute": O.Minute(90),
    "day": O.Day(2),
    "plain-month-end": O.MonthEnd(),
}


def _same_offset(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    assert got == want and got.n == want.n and got.normalize == want.normalize
    assert repr(got) == repr(want)
    for k, v in want.kwds.items():
        if k == "calendar":  # == ignores it, yet it decides which days count
            assert (got.calendar.weekmask == v.weekmask).all()
            assert (got.calendar.holidays == v.holidays).all()
        else:
            assert got.kwds[k] == v, k


@pytest.mark.parametrize("name", list(FREQS))
def test_item8_index_freq_round_trips(cache_dir, name):
    freq = FREQS[name]
    index = pd.date_range("2020-01-01", periods=5, freq=freq, name="t")
    df = pd.DataFrame({"a": np.arange(len(index))}, index=index)
    mmcache.save(df, "k")
    got = mmcache.open("k")
    _pd.assert_frame_equal(got, df)
    _same_offset(got.index.freq, freq)
    # the decoded freq really is the same: it generates the same dates
    _pd.assert_index_equal(pd.date_range(index[0], periods=9, freq=got.index.freq),
                                  pd.date_range(index[0], periods=9, freq=freq))
    # pandas keeps the freq on a MultiIndex level and on datetime categories too
    df = pd.DataFrame({"c": pd.Categorical(index)},
                      index=pd.MultiIndex.from_arrays([index, np.arange(len(index))]))
    mmcache.save(df, "k")
    got = mmcache.open("k")
    _pd.assert_frame_equal(got, df)
    _same_offset(got.index.levels[0].freq, df.index.levels[0].freq)
    _same_offset(got["c"].cat.categories.freq, df["c"].cat.categories.freq)
    if isinstance(freq, O.Tick):  # a TimedeltaIndex's freq too
        df = pd.DataFrame({"a": np.arange(4)}, index=pd.timedelta_range("1h", periods=4,
                                                                         freq=freq))
        mmcache.save(df, "td")
        _pd.assert_frame_equal(mmcache.open("td"), df)
        _same_offset(mmcache.open("td").index.freq, freq)


class _HomeMadeOffset(pd.DateOffset):
    """An offset class outside pandas.tseries.offsets: mmcache must never rebuild it."""


def test_item8_freq_that_cannot_be_stored_is_refused(cache_dir):
    index = pd.date_range("2020-01-01", periods=3, freq=_HomeMadeOffset(months=1))
    assert isinstance(index.freq, _HomeMadeOffset)
    df = pd.DataFrame({"a": [1, 2, 3]}, index=index)
    with pytest.raises(mmcache.UnsupportedTypeError) as info:
        mmcache.save(df, "k")
    msg = str(info.value)
    assert "index" in msg and "_HomeMadeOffset" in msg and "freq = None" in msg
    _nothing_written(cache_dir)
    df.index.freq = None  # what the message says to do works
    mmcache.save(df, "k")
    _pd.assert_frame_equal(mmcache.open("k"), df)


# --- item 9: masked columns of an opened frame ----------------------------------------------

MASKED = ["Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
          "Float32", "Float64", "boolean"]


def _masked_frame() -> pd.DataFrame:
    cols: dict[str, Any] = {}
    for dtype in MASKED:
        if dtype == "boolean":
            values: list[Any] = [True, None, False, True, None, True, False]
        else:
            values = [3, None, 1 if dtype.startswith("U") else -1, 2, None, 5, 0]
        arr = pd.array(values, dtype=dtype)
        cols[dtype] = arr
        cols[f"{dtype} no NA"] = arr.fillna(arr[0])
    return pd.DataFrame(cols)


def _inplace(method: str, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
    def call(obj: Any) -> Any:
        target = obj.copy(deep=False)
        getattr(target, method)(*args, inplace=True, **kwargs)
        return target

    return call


def _numeric(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Only for non-boolean dtypes (pandas refuses the call on boolean itself)."""
    return lambda s: f(s) if s.dtype != "boolean" else s


def _set_then(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The result of f edited in place: it must own (or copy) what it writes into."""

    def call(s: Any) -> Any:
        result = f(s)
        result.iloc[1] = s.iloc[0]
        return result

    return call


SERIES_METHODS: dict[str, Callable[[Any], Any]] = {
    "cumsum": lambda s: s.cumsum(),
    "cumprod": lambda s: s.cumprod(),
    "cummin": lambda s: s.cummin(),
    "cummax": lambda s: s.cummax(),
    "cumsum-skipna-false": lambda s: s.cumsum(skipna=False),
    "cummax-skipna-false": lambda s: s.cummax(skipna=False),
    "cumsum-then-set": _set_then(lambda s: s.cumsum()),
    "cummin-then-set": _set_then(lambda s: s.cummin()),
    "fillna": lambda s: s.fillna(s.dropna().iloc[0]),
    "fillna-limit": lambda s: s.fillna(s.dropna().iloc[0], limit=1),
    "fillna-then-set": _set_then(lambda s: s.fillna(s.dropna().iloc[0])),
    "ffill": lambda s: s.ffill(),
    "bfill-limit": lambda s: s.bfill(limit=1),
    "ffill-inside": lambda s: s.ffill(limit_area="inside"),
    "interpolate": lambda s: s.interpolate() if s.dtype.kind == "f" else s,
    "clip": _numeric(lambda s: s.clip(0, 2)),
    "round": _numeric(lambda s: s.round(1)),
    "abs": _numeric(lambda s: s.abs()),
    "diff": _numeric(lambda s: s.diff()),
    "shift": lambda s: s.shift(1),
    "sum": lambda s: s.sum(),
    "sum-skipna-false": lambda s: s.sum(skipna=False),
    "prod": lambda s: s.prod(),
    "min": lambda s: s.min(),
    "max": lambda s: s.max(),
    "mean": lambda s: s.mean(),
    "median": lambda s: s.median(),
    "std": lambda s: s.std(),
    "var": lambda s: s.var(),
    "sem": lambda s: s.sem(),
    "skew": lambda s: s.skew(),
    "kurt": lambda s: s.kurt(),
    "any": lambda s: s.any(),
    "all-skipna-false": lambda s: s.all(skipna=False),
    "idxmax": lambda s: s.idxmax(),
    "quantile": _numeric(lambda s: s.quantile(0.3)),
    "describe": lambda s: s.describe(),
    "nunique": lambda s: s.nunique(),
    "unique": lambda s: s.unique(),
    "value-counts": lambda s: s.value_counts(dropna=False),
    "mode": lambda s: s.mode(),
    "duplicated": lambda s: s.duplicated(),
    "rank": lambda s: s.rank(),
    "sort-values": lambda s: s.sort_values(),
    "argsort": lambda s: s.argsort(),
    "isna": lambda s: s.isna(),
    "dropna": lambda s: s.dropna(),
    "where": lambda s: s.where(s.index % 2 == 0),
    "mask": lambda s: s.mask(s.index % 2 == 0),
    "replace": lambda s: s.replace(s.iloc[0], s.iloc[2]),
    "isin": lambda s: s.isin([s.iloc[0]]),
    "astype-object": lambda s: s.astype(object),
    "astype-Float64": lambda s: s.astype("Float64"),
    "add": lambda s: s + s,
    "compare": lambda s: s > s.iloc[0],
    "numpy-ufunc": lambda s: np.maximum(s, s),
    "rolling": _numeric(lambda s: s.rolling(2).sum()),
    "expanding": _numeric(lambda s: s.expanding().mean()),
    "groupby-sum": lambda s: s.groupby(s.index % 2).sum(),
    "groupby-cumsum": lambda s: s.groupby(s.index % 2).cumsum(),
    "groupby-cummax": lambda s: s.groupby(s.index % 2).cummax(),
    "groupby-ffill": lambda s: s.groupby(s.index % 2).ffill(),
    "combine-first": lambda s: s.combine_first(s.iloc[::-1]),
    "hash": lambda s: pd.util.hash_pandas_object(s),
    "fillna-inplace": lambda s: _inplace("fillna", s.dropna().iloc[0])(s),
    "ffill-inplace": _inplace("ffill"),
    "interpolate-inplace": lambda s: _inplace("interpolate")(s) if s.dtype.kind == "f" else s,
    "clip-inplace": _numeric(_inplace("clip", 0, 2)),
    "where-inplace": lambda s: _inplace("where", s.index % 2 == 0)(s),
    "replace-inplace": lambda s: _inplace("replace", s.iloc[0], s.iloc[2])(s),
}

FRAME_METHODS: dict[str, Callable[[pd.DataFrame], Any]] = {
    "cumsum": lambda df: df.cumsum(),
    "cumprod": lambda df: df.cumprod(),
    "cummin": lambda df: df.cummin(),
    "cummax": lambda df: df.cummax(),
    "cumsum-then-loc": lambda df: _set_then(lambda d: d.cumsum())(df),
    "fillna": lambda df: df.fillna(1),
    "fillna-inplace": _inplace("fillna", 1),
    "ffill": lambda df: df.ffill(),
    "sum": lambda df: df.sum(),
    "min": lambda df: df.min(),
    "mean": lambda df: df.mean(),
    "any": lambda df: df.any(),
    "describe": lambda df: df.describe(),
    "transpose": lambda df: df.T,
    "rank": lambda df: df.rank(),
    "clip": lambda df: df.clip(0, 2),
    "round": lambda df: df.round(1),
    "quantile": lambda df: df.quantile(0.5),
    "groupby-sum": lambda df: df.groupby(df.index % 2).sum(),
    "groupby-cumsum": lambda df: df.groupby(df.index % 2).cumsum(),
    "concat": lambda df: pd.concat([df, df]),
    "stack": lambda df: df.stack(),
    "drop-duplicates": lambda df: df.drop_duplicates(),
}


def _same_result(got: Any, want: Any) -> None:
    # Results of the same call on masked columns (no str data): compared exactly.
    if isinstance(want, pd.DataFrame):
        pd.testing.assert_frame_equal(got, want)
    elif isinstance(want, pd.Series):
        pd.testing.assert_series_equal(got, want)
    elif isinstance(want, pd.Index):
        pd.testing.assert_index_equal(got, want)
    elif isinstance(want, pd.api.extensions.ExtensionArray):
        pd.testing.assert_extension_array_equal(got, want)
    elif isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want)
    else:
        assert type(got) is type(want)
        assert got is want or got == want or (pd.isna(got) and pd.isna(want))


def _compare(f: Callable[[Any], Any], original: Any, opened: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas' own (e.g. degrees of freedom) on both sides
        try:
            want = f(original)
        except Exception as exc:  # pandas refuses the call on a plain frame too: same here
            with pytest.raises(type(exc)):
                f(opened)
            return
        got = f(opened)
    _same_result(got, want)


def test_item9_masked_accumulations_work_on_an_opened_frame(cache_dir):
    df = _masked_frame()
    mmcache.save(df, "k")
    got = mmcache.open("k")
    for col in MASKED:
        for name in ("cumsum", "cumprod", "cummin", "cummax"):
            if col == "boolean" and name == "cumprod":
                continue  # pandas has no cumprod for boolean
            _pd.assert_series_equal(getattr(got[col], name)(), getattr(df[col], name)())
    _pd.assert_frame_equal(got.cumsum(), df.cumsum())
    # the mapped buffers stay read-only: raw writes still raise, and nothing was changed
    # (pandas 2 without copy-on-write: the frame's own private pages, as a plain frame's)
    for col in ([] if writes_in_place() else MASKED):
        with pytest.raises(ValueError, match="read-only"):
            got[col].array._data[0] = 1
        with pytest.raises(ValueError, match="read-only"):
            got[col].array._mask[0] = True
    _pd.assert_frame_equal(got, df)
    _pd.assert_frame_equal(mmcache.open("k"), df)
    assert_zero_copy(got, cache_dir)


@pytest.mark.parametrize("method", list(SERIES_METHODS))
def test_item9_series_methods_on_masked_columns_match_a_plain_frame(cache_dir, method):
    df = _masked_frame()
    mmcache.save(df, "k")
    for col in df.columns:
        _compare(SERIES_METHODS[method], df[col].copy(), mmcache.open("k")[col])
    _pd.assert_frame_equal(mmcache.open("k"), df)  # nothing reached the cache


@pytest.mark.parametrize("method", list(FRAME_METHODS))
def test_item9_frame_methods_on_masked_columns_match_a_plain_frame(cache_dir, method):
    df = _masked_frame()
    mmcache.save(df, "k")
    for cols in (MASKED, [f"{c} no NA" for c in MASKED], ["Int64", "Int64 no NA"]):
        _compare(FRAME_METHODS[method], df[cols].copy(), mmcache.open("k")[cols])
    _pd.assert_frame_equal(mmcache.open("k"), df)


# --- item 14a: flags ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["frame", "series"])
def test_item14a_allows_duplicate_labels_round_trips_and_counts_as_an_edit(cache_dir, kind):
    obj: Any = pd.DataFrame({"a": [1, 2], "b": [3.0, 4.0]}) if kind == "frame" else pd.Series(
        [1, 2], name="a")
    strict = obj.set_flags(allows_duplicate_labels=False)
    mmcache.save(strict, "strict")
    got = mmcache.open("strict")
    assert got.flags.allows_duplicate_labels is False
    back = pickle.loads(pickle.dumps(got))
    assert back.flags.allows_duplicate_labels is False
    assert len(pickle.dumps(got)) < 1000  # still a reference while unmodified

    mmcache.save(obj, "loose")
    got = mmcache.open("loose")
    assert got.flags.allows_duplicate_labels is True
    assert len(pickle.dumps(got)) < 1000
    got.flags.allows_duplicate_labels = False  # a modification: pickles with the flag
    back = pickle.loads(pickle.dumps(got))
    assert back.flags.allows_duplicate_labels is False
    assert mmcache.open("loose").flags.allows_duplicate_labels is True  # other frames unchanged


# --- item 14b: lone surrogates and deep nesting ---------------------------------------------

_BAD = "a\ud800b"


def _with_lone_surrogate(where: str) -> Any:
    bad = pd.Index([_BAD, "x"], dtype=object)
    if where == "column":
        return pd.DataFrame({"ok": [1, 2], "text": pd.Series(bad, dtype=object)})
    if where == "index":
        return pd.DataFrame({"ok": [1, 2]}, index=bad)
    if where == "categories":
        return pd.DataFrame({"text": pd.Categorical(bad)})
    if where == "series":
        return pd.Series(bad, dtype=object, name="text")
    df = pd.DataFrame([[1, 2]], columns=pd.Index(["a", "b"], dtype=object))
    if where == "label":
        df.columns = pd.Index([_BAD, "b"], dtype=object)
    elif where == "index-name":
        df.index.name = _BAD
    elif where == "attrs-value":
        df.attrs = {"note": _BAD}
    else:
        df.attrs = {_BAD: 1}
    return df


@pytest.mark.parametrize("where", ["column", "index", "categories", "series", "label",
                                   "index-name", "attrs-value", "attrs-key"])
def test_item14b_lone_surrogates_are_refused_by_name_or_round_trip(cache_dir, where):
    """Values (stored as UTF-8) are refused naming where; labels, names and attrs (JSON, which
    holds them exactly) may round-trip. Never a raw UnicodeEncodeError, never files left."""
    obj = _with_lone_surrogate(where)
    if where in ("column", "index", "categories", "series"):
        with pytest.raises(mmcache.UnsupportedTypeError) as info:
            mmcache.save(obj, "k")
        msg = str(info.value)
        assert ("index" if where == "index" else "'text'") in msg
        assert "surrogate" in msg
        _nothing_written(cache_dir)
        return
    try:
        mmcache.save(obj, "k")
    except mmcache.UnsupportedTypeError:
        _nothing_written(cache_dir)
        return
    got = mmcache.open("k")
    _pd.assert_frame_equal(got, obj)
    assert got.attrs == obj.attrs


@pytest.mark.parametrize("depth", [5000, 600])
def test_item14b_deeply_nested_attrs_are_refused(cache_dir, depth):
    nested: list[Any] = []
    inner = nested
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    df = pd.DataFrame({"a": [1]})
    df.attrs = {"deep": nested}
    with pytest.raises(mmcache.UnsupportedTypeError, match="attrs"):
        mmcache.save(df, "k")
    _nothing_written(cache_dir)
    df.attrs = {"ok": [[[[{"a": [1]}]]]]}  # ordinary nesting is fine
    mmcache.save(df, "k")
    assert mmcache.open("k").attrs == df.attrs
    label: Any = "a"
    for _ in range(depth):
        label = (label,)
    deep_label = pd.DataFrame({"a": [1]}, index=pd.Index([label], dtype=object,
                                                          tupleize_cols=False))
    with pytest.raises(mmcache.UnsupportedTypeError, match="nested too deeply"):
        mmcache.save(deep_label, "deep-label")
    assert not mmcache.exists("deep-label")


# --- item 14c: object columns holding only missing values -----------------------------------

MISSING = {
    "none": [None, None, None],
    "nan": [np.nan, np.nan, np.nan],
    "none-and-nan": [None, np.nan, None],
    "na-and-none": [pd.NA, None, np.nan],
    "nat-and-none": [pd.NaT, None, pd.NaT],
}


@pytest.mark.parametrize("name", list(MISSING))
def test_item14c_all_missing_object_columns_stay_object(cache_dir, name):
    values = MISSING[name]
    df = pd.DataFrame({"note": pd.Series(values, dtype=object), "x": [1.0, 2.0, 3.0]})
    mmcache.save(df, "k")
    got = mmcache.open("k")
    _pd.assert_frame_equal(got, df)
    assert got["note"].dtype == object
    assert [type(v) for v in got["note"]] == [type(v) for v in values]
    if not writes_in_place():  # (pandas 2 without copy-on-write: the frame's own array)
        with pytest.raises(ValueError, match="read-only"):
            got["note"].to_numpy()[0] = 5  # shared by every open() in this process
    got.loc[0, "note"] = 5  # an edit copies the column, as for any other column
    assert got.loc[0, "note"] == 5
    _pd.assert_frame_equal(mmcache.open("k"), df)
    s = pd.Series(values, dtype=object, name="s")
    mmcache.save(s, "s")
    _pd.assert_series_equal(mmcache.open("s"), s)
    opened = mmcache.open("s")
    opened.iloc[1] = "text"
    _pd.assert_series_equal(mmcache.open("s"), s)
    # a damaged entry is refused, not misread: codes are checked at open
    other = cache_dir.parent / "damaged"
    mmcache.save(s, "s", cache_dir=other)
    (codes_file,) = [f for f in other.glob("*/*.npy") if np.load(f).dtype == np.uint8]
    damaged = np.load(codes_file, mmap_mode="r+")
    damaged[:] = 200
    damaged.flush()
    del damaged
    with pytest.raises(mmcache.CorruptEntryError):
        mmcache.open("s", cache_dir=other)


def test_item14c_issue_example(cache_dir):
    df = pd.DataFrame({"note": [None, None]}, dtype=object)
    mmcache.save(df, "k")
    got = mmcache.open("k")
    _pd.assert_frame_equal(got, df)
    got.loc[0, "note"] = 5
    assert got["note"].tolist() == [5, None]
    assert pickle.loads(pickle.dumps(got))["note"].tolist() == [5, None]


# --- item 14d: messages for object columns --------------------------------------------------

OBJECTS = {
    "date": (dt.date(2020, 1, 1), "datetime.date", "pd.to_datetime"),
    "datetime": (dt.datetime(2020, 1, 1), "datetime.datetime", "pd.to_datetime"),
    "timestamp": (pd.Timestamp("2020"), "Timestamp", "pd.to_datetime"),
    "time": (dt.time(12), "datetime.time", "pa.time64"),
    "timedelta": (dt.timedelta(1), "datetime.timedelta", "pd.to_timedelta"),
    "decimal": (decimal.Decimal("1.5"), "decimal.Decimal", "pa.decimal128"),
    "dict": ({"a": 1}, "dict", "json.dumps"),
    "list": ([1], "list", "json.dumps"),
    "bytes": (b"x", "bytes", "pa.binary()"),
    "int": (1, "int", "pd.to_numeric"),
    "float": (1.5, "float", "pd.to_numeric"),
    "bool": (True, "bool", "boolean"),
    "object": (object(), "object", "astype(str)"),
}


@pytest.mark.parametrize("name", list(OBJECTS))
def test_item14d_unsupported_object_messages_name_the_type_and_a_conversion(cache_dir, name):
    value, type_name, conversion = OBJECTS[name]
    df = pd.DataFrame({"col": pd.Series([value, None], dtype=object)})
    with pytest.raises(mmcache.UnsupportedTypeError) as info:
        mmcache.save(df, "k")
    msg = str(info.value)
    assert "'col'" in msg and type_name in msg and conversion in msg, msg
    # never claims to store what it just refused
    assert "stores numbers, booleans, dates" not in msg
    _nothing_written(cache_dir)
