"""MemorySegment: typed access, bounds, zero-copy views, read-only views, use after free."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import (
    InvalidHandleError,
    ReadOnlySegmentError,
    SegmentFreedError,
    SegmentIndexError,
)
from runtime.memory import BuddyAllocator, SegmentHandle, SharedRegion

SCALARS = [
    ("int8", -128), ("int16", -32768), ("int32", -(2**31)), ("int64", -(2**63)),
    ("uint8", 255), ("uint16", 65535), ("uint32", 2**32 - 1), ("uint64", 2**64 - 1),
    ("float32", 1.5), ("float64", -2.25e300),
]


@pytest.fixture
def alloc():
    with SharedRegion.create(1 << 20) as region:
        yield BuddyAllocator(region, min_block=4096)


@pytest.mark.parametrize(("kind", "value"), SCALARS)
def test_typed_put_get_roundtrip(alloc, kind, value):
    seg = alloc.allocate(4096)
    getattr(seg, f"put_{kind}")(16, value)
    assert getattr(seg, f"get_{kind}")(16) == value
    width = np.dtype(kind).itemsize
    assert seg.as_array(kind, pos=16, count=1)[0] == value
    with pytest.raises(SegmentIndexError, match=rf"^put_{kind} of {width} bytes at offset {4096 - width + 1} "
                       r"is out of bounds of a segment of 4096 bytes$"):
        getattr(seg, f"put_{kind}")(4096 - width + 1, value)


def test_out_of_bounds_is_an_index_error(alloc):
    seg = alloc.allocate(4096)
    with pytest.raises(IndexError):
        seg.get_int64(-1)
    with pytest.raises(IndexError):
        seg.get_bytes(4000, 97)
    with pytest.raises(IndexError):
        seg.put_bytes(4095, b"ab")
    with pytest.raises(IndexError):
        seg.as_array(np.uint64, count=513)


def test_value_that_does_not_fit_raises_overflow(alloc):
    seg = alloc.allocate(64)
    with pytest.raises(OverflowError, match="does not fit uint8"):
        seg.put_uint8(0, 256)


def test_bytes_and_numpy_views_are_zero_copy(alloc):
    seg = alloc.allocate(10_000)
    view = seg.as_array(np.uint64)
    assert view.size == seg.size // 8
    view[:] = np.arange(view.size, dtype=np.uint64)
    assert seg.get_int64(8 * 100) == 100  # the view wrote the segment's bytes
    seg.put_bytes(0, b"\xff" * 8)
    assert view[0] == 2**64 - 1  # the segment wrote the view's bytes
    mv = seg.view(8, 16)
    assert bytes(mv) == seg.get_bytes(8, 16)
    seg.put_bytes(32, memoryview(np.array([7], dtype=np.int64)))
    assert seg.get_int64(32) == 7


def test_segments_do_not_alias(alloc):
    a, b = alloc.allocate(4096), alloc.allocate(4096)
    a.fill(0xAA)
    b.fill(0x55)
    assert set(a.get_bytes(0, 4096)) == {0xAA} and set(b.get_bytes(0, 4096)) == {0x55}


def test_any_access_after_free_raises(alloc):
    seg = alloc.allocate(100)
    seg.free()
    for call in (lambda: seg.get_int32(0), lambda: seg.put_int32(0, 1), lambda: seg.get_bytes(0, 1),
                 lambda: seg.as_array(), lambda: seg.view(), lambda: seg.handle()):
        with pytest.raises(SegmentFreedError, match=r"on a freed segment \(offset 0, 4096 bytes"):
            call()


def test_handle_roundtrip_in_process_and_stale_detection(alloc):
    region = alloc.region
    seg = alloc.allocate(20_000, owner="x")
    seg.put_float64(8, 3.5)
    h = seg.handle()
    assert isinstance(h, SegmentHandle) and tuple(h) == (seg.offset, 32768, seg.generation)
    other = region.segment(list(h))
    assert other.get_float64(8) == 3.5
    seg.free()
    with pytest.raises(SegmentFreedError):
        other.get_float64(8)
    assert other.freed
    with pytest.raises(InvalidHandleError, match=r"^stale handle for offset 0: generation 0, region has 1"):
        region.segment(h)
    with pytest.raises(InvalidHandleError, match="borrows its bytes"):
        region.segment(alloc.allocate(10).handle()).free()


@pytest.mark.parametrize("bad", [(0, 0, 0), (-4096, 4096, 0), (0, 1 << 30, 0), (100, 4096, 0), "xyz", (1, 2)])
def test_malformed_handles_are_rejected(alloc, bad):
    with pytest.raises(InvalidHandleError):
        alloc.region.segment(bad)


def test_read_only_views_refuse_writes(alloc):
    seg = alloc.allocate(4096)
    seg.put_int64(0, 9)
    ro = alloc.region.segment(seg.handle(), readonly=True)
    assert ro.get_int64(0) == 9
    with pytest.raises(ReadOnlySegmentError, match="read-only"):
        ro.put_int64(0, 1)
    with pytest.raises(ReadOnlySegmentError):
        ro.put_bytes(0, b"x")
    arr = ro.as_array(np.int64)
    with pytest.raises(ValueError):
        arr[0] = 1
    assert ro.view().readonly
