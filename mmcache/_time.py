"""Time zones and index frequencies as JSON: named, never pickled, checked to round-trip.

Each ``*_to_json`` decodes what it would store and compares it with the original before
saying yes, so a zone or an offset either comes back exactly or ``save`` refuses it (with
UnsupportedTypeError) before anything is written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import re
import warnings
import zoneinfo
from collections.abc import Callable
from typing import Any

import dateutil.relativedelta
import dateutil.tz
import numpy as np
import pandas as pd

from ._errors import UnsupportedTypeError

Spec = dict[str, Any]

# --- time zones -------------------------------------------------------------------------
# A zone is stored by name, never pickled. Forms (the first two are what earlier versions
# wrote, kept for what they hold exactly): "Europe/Paris" or "dateutil/Europe/Paris" (pandas'
# own name, rebuilt by pandas); {"offset": seconds[, "name": str]} (datetime.timezone);
# {"zoneinfo": key}; {"dateutil": "tzutc" | "tzlocal" | "tzoffset" | "tzfile", ...};
# {"pytz": zone} or {"pytz_fixed": minutes} (the standard library's equal zone without pytz).

# A dateutil zone key: IANA-like names only, so decoding never opens a path named by metadata.
_TZ_KEY = re.compile(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*")


def _first_round_trip(
    original: Any, candidates: list[Any], decode: Callable[[Any], Any],
    same: Callable[[Any, Any], bool],
) -> Any:
    """The first JSON form (never None) that decodes back to something ``same`` as
    ``original``, else None; a form that raises while decoding is just not the one."""
    for value in candidates:
        try:
            if same(decode(value), original):
                return value
        except Exception:
            continue
    return None


def tz_to_json(tz: Any, where: str) -> Any:
    """Name ``tz`` as JSON that rebuilds the same kind of zone, equal to it.

    Raises UnsupportedTypeError when no form does (checked by decoding what would be stored).
    """
    value = _first_round_trip(tz, _tz_candidates(tz), tz_from_json, _same_tz)
    if value is not None:
        return value
    raise UnsupportedTypeError(
        f"{where} has time zone {tz!r}, which mmcache cannot name so that open() rebuilds "
        "it (only named IANA zones, fixed offsets, pytz zones and dateutil's tzutc, tzoffset, "
        "tzlocal and gettz zones can be); convert it to a named zone before save(), e.g. "
        ".dt.tz_convert('UTC') or .dt.tz_convert('Europe/Paris') on a column, "
        ".tz_convert(...) on an index"
    )


def _tz_candidates(tz: Any) -> list[Any]:
    from pandas._libs.tslibs import timezones

    out: list[Any] = []
    try:
        name = timezones.get_timezone(tz)
    except (ValueError, TypeError):
        name = None
    if isinstance(name, str):
        out.append(name)
    if isinstance(tz, _dt.timezone):
        offset = tz.utcoffset(None)
        spec: Spec = {"offset": offset.total_seconds()}
        if repr(tz) != repr(_dt.timezone(offset)):
            spec["name"] = tz.tzname(None)
        out.append(spec)
    elif isinstance(tz, zoneinfo.ZoneInfo):
        if tz.key is not None:
            out.append({"zoneinfo": tz.key})
    elif isinstance(tz, dateutil.tz.tzutc):
        out.append({"dateutil": "tzutc"})
    elif isinstance(tz, dateutil.tz.tzoffset):
        out.append({"dateutil": "tzoffset", "name": tz.tzname(None),
                    "offset": tz.utcoffset(None).total_seconds()})
    elif isinstance(tz, dateutil.tz.tzlocal):
        out.append({"dateutil": "tzlocal"})
    elif type(tz).__module__.split(".")[0] == "pytz":
        # pandas names pytz zones like ZoneInfo ones and rebuilds that name as a ZoneInfo
        zone = getattr(tz, "zone", None)
        if isinstance(zone, str):
            out.append({"pytz": zone})
        elif zone is None and tz.utcoffset(None) is not None:  # pytz.FixedOffset
            out.append({"pytz_fixed": tz.utcoffset(None).total_seconds() / 60})
    elif isinstance(tz, dateutil.tz.tzfile):
        key = getattr(tz, "_key", None)  # dateutil >= 4
        filename = str(getattr(tz, "_filename", ""))
        if key is None and "zoneinfo/" in filename:
            key = filename.rsplit("zoneinfo/", 1)[1]
        if key is not None:
            out.append({"dateutil": "tzfile", "key": key})
    return out


def _same_tz(got: Any, want: Any) -> bool:
    """Same class, same name and same rules (a ZoneInfo made with no_cache is its key's)."""
    if type(got) is not type(want) or repr(got) != repr(want):
        return False
    if isinstance(want, zoneinfo.ZoneInfo):
        return bool(got.key == want.key)
    return bool(got == want)


def tz_from_json(value: Any) -> Any:
    from pandas._libs.tslibs import timezones

    if isinstance(value, str):
        return timezones.maybe_get_tz(value)
    if "zoneinfo" in value:
        return zoneinfo.ZoneInfo(value["zoneinfo"])  # which refuses paths itself
    if "dateutil" in value:
        kind = value["dateutil"]
        if kind == "tzutc":
            return dateutil.tz.tzutc()
        if kind == "tzlocal":
            return dateutil.tz.tzlocal()
        if kind == "tzoffset":
            return dateutil.tz.tzoffset(value["name"], float(value["offset"]))
        if kind == "tzfile":
            key = value["key"]
            if not isinstance(key, str) or not _TZ_KEY.fullmatch(key) or ".." in key:
                raise ValueError(f"bad time zone key {key!r}")
            tz = dateutil.tz.gettz(key)
            if tz is None:
                raise ValueError(f"no time zone {key!r} on this machine")
            return tz
        raise ValueError(f"unknown dateutil zone {kind!r}")
    if "pytz" in value or "pytz_fixed" in value:
        return _pytz_from_json(value)
    offset = _dt.timedelta(seconds=value["offset"])
    name = value.get("name")
    return _dt.timezone(offset) if name is None else _dt.timezone(offset, name)


def _pytz_from_json(value: Spec) -> Any:
    """A pytz zone; without pytz installed, the equal zone of the standard library."""
    try:
        import pytz
    except ImportError:
        pytz = None
    if "pytz_fixed" in value:
        minutes = float(value["pytz_fixed"])
        if pytz is None:
            return _dt.timezone(_dt.timedelta(minutes=minutes))
        return pytz.FixedOffset(minutes)
    zone = value["pytz"]
    if not isinstance(zone, str) or not _TZ_KEY.fullmatch(zone) or ".." in zone:
        raise ValueError(f"bad time zone name {zone!r}")
    return zoneinfo.ZoneInfo(zone) if pytz is None else pytz.timezone(zone)


# --- index freq ---------------------------------------------------------------------------
# Stored as its freqstr (what earlier versions wrote) when pandas parses that back to an
# equal offset, else as {"class": name in pandas.tseries.offsets, "n", "normalize", "kwds"}
# with kwds tagged where JSON cannot tell types apart. Never code: only classes of
# pandas.tseries.offsets are rebuilt, from data.


class _NotStorable(Exception):
    """A freq parameter that has no JSON form."""


def freq_to_json(freq: Any, where: str) -> Any:
    """The JSON form of an index's freq; UnsupportedTypeError unless it decodes equal."""
    value = _first_round_trip(freq, _freq_candidates(freq), freq_from_json, _same_offset)
    if value is not None:
        return value
    raise UnsupportedTypeError(
        f"{where} has freq {freq!r} ({type(freq).__module__}.{type(freq).__qualname__}), which "
        "mmcache cannot store so that it comes back equal; drop it before save(): "
        f"{'df.index.freq = None' if where == 'index' else 'set freq = None on that index'} "
        "(the dates stay; pd.infer_freq(...) or df.asfreq(...) recover a freq after open())"
    )


def _freq_candidates(freq: Any) -> list[Any]:
    out: list[Any] = []
    freqstr = getattr(freq, "freqstr", None)
    if isinstance(freqstr, str):
        out.append(freqstr)
    with contextlib.suppress(_NotStorable):
        out.append(_offset_spec(freq))
    return out


def _offset_spec(freq: Any) -> Spec:
    from pandas.tseries import offsets

    cls = type(freq)
    if getattr(offsets, cls.__name__, None) is not cls:
        raise _NotStorable(cls)
    return {"class": cls.__name__, "n": _param_to_json(freq.n),
            "normalize": _param_to_json(freq.normalize),
            "kwds": {k: _param_to_json(v) for k, v in sorted(freq.kwds.items())}}


def _param_to_json(v: Any) -> Any:
    if isinstance(v, np.generic) and not isinstance(v, np.datetime64 | np.timedelta64):
        v = v.item()
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _NotStorable(v)
        return v
    if isinstance(v, tuple):
        return {"tuple": [_param_to_json(x) for x in v]}
    if isinstance(v, pd.Timedelta):
        return {"Timedelta": v.value, "unit": v.unit}
    if isinstance(v, _dt.timedelta):
        return {"timedelta": [v.days, v.seconds, v.microseconds]}
    if isinstance(v, _dt.time) and v.tzinfo is None:
        return {"time": v.isoformat()}
    if isinstance(v, np.datetime64):
        unit = np.datetime_data(v.dtype)[0]
        return {"datetime64": int(v.astype(np.int64)), "unit": unit}
    if isinstance(v, np.busdaycalendar):
        return {"busdaycalendar": "".join("1" if d else "0" for d in v.weekmask),
                "holidays": [str(h) for h in v.holidays]}
    if isinstance(v, dateutil.relativedelta.weekday):
        return {"weekday": v.weekday, "n": v.n}
    raise _NotStorable(v)


def _param_from_json(v: Any) -> Any:
    if not isinstance(v, dict):
        return v
    if "tuple" in v:
        return tuple(_param_from_json(x) for x in v["tuple"])
    if "Timedelta" in v:
        return pd.Timedelta(int(v["Timedelta"]), unit="ns").as_unit(v["unit"])
    if "timedelta" in v:
        days, seconds, micros = (int(x) for x in v["timedelta"])
        return _dt.timedelta(days=days, seconds=seconds, microseconds=micros)
    if "time" in v:
        return _dt.time.fromisoformat(v["time"])
    if "datetime64" in v:
        return np.array(int(v["datetime64"]), dtype=f"M8[{v['unit']}]")[()]
    if "busdaycalendar" in v:
        holidays = np.array([str(h) for h in v["holidays"]], dtype="M8[D]")
        return np.busdaycalendar(weekmask=str(v["busdaycalendar"]), holidays=holidays)
    if "weekday" in v:
        return dateutil.relativedelta.weekday(int(v["weekday"]), v["n"])
    raise ValueError(f"unknown freq parameter {v!r:.80}")


def freq_from_json(value: Any) -> Any:
    """Rebuild a freq from ``freq_to_json``'s form (or the bare freqstr of older entries)."""
    from pandas.tseries import offsets

    if isinstance(value, str):
        with warnings.catch_warnings():
            # a deprecated alias would warn at every open; it was checked at save
            warnings.simplefilter("ignore")
            return pd.tseries.frequencies.to_offset(value)
    name = value["class"]
    cls = getattr(offsets, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, offsets.BaseOffset)
            and cls.__name__ == name):
        raise ValueError(f"{name!r} is not an offset class of pandas.tseries.offsets")
    kwds = {str(k): _param_from_json(v) for k, v in value["kwds"].items()}
    return cls(value["n"], normalize=bool(value["normalize"]), **kwds)


def _same_offset(got: Any, want: Any) -> bool:
    """Same class, equal, and the same parameters (== ignores some, e.g. a calendar)."""
    if type(got) is not type(want) or got != want or repr(got) != repr(want):
        return False
    try:
        return _offset_spec(got) == _offset_spec(want)
    except _NotStorable:
        return False
