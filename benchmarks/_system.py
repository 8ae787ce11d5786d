"""Machine facts, memory probes, timers, temp folders and clean-up of child processes."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import gc
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

MB = 1_000_000
GB = 1_000_000_000
# Temp files go to the same tmpfs mmcache uses by default, so writes measure memory bandwidth
# and not a disk; every run removes its folder in a finally block.
SHM = "/dev/shm"
TEMP_PREFIX = "mmcache-bench-"


def mem_available() -> int:
    """``MemAvailable`` from /proc/meminfo, in bytes (what the kernel could still hand out)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def settle() -> int:
    """Collect garbage, hand Arrow's freed pool memory back to the kernel, give the kernel a
    moment to return freed pages, sample MemAvailable."""
    import pyarrow

    gc.collect()
    # mimalloc keeps what a 4 GB read freed, and glibc keeps freed heap (the Pool's pickling
    # thread has an arena of its own): without handing both back, a step would be charged
    # for GBs the previous one left behind.
    pyarrow.default_memory_pool().release_unused()
    _malloc_trim()
    time.sleep(0.1)
    return mem_available()


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def sample_available(count: int = 5, interval: float = 0.04) -> tuple[int, int]:
    """Median and spread (max - min) of ``count`` MemAvailable samples ``interval`` apart.

    Other processes on the machine allocate and free meanwhile; the median damps a passing
    spike, the spread says how much noise there was.
    """
    values = []
    for i in range(count):
        if i:
            time.sleep(interval)
        values.append(mem_available())
    return int(statistics.median(values)), max(values) - min(values)


def _rollup(pid: int, fields: tuple[str, ...]) -> int:
    """The sum of these smaps_rollup fields of a process, in bytes (0 if it is gone)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(fields):
                    total += int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    return total


def tree_memory(fields: tuple[str, ...] = ("Pss_Anon:", "Pss_Shmem:")) -> int:
    """Anonymous and shared-memory pages of this process and all its descendants, each page
    counted once (PSS): the benchmark's own memory, undisturbed by other processes on the
    machine. Library pages (page cache) are left out; tmpfs files that no process maps are
    not seen (when it is sampled, the workers map all the data they read). ``fields``: which
    smaps_rollup lines to add (``("Pss_Anon:",)``: the heaps alone)."""
    pids = [os.getpid()]
    with contextlib.suppress(psutil.Error):
        pids += [p.pid for p in psutil.Process().children(recursive=True)]
    return sum(_rollup(pid, fields) for pid in pids)


def private_anon(pid: int | str = "self") -> int:
    """Bytes of private anonymous memory (heap, anonymous maps) of a process.

    This is what a copy of the data costs a process: USS also counts file and tmpfs pages that
    only this process happens to map (one worker alone over a mapped file), and smaps'
    ``Anonymous`` also counts pages a forked child still shares copy-on-write with its parent.
    """
    total = 0
    anon = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=6)
            if not first:
                continue
            if "-" in first[0] and not first[0].endswith(":"):  # a mapping's header line
                path = first[5] if len(first) > 5 else ""
                anon = path == "" or path in ("[heap]", "[stack]") or path.startswith("[anon")
            elif anon and first[0] in ("Private_Clean:", "Private_Dirty:"):
                total += int(first[1]) * 1024
    return total


def memory_of(proc: psutil.Process | None = None) -> dict[str, int]:
    """USS, PSS, RSS and private anonymous bytes of a process (default: this one)."""
    proc = proc or psutil.Process()
    info = proc.memory_full_info()
    return {"uss": info.uss, "pss": info.pss, "rss": info.rss, "anon": private_anon(proc.pid)}


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, OS and the versions of everything measured."""
    import joblib
    import numpy
    import pandas
    import pyarrow

    import mmcache

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    shm = shutil.disk_usage(SHM) if os.path.isdir(SHM) else None
    return {
        "mmcache_source": _source(Path(mmcache.__file__).resolve().parent.parent),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "shm_bytes": shm.total if shm else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {
            "mmcache": mmcache.__version__,
            "pandas": pandas.__version__,
            "numpy": numpy.__version__,
            "pyarrow": pyarrow.__version__,
            "joblib": joblib.__version__,
            "psutil": psutil.__version__,
        },
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _source(root: Path) -> str:
    """Where the measured mmcache came from: its folder and git commit (dirty if edited)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return f"{root} at commit {out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        return str(root)


@contextlib.contextmanager
def temp_dir(tag: str, need: int = 0) -> Iterator[Path]:
    """A fresh folder on /dev/shm if it is writable and has ``need`` bytes free (Docker gives
    it 64 MB), else in the temp dir; removed on exit whatever happens."""
    base = None
    if os.path.isdir(SHM) and os.access(SHM, os.W_OK) and shutil.disk_usage(SHM).free > need:
        base = SHM
    path = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{tag}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def clear_dir(path: Path) -> None:
    """Remove everything inside ``path`` (between steps, so GBs never pile up)."""
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def kill_children(keep: set[int] = frozenset(), timeout: float = 5.0) -> list[int]:
    """Terminate, then kill, every descendant of this process not in ``keep``; their pids."""
    try:
        children = [p for p in psutil.Process().children(recursive=True) if p.pid not in keep]
    except psutil.Error:
        return []
    for p in children:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in children]


class Interrupted(BaseException):
    """SIGTERM/SIGHUP turned into an exception, so finally blocks clean up."""


def exit_on_signals() -> None:
    def handler(signum: int, _frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    def default_in_child() -> None:
        # A forked worker must die on SIGTERM (Pool.terminate), not run the parent's clean-up.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    os.register_at_fork(after_in_child=default_in_child)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def repeat(
    fn: Callable[[], Any],
    *,
    min_reps: int,
    max_reps: int,
    budget: float,
    before: Callable[[], Any] | None = None,
) -> list[float]:
    """Time ``fn`` at least ``min_reps`` times, more while within ``budget`` seconds.

    ``before`` runs untimed before each repetition (clearing a memo, deleting a file). The
    result of each call is dropped before the next, so memory does not pile up.
    """
    times: list[float] = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < min_reps or spent < budget):
        if before is not None:
            before()
        t, out = timed(fn)
        del out
        times.append(t)
        spent += t
    return times


def summary(times: list[float]) -> dict[str, Any]:
    return {
        "best": min(times),
        "median": statistics.median(times),
        "reps": len(times),
        "times": times,
    }
