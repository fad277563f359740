"""Timers of a keyed operator: per key, in event time and in processing time, each at most once per timestamp.

Imports: runtime.state.codec, runtime.errors (stdlib otherwise; runtime.state.store for types only).

A backend keeps one queue per time domain (:data:`EVENT_TIME`,
:data:`PROCESSING_TIME`); both queues below have the same methods. Timers
fire in timestamp order: event-time timers when a watermark reaches them (a
timer registered for a time the watermark has already passed fires at the
next watermark, as in Flink), processing-time timers when the clock does.
Registering a ``(timestamp, key)`` timer twice keeps one (as Flink);
deleting one that is not there does nothing.

- :class:`TimerQueue` (the ``heap`` backend): a heap with a set beside it;
  ties in time fire in registration order.
- :class:`ManagedTimerQueue` (the ``managed`` backend): timers are records of
  a :class:`~runtime.state.store.ManagedKeyValueStore` of one key group, so
  they are bytes in managed memory and spill to disk like state. A record's
  key is the domain byte, the timestamp in 8 bytes that sort as the floats do
  (:func:`timestamp_bytes`) and the encoded key (:func:`~runtime.state.codec.encode_key`);
  its value is empty. Key order is firing order: ties in time fire in the
  order of the keys' encodings. The queue keeps the first timers of its
  domain in a *head* on the Python heap (a heap and a set of record keys, as
  Flink's ``RocksDBCachingPriorityQueueSet`` keeps a cache of the first
  elements), so the earliest timer is known without reading the store, and
  reads the store in order (:meth:`~runtime.state.store.ManagedKeyValueStore.scan_keys`)
  only when the head ran empty.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from runtime.errors import InvalidArgumentError
from runtime.state import codec

if TYPE_CHECKING:
    from runtime.state.store import ManagedKeyValueStore

__all__ = ["DOMAINS", "EVENT_TIME", "HEAD_TIMERS", "PROCESSING_TIME", "ManagedTimerQueue", "TimerQueue", "Timers",
           "timestamp_bytes", "timestamp_of"]

EVENT_TIME = 0
PROCESSING_TIME = 1
DOMAINS = (EVENT_TIME, PROCESSING_TIME)

#: Timers a ManagedTimerQueue reads into its head at a time, at least (an eighth of the store's memory
#: entries when that is more, up to 8x this). A refill costs one pass over the store's memory index (about
#: 35 ms for 200 k entries, measured): read 4096 at a time, that is 8 us a timer; 25 k at a time, 4 us.
HEAD_TIMERS = 4096

_BITS = struct.Struct(">Q")
_FLOAT = struct.Struct(">d")
_SIGN = 1 << 63
_ALL = (1 << 64) - 1


class Timers(Protocol):
    """What a backend does with the timers of one domain (both queues below)."""

    def __len__(self) -> int: ...
    def register(self, timestamp: float, key: Any) -> None: ...
    def delete(self, timestamp: float, key: Any) -> None: ...
    def next_time(self) -> float | None: ...
    def pop_due(self, until: float) -> Iterator[tuple[float, Any]]: ...
    def items(self) -> Iterator[tuple[float, Any]]: ...


class TimerQueue:
    """``(timestamp, key)`` timers of one time domain. Keys must be hashable (they are keys of a keyed stream).

    Ownership: the backend's; the heap and set live on the worker's heap (a timer is two small objects).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._live: set[tuple[float, Any]] = set()
        self._order = itertools.count()  # ties in time fire in registration order; keys need not compare

    def __len__(self) -> int:
        return len(self._live)

    def register(self, timestamp: float, key: Any) -> None:
        timer = (timestamp, key)
        if timer in self._live:
            return
        self._live.add(timer)
        heapq.heappush(self._heap, (timestamp, next(self._order), key))

    def delete(self, timestamp: float, key: Any) -> None:
        self._live.discard((timestamp, key))

    def next_time(self) -> float | None:
        """The earliest live timer's timestamp, or None."""
        heap = self._heap
        while heap and (heap[0][0], heap[0][2]) not in self._live:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, until: float) -> Iterator[tuple[float, Any]]:
        """Remove and yield every live timer with ``timestamp <= until``, in order. Timers registered while
        iterating (by ``on_timer``) that are already due fire in the same pass."""
        heap, live = self._heap, self._live
        while heap and heap[0][0] <= until:
            timestamp, _, key = heapq.heappop(heap)
            timer = (timestamp, key)
            if timer in live:
                live.discard(timer)
                yield timer

    def items(self) -> Iterator[tuple[float, Any]]:
        """Every live timer (for snapshots and tests), in no particular order."""
        return iter(list(self._live))

    def snapshot(self) -> list[tuple[float, Any]]:
        """Every live timer in the order they would fire (timestamp, then registration), for a checkpoint."""
        live = self._live
        out: list[tuple[float, Any]] = []
        seen: set[tuple[float, Any]] = set()
        for timestamp, _, key in sorted(self._heap, key=lambda entry: entry[:2]):
            timer = (timestamp, key)
            if timer in live and timer not in seen:  # a timer deleted and registered again: its first entry fires
                seen.add(timer)
                out.append(timer)
        return out

    def restore(self, timers: list[Any]) -> None:
        """Register :meth:`snapshot`'s timers (decoded) again, in their order (so ties fire as they would have)."""
        for timestamp, key in timers:
            self.register(timestamp, key)


def timestamp_bytes(timestamp: float) -> bytes:
    """``timestamp`` as 8 bytes whose byte order is the floats' order (-inf first, -0.0 as 0.0).

    The IEEE 754 bits, big-endian, with the sign bit flipped for a positive
    number and every bit flipped for a negative one.

    Raises:
        InvalidArgumentError: ``timestamp`` is NaN (it has no place in the order).
    """
    if timestamp != timestamp:
        msg = f"a timer's timestamp must be a number, not NaN; got {timestamp!r}"
        raise InvalidArgumentError(msg)
    (bits,) = _BITS.unpack(_FLOAT.pack(timestamp + 0.0))
    return _BITS.pack(bits ^ _ALL if bits & _SIGN else bits | _SIGN)


def timestamp_of(data: bytes, at: int = 0) -> float:
    """Inverse of :func:`timestamp_bytes`, reading 8 bytes of ``data`` at ``at``."""
    (bits,) = _BITS.unpack_from(data, at)
    (timestamp,) = _FLOAT.unpack(_BITS.pack(bits ^ _SIGN if bits & _SIGN else bits ^ _ALL))
    return float(timestamp)


class ManagedTimerQueue:
    """``(timestamp, key)`` timers of one time domain as records of ``store`` (see the module docstring).

    The head holds the record keys of the domain below ``_bound`` (all of
    them): ``_live``, and ``_heap`` ordering them (with keys deleted since,
    skipped when they reach the top). Records at and above ``_bound`` are in
    the store only; ``_bound`` None means the head holds every timer of the
    domain. The head is a cache: every timer is a record of the store too.
    ``store`` must hold no record of ``domain`` when the queue is made.

    A refill reads the next ``max(head_timers, memory entries // 8)`` timers
    from the store (at most ``8 * head_timers``): its cost is one pass over
    the store's memory index, so a larger memory reads more at a time. The
    head holds at most twice that; past it, it keeps the earlier half.

    Ownership: the backend owns ``store`` (shared by the queues of both
    domains, each reading and writing only the records of its own) and
    releases it; the head is this queue's, on the Python heap.
    Process: the worker running the operator. Not thread-safe.
    """

    def __init__(self, store: ManagedKeyValueStore, domain: int, *, head_timers: int = HEAD_TIMERS) -> None:
        if store.key_groups != 1:
            msg = f"timers need a store ordered by key (key_groups=1); got {store.key_groups} key groups"
            raise InvalidArgumentError(msg)
        if domain not in DOMAINS:
            msg = f"a time domain is {EVENT_TIME} (event time) or {PROCESSING_TIME} (processing time); got {domain!r}"
            raise InvalidArgumentError(msg)
        if head_timers < 1:
            msg = f"head_timers must be >= 1; got {head_timers}"
            raise InvalidArgumentError(msg)
        self.store = store
        self.domain = domain
        self._prefix = bytes([domain])
        self._stop = bytes([domain + 1])  # the least record key past the domain
        self._cap = head_timers
        self._limit = head_timers  # timers the last refill asked for
        self._heap: list[bytes] = []  # owner of this queue only: record keys of the head (and deleted ones)
        self._live: set[bytes] = set()  # owner of this queue only: record keys of the head
        self._bound: bytes | None = None  # the store is empty at first: the head holds every timer

    def _record_key(self, timestamp: float, key: Any) -> bytes:
        return self._prefix + timestamp_bytes(timestamp) + codec.encode_key(key)

    def __len__(self) -> int:
        """Pending timers: the head's size while it holds them all, else one pass over the store."""
        if self._bound is None:
            return len(self._live)
        prefix = self._prefix
        return sum(1 for k, _ in self.store.items() if k.startswith(prefix))

    def register(self, timestamp: float, key: Any) -> None:
        rk = self._record_key(timestamp, key)
        bound, live = self._bound, self._live
        if bound is None or rk < bound:
            if rk in live:
                return  # registered already
            live.add(rk)
            heapq.heappush(self._heap, rk)
            if len(self._heap) > 2 * self._limit:
                self._shrink()
        self.store.put(rk, b"")

    def _shrink(self) -> None:
        """Keep the earlier half of an overfull head (the rest stays in the store only), drop deleted keys."""
        keys = sorted(self._live)
        if len(keys) > self._limit:
            self._bound = keys[self._limit]  # every record below it is in the head
            del keys[self._limit:]
        self._heap = keys  # sorted: a heap
        self._live = set(keys)

    def delete(self, timestamp: float, key: Any) -> None:
        rk = self._record_key(timestamp, key)
        bound = self._bound
        if bound is None or rk < bound:
            if rk not in self._live:
                return  # below the bound and not in the head: not a timer
            self._live.discard(rk)  # its heap entry is skipped when it reaches the top
        self.store.discard(rk)

    def _first(self) -> bytes | None:
        """The record key of the earliest timer (the top of the heap): read from the store when the head ran
        empty."""
        heap, live = self._heap, self._live
        while heap and heap[0] not in live:
            heapq.heappop(heap)
        if heap:
            return heap[0]
        store = self.store
        while not heap and self._bound is not None:  # a range of tombstones only reads on
            self._limit = min(max(self._cap, store.memory_entries() // 8), 8 * self._cap)
            found, self._bound = store.scan_keys(self._bound, self._stop, self._limit)
            heap += found  # sorted: a heap
            live.update(heap)
        return heap[0] if heap else None

    def next_time(self) -> float | None:
        """The earliest timer's timestamp, or None."""
        rk = self._first()
        return None if rk is None else timestamp_of(rk, 1)

    def pop_due(self, until: float) -> Iterator[tuple[float, Any]]:
        """Remove and yield every timer with ``timestamp <= until``, in order. Timers registered while
        iterating that are already due fire in the same pass. A pass with nothing due reads the store only if
        the head ran empty."""
        store = self.store
        while True:
            rk = self._first()
            if rk is None:
                return
            timestamp = timestamp_of(rk, 1)
            if timestamp > until:
                return
            heapq.heappop(self._heap)
            self._live.discard(rk)  # not kept in a local: _shrink() replaces the set
            store.discard(rk)
            yield timestamp, codec.decode(rk[9:])

    def items(self) -> Iterator[tuple[float, Any]]:
        """Every timer (for snapshots and tests), in firing order. Do not register or delete while iterating."""
        prefix = self._prefix
        for k, _ in self.store.items():
            if k.startswith(prefix):
                yield timestamp_of(k, 1), codec.decode(k[9:])
