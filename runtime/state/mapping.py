"""One state of a keyed backend seen as a dict: what the streaming keyed aggregations fold into.

Imports: runtime.state (backend, descriptors).

``KeyedAggregate`` in streaming mode keeps ``{key: accumulator}`` and calls
``get``, ``[key] = acc``, ``items`` and ``len`` on it (see
:mod:`operators.aggregations`). With ``state.backend: managed`` that dict is a
:class:`StateMapping` over the operator's managed backend, so the same loop
folds into managed memory (and spills), with the same results.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

from runtime.state.backend import MISSING, KeyedStateBackend
from runtime.state.descriptors import ValueStateDescriptor

__all__ = ["StateMapping"]


class StateMapping(MutableMapping[Any, Any]):
    """``{key: value}`` of one value state in ``backend``. Ownership: the backend's (close it, not this)."""

    def __init__(self, backend: KeyedStateBackend, name: str) -> None:
        self.backend = backend
        self.desc = ValueStateDescriptor(name)

    def get(self, key: Any, default: Any = None) -> Any:
        value = self.backend.get(self.desc, key)
        return default if value is MISSING else value

    def __getitem__(self, key: Any) -> Any:
        value = self.backend.get(self.desc, key)
        if value is MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        self.backend.put(self.desc, key, value)

    def __delitem__(self, key: Any) -> None:
        if self.backend.get(self.desc, key) is MISSING:
            raise KeyError(key)
        self.backend.remove(self.desc, key)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.backend.keys(self.desc))

    def clear(self) -> None:
        """Remove every entry of this state (one pass over its keys)."""
        for key in list(self.backend.keys(self.desc)):
            self.backend.remove(self.desc, key)

    def __len__(self) -> int:
        """Counted over the backend's keys of this state (one pass): read at a window's firing and at the end."""
        return sum(1 for _ in self.backend.keys(self.desc))
