"""SmallObjectAllocator: many small byte objects in the pages of one managed share, jemalloc's bins made real.

Imports: runtime.errors, runtime.managed (share), runtime.memory (segment, snapshot) (numpy, stdlib otherwise).

Each *size class* has a bin. A bin carves the pages it takes from the share
(:meth:`~runtime.managed.share.ManagedShare.try_allocate_page`) into equal
slots of its class and hands out one slot per object; an object larger than
the largest class that fits a page gets a block of its own
(:meth:`~runtime.managed.share.ManagedShare.try_allocate`), given back on
:meth:`SmallObjectAllocator.free`. The exact length of every object is kept
(a slot is larger than its object).

Free slots are kept per page, as jemalloc keeps them per slab: a fresh page
hands out slots in address order with a bump index, freed slots go on the
page's Python list (LIFO, the slot freed last is still in cache). A bin
allocates from its oldest page that has a free slot, so younger pages empty
out first, and a page whose slots are all free goes back to the share at once.

Handles are plain ints: ``page_number << SLOT_BITS | slot`` for a slot, and
``LARGE_TAG | block_id`` for a block of its own. A handle is valid from the
``alloc`` that returned it until the ``free`` that takes it; a stale handle may
name a reused slot (as a dangling pointer would), so the caller must not keep one.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from runtime.errors import DoubleFreeError, InvalidHandleError, InvalidSizeError
from runtime.managed.share import Buffer, ManagedShare
from runtime.memory.segment import MemorySegment
from runtime.memory.snapshot import Snapshot

__all__ = ["DEFAULT_SIZE_CLASSES", "LARGE_TAG", "SLOT_BITS", "BinStats", "SmallObjectAllocator"]

DEFAULT_SIZE_CLASSES = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
SLOT_BITS = 24  # slots per page < 2**24: 16-byte slots in pages of up to 256 MiB
_SLOT_MASK = (1 << SLOT_BITS) - 1
LARGE_TAG = 1 << 62  # set in the handles of objects with a block of their own
_FREE = -1  # the length of a free slot


@dataclass(frozen=True)
class BinStats(Snapshot):
    """One bin of a :class:`SmallObjectAllocator`: plain numbers, ready for metrics.

    ``size_class == 0`` is the row of objects larger than every class, one
    block each: ``slots`` counts those blocks and ``held_bytes`` their rounded sizes.
    """

    size_class: int
    objects: int
    bytes_used: int  # object bytes, without the slack of their slots
    slots: int  # slots of the pages this bin holds, used or free
    pages: int
    fill: float  # objects / slots (0.0 for an empty bin)
    held_bytes: int  # bytes of the share this bin holds (pages or blocks)

    def __str__(self) -> str:
        name = f"{self.size_class:>5} B" if self.size_class else "  large"
        return (f"{name}: {self.objects} objects, {self.bytes_used} bytes in {self.slots} slots of "
                f"{self.pages} pages ({self.fill:.0%} full, {self.held_bytes} bytes held)")


class _Page:
    """A page of a bin. Slots ``[fresh, nslots)`` were never handed out; ``freed`` holds the others that are free."""

    __slots__ = ("base", "bin", "fresh", "freed", "lens", "number", "objects", "segment")

    def __init__(self, segment: MemorySegment, bin_index: int, number: int, nslots: int) -> None:
        self.segment = segment
        self.base = segment.offset  # offset in the share's arena
        self.bin = bin_index
        self.number = number
        self.fresh = 0
        self.freed: list[int] = []
        self.lens = [_FREE] * nslots  # object length per slot; _FREE for a free slot
        self.objects = 0


class _Bin:
    """The pages of one size class. ``nonfull`` is ordered oldest first (a dict used as an ordered set)."""

    __slots__ = ("bytes_used", "nonfull", "nslots", "objects", "pages", "size")

    def __init__(self, size: int, nslots: int) -> None:
        self.size = size
        self.nslots = nslots
        self.pages = 0
        self.objects = 0
        self.bytes_used = 0
        self.nonfull: dict[_Page, None] = {}


class SmallObjectAllocator:
    """Byte objects of any size in the pages of ``share``, in bins of ``size_classes``.

    Classes larger than the share's page size are dropped (their objects take
    a block of their own). ``alloc`` returns ``None`` when the share has no room:
    the caller spills, it never fails for lack of memory.

    Ownership: the allocator takes pages and blocks from ``share`` and gives each
    back when its last object is freed, or in :meth:`release`. The caller that
    allocated an object owns it: it alone writes it (through :meth:`view` or
    :meth:`write`) and frees it, once. Views must not outlive the object's ``free``
    or the allocator's :meth:`release`.
    Process: the worker owning the share's arena. Not thread-safe (one task's thread).
    """

    def __init__(self, share: ManagedShare, *, size_classes: Sequence[int] = DEFAULT_SIZE_CLASSES) -> None:
        classes = sorted(set(size_classes))
        if not classes or classes[0] <= 0:
            msg = f"size classes must be positive ints; got {tuple(size_classes)!r}"
            raise InvalidSizeError(msg)
        page_size = share.page_size
        self.share = share
        self.page_size = page_size
        self.size_classes: tuple[int, ...] = tuple(c for c in classes if c <= page_size)
        self.max_small = self.size_classes[-1] if self.size_classes else 0
        self._bins = [_Bin(c, page_size // c) for c in self.size_classes]
        self._arena = share.arena_view  # owner of the share only; slices are the objects' views
        # owner of this allocator only: page number -> page (None: a number free for reuse)
        self._pages: list[_Page | None] = []
        self._free_numbers: list[int] = []
        self._large: dict[int, tuple[MemorySegment, int]] = {}  # block id -> (its block, object length)
        self._large_ids = 0
        self._large_held = 0
        self._large_bytes = 0

    # ------------------------------------------------------------ allocation
    def alloc(self, nbytes: int) -> int | None:
        """A handle of a new object of exactly ``nbytes`` bytes (contents undefined), or None: the share is full.

        Ownership: the caller owns the object until it passes the handle to :meth:`free`.
        """
        if nbytes < 0:
            msg = f"an object needs nbytes >= 0; got {nbytes}"
            raise InvalidSizeError(msg)
        if nbytes > self.max_small:
            return self._alloc_large(nbytes)
        index = bisect_left(self.size_classes, nbytes)
        b = self._bins[index]
        if b.nonfull:
            page = next(iter(b.nonfull))
        else:
            seg = self.share.try_allocate_page()
            if seg is None:
                return None
            page = self._new_page(seg, index, b.nslots)
            b.pages += 1
            b.nonfull[page] = None
        if page.freed:
            slot = page.freed.pop()
        else:
            slot = page.fresh
            page.fresh += 1
        page.lens[slot] = nbytes
        page.objects += 1
        if page.objects == b.nslots:
            del b.nonfull[page]
        b.objects += 1
        b.bytes_used += nbytes
        return page.number << SLOT_BITS | slot

    def _new_page(self, seg: MemorySegment, index: int, nslots: int) -> _Page:
        if self._free_numbers:
            number = self._free_numbers.pop()
            page = self._pages[number] = _Page(seg, index, number, nslots)
        else:
            number = len(self._pages)
            page = _Page(seg, index, number, nslots)
            self._pages.append(page)
        return page

    def _alloc_large(self, nbytes: int) -> int | None:
        seg = self.share.try_allocate(nbytes)
        if seg is None:
            return None
        self._large_ids += 1
        self._large[self._large_ids] = (seg, nbytes)
        self._large_held += seg.size
        self._large_bytes += nbytes
        return LARGE_TAG | self._large_ids

    def free(self, handle: int) -> None:
        """Free the object ``handle`` names; a page left without objects goes back to the share at once.

        Ownership: the caller gives the object up; its views must be dropped already.

        Raises:
            DoubleFreeError: the object was freed already.
            InvalidHandleError: no object of this allocator ever had this handle.
        """
        if handle & LARGE_TAG:
            entry = self._large.pop(handle ^ LARGE_TAG, None)
            if entry is None:
                self._bad_handle(handle)
            seg, nbytes = entry
            self._large_held -= seg.size
            self._large_bytes -= nbytes
            self.share.release(seg)
            return
        page, slot = self._locate(handle)
        nbytes = page.lens[slot]
        page.lens[slot] = _FREE
        b = self._bins[page.bin]
        if page.objects == b.nslots:
            b.nonfull[page] = None
        page.objects -= 1
        b.objects -= 1
        b.bytes_used -= nbytes
        if page.objects:
            page.freed.append(slot)
            return
        del b.nonfull[page]
        b.pages -= 1
        self._pages[page.number] = None
        self._free_numbers.append(page.number)
        self.share.release(page.segment)

    def resize_in_place(self, handle: int, nbytes: int) -> bool:
        """Make the object ``nbytes`` long if its slot (or block) holds that many; False (unchanged) if not.

        The first ``min(old, nbytes)`` bytes stay; bytes past the old length are undefined.
        """
        if handle & LARGE_TAG:
            seg, old = self._large_entry(handle)
            if nbytes > seg.size or nbytes <= self.max_small:
                return False  # a block holds only objects no slot can take
            self._large[handle ^ LARGE_TAG] = (seg, nbytes)
            self._large_bytes += nbytes - old
            return True
        page, slot = self._locate(handle)
        b = self._bins[page.bin]
        if nbytes > b.size:
            return False
        b.bytes_used += nbytes - page.lens[slot]
        page.lens[slot] = nbytes
        return True

    # ---------------------------------------------------------------- access
    def _locate(self, handle: int) -> tuple[_Page, int]:
        number, slot = handle >> SLOT_BITS, handle & _SLOT_MASK
        page = self._pages[number] if 0 <= number < len(self._pages) else None
        if page is None or slot >= len(page.lens) or page.lens[slot] == _FREE:
            self._bad_handle(handle)
        return page, slot

    def _large_entry(self, handle: int) -> tuple[MemorySegment, int]:
        entry = self._large.get(handle ^ LARGE_TAG)
        if entry is None:
            self._bad_handle(handle)
        return entry

    def _bad_handle(self, handle: int) -> NoReturn:
        if handle & LARGE_TAG:
            known = 0 < handle ^ LARGE_TAG <= self._large_ids
        else:
            number, slot = handle >> SLOT_BITS, handle & _SLOT_MASK
            known = 0 <= number < len(self._pages) and (page := self._pages[number]) is not None \
                and slot < page.fresh
        if known:
            msg = f"object {handle:#x} was freed already (or its page went back to the share)"
            raise DoubleFreeError(msg)
        msg = f"{handle:#x} is not a handle of this allocator"
        raise InvalidHandleError(msg)

    def address(self, handle: int) -> tuple[int, int]:
        """``(offset in the share's arena, length)`` of the object: for batch access through ``share.arena``."""
        if handle & LARGE_TAG:
            seg, nbytes = self._large_entry(handle)
            return seg.offset, nbytes
        page, slot = self._locate(handle)
        return page.base + slot * self._bins[page.bin].size, page.lens[slot]

    def size(self, handle: int) -> int:
        """The object's length in bytes (as allocated or resized)."""
        return self.address(handle)[1]

    def view(self, handle: int) -> memoryview:
        """A writable zero-copy view of exactly the object's bytes.

        Ownership: only the object's owner writes through it; it must not outlive the object's ``free``.
        """
        at, nbytes = self.address(handle)
        return self._arena[at:at + nbytes]

    def read(self, handle: int) -> bytes:
        """A copy of the object's bytes."""
        at, nbytes = self.address(handle)
        return bytes(self._arena[at:at + nbytes])

    def write(self, handle: int, data: Buffer, pos: int = 0) -> None:
        """Copy ``data`` into the object at ``pos``; it must fit within the object's length."""
        at, nbytes = self.address(handle)
        if isinstance(data, (bytes, bytearray)):
            mv: bytes | bytearray | memoryview = data
        else:
            mv = (data.data if isinstance(data, np.ndarray) else memoryview(data)).cast("B")
        if pos < 0 or pos + len(mv) > nbytes:
            msg = f"cannot write {len(mv)} bytes at {pos} into an object of {nbytes} bytes"
            raise InvalidSizeError(msg)
        self._arena[at + pos:at + pos + len(mv)] = mv

    # ------------------------------------------------------------ statistics
    def stats(self) -> list[BinStats]:
        """One row per size class, then the row of objects with a block of their own (``size_class == 0``)."""
        page_size = self.page_size
        rows = [BinStats(b.size, b.objects, b.bytes_used, b.pages * b.nslots, b.pages,
                         b.objects / (b.pages * b.nslots) if b.pages else 0.0, b.pages * page_size)
                for b in self._bins]
        n = len(self._large)
        rows.append(BinStats(0, n, self._large_bytes, n, 0, 1.0 if n else 0.0, self._large_held))
        return rows

    @property
    def objects(self) -> int:
        return sum(b.objects for b in self._bins) + len(self._large)

    @property
    def bytes_used(self) -> int:
        """Object bytes, without the slack of their slots."""
        return sum(b.bytes_used for b in self._bins) + self._large_bytes

    @property
    def total_bytes(self) -> int:
        """Bytes of the share this allocator holds: its pages and its blocks."""
        return sum(b.pages for b in self._bins) * self.page_size + self._large_held

    def __len__(self) -> int:
        return self.objects

    # --------------------------------------------------------------- lifetime
    def release(self) -> None:
        """Give every page and block back to the share; every handle becomes invalid. Idempotent.

        Ownership: every view of an object must be dropped first.
        """
        segments = [page.segment for page in self._pages if page is not None]
        segments += [seg for seg, _ in self._large.values()]
        self._pages.clear()
        self._free_numbers.clear()
        self._large.clear()
        self._large_held = self._large_bytes = 0
        self._bins = [_Bin(b.size, b.nslots) for b in self._bins]
        for seg in segments:
            self.share.release(seg)

    def __repr__(self) -> str:
        return f"<SmallObjectAllocator {self.objects} objects, {self.total_bytes} bytes held>"
