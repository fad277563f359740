"""SmallObjectAllocator against a dict model, in a real region and MemoryManager (no page may leak)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import managed_memory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import DoubleFreeError, InvalidHandleError
from runtime.managed.share import ManagedShare
from runtime.state.bins import LARGE_TAG, BinStats, SmallObjectAllocator

PAGE = 4096
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# An op: ("alloc", size) | ("free", pick) | ("write", pick, seed) ; pick chooses a live object.
sizes = st.one_of(st.integers(0, 64), st.integers(0, 4096), st.integers(4097, 3 * PAGE))
ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), sizes),
    st.tuples(st.just("free"), st.integers(0, 1 << 30)),
    st.tuples(st.just("write"), st.integers(0, 1 << 30), st.integers(0, 255)),
), max_size=120)


def check_stats(alloc: SmallObjectAllocator, model: dict[int, bytes], share: ManagedShare) -> None:
    rows = alloc.stats()
    assert all(isinstance(r, BinStats) for r in rows)
    assert sum(r.objects for r in rows) == len(model) == alloc.objects
    assert sum(r.bytes_used for r in rows) == sum(map(len, model.values())) == alloc.bytes_used
    assert sum(r.held_bytes for r in rows) == alloc.total_bytes == share.used_bytes
    for r in rows[:-1]:
        assert r.slots == r.pages * (PAGE // r.size_class)
        assert r.objects <= r.slots and (r.pages == 0 or r.objects > 0), "an empty page must go back"
        assert r.fill == (r.objects / r.slots if r.slots else 0.0)
        assert isinstance(r.fill, float) and str(r)


@SETTINGS
@given(ops=ops, share_pages=st.integers(1, 12))
def test_random_alloc_free_write_read_match_a_dict(tmp_path, ops, share_pages):
    with managed_memory(tmp_path, 1 << 20, PAGE) as (mm, _io):
        share = ManagedShare(mm, "bins", share_pages * PAGE)
        alloc = SmallObjectAllocator(share)
        model: dict[int, bytes] = {}
        try:
            for op in ops:
                live = sorted(model)
                if op[0] == "alloc":
                    h = alloc.alloc(op[1])
                    if h is None:
                        assert share.available_bytes < max(PAGE, share.block_size(op[1]))
                        continue
                    assert h not in model and alloc.size(h) == op[1]
                    data = np.random.default_rng(op[1]).integers(0, 256, op[1], np.uint8).tobytes()
                    alloc.write(h, data)
                    model[h] = data
                elif live and op[0] == "free":
                    h = live[op[1] % len(live)]
                    alloc.free(h)
                    del model[h]
                    with pytest.raises((DoubleFreeError, InvalidHandleError)):
                        alloc.free(h)
                elif live:
                    h = live[op[1] % len(live)]
                    view = alloc.view(h)
                    view[:] = bytes([op[2]]) * len(view)
                    model[h] = bytes([op[2]]) * len(view)
                check_stats(alloc, model, share)
            for h, data in model.items():
                assert alloc.read(h) == data and bytes(alloc.view(h)) == data
            for h in list(model):
                alloc.free(h)
                del model[h]
            check_stats(alloc, model, share)
            assert share.used_bytes == 0, "every page goes back once its bin is empty"
        finally:
            alloc.release()
            alloc.release()  # idempotent
            assert share.used_bytes == 0


def test_a_full_share_returns_none_and_freeing_makes_room(tmp_path):
    with managed_memory(tmp_path, 1 << 20, PAGE) as (mm, _io):
        share = ManagedShare(mm, "bins", 2 * PAGE)
        alloc = SmallObjectAllocator(share)
        handles = []
        while (h := alloc.alloc(100)) is not None:  # 128-byte slots: 32 a page
            handles.append(h)
        assert len(handles) == 64 and alloc.alloc(10) is None and alloc.alloc(3 * PAGE) is None
        assert alloc.stats()[5].fill == 1.0
        alloc.free(handles.pop())
        assert alloc.alloc(120) is not None, "a free slot of the class is reused"
        for h in handles[:32]:
            alloc.free(h)
        assert share.used_bytes == 2 * PAGE - PAGE
        assert alloc.alloc(16) is not None, "an emptied page went back and another bin took it"
        alloc.release()
        assert share.used_bytes == 0


def test_large_objects_take_a_block_of_their_own(tmp_path):
    with managed_memory(tmp_path, 1 << 20, PAGE) as (mm, _io):
        share = ManagedShare(mm, "bins", 8 * PAGE)
        alloc = SmallObjectAllocator(share, size_classes=(16, 64, 8192))  # 8192 > a page: dropped
        assert alloc.size_classes == (16, 64)
        h = alloc.alloc(65)
        assert h is not None and h & LARGE_TAG and alloc.size(h) == 65
        alloc.write(h, b"x" * 65)
        assert alloc.read(h) == b"x" * 65 and share.used_bytes == 256  # the share's min block
        assert alloc.resize_in_place(h, 200) and alloc.size(h) == 200
        assert not alloc.resize_in_place(h, 300)
        alloc.free(h)
        with pytest.raises(InvalidHandleError):
            alloc.read(12345 << 30)
        assert share.used_bytes == 0
        alloc.release()
