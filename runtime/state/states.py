"""The state objects a function gets from its RuntimeContext: ValueState, ListState, MapState, ReducingState.

Imports: runtime.state (backend, descriptors), runtime.errors.

Each object is bound to one descriptor, the operator's backend and its
:class:`KeyContext`: every call acts on the entry of the key being processed
(the record's key in ``process_element``, the timer's in ``on_timer``).
Outside a keyed context (``open``, for instance) a call raises
:class:`~runtime.errors.StateAccessError`.

Time-to-live (``descriptor.enable_time_to_live``): an entry is stored as
``[last access, payload]`` in processing time (the context's clock); a read
of an entry older than the TTL clears it and sees nothing. With
``OnReadAndWrite`` a read refreshes it. A list or map expires as a whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from runtime.errors import StateAccessError
from runtime.state.backend import MISSING, KeyedStateBackend
from runtime.state.descriptors import (
    ListStateDescriptor,
    MapStateDescriptor,
    ReducingStateDescriptor,
    StateDescriptor,
    ValueStateDescriptor,
)

__all__ = ["KeyContext", "ListState", "MapState", "ReducingState", "State", "ValueState", "make_state"]


class KeyContext:
    """The key the operator is processing now (set per record and per timer), and the processing-time clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._key: Any = MISSING

    def set(self, key: Any) -> None:
        self._key = key

    def clear(self) -> None:
        self._key = MISSING

    @property
    def active(self) -> bool:
        return self._key is not MISSING

    def key(self, state: str) -> Any:
        key = self._key
        if key is MISSING:
            msg = (f"state {state!r} was used outside a keyed context: state is read and written in "
                   f"process_element and on_timer of a keyed stream (key_by(...).process(...)), not in open/close")
            raise StateAccessError(msg)
        return key


class State:
    """Base of the state objects: the entry of the current key, with its time-to-live."""

    def __init__(self, desc: StateDescriptor, backend: KeyedStateBackend, keys: KeyContext) -> None:
        self.desc = desc
        self.backend = backend
        self._ctx = keys
        self.ttl = desc.ttl_config

    def _load(self, key: Any) -> Any:
        """The current key's payload, or MISSING (expired entries are cleared here)."""
        entry = self.backend.get(self.desc, key)
        if entry is MISSING or self.ttl is None:
            return entry
        stamp, payload = entry
        now = self._ctx.clock()
        if now - stamp >= self.ttl.ttl:
            self.backend.remove(self.desc, key)
            return MISSING
        if self.ttl.refresh_on_read and now != stamp:
            self.backend.put(self.desc, key, [now, payload])
        return payload

    def _store(self, key: Any, payload: Any) -> None:
        self.backend.put(self.desc, key, payload if self.ttl is None else [self._ctx.clock(), payload])

    def clear(self) -> None:
        """Forget the current key's entry."""
        self.backend.remove(self.desc, self._ctx.key(self.desc.name))


class ValueState(State):
    """One value per key."""

    def value(self) -> Any:
        """The current key's value, or None."""
        payload = self._load(self._ctx.key(self.desc.name))
        return None if payload is MISSING else payload

    def update(self, value: Any) -> None:
        """Set the current key's value (None clears it, as in Flink)."""
        key = self._ctx.key(self.desc.name)
        if value is None:
            self.backend.remove(self.desc, key)
        else:
            self._store(key, value)


class ReducingState(State):
    """One value per key, folded with the descriptor's reduce function on every add."""

    def get(self) -> Any:
        payload = self._load(self._ctx.key(self.desc.name))
        return None if payload is MISSING else payload

    def add(self, value: Any) -> None:
        key = self._ctx.key(self.desc.name)
        old = self._load(key)
        reduce = self.desc.reduce_function  # type: ignore[attr-defined]
        self._store(key, value if old is MISSING else reduce(old, value))


class ListState(State):
    """A list per key."""

    def get(self) -> list[Any]:
        """The current key's items (a copy; empty when there are none)."""
        payload = self._load(self._ctx.key(self.desc.name))
        return [] if payload is MISSING else list(payload)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.get())

    def add(self, value: Any) -> None:
        self.add_all([value])

    def add_all(self, values: Iterable[Any]) -> None:
        items = list(values)
        key = self._ctx.key(self.desc.name)
        if self.ttl is None:
            self.backend.append(self.desc, key, items)
            return
        old = self._load(key)
        self._store(key, items if old is MISSING else [*old, *items])

    def update(self, values: Iterable[Any]) -> None:
        """Replace the current key's items (an empty list clears them)."""
        items = list(values)
        key = self._ctx.key(self.desc.name)
        if items:
            self._store(key, items)
        else:
            self.backend.remove(self.desc, key)


class MapState(State):
    """A map per key."""

    def _map(self) -> tuple[Any, dict[Any, Any]]:
        key = self._ctx.key(self.desc.name)
        payload = self._load(key)
        return key, ({} if payload is MISSING else payload)

    def _save(self, key: Any, mapping: dict[Any, Any]) -> None:
        if mapping:
            self._store(key, mapping)
        else:
            self.backend.remove(self.desc, key)

    def get(self, key: Any) -> Any:
        """The value under ``key`` in the current key's map, or None."""
        return self._map()[1].get(key)

    def put(self, key: Any, value: Any) -> None:
        k, mapping = self._map()
        mapping = dict(mapping)
        mapping[key] = value
        self._save(k, mapping)

    def put_all(self, entries: dict[Any, Any] | Iterable[tuple[Any, Any]]) -> None:
        k, mapping = self._map()
        mapping = dict(mapping)
        mapping.update(entries)
        self._save(k, mapping)

    def remove(self, key: Any) -> None:
        k, mapping = self._map()
        if key in mapping:
            mapping = dict(mapping)
            del mapping[key]
            self._save(k, mapping)

    def contains(self, key: Any) -> bool:
        return key in self._map()[1]

    def keys(self) -> list[Any]:
        return list(self._map()[1])

    def values(self) -> list[Any]:
        return list(self._map()[1].values())

    def items(self) -> list[tuple[Any, Any]]:
        return list(self._map()[1].items())

    def is_empty(self) -> bool:
        return not self._map()[1]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())


_KINDS: dict[type[StateDescriptor], type[State]] = {
    ValueStateDescriptor: ValueState,
    ListStateDescriptor: ListState,
    MapStateDescriptor: MapState,
    ReducingStateDescriptor: ReducingState,
}


def make_state(desc: StateDescriptor, backend: KeyedStateBackend, keys: KeyContext) -> State:
    """The state object for ``desc`` (its class follows the descriptor's kind)."""
    for kind, cls in _KINDS.items():
        if isinstance(desc, kind):
            return cls(desc, backend, keys)
    msg = f"unknown state descriptor {desc!r}; use Value/List/Map/ReducingStateDescriptor"
    raise TypeError(msg)
