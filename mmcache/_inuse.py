"""Which live processes map which entries (Linux: /proc/*/maps).

An entry that a process maps keeps its RAM until that process unmaps it, whatever ``clean``
does; ``ls`` shows the count and eviction removes such entries last.
"""

from __future__ import annotations

import os
from pathlib import Path


def mapping_pids(cache_dir: Path) -> dict[str, set[int]] | None:
    """Data directory name -> pids mapping a file in it; None where /proc is not available.

    Cost: reads every readable /proc/PID/maps once (tens of ms on a busy machine). Processes
    of other users are invisible unless running as root, so counts are lower bounds.
    """
    proc = Path("/proc")
    if not (proc / "self" / "maps").exists():
        return None
    try:
        return _scan(proc, os.path.realpath(cache_dir) + os.sep)
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
