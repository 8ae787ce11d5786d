"""Hostile or damaged entries: every mutation of the metadata or of a .npy header gives a
MmcacheError or the original frame: never another exception, a crash or wrong data."""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mmcache
from mmcache import _cache, _store
from mmcache._paths import entry_name
from tests import _pd, examples
from tests._zerocopy import assert_zero_copy


def _frame() -> pd.DataFrame:
    n = 12
    return pd.DataFrame({
        "f": np.arange(n, dtype=float),
        "i": np.arange(n),
        "f2": np.ones(n),
        "s": pd.array([f"v{i}" if i % 3 else None for i in range(n)], dtype="str"),
        "c": pd.Categorical(list("abc") * 4),
        "c2": pd.Categorical([1, 2, 3] * 4),  # number categories: their own spec in "ext"
        "c3": pd.Categorical(list("abcd") * 3, ordered=True),
        "m": pd.array(range(n), dtype="Int32"),
        "t": pd.date_range("2020", periods=n, tz="Europe/Paris"),
        "iv": pd.arrays.IntervalArray.from_breaks(np.arange(n + 1)),
    }, index=pd.MultiIndex.from_arrays([list("xy") * 6, np.arange(n)], names=["k", "n"]))


FRAME = _frame()
# Examples per test, in hundreds of the defaults below; the long mode for humans:
#   MMCACHE_FUZZ_SCALE=20 python -m pytest tests/test_fuzz.py
# (MMCACHE_EXAMPLES_SCALE, tests/__init__.py, scales it further, as every property test's.)
EXAMPLES = examples(int(float(os.environ.get("MMCACHE_FUZZ_SCALE", "1")) * 100))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=8,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(node, path, value, delete):
    for step in path[:-1]:
        node = node[step]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    elif delete:
        node.pop(path[-1])
    else:
        node[path[-1]] = value


def _open_checked(key: str) -> None:
    _cache._MEMO.clear()
    try:
        got = mmcache.open(key)
    except mmcache.MmcacheError:
        return
    _pd.assert_frame_equal(got, FRAME)  # an unchanged meaning may open, and equal


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "cache"
    mmcache.save(FRAME, "k", cache_dir=d)
    meta_path = d / f"{entry_name('k')}.json"
    return d, meta_path, meta_path.read_bytes()


@contextlib.contextmanager
def _signed(saved, monkeypatch, meta: dict):
    """The saved entry's metadata replaced by ``meta`` *with* a valid checksum (someone with
    write access to the private cache dir) while inside; the original put back after."""
    d, meta_path, original = saved
    monkeypatch.setenv("MMCACHE_DIR", str(d))
    meta.pop("sha256", None)
    try:
        meta_path.write_bytes(_store.sign(meta))
        _cache._MEMO.clear()
        yield
    finally:
        meta_path.write_bytes(original)


def _mutate(meta: dict, data) -> None:
    paths = [p for p in _paths(meta) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    delete = data.draw(st.booleans(), label="delete")
    value = None if delete else data.draw(json_values, label="value")
    _set(meta, path, value, delete)


@settings(max_examples=EXAMPLES * 200 // 100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_metadata_is_refused(saved, monkeypatch, data):
    """Any change to the metadata fails its checksum: CorruptEntryError, never other data."""
    d, meta_path, original = saved
    monkeypatch.setenv("MMCACHE_DIR", str(d))
    meta = json.loads(original)
    _mutate(meta, data)
    assume(meta != json.loads(original))  # a mutation that changes nothing is no damage
    try:
        meta_path.write_text(json.dumps(meta))
        _cache._MEMO.clear()
        with pytest.raises(mmcache.CorruptEntryError):
            mmcache.open("k")
    finally:
        meta_path.write_bytes(original)


@settings(max_examples=EXAMPLES * 500 // 100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_crafted_metadata_never_escapes_the_mapped_files(saved, monkeypatch, data):
    """Metadata rewritten *with* a valid checksum (someone with write access to the private
    cache dir): open gives a MmcacheError or a frame whose every buffer still lies inside the
    entry's mapped files; never another exception, a crash or a read outside them."""
    d, _, original = saved
    meta = json.loads(original)
    _mutate(meta, data)
    with _signed(saved, monkeypatch, meta):
        try:
            got = mmcache.open("k")
        except mmcache.MmcacheError:
            return
        assert isinstance(got, pd.DataFrame | pd.Series)
        assert_zero_copy(got, d, include_index=True)


@pytest.mark.parametrize("ref", [False, "float file"])
def test_crafted_category_codes_of_another_kind_are_refused(saved, monkeypatch, ref):
    """Found by the property test above: a category's codes pointed (with a valid checksum)
    at the float64 file, or at file ``false`` (JSON's false was taken for 0), opened as a
    copy outside the mapped files; now CorruptEntryError."""
    def cat_specs(layout):
        # per column (object or number categories) and in groups (text categories)
        return ([t for t in layout["ext"].values() if t["c"] == "cat"]
                + layout.get("cats", {"groups": []})["groups"])

    assert len(cat_specs(json.loads(saved[2])["layout"])) >= 2
    for i in range(len(cat_specs(json.loads(saved[2])["layout"]))):
        meta = json.loads(saved[2])
        spec = cat_specs(meta["layout"])[i]
        floats = next(i for i, f in enumerate(meta["files"]) if f["dtype"] == "<f8")
        spec["codes"]["f"] = floats if ref == "float file" else ref
        with _signed(saved, monkeypatch, meta), pytest.raises(mmcache.CorruptEntryError):
            mmcache.open("k")


@settings(max_examples=EXAMPLES * 300 // 100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_npy_header_mutations(saved, monkeypatch, data):
    d, _, _ = saved
    monkeypatch.setenv("MMCACHE_DIR", str(d))
    files = sorted(d.rglob("*.npy"))
    target = data.draw(st.sampled_from(files), label="file")
    raw = target.read_bytes()
    header_len = 10 + int.from_bytes(raw[8:10], "little")
    pos = data.draw(st.integers(0, header_len - 1), label="pos")
    byte = data.draw(st.integers(0, 255), label="byte")
    mutated = raw[:pos] + bytes([byte]) + raw[pos + 1:]
    try:
        target.write_bytes(mutated)  # same size: only the header's meaning changes
        _open_checked("k")
    finally:
        target.write_bytes(raw)


def test_npy_headers_spaced_otherwise_still_open(saved, monkeypatch):
    """A header this mmcache would not write byte for byte but that says the same (another
    numpy's spacing, the same length) goes through numpy's parser and opens; one that says
    another shape is refused."""
    d, _, _ = saved
    monkeypatch.setenv("MMCACHE_DIR", str(d))
    for target in sorted(d.rglob("*.npy")):
        raw = target.read_bytes()
        header_len = 10 + int.from_bytes(raw[8:10], "little")
        text = raw[10:header_len].decode("latin1")
        dense = text.replace(": ", ":").replace(", }", "}").rstrip("\n")
        spaced = raw[:10] + (dense.ljust(len(text) - 1) + "\n").encode("latin1")
        assert spaced != raw[:header_len] and len(spaced) == header_len
        count = text.split("'shape': (")[1].split(",")[0]
        fewer = text.replace(f"({count},)", f"({int(count) - 1},)", 1).rstrip("\n")
        other = raw[:10] + (fewer.ljust(len(text) - 1) + "\n").encode("latin1")
        assert len(other) == header_len
        try:
            target.write_bytes(spaced + raw[header_len:])
            _cache._MEMO.clear()
            _pd.assert_frame_equal(mmcache.open("k"), FRAME)
            target.write_bytes(other + raw[header_len:])
            _cache._MEMO.clear()
            with pytest.raises(mmcache.CorruptEntryError, match="header says"):
                mmcache.open("k")
        finally:
            target.write_bytes(raw)


@pytest.mark.parametrize("dtype", [
    "(2,)<i8", "(1,)|i1", "S0", "V0",
    {"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [0, 2]},  # overlapping
    {"names": ["\u4e2d"], "formats": ["<i8"]},  # no .npy header can name it
], ids=["subarray", "1-item subarray", "S0", "V0", "overlapping fields", "non-latin-1 field"])
def test_file_dtypes_no_save_writes_are_refused(saved, monkeypatch, dtype):
    """Fields, subarrays and 0-byte items in a (re-signed) file entry, with the data file's
    header rewritten to match where numpy can write one: CorruptEntryError, never numpy's
    own errors from viewing the file as that dtype (helper-32)."""
    d, _, original = saved
    meta = json.loads(original)
    spec = meta["files"][0]
    target = d / meta["data"] / spec["name"]
    raw = target.read_bytes()
    with contextlib.suppress(Exception):  # where numpy can write that header, it matches
        head = _store.npy_header(np.dtype(dtype), spec["count"])
        if len(head) <= len(raw):
            target.write_bytes(head + raw[len(head):])
    spec["dtype"] = dtype
    try:
        with _signed(saved, monkeypatch, meta), pytest.raises(
                mmcache.CorruptEntryError,
                match=r"bad file entry .* delete the entry and save it again"):
            mmcache.open("k")
    finally:
        target.write_bytes(raw)


def test_npy_replaced_by_a_pickle_never_executes(saved, monkeypatch, tmp_path):
    d, _, _ = saved
    monkeypatch.setenv("MMCACHE_DIR", str(d))
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target = sorted(d.rglob("*.npy"))[0]
    raw = target.read_bytes()
    try:
        with open(target, "wb") as f:
            np.save(f, np.array([Evil()], dtype=object), allow_pickle=True)
        _cache._MEMO.clear()
        with pytest.raises(mmcache.CorruptEntryError):
            mmcache.open("k")
        # same size as the original too, so only the header check can refuse it
        payload = target.read_bytes()
        target.write_bytes(payload + b"\0" * max(0, len(raw) - len(payload)))
        _cache._MEMO.clear()
        with pytest.raises(mmcache.CorruptEntryError):
            mmcache.open("k")
        assert not marker.exists()
    finally:
        target.write_bytes(raw)
