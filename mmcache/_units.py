"""Human sizes (``1.5 GB``, ``500MiB``) and durations (``90s``, ``2h``, ``7d``)."""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def _parse(text: str, units: dict[str, int], what: str, examples: str) -> float:
    m = _NUMBER.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in units:
        raise ValueError(
            f"{text!r} is not a {what}; write a number with an optional unit, e.g. {examples}"
        )
    return float(m.group(1)) * units[unit]


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional unit (B, KB, MB, GB, TB, KiB … TiB)."""
    return int(_parse(text, _SIZE_UNITS, "size", "500MB, 1.5GB, 2GiB"))


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional unit (s, m, h, d, w)."""
    return _parse(text, _DURATION_UNITS, "duration", "90s, 30m, 2h, 7d")


def human(n: float) -> str:
    """``1.5 GB`` style (powers of 1000, as ``df -H`` and disk vendors count)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
