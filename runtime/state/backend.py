"""Keyed state backends: where an operator's ``(state, key) -> entry`` lives (``state.backend``).

Imports: runtime.state (codec, descriptors, timers), runtime.errors.

A backend stores one *entry* per (state name, key): the value of a value or
reducing state, the list of a list state, the dict of a map state (or, with
a time-to-live, ``[last access time, that]``). The state objects of
:mod:`runtime.state.states` give entries their meaning; a backend only keeps
them. Two backends, chosen by the config key ``state.backend`` (Flink's):

- ``heap`` (:class:`HeapKeyedStateBackend`): Python dicts; fastest, unbounded.
  Values are checked to be storable on write, so that a job behaves alike on
  both backends.
- ``managed`` (:mod:`runtime.state.managed_backend`): entries serialized into
  managed-memory pages, spilled to disk when the operator's share is full.

A backend also keeps the operator's timers (:mod:`runtime.state.timers`),
one queue per time domain: the heap backend in :class:`~runtime.state.timers.TimerQueue` s,
the managed one as records in managed memory, spilled like state.

Keys are grouped into key groups (``pipeline.max-parallelism``, Flink's, default
128) by a hash of their encoded bytes that does not depend on the process, so
that state can later be snapshotted and rescaled by group.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from runtime.errors import InvalidArgumentError, ProtocolError, StateAccessError
from runtime.state import codec
from runtime.state.descriptors import StateDescriptor
from runtime.state.timers import DOMAINS, TimerQueue, Timers

__all__ = ["MISSING", "BackendStats", "HeapKeyedStateBackend", "KeyedStateBackend", "key_group_of", "make_backend"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: What a backend returns for a (state, key) that has no entry.
MISSING: Any = _Missing()


def key_group_of(key: Any, max_parallelism: int) -> int:
    """The key group of ``key`` in ``[0, max_parallelism)``: a hash of its encoded bytes, the same in every process."""
    digest = hashlib.blake2b(codec.encode_key(key), digest_size=8).digest()
    return int.from_bytes(digest, "little") % max_parallelism


@dataclass(frozen=True)
class BackendStats:
    """What a backend holds: entries, bytes in memory and on disk, and how reads were served."""

    backend: str
    entries: int
    bytes_in_memory: int
    bytes_on_disk: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    #: The small-object allocator's bins that hold objects: ``(size class, objects, bytes, slots)``
    #: (size class 0: objects larger than every class, a block each).
    bins: tuple[tuple[int, int, int, int], ...] = ()

    def metrics(self) -> dict[str, float]:
        """As job metrics (summed per operator by the runtime): a bin's fill is its objects over its slots."""
        out: dict[str, float] = {
            "state_entries": self.entries, "state_bytes_in_memory": self.bytes_in_memory,
            "state_bytes_on_disk": self.bytes_on_disk, "state_cache_hits": self.cache_hits,
            "state_cache_misses": self.cache_misses}
        for size, objects, nbytes, slots in self.bins:
            out[f"state_bin_{size}_objects"] = objects
            out[f"state_bin_{size}_bytes"] = nbytes
            out[f"state_bin_{size}_slots"] = slots
        return out

    def to_wire(self) -> list[Any]:
        """msgpack-able (a worker's heartbeat carries it): ``[backend, entries, bytes_in_memory, bytes_on_disk,
        cache_hits, cache_misses, [[size class, objects, bytes, slots]...]]``."""
        return [self.backend, self.entries, self.bytes_in_memory, self.bytes_on_disk, self.cache_hits,
                self.cache_misses, [list(b) for b in self.bins]]

    @classmethod
    def from_wire(cls, data: Any) -> BackendStats:
        """Inverse of :meth:`to_wire`.

        Raises:
            ProtocolError: ``data`` is not of that shape (it came from another process).
        """
        def ints(items: Any, n: int) -> bool:
            return isinstance(items, list) and len(items) == n and all(
                isinstance(v, int) and not isinstance(v, bool) for v in items)

        ok = (isinstance(data, list) and len(data) == 7 and isinstance(data[0], str) and ints(data[1:6], 5)
              and isinstance(data[6], list) and all(ints(b, 4) for b in data[6]))
        if not ok:
            msg = (f"state stats must be [backend, entries, bytes_in_memory, bytes_on_disk, cache_hits, "
                   f"cache_misses, bins]; got {str(data)[:200]}")
            raise ProtocolError(msg)
        backend, entries, in_memory, on_disk, hits, misses, bins = data
        return cls(backend, entries, in_memory, on_disk, hits, misses, tuple((s, o, n, c) for s, o, n, c in bins))


class KeyedStateBackend:
    """The store behind one operator's keyed state and timers. Not thread-safe; the worker's one thread uses it.

    Timers: ``domain`` is :data:`~runtime.state.timers.EVENT_TIME` or
    :data:`~runtime.state.timers.PROCESSING_TIME`; a ``(timestamp, key)``
    timer registered twice is kept once, deleting one that is not there does
    nothing, and ties in time fire in an order fixed by the backend (the heap
    backend's: registration; the managed backend's: the keys' encodings).
    """

    name = "?"
    #: One queue per time domain, indexed by domain; empty for a backend made without timers.
    _timer_queues: tuple[Timers, ...] = ()

    def get(self, desc: StateDescriptor, key: Any) -> Any:
        """The entry of ``(desc.name, key)``, or MISSING. A mutable entry (list, dict) may be the stored one:
        callers that change it call :meth:`put` afterwards."""
        raise NotImplementedError

    def put(self, desc: StateDescriptor, key: Any, entry: Any) -> None:
        """Store ``entry`` for ``(desc.name, key)``.

        Raises:
            StateSerializationError: the entry cannot be stored (names the state and the type).
        """
        raise NotImplementedError

    def append(self, desc: StateDescriptor, key: Any, items: list[Any]) -> None:
        """Add ``items`` to the list entry of ``(desc.name, key)`` (created if missing); list states without TTL."""
        entry = self.get(desc, key)
        self.put(desc, key, (list(items) if entry is MISSING else [*entry, *items]))

    def remove(self, desc: StateDescriptor, key: Any) -> None:
        raise NotImplementedError

    def keys(self, desc: StateDescriptor) -> Iterator[Any]:
        """Every key that has an entry of ``desc`` (no particular order)."""
        raise NotImplementedError

    def stats(self) -> BackendStats:
        raise NotImplementedError

    def close(self) -> None:
        """Give back whatever the backend holds (idempotent)."""

    # ------------------------------------------------------------------ timers
    def _queue(self, domain: int) -> Timers:
        if domain not in DOMAINS:
            msg = f"a timer's time domain must be one of {DOMAINS} (event time, processing time); got {domain!r}"
            raise InvalidArgumentError(msg)
        if not self._timer_queues:
            msg = (f"this {self.name} state backend keeps no timers: make it with make_backend(ctx, timers=True) "
                   f"(the operators that register timers do)")
            raise StateAccessError(msg)
        return self._timer_queues[domain]

    def register_timer(self, domain: int, timestamp: float, key: Any) -> None:
        """Add the timer ``(timestamp, key)`` of ``domain`` (kept once if it is there already).

        Raises:
            StateSerializationError: (managed) the key cannot be encoded.
            InvalidArgumentError: (managed) ``timestamp`` is NaN; ``domain`` is not a time domain.
        """
        self._queue(domain).register(timestamp, key)

    def delete_timer(self, domain: int, timestamp: float, key: Any) -> None:
        """Remove the timer ``(timestamp, key)`` of ``domain``, if there is one."""
        self._queue(domain).delete(timestamp, key)

    def next_timer_time(self, domain: int) -> float | None:
        """The earliest timer's timestamp in ``domain``, or None."""
        return self._queue(domain).next_time()

    def pop_due_timers(self, domain: int, until: float) -> Iterator[tuple[float, Any]]:
        """Remove and yield ``(timestamp, key)`` for every timer of ``domain`` due at ``until`` (timestamp <=
        until), in timestamp order. Timers registered while iterating that are due fire in the same pass."""
        return self._queue(domain).pop_due(until)

    def timer_count(self) -> int:
        """Pending timers of both domains (the managed backend may read its timer records to count them)."""
        return sum(len(queue) for queue in self._timer_queues)

    def timers(self) -> Iterator[tuple[int, float, Any]]:
        """``(domain, timestamp, key)`` of every pending timer, for snapshots; domain by domain, each in no
        particular order. Do not register or delete timers while iterating."""
        for domain, queue in enumerate(self._timer_queues):
            for timestamp, key in queue.items():
                yield domain, timestamp, key

    def timers_in_order(self) -> list[tuple[int, float, Any]]:
        """Every pending ``(domain, timestamp, key)``, each domain's in firing order: registered again in this
        order (after a restore), they fire as they would have."""
        out: list[tuple[int, float, Any]] = []
        for domain, queue in enumerate(self._timer_queues):
            listed = queue.snapshot() if isinstance(queue, TimerQueue) else sorted(queue.items(), key=lambda t: t[0])
            out.extend((domain, timestamp, key) for timestamp, key in listed)
        return out

    def snapshot(self) -> Any:
        """Every entry, for a checkpoint: a value :mod:`runtime.state.codec` encodes, tagged with the backend's
        name. The runtime encodes it at once, so it may hold the live entries."""
        raise NotImplementedError

    def restore(self, snapshot: Any) -> None:
        """Put back what :meth:`snapshot` returned (decoded) into this new, empty backend.

        Raises:
            StateAccessError: the snapshot was taken by another kind of backend (``state.backend`` changed).
        """
        raise NotImplementedError

    def _check_snapshot(self, snapshot: Any) -> Any:
        """The payload of a ``(backend name, payload)`` snapshot of this kind of backend."""
        if not (isinstance(snapshot, (tuple, list)) and len(snapshot) == 2 and snapshot[0] == self.name):
            kind = snapshot[0] if isinstance(snapshot, (tuple, list)) and snapshot else type(snapshot).__name__
            msg = (f"keyed state snapshotted by the {kind!r} backend cannot be restored into the {self.name!r} "
                   f"backend; restart with the state.backend the checkpoint was taken with")
            raise StateAccessError(msg)
        return snapshot[1]


class HeapKeyedStateBackend(KeyedStateBackend):
    """Entries as Python objects in one dict per state: ``{state name: {key: entry}}``.

    Timers are in two :class:`~runtime.state.timers.TimerQueue` s.

    Ownership: the operator's; entries and timers die with it. Values are
    checked on write (:func:`runtime.state.codec.check_value`); lists and
    dicts are kept as given (a list state's list grows in place).
    """

    name = "heap"

    def __init__(self) -> None:
        self._tables: dict[str, dict[Any, Any]] = {}
        self._timer_queues = (TimerQueue(), TimerQueue())

    def _table(self, desc: StateDescriptor) -> dict[Any, Any]:
        table = self._tables.get(desc.name)
        if table is None:
            table = self._tables[desc.name] = {}
        return table

    def get(self, desc: StateDescriptor, key: Any) -> Any:
        return self._table(desc).get(key, MISSING)

    def put(self, desc: StateDescriptor, key: Any, entry: Any) -> None:
        codec.check_value(entry, desc.name)
        self._table(desc)[key] = entry

    def append(self, desc: StateDescriptor, key: Any, items: list[Any]) -> None:
        for item in items:
            codec.check_value(item, desc.name)
        table = self._table(desc)
        entry = table.get(key)
        if entry is None:
            table[key] = list(items)
        else:
            entry.extend(items)

    def remove(self, desc: StateDescriptor, key: Any) -> None:
        self._table(desc).pop(key, None)

    def keys(self, desc: StateDescriptor) -> Iterator[Any]:
        return iter(list(self._table(desc)))

    def stats(self) -> BackendStats:
        return self.sized(sum(len(t) for t in self._tables.values()))

    @staticmethod
    def sized(entries: int) -> BackendStats:
        """The stats of heap state holding ``entries`` (its bytes are the Python heap's: not counted)."""
        return BackendStats("heap", entries, 0)

    def close(self) -> None:
        self._tables.clear()
        self._timer_queues = (TimerQueue(), TimerQueue())

    def snapshot(self) -> tuple[str, dict[str, dict[Any, Any]]]:
        """``("heap", {state name: {key: entry}})``: the live dicts (encoded by the runtime at once)."""
        return (self.name, self._tables)

    def restore(self, snapshot: Any) -> None:
        tables = self._check_snapshot(snapshot)
        self._tables = {name: dict(table) for name, table in tables.items()}


def make_backend(ctx: Any, *, timers: bool = False) -> KeyedStateBackend:
    """The backend ``ctx.state_backend`` names for the operator whose context (an OperatorContext) is ``ctx``.

    ``timers``: the operator registers timers. A managed backend then keeps
    them in a part of the operator's share (see
    :meth:`~runtime.state.managed_backend.ManagedKeyedStateBackend.split_share`);
    the heap backend always has them.

    Raises:
        ConfigError: ``managed`` for an operator that got no managed memory (names the keys to set).
        InvalidSizeError: ``managed`` with timers, and a share too small for both stores.
    """
    if ctx.state_backend == "managed":
        from runtime.state.managed_backend import ManagedKeyedStateBackend
        backend: KeyedStateBackend = ManagedKeyedStateBackend.for_operator(ctx, timers=timers)
        return backend
    return HeapKeyedStateBackend()
