"""Descriptor rings: how a local channel's buffers and credits cross processes without ZeroMQ.

Imports: runtime.memory, runtime.errors (and the compiled ``runtime.network._ring``).

On one host, a channel's (buffer index, bytes filled) descriptors go forward and
the indices of buffers the consumer is done with come back through one
single-producer single-consumer ring in the shared region, next to the
producer's buffers; the consumer grants credits by raising a cumulative counter
in the same ring. Head and tail counters each have one writer, so no lock is
shared between the processes. The layout, who writes which word, and why the
other process sees the writes in order on x86-64 and aarch64 are in
``_ring.c``, the compiled half (Python has no atomics and no fences).

ZeroMQ stays the doorbell: a side that finds nothing to do announces in the
ring that it parks (``park_consumer`` / ``park_producer``, which re-check the
ring after a full fence) and sleeps on its socket; the other side, after
publishing, learns from ``push`` / ``give_back`` that its peer was parked and
sends it one wake-up message. While both sides are busy no message is sent.

Ownership: the producer allocates a ring (:func:`create_ring`) from its
worker's arena, announces it in its hello (offset, capacity, generation) and
frees it when the channel closes (:func:`free_ring`), after marking it
closed. The consumer attaches (:func:`attach_ring`) and never frees it. Every
operation checks the block's generation first and raises ``RingGone`` once it
was freed: a consumer that still holds a closed channel's ring stops using it
then. (A consumer may still store its parked word into a ring whose producer
frees it at that instant; the block is not handed out again before the job
ends, so that store lands in memory nobody uses.)
"""

from __future__ import annotations

from runtime.errors import InvalidSizeError
from runtime.memory import BuddyAllocator, MemorySegment, SharedRegion

try:
    from runtime.network._ring import Ring, RingGone, ring_bytes
except ImportError:  # pragma: no cover - built by setup.py; without a C compiler local channels send bytes
    AVAILABLE = False
else:
    AVAILABLE = True

__all__ = ["AVAILABLE", "Ring", "RingGone", "attach_ring", "create_ring", "free_ring", "ring_capacity"]

#: The largest ring: a channel never has more buffers in flight than its producer's pool holds.
MAX_CAPACITY = 1 << 24


def ring_capacity(max_in_flight: int) -> int:
    """Slots per direction for a channel with at most ``max_in_flight`` buffers out: the next power of two.

    Every buffer in a ring is a distinct buffer of the producer's pool, so a
    ring sized to the pool's maximum can never overflow: the producer is
    stopped by its credits first.
    """
    if max_in_flight > MAX_CAPACITY:
        msg = (f"a channel's ring holds at most {MAX_CAPACITY} buffers; its pool may hold {max_in_flight}: "
               "lower network.buffers-per-channel / network.floating-buffers-per-gate")
        raise InvalidSizeError(msg)
    return max(2, 1 << (max_in_flight - 1).bit_length())


def create_ring(allocator: BuddyAllocator, capacity: int, *, owner: str) -> tuple[MemorySegment, Ring]:
    """A zeroed ring of ``capacity`` slots in a block of ``allocator``'s arena.

    Ownership: the caller (the producing channel) owns the block; close the
    ring and free the block with :func:`free_ring`.
    Process: the producing worker, which owns the allocator.
    """
    block = allocator.allocate(ring_bytes(capacity), owner=owner)
    region = block.region
    ring = Ring(region.buf, region.generation_table, region.granule, block.offset, capacity, block.generation,
                True)
    return block, ring


def free_ring(ring: Ring, block: MemorySegment, allocator: BuddyAllocator) -> None:
    """Mark the ring closed, stop using it and free its block (which bumps its generation: RingGone).

    Returns nothing; a consumer parked on the ring is not woken here: it wakes
    within its keep-alive interval and finds the generation changed.
    """
    try:
        ring.mark_closed()
    except RingGone:
        pass
    ring.close()
    allocator.free(block)


def attach_ring(region: SharedRegion, offset: int, capacity: int, generation: int, *, num_buffers: int,
                buffer_size: int) -> Ring:
    """The consumer's handle on a ring a producer announced. Descriptors it pops are checked against
    ``num_buffers`` and ``buffer_size`` (the producer's pool).

    Ownership: the producer owns the ring's block; the caller closes the handle (``close()``) before
    it closes ``region``.
    Raises:
        ValueError: no ring of that capacity at ``offset`` (a malformed hello).
        RingGone: the block was freed already.
    """
    return Ring(region.buf, region.generation_table, region.granule, offset, capacity, generation, False,
                num_buffers, buffer_size)
