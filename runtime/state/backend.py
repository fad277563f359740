"""Keyed state backends: where an operator's ``(state, key) -> entry`` lives (``state.backend``).

Imports: runtime.state.codec, runtime.state.descriptors, runtime.errors.

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

Keys are grouped into key groups (``pipeline.max-parallelism``, Flink's, default
128) by a hash of their encoded bytes that does not depend on the process, so
that state can later be snapshotted and rescaled by group.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from runtime.errors import StateAccessError
from runtime.state import codec
from runtime.state.descriptors import StateDescriptor

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


class KeyedStateBackend:
    """The store behind one operator's keyed state. Not thread-safe; the worker's one thread uses it."""

    name = "?"

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

    Ownership: the operator's; entries die with it. Values are checked on
    write (:func:`runtime.state.codec.check_value`); lists and dicts are
    kept as given (a list state's list grows in place).
    """

    name = "heap"

    def __init__(self) -> None:
        self._tables: dict[str, dict[Any, Any]] = {}

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

    def snapshot(self) -> tuple[str, dict[str, dict[Any, Any]]]:
        """``("heap", {state name: {key: entry}})``: the live dicts (encoded by the runtime at once)."""
        return (self.name, self._tables)

    def restore(self, snapshot: Any) -> None:
        tables = self._check_snapshot(snapshot)
        self._tables = {name: dict(table) for name, table in tables.items()}


def make_backend(ctx: Any) -> KeyedStateBackend:
    """The backend ``ctx.state_backend`` names for the operator whose context (an OperatorContext) is ``ctx``.

    Raises:
        ConfigError: ``managed`` for an operator that got no managed memory (names the keys to set).
    """
    if ctx.state_backend == "managed":
        from runtime.state.managed_backend import ManagedKeyedStateBackend
        backend: KeyedStateBackend = ManagedKeyedStateBackend.for_operator(ctx)
        return backend
    return HeapKeyedStateBackend()
