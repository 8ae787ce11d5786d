"""The ``mmcache`` command: see what the cache holds and free it.

Exit status: 0 on success, 1 on an error (one ``Error: ...`` line on stderr, no traceback),
2 on bad usage (argparse's own message).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import Cache, Entry, MmcacheError, __version__
from ._units import human, parse_duration, parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", metavar="DIR",
                        help="cache directory (default: $MMCACHE_DIR, else /dev/shm/mmcache-UID)")
    p = argparse.ArgumentParser(
        prog="mmcache", description="Inspect and clean the mmcache shared DataFrame cache."
    )
    p.add_argument("--version", action="version", version=f"mmcache {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = sub.add_parser("ls", parents=[common], help="list entries with size, rows, use")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    info = sub.add_parser("info", parents=[common], help="columns, dtypes and files of KEY")
    info.add_argument("key", metavar="KEY")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    clean = sub.add_parser(
        "clean", parents=[common],
        help="remove entries and stale leftovers (all of them when no selector is given)",
    )
    clean.add_argument("keys", nargs="*", metavar="KEY", help="remove only these keys")
    clean.add_argument("--older-than", type=_duration, metavar="AGE",
                       help="only entries unused for AGE (90s, 30m, 2h, 7d)")
    clean.add_argument("--max-size", type=_size, metavar="SIZE",
                       help="evict least recently used entries until the rest fits (10GB)")
    clean.add_argument("--dry-run", action="store_true", help="remove nothing, show what would go")
    return p


def _shown(key: str) -> str:
    """A key as one table cell: escaped when it holds newlines or other control characters."""
    return key if key.isprintable() else repr(key)


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def _when(t: dt.datetime) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _ago(t: dt.datetime) -> str:
    s = max(0.0, time.time() - t.timestamp())
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= span:
            return f"{s / span:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _entry_json(e: Entry) -> dict[str, Any]:
    return {
        "key": e.key, "path": str(e.path), "nbytes": e.nbytes, "nrows": e.nrows,
        "ncols": e.ncols, "created": e.created.isoformat(), "last_used": e.last_used.isoformat(),
        "in_use": e.in_use,
    }


def _table(rows: list[list[str]], right: Sequence[int] = ()) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _ls(cache: Cache, as_json: bool) -> None:
    entries = cache.entries()
    total = sum(e.nbytes for e in entries)
    if as_json:
        print(json.dumps({"cache_dir": str(cache.dir), "total_bytes": total,
                          "entries": [_entry_json(e) for e in entries]}, indent=2))
        return
    if entries:
        rows = [["KEY", "SIZE", "ROWS", "COLS", "CREATED", "LAST USED", "IN USE"]]
        for e in entries:
            rows.append([_shown(e.key), human(e.nbytes), f"{e.nrows:,}", f"{e.ncols:,}",
                         _when(e.created), _ago(e.last_used),
                         "?" if e.in_use is None else str(e.in_use)])
        print(_table(rows, right=(1, 2, 3, 6)))
    print(f"{_entries(len(entries))}, {human(total)} in {cache.dir}")


def _info(cache: Cache, key: str, as_json: bool) -> None:
    entry, dtypes, index, files = cache._describe(key)
    if as_json:
        out = _entry_json(entry)
        out.update({"index": index, "columns": [{"name": n, "dtype": d} for n, d in dtypes],
                    "files": files})
        print(json.dumps(out, indent=2))
        return
    users = "unknown" if entry.in_use is None else f"{entry.in_use} process(es)"
    print(_table([
        ["key", entry.key], ["path", str(entry.path)],
        ["size", f"{human(entry.nbytes)} ({entry.nbytes:,} bytes)"],
        ["rows", f"{entry.nrows:,}"], ["columns", f"{entry.ncols:,}"],
        ["created", _when(entry.created)],
        ["last used", f"{_when(entry.last_used)} ({_ago(entry.last_used)})"],
        ["in use by", users], ["index", index],
    ]))
    if dtypes:
        print()
        print(_table([["COLUMN", "DTYPE"]] + [[n, d] for n, d in dtypes]))
    print()
    print(_table([["FILE", "DTYPE", "SIZE"]]
                 + [[f["name"], f["dtype"], human(f["size"])] for f in files], right=(2,)))


def _clean(cache: Cache, args: argparse.Namespace) -> None:
    cache_dir = cache.dir
    before = _du(cache_dir)
    removed = cache.clean(args.keys or None, older_than=args.older_than,
                          max_bytes=args.max_size, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for key in args.keys:
        if key not in {e.key for e in removed}:
            print(f"no entry for key {_shown(key)}")
    for e in removed:
        in_use = f", mapped by {e.in_use} process(es)" if e.in_use else ""
        print(f"{verb} {_shown(e.key)}  {human(e.nbytes)}  (last used {_ago(e.last_used)}{in_use})")
    entries_bytes = sum(e.nbytes for e in removed)
    if args.dry_run:
        print(f"would free {human(entries_bytes)} in {_entries(len(removed))}")
        return
    freed = max(0, before - _du(cache_dir))
    leftovers = max(0, freed - entries_bytes)
    if leftovers:
        print(f"removed stale leftovers  {human(leftovers)}")
    remaining = cache.entries()
    print(f"freed {human(freed)}; {_entries(len(remaining))} "
          f"({human(sum(e.nbytes for e in remaining))}) left in {cache_dir}")
    if any(e.in_use for e in removed):
        print("note: entries still mapped by live processes free their memory when those exit")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cache = Cache(args.cache_dir)
    try:
        if args.command == "ls":
            _ls(cache, args.json)
        elif args.command == "info":
            _info(cache, args.key, args.json)
        else:
            _clean(cache, args)
    except BrokenPipeError:  # pragma: no cover - `mmcache ls | head`
        return 0
    except (MmcacheError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
