"""MemoryManager: a worker's managed memory, handed out as pages per owning task, within a budget.

Imports: runtime.errors, runtime.memory (buddy, segment, units, region for typing only).

The model is Flink's ``MemoryManager``: operators that sort, hash or keep
window state take fixed-size *pages* (``allocate_pages``) or one larger block
(``allocate``) from the worker's arena, on behalf of an *owner* (the task or
operator instance). The manager enforces a byte budget (the managed fraction
of the arena), counts every block at its rounded (buddy) size, and takes back
whatever an owner still holds when its task ends (``release_all``). Memory
still held at that point is a leak of the task: it is logged on the
``shmflow.memory`` logger with the owner's name, the segment count and the
bytes, and kept in :meth:`MemoryManager.leak_reports`.

Ownership: the manager's process owns the allocator range it carves; an
owner holds its segments from ``allocate*`` until ``release``/``release_all``.
Process: the worker that owns the arena. Thread-safe: every method takes one
lock, because IOManager threads and tasks may release concurrently.
"""

from __future__ import annotations

import logging
import threading
import warnings
import weakref
from collections.abc import Hashable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from runtime.errors import (
    DoubleFreeError,
    InvalidHandleError,
    InvalidSizeError,
    OutOfMemoryError,
    ShmflowError,
)
from runtime.memory.buddy import BuddyAllocator
from runtime.memory.segment import MemorySegment
from runtime.memory.snapshot import Snapshot
from runtime.memory.units import format_bytes

if TYPE_CHECKING:  # pragma: no cover
    from runtime.memory.region import SharedRegion

__all__ = ["BUDGET_KEY", "DEFAULT_PAGE_SIZE", "LeakReport", "MemoryManager", "MemoryManagerStats"]

logger = logging.getLogger("shmflow.memory")

DEFAULT_PAGE_SIZE = 32768
BUDGET_KEY = "memory.managed.fraction"


@dataclass(frozen=True)
class LeakReport:
    """An owner that still held managed memory when its task ended (or the manager closed)."""

    manager: str
    owner: Hashable
    segments: int
    nbytes: int
    when: str  # "release_all" or "close"

    def __str__(self) -> str:
        what = "when its task ended" if self.when == "release_all" else "when the manager closed"
        return (f"{self.manager}: owner {self.owner!r} still held {self.segments} segment"
                f"{'s' if self.segments != 1 else ''} ({format_bytes(self.nbytes)}, {self.nbytes} bytes) "
                f"of managed memory {what}; released them")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MemoryManagerStats(Snapshot):
    """A snapshot of a MemoryManager. Also readable as a mapping: ``stats["used_bytes"]``."""

    name: str
    budget: int
    page_size: int
    used_bytes: int
    available_bytes: int
    segments: int
    high_water_mark: int
    allocations: int  # successful allocate/allocate_pages calls
    failed_allocations: int
    releases: int  # segments released (by release, release_all and close)
    leaks: int  # leak reports recorded
    closed: bool
    bytes_by_owner: dict[Hashable, int] = field(default_factory=dict)


class MemoryManager:
    """Managed pages for the operators of one worker, with a budget and per-owner release.

    ``budget`` (default: everything ``allocator`` holds) caps the bytes all
    owners hold together; ``page_size`` (a power of two, at least the
    allocator's ``min_block``) is the size of the pages ``allocate_pages``
    hands out. Pass ``lock`` when other components of this process use the
    same allocator from several threads, so that all of them share one lock
    (the allocator itself is not thread-safe).

    Ownership: the manager frees only blocks it allocated. Each segment
    belongs to the owner it was allocated for until it is released; memoryviews
    and numpy arrays taken from it must not outlive that. ``close()`` takes
    back everything.
    Process: the worker owning the arena. Thread-safe.
    """

    def __init__(self, allocator: BuddyAllocator, *, budget: int | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, name: str = "memory manager",
                 lock: threading.Lock | threading.RLock | None = None) -> None:
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size <= 0 \
                or page_size & (page_size - 1) or page_size < allocator.min_block:
            msg = (f"page_size must be a power of two >= the allocator's min_block ({allocator.min_block}); "
                   f"got {page_size!r}; change memory.segment.size")
            raise InvalidSizeError(msg)
        budget = allocator.total_bytes if budget is None else budget
        if not isinstance(budget, int) or isinstance(budget, bool):
            text = f"budget must be an int; got {type(budget).__name__}"
            raise TypeError(text)
        if not 0 < budget <= allocator.total_bytes:
            msg = (f"managed budget must be in [1, {allocator.total_bytes}] bytes (what the allocator "
                   f"holds); got {budget}; change {BUDGET_KEY}")
            raise InvalidSizeError(msg)
        self.allocator = allocator
        self.budget = budget
        self.page_size = page_size
        self.name = name
        self._lock = lock if lock is not None else threading.Lock()
        # Guarded by self._lock. Segments are hashed by identity.
        self._held: dict[Hashable, dict[MemorySegment, None]] = {}  # owner -> its live segments
        self._bytes: dict[Hashable, int] = {}  # owner -> bytes held (rounded block sizes)
        self._peaks: dict[Hashable, int] = {}  # owner -> most bytes it held at once since reset_peaks()
        self._released: weakref.WeakSet[MemorySegment] = weakref.WeakSet()  # for double-release errors
        self._used = 0
        self._segments = 0
        self._high_water = 0
        self._allocations = 0
        self._failed = 0
        self._releases = 0
        self._leaks: list[LeakReport] = []
        self._closed = False

    @classmethod
    def for_range(cls, region: SharedRegion, offset: int, size: int, *, page_size: int = DEFAULT_PAGE_SIZE,
                  min_block: int | None = None, budget: int | None = None,
                  name: str = "memory manager") -> MemoryManager:
        """A manager over its own BuddyAllocator for ``[offset, offset + size)`` of ``region``.

        ``min_block`` defaults to ``min(page_size, 4096)``, raised to the
        region's granule. The budget defaults to the whole range.
        """
        if min_block is None:
            min_block = max(region.granule, min(page_size, 4096))
        allocator = BuddyAllocator(region, min_block, offset=offset, size=size)
        return cls(allocator, budget=budget, page_size=page_size, name=name)

    # --------------------------------------------------------------- allocate
    def allocate_pages(self, owner: Hashable, n: int) -> list[MemorySegment]:
        """Take ``n`` pages of ``page_size`` bytes for ``owner``: all of them, or none.

        Ownership: ``owner`` holds the pages until it passes each to
        :meth:`release`, or until :meth:`release_all` (at the end of its
        task). While a page is handed to the IOManager for a spill or read,
        the IOManager holds it: do not release it before the future completes.
        Process: the worker owning the arena. Thread-safe.

        Raises:
            TypeError: n is not an int.
            InvalidSizeError: n < 0.
            OutOfMemoryError: the budget (or the arena) cannot hold ``n`` more
                pages; names the owner, the request, what is left and
                ``memory.managed.fraction``. Nothing stays allocated.
        """
        if not isinstance(n, int) or isinstance(n, bool):
            msg = f"n must be an int; got {type(n).__name__}"
            raise TypeError(msg)
        if n < 0:
            msg = f"number of pages must be >= 0; got {n}"
            raise InvalidSizeError(msg)
        nbytes = n * self.page_size
        what = f"{n} page{'s' if n != 1 else ''} ({format_bytes(nbytes)})"
        with self._lock:
            self._check_open(what, owner)
            if nbytes > self.budget - self._used:
                self._fail(what, owner)
            pages: list[MemorySegment] = []
            try:
                for _ in range(n):
                    pages.append(self.allocator.allocate(self.page_size, owner))
            except OutOfMemoryError as exc:
                for seg in pages:  # all or nothing
                    self.allocator.free(seg)
                self._fail(what, owner, exc)
            self._account(owner, pages, nbytes)
            return pages

    def allocate(self, owner: Hashable, nbytes: int) -> MemorySegment:
        """Take one block of at least ``nbytes`` for ``owner``; its rounded size counts against the budget.

        Ownership: ``owner`` holds the block until :meth:`release` or
        :meth:`release_all`; while the IOManager has it for a pending request,
        the IOManager holds it.
        Process: the worker owning the arena. Thread-safe.

        Raises:
            TypeError: nbytes is not an int.
            InvalidSizeError: nbytes <= 0.
            OutOfMemoryError: the budget or the arena cannot hold the block.
        """
        if not isinstance(nbytes, int) or isinstance(nbytes, bool):
            msg = f"nbytes must be an int; got {type(nbytes).__name__}"
            raise TypeError(msg)
        if nbytes <= 0:
            msg = f"allocation size must be > 0 bytes; got {nbytes}"
            raise InvalidSizeError(msg)
        rounded = self.allocator.min_block << self.allocator.order_for(nbytes)
        what = f"{format_bytes(nbytes)} ({nbytes} bytes" + \
            (")" if rounded == nbytes else f", a {format_bytes(rounded)} block)")
        with self._lock:
            self._check_open(what, owner)
            if rounded > self.budget - self._used:
                self._fail(what, owner)
            try:
                seg = self.allocator.allocate(nbytes, owner)
            except OutOfMemoryError as exc:
                self._fail(what, owner, exc)
            self._account(owner, [seg], seg.size)
            return seg

    def _account(self, owner: Hashable, segments: list[MemorySegment], nbytes: int) -> None:
        """Record newly allocated segments. Caller holds the lock."""
        held = self._held.setdefault(owner, {})
        for seg in segments:
            held[seg] = None
        if not held:  # allocate_pages(owner, 0)
            del self._held[owner]
            return
        held_now = self._bytes[owner] = self._bytes.get(owner, 0) + nbytes
        if held_now > self._peaks.get(owner, 0):
            self._peaks[owner] = held_now
        self._used += nbytes
        self._segments += len(segments)
        self._allocations += 1
        if self._used > self._high_water:
            self._high_water = self._used

    def _fail(self, what: str, owner: Hashable, cause: OutOfMemoryError | None = None) -> NoReturn:
        """Raise the OutOfMemoryError for a refused request. Caller holds the lock."""
        self._failed += 1
        left = self.budget - self._used
        msg = (f"cannot allocate {what} for {owner!r}: {format_bytes(left)} of the "
               f"{format_bytes(self.budget)} managed budget left")
        if cause is not None:
            msg += (f", but the arena's largest free block is "
                    f"{format_bytes(self.allocator.largest_free_block())}")
        msg += f"; raise {BUDGET_KEY}"
        raise OutOfMemoryError(msg) from cause

    def _check_open(self, what: str, owner: Hashable) -> None:
        if self._closed:
            msg = f"cannot allocate {what} for {owner!r}: {self.name} is closed"
            raise ShmflowError(msg)

    # ---------------------------------------------------------------- release
    def release(self, segment: MemorySegment | Iterable[MemorySegment]) -> int:
        """Give back one segment (or each of an iterable of them); returns the bytes released.

        Ownership: the caller gives up the segment; every later access to it
        raises :class:`SegmentFreedError`. An iterable is released in order
        and stops at the first bad segment (those before it stay released). A segment with a pending IOManager
        request must not be released until its future completes.
        Process: the worker owning the arena. Thread-safe.

        Raises:
            InvalidHandleError: the segment was not allocated by this manager.
            DoubleFreeError: the segment was released already (or freed
                directly with ``seg.free()``, bypassing the manager).
        """
        segments = [segment] if isinstance(segment, MemorySegment) else list(segment)
        released = 0
        with self._lock:
            for seg in segments:
                released += self._release_one(seg)
        return released

    def _release_one(self, seg: MemorySegment) -> int:
        """Caller holds the lock."""
        if not isinstance(seg, MemorySegment):
            msg = f"expected a MemorySegment; got {type(seg).__name__}"
            raise TypeError(msg)
        held = self._held.get(seg.owner)
        if held is None or seg not in held:
            if seg in self._released:
                suffix = " (the manager was closed)" if self._closed else ""
                msg = (f"segment at offset {seg.offset} ({format_bytes(seg.size)}) of {seg.owner!r} "
                       f"was released twice{suffix}")
                raise DoubleFreeError(msg)
            msg = (f"segment at offset {seg.offset} ({format_bytes(seg.size)}) was not allocated by "
                   f"{self.name}; release it where it was allocated")
            raise InvalidHandleError(msg)
        self._forget(seg, held)
        if seg._freed:  # someone called seg.free() behind our back: the block is free already
            msg = (f"segment at offset {seg.offset} ({format_bytes(seg.size)}) of {seg.owner!r} was "
                   f"freed with seg.free(), bypassing {self.name}; release it with manager.release()")
            raise DoubleFreeError(msg)
        self.allocator.free(seg)
        return seg.size

    def _forget(self, seg: MemorySegment, held: dict[MemorySegment, None]) -> None:
        """Drop a segment from the books. Caller holds the lock. Pairs with _account()."""
        owner = seg.owner
        del held[seg]
        if not held:
            del self._held[owner]
        remaining = self._bytes[owner] - seg.size
        if remaining:
            self._bytes[owner] = remaining
        else:
            del self._bytes[owner]
        self._used -= seg.size
        self._segments -= 1
        self._releases += 1
        self._released.add(seg)

    def release_all(self, owner: Hashable, *, report: bool = True) -> int:
        """Take back everything ``owner`` still holds (call it when the owner's task ends).

        Returns the bytes released. With ``report`` (the default) memory still
        held is a leak of the task: a warning on the ``shmflow.memory`` logger
        names the owner, the segment count and the bytes, and a
        :class:`LeakReport` is recorded in :meth:`leak_reports`. Pass
        ``report=False`` for a deliberate bulk release.

        Ownership: every segment of ``owner`` is freed; the owner must hold no
        views of them and none may be pending in the IOManager.
        Process: the worker owning the arena. Thread-safe.
        """
        with self._lock:
            held = self._held.get(owner)
            if not held:
                return 0
            leak: LeakReport | None
            if report:
                leak = self._release_owner(owner, held, "release_all")
                nbytes = leak.nbytes
            else:
                leak, nbytes = None, self._bytes[owner]
                for seg in list(held):
                    self._release_silently(seg, held)
        if leak is not None:
            logger.warning("%s", leak)
        return nbytes

    def _release_owner(self, owner: Hashable, held: dict[MemorySegment, None], when: str) -> LeakReport:
        """Free all of ``owner``'s segments and record a leak report. Caller holds the lock."""
        leak = LeakReport(self.name, owner, len(held), self._bytes[owner], when)
        for seg in list(held):
            self._release_silently(seg, held)
        self._leaks.append(leak)
        return leak

    def _release_silently(self, seg: MemorySegment, held: dict[MemorySegment, None]) -> None:
        self._forget(seg, held)
        if not seg._freed:
            self.allocator.free(seg)

    def close(self) -> list[LeakReport]:
        """Release everything; returns (and records and logs) a leak report per owner still holding memory.

        Idempotent: a second call returns ``[]``. Later allocations raise.
        Ownership: every segment handed out is freed; none may still be
        pending in an IOManager (a read would land in freed memory).
        Process: the worker owning the arena. Thread-safe.
        """
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            leaks = [self._release_owner(owner, held, "close") for owner, held in list(self._held.items())]
        for leak in leaks:
            logger.warning("%s", leak)
        return leaks

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> MemoryManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        held = getattr(self, "_segments", 0)
        if held and not getattr(self, "_closed", True):
            msg = (f"{self.name} was garbage-collected holding {held} segments "
                   f"({format_bytes(self._used)}) that stay allocated; call close() or release_all()")
            warnings.warn(msg, ResourceWarning, stacklevel=2, source=self)

    # ------------------------------------------------------------- inspection
    def owners(self) -> dict[Hashable, int]:
        """Bytes held per owner (owners holding nothing are absent)."""
        with self._lock:
            return dict(self._bytes)

    def owner_figures(self, owner: Hashable) -> tuple[int, int]:
        """(bytes ``owner`` holds now, the most it held at once since :meth:`reset_peaks`)."""
        with self._lock:
            return self._bytes.get(owner, 0), self._peaks.get(owner, 0)

    def reset_peaks(self) -> None:
        """Forget every owner's peak (a new job starts: its operators' peaks are its own)."""
        with self._lock:
            self._peaks = dict(self._bytes)

    def segments(self, owner: Hashable) -> list[MemorySegment]:
        """The live segments of ``owner``, in allocation order."""
        with self._lock:
            return list(self._held.get(owner, ()))

    def available(self) -> int:
        """Bytes of the budget not held by any owner.

        An allocation of that much can still fail if the allocator is shared
        with other components or fragmented by mixed-size ``allocate`` calls.
        """
        with self._lock:
            return self.budget - self._used

    def available_pages(self) -> int:
        """How many more pages the budget admits."""
        return self.available() // self.page_size

    @property
    def used_bytes(self) -> int:
        return self._used

    def leak_reports(self) -> list[LeakReport]:
        """Every leak recorded so far (by ``release_all`` and ``close``), oldest first."""
        with self._lock:
            return list(self._leaks)

    def stats(self) -> MemoryManagerStats:
        """Budget, bytes used and available, per-owner bytes, counters and the high-water mark."""
        with self._lock:
            return MemoryManagerStats(
                name=self.name,
                budget=self.budget,
                page_size=self.page_size,
                used_bytes=self._used,
                available_bytes=self.budget - self._used,
                segments=self._segments,
                high_water_mark=self._high_water,
                allocations=self._allocations,
                failed_allocations=self._failed,
                releases=self._releases,
                leaks=len(self._leaks),
                closed=self._closed,
                bytes_by_owner=dict(self._bytes),
            )

    statistics = stats

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (f"<MemoryManager {self.name!r} {format_bytes(self._used)} of {format_bytes(self.budget)} "
                f"used by {len(self._held)} owners{state}>")
