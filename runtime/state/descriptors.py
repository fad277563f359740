"""State descriptors and time-to-live, with PyFlink's names: what a function asks its RuntimeContext for.

Imports: runtime.errors, stdlib.

A descriptor names one piece of keyed state and its kind (value, list, map,
reducing). The type argument PyFlink takes (``Types.INT()``) is optional and
only kept for documentation: values are any msgpack-able Python value
(None, bool, int, float, str, bytes, and lists, tuples and dicts of them).
``enable_time_to_live(StateTtlConfig)`` makes the state expire (see
:class:`StateTtlConfig`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from runtime.errors import InvalidArgumentError

__all__ = [
    "ListStateDescriptor",
    "MapStateDescriptor",
    "ReducingStateDescriptor",
    "StateDescriptor",
    "StateTtlConfig",
    "ValueStateDescriptor",
]


class StateTtlConfig:
    """Time-to-live of a piece of state: state that nobody writes (or, by default, reads) for ``ttl``
    seconds of processing time disappears, as if it had been cleared.

    ``update_type``: what refreshes an entry's clock. ``OnReadAndWrite`` (the
    default here: state nobody reads or writes for ``ttl`` goes) or
    ``OnCreateAndWrite`` (Flink's default: reads do not refresh). Expired
    state is never returned (``NeverReturnExpired``). Build it directly,
    ``StateTtlConfig(60)``, or as in PyFlink,
    ``StateTtlConfig.new_builder(60).set_update_type(StateTtlConfig.UpdateType.OnCreateAndWrite).build()``
    (``ttl`` in seconds, or any object with ``to_milliseconds()``, such as PyFlink's ``Time``).
    """

    class UpdateType(enum.Enum):
        Disabled = "Disabled"
        OnCreateAndWrite = "OnCreateAndWrite"
        OnReadAndWrite = "OnReadAndWrite"

    class StateVisibility(enum.Enum):
        NeverReturnExpired = "NeverReturnExpired"
        ReturnExpiredIfNotCleanedUp = "ReturnExpiredIfNotCleanedUp"

    def __init__(self, ttl: Any, update_type: StateTtlConfig.UpdateType = UpdateType.OnReadAndWrite,
                 state_visibility: StateTtlConfig.StateVisibility = StateVisibility.NeverReturnExpired) -> None:
        seconds = ttl.to_milliseconds() / 1000 if hasattr(ttl, "to_milliseconds") else ttl
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            msg = f"StateTtlConfig: ttl must be a number of seconds > 0 (or a Time); got {ttl!r}"
            raise InvalidArgumentError(msg)
        self.ttl = float(seconds)
        self.update_type = update_type
        self.state_visibility = state_visibility

    @property
    def refresh_on_read(self) -> bool:
        return self.update_type is StateTtlConfig.UpdateType.OnReadAndWrite

    @property
    def enabled(self) -> bool:
        return self.update_type is not StateTtlConfig.UpdateType.Disabled

    @staticmethod
    def new_builder(ttl: Any) -> _TtlBuilder:
        """PyFlink's builder: ``new_builder(ttl).set_update_type(...).set_state_visibility(...).build()``."""
        return _TtlBuilder(ttl)

    def __repr__(self) -> str:
        return f"StateTtlConfig({self.ttl:g}s, {self.update_type.name})"


class _TtlBuilder:
    def __init__(self, ttl: Any) -> None:
        self._ttl = ttl
        self._update = StateTtlConfig.UpdateType.OnReadAndWrite
        self._visibility = StateTtlConfig.StateVisibility.NeverReturnExpired

    def set_update_type(self, update_type: StateTtlConfig.UpdateType) -> _TtlBuilder:
        self._update = update_type
        return self

    def update_ttl_on_create_and_write(self) -> _TtlBuilder:
        return self.set_update_type(StateTtlConfig.UpdateType.OnCreateAndWrite)

    def update_ttl_on_read_and_write(self) -> _TtlBuilder:
        return self.set_update_type(StateTtlConfig.UpdateType.OnReadAndWrite)

    def set_state_visibility(self, visibility: StateTtlConfig.StateVisibility) -> _TtlBuilder:
        self._visibility = visibility
        return self

    def set_ttl(self, ttl: Any) -> _TtlBuilder:
        self._ttl = ttl
        return self

    def build(self) -> StateTtlConfig:
        return StateTtlConfig(self._ttl, self._update, self._visibility)


class StateDescriptor:
    """One piece of keyed state: its name (unique within an operator) and kind."""

    kind = ""

    def __init__(self, name: str, type_info: Any = None) -> None:
        if not isinstance(name, str) or not name:
            msg = f"{type(self).__name__}: name must be a non-empty str; got {name!r}"
            raise InvalidArgumentError(msg)
        self.name = name
        self.type_info = type_info
        self.ttl_config: StateTtlConfig | None = None

    def get_name(self) -> str:
        return self.name

    def enable_time_to_live(self, ttl_config: StateTtlConfig) -> None:
        """Make this state expire after ``ttl_config.ttl`` seconds without access (see StateTtlConfig)."""
        if not isinstance(ttl_config, StateTtlConfig):
            msg = f"{type(self).__name__} {self.name!r}: enable_time_to_live needs a StateTtlConfig; got {ttl_config!r}"
            raise InvalidArgumentError(msg)
        self.ttl_config = ttl_config if ttl_config.enabled else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ValueStateDescriptor(StateDescriptor):
    """One value per key: ``ValueState`` (``value``, ``update``, ``clear``)."""

    kind = "value"


class ListStateDescriptor(StateDescriptor):
    """A list per key: ``ListState`` (``get``, ``add``, ``add_all``, ``update``, ``clear``)."""

    kind = "list"


class MapStateDescriptor(StateDescriptor):
    """A map per key: ``MapState`` (``get``, ``put``, ``put_all``, ``remove``, ``contains``, ``keys``, ...)."""

    kind = "map"

    def __init__(self, name: str, key_type_info: Any = None, value_type_info: Any = None) -> None:
        super().__init__(name, value_type_info)
        self.key_type_info = key_type_info


class ReducingStateDescriptor(StateDescriptor):
    """One value per key, folded with ``reduce_function(old, new)`` on every ``add``: ``ReducingState``."""

    kind = "reducing"

    def __init__(self, name: str, reduce_function: Callable[[Any, Any], Any] | Any, type_info: Any = None) -> None:
        super().__init__(name, type_info)
        fn = getattr(reduce_function, "reduce", reduce_function)  # PyFlink's ReduceFunction or a callable
        if not callable(fn):
            msg = f"ReducingStateDescriptor {name!r}: reduce_function must be callable; got {reduce_function!r}"
            raise InvalidArgumentError(msg)
        self.reduce_function: Callable[[Any, Any], Any] = fn
