"""Keyed process functions with state and timers, with PyFlink's names: ``key_by(...).process(fn)``.

Role: :class:`KeyedProcessFunction` is what a user subclasses (``open``,
``process_element``, ``on_timer``, ``close``); :class:`KeyedProcessOperator`
runs one on a keyed stream. The function's state comes from its
:class:`RuntimeContext` (``get_state``, ``get_list_state``, ``get_map_state``,
``get_reducing_state``) and lives in the operator's keyed state backend
(``state.backend``: ``heap`` or ``managed``, see :mod:`runtime.state.backend`).

``process_element(value, ctx)`` and ``on_timer(timestamp, ctx)`` may yield
records, return an iterable of records, or return None. Records emitted by
``process_element`` keep the input record's timestamp; those of an event-time
``on_timer`` carry the timer's. Event-time timers fire when a watermark reaches
them (a timer already passed fires at the next watermark) and, at the end of a
bounded input, all at once (the final watermark, as in Flink); processing-time
timers fire when the worker's clock reaches them, and those still pending
when the input ends are dropped (Flink's default). Timers live in the same
backend as the state (:meth:`~runtime.state.backend.KeyedStateBackend.register_timer`):
with ``managed``, in managed memory, spilled to disk like state.

Imports: runtime.execution.task, runtime.state, runtime.errors.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any

from runtime.errors import InvalidArgumentError, StateAccessError
from runtime.execution.task import Batch, Emit, Operator, OperatorContext, TimestampedBatch
from runtime.state.backend import KeyedStateBackend, make_backend
from runtime.state.descriptors import (
    ListStateDescriptor,
    MapStateDescriptor,
    ReducingStateDescriptor,
    StateDescriptor,
    ValueStateDescriptor,
)
from runtime.state.states import KeyContext, ListState, MapState, ReducingState, State, ValueState, make_state
from runtime.state.timers import EVENT_TIME, PROCESSING_TIME

__all__ = ["KeyedProcessFunction", "KeyedProcessOperator", "RuntimeContext", "TimeDomain", "TimerService"]

_NEG_INF = float("-inf")
_POS_INF = float("inf")


class TimeDomain(enum.Enum):
    EVENT_TIME = EVENT_TIME  # the values are the backends' domains
    PROCESSING_TIME = PROCESSING_TIME


class RuntimeContext:
    """What a function's ``open`` gets: its state, and where it runs."""

    def __init__(self, operator: KeyedProcessOperator, ctx: OperatorContext) -> None:
        self._op = operator
        self._ctx = ctx

    def _state(self, desc: StateDescriptor, kind: type[StateDescriptor], call: str) -> State:
        if not isinstance(desc, kind):
            msg = f"RuntimeContext.{call} needs a {kind.__name__}; got {desc!r}"
            raise InvalidArgumentError(msg)
        return self._op.state(desc)

    def get_state(self, state_descriptor: ValueStateDescriptor) -> ValueState:
        return self._state(state_descriptor, ValueStateDescriptor, "get_state")  # type: ignore[return-value]

    def get_list_state(self, state_descriptor: ListStateDescriptor) -> ListState:
        return self._state(state_descriptor, ListStateDescriptor, "get_list_state")  # type: ignore[return-value]

    def get_map_state(self, state_descriptor: MapStateDescriptor) -> MapState:
        return self._state(state_descriptor, MapStateDescriptor, "get_map_state")  # type: ignore[return-value]

    def get_reducing_state(self, state_descriptor: ReducingStateDescriptor) -> ReducingState:
        return self._state(state_descriptor, ReducingStateDescriptor,  # type: ignore[return-value]
                           "get_reducing_state")

    def get_task_name(self) -> str:
        return self._ctx.operator_name

    def get_index_of_this_subtask(self) -> int:
        return self._ctx.subtask_index

    def get_number_of_parallel_subtasks(self) -> int:
        return self._ctx.parallelism

    def get_max_number_of_parallel_subtasks(self) -> int:
        return self._ctx.max_parallelism


class TimerService:
    """Register and delete the current key's timers; read the current watermark and processing time."""

    def __init__(self, operator: KeyedProcessOperator) -> None:
        self._op = operator

    def current_watermark(self) -> float:
        return self._op.watermark

    def current_processing_time(self) -> float:
        return self._op.keys.clock()

    def register_event_time_timer(self, timestamp: float) -> None:
        self._op.timer_backend().register_timer(EVENT_TIME, _time(timestamp), self._op.keys.key("<timer>"))

    def register_processing_time_timer(self, timestamp: float) -> None:
        self._op.timer_backend().register_timer(PROCESSING_TIME, _time(timestamp), self._op.keys.key("<timer>"))

    def delete_event_time_timer(self, timestamp: float) -> None:
        self._op.timer_backend().delete_timer(EVENT_TIME, _time(timestamp), self._op.keys.key("<timer>"))

    def delete_processing_time_timer(self, timestamp: float) -> None:
        self._op.timer_backend().delete_timer(PROCESSING_TIME, _time(timestamp), self._op.keys.key("<timer>"))


def _time(timestamp: Any) -> float:
    """A timer's timestamp as a float (-0.0 as 0.0, the same timer on every backend)."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or timestamp != timestamp:
        msg = f"a timer's timestamp must be a number (seconds), not NaN; got {timestamp!r}"
        raise InvalidArgumentError(msg)
    return float(timestamp) + 0.0


class Context:
    """What ``process_element`` gets: the record's timestamp and key, and the timer service."""

    def __init__(self, operator: KeyedProcessOperator) -> None:
        self._op = operator
        self._timers = TimerService(operator)
        self._timestamp: float | None = None

    def timestamp(self) -> float | None:
        """The record's event time (None on a stream without timestamps); in on_timer, the timer's time."""
        return self._timestamp

    def get_current_key(self) -> Any:
        return self._op.keys.key("<current key>")

    def timer_service(self) -> TimerService:
        return self._timers


class OnTimerContext(Context):
    """What ``on_timer`` gets: a Context, and the timer's time domain."""

    def __init__(self, operator: KeyedProcessOperator) -> None:
        super().__init__(operator)
        self._domain = TimeDomain.EVENT_TIME

    def time_domain(self) -> TimeDomain:
        return self._domain


class KeyedProcessFunction:
    """Subclass it: ``open(runtime_context)``, ``process_element(value, ctx)``, ``on_timer(timestamp, ctx)``,
    ``close()``. See the module docstring for what they may return and when timers fire."""

    def open(self, runtime_context: RuntimeContext) -> None:
        pass

    def process_element(self, value: Any, ctx: Context) -> Iterable[Any] | None:
        raise NotImplementedError

    def on_timer(self, timestamp: float, ctx: OnTimerContext) -> Iterable[Any] | None:
        return None

    def close(self) -> None:
        pass


class KeyedProcessOperator(Operator):
    """Runs a :class:`KeyedProcessFunction` on records partitioned by ``key_fn``.

    Ownership: the operator owns its state backend, which keeps its state
    and its timers (made in ``open`` for ``ctx.state_backend``, closed in
    ``close``).
    Process: the worker running the subtask. Not thread-safe.
    """

    name = "process"
    keyed_state = True

    def __init__(self, key_fn: Callable[[Any], Any], function: KeyedProcessFunction, *, name: str = "process") -> None:
        if not callable(key_fn):
            msg = f"process: key_fn must be callable; got {type(key_fn).__name__}"
            raise InvalidArgumentError(msg)
        if not callable(getattr(function, "process_element", None)):
            msg = f"process() needs a KeyedProcessFunction (with process_element); got {type(function).__name__}"
            raise InvalidArgumentError(msg)
        self.key_fn = key_fn
        self.function = function
        self.name = name
        self.backend: KeyedStateBackend | None = None
        self.watermark = _NEG_INF
        self._states: dict[str, State] = {}
        self._opened = False

    @property
    def managed_memory_weight(self) -> int:  # type: ignore[override]
        """Its keyed state may live in managed memory (``state.backend: managed``)."""
        return 1

    # ------------------------------------------------------------------ lifecycle
    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        self.keys = KeyContext(ctx.processing_time)
        self.backend = make_backend(ctx, timers=True)
        self._context = Context(self)
        self._timer_context = OnTimerContext(self)
        self.function.open(RuntimeContext(self, ctx))
        self._opened = True

    def state(self, desc: StateDescriptor) -> State:
        """The state object of ``desc`` (one per name; a name used twice must keep its kind)."""
        old = self._states.get(desc.name)
        if old is not None:
            if type(old.desc) is not type(desc):
                msg = (f"state {desc.name!r} is already registered as a {type(old.desc).__name__}; "
                       f"got a {type(desc).__name__} of the same name")
                raise InvalidArgumentError(msg)
            return old
        if self.backend is None:
            msg = "state is created in open(runtime_context), after the operator has opened"
            raise InvalidArgumentError(msg)
        state = self._states[desc.name] = make_state(desc, self.backend, self.keys)
        return state

    def timer_backend(self) -> KeyedStateBackend:
        """The backend that keeps the timers (the state's).

        Raises:
            StateAccessError: the operator is not open.
        """
        backend = self.backend
        if backend is None:
            msg = "timers are registered in process_element and on_timer, while the operator is open"
            raise StateAccessError(msg)
        return backend

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        timestamps = getattr(batch, "timestamps", None)
        out: list[Any] = []
        out_ts: list[float] = []
        keys, ctx, fn, key_fn = self.keys, self._context, self.function, self.key_fn
        try:
            for i, record in enumerate(batch):
                keys.set(key_fn(record))
                ts = None if timestamps is None else timestamps[i]
                ctx._timestamp = ts
                n = len(out)
                _collect(fn.process_element(record, ctx), out, fn, "process_element")
                if ts is not None and len(out) > n:
                    out_ts.extend([ts] * (len(out) - n))
        finally:
            keys.clear()
            ctx._timestamp = None
        if out:
            emit(TimestampedBatch(out, out_ts) if timestamps is not None else out)

    def process_watermark(self, watermark: float, emit: Emit) -> float | None:
        if watermark > self.watermark:
            self.watermark = watermark
        self._fire(self.watermark, TimeDomain.EVENT_TIME, emit)
        return watermark

    def next_timer(self) -> float | None:
        backend = self.backend
        return None if backend is None else backend.next_timer_time(PROCESSING_TIME)

    def on_processing_time(self, now: float, emit: Emit) -> None:
        self._fire(now, TimeDomain.PROCESSING_TIME, emit)

    def finish(self, emit: Emit) -> None:
        """End of a bounded input: the final watermark fires every pending event-time timer."""
        self.watermark = _POS_INF
        self._fire(_POS_INF, TimeDomain.EVENT_TIME, emit)
        self._report()

    def close(self) -> None:
        try:
            if self._opened:
                self._opened = False
                self.function.close()
        finally:
            backend, self.backend = self.backend, None
            if backend is not None:
                backend.close()

    # ------------------------------------------------------------------ checkpoints
    def snapshot_state(self) -> tuple[float, Any, list[tuple[int, float, Any]]]:
        """``(watermark, backend snapshot, pending timers)``, the timers as ``(domain, timestamp, key)`` in firing
        order per domain."""
        if self.backend is None:
            msg = f"process operator {self.name!r} must be opened (open(ctx)) before snapshot_state()"
            raise StateAccessError(msg)
        return (self.watermark, self.backend.snapshot(), self.backend.timers_in_order())

    def restore_state(self, state: Any) -> None:
        """Take back the function's state and the pending timers (after ``open``, so the function's states exist)."""
        watermark, backend, timers = state
        if self.backend is None:
            msg = f"process operator {self.name!r} must be opened (open(ctx)) before restore_state()"
            raise StateAccessError(msg)
        self.watermark = watermark
        self.backend.restore(backend)
        for domain, timestamp, key in timers:
            self.backend.register_timer(domain, timestamp, key)

    # ------------------------------------------------------------------ internals
    def _fire(self, until: float, domain: TimeDomain, emit: Emit) -> None:
        out: list[Any] = []
        out_ts: list[float] = []
        keys, ctx, fn = self.keys, self._timer_context, self.function
        ctx._domain = domain
        try:
            for timestamp, key in self.timer_backend().pop_due_timers(domain.value, until):
                keys.set(key)
                ctx._timestamp = timestamp
                n = len(out)
                _collect(fn.on_timer(timestamp, ctx), out, fn, "on_timer")
                out_ts.extend([timestamp] * (len(out) - n))
        finally:
            keys.clear()
            ctx._timestamp = None
        if out:
            emit(TimestampedBatch(out, out_ts) if domain is TimeDomain.EVENT_TIME else out)

    def _report(self) -> None:
        if self.backend is not None:
            self.ctx.metrics.update(self.backend.stats().metrics())
            self.ctx.metrics["timers_pending"] = self.backend.timer_count()


def _collect(result: Any, out: list[Any], fn: Any, method: str) -> None:
    if result is None:
        return
    try:
        out.extend(result)
    except TypeError as exc:
        if isinstance(result, Iterable):
            raise
        msg = (f"{type(fn).__name__}.{method} must yield records, return an iterable of records or return None; "
               f"got {type(result).__name__}")
        raise TypeError(msg) from exc

