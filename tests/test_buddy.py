"""BuddyAllocator: splitting, coalescing, errors, statistics, and properties under random use."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from runtime.errors import (
    DoubleFreeError,
    InvalidHandleError,
    InvalidSizeError,
    OutOfMemoryError,
    ShmflowError,
)
from runtime.memory import BuddyAllocator, SharedRegion

KiB = 1024
MiB = 1024 * KiB


def test_allocate_rounds_up_to_power_of_two_blocks(region):
    alloc = BuddyAllocator(region, min_block=4096)
    assert alloc.allocate(10_000).size == 16 * KiB
    assert alloc.allocate(1).size == 4 * KiB
    assert alloc.allocate(4096).size == 4 * KiB
    assert alloc.allocate(4097).size == 8 * KiB


def test_split_then_full_free_coalesces_to_one_block(region):
    alloc = BuddyAllocator(region, min_block=4096)
    segs = [alloc.allocate(4096, owner="a") for _ in range(1024)]  # the whole 4 MiB
    assert alloc.stats().free_bytes == 0
    with pytest.raises(OutOfMemoryError):
        alloc.allocate(1)
    for seg in segs[::2] + segs[1::2]:
        seg.free()
    stats = alloc.stats()
    assert stats.free_blocks_by_order == {alloc.max_order: 1}
    assert stats.largest_free_block == 4 * MiB
    assert list(alloc.free_blocks()) == [(0, 4 * MiB)]


def test_blocks_are_aligned_to_their_size_relative_to_the_range(region):
    base = 64 * KiB  # a sub-range that is not aligned to its own size in the region
    alloc = BuddyAllocator(region, min_block=4096, offset=3 * base, size=256 * KiB)
    for nbytes in (4096, 8192, 16384, 32768, 4096, 65536):
        seg = alloc.allocate(nbytes)
        assert (seg.offset - alloc.offset) % seg.size == 0
        assert alloc.offset <= seg.offset and seg.offset + seg.size <= alloc.offset + alloc.size
    alloc.check_invariants()


def test_non_power_of_two_range_is_covered_by_maximal_blocks(region):
    alloc = BuddyAllocator(region, min_block=4096, size=7 * 4096 + 100)
    assert [n for _, n in alloc.free_blocks()] == [16384, 8192, 4096]
    segs = [alloc.allocate(4096) for _ in range(7)]
    with pytest.raises(OutOfMemoryError):
        alloc.allocate(4096)
    for s in segs:
        s.free()
    assert [n for _, n in alloc.free_blocks()] == [16384, 8192, 4096]
    alloc.check_invariants()


def test_out_of_memory_names_requested_largest_and_total_free(region):
    alloc = BuddyAllocator(region, min_block=4096)
    alloc.allocate(2 * MiB, owner="big")
    alloc.allocate(1 * MiB)
    with pytest.raises(OutOfMemoryError, match=r"^cannot allocate 2 MiB \(2097152 bytes\) for 'op-7': "
                       r"largest free block 1 MiB, 1 MiB of 4 MiB free; raise memory\.region\.size"):
        alloc.allocate(2 * MiB, owner="op-7")


@pytest.mark.parametrize("nbytes", [0, -1, -4096])
def test_zero_and_negative_sizes_are_rejected(region, nbytes):
    alloc = BuddyAllocator(region)
    with pytest.raises(InvalidSizeError, match=rf"^allocation size must be > 0 bytes; got {nbytes}$"):
        alloc.allocate(nbytes)
    assert isinstance(InvalidSizeError("x"), (ShmflowError, ValueError))


@pytest.mark.parametrize("nbytes", [1.5, "4096", None, True])
def test_non_int_sizes_are_type_errors(region, nbytes):
    with pytest.raises(TypeError, match="nbytes must be an int"):
        BuddyAllocator(region).allocate(nbytes)


def test_double_free_raises(region):
    alloc = BuddyAllocator(region)
    seg = alloc.allocate(100)
    alloc.free(seg)
    with pytest.raises(DoubleFreeError, match=r"^segment at offset 0 \(4096 bytes\) was freed twice$"):
        seg.free()
    # The block being reused does not make the old segment freeable again.
    again = alloc.allocate(100)
    assert again.offset == seg.offset
    with pytest.raises(DoubleFreeError):
        alloc.free(seg)
    again.free()
    alloc.check_invariants()


def test_freeing_a_segment_of_another_allocator_raises(region):
    lower = BuddyAllocator(region, offset=0, size=1 * MiB)
    upper = BuddyAllocator(region, offset=1 * MiB, size=1 * MiB)
    seg = upper.allocate(4096)
    with pytest.raises(InvalidHandleError, match=r"was not allocated by this allocator \(range \[0, 1048576\)\)"):
        lower.free(seg)
    upper.free(seg)


def test_free_by_handle_and_stale_handle(region):
    alloc = BuddyAllocator(region)
    seg = alloc.allocate(8192)
    h = seg.handle()
    alloc.free(h)
    assert seg.freed
    with pytest.raises(DoubleFreeError):
        alloc.free(h)
    seg2 = alloc.allocate(8192)
    assert seg2.offset == h.offset
    with pytest.raises(InvalidHandleError, match="stale handle"):
        alloc.free(h)
    seg2.free()


def test_min_block_and_range_validation(region):
    with pytest.raises(InvalidSizeError, match="power of two"):
        BuddyAllocator(region, min_block=3000)
    with pytest.raises(InvalidSizeError, match=r"granule \(256 bytes\); got 128; create the region"):
        BuddyAllocator(region, min_block=128)
    with pytest.raises(InvalidSizeError, match="must lie in the region"):
        BuddyAllocator(region, offset=4 * MiB, size=4096)


def test_stats_report_orders_owners_fragmentation_and_high_water(region):
    alloc = BuddyAllocator(region, min_block=4096)
    a = alloc.allocate(4096, owner="map-1")
    b = alloc.allocate(16384, owner="map-1")
    c = alloc.allocate(1 * MiB, owner="window-3")
    stats = alloc.stats()
    assert stats.allocated_bytes == 4096 + 16384 + MiB
    assert stats.allocated_bytes_by_owner == {"map-1": 20480, "window-3": MiB}
    assert stats["free_bytes"] == 4 * MiB - stats.allocated_bytes
    assert sum(stats.free_bytes_by_order.values()) == stats.free_bytes
    assert 0.0 < stats.fragmentation < 1.0
    peak = stats.high_water_mark
    for s in (a, b, c):
        s.free()
    stats = alloc.stats()
    assert stats.high_water_mark == peak and stats.fragmentation == 0.0
    assert stats.allocated_bytes_by_owner == {}


def test_free_owner_returns_all_of_an_owners_blocks(region):
    alloc = BuddyAllocator(region)
    for _ in range(5):
        alloc.allocate(5000, owner="sort-1")
    keep = alloc.allocate(5000, owner="other")
    assert alloc.free_owner("sort-1") == 5 * 8192
    assert [s.owner for s in alloc.segments()] == ["other"]
    keep.free()
    alloc.check_invariants()


def test_seeded_random_sequences_keep_invariants(region):
    """jemalloc-style: check every invariant after every operation; the seed is in the message."""
    for seed in range(5):
        rng = random.Random(seed)
        alloc = BuddyAllocator(region, min_block=4096)
        live = []
        for step in range(400):
            if live and rng.random() < 0.45:
                live.pop(rng.randrange(len(live))).free()
            else:
                try:
                    live.append(alloc.allocate(rng.randint(1, 300_000)))
                except OutOfMemoryError:
                    pass
            try:
                alloc.check_invariants()
            except AssertionError as exc:
                raise AssertionError(f"seed {seed}, step {step}: {exc}") from exc
        for seg in live:
            seg.free()
        assert list(alloc.free_blocks()) == [(0, 4 * MiB)], f"seed {seed}"


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free keeps blocks disjoint, aligned, in range, and the bytes intact."""

    segments = Bundle("segments")

    def __init__(self) -> None:
        super().__init__()
        self.region = SharedRegion.create(1 * MiB)
        self.alloc = BuddyAllocator(self.region, min_block=4096, offset=64 * KiB, size=512 * KiB)
        self.stamp = 0

    @rule(target=segments, nbytes=st.integers(1, 300 * KiB))
    def allocate(self, nbytes):
        free_before = self.alloc.free_bytes
        try:
            seg = self.alloc.allocate(nbytes)
        except OutOfMemoryError:
            assert self.alloc.largest_free_block() < nbytes
            return None
        assert seg.size >= nbytes and seg.size < 2 * max(nbytes, 4096)
        assert self.alloc.free_bytes == free_before - seg.size
        self.stamp += 1
        seg.as_array(np.uint64)[:] = self.stamp  # every byte of the block is ours
        return (seg, self.stamp)

    @rule(item=consumes(segments))
    def free(self, item):
        if item is None:
            return
        seg, stamp = item
        arr = seg.as_array(np.uint64)
        assert (arr == stamp).all(), "another block overwrote this one"
        del arr
        seg.free()

    @invariant()
    def invariants_hold(self):
        self.alloc.check_invariants()
        stats = self.alloc.stats()
        assert stats.free_bytes + stats.allocated_bytes == self.alloc.total_bytes == 512 * KiB

    def teardown(self):
        for seg in list(self.alloc.segments()):
            seg.free()
        assert list(self.alloc.free_blocks()) == [(64 * KiB, 512 * KiB)]
        self.region.close()


AllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_allocator_state_machine = AllocatorMachine.TestCase
