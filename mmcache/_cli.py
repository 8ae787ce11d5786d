"""The ``mmcache`` command: see what the cache holds, free it, ingest parquet and CSV.

Exit status: 0 on success, 1 on an error (one ``Error: ...`` line on stderr, no traceback),
2 on bad usage (argparse's own message).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from . import Cache, Entry, MmcacheError, __version__
from ._errors import CacheDirError, CorruptEntryError, EntryNotFoundError, UnsupportedFormatError
from ._paths import entry_name
from ._survey import Problem, Stray, Survey
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
    common.add_argument(
        "--cache-dir", metavar="DIR",
        help="cache directory (default: $MMCACHE_DIR, else both default places: "
             "/dev/shm/mmcache-UID, or $MMCACHE_SHM/mmcache-UID, and the disk-backed "
             "$TMPDIR/mmcache-UID that saves use when RAM is full)",
    )
    p = argparse.ArgumentParser(
        prog="mmcache", description="Inspect and clean the mmcache shared DataFrame cache.",
        epilog="environment: MMCACHE_DIR names the one cache directory (no fallback); "
               "MMCACHE_SHM names the RAM file system of the default cache (default "
               "/dev/shm); TMPDIR, the disk-backed fallback's parent; MMCACHE_MAX_BYTES caps "
               "the cache (both places together).",
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
    clean.add_argument("--stale", action="store_true",
                       help="remove only damaged entries and leftovers of interrupted saves")
    clean.add_argument("--dry-run", action="store_true", help="remove nothing, show what would go")
    ingest = sub.add_parser(
        "ingest", parents=[common],
        help="write a parquet file or directory, or a CSV file, under KEY in bounded memory",
    )
    ingest.add_argument("source", metavar="SOURCE", help="parquet file or directory, or CSV file")
    ingest.add_argument("key", metavar="KEY")
    ingest.add_argument("--columns", metavar="A,B", type=lambda t: t.split(","),
                        help="only these columns (comma-separated; the index comes along)")
    ingest.add_argument("--no-progress", action="store_true",
                        help="no progress bar (shown on a terminal for long ingests)")
    return p


def _ingest(cache: Cache, args: argparse.Namespace) -> None:
    entry = cache.ingest(args.source, args.key, columns=args.columns,
                         progress=False if args.no_progress else None)
    print(f"ingested {_shown(entry.key)}: {entry.nrows:,} rows, {entry.ncols} columns, "
          f"{human(entry.nbytes)} in {entry.cache_dir}")


def _shown(key: str) -> str:
    """A key as one table cell: escaped when it holds newlines or other control characters."""
    return key if key.isprintable() else repr(key)


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _problem_name(p: Problem) -> str:
    return _shown(p.key) if p.key is not None else f"(key unreadable) {p.name}"


def _remedy(p: Problem) -> str:
    """What to do about an entry that cannot be listed."""
    if p.kind == "newer":
        return "upgrade mmcache to read it"
    if p.kind == "unreadable":
        return "only its owner can read or remove it"
    if p.key is not None and p.key.isprintable():
        return f"`mmcache clean {shlex.quote(p.key)}` removes it"
    return "`mmcache clean --stale` removes it"


_KINDS = {"damaged": "DAMAGED", "unreadable": "UNREADABLE", "newer": "NEWER FORMAT"}


def _stray_name(x: Stray) -> str:
    return _shown(x.path.name) + ("/" if x.is_dir else "")


def _stray_json(x: Stray) -> dict[str, Any]:
    return {"path": str(x.path), "nbytes": x.nbytes, "what": x.what}


def _group_json(items: list[Stray]) -> dict[str, Any]:
    return {"count": len(items), "nbytes": sum(x.nbytes for x in items),
            "items": [_stray_json(x) for x in items]}


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
        "key": e.key, "path": str(e.path), "cache_dir": str(e.cache_dir), "nbytes": e.nbytes,
        "nrows": e.nrows, "ncols": e.ncols, "created": e.created.isoformat(),
        "last_used": e.last_used.isoformat(), "in_use": e.in_use,
    }


# The default cache's two places, as `ls` names them.
_PLACES = ("ram", "disk")


def _place(s: Survey, e: Entry) -> str:
    return _PLACES[s.places.index(e.cache_dir)] if e.cache_dir in s.places else "?"


def _where(s: Survey, entries: Sequence[Entry] | None = None) -> str:
    """Where the cache lives, for a summary line: one directory, or both default places
    (with the bytes of ``entries`` in each, when given)."""
    if len(s.places) == 1:
        return _shown(str(s.places[0]))
    parts = []
    for name, d in zip(_PLACES, s.places, strict=False):
        size = "" if entries is None else \
            f"{human(sum(e.nbytes for e in entries if e.cache_dir == d))} in "
        parts.append(f"{size}{_shown(str(d))} ({name})")
    return " and ".join(parts)


def _table(rows: list[list[str]], right: Sequence[int] = ()) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _ls(cache: Cache, as_json: bool) -> None:
    s = cache._survey()
    entries = s.entries
    total = sum(e.nbytes for e in entries)
    two = len(s.places) > 1
    if as_json:
        print(json.dumps({
            "cache_dir": str(s.places[0]), "cache_dirs": [str(d) for d in s.places],
            "total_bytes": total,
            "entries": [_entry_json(e) for e in entries],
            "problems": [{"key": p.key, "name": p.name, "path": str(p.path), "nbytes": p.nbytes,
                          "kind": p.kind, "problem": p.why, "remedy": _remedy(p)}
                         for p in s.problems],
            "leftovers": _group_json(s.stale),
            "kept_mapped": _group_json(s.kept),
            "saving": _group_json(s.saving),
        }, indent=2))
        return
    if two:
        # The default cache: RAM, and the disk place that saves use when RAM is full.
        print(f"cache: {_shown(str(s.places[0]))} (ram), {_shown(str(s.places[1]))} (disk, "
              "for entries that did not fit in ram)")
    if entries:
        rows = [["KEY", "SIZE", "ROWS", "COLS", "CREATED", "LAST USED", "IN USE"]
                + (["WHERE"] if two else [])]
        for e in entries:
            rows.append([_shown(e.key), human(e.nbytes), f"{e.nrows:,}", f"{e.ncols:,}",
                         _when(e.created), _ago(e.last_used),
                         "?" if e.in_use is None else str(e.in_use)]
                        + ([_place(s, e)] if two else []))
        print(_table(rows, right=(1, 2, 3, 6)))
    for p in s.problems:
        print(f"{_KINDS[p.kind]} {_problem_name(p)}  {human(p.nbytes)}: {_shown(p.why)}; "
              f"{_remedy(p)}")
    _strays(s)
    if two:
        print(f"{_entries(len(entries))}, {human(total)}: {_where(s, entries)}")
    else:
        print(f"{_entries(len(entries))}, {human(total)} in {_where(s)}")


def _strays(s: Survey) -> None:
    """The lines of `ls` about what no entry uses."""
    if s.stale:
        print(f"stale leftovers (of interrupted saves, or versions no longer mapped): "
              f"{len(s.stale)}, {human(sum(x.nbytes for x in s.stale))} "
              "(`mmcache clean --stale` removes them)")
    if s.kept:
        print(f"old versions still mapped by live processes: {len(s.kept)}, "
              f"{human(sum(x.nbytes for x in s.kept))} (their files go when the last "
              "of those processes drops its frames of them, or exits)")
    if s.saving:
        print(f"saves in progress: {len(s.saving)}, {human(sum(x.nbytes for x in s.saving))}")


def _info(cache: Cache, key: str, as_json: bool) -> None:
    try:
        entry, dtypes, index, files = cache._describe(key)
    except EntryNotFoundError:
        _not_listed(cache, key)
        raise
    if as_json:
        out = _entry_json(entry)
        out.update({"index": index, "columns": [{"name": n, "dtype": d} for n, d in dtypes],
                    "files": files})
        print(json.dumps(out, indent=2))
        return
    users = "unknown" if entry.in_use is None else f"{entry.in_use} process(es)"
    print(_table([
        ["key", _shown(entry.key)], ["path", _shown(str(entry.path))],
        ["size", f"{human(entry.nbytes)} ({entry.nbytes:,} bytes)"],
        ["rows", f"{entry.nrows:,}"], ["columns", f"{entry.ncols:,}"],
        ["created", _when(entry.created)],
        ["last used", f"{_when(entry.last_used)} ({_ago(entry.last_used)})"],
        ["in use by", users], ["index", _shown(index)],
    ]))
    if dtypes:
        print()
        print(_table([["COLUMN", "DTYPE"]] + [[_shown(n), _shown(d)] for n, d in dtypes]))
    print()
    print(_table([["FILE", "DTYPE", "SIZE"]]
                 + [[_shown(str(f["name"])), _shown(str(f["dtype"])), human(f["size"])]
                    for f in files], right=(2,)))


def _not_listed(cache: Cache, key: str) -> None:
    """Raise what is wrong with ``key``'s entry if it exists but cannot be listed."""
    name = entry_name(key)
    for p in cache._survey().problems:
        if p.name != name:
            continue
        p = replace(p, key=key)  # known here even when the metadata no longer says it
        about = f"entry {key!r} "
        if p.kind == "damaged":
            raise CorruptEntryError(f"{about}is damaged: {p.why}; {_remedy(p)}, then save it "
                                    "again", key=key, path=p.path)
        if p.kind == "newer":
            raise UnsupportedFormatError(f"{about}cannot be read: {p.why}; {_remedy(p)}",
                                         key=key, path=p.path)
        raise CacheDirError(f"{about}cannot be read: {p.why}", key=key, path=p.path)


def _clean(cache: Cache, args: argparse.Namespace) -> None:
    report = cache._clean_report(args.keys or None, args.older_than, args.max_size,
                                 args.dry_run, stale_only=args.stale)
    verb = "would remove" if args.dry_run else "removed"
    gone = {e.key for e in [*report.entries, *report.skipped]} | {p.name for p in report.damaged}
    for key in args.keys:
        if key not in gone and entry_name(key) not in gone:
            print(f"no entry for key {_shown(key)}")
    for e in report.skipped:
        print(f"cannot remove {_shown(e.key)}: its lock {_shown(entry_name(e.key))}.lock is not "
              "a regular file (mmcache never creates a directory or FIFO there); move it away")
    for e in report.entries:
        in_use = f", mapped by {e.in_use} process(es)" if e.in_use else ""
        print(f"{verb} {_shown(e.key)}  {human(e.nbytes)}  (last used {_ago(e.last_used)}{in_use})")
    for p in report.damaged:
        print(f"{verb} damaged entry {_problem_name(p)}  {human(p.nbytes)}  ({_shown(p.why)})")
    for x in report.stale:
        print(f"{verb} stale leftover {_stray_name(x)}  {human(x.nbytes)}  ({x.what})")
    entries_bytes = sum(e.nbytes for e in report.entries) + sum(p.nbytes for p in report.damaged)
    stale_bytes = sum(x.nbytes for x in report.stale)
    if args.dry_run:
        what = [_entries(len(report.entries))]
        if report.damaged:
            what.append(_count(len(report.damaged), "damaged entry", "damaged entries"))
        if report.stale:
            what.append(_count(len(report.stale), "stale leftover", "stale leftovers"))
        listed = " and ".join([", ".join(what[:-1]), what[-1]] if len(what) > 1 else what)
        later = sum(e.nbytes for e in report.entries if e.in_use)
        print(f"would free {human(entries_bytes + stale_bytes - later)} in {listed}"
              + (f" ({human(later)} more once the processes mapping them exit)" if later else ""))
        return
    if report.stale:
        n = _count(len(report.stale), "stale leftover", "stale leftovers")
        print(f"removed {n}  {human(stale_bytes)}")
    after = cache._survey()
    freed = max(0, report.nbytes_before - after.nbytes)
    print(f"freed {human(freed)}; {_entries(len(after.entries))} "
          f"({human(sum(e.nbytes for e in after.entries))}) left in {_where(after)}")
    if after.kept:
        n = _count(len(after.kept), "old version", "old versions")
        print(f"kept {n} still mapped by live processes "
              f"({human(sum(x.nbytes for x in after.kept))}): their files go when the last "
              "of those processes drops its frames of them, or exits")
    elif any(e.in_use for e in report.entries):
        print("note: entries still mapped by live processes free their memory when those "
              "drop their frames of them, or exit")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cache = Cache(args.cache_dir)
    try:
        if args.command == "ls":
            _ls(cache, args.json)
        elif args.command == "info":
            _info(cache, args.key, args.json)
        elif args.command == "ingest":
            _ingest(cache, args)
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
