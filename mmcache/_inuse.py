"""Which live processes map which entries (Linux: /proc/*/maps).

An entry that a process maps keeps its RAM until that process unmaps it, whatever ``clean``
does; ``ls`` shows the count and eviction removes such entries last.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path

# Within `one_scan()`: cache dir (real path) -> the scan made for it, so a clean of N entries
# reads /proc once, not once per entry (which made clean O(N x processes)).
_SCANS: contextvars.ContextVar[dict[str, dict[str, set[int]] | None] | None] = (
    contextvars.ContextVar("mmcache_scans", default=None)
)


@contextlib.contextmanager
def one_scan() -> Iterator[None]:
    """Within the block, :func:`mapping_pids` scans /proc at most once per cache dir.

    For one listing-and-removal pass: a process that maps a version only after the scan is
    not seen, which is the same race a fresh scan has with a process mapping just after it.
    """
    token = _SCANS.set({})
    try:
        yield
    finally:
        _SCANS.reset(token)


def rescan(cache_dir: Path) -> None:
    """Within :func:`one_scan`, make the next :func:`mapping_pids` of ``cache_dir`` read
    /proc afresh (a batch that unpublished versions must see who maps them now)."""
    scans = _SCANS.get()
    if scans is not None:
        scans.pop(os.path.realpath(cache_dir) + os.sep, None)


def mapping_pids(cache_dir: Path) -> dict[str, set[int]] | None:
    """Data directory name -> pids mapping a file in it; None where /proc is not available.

    Cost: reads every readable /proc/PID/maps once (tens of ms on a busy machine); inside
    :func:`one_scan`, only the first call per cache dir does. Processes of other users are
    invisible unless running as root, so counts are lower bounds.
    """
    prefix = os.path.realpath(cache_dir) + os.sep
    scans = _SCANS.get()
    if scans is not None and prefix in scans:
        return scans[prefix]
    found = _mapping_pids(prefix)
    if scans is not None:
        scans[prefix] = found
    return found


def _mapping_pids(prefix: str) -> dict[str, set[int]] | None:
    proc = Path("/proc")
    if not (proc / "self" / "maps").exists():
        return None
    try:
        return _scan(proc, prefix)
    except OSError:  # out of descriptors, /proc unreadable: say "unknown", never fail
        return None


def _scan(proc: Path, prefix: str) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps", "rb") as f:
                data = f.read()
        except OSError:  # gone, or another user's process
            continue
        if prefix.encode() not in data:
            continue
        pid = int(entry.name)
        for line in data.decode(errors="replace").splitlines():
            idx = line.find(prefix)
            if idx < 0:
                continue
            rest = line[idx + len(prefix):]
            data_dir = rest.split("/", 1)[0]
            out.setdefault(data_dir, set()).add(pid)
    return out
