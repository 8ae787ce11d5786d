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
