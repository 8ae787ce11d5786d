"""Where the cache lives, and how a key becomes file names that cannot leave it.

Layout of a cache directory (everything for one key shares the prefix ``NAME``)::

    NAME.json           metadata: the entry's only commit point, replaced atomically
    NAME.TOKEN/         data of one saved version, referenced by NAME.json
    NAME.lock           per-key writer lock (flock; released by the kernel if the holder dies)
    NAME.json.TOKEN.tmp metadata being published (only ever exists under the lock)

``NAME`` is a readable prefix of the key (``[A-Za-z0-9_-]`` only) plus a hash of the full key,
so no key can produce ``/``, ``..``, NUL or a leading dot, whatever it contains.

Those four forms (``TOKEN``: 16 hex digits), and inside a data directory ``<n>.npy`` and
``meta.json``, are the only names mmcache ever removes: :func:`own_name` and
:func:`own_data_file` are the one rule every remover follows, so a cache directory that also
holds other files (or is reached through a symlink to someone's home) never loses them. A
name is mmcache's only with the file type mmcache gives it (:func:`own_type`): a directory
named ``NAME.lock``, a file named ``NAME.TOKEN``, or a FIFO, socket or device of any name is
someone else's, and is neither listed nor removed (nor opened, so a FIFO never blocks).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

from ._errors import CacheDirError, InvalidKeyError

ENV_DIR = "MMCACHE_DIR"
# The RAM file system of the default cache, when it is not /dev/shm (see shm_root).
ENV_SHM = "MMCACHE_SHM"
MAX_KEY_LEN = 200
# A readable prefix helps `ls` of the directory; the hash guarantees uniqueness. 96 bits of
# SHA-256 make an accidental collision between two keys of one cache impossible in practice,
# and open() still checks the full key stored in the metadata.
_PREFIX_LEN = 48
_HASH_HEX = 24
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_TOKEN_HEX = 16  # _store.new_token()
_STEM = rf"[A-Za-z0-9_-]{{1,{_PREFIX_LEN}}}-[0-9a-f]{{{_HASH_HEX}}}"
_TOKEN = rf"[0-9a-f]{{{_TOKEN_HEX}}}"
_OWN_NAME = re.compile(
    rf"(?P<stem>{_STEM})\.(?:(?P<meta>json)|(?P<lock>lock)|(?P<data>{_TOKEN})"
    rf"|json\.(?P<tmp>{_TOKEN})\.tmp)"
)
_OWN_DATA_FILE = re.compile(r"(?:0|[1-9][0-9]*)\.npy|meta\.json")


_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def check_key(key: object) -> str:
    """Return ``key`` if it can name an entry, else raise InvalidKeyError."""
    if not isinstance(key, str):
        raise InvalidKeyError(
            f"key must be a str, got {type(key).__name__} {key!r}; pass a string key", key=None
        )
    if not key:
        raise InvalidKeyError("key is empty; pass a non-empty string key", key=key)
    if len(key) > MAX_KEY_LEN:
        raise InvalidKeyError(
            f"key must have 1 to {MAX_KEY_LEN} characters, got {len(key)}; use a shorter key",
            key=key,
        )
    if "\0" in key:
        raise InvalidKeyError(f"key {key!r} contains a NUL character; remove it", key=key)
    if _SURROGATE_PAIR.search(key):
        # JSON (the metadata) reads "\ud83d\ude00" back as the one character they encode:
        # the entry would hold another key than the one it was saved under
        raise InvalidKeyError(
            f"key {key!r} contains a UTF-16 surrogate pair as two code points; use the "
            "character they encode (e.g. decode the text with 'utf-16', 'surrogatepass')",
            key=key,
        )
    return key


def entry_name(key: str) -> str:
    """The file-name stem of ``key``'s entry: safe, unique, readable."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]
    return f"{_UNSAFE.sub('_', key)[:_PREFIX_LEN]}-{digest}"


def own_name(name: str) -> tuple[str, str] | None:
    """``(stem, kind)`` if ``name`` is one mmcache writes in a cache directory, else None.

    ``kind`` is ``"meta"`` (``NAME.json``), ``"lock"`` (``NAME.lock``), ``"data"``
    (``NAME.TOKEN``, a data directory) or ``"tmp"`` (``NAME.json.TOKEN.tmp``). Anything else
    (``.git``, ``report.csv``, ``NAME.json.bak``) is not mmcache's, and is never touched.
    """
    m = _OWN_NAME.fullmatch(name)
    if m is None:
        return None
    return m.group("stem"), m.lastgroup  # type: ignore[return-value]  # the suffix's group


def own_type(kind: str, mode: int) -> bool:
    """True if a name of ``kind`` (see :func:`own_name`) with file type ``mode`` (from
    ``lstat``) can be mmcache's: a directory for ``"data"``, a regular file for the others.

    A symlink under any own name counts too: mmcache never creates one, but one planted there
    blocks the key, so it is removed (never followed). Anything else under an own name (a
    directory where mmcache writes a file, a FIFO, socket or device) is not mmcache's.
    """
    if stat.S_ISLNK(mode):
        return True
    return stat.S_ISDIR(mode) if kind == "data" else stat.S_ISREG(mode)


def own_data_file(name: str) -> bool:
    """True if ``name`` is one mmcache writes inside a data directory (``<n>.npy``,
    ``meta.json``); only those are removed from it, and it is removed only once empty."""
    return _OWN_DATA_FILE.fullmatch(name) is not None


# A line of /proc/PID/maps or smaps that maps a data file of an entry
# (``.../NAME.TOKEN/<n>.npy``), wherever its cache directory is.
MAPS_DATA_FILE = re.compile(
    rf"^[0-9a-f]+-[0-9a-f]+ [^\n]*/{_STEM}\.{_TOKEN}/(?:0|[1-9][0-9]*)\.npy"
    rf"(?: \(deleted\))?$".encode(),
    re.MULTILINE,
)


def shm_root() -> Path | None:
    """The RAM file system the default cache lives on: ``$MMCACHE_SHM``, else ``/dev/shm``.

    None when ``/dev/shm`` is missing or not writable (then the disk place is the only
    default). ``$MMCACHE_SHM`` is for containers whose RAM file system is mounted elsewhere
    (and for tests, which point it at a small tmpfs); naming something that is not a writable
    directory is a configuration error, said at once rather than silently ignored.
    """
    env = os.environ.get(ENV_SHM)
    if env:
        root = _absolute(Path(env).expanduser())
        if not (root.is_dir() and os.access(root, os.W_OK | os.X_OK)):
            raise CacheDirError(
                f"${ENV_SHM}={env!r} is not a directory you can write to; point it at the RAM "
                f"file system (a tmpfs) the cache should use, or unset it (default /dev/shm)",
                path=root,
            )
        return root
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return None


def disk_cache_dir() -> Path:
    """The per-user disk-backed default, under the temp dir (``$TMPDIR``, else ``/tmp``)."""
    return Path(tempfile.gettempdir()) / f"mmcache-{os.getuid()}"


def default_cache_dir() -> Path:
    """The per-user default: in RAM (:func:`shm_root`) when usable, else under the temp dir."""
    root = shm_root()
    return root / f"mmcache-{os.getuid()}" if root is not None else disk_cache_dir()


def default_places() -> list[Path]:
    """Where the default cache lives: the RAM place, then the disk-backed place that saves
    fall back to when an entry does not fit in RAM; only one when they are the same (no
    usable RAM file system, or a temp dir on it). Read from the environment at each call."""
    first = default_cache_dir()
    disk = disk_cache_dir()
    if first == disk or os.path.realpath(first.parent) == os.path.realpath(disk.parent):
        return [first]
    return [first, disk]


def is_default(cache_dir: str | os.PathLike[str] | None) -> bool:
    """True if ``cache_dir`` (an argument) leaves the choice to the defaults: neither it nor
    ``$MMCACHE_DIR`` names a directory."""
    return cache_dir is None and not os.environ.get(ENV_DIR)


def resolve_places(
    cache_dir: str | os.PathLike[str] | None, *, create: bool = False
) -> list[Path]:
    """The directories a cache reads: the one :func:`resolve_cache_dir` chooses, or, when
    nothing names one, every default place (each checked like the default directory).
    ``create`` makes the first one only: the disk place is made by the first save there."""
    if not is_default(cache_dir):
        return [resolve_cache_dir(cache_dir, create=create)]
    places = default_places()
    out = [checked_default(places[0], create=create)]
    if len(places) > 1:
        # Another user's directory (or a symlink) planted where the disk place goes, in a
        # shared sticky /tmp the user cannot clean: it is never read nor written, and the
        # RAM place keeps working; a save that needs the disk place says why it cannot.
        with contextlib.suppress(CacheDirError):
            out.append(checked_default(places[1], create=False))
    return out


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None, *, create: bool = True) -> Path:
    """Decide the cache directory and make sure it is safe to use.

    Order: the argument, else ``$MMCACHE_DIR``, else :func:`default_cache_dir`. The
    environment is read at each call, not at import. With ``create`` (saving) a missing
    directory is made, mode 0700; without it (reading, listing, cleaning) a missing directory
    is returned as is and simply holds nothing, so a typo never litters the disk. A relative
    path is made absolute here, once, so entries and frames pickled by reference name the same
    directory in a process with another working directory. The default
    directory must be a real directory owned by the user with no group or other access (a
    planted symlink or a foreign directory would let another user read or swap the data); a
    directory the user chose must be owned by them (or root) and not writable by others.
    """
    chosen = cache_dir if cache_dir is not None else os.environ.get(ENV_DIR) or None
    if chosen is None:
        return checked_default(default_cache_dir(), create=create)
    path = _absolute(Path(os.fspath(chosen)).expanduser())
    st = _lstat_or_make(path, create=create, parents=True)
    if st is None:
        return path
    if stat.S_ISLNK(st.st_mode) and not path.exists():
        raise CacheDirError(
            f"cache directory {str(path)!r} is a symlink to a missing path; fix or remove it",
            path=path,
        )
    uid = os.getuid()
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(
            f"cache directory {str(path)!r} is a file, not a directory; pass a directory "
            f"(or set {ENV_DIR}) to one",
            path=path,
        )
    if st.st_uid not in (uid, 0):
        raise CacheDirError(
            f"cache directory {str(path)!r} is owned by uid {st.st_uid}, not by you "
            f"(uid {uid}); another user could replace your data: use a directory of your own",
            path=path,
        )
    if st.st_mode & 0o002:
        # Even with the sticky bit (/dev/shm, /tmp), others could plant names we later open.
        raise CacheDirError(
            f"cache directory {str(path)!r} is writable by every user; use a private "
            "sub-directory (mode 700), e.g. the default one",
            path=path,
        )
    return path


def _lstat_or_make(path: Path, *, create: bool, parents: bool) -> os.stat_result | None:
    """``lstat`` of a cache directory; a missing one is made (mode 0700) with ``create``,
    else None: reading, listing and cleaning never create it."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        if not create:
            return None
    _make(path, parents=parents)
    return os.lstat(path)


def _make(path: Path, *, parents: bool) -> None:
    try:
        path.mkdir(mode=0o700, parents=parents, exist_ok=True)
    except OSError as exc:
        raise CacheDirError(
            f"cannot create cache directory {str(path)!r}: {exc.strerror or exc}; "
            f"set {ENV_DIR} or pass cache_dir= to a writable directory",
            path=path,
        ) from exc


def checked_default(path: Path, *, create: bool) -> Path:
    """``path``, a default place, after checking it is safe: a real directory owned by the
    user with no group or other access (on a shared /dev/shm or /tmp, a planted symlink or a
    foreign directory would let another user read or swap the data)."""
    st = _lstat_or_make(path, create=create, parents=False)
    if st is None:
        return path
    uid = os.getuid()
    if stat.S_ISLNK(st.st_mode):
        raise CacheDirError(
            f"default cache directory {str(path)!r} is a symlink, which another user "
            f"could have planted; remove it or set {ENV_DIR}",
            path=path,
        )
    problem = None
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory (a file is in the way)"
    elif st.st_uid != uid:
        problem = f"is owned by uid {st.st_uid}, not by you (uid {uid})"
    elif st.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(st.st_mode):o}; it must be private (700)"
    if problem:
        raise CacheDirError(
            f"default cache directory {str(path)!r} {problem}; fix it "
            f"(chmod 700 / remove it) or set {ENV_DIR} to another directory",
            path=path,
        )
    return path


def _absolute(path: Path) -> Path:
    # Not os.path.abspath: collapsing "a/.." lexically is wrong when "a" is a symlink.
    if path.is_absolute():
        return path
    try:
        return Path(os.getcwd()) / path
    except FileNotFoundError as exc:
        raise CacheDirError(
            f"cache directory {str(path)!r} is relative, and the current directory no longer "
            "exists; pass an absolute path",
            path=path,
        ) from exc
