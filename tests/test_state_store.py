"""ManagedKeyValueStore against a dict model at tiny shares, so that it spills and compacts.

Real SharedRegion / MemoryManager / IOManager; every test checks that no page stays allocated and no
spill file stays on disk.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import managed_memory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import InvalidSizeError, OutOfMemoryError, SpillError
from runtime.state.store import ManagedKeyValueStore, StoreStats

PAGE = 4096
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

keys = st.binary(min_size=0, max_size=12) | st.sampled_from([b"k%d" % i for i in range(40)])
# Sizes from empty to three pages; a value is its size repeated, so that a long list of them stays cheap to draw.
values = st.binary(max_size=40) | st.one_of(st.integers(0, 600), st.integers(0, 3 * PAGE)).map(
    lambda n: bytes([n % 251]) * n)
put = st.tuples(st.just("put"), keys, values)
ops = st.lists(st.one_of(
    put, put, put,
    st.tuples(st.just("append"), keys, st.binary(max_size=300)),
    st.tuples(st.just("delete"), keys),
    st.tuples(st.just("get"), keys),
    st.tuples(st.just("contains"), keys),
), min_size=20, max_size=300)


def run_against_model(store: ManagedKeyValueStore, ops) -> dict[bytes, bytes]:
    model: dict[bytes, bytes] = {}
    for op in ops:
        name, key = op[0], op[1]
        if name == "put":
            store.put(key, op[2])
            model[key] = op[2]
        elif name == "append":
            store.append(key, op[2])
            model[key] = model.get(key, b"") + op[2]
        elif name == "delete":
            assert store.delete(key) == (key in model)
            model.pop(key, None)
        elif name == "get":
            assert store.get(key) == model.get(key)
        else:
            assert store.contains(key) == (key in model)
    return model


@SETTINGS
@given(ops=ops, share_pages=st.integers(4, 12), max_runs=st.integers(1, 4))
def test_random_operations_match_a_dict_while_spilling_and_compacting(tmp_path, ops, share_pages, max_runs):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io):
        store = ManagedKeyValueStore(mm, "op", share_pages * PAGE, io, max_runs=max_runs)
        try:
            model = run_against_model(store, ops)
            items = list(store.items())
            assert len(items) == len({k for k, _ in items}), "every live entry once"
            assert dict(items) == model
            assert len(store) == len(model)
            for key, value in model.items():
                assert store.get(key) == value
            stats = store.stats()
            assert stats.entries == len(model) and stats.runs <= max_runs
            assert stats.memory_bytes == mm.used_bytes <= share_pages * PAGE
            assert (stats.spilled_bytes > 0) == (stats.spills > 0 or stats.spill_files > 0)
        finally:
            store.release()
            store.release()  # idempotent
        assert mm.used_bytes == 0 and os.listdir(io.directory) == []


def test_a_seeded_workload_spills_compacts_and_reads_at_most_one_block_per_run(tmp_path):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io), \
            ManagedKeyValueStore(mm, "op", 6 * PAGE, io, name="counts") as store:
        model = {}
        for i in range(6000):
            key = b"key-%d" % (i * 7919 % 1500)
            value = b"v%d" % i * (i % 5)
            store.put(key, value)
            model[key] = value
            if i % 3 == 0:
                store.append(key, b"+")
                model[key] += b"+"
            if i % 11 == 0:
                store.delete(key)
                del model[key]
        stats = store.stats()
        assert isinstance(stats, StoreStats) and stats["spills"] == stats.spills
        assert stats.spilled_bytes > 0 and stats.disk_bytes > 0 and stats.compactions > 0
        assert 1 <= stats.runs <= 4 and stats.memory_bytes <= 6 * PAGE
        assert dict(store.items()) == model and len(store) == len(model)
        before = store.stats().disk_reads
        absent = [b"absent-%d" % i for i in range(200)]
        assert not any(store.contains(k) for k in absent)
        assert store.stats().disk_reads - before <= len(absent) // 4, "the runs' bloom filters answer most misses"
        assert all(store.get(k) == v for k, v in model.items())
        assert store.stats().disk_reads - before <= 2 * len(model), "at most one block a run, mostly one"
        assert len(os.listdir(io.directory)) == store.stats().runs


def test_values_from_empty_to_larger_than_the_share(tmp_path):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io), \
            ManagedKeyValueStore(mm, "op", 4 * PAGE, io) as store:
        sizes = [0, 1, 15, 16, 4091, 4092, PAGE, PAGE + 1, 3 * PAGE, 5 * PAGE]
        for n in sizes:
            store.put(b"k%d" % n, bytes([n % 256]) * n)
        for n in sizes:
            assert store.get(b"k%d" % n) == bytes([n % 256]) * n
        assert store.stats().spill_files > 0, "a value larger than the share went to a run of its own"
        store.append(b"k0", b"")
        assert store.get(b"k0") == b"" and store.contains(b"k0")
        assert store.delete(b"k%d" % (5 * PAGE)) and not store.contains(b"k%d" % (5 * PAGE))
        assert len(store) == len(sizes) - 1


def test_without_an_io_manager_a_full_share_is_an_out_of_memory_error(tmp_path):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, _io), \
            ManagedKeyValueStore(mm, "op", 2 * PAGE, None) as store:
        store.put(b"a", b"1")
        with pytest.raises(OutOfMemoryError, match=r"share of 8 KiB \(8192 bytes\) is full .*memory\.managed\.size"):
            for i in range(10_000):
                store.put(b"key %d" % i, b"x" * 100)
        assert store.get(b"a") == b"1"


def test_a_share_too_small_to_stage_spill_io_is_refused(tmp_path):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io), \
            pytest.raises(InvalidSizeError, match=r"memory\.managed\.size"):
        ManagedKeyValueStore(mm, "op", PAGE, io)


def test_an_unwritable_spill_directory_is_a_spill_error_naming_the_key_and_the_path(tmp_path):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io):
        store = ManagedKeyValueStore(mm, "op", 4 * PAGE, io)
        os.rmdir(io.directory)  # nothing spilled yet: the directory is empty
        try:
            with pytest.raises(SpillError) as info:
                for i in range(10_000):
                    store.put(b"key %d" % i, b"x" * 50)
            msg = str(info.value)
            assert "io.tmp-dirs" in msg and io.directory in msg
            assert re.match(r"^cannot create a spill file ", msg)
        finally:
            store.release()
            os.mkdir(io.directory)
        assert mm.used_bytes == 0


def test_key_groups_do_not_depend_on_the_hash_seed(tmp_path):
    code = ("from runtime.state.store import key_group_of; "
            "print([key_group_of(b'key %d' % i, 128) for i in range(20)])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    outs = {subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(outs) == 1
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io), ManagedKeyValueStore(mm, "op", 4 * PAGE, io) as s:
        assert str([s.key_group(b"key %d" % i) for i in range(20)]) + "\n" in outs


def test_a_tombstone_whose_spill_compacts_every_run_away_is_not_kept(tmp_path):
    """Tombstones fill memory (the keys below them spilled); the spill one more causes merges every run into
    nothing (max_runs 1). That tombstone shadows nothing then: it is not written, and len() stays exact."""
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io):
        store = ManagedKeyValueStore(mm, "op", 3 * PAGE, io, max_runs=1)
        try:
            spilled = []
            while store.stats().spills == 0:
                spilled.append(b"key-%04d" % len(spilled))
                store.put(spilled[-1], b"v" * 100)
            for key in spilled:
                assert store.delete(key)
            for i in range(10_000):
                had_runs = store.stats().runs > 0
                store.discard(b"gone-%05d" % i)
                if had_runs and store.stats().runs == 0:
                    break
            else:
                pytest.fail("no spill compacted every run away")
            assert len(store) == len(list(store.items())) == 0
            assert store.stats().memory_entries == 0
        finally:
            store.release()
