"""Issue 8 (items 7, 8, 9, 14): what independent testers found the codecs get wrong.

Each test is named after its item. Time zones and index freqs of every common origin round-trip
exactly or are refused at save with a message that says what to do; masked columns of an opened
frame support every ordinary method; flags, odd strings, nested attrs, all-missing object
columns and refusal messages behave as a careful user expects.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
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
    t = pd.date_range("2020-03-28", periods=6, freq="7h", tz=tz)
    df = pd.DataFrame({"a": t, "x": np.arange(6.0), "b": t + pd.Timedelta("1D"), "c": t},
                      index=pd.DatetimeIndex(t, name="when"))
    assert df._mgr.blocks[0].shape[0] in (1, 3)  # a, b, c form one tz block (pandas' doing)
    mmcache.save(df, "k")
    got = mmcache.open("k")
    pd.testing.assert_frame_equal(got, df)
    for col in ("a", "b", "c"):
        _same_tz(got[col].dt.tz, tz)
    _same_tz(got.index.tz, tz)
    assert_zero_copy(got, cache_dir)
    s = pd.Series(t, name="s")
    mmcache.save(s, "s")
    pd.testing.assert_series_equal(mmcache.open("s"), s)
    _same_tz(mmcache.open("s").dt.tz, tz)
    cat = pd.DataFrame({"cat": pd.Categorical(t[[0, 1, 0]])})
    mmcache.save(cat, "cat")
    pd.testing.assert_frame_equal(mmcache.open("cat"), cat)


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
    pd.testing.assert_frame_equal(got, df)
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
    pd.testing.assert_frame_equal(got, df)
    _same_offset(got.index.freq, freq)
    # the decoded freq really is the same: it generates the same dates
    pd.testing.assert_index_equal(pd.date_range(index[0], periods=9, freq=got.index.freq),
                                  pd.date_range(index[0], periods=9, freq=freq))
    # pandas keeps the freq on a MultiIndex level and on datetime categories too
    df = pd.DataFrame({"c": pd.Categorical(index)},
                      index=pd.MultiIndex.from_arrays([index, np.arange(len(index))]))
    mmcache.save(df, "k")
    got = mmcache.open("k")
    pd.testing.assert_frame_equal(got, df)
    _same_offset(got.index.levels[0].freq, df.index.levels[0].freq)
    _same_offset(got["c"].cat.categories.freq, df["c"].cat.categories.freq)
    if isinstance(freq, O.Tick):  # a TimedeltaIndex's freq too
        df = pd.DataFrame({"a": np.arange(4)}, index=pd.timedelta_range("1h", periods=4,
                                                                         freq=freq))
        mmcache.save(df, "td")
        pd.testing.assert_frame_equal(mmcache.open("td"), df)
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
    pd.testing.assert_frame_equal(mmcache.open("k"), df)
