"""BuddyAllocator: carves a range of a SharedRegion into power-of-two blocks.

Imports: runtime.errors, runtime.memory.segment, runtime.memory.units.

Bookkeeping only: the allocator never maps memory, it hands out
(offset, size) views of its region. Blocks are ``min_block << order`` bytes,
aligned to their own size relative to the start of the allocator's range. The
buddy of a block is ``offset ^ (min_block << order)`` (as in Linux's page
allocator). Free blocks are kept in one set per order, so allocate and free
cost O(number of orders) = O(log n): no scan of the range.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.errors import (
    DoubleFreeError,
    InvalidHandleError,
    InvalidSizeError,
    OutOfMemoryError,
)
from runtime.memory.segment import MemorySegment, SegmentHandleLike
from runtime.memory.snapshot import Snapshot
from runtime.memory.units import format_bytes

if TYPE_CHECKING:  # pragma: no cover
    from runtime.memory.region import SharedRegion

__all__ = ["AllocatorStats", "BuddyAllocator"]


@dataclass(frozen=True)
class AllocatorStats(Snapshot):
    """A snapshot of a BuddyAllocator. Also readable as a mapping: ``stats["free_bytes"]``."""

    min_block: int
    total_bytes: int
    free_bytes: int
    allocated_bytes: int
    allocated_blocks: int
    largest_free_block: int
    free_bytes_by_order: dict[int, int] = field(default_factory=dict)
    free_blocks_by_order: dict[int, int] = field(default_factory=dict)
    allocated_bytes_by_owner: dict[Hashable, int] = field(default_factory=dict)
    high_water_mark: int = 0
    fragmentation: float = 0.0  # 1 - largest_free_block / free_bytes; 0 when free memory is one block


class BuddyAllocator:
    """Buddy allocation of ``[offset, offset + size)`` of ``region``'s usable area.

    Ownership: the process that constructs the allocator owns it and is the
    only one that may allocate and free with it (the coordinator for the global
    range, each worker for its arena). The caller of :meth:`allocate` owns the
    returned segment until it frees it. A range that is not a power of two
    times ``min_block`` is covered by several maximal blocks; whatever is left
    below ``min_block`` at its end is never handed out.
    Process: the owning process only. Not thread-safe.
    """

    def __init__(self, region: SharedRegion, min_block: int = 4096, *, offset: int = 0,
                 size: int | None = None) -> None:
        if not isinstance(min_block, int) or min_block <= 0 or min_block & (min_block - 1):
            msg = f"min_block must be a power of two > 0; got {min_block!r}"
            raise InvalidSizeError(msg)
        if min_block < region.granule:
            msg = (f"min_block must be >= the region's generation granule ({region.granule} bytes); "
                   f"got {min_block}; create the region with SharedRegion.create(size, granule={min_block})")
            raise InvalidSizeError(msg)
        size = region.size - offset if size is None else size
        if offset < 0 or offset % region.granule or size < min_block or offset + size > region.size:
            msg = (f"allocator range [offset={offset}, size={size}) must lie in the region's "
                   f"{region.size} usable bytes, start on a {region.granule}-byte granule and hold at "
                   f"least one block of min_block={min_block}")
            raise InvalidSizeError(msg)
        self.region = region
        self.min_block = min_block
        self.offset = offset
        self.size = size
        self.max_order = (size // min_block).bit_length() - 1
        # Owner of this allocator only. Offsets here are relative to self.offset.
        self._free: list[set[int]] = [set() for _ in range(self.max_order + 1)]  # index = order
        self._allocated: dict[int, MemorySegment] = {}
        self._by_owner: dict[Hashable, int] = {}
        self._free_bytes = 0
        self._high_water = 0
        pos = 0
        for order in range(self.max_order, -1, -1):  # cover the range with maximal aligned blocks
            block = min_block << order
            while pos + block <= size:
                self._free[order].add(pos)
                self._free_bytes += block
                pos += block
        self.total_bytes = self._free_bytes

    # --------------------------------------------------------------- allocate
    def order_for(self, nbytes: int) -> int:
        """The order of the smallest block holding ``nbytes``."""
        return (-(-nbytes // self.min_block) - 1).bit_length()

    def allocate(self, nbytes: int, owner: Hashable = None) -> MemorySegment:
        """Allocate a block of at least ``nbytes`` (rounded up to ``min_block << k``).

        Ownership: the caller owns the segment and frees it exactly once with
        ``seg.free()`` or ``allocator.free(seg)``; ``owner`` is a label for
        statistics and leak reports.

        Raises:
            TypeError: nbytes is not an int.
            InvalidSizeError: nbytes <= 0.
            OutOfMemoryError: no free block is large enough (names requested,
                largest free, total free).
        """
        if type(nbytes) is not int and (not isinstance(nbytes, int) or isinstance(nbytes, bool)):
            msg = f"nbytes must be an int; got {type(nbytes).__name__}"
            raise TypeError(msg)
        if nbytes <= 0:
            msg = f"allocation size must be > 0 bytes; got {nbytes}"
            raise InvalidSizeError(msg)
        min_block = self.min_block
        order = (-(-nbytes // min_block) - 1).bit_length()  # inlined order_for: hot path
        free = self._free
        k = order
        max_order = self.max_order
        while k <= max_order and not free[k]:
            k += 1
        if k > max_order:
            msg = (f"cannot allocate {format_bytes(nbytes)} ({nbytes} bytes) for {owner!r}: largest free "
                   f"block {format_bytes(self.largest_free_block())}, {format_bytes(self._free_bytes)} of "
                   f"{format_bytes(self.total_bytes)} free; raise memory.region.size or free segments")
            raise OutOfMemoryError(msg)
        rel = free[k].pop()
        while k > order:  # split: keep the lower half, free the upper half
            k -= 1
            free[k].add(rel + (min_block << k))
        block = min_block << order
        self._free_bytes -= block
        allocated = self.total_bytes - self._free_bytes
        if allocated > self._high_water:
            self._high_water = allocated
        by_owner = self._by_owner
        by_owner[owner] = by_owner.get(owner, 0) + block
        absolute = self.offset + rel
        region = self.region
        seg = MemorySegment._allocated(region, absolute, block, region._generations[absolute // region.granule],
                                       owner, self)
        self._allocated[rel] = seg
        return seg

    # ------------------------------------------------------------------- free
    def free(self, seg: MemorySegment | SegmentHandleLike) -> None:
        """Return a block and coalesce it with its buddy while the buddy is free.

        Accepts the segment ``allocate`` returned, or its handle (for
        reclaiming a block whose segment object lives in another process).

        Raises:
            DoubleFreeError: the segment was already freed.
            InvalidHandleError: the segment belongs to another allocator or
                region, or the handle is stale.
        """
        if isinstance(seg, MemorySegment):
            if seg._allocator is not self:
                msg = (f"segment at offset {seg.offset} ({seg.size} bytes) was not allocated by this "
                       f"allocator (range [{self.offset}, {self.offset + self.size})); free it with its own")
                raise InvalidHandleError(msg)
            if seg._freed:
                text = f"segment at offset {seg.offset} ({seg.size} bytes) was freed twice"
                raise DoubleFreeError(text)
            rel = seg.offset - self.offset
            if self._allocated.pop(rel, None) is not seg:  # pragma: no cover - guarded by the flags above
                text = f"segment at offset {seg.offset} is not allocated"
                raise DoubleFreeError(text)
        else:
            seg = self._resolve_handle(seg)
            rel = seg.offset - self.offset
            del self._allocated[rel]
        seg._freed = True
        region = self.region
        gens, i = region._generations, seg.offset // region.granule  # inlined region.bump_generation
        gens[i] = (gens[i] + 1) & 0xFFFFFFFF
        size, owner, by_owner = seg.size, seg.owner, self._by_owner
        owner_bytes = by_owner[owner] - size
        if owner_bytes:
            by_owner[owner] = owner_bytes
        else:
            del by_owner[owner]
        self._free_bytes += size
        min_block = self.min_block
        order = (size // min_block).bit_length() - 1
        free = self._free
        max_order = self.max_order
        while order < max_order:
            buddy = rel ^ (min_block << order)
            buddies = free[order]
            if buddy not in buddies:
                break
            buddies.remove(buddy)
            rel &= ~(min_block << order)  # the lower of the two
            order += 1
        free[order].add(rel)

    def _resolve_handle(self, handle: SegmentHandleLike) -> MemorySegment:
        try:
            offset, size, generation = (int(x) for x in handle)
        except (TypeError, ValueError):
            msg = f"expected a MemorySegment or SegmentHandle; got {handle!r}"
            raise InvalidHandleError(msg) from None
        seg = self._allocated.get(offset - self.offset)
        if seg is None or seg.size != size:
            msg = (f"handle (offset={offset}, size={size}) names no block allocated by this allocator; "
                   f"it was freed already or belongs to another allocator")
            raise DoubleFreeError(msg) if seg is None and self._in_range(offset) else InvalidHandleError(msg)
        if seg.generation != generation:
            msg = f"stale handle for offset {offset}: generation {generation}, block has {seg.generation}"
            raise InvalidHandleError(msg)
        return seg

    def _in_range(self, offset: int) -> bool:
        return self.offset <= offset < self.offset + self.size

    def free_owner(self, owner: Hashable) -> int:
        """Free every block labelled ``owner``; returns the bytes freed. O(blocks allocated)."""
        victims = [seg for seg in self._allocated.values() if seg.owner == owner]
        for seg in victims:
            self.free(seg)
        return sum(seg.size for seg in victims)

    # ------------------------------------------------------------- inspection
    def segments(self, owner: Hashable = ...) -> Iterator[MemorySegment]:
        """The live segments, in address order (all, or those of ``owner``; ``...`` means all)."""
        for rel in sorted(self._allocated):
            seg = self._allocated[rel]
            if owner is ... or seg.owner == owner:
                yield seg

    def free_blocks(self) -> Iterator[tuple[int, int]]:
        """(absolute offset, bytes) of every free block, in address order."""
        blocks = [(rel, self.min_block << order) for order, s in enumerate(self._free) for rel in s]
        for rel, nbytes in sorted(blocks):
            yield self.offset + rel, nbytes

    def largest_free_block(self) -> int:
        for order in range(self.max_order, -1, -1):
            if self._free[order]:
                return self.min_block << order
        return 0

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    @property
    def allocated_bytes(self) -> int:
        return self.total_bytes - self._free_bytes

    def stats(self) -> AllocatorStats:
        """Free bytes per order, allocated bytes (total and by owner), largest free block,
        fragmentation and the high-water mark. O(orders + owners)."""
        largest = self.largest_free_block()
        free_by_order = {o: len(s) * (self.min_block << o) for o, s in enumerate(self._free) if s}
        return AllocatorStats(
            min_block=self.min_block,
            total_bytes=self.total_bytes,
            free_bytes=self._free_bytes,
            allocated_bytes=self.allocated_bytes,
            allocated_blocks=len(self._allocated),
            largest_free_block=largest,
            free_bytes_by_order=free_by_order,
            free_blocks_by_order={o: len(s) for o, s in enumerate(self._free) if s},
            allocated_bytes_by_owner=dict(self._by_owner),
            high_water_mark=self._high_water,
            fragmentation=(1.0 - largest / self._free_bytes) if self._free_bytes else 0.0,
        )

    statistics = stats

    def check_invariants(self) -> None:
        """Assert the allocator's internal invariants (O(n); for tests and debugging).

        Blocks lie in range, are aligned to their size, never overlap, free +
        allocated == total, and no two free buddies of the same order remain
        uncoalesced.
        """
        spans = []
        for order, blocks in enumerate(self._free):
            size = self.min_block << order
            for rel in blocks:
                assert rel % size == 0, f"free block {rel} of order {order} misaligned"
                buddy = rel ^ size
                assert buddy not in blocks, f"free buddies {rel} and {buddy} of order {order} not coalesced"
                spans.append((rel, size, "free"))
        for rel, seg in self._allocated.items():
            assert seg.offset == self.offset + rel and not seg._freed
            assert rel % seg.size == 0, f"allocated block {rel} of {seg.size} bytes misaligned"
            spans.append((rel, seg.size, "allocated"))
        spans.sort()
        end = 0
        for rel, size, kind in spans:
            assert rel >= end, f"{kind} block at {rel} overlaps the block ending at {end}"
            end = rel + size
        assert end <= self.size, f"block ends at {end}, past the range of {self.size} bytes"
        free = sum(size for _, size, kind in spans if kind == "free")
        allocated = sum(size for _, size, kind in spans if kind == "allocated")
        assert free == self._free_bytes, f"free list holds {free} bytes, counter says {self._free_bytes}"
        assert free + allocated == self.total_bytes, f"{free} free + {allocated} allocated != {self.total_bytes}"
        assert sum(self._by_owner.values()) == allocated

    def __repr__(self) -> str:
        return (f"<BuddyAllocator [{self.offset}, {self.offset + self.size}) min_block={self.min_block} "
                f"{format_bytes(self._free_bytes)} of {format_bytes(self.total_bytes)} free>")
