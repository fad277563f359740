"""Windows: tumbling and sliding assigners (event or processing time) and the keyed WindowAggregate.

Role: ``key_by(...).window(TumblingEventTimeWindows.of(10)).aggregate(count())``.
Windows are aligned to multiples of ``slide`` from 0 (like Flink, no
offset): a record at time ``t`` belongs to ``[start, start + size)`` for
every ``start = t - (t mod slide) - k * slide`` (k = 0, 1, ...) with
``start + size > t``. Times and sizes are float seconds. Use sizes that are
exact in binary (integers, 0.5, 0.25, ...) when window bounds must be exact:
``t mod slide`` is float arithmetic.

Event time: a watermark ``W`` asserts that no record with a timestamp below
``W`` follows. A window ``[s, e)`` fires when a watermark ``>= e`` arrives;
a record whose windows all ended at or before ``W - allowed_lateness`` is
dropped and counted in ``ctx.metrics["late_records_dropped"]``.

Imports: runtime.execution.task, operators.keyed, operators.stateless, stdlib.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from itertools import chain, repeat
from typing import Any

from operators.keyed import Aggregation, _check_aggregation
from operators.stateless import to_records
from runtime.errors import InvalidArgumentError, StateAccessError
from runtime.execution.task import MAX_WATERMARK, Batch, Emit, Operator, OperatorContext, TimestampedBatch, batch_len
from runtime.state.backend import KeyedStateBackend, make_backend
from runtime.state.mapping import StateMapping

__all__ = [
    "WindowAssigner",
    "TumblingEventTimeWindows", "SlidingEventTimeWindows",
    "TumblingProcessingTimeWindows", "SlidingProcessingTimeWindows",
    "WindowAggregate",
]

LATE_METRIC = "late_records_dropped"


def _positive(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"window {what} must be a number of seconds; got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    if not (value > 0 and math.isfinite(value)):
        msg = f"window {what} must be > 0 seconds and finite; got {value!r}"
        raise InvalidArgumentError(msg)
    return float(value)


class WindowAssigner:
    """Assigns a time to the windows containing it. Build one with the subclasses' ``of(...)``.

    ``size`` and ``slide`` are seconds; ``event_time`` says which clock
    assigns records (the record's event timestamp, or processing time at
    arrival).

    >>> SlidingEventTimeWindows.of(10, 5).assign(12.0)
    [(10.0, 20.0), (5.0, 15.0)]
    """

    event_time: bool = True

    def __init__(self, size: float, slide: float) -> None:
        self.size = _positive("size", size)
        self.slide = _positive("slide", slide)

    @property
    def tumbling(self) -> bool:
        return self.size == self.slide

    def assign(self, t: float) -> list[tuple[float, float]]:
        """The ``(start, end)`` windows containing ``t``, latest start first."""
        size, slide = self.size, self.slide
        last = t - t % slide
        out = []
        k = 0
        start = last
        while start + size > t:
            out.append((start, start + size))
            k += 1
            start = last - k * slide
        return out

    def __repr__(self) -> str:
        if self.tumbling:
            return f"{type(self).__name__}.of({self.size:g})"
        return f"{type(self).__name__}.of({self.size:g}, {self.slide:g})"


class TumblingEventTimeWindows(WindowAssigner):
    """Fixed, non-overlapping event-time windows ``[k*size, (k+1)*size)``.

    >>> TumblingEventTimeWindows.of(5).assign(12.5)
    [(10.0, 15.0)]
    """

    @classmethod
    def of(cls, size: float) -> TumblingEventTimeWindows:
        return cls(size, size)


class SlidingEventTimeWindows(WindowAssigner):
    """Overlapping event-time windows of ``size`` starting every ``slide`` seconds.

    >>> SlidingEventTimeWindows.of(4, 2).assign(5.0)
    [(4.0, 8.0), (2.0, 6.0)]
    """

    @classmethod
    def of(cls, size: float, slide: float) -> SlidingEventTimeWindows:
        return cls(size, slide)


class TumblingProcessingTimeWindows(WindowAssigner):
    """Fixed processing-time windows: records are assigned by the clock at arrival.

    >>> TumblingProcessingTimeWindows.of(60).assign(125.0)
    [(120.0, 180.0)]
    """

    event_time = False

    @classmethod
    def of(cls, size: float) -> TumblingProcessingTimeWindows:
        return cls(size, size)


class SlidingProcessingTimeWindows(WindowAssigner):
    """Overlapping processing-time windows of ``size`` every ``slide`` seconds.

    >>> SlidingProcessingTimeWindows.of(3, 1).assign(10.5)
    [(10.0, 13.0), (9.0, 12.0), (8.0, 11.0)]
    """

    event_time = False

    @classmethod
    def of(cls, size: float, slide: float) -> SlidingProcessingTimeWindows:
        return cls(size, slide)


class WindowAggregate(Operator):
    """Keyed window aggregation: ``WindowAggregate(key_fn, assigner, aggregation, *, allowed_lateness=0.0)``.

    Emits one record ``(key, value, window_start, window_end)`` per key and
    window when the window fires, where ``value`` is the aggregation's
    window value: ``count()`` -> the count, ``sum()`` / ``min()`` / ``max()``
    -> the total / min / max, ``sum(field)`` (etc.) -> the key's first record
    in the window with that field aggregated, ``reduce(fn)`` -> the reduced
    record. When several windows fire together, output is ordered by window
    end, then by the order keys first appeared in the window.

    Event time (input must be TimestampedBatch): a window fires when
    ``process_watermark`` receives a watermark ``>= window_end``; the
    watermark is returned (forwarded) after the results are emitted. Results
    are a TimestampedBatch stamped with the largest float below the window
    end (Flink's ``maxTimestamp()``), so windows can cascade. Records for
    windows already fired are dropped and counted in
    ``ctx.metrics["late_records_dropped"]`` (a record counts once, when all
    its windows are too late); with ``allowed_lateness > 0`` a fired window
    keeps its state until ``watermark >= end + allowed_lateness`` and every
    late record re-emits the updated result of its key.

    Processing time: records are assigned by ``ctx.processing_time()`` when
    the batch arrives; windows fire from ``on_processing_time(now, emit)``,
    which the runtime calls at ``next_timer()``.

    ``finish`` fires every remaining window (end of bounded input).
    ``key_fn=None`` means the record is its own key.

    >>> from runtime.execution.task import OperatorContext, TimestampedBatch
    >>> from operators.keyed import count
    >>> op = WindowAggregate(None, TumblingEventTimeWindows.of(10), count())
    >>> op.open(OperatorContext())
    >>> out = []
    >>> op.process_batch(TimestampedBatch(["a", "b", "a", "a"], [1.0, 2.0, 9.0, 12.0]), out.extend)
    >>> op.process_watermark(10.0, out.extend)
    10.0
    >>> out
    [('a', 2, 0.0, 10.0), ('b', 1, 0.0, 10.0)]
    >>> op.process_batch(TimestampedBatch(["b"], [3.0]), out.extend)  # late: dropped, counted
    >>> op.ctx.metrics["late_records_dropped"]
    1
    >>> op.finish(out.extend); out[-1]
    ('a', 1, 10.0, 20.0)
    """

    name = "window_aggregate"

    def __init__(self, key_fn: Callable[[Any], Any] | None, assigner: WindowAssigner,
                 aggregation: Aggregation, *, allowed_lateness: float = 0.0) -> None:
        if key_fn is not None and not callable(key_fn):
            msg = f"WindowAggregate: key_fn must be callable or None; got {type(key_fn).__name__}"
            raise TypeError(msg)
        if not isinstance(assigner, WindowAssigner):
            msg = ("WindowAggregate needs a window assigner (e.g. TumblingEventTimeWindows.of(10)); got "
                   f"{type(assigner).__name__}")
            raise TypeError(msg)
        _check_aggregation("WindowAggregate", aggregation)
        lateness_ok = isinstance(allowed_lateness, (int, float)) and not isinstance(allowed_lateness, bool)
        if not lateness_ok or not allowed_lateness >= 0:
            msg = f"allowed_lateness must be >= 0 seconds; got {allowed_lateness!r}"
            raise InvalidArgumentError(msg)
        self.key_fn = key_fn
        self.assigner = assigner
        self.aggregation = aggregation
        self.allowed_lateness = float(allowed_lateness)
        self._windows: dict[float, dict[Any, Any]] = {}  # window start -> {key: acc}; open and (lateness) fired windows
        self._fired: set[float] = set()  # starts of windows already fired, kept for allowed lateness
        self._watermark = float("-inf")
        self._metrics: dict[str, float] = {}
        self._clock: Callable[[], float] = time.time
        self._backend: KeyedStateBackend | None = None  # state.backend managed: each window's {key: acc} there

    @property
    def managed_memory_weight(self) -> int:  # type: ignore[override]
        """Its windows' state may live in managed memory (``state.backend: managed``)."""
        return 1

    keyed_state = True

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        self._metrics = ctx.metrics
        self._metrics.setdefault(LATE_METRIC, 0)
        self._clock = ctx.processing_time
        if ctx.state_backend == "managed":
            self._backend = make_backend(ctx)

    def _new_window(self, start: float) -> dict[Any, Any]:
        """A window's ``{key: acc}``: a dict, or (managed backend) a StateMapping of that window's state."""
        if self._backend is None:
            return self.aggregation.new_state()
        return StateMapping(self._backend, f"window@{start!r}")  # type: ignore[return-value]

    def _drop_window(self, start: float) -> None:
        state = self._windows.pop(start)
        if isinstance(state, StateMapping):
            state.clear()

    # -- input -----------------------------------------------------------------------

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        if self.assigner.event_time:
            if not isinstance(batch, TimestampedBatch):
                msg = (f"{self.assigner!r} needs timestamped records; got a {type(batch).__name__} batch; "
                       f"call with_timestamps(...) before the window")
                raise TypeError(msg)
            self._add_event_time(batch, emit)
        elif batch_len(batch):
            records = to_records(batch)
            keys = records if self.key_fn is None else list(map(self.key_fn, records))
            now = self._clock()
            for start, _end in self.assigner.assign(now):
                self._fold(start, keys, records)

    def _fold(self, start: float, keys: Any, records: list[Any]) -> None:
        state = self._windows.get(start)
        if state is None:
            state = self._windows[start] = self._new_window(start)
        self.aggregation.fold(state, keys, records)

    def _add_event_time(self, batch: TimestampedBatch, emit: Emit) -> None:
        if not batch:
            return
        records = list(batch)
        keys = records if self.key_fn is None else list(map(self.key_fn, records))
        timestamps = batch.timestamps
        size = self.assigner.size
        horizon = self._watermark - self.allowed_lateness  # windows ending at or before this are gone
        if self.assigner.tumbling:
            starts = [t - t % size for t in timestamps]
            if min(starts) == max(starts):
                groups = {starts[0]: (keys, records)}
            else:
                groups = _group(starts, keys, records)
            late = sum(1 for s in starts if s + size <= horizon) if min(starts) + size <= horizon else 0
        else:
            flat_starts, flat_keys, flat_records = [], [], []
            late = 0
            assign = self.assigner.assign
            for t, key, record in zip(timestamps, keys, records):
                windows = assign(t)  # empty when t falls in a gap (slide > size): no window, not late
                if windows and windows[0][1] <= horizon:  # the latest window is gone: every window is
                    late += 1
                    continue
                for start, _end in windows:
                    flat_starts.append(start)
                    flat_keys.append(key)
                    flat_records.append(record)
            groups = _group(flat_starts, flat_keys, flat_records) if flat_starts else {}
        if late:
            self._metrics[LATE_METRIC] = self._metrics.get(LATE_METRIC, 0) + late
        refire = []
        for start in sorted(groups):
            if start + size <= horizon:
                continue  # too late for this window
            group_keys, group_records = groups[start]
            self._fold(start, group_keys, group_records)
            if start + size <= self._watermark:  # the window already fired (or would have): fire these keys now
                self._fired.add(start)
                refire.append((start, dict.fromkeys(group_keys)))
        if refire:
            agg = self.aggregation
            value = agg.value
            out = []
            for start, touched in refire:
                state = self._windows[start]
                end = start + size
                out.extend([(key, value(state[key]), start, end) for key in touched])
            self._emit_results(out, [(start, len(touched)) for start, touched in refire], emit)

    # -- firing ----------------------------------------------------------------------

    def process_watermark(self, watermark: float, emit: Emit) -> float | None:
        if not self.assigner.event_time:
            return watermark
        if watermark <= self._watermark:
            return None
        self._watermark = watermark
        self._fire(watermark, emit)
        horizon = watermark - self.allowed_lateness
        size = self.assigner.size
        for start in [s for s in self._fired if s + size <= horizon]:
            self._fired.discard(start)
            self._drop_window(start)
        return watermark

    def next_timer(self) -> float | None:
        if self.assigner.event_time or not self._windows:
            return None
        return min(self._windows) + self.assigner.size

    def on_processing_time(self, now: float, emit: Emit) -> None:
        if not self.assigner.event_time:
            self._fire(now, emit)

    def finish(self, emit: Emit) -> None:
        self._fire(MAX_WATERMARK, emit)
        if self._backend is not None:
            self._metrics.update(self._backend.stats().metrics())
        self._windows.clear()
        self._fired.clear()

    def close(self) -> None:
        self._windows.clear()
        self._fired.clear()
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    # -- checkpoints -----------------------------------------------------------------

    def snapshot_state(self) -> tuple[float, list[float], list[tuple[float, Any]], Any]:
        """``(watermark, fired window starts, [(window start, {key: acc} or None)], backend snapshot or None)``.

        On the heap a window's accumulators travel with its start; with the managed backend (None beside the
        start) they are the backend's, one state per window. Processing-time timers follow from the windows.
        """
        windows: list[tuple[float, Any]] = []
        for start, state in self._windows.items():
            if isinstance(state, StateMapping):
                windows.append((start, None))
            else:
                windows.append((start, state if type(state) is dict else dict(state)))
        backend = None if self._backend is None else self._backend.snapshot()
        return (self._watermark, sorted(self._fired), windows, backend)

    def restore_state(self, state: Any) -> None:
        """Take back the windows, the fired windows kept for allowed lateness and the watermark (after ``open``).

        Raises:
            StateAccessError: windows snapshotted with state.backend 'managed' restored with 'heap'.
        """
        watermark, fired, windows, backend = state
        self._watermark = watermark
        self._fired = set(fired)
        if backend is not None:
            if self._backend is None:
                msg = ("WindowAggregate: windows snapshotted with state.backend 'managed' cannot be restored with "
                       "state.backend 'heap'; restart with the checkpoint's state.backend")
                raise StateAccessError(msg)
            self._backend.restore(backend)
        for start, entries in windows:
            target = self._windows[start] = self._new_window(start)
            if entries is not None:
                for key, acc in entries.items():
                    target[key] = acc

    def _fire(self, bound: float, emit: Emit) -> None:
        """Emit every not-yet-fired window with ``end <= bound``, by window end."""
        size = self.assigner.size
        ready = sorted(s for s in self._windows if s + size <= bound and s not in self._fired)
        if not ready:
            return
        keep = self.allowed_lateness > 0 and self.assigner.event_time and bound != MAX_WATERMARK
        value = self.aggregation.value
        out: list[Any] = []
        counts = []
        for start in ready:
            end = start + size
            state = self._windows[start]
            out.extend([(key, value(acc), start, end) for key, acc in state.items()])
            counts.append((start, len(state)))
            if keep and end + self.allowed_lateness > self._watermark:
                self._fired.add(start)
            else:
                self._drop_window(start)
        self._emit_results(out, counts, emit)

    def _emit_results(self, out: list[Any], counts: list[tuple[float, int]], emit: Emit) -> None:
        if not self.assigner.event_time:
            emit(out)
            return
        size = self.assigner.size
        stamps = chain.from_iterable(repeat(math.nextafter(start + size, -math.inf), n) for start, n in counts)
        emit(TimestampedBatch(out, stamps))


def _group(starts: list[Any], keys: list[Any], records: list[Any]) -> dict[float, tuple[list[Any], list[Any]]]:
    """Bucket parallel (start, key, record) lists by window start, keeping arrival order."""
    groups: dict[float, tuple[list[Any], list[Any]]] = {}
    get = groups.get
    for start, key, record in zip(starts, keys, records):
        group = get(start)
        if group is None:
            group = groups[start] = ([], [])
        group[0].append(key)
        group[1].append(record)
    return groups
