"""PageHashIndex against a dict: forced fingerprint collisions, growth across pages, backward-shift deletion,
refusal when the share cannot give a larger table; and the store's Python heap not growing with its keys.

Real SharedRegion / MemoryManager; entries are real objects of a SmallObjectAllocator holding header and key.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc

import numpy as np
import pytest
from helpers import managed_memory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import InvalidSizeError
from runtime.managed.share import ManagedShare
from runtime.state import page_index
from runtime.state.bins import SmallObjectAllocator
from runtime.state.page_index import ENTRY_HEADER, FULL_LOAD, SLOT_BYTES, PageHashIndex
from runtime.state.store import ManagedKeyValueStore

PAGE = 4096
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

#: name -> fingerprint function (never 0). "one": every key collides; "home": every key has the same home
#: slot but most have different fingerprints; "few": three fingerprints, keys told apart by their bytes.
FINGERPRINTS = {
    "hash": page_index._fingerprint,
    "one": lambda key: 7,
    "home": lambda key: (hash(key) & 0xFFFF) << 40 | 5,
    "few": lambda key: len(key) % 3 + 1,
}


def new_entry(bins: SmallObjectAllocator, key: bytes, tag: int = 0) -> int:
    """An entry as the store writes it (header, key), with ``tag`` bytes after the key to tell versions apart."""
    h = bins.alloc(ENTRY_HEADER.size + len(key) + tag)
    assert h is not None
    bins.write(h, ENTRY_HEADER.pack(len(key)) + key + bytes(tag))
    return h


def check_table(index: PageHashIndex) -> None:
    """Linear probing's invariant: every slot from a key's home slot to its own slot is taken."""
    t = index._table()
    assert len(t) == index.capacity
    taken = t[:, 0] != 0
    assert int(taken.sum()) == len(index)
    mask = index.capacity - 1
    for pos in np.flatnonzero(taken).tolist():
        i = int(t[pos, 0]) & mask
        while i != pos:
            assert taken[i], f"slot {i} between the home and slot {pos} of a key is empty"
            i = (i + 1) & mask


def accounted(share: ManagedShare, bins: SmallObjectAllocator, index: PageHashIndex) -> bool:
    return share.used_bytes == bins.total_bytes + index.nbytes


ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.binary(max_size=5)),
    st.tuples(st.just("put"), st.binary(max_size=5)),
    st.tuples(st.just("remove"), st.binary(max_size=5)),
    st.tuples(st.just("get"), st.binary(max_size=5)),
), max_size=400)


@SETTINGS
@given(ops=ops, name=st.sampled_from(sorted(FINGERPRINTS)), max_load=st.sampled_from([0.3, 0.7, 0.95]))
def test_random_operations_match_a_dict(tmp_path, ops, name, max_load):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, _io):
        share = ManagedShare(mm, "op", 1 << 20)
        bins = SmallObjectAllocator(share)
        index = PageHashIndex(share, bins, max_load=max_load, fingerprint=FINGERPRINTS[name])
        model: dict[bytes, int] = {}
        try:
            for n, (op, key) in enumerate(ops):
                if op == "put":
                    h = new_entry(bins, key, n % 40)
                    assert index.put(key, h)
                    if key in model:
                        bins.free(model[key])
                    model[key] = h
                elif op == "remove":
                    assert index.remove(key) == model.get(key)
                    if key in model:
                        bins.free(model.pop(key))
                else:
                    assert index.get(key) == model.get(key)
                    assert (key in index) == (key in model)
            check_table(index)
            assert len(index) == len(model)
            assert sorted(index.items()) == sorted(model.items())
            assert sorted(index.handles()) == sorted(model.values())
            assert all(index.get(k) == h for k, h in model.items())
            assert accounted(share, bins, index)
        finally:
            index.clear()
            bins.release()
            assert share.used_bytes == 0
            share.release_all()


@pytest.mark.parametrize("name", ["hash", "home"])
def test_growth_across_pages_then_removing_half_keeps_every_key(tmp_path, name):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, _io):
        share = ManagedShare(mm, "op", 2 << 20)
        bins = SmallObjectAllocator(share)
        index = PageHashIndex(share, bins, fingerprint=FINGERPRINTS[name])
        n = 2000 if name == "hash" else 400  # "home" probes through every key: quadratic
        keys = [b"key-%d" % i for i in range(n)]
        handles = {}
        capacities = []
        for key in keys:
            handles[key] = new_entry(bins, key)
            assert index.add(key, handles[key])
            capacities.append(index.capacity)
        assert index.capacity * SLOT_BYTES > 2 * PAGE, "the table spans several pages"
        assert sorted(set(capacities)) == [16 << i for i in range(len(set(capacities)))], "it doubles"
        assert len(index) == n <= index.capacity * index.max_load
        assert accounted(share, bins, index)
        check_table(index)
        for key in keys[::2]:
            h = handles.pop(key)
            assert index.remove(key) == h
            bins.free(h)
        check_table(index)
        assert len(index) == len(handles)
        assert all(index.get(k) == h for k, h in handles.items())
        assert all(index.get(k) is None for k in keys[::2])
        for key, h in handles.items():
            new = new_entry(bins, key, 3)
            index.replace(key, h, new)
            bins.free(h)
            handles[key] = new
        assert dict(index.items()) == handles
        with pytest.raises(KeyError, match=r"^\"key b'key-1' is not in the index with handle 0x"):
            index.replace(b"key-1", handles[b"key-1"] + 1, 0)
        index.clear()
        index.clear()
        assert len(index) == 0 and index.capacity == 0 and index.get(b"key-1") is None
        assert share.used_bytes == bins.total_bytes
        bins.release()
        share.release_all()


def test_a_full_share_refuses_a_key_and_changes_nothing(tmp_path):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, _io):
        share = ManagedShare(mm, "op", 4 * PAGE)
        bins = SmallObjectAllocator(share)
        index = PageHashIndex(share, bins)
        added = {}
        for i in range(10_000):
            key = b"%d" % i
            h = bins.alloc(ENTRY_HEADER.size + len(key))
            if h is None:
                break
            bins.write(h, ENTRY_HEADER.pack(len(key)) + key)
            before = (index.capacity, index.nbytes)
            if not index.add(key, h):
                assert (index.capacity, index.nbytes) == before and len(index) == len(added)
                bins.free(h)
                break
            added[key] = h
        else:
            pytest.fail("the share never filled")
        assert len(index) >= int(index.capacity * FULL_LOAD), "a table that cannot double fills up to FULL_LOAD"
        assert all(index.get(k) == h for k, h in added.items())
        check_table(index)
        assert share.used_bytes <= 4 * PAGE and accounted(share, bins, index)
        index.clear()
        assert index.nbytes == 0 and share.used_bytes == bins.total_bytes
        bins.release()
        share.release_all()


def test_max_load_must_be_a_fraction(tmp_path):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, _io):
        share = ManagedShare(mm, "op", 4 * PAGE)
        with pytest.raises(InvalidSizeError, match=r"^max_load of a page hash index must be in \(0, 1\); got 1\.0$"):
            PageHashIndex(share, SmallObjectAllocator(share), max_load=1.0)


def test_a_store_whose_index_cannot_grow_spills_and_keeps_every_value(tmp_path, monkeypatch):
    """An index refusing a key is a full memory: the store spills every entry (emptying the index) and goes on."""
    grow = PageHashIndex._grow

    def small_grow(self):  # a table of at most 64 slots, as if the share had no room for more
        return self._capacity < 64 and grow(self)

    monkeypatch.setattr(PageHashIndex, "_grow", small_grow)
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io), \
            ManagedKeyValueStore(mm, "op", 64 * PAGE, io, max_runs=3) as store:
        model = {}
        for i in range(1000):
            key = b"k%d" % (i * 37 % 300)
            store.put(key, b"v%d" % i)
            model[key] = b"v%d" % i
            if i % 7 == 0:
                store.delete(key)
                del model[key]
            stats = store.stats()
            assert stats.memory_entries <= 64 * FULL_LOAD + 1
        assert store.stats().spills > 10
        assert dict(store.items()) == model
        assert all(store.get(k) == v for k, v in model.items())


def test_the_store_keeps_no_python_object_per_key(tmp_path):
    """200 k entries in memory: the interpreter's count of allocated objects grows by a few a page, not a key.

    A dict index held two objects a key (the key's bytes and the int handle), about 100 bytes of heap a key.
    """
    n = 200_000
    with managed_memory(tmp_path, 48 << 20, 32768) as (mm, io), \
            ManagedKeyValueStore(mm, "op", 40 << 20, io) as store:
        store.put(b"warm", b"up")
        gc.collect()
        before = sys.getallocatedblocks()
        for i in range(n):
            store.put(b"key-%d" % i, b"value of %d" % i)
        gc.collect()
        held = sys.getallocatedblocks() - before
        stats = store.stats()
        assert stats.spills == 0 and stats.memory_entries == n + 1
        pages = store.share.used_bytes // 32768
        assert held < 16 * pages < n // 10, f"{held} more Python objects for {n} entries in {pages} pages"
        assert store.get(b"key-12345") == b"value of 12345"


def test_the_index_alone_holds_heap_per_page_not_per_key(tmp_path):
    n = 200_000
    with managed_memory(tmp_path, 16 << 20, 32768) as (mm, _io):
        share = ManagedShare(mm, "op", 16 << 20)
        bins = SmallObjectAllocator(share)
        index = PageHashIndex(share, bins)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                assert index.add(b"key-%d" % i, i)  # handles are not read by add
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        pages = index.nbytes // 32768
        assert pages >= 64 and held < 1024 * pages, f"{held} bytes of Python heap for {pages} pages"
        index.clear()
        share.release_all()


def test_a_store_share_needs_pages_for_entries_index_and_staging(tmp_path):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io):
        with pytest.raises(InvalidSizeError, match=r"^share of state 'state' of 'op' must hold at least 3 pages "
                           r"\(12288 bytes: one for entries, one for their index, one to stage spill I/O\); "
                           r"got 8192; raise memory\.managed\.size$"):
            ManagedKeyValueStore(mm, "op", 2 * PAGE, io)
        with pytest.raises(InvalidSizeError, match=r"at least 2 pages \(8192 bytes: one for entries, one for their "
                           r"index\); got 4096"):
            ManagedKeyValueStore(mm, "op", PAGE, None)
