"""Network buffer pools: a NetworkBufferPool per worker, a LocalBufferPool per gate or partition.

Imports: runtime.memory, runtime.errors (stdlib otherwise); not runtime.config: callers pass numbers,
messages name the keys. Modelled on Flink's NetworkBufferPool, LocalBufferPool and NetworkBuffer:

- NetworkBufferPool carves ONE block into ``num_buffers`` buffers of ``buffer_size`` bytes, once;
  buffer ``i`` lies at ``block.offset + i * buffer_size``.
- LocalBufferPool (``create_buffer_pool(min, max, name=)``): ``min`` buffers guaranteed (all mins
  must fit, else InsufficientNetworkBuffersError at deployment), up to ``max`` from the excess.
  ``request_buffer`` blocks while the share is exhausted: backpressure starts here.
- NetworkBuffer: refcounted, recycled to its local pool at 0. Another process gets a
  BufferDescriptor, reads through ``buffer_view(region, desc)`` (read-only) and sends it back;
  the producer's receiving thread calls ``local_pool.recycle_descriptor(desc)``.

Redistribution: a local pool takes from the network pool's free list while it holds fewer than its
min, or fewer than its max while more buffers are free than the other pools' untaken guarantees
(first come, first served). A recycled buffer stays with its pool while the pool holds fewer than
its min; otherwise it returns to the network pool and every waiting pool is woken.
Locking: one Lock per NetworkBufferPool, shared by its local pools (each waits on its own
Condition over it). Request and recycle are O(1) (deques of free indices); listeners run unlocked.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, NamedTuple, NoReturn, TypeVar

from runtime.errors import (
    ClosedResourceError,
    DoubleFreeError,
    InsufficientNetworkBuffersError,
    InvalidHandleError,
    InvalidSizeError,
    OutOfMemoryError,
    RegionError,
    SegmentFreedError,
    ShmflowError,
)
from runtime.memory import BuddyAllocator, MemorySegment, SharedRegion, format_bytes
from runtime.memory.snapshot import Snapshot

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import numpy.typing as npt

__all__ = ["BufferDescriptor", "BufferDescriptorLike", "BufferListener", "ClosedResourceError", "LocalBufferPool",
           "LocalBufferPoolStats", "NetworkBuffer", "NetworkBufferPool", "NetworkBufferPoolStats", "buffer_view",
           "release_buffers"]

_REMEDY = ("raise memory.network.fraction, memory.network.min or memory.region.size, "
           "or lower network.buffers-per-channel / network.floating-buffers-per-gate")


class BufferDescriptor(NamedTuple):
    """What crosses processes for a network buffer (msgpack packs it as a 6-element array).
    ``generation`` is that of the pool's block at ``block_offset``; freeing the block makes it stale."""

    pool_id: int       # LocalBufferPool.pool_id, unique within its NetworkBufferPool
    index: int  # type: ignore[assignment]  # shadows tuple.index(); the field name is public API
    size: int          # bytes filled
    offset: int        # usable-area offset of the buffer's first byte
    generation: int
    block_offset: int


#: A BufferDescriptor, or the 6 integers it became on the wire (msgpack turns tuples into lists).
BufferDescriptorLike = BufferDescriptor | tuple[int, int, int, int, int, int] | list[int]

#: ``LocalBufferPool.add_listener``'s callback: called with the pool, its result ignored.
BufferListener = Callable[["LocalBufferPool"], object]
#: Listeners to call once the lock is released: (listener, the pool to pass it).
_Todo = tuple[tuple[BufferListener, "LocalBufferPool"], ...]
_T = TypeVar("_T")


@dataclass(frozen=True)
class LocalBufferPoolStats(Snapshot):
    """A snapshot of a LocalBufferPool. ``blocked_seconds`` is the backpressure metric."""

    name: str
    pool_id: int
    min: int
    max: int
    held: int              # buffers this pool holds: in use + available locally
    in_use: int
    available: int         # buffers a request could get now without blocking
    peak_in_use: int
    requests: int          # buffers handed out (request_buffer and try_request_buffer)
    blocked_requests: int  # request_buffer calls that had to wait
    blocked_seconds: float  # total time request_buffer spent waiting
    waiters: int           # threads blocked in request_buffer / wait_available right now
    destroyed: bool


@dataclass(frozen=True)
class NetworkBufferPoolStats(Snapshot):
    """A snapshot of a NetworkBufferPool."""

    num_buffers: int
    buffer_size: int
    block_bytes: int
    free: int               # buffers no local pool holds
    required: int           # sum of the mins of live local pools
    reserved: int           # guarantees not yet taken: sum of max(0, min - held)
    in_use: int
    local_pools: int
    in_use_by_pool: dict[str, int] = field(default_factory=dict)


def _retire(buffer: NetworkBuffer) -> None:
    """Mark a buffer's view freed: every later access raises SegmentFreedError."""
    buffer._retired = True
    if buffer._segment is not None:
        buffer._segment._freed = True


def _parse(descriptor: BufferDescriptorLike) -> BufferDescriptor:
    try:
        return BufferDescriptor(*(int(x) for x in descriptor))
    except (TypeError, ValueError):
        msg = ("a buffer descriptor is (pool_id, index, size, offset, generation, block_offset); "
               f"got {descriptor!r}")
        raise InvalidHandleError(msg) from None


def _count(value: object, what: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        msg = f"{what} must be an int; got {type(value).__name__}"
        raise TypeError(msg)
    if value < low:
        msg = f"{what} must be >= {low}; got {value}"
        raise InvalidSizeError(msg)
    return value


class _BufferView(MemorySegment):
    """A read-only view of a received buffer; every access also checks the pool block's generation."""

    __slots__ = ("_block_offset",)

    def __init__(self, region: SharedRegion, offset: int, size: int, generation: int,
                 block_offset: int) -> None:
        super().__init__(region, offset, size, generation, readonly=True)
        self._block_offset = block_offset

    def _check(self, pos: int, nbytes: int, what: str) -> int:
        self.freed  # noqa: B018 - sets _freed once the block's generation moved on
        return MemorySegment._check(self, pos, nbytes, what)

    @property
    def freed(self) -> bool:
        if not self._freed and not self.region.closed:
            self._freed = self.region.generation(self._block_offset) != self.generation
        return self._freed


def buffer_view(region: SharedRegion, descriptor: BufferDescriptorLike) -> MemorySegment:
    """A read-only view of the ``size`` filled bytes of the buffer a descriptor names.

    Ownership: the view borrows the bytes; the producer's pool owns them. Stop using the view
    before sending the descriptor back (the producer may then refill the buffer). Once the
    producer's network pool frees its block, every access raises SegmentFreedError.
    Process: any process that attached ``region`` (normally the consumer).

    Raises InvalidHandleError (malformed, outside the region, or stale), RegionError (closed).
    """
    pool_id, index, size, offset, generation, block_offset = _parse(descriptor)
    if region.closed:
        msg = f"region {region.name!r} is closed"
        raise RegionError(msg)
    if not 0 <= block_offset <= offset or size < 0 or offset + size > region.size \
            or block_offset % region.granule:
        msg = (f"buffer descriptor (offset={offset}, size={size}, block_offset={block_offset}) must lie "
               f"in region {region.name!r} of {region.size} bytes; got one outside it")
        raise InvalidHandleError(msg)
    current = region.generation(block_offset)
    if current != generation:
        msg = (f"stale buffer descriptor (pool {pool_id}, buffer {index}): generation {generation}, "
               f"block at offset {block_offset} has {current}; its network buffer pool was closed")
        raise InvalidHandleError(msg)
    return _BufferView(region, offset, size, generation, block_offset)


class NetworkBuffer:
    """A lent network buffer: ``segment`` (a view of ``capacity`` bytes), ``size`` filled, a refcount.

    Ownership: ``request`` gives the caller refcount 1. ``retain()`` adds a reference,
    ``release()`` drops one; at 0 the buffer is recycled to its pool and ``segment`` raises
    SegmentFreedError from then on. ``ResultPartition.send_buffer()`` takes over the caller's reference.
    Process: the process of its pool; other processes see it through ``descriptor()``.
    Thread-safe (the refcount changes under the pool's lock).
    """

    __slots__ = ("index", "capacity", "_size", "_refcount", "_pool", "_segment", "_retired")

    def __init__(self, pool: LocalBufferPool, index: int, segment: MemorySegment | None = None) -> None:
        self.index = index
        self._segment = segment  # made on first use of ``segment``
        self.capacity = pool._buffer_size if segment is None else segment.size
        self._size = 0
        self._refcount = 1
        self._pool = pool
        self._retired = False

    @property
    def segment(self) -> MemorySegment:
        """A bounds-checked view of the buffer's ``capacity`` bytes; freed once the buffer is recycled."""
        seg = self._segment
        if seg is None:
            net = self._pool._network
            seg = MemorySegment(net.region, net.block_offset + self.index * net.buffer_size, net.buffer_size,
                                net.generation, owner=self._pool.name)
            seg._freed = self._retired
            self._segment = seg
        return seg

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """A writable uint8 numpy view of the buffer's ``capacity`` bytes (the fast path: no new view object
        per request; the network pool carves one per buffer index, once).

        Ownership: as for arrays from ``segment.as_array``: not checked after the fact, so stop using it
        before the buffer's last reference is released. Raises SegmentFreedError if it already was.
        """
        if self._retired:
            msg = (f"array of network buffer {self.index} of {self._pool.name!r}, which was recycled; "
                   "request a new buffer")
            raise SegmentFreedError(msg)
        net = self._pool._network
        rows = net._row_views
        return (net._rows() if rows is None else rows)[self.index]

    @property
    def refcount(self) -> int:
        return self._refcount

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, nbytes: int) -> None:
        if not 0 <= nbytes <= self.capacity:
            msg = f"buffer size must be in [0, {self.capacity}]; got {nbytes}"
            raise InvalidSizeError(msg)
        self._size = nbytes

    def retain(self) -> NetworkBuffer:
        """Add a reference (returns self). Raises DoubleFreeError if the buffer was recycled.

        Ownership: the caller owns one more reference and must ``release()`` it. Process: the pool's.
        """
        with self._pool._lock:
            if self._refcount <= 0:
                msg = (f"retain of network buffer {self.index} of {self._pool.name!r}, which was "
                       "recycled; request a new buffer")
                raise DoubleFreeError(msg)
            self._refcount += 1
        return self

    def release(self) -> None:
        """Drop a reference; at 0 the buffer is recycled to its pool (and listeners run).

        Ownership: the caller gives up its reference; the buffer must not be used after its last.
        Process: the pool's process, any thread. Raises DoubleFreeError if already at 0.
        """
        self._pool._release(self)

    def descriptor(self) -> BufferDescriptor:
        """The buffer's portable name for another process (see :func:`buffer_view`).

        Ownership: unchanged; the reference travels with the descriptor only when a channel
        sends it, and comes back through ``LocalBufferPool.recycle_descriptor``.
        Process: the pool's process.
        """
        if self._refcount <= 0:
            msg = f"descriptor of network buffer {self.index} of {self._pool.name!r}, which was recycled"
            raise DoubleFreeError(msg)
        net = self._pool._network
        return BufferDescriptor(self._pool.pool_id, self.index, self._size,
                                net.block_offset + self.index * net.buffer_size,
                                net.generation, net.block_offset)

    def __repr__(self) -> str:
        return (f"<NetworkBuffer {self.index} of {self._pool.name!r} {self._size}/{self.capacity} bytes "
                f"refcount={self._refcount}>")


class LocalBufferPool:
    """A task's share of a NetworkBufferPool: ``min`` guaranteed buffers, up to ``max``.

    Create it with ``NetworkBufferPool.create_buffer_pool``.
    Process: the worker owning the network pool. Thread-safe: a channel's receiving thread
    recycles while the task thread requests.
    """

    def __init__(self, network: NetworkBufferPool, pool_id: int, min_buffers: int, max_buffers: int,
                 name: str) -> None:
        self._network = network
        self._lock = network._lock
        self._cond = threading.Condition(network._lock)
        self.pool_id = pool_id
        self.min = min_buffers
        self.max = max_buffers
        self.name = name
        self._buffer_size = network.buffer_size
        # Guarded by self._lock (the network pool's):
        self._available: deque[int] = deque()  # idle indices held here; only while held <= min
        self._out: dict[int, NetworkBuffer] = {}  # index -> the buffer object lent for it
        self._listeners: list[BufferListener] = []
        self._destroyed = False
        self._waiters = self._requests = self._blocked_requests = self._peak = 0
        self._blocked_seconds = 0.0

    # ------------------------------------------------------------- request
    def request_buffer(self, *, timeout: float | None = None) -> NetworkBuffer:
        """Take a buffer, blocking until one is recycled if the share is exhausted (backpressure).

        Ownership: the caller owns the result (refcount 1): ``release()`` it exactly once, or
        pass it to ``ResultPartition.send_buffer()``, which takes ownership.
        Process: the pool's worker, any thread.

        Raises:
            TimeoutError: none came back within ``timeout`` seconds; names the pool, its shares,
                the in-use count and the key network.buffers-per-channel.
            ClosedResourceError: the pool was destroyed (also wakes blocked requesters).
        """
        with self._lock:
            index = self._take_locked()
            if index is None:
                self._blocked_requests += 1
                index = self._wait_locked(timeout, self._take_locked, "request_buffer", blocked=True)
            return self._lend_locked(index)

    def try_request_buffer(self) -> NetworkBuffer | None:
        """Take a buffer if one is available now, else return None.

        Ownership: as :meth:`request_buffer`. Process: as :meth:`request_buffer`.
        Raises ClosedResourceError if the pool was destroyed.
        """
        with self._lock:
            index = self._take_locked()
            return None if index is None else self._lend_locked(index)

    def try_request_buffers(self, n: int) -> list[NetworkBuffer]:
        """Up to ``n`` buffers available now (possibly none), under one acquisition of the lock.

        The batch counterpart of :meth:`try_request_buffer` for producers that fill many buffers
        in a row: the indices come off the free lists in bulk and the buffers are made in one pass.
        Ownership: the caller owns each (refcount 1), as for :meth:`request_buffer`.
        Process: as :meth:`request_buffer`. Raises ClosedResourceError if the pool was destroyed.
        """
        if n <= 0:
            return []
        with self._lock:
            indices = self._take_many_locked(n)
            return self._lend_many_locked(indices) if indices else []

    def wait_available(self, *, timeout: float | None = None) -> None:
        """Block until a request would not block (Flink's BufferListener, synchronously).

        Process: the pool's worker, any thread. Raises TimeoutError, ClosedResourceError.
        """
        def ready() -> bool | None:
            if self._destroyed:
                self._raise_destroyed()
            return True if self._available_locked() else None

        with self._lock:
            if not ready():
                self._wait_locked(timeout, ready, "wait_available", blocked=False)

    def _take_locked(self) -> int | None:
        """One index from here or from the network pool, or None. Caller holds the lock."""
        got = self._take_many_locked(1)
        return got[0] if got else None

    def _take_many_locked(self, n: int) -> list[int]:
        """Up to ``n`` indices (n >= 1): the local ones first, then the network pool's, as ``n`` single
        takes would get them. Caller holds the lock. Raises ClosedResourceError if destroyed.

        From the network pool a pool first takes what it lacks to its min (each of those is one
        guarantee fewer reserved), then excess up to its max while more buffers are free than are
        reserved for the other pools' mins. If you change this, update ``_place_locked`` and
        ``_available_locked``.
        """
        if self._destroyed:
            self._raise_destroyed()
        avail = self._available
        if len(avail) >= n:  # the steady state of a pool that holds its min
            popleft = avail.popleft
            return [popleft() for _ in range(n)]
        taken = list(avail)
        avail.clear()
        net = self._network
        free = net._free
        held = len(self._out) + len(taken)  # nothing is left locally, so held == in use + taken
        want = n - len(taken)
        own = min(want, self.min - held, len(free))
        if own > 0:
            net._reserved -= own
            held += own
            want -= own
            taken += [free.popleft() for _ in range(own)]
        extra = min(want, self.max - held, len(free) - net._reserved)
        if extra > 0:
            taken += [free.popleft() for _ in range(extra)]
        return taken

    def _lend_locked(self, index: int) -> NetworkBuffer:
        return self._lend_many_locked([index])[0]

    def _lend_many_locked(self, indices: list[int]) -> list[NetworkBuffer]:
        """A fresh NetworkBuffer (refcount 1) per index, recorded as lent. Caller holds the lock."""
        bufs = [NetworkBuffer(self, i) for i in indices]
        out = self._out
        out.update(zip(indices, bufs))
        self._requests += len(bufs)
        if len(out) > self._peak:
            self._peak = len(out)
        return bufs

    def _wait_locked(self, timeout: float | None, attempt: Callable[[], _T | None], what: str, *,
                     blocked: bool) -> _T:
        net = self._network
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        self._waiters += 1
        net._waiting.add(self)
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    msg = (f"{what} on local buffer pool {self.name!r} timed out after {timeout} s: "
                           f"{len(self._out)} buffers in use (min {self.min}, max {self.max}), "
                           f"{len(net._free)} of {net.num_buffers} free in the network pool; the "
                           "consumers recycle too slowly, or raise network.buffers-per-channel")
                    raise TimeoutError(msg)
                self._cond.wait(remaining)
                result = attempt()
                if result is not None:
                    return result
        finally:
            self._waiters -= 1
            if not self._waiters:
                net._waiting.discard(self)
            if blocked:
                self._blocked_seconds += time.monotonic() - start

    def _raise_destroyed(self) -> NoReturn:
        msg = f"local buffer pool {self.name!r} was destroyed; no buffers can be requested from it"
        raise ClosedResourceError(msg)

    # ------------------------------------------------------------- recycle
    def recycle(self, buffer: NetworkBuffer) -> None:
        """Return ``buffer`` to this pool whatever its refcount (what ``release`` does at 0).

        Ownership: the pool takes the buffer back; every reference to it is void.
        Process: the pool's worker, any thread.

        Raises DoubleFreeError (recycled already), InvalidHandleError (another pool's buffer).
        """
        if buffer._pool is not self:
            msg = f"network buffer {buffer.index} belongs to {buffer._pool.name!r}, not to {self.name!r}"
            raise InvalidHandleError(msg)
        with self._lock:
            if buffer._refcount <= 0:
                self._raise_double_free(buffer.index)
            buffer._refcount = 0
            todo = self._recycle_locked(buffer)
        _call_listeners(todo)

    def recycle_index(self, index: int) -> None:
        """Release the reference that travelled to another process with buffer ``index``.

        At refcount 0 (the usual case) the buffer is recycled.
        Ownership: the consumer gave the buffer back; it must no longer read it.
        Process: the pool's worker, typically a channel's receiving thread.

        Raises DoubleFreeError (not lent by this pool: recycled already), InvalidHandleError
        (out of range).
        """
        with self._lock:
            buf = self._out.get(index)
            if buf is None:
                if not 0 <= index < self._network.num_buffers:
                    msg = f"buffer index must be in [0, {self._network.num_buffers}); got {index}"
                    raise InvalidHandleError(msg)
                self._raise_double_free(index)
            todo = self._release_locked(buf)
        _call_listeners(todo)

    def recycle_descriptor(self, descriptor: BufferDescriptorLike) -> None:
        """As :meth:`recycle_index`, for a descriptor sent back by another process.

        Ownership and Process: as :meth:`recycle_index`.
        Raises InvalidHandleError if the descriptor names no buffer of this pool (wrong pool id,
        offset or generation), DoubleFreeError if its buffer was recycled already.
        """
        pool_id, index, _size, offset, generation, block_offset = _parse(descriptor)
        net = self._network
        if (pool_id, generation, block_offset) != (self.pool_id, net.generation, net.block_offset) \
                or offset != net.block_offset + index * net.buffer_size:
            msg = (f"buffer descriptor {tuple(descriptor)!r} does not name a buffer of local pool "
                   f"{self.name!r} (pool id {self.pool_id}, block offset {net.block_offset}, "
                   f"generation {net.generation})")
            raise InvalidHandleError(msg)
        self.recycle_index(index)

    def _release(self, buffer: NetworkBuffer) -> None:
        with self._lock:
            todo = self._release_locked(buffer)
        _call_listeners(todo)

    def _release_locked(self, buffer: NetworkBuffer) -> _Todo:
        if buffer._refcount <= 0:
            self._raise_double_free(buffer.index)
        buffer._refcount -= 1
        return () if buffer._refcount else self._recycle_locked(buffer)

    def _release_run_locked(self, buffers: list[NetworkBuffer], start: int,
                            todo: list[tuple[BufferListener, LocalBufferPool]]) -> int:
        """Drop one reference of each buffer from ``buffers[start]`` on while they are this pool's, and
        recycle those that reach 0 in one batch. Returns where the run ended. Caller holds the lock.

        Listeners to call go to ``todo``, also when a DoubleFreeError ends the run (the buffers before
        the doubly released one are released and recycled).
        """
        out = self._out
        indices: list[int] = []  # of the buffers recycled
        i = start
        try:
            for buf in islice(buffers, start, None):
                if buf._pool is not self:
                    break
                refs = buf._refcount
                if refs == 1:  # its last reference: recycle it (as _recycle_locked does)
                    buf._refcount = 0
                    index = buf.index
                    del out[index]
                    indices.append(index)
                    _retire(buf)
                elif refs > 1:
                    buf._refcount = refs - 1
                else:
                    self._raise_double_free(buf.index)
                i += 1
        finally:
            if indices:
                todo.extend(self._place_locked(indices))
        return i

    def _raise_double_free(self, index: int) -> NoReturn:
        msg = (f"network buffer {index} of local pool {self.name!r} was released after it was "
               "recycled; release each reference exactly once")
        raise DoubleFreeError(msg)

    def _recycle_locked(self, buffer: NetworkBuffer) -> _Todo:
        """Take ``buffer`` back (lent by this pool, refcount already 0); returns the listeners to call.
        Caller holds the lock."""
        index = buffer.index
        del self._out[index]
        _retire(buffer)
        return self._place_locked([index])

    def _place_locked(self, indices: list[int]) -> _Todo:
        """Put the indices of buffers just taken back (no longer lent) where they belong; returns the
        listeners to call. Caller holds the lock.

        Where they go is what recycling them one by one would do: while the pool holds more than its
        min they return to the network pool (shared first come first served, and every waiting pool
        is woken); the rest stay here, idle. A destroyed pool keeps none (Flink's lazy destroy).
        Each listener is called once per batch. If you change where a buffer goes, update
        ``_take_many_locked`` and ``_available_locked``.
        """
        out = self._out
        net = self._network
        if net._closed:
            return ()
        k = len(indices)
        keep = 0 if self._destroyed else max(0, min(k, self.min - len(out) - len(self._available)))
        if keep:
            self._available.extend(indices[k - keep:])
            if self._waiters:
                self._cond.notify_all()
        if keep < k:
            if self._destroyed and not out:
                net._draining.discard(self)
            net._free.extend(indices[:k - keep])
            net._wake_waiting_locked()
            if not net._listening:
                return ()
            # Every pool with room may take an excess buffer (this one too, if it listens: not destroyed).
            return tuple((fn, pool) for pool in net._listening
                         if pool is self or len(pool._out) + len(pool._available) < pool.max
                         for fn in pool._listeners)
        return tuple((fn, self) for fn in self._listeners) if self._listeners else ()

    def add_listener(self, fn: BufferListener) -> None:
        """Call ``fn(pool)`` after each recycle that may let this pool hand out a buffer (once per
        batch that ``release_buffers`` recycles).

        Listeners run outside the lock, in the recycling thread; they must not block.
        Process: the pool's worker.
        """
        with self._lock:
            self._listeners.append(fn)
            self._network._listening.add(self)

    def remove_listener(self, fn: BufferListener) -> None:
        with self._lock:
            self._listeners.remove(fn)
            if not self._listeners:
                self._network._listening.discard(self)

    # ------------------------------------------------------------- state
    def available(self) -> int:
        """How many buffers requests could get now without blocking."""
        with self._lock:
            return self._available_locked()

    def _available_locked(self) -> int:
        if self._destroyed:
            return 0
        net = self._network
        held = len(self._out) + len(self._available)
        free = len(net._free)
        own = min(max(0, self.min - held), free)
        extra = max(0, min(self.max - held - own, free - own - (net._reserved - max(0, self.min - held))))
        return len(self._available) + own + extra

    def in_use(self) -> int:
        return len(self._out)

    @property
    def network_pool(self) -> NetworkBufferPool:
        return self._network

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def stats(self) -> LocalBufferPoolStats:
        with self._lock:
            return LocalBufferPoolStats(
                name=self.name, pool_id=self.pool_id, min=self.min, max=self.max,
                held=len(self._out) + len(self._available), in_use=len(self._out),
                available=self._available_locked(), peak_in_use=self._peak, requests=self._requests,
                blocked_requests=self._blocked_requests, blocked_seconds=self._blocked_seconds,
                waiters=self._waiters, destroyed=self._destroyed)

    statistics = stats

    def destroy(self) -> None:
        """Give this pool's buffers back to the network pool and wake blocked requesters
        (they raise ClosedResourceError). Idempotent.

        Ownership: buffers still lent stay valid; they go to the network pool when released.
        Process: the pool's worker.
        """
        with self._lock:
            self._destroy_locked()

    close = destroy

    def _destroy_locked(self) -> None:
        if self._destroyed:
            return
        net = self._network
        self._destroyed = True
        net._reserved -= max(0, self.min - len(self._out) - len(self._available))
        net._free.extend(self._available)
        self._available.clear()
        del net._pools[self.pool_id]
        net._listening.discard(self)
        if self._out:
            net._draining.add(self)
        self._cond.notify_all()
        net._wake_waiting_locked()

    def __repr__(self) -> str:
        state = " destroyed" if self._destroyed else ""
        return (f"<LocalBufferPool {self.name!r} id={self.pool_id} min={self.min} max={self.max} "
                f"in_use={len(self._out)}{state}>")


def _call_listeners(todo: _Todo) -> None:
    for fn, pool in todo:
        fn(pool)


def release_buffers(buffers: list[NetworkBuffer]) -> None:
    """``release()`` each buffer (one reference each), taking each pool's lock once per run of its
    buffers and recycling the run's buffers that reach refcount 0 in one batch.

    Ownership and errors: as ``NetworkBuffer.release`` for each, in order (a DoubleFreeError, which
    names the buffer, stops the run; the buffers before it stay released). Listeners run after,
    unlocked, once per pool and run.
    """
    todo: list[tuple[BufferListener, LocalBufferPool]] = []
    i, n = 0, len(buffers)
    try:
        while i < n:
            pool = buffers[i]._pool
            with pool._lock:
                i = pool._release_run_locked(buffers, i, todo)
    finally:
        _call_listeners(tuple(todo))


class NetworkBufferPool:
    """A fixed count of fixed-size buffers carved once from one block; lent out via LocalBufferPools.

    Ownership: the pool owns its block (frees it on ``close()``) when it allocated it itself;
    a block passed to :meth:`from_segment` stays its granter's.
    Process: the owning worker (the allocator is not thread-safe: construct and close in the
    thread that owns the allocator). Local pools are thread-safe.
    """

    def __init__(self, allocator: BuddyAllocator, num_buffers: int, buffer_size: int = 32768, *,
                 owner: Hashable = "network") -> None:
        _count(num_buffers, "num_buffers", 1)
        _count(buffer_size, "buffer_size", 1)
        if buffer_size & (buffer_size - 1) or buffer_size < allocator.min_block:
            msg = (f"network buffer size must be a power of two >= the allocator's min_block "
                   f"({allocator.min_block}); got {buffer_size}; change memory.segment.size")
            raise InvalidSizeError(msg)
        nbytes = num_buffers * buffer_size
        try:
            block = allocator.allocate(nbytes, owner=owner)
        except OutOfMemoryError as exc:
            msg = (f"cannot carve {num_buffers} network buffers of {format_bytes(buffer_size)} "
                   f"({format_bytes(nbytes)}) for {owner!r}: largest free block "
                   f"{format_bytes(allocator.largest_free_block())}, {format_bytes(allocator.free_bytes)} "
                   f"of {format_bytes(allocator.total_bytes)} free; raise memory.region.size, or lower "
                   "memory.network.fraction / memory.network.max")
            raise OutOfMemoryError(msg) from exc
        self._setup(block, num_buffers, buffer_size, owner, owns_block=True)
        self.allocator: BuddyAllocator | None = allocator

    @classmethod
    def from_segment(cls, segment: MemorySegment, buffer_size: int = 32768, *,
                     num_buffers: int | None = None, owner: Hashable = "network") -> NetworkBufferPool:
        """Carve an already-granted block (``num_buffers`` defaults to as many as fit).

        Ownership: the block stays its granter's; ``close()`` does not free it, and must come
        before the granter frees or reclaims it.
        Process: the worker the block was granted to.
        """
        _count(buffer_size, "buffer_size", 1)
        segment.handle()  # raises SegmentFreedError on a freed segment
        if segment.readonly:
            msg = f"a network buffer pool needs a writable segment; got a read-only one at {segment.offset}"
            raise InvalidHandleError(msg)
        granule = segment.region.granule
        if buffer_size & (buffer_size - 1) or buffer_size < granule or buffer_size > segment.size:
            msg = (f"network buffer size must be a power of two in [{granule}, {segment.size}] for this "
                   f"segment; got {buffer_size}; change memory.segment.size")
            raise InvalidSizeError(msg)
        fits = segment.size // buffer_size
        n = fits if num_buffers is None else _count(num_buffers, "num_buffers", 1)
        if n > fits:
            msg = (f"num_buffers must be <= {fits} for a segment of {format_bytes(segment.size)} and "
                   f"buffers of {format_bytes(buffer_size)}; got {n}")
            raise InsufficientNetworkBuffersError(msg)
        self = cls.__new__(cls)
        self._setup(segment, n, buffer_size, owner, owns_block=False)
        return self

    def _setup(self, block: MemorySegment, num_buffers: int, buffer_size: int, owner: Hashable, *,
               owns_block: bool) -> None:
        self.region = block.region
        # The arena's allocator (None for a granted block): result partitions carve their channels' rings
        # from it (runtime.network.ring). Owner: the worker that owns the arena.
        self.allocator = None
        self.num_buffers = num_buffers
        self.buffer_size = buffer_size
        self.owner = owner
        self.block_offset = block.offset
        self.generation = block.generation
        self._block = block
        self._owns_block = owns_block
        self._lock = threading.Lock()
        # Guarded by self._lock:
        self._free: deque[int] = deque(range(num_buffers))  # indices no local pool holds
        self._reserved = 0  # guarantees not yet taken: sum over live pools of max(0, min - held)
        self._pools: dict[int, LocalBufferPool] = {}
        self._draining: set[LocalBufferPool] = set()  # destroyed, buffers still lent
        self._waiting: set[LocalBufferPool] = set()  # pools with threads blocked on their condition
        self._listening: set[LocalBufferPool] = set()  # pools with listeners
        self._next_id = 0
        self._closed = False
        self._row_views: list[npt.NDArray[np.uint8]] | None = None  # per-index arrays for NetworkBuffer.array

    def _rows(self) -> list[npt.NDArray[np.uint8]]:
        rows = self._row_views
        if rows is None:
            n, size = self.num_buffers, self.buffer_size
            start = self.block_offset
            rows = self._row_views = list(self.region.array[start:start + n * size].reshape(n, size))
        return rows

    def span(self, index: int, nbytes: int) -> npt.NDArray[np.uint8]:
        """A uint8 view of ``nbytes`` bytes from the start of buffer ``index`` on, across the buffers after
        it (the pool's buffers lie back to back in its block).

        Ownership: the caller must hold every buffer the span covers for as long as the view is used
        (a tcp channel hands it to zmq, which sends it without a copy). Raises InvalidSizeError if the
        span leaves the block.
        """
        size = self.buffer_size
        if not 0 <= index < self.num_buffers or not 0 <= nbytes <= (self.num_buffers - index) * size:
            msg = (f"span of {nbytes} bytes from buffer {index} leaves network buffer pool {self.owner!r} "
                   f"({self.num_buffers} x {size} bytes)")
            raise InvalidSizeError(msg)
        start = self.block_offset + index * size
        return self.region.array[start:start + nbytes]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def segment(self) -> MemorySegment:
        """The carved block: region, offset and generation for a receiver's handshake."""
        return self._block

    def create_buffer_pool(self, min_buffers: int, max_buffers: int, *, name: str) -> LocalBufferPool:
        """A local pool guaranteed ``min_buffers`` and allowed up to ``max_buffers``.

        Ownership: the caller owns the local pool and destroys it (``destroy_buffer_pool`` or
        ``pool.destroy()``) when its task ends.
        Process: the owning worker.

        Raises:
            InsufficientNetworkBuffersError: the mins of all pools would exceed ``num_buffers``
                (Flink's "Insufficient number of network buffers"); names required, available
                and the keys to change.
            ClosedResourceError: this network pool was closed.
        """
        _count(min_buffers, "min_buffers", 0)
        _count(max_buffers, "max_buffers", max(1, min_buffers))
        with self._lock:
            if self._closed:
                msg = f"network buffer pool {self.owner!r} is closed; cannot create local pool {name!r}"
                raise ClosedResourceError(msg)
            unreserved = self.num_buffers - sum(p.min for p in self._pools.values())
            if min_buffers > unreserved:
                msg = (f"insufficient network buffers for {name!r}: required {min_buffers}, available "
                       f"{unreserved} of {self.num_buffers} (buffer size {format_bytes(self.buffer_size)}); "
                       f"{_REMEDY}")
                raise InsufficientNetworkBuffersError(msg)
            pool = LocalBufferPool(self, self._next_id, min_buffers, max_buffers, name)
            self._next_id += 1
            self._pools[pool.pool_id] = pool
            self._reserved += min_buffers
            return pool

    def destroy_buffer_pool(self, pool: LocalBufferPool) -> None:
        """Destroy a local pool of this network pool (see ``LocalBufferPool.destroy``)."""
        if pool._network is not self:
            msg = f"local buffer pool {pool.name!r} belongs to another network buffer pool"
            raise InvalidHandleError(msg)
        pool.destroy()

    def _wake_waiting_locked(self) -> None:
        for pool in self._waiting:
            pool._cond.notify_all()

    def stats(self) -> NetworkBufferPoolStats:
        with self._lock:
            pools = [*self._pools.values(), *self._draining]
            return NetworkBufferPoolStats(
                num_buffers=self.num_buffers, buffer_size=self.buffer_size, block_bytes=self._block.size,
                free=len(self._free), required=sum(p.min for p in self._pools.values()),
                reserved=self._reserved, in_use=sum(len(p._out) for p in pools),
                local_pools=len(self._pools),
                in_use_by_pool={p.name: len(p._out) for p in pools if p._out})

    statistics = stats

    def close(self, *, check: bool = True) -> None:
        """Destroy every local pool, void every lent buffer and free the block (if owned). Idempotent.

        Ownership: buffers still lent become unusable (their segments raise SegmentFreedError;
        a late ``release`` is ignored). Descriptors become stale once the block is freed.
        Process: the owning worker, in the allocator's thread.

        Raises:
            ShmflowError: with ``check``, after cleaning up, if buffers were still lent: how many
                and to which local pools (a leak).
        """
        with self._lock:
            if self._closed:
                return
            for pool in list(self._pools.values()):
                pool._destroy_locked()
            leaks = {p.name: len(p._out) for p in self._draining if p._out}
            for pool in self._draining:
                for buf in pool._out.values():
                    _retire(buf)
            self._draining.clear()
            self._closed = True
        if self._owns_block:
            self._block.free()
        if leaks and check:
            lent = ", ".join(f"{n} by {name!r}" for name, n in sorted(leaks.items()))
            msg = (f"network buffer pool {self.owner!r} closed with {sum(leaks.values())} buffers still "
                   f"in use: {lent}; release them before close()")
            raise ShmflowError(msg)

    def __enter__(self) -> NetworkBufferPool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(check=exc_type is None)

    def __del__(self) -> None:
        if getattr(self, "_closed", True) is False:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        state = " closed" if getattr(self, "_closed", False) else ""
        return (f"<NetworkBufferPool {self.owner!r} {self.num_buffers} x {format_bytes(self.buffer_size)} "
                f"at offset {self.block_offset}{state}>")
