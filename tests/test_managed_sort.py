"""ExternalSorter against ``sorted`` (stable, ascending and reverse), with runs forced to disk.

Real SharedRegion / MemoryManager / IOManager; no page stays allocated, no spill file stays on disk.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import managed_memory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import OutOfMemoryError, SpillError
from runtime.managed import ExternalSorter

KiB = 1024
MiB = 1024 * KiB
PAGE = 4 * KiB
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def managed(tmp_path, size: int = 8 * MiB):
    """A region, a MemoryManager with 4 KiB pages and an IOManager; checks for leaks on the way out."""
    return managed_memory(tmp_path, size, PAGE)


records = st.tuples(st.integers(0, 20), st.text(max_size=30), st.integers(-2 ** 63, 2 ** 63 - 1))  # msgpack: 64-bit ints


@SETTINGS
@given(recs=st.lists(records, max_size=2000), pages=st.integers(4, 8), reverse=st.booleans(),
       chunk=st.integers(1, 700))
def test_serialized_sort_is_stable_and_equals_sorted(tmp_path_factory, recs, pages, reverse, chunk):
    key = lambda r: r[0]  # noqa: E731 - many ties: stability shows
    with managed(tmp_path_factory.mktemp("io")) as (mm, io):
        with ExternalSorter(mm, "sort", pages * PAGE, io, key=key, reverse=reverse) as sorter:
            for i in range(0, len(recs), chunk):
                sorter.add(recs[i:i + chunk])
            got = list(sorter.sorted())
            stats = sorter.statistics()
        assert stats.managed_peak_bytes <= pages * PAGE
    assert got == sorted(recs, key=key, reverse=reverse)


@SETTINGS
@given(keys=st.lists(st.integers(-50, 50), max_size=5000), pages=st.integers(4, 8), reverse=st.booleans(),
       key_dtype=st.sampled_from(["int64", "float64"]), chunk=st.integers(1, 2000))
def test_fixed_width_sort_is_stable_and_equals_sorted(tmp_path_factory, keys, pages, reverse, key_dtype, chunk):
    k = np.array(keys, key_dtype)
    pos = np.arange(len(keys), dtype=np.int64)
    with (
        managed(tmp_path_factory.mktemp("io")) as (mm, io),
        ExternalSorter(mm, "sort", pages * PAGE, io, key_dtype=key_dtype, value_dtype="int64",
                       reverse=reverse) as sorter,
    ):
        for i in range(0, len(keys), chunk):
            sorter.add_batch(k[i:i + chunk], pos[i:i + chunk])
        out = list(sorter.sorted())
    got_k = np.concatenate([c["key"] for c in out]).tolist() if out else []
    got_v = np.concatenate([c["value"] for c in out]).tolist() if out else []
    want = sorted(zip(k.tolist(), pos.tolist()), key=lambda t: t[0], reverse=reverse)
    assert list(zip(got_k, got_v)) == want


def test_many_runs_are_merged_in_several_passes(tmp_path):
    rng = np.random.default_rng(3)
    recs = [(int(x), "v" * int(x % 50)) for x in rng.integers(0, 10**6, 40_000)]
    with managed(tmp_path) as (mm, io), ExternalSorter(mm, "sort", 5 * PAGE, io) as sorter:
        sorter.add(recs)
        got = list(sorter.sorted())
        stats = sorter.statistics()
    assert got == sorted(recs)
    assert stats.runs > sorter.fan_in and stats.spill_passes >= 2 and stats.spilled_bytes > 0


def test_in_memory_sort_writes_nothing(tmp_path):
    with managed(tmp_path) as (mm, io), ExternalSorter(mm, "sort", 64 * PAGE, io, reverse=True) as sorter:
        sorter.add(["b", "a", "c"])
        assert list(sorter.sorted()) == ["c", "b", "a"]
        assert sorter.statistics().spill_files == 0


def test_a_record_larger_than_the_share_is_an_error_naming_the_key(tmp_path):
    with (
        managed(tmp_path) as (mm, io),
        ExternalSorter(mm, "sort", 4 * PAGE, io) as sorter,
        pytest.raises(OutOfMemoryError, match=r"^record of \d+ bytes does not fit the sort share of "
                      r"'sort' \(16384 bytes\); raise memory\.managed\.fraction$"),
    ):
        sorter.add(["x" * 20_000])


def test_a_failing_key_function_during_the_merge_leaves_no_file_and_no_page(tmp_path):
    def key(r):
        if r == 4321:
            raise RuntimeError("user key failed")
        return r

    with managed(tmp_path) as (mm, io):
        sorter = ExternalSorter(mm, "sort", 4 * PAGE, io, key=key)
        with pytest.raises(RuntimeError, match="user key failed"):
            sorter.add(list(range(4000)))  # spills runs; 4321 is not there yet
            sorter.add([4321])
            for _ in sorter.sorted():
                pass
        sorter.release()


def test_a_spill_directory_that_vanished_is_a_spill_error_naming_the_key(tmp_path):
    with managed(tmp_path) as (mm, io):
        sorter = ExternalSorter(mm, "sort", 4 * PAGE, io)
        os.rmdir(io.directory)
        with pytest.raises(SpillError, match=r"io\.tmp-dirs") as info:
            sorter.add(list(range(20_000)))
        assert io.directory in str(info.value)
        sorter.release()
        os.mkdir(io.directory)


@pytest.mark.parametrize("reverse", [False, True])
def test_seeded_fixed_width_sort_spills_and_merges_stably(tmp_path, reverse):
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 1000, 60_000)
    pos = np.arange(len(keys))
    with (
        managed(tmp_path) as (mm, io),
        ExternalSorter(mm, "sort", 5 * PAGE, io, key_dtype="int64", value_dtype="int64",
                       reverse=reverse) as sorter,
    ):
        for i in range(0, len(keys), 5000):
            sorter.add_batch(keys[i:i + 5000], pos[i:i + 5000])
        out = list(sorter.sorted())
        stats = sorter.statistics()
    assert stats.runs > sorter.fan_in and stats.spill_passes >= 2
    got = list(zip(np.concatenate([c["key"] for c in out]).tolist(), np.concatenate([c["value"] for c in out]).tolist()))
    assert got == sorted(zip(keys.tolist(), pos.tolist()), key=lambda t: t[0], reverse=reverse)
