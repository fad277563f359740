"""Keyed operators: KeyedAggregate and the KeyedCombine combiner.

Role: the operators behind ``key_by(...).count() / sum / min / max / reduce``.
Each holds its aggregation's state, a plain dict ``{key: acc}`` (insertion
ordered: results come out in the order keys were first seen). Before a
shuffle the graph builder may put a :class:`KeyedCombine` (pre-aggregation,
as Flink's batch mode does) and read its ``(key, acc)`` partials with
``KeyedAggregate(..., partial_input=True)``.

The aggregations, and the table of their result shapes, are in
:mod:`operators.aggregations` (re-exported here); the numpy fast path of
count/sum/min/max is in :mod:`operators.keyed_vectorized`.

Imports: runtime.execution.task, operators.stateless (batch helpers), operators.aggregations,
operators.keyed_vectorized, operators.managed_keyed, operators.managed_streaming, runtime.state, stdlib.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

from operators.aggregations import (
    Aggregation,
    Count,
    Max,
    Min,
    Reduce,
    Sum,
    combinable,
    count,
    max,  # noqa: A004 - the public aggregations are named as in Flink and Python
    min,  # noqa: A004
    partial_key,
    reduce,
    sum,  # noqa: A004
)
from operators.keyed_vectorized import Vectorized, gc_paused, vectorizable
from operators.managed_keyed import ManagedKeyedState, fits_managed_memory
from operators.managed_streaming import (
    PreparedBatch,
    StreamingManagedAggregate,
    fits_streaming_state,
    fixed_entries,
)
from operators.stateless import to_records
from runtime.errors import InvalidArgumentError, StateAccessError
from runtime.execution.task import Batch, Emit, Operator, TimestampedBatch
from runtime.state.backend import HeapKeyedStateBackend, KeyedStateBackend, make_backend
from runtime.state.codec import Chain, Incremental
from runtime.state.mapping import StateMapping

__all__ = [
    "Aggregation", "Count", "Sum", "Min", "Max", "Reduce",
    "count", "sum", "min", "max", "reduce", "combinable",
    "KeyedAggregate", "KeyedCombine", "partial_key",
]

EMIT_BATCH_SIZE = 10_000  # records per emitted batch when a keyed operator flushes its state
#: Streaming aggregations in managed memory fold input in mini-batches (Flink's table.exec.mini-batch): up to
#: this many records, or MINI_BATCH_LATENCY seconds of waiting, whichever comes first (and before any
#: watermark). Every update is still emitted, in input order; a batch touches each partition of the state
#: once instead of once per network batch (about 2,000 records), which is what evicted partitions cost.
MINI_BATCH_RECORDS = 1 << 16
MINI_BATCH_LATENCY = 0.05


def _chunks(records: list[Any], size: int = EMIT_BATCH_SIZE) -> Iterable[list[Any]]:
    for start in range(0, len(records), size):
        yield records[start:start + size]


def _check_aggregation(owner: str, aggregation: Any) -> None:
    if not isinstance(aggregation, Aggregation):
        msg = (f"{owner} needs an Aggregation (count(), sum(), min(), max(), reduce(fn)); got "
               f"{type(aggregation).__name__}")
        raise TypeError(msg)


class KeyedAggregate(Operator):
    """Aggregate per key: ``KeyedAggregate(key_fn, aggregation, *, mode, partial_input=False)``.

    ``mode="streaming"`` emits the updated result for every input record, in
    input order (a TimestampedBatch keeps its timestamps). ``mode="batch"``
    emits one final result per key at ``finish`` (key insertion order).
    ``mode=None`` takes ``ctx.mode`` at open. ``key_fn=None`` means the record
    is its own key (word count). With ``partial_input=True`` the input
    records are the ``(key, acc)`` partials of a :class:`KeyedCombine` and
    ``key_fn`` is not used.

    In batch mode, count/sum/min/max over int keys and int or float values
    take a numpy fast path (see ``Vectorized``) with the same results;
    ``vectorize=False`` forces the generic dict loop.

    >>> from runtime.execution.task import run_chain
    >>> words = ["to", "be", "or", "not", "to", "be"]
    >>> op = KeyedAggregate(None, count(), mode="streaming")
    >>> out = []
    >>> run_chain([op], words, out.extend)
    >>> out
    [('to', 1), ('be', 1), ('or', 1), ('not', 1), ('to', 2), ('be', 2)]
    >>> op = KeyedAggregate(lambda r: r[0], sum(1), mode="batch")
    >>> out = []
    >>> op.process_batch([("a", 1), ("b", 2), ("a", 3)], out.extend); op.finish(out.extend)
    >>> out
    [('a', 4), ('b', 2)]
    """

    name = "keyed_aggregate"

    def __init__(self, key_fn: Callable[[Any], Any] | None, aggregation: Aggregation, *,
                 mode: str | None = None, partial_input: bool = False, vectorize: bool = True) -> None:
        if key_fn is not None and not callable(key_fn):
            msg = f"KeyedAggregate: key_fn must be callable or None; got {type(key_fn).__name__}"
            raise TypeError(msg)
        _check_aggregation("KeyedAggregate", aggregation)
        if mode not in (None, "streaming", "batch"):
            msg = f"KeyedAggregate: mode must be 'streaming', 'batch' or None; got {mode!r}"
            raise InvalidArgumentError(msg)
        if partial_input and not combinable(aggregation):
            msg = f"KeyedAggregate: partial_input needs a combinable aggregation; {aggregation.name!r} cannot merge"
            raise InvalidArgumentError(msg)
        self.key_fn = key_fn
        self.aggregation = aggregation
        self.mode = mode
        self.partial_input = partial_input
        self.vectorize = vectorize and vectorizable(aggregation)
        self.key_column: str | None = None  # key_by("column") on a columnar stream (set by the API)
        self._state = aggregation.new_state()
        self._vec: Vectorized | None = None  # made at the first batch-mode batch (after open and the graph)
        self._managed: ManagedKeyedState | None = None  # batch mode with managed memory (from open)
        self._backend: KeyedStateBackend | None = None  # streaming mode, state.backend managed (from open)
        # streaming count/sum/min/max with state.backend managed: the fixed-width state, until a batch does not fit
        self._streaming: StreamingManagedAggregate | None = None
        # input held for the next mini-batch (see MINI_BATCH_RECORDS): prepared batches, their timestamps or None
        self._mini: list[tuple[PreparedBatch, list[float] | None]] = []
        self._mini_records = 0
        self._mini_since = 0.0  # processing time of the oldest held batch

    @property
    def managed_memory_weight(self) -> int:  # type: ignore[override]
        """Batch mode keeps its table in managed memory (when the aggregation can merge partials); streaming
        mode its keyed state, with ``state.backend: managed`` (see :attr:`keyed_state`)."""
        if self.mode == "streaming":
            return 1
        return 1 if fits_managed_memory(self.aggregation) else 0

    @property
    def keyed_state(self) -> bool:  # type: ignore[override]
        """In streaming mode its managed memory would hold keyed state: a share only with ``state.backend: managed``."""
        return self.mode == "streaming"

    def open(self, ctx: Any) -> None:
        super().open(ctx)
        if self.mode is None:
            self.mode = ctx.mode
            if self.mode not in ("streaming", "batch"):
                msg = f"KeyedAggregate: ctx.mode must be 'streaming' or 'batch'; got {self.mode!r}"
                raise ValueError(msg)
        managed = getattr(ctx, "managed", None)
        if self.mode == "streaming" and getattr(ctx, "state_backend", "heap") == "managed":
            if managed is not None and not self.partial_input and fits_streaming_state(self.aggregation):
                self._streaming = StreamingManagedAggregate(self.aggregation, managed, self.key_fn,
                                                            name=f"{self.aggregation.name}-{managed.owner}")
            else:
                self._open_backend()
        if self.mode == "batch" and managed is not None and fits_managed_memory(self.aggregation):
            self._managed = ManagedKeyedState(self.aggregation, managed, combine=False, key_fn=self.key_fn,
                                              key_column=self.key_column)

    def _open_backend(self) -> None:
        self._backend = make_backend(self.ctx)
        # a dict in effect (get, [key] = acc, items, len): the aggregations' loops fold into managed memory
        self._state = StateMapping(self._backend, f"{self.aggregation.name}-accumulators")  # type: ignore[assignment]

    def _streaming_updates(self, batch: Batch) -> Batch | None:
        """The batch's updates from the fixed-width state, or None after handing the state over to the backend."""
        assert self._streaming is not None
        out = self._streaming.updates(to_records(batch)) if not isinstance(batch, dict) else None
        if out is not None:
            return TimestampedBatch(out, batch.timestamps) if isinstance(batch, TimestampedBatch) else out
        streaming, self._streaming = self._streaming, None
        entries = streaming.take_entries()  # releases its memory: the backend's store takes the share next
        self._open_backend()
        for key, acc in entries:
            self._state[key] = acc
        return None

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        if self._managed is not None:
            self._managed.add(batch, partials=self.partial_input)
            return
        if self._streaming is not None and not isinstance(batch, dict):
            self._hold(batch, emit)
            return
        self._process(batch, emit)

    def _hold(self, batch: Batch, emit: Emit) -> None:
        """Keep a streaming batch for the next mini-batch, as its keys and values (the records go now: a
        mini-batch of tuples alive at once would make the garbage collector walk every one of them); a batch
        that does not fit the fixed-width state flushes what is held and hands the state over."""
        assert self._streaming is not None
        stamped = isinstance(batch, TimestampedBatch)
        if self._mini and stamped != (self._mini[0][1] is not None):
            self._flush_mini(emit)
        prepared = self._streaming.prepare(to_records(batch))
        if prepared is None:
            self._flush_mini(emit)
            self._process(batch, emit)  # the state moves to the backend there, for good
            return
        if not self._mini:
            self._mini_since = self.ctx.processing_time()
        self._mini.append((prepared, cast(TimestampedBatch, batch).timestamps if stamped else None))
        self._mini_records += len(batch)
        if self._mini_records >= MINI_BATCH_RECORDS:
            self._flush_mini(emit)

    def _flush_mini(self, emit: Emit) -> None:
        """Fold the held input as one batch and emit its updates (in input order)."""
        held, self._mini, self._mini_records = self._mini, [], 0
        if not held or self._streaming is None:
            return
        # The GC stays paused until the updates are emitted (serialized) and dropped: a mini-batch of
        # acyclic tuples alive at once would otherwise be walked by every collection meanwhile.
        with gc_paused():
            out: Batch = self._streaming.apply([prepared for prepared, _ in held])
            if held[0][1] is not None:
                out = TimestampedBatch(out, [t for _, stamps in held for t in cast(list[float], stamps)])
            del held
            emit(out)
            del out  # before the GC resumes, or its next collection walks every tuple

    def process_watermark(self, watermark: float, emit: Emit) -> float | None:
        self._flush_mini(emit)  # the updates of records before a watermark go before it
        return watermark

    def next_timer(self) -> float | None:
        return self._mini_since + MINI_BATCH_LATENCY if self._mini else None

    def on_processing_time(self, now: float, emit: Emit) -> None:
        if self._mini and now >= self._mini_since + MINI_BATCH_LATENCY:
            self._flush_mini(emit)

    def _process(self, batch: Batch, emit: Emit) -> None:
        if self._streaming is not None:
            out = self._streaming_updates(batch)
            if out is not None:
                emit(out)
                return
        if self.partial_input and isinstance(batch, dict):  # columnar partials of a managed combiner
            accs = (batch["acc"] if "acc" in batch else batch["column_acc"]).tolist()
            keys = batch["key"].tolist()
            pairs = getattr(self.aggregation, "field", None) == 1  # (key, value) rows: acc is [value, first]
            batch = [(k, [a, (k, a)]) for k, a in zip(keys, accs)] if pairs else list(zip(keys, accs))
        records = to_records(batch)
        agg = self.aggregation
        streaming = self.mode != "batch"  # None (not opened) behaves as streaming
        if not streaming and self.vectorize:
            vec = self._vec
            if vec is None and not self._state:
                vec = self._vec = Vectorized(agg)
            if vec is not None:
                if vec.merge(records) if self.partial_input else vec.fold(records, self.key_fn):
                    return
                self._state, self._vec = vec.to_state(), None  # hand over; generic from here on
            self.vectorize = False
        if self.partial_input:
            if streaming:
                emit(agg.merge_updates(self._state, records))
            else:
                agg.merge_partials(self._state, records)
            return
        keys = records if self.key_fn is None else map(self.key_fn, records)
        if streaming:
            out = agg.updates(self._state, keys, records)
            if isinstance(batch, TimestampedBatch):
                out = TimestampedBatch(out, batch.timestamps)
            emit(out)
        else:
            agg.fold(self._state, keys, records)

    def finish(self, emit: Emit) -> None:
        if self._managed is not None:
            _emit_managed(self._managed, self.ctx, emit)
            return
        if self.mode == "streaming":
            self._flush_mini(emit)
            if self._streaming is not None:
                self.ctx.metrics.update(self._streaming.metrics())
            elif self._backend is not None:
                self.ctx.metrics.update(self._backend.stats().metrics())
            else:
                self.ctx.metrics.update(HeapKeyedStateBackend.sized(len(self._state)).metrics())
        if self.mode == "batch":
            if self._vec is not None:
                results = self._vec.results()
                self._vec.clear()
            else:
                results = self.aggregation.results(self._state)
            for chunk in _chunks(results):
                emit(chunk)
            self._state = self.aggregation.new_state()

    def close(self) -> None:
        self._state = self.aggregation.new_state()
        self._vec = None
        if self._managed is not None:
            self._managed.release()
        streaming, self._streaming = self._streaming, None
        if streaming is not None:
            streaming.release()
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()


    # ------------------------------------------------------------ checkpoints
    def prepare_snapshot(self, emit: Emit) -> None:
        """Fold and emit the held mini-batch: its updates go out before the barrier."""
        self._flush_mini(emit)

    def snapshot_state(self) -> list[Any] | Incremental:
        """The accumulators, tagged with the path that holds them: ``["heap", {key: acc}]``, ``["fixed",
        StreamingManagedAggregate.snapshot()]`` or ``["backend", KeyedStateBackend.snapshot()]``; or, on the
        fixed-width path, ``Incremental(parent, base, ["fixed-delta", changes])`` (see
        ``StreamingManagedAggregate.snapshot``; a restore gets a ``Chain`` of them). A list, not a
        tuple: :mod:`runtime.state.codec` packs a tuple's items into an ext of their own, one more copy of the
        whole state (see ``StreamingManagedAggregate.snapshot``).

        Raises:
            StateAccessError: a mini-batch is still held (call :meth:`prepare_snapshot` first), or batch mode
                (checkpoints apply to streaming mode only).
        """
        if self._mini:
            msg = (f"KeyedAggregate {self.aggregation.name!r} holds a mini-batch of {self._mini_records} records; "
                   f"prepare_snapshot(emit) emits it before snapshot_state()")
            raise StateAccessError(msg)
        if self.mode == "batch":
            msg = (f"KeyedAggregate {self.aggregation.name!r} runs in batch mode; checkpoints "
                   f"(execution.checkpointing.interval) apply to streaming mode only")
            raise StateAccessError(msg)
        if self._streaming is not None:
            snapshot = self._streaming.snapshot(getattr(self.ctx, "checkpoint_id", 0))
            if type(snapshot) is Incremental:  # the changes since the last completed checkpoint
                return Incremental(snapshot.parent, snapshot.base, ["fixed-delta", snapshot.delta])
            return ["fixed", snapshot]
        if self._backend is not None:
            return ["backend", self._backend.snapshot()]
        state = self._state
        return ["heap", state if type(state) is dict else dict(state)]  # a Counter encodes as its dict

    def restore_state(self, state: Any) -> None:
        """Take back :meth:`snapshot_state`'s accumulators into whichever path this (opened) operator runs:
        the same path takes them as they are; another one (``state.backend`` changed) takes them key by key.

        Raises:
            StateAccessError: a snapshot of the generic managed path restored without it, or not a snapshot
                of this operator.
        """
        if type(state) is Chain:  # an incremental snapshot: the full one, then each delta
            self.restore_state(state.base)
            for _, delta in state.deltas:
                self._replay(delta)
            return
        kind, payload = state
        if kind == "fixed" and self._streaming is not None:
            self._streaming.restore(payload)
            return
        if kind == "backend":
            if self._streaming is not None:
                self._streaming.release()
                self._streaming = None
                self._open_backend()
            if self._backend is None:
                msg = (f"KeyedAggregate {self.aggregation.name!r}: state snapshotted with state.backend 'managed' "
                       f"cannot be restored with state.backend 'heap'; restart with the checkpoint's state.backend")
                raise StateAccessError(msg)
            self._backend.restore(payload)
            return
        if kind == "fixed":
            entries: Iterable[tuple[Any, Any]] = fixed_entries(payload, pairs=getattr(self.aggregation, "field",
                                                                                      None) == 1)
        elif kind == "heap":
            entries = payload.items()
        else:
            msg = f"KeyedAggregate {self.aggregation.name!r}: not a snapshot of a KeyedAggregate; got kind {kind!r}"
            raise StateAccessError(msg)
        if self._streaming is not None:  # the fixed-width path takes no generic entries: the backend does
            self._streaming.release()
            self._streaming = None
            self._open_backend()
        target = self._state
        for key, acc in entries:
            target[key] = acc


    def _replay(self, delta: Any) -> None:
        """One delta of an incremental snapshot (``StreamingManagedAggregate.snapshot``), after its base."""
        if self._streaming is not None:
            self._streaming.replay(delta)
            return
        *header, rows = delta  # the state moved to another path: each key takes its last accumulator
        pairs = getattr(self.aggregation, "field", None) == 1
        target = self._state
        for key, acc in fixed_entries([*header, [None, [rows]]], pairs=pairs):
            target[key] = acc

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        if self._streaming is not None:
            self._streaming.checkpoint_complete(checkpoint_id)


def _emit_managed(state: ManagedKeyedState, ctx: Any, emit: Emit) -> None:
    """Emit a managed state's results (or partials) in chunks, then report its memory and spilling."""
    keep_alive = getattr(ctx, "keep_alive", None)
    try:
        for batch in state.results():
            if isinstance(batch, dict):
                emit(batch)
            else:
                for chunk in _chunks(batch):
                    emit(chunk)
            if keep_alive is not None:
                keep_alive()  # spilled partitions are aggregated here, after the input: heartbeat between them
    finally:
        state.release()
        for key, value in state.metrics.items():
            ctx.metrics[key] = ctx.metrics.get(key, 0) + value


class KeyedCombine(Operator):
    """Pre-aggregate per key before the shuffle; emits ``(key, acc)`` partials.

    ``KeyedCombine(key_fn, aggregation, *, max_keys=100_000)`` accumulates
    across batches and emits its partials at ``finish``. When it holds more
    than ``max_keys`` keys it flushes early, so memory stays bounded. In
    streaming mode (``ctx.mode``) it flushes after every batch. Partition the
    partials by :func:`partial_key` and read them with
    ``KeyedAggregate(..., partial_input=True)``.

    count/sum/min/max over int keys and int or float values take a numpy fast
    path (see ``Vectorized``): the same partials, in the same order, at a
    fraction of the cost per record. ``vectorize=False`` forces the generic
    dict loop; a batch the fast path cannot take exactly switches this
    operator to it for good, state included.

    >>> combine = KeyedCombine(None, count())
    >>> final = KeyedAggregate(None, count(), mode="batch", partial_input=True)
    >>> partials, out = [], []
    >>> combine.process_batch(["a", "b", "a"], partials.extend)
    >>> combine.process_batch(["b", "a"], partials.extend); combine.finish(partials.extend)
    >>> partials
    [('a', 3), ('b', 2)]
    >>> final.process_batch(partials, out.extend); final.finish(out.extend); out
    [('a', 3), ('b', 2)]
    """

    name = "keyed_combine"

    def __init__(self, key_fn: Callable[[Any], Any] | None, aggregation: Aggregation, *,
                 max_keys: int = 100_000, vectorize: bool = True) -> None:
        if key_fn is not None and not callable(key_fn):
            msg = f"KeyedCombine: key_fn must be callable or None; got {type(key_fn).__name__}"
            raise TypeError(msg)
        _check_aggregation("KeyedCombine", aggregation)
        if not combinable(aggregation):
            msg = (f"KeyedCombine: aggregation {aggregation.name!r} is not combinable (no merge); check combinable() "
                   "first")
            raise InvalidArgumentError(msg)
        if not isinstance(max_keys, int) or max_keys < 1:
            msg = f"KeyedCombine: max_keys must be an int >= 1; got {max_keys!r}"
            raise InvalidArgumentError(msg)
        self.key_fn = key_fn
        self.aggregation = aggregation
        self.max_keys = max_keys
        self.vectorize = vectorize and vectorizable(aggregation)
        self.key_column: str | None = None  # key_by("column") on a columnar stream (set by the API)
        self._state = aggregation.new_state()
        self._vec: Vectorized | None = None
        self._flush_every_batch = False
        self._managed: ManagedKeyedState | None = None  # batch mode with managed memory (from open)

    #: A combiner pre-aggregates in managed memory when the runtime lends it (batch mode).
    managed_memory_weight = 1

    def open(self, ctx: Any) -> None:
        super().open(ctx)
        self._flush_every_batch = ctx.mode == "streaming"
        managed = getattr(ctx, "managed", None)
        if not self._flush_every_batch and managed is not None:
            self._managed = ManagedKeyedState(self.aggregation, managed, combine=True, key_fn=self.key_fn,
                                              key_column=self.key_column)

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        if self._managed is not None:
            for partials in self._managed.add(batch, partials=False):
                emit(partials)
            return
        records = to_records(batch)
        if self.vectorize and not self._flush_every_batch:  # streaming flushes every batch: stays generic
            vec = self._vec
            if vec is None and not self._state:
                vec = self._vec = Vectorized(self.aggregation)
            if vec is not None:
                if vec.fold(records, self.key_fn):
                    if len(vec) > self.max_keys:
                        self._flush(emit)
                    return
                self._state, self._vec = vec.to_state(), None  # hand over; generic from here on
            self.vectorize = False
        keys = records if self.key_fn is None else map(self.key_fn, records)
        self.aggregation.fold(self._state, keys, records)
        if self._flush_every_batch or len(self._state) > self.max_keys:
            self._flush(emit)

    def finish(self, emit: Emit) -> None:
        if self._managed is not None:
            _emit_managed(self._managed, self.ctx, emit)
            return
        self._flush(emit)

    def close(self) -> None:
        self._state = self.aggregation.new_state()
        self._vec = None
        if self._managed is not None:
            self._managed.release()

    def snapshot_state(self) -> None:
        """None. Combiners run in batch mode (``runtime.api._insert_combiners``), which takes no checkpoints;
        in streaming mode a combiner flushes after every batch, so it holds nothing between two batches.

        Raises:
            StateAccessError: a batch-mode combiner holding partials (batch mode has no checkpoints).
        """
        if self._managed is not None or (self._vec is not None and len(self._vec)) or self._state:
            msg = (f"KeyedCombine {self.aggregation.name!r} holds partials between batches (batch mode); "
                   f"checkpoints (execution.checkpointing.interval) apply to streaming mode only")
            raise StateAccessError(msg)
        return None

    def restore_state(self, state: Any) -> None:
        pass

    def _flush(self, emit: Emit) -> None:
        partials = None
        if self._vec is not None:
            if len(self._vec):
                partials = self._vec.partials()
                self._vec.clear()
        elif self._state:
            # Accumulators ship as tuples: a batch holding only tuples serializes in C, a mix of
            # tuples and lists needs a Python call per tuple (see runtime.network.serializer).
            partials = [(k, tuple(a)) if type(a) is list else (k, a) for k, a in self._state.items()]
            self._state = self.aggregation.new_state()
        if partials:
            for chunk in _chunks(partials):
                emit(chunk)
