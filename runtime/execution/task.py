"""The Operator protocol and OperatorContext: the only contract between the worker and operators.

Imports: runtime.errors, runtime.network.records (the batch types), runtime.state.backend (types only; stdlib
otherwise). The worker runs operators through this protocol and never imports ``operators/``.

Execution is batch-at-a-time inside, record-at-a-time outside (DESIGN.md):
operators receive and emit **batches**, so the per-record cost is a C-level
loop (``map``, comprehensions, numpy), not a method call per record per
operator. A batch is either

* a ``list`` of records (any msgpack-able Python values), or
* a :class:`TimestampedBatch`, a list that also carries one event timestamp
  (float seconds) per record, once a stream has ``with_timestamps(...)``, or
* a ``dict`` of equal-length numpy arrays (columnar streams, ``map_batches``).

An operator's ``emit`` callback takes a batch; emitting an empty batch is
allowed and ignored. Watermarks (event time) flow between batches through
``process_watermark``; processing-time timers through ``next_timer`` /
``on_processing_time``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtime.network.batch import Batch, TimestampedBatch, batch_len, to_records

if TYPE_CHECKING:
    from runtime.io import IOManager
    from runtime.memory.manager import MemoryManager
    from runtime.state.backend import BackendStats, KeyedStateBackend

Emit = Callable[[Batch], None]

#: The watermark that closes every event-time window: end of input.
MAX_WATERMARK = float("inf")


@dataclass
class ManagedMemory:
    """What the runtime lends one stateful operator: its share of the worker's managed memory, and spill I/O.

    The worker's managed budget (``memory.managed.size`` or ``.fraction``) is
    shared by the stateful operators of all its subtasks in proportion to
    their :attr:`Operator.managed_memory_weight` (Flink's
    ``ManagedMemoryUseCase`` weights). An operator takes pages lazily, up to
    ``share_bytes``, from ``memory`` on behalf of ``owner``; running out of its
    share makes it spill through :meth:`io`, never fail.

    Ownership: the operator owns every page it takes as ``owner`` and frees
    them when it finishes; the runtime releases whatever ``owner`` still
    holds when the job ends (and reports it as a leak). ``io()`` returns the
    job's IOManager, created on first use in one of ``io.tmp-dirs``; the
    runtime closes it (removing every spill file) when the job ends, fails or
    is cancelled.
    The keyed state backend kept in the share (``state.backend: managed``)
    attaches itself (:meth:`attach_state`) so that the worker can report its
    stats while the job runs (``shmflow layout --coordinator``); it detaches
    when it closes.
    Process: the worker running the operator; its one thread.
    """

    memory: MemoryManager
    owner: str
    share_bytes: int
    io: Callable[[], IOManager]
    _state: KeyedStateBackend | None = field(default=None, init=False, repr=False, compare=False)  # in this share

    def attach_state(self, backend: KeyedStateBackend) -> None:
        """``backend`` keeps its entries in this share from now on (a later one replaces it)."""
        self._state = backend

    def detach_state(self, backend: KeyedStateBackend) -> None:
        """``backend`` closed: its stats are no longer reported (another attached since is kept)."""
        if self._state is backend:
            self._state = None

    def state_stats(self) -> BackendStats | None:
        """The attached backend's stats now (entries, bytes in memory and on disk, reads, bins), or None.

        Exact, so not always cheap: counting the entries of a store that spilled merges its runs on disk
        (the store caches the count until its next write). How often the worker asks:
        ``runtime.cluster.worker.Worker._state_if_changed``.
        """
        return self._state.stats() if self._state is not None else None


@dataclass
class OperatorContext:
    """What a running operator may know and use.

    ``mode`` is ``"streaming"`` (keyed aggregations emit every update) or
    ``"batch"`` (one final record per key at end of input). ``memory`` is the
    worker's MemoryManager when the runtime provides one; ``managed`` is this
    operator's share of it (only for operators whose ``managed_memory_weight``
    is above 0, and only when the worker has managed memory). ``clock`` returns
    processing time in seconds (injectable for tests). ``metrics`` is a plain
    dict of counters the runtime reports (summed per operator chain).
    """

    operator_name: str = "operator"
    subtask_index: int = 0
    parallelism: int = 1
    worker_id: int = 0
    mode: str = "streaming"
    memory: MemoryManager | None = None
    managed: ManagedMemory | None = None
    clock: Callable[[], float] = time.time
    metrics: dict[str, float] = field(default_factory=dict)
    send_to_client: Callable[[str, Batch], None] | None = None  # collect() sinks ship results this way
    #: Where keyed state lives (``state.backend``: "heap" or "managed") and how many key groups keys fall
    #: into (``pipeline.max-parallelism``).
    state_backend: str = "heap"
    max_parallelism: int = 128
    #: Whether the job takes checkpoints (a sink commits its output per checkpoint then), and the id of the
    #: checkpoint being taken while ``prepare_snapshot`` / ``snapshot_state`` run.
    checkpointing: bool = False
    checkpoint_id: int = 0
    #: An operator that works long in one call (a final aggregation reading back what it spilled) calls
    #: this every few seconds: the worker heartbeats and acts on a cancel (raising out of the operator).
    keep_alive: Callable[[], None] = lambda: None

    def processing_time(self) -> float:
        return self.clock()


class Operator:
    """Base of every operator. Subclasses override what they need.

    Lifecycle: ``open(ctx)`` once, then any interleaving of ``process_batch``,
    ``process_watermark`` and ``on_processing_time``, then ``finish(emit)`` at
    end of input (flush state; batch mode emits its results here), then
    ``close()`` (always, also after a failure).
    """

    name: str = "operator"
    #: This operator's claim on the worker's managed memory, relative to the other stateful operators
    #: of the worker (0: it keeps no state in managed memory). See :class:`ManagedMemory`.
    managed_memory_weight: int = 0
    #: Its managed memory would hold keyed state (the ``managed`` state backend's): it gets a share only
    #: when ``state.backend`` is ``managed``.
    keyed_state: bool = False

    def open(self, ctx: OperatorContext) -> None:
        self.ctx = ctx

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        raise NotImplementedError

    def process_watermark(self, watermark: float, emit: Emit) -> float | None:
        """Handle an event-time watermark; return the watermark to forward (None: forward nothing)."""
        return watermark

    def pending_watermark(self) -> float | None:
        """A watermark this operator generated since the last call (event-time sources), or None.

        The runtime polls it after each batch and forwards the watermark downstream.
        """
        return None

    def next_timer(self) -> float | None:
        """The processing time at which :meth:`on_processing_time` wants to run, or None."""
        return None

    def on_processing_time(self, now: float, emit: Emit) -> None:
        pass

    def finish(self, emit: Emit) -> None:
        pass

    def close(self) -> None:
        pass

    # ------------------------------------------------------------ checkpoints
    def prepare_snapshot(self, emit: Emit) -> None:
        """A checkpoint barrier is about to pass: emit what is held for output (a mini-batch, a linger
        buffer), so that it goes out before the barrier (Flink's ``prepareSnapshotPreBarrier``)."""

    def snapshot_state(self) -> Any:
        """This operator's state for a checkpoint, taken between two batches: None (no state), bytes, or
        any value :mod:`runtime.state.codec` encodes (msgpack's types and tuples). The runtime encodes it
        at once, so the value may be the live object.

        An operator that keeps nothing between batches says so by inheriting :class:`Stateless`; one that
        neither implements this nor is stateless cannot run in a job with checkpoints (refused before
        deployment, naming it)."""
        msg = (f"operator {self.name!r} ({type(self).__name__}) does not implement snapshot_state() and "
               f"restore_state(state); it cannot run in a job with checkpoints (execution.checkpointing.interval)")
        raise NotImplementedError(msg)

    @classmethod
    def can_snapshot(cls) -> bool:
        """Whether this class implements :meth:`snapshot_state` (checked before a job with checkpoints runs)."""
        return cls.snapshot_state not in (Operator.snapshot_state, SourceOperator.snapshot_state)

    def restore_state(self, state: Any) -> None:
        """Take back what :meth:`snapshot_state` returned (decoded), after ``open`` and before the first
        batch of a job restarted from a checkpoint. Never called with None."""
        msg = f"operator {self.name!r} ({type(self).__name__}) cannot restore the state it snapshotted"
        raise NotImplementedError(msg)

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` completed on every subtask (two-phase-commit sinks commit here)."""


class SourceOperator(Operator):
    """A source: the runtime polls it for batches.

    ``poll_batch(max_records)`` returns a batch, an empty list when nothing is
    ready yet (unbounded sources), or ``None`` once exhausted. ``bounded``
    tells whether the source ends by itself (``mode="auto"`` runs batch mode
    when every source is bounded).
    """

    bounded: bool = True

    def poll_batch(self, max_records: int) -> Batch | None:
        raise NotImplementedError

    def snapshot_state(self) -> Any:
        """The source's position (records or bytes read so far, an offset...). A source must implement
        this and :meth:`restore_state` to run in a job with checkpoints: restoring rewinds it there."""
        msg = (f"source {self.name!r} ({type(self).__name__}) does not implement snapshot_state() and "
               f"restore_state(state); a job with checkpoints (execution.checkpointing.interval) must be able "
               f"to rewind every source")
        raise NotImplementedError(msg)

    def process_batch(self, batch: Batch, emit: Emit) -> None:  # sources have no input
        msg = f"source {self.name!r} takes no input"
        raise TypeError(msg)


class Stateless:
    """Mixin for an operator that keeps nothing between batches: its checkpoint state is None.

    ``class Map(Stateless, Operator)``. (An operator that generates watermarks from what it saw, such as
    ``with_timestamps``, counts as stateless: as in Flink, watermark generation starts afresh on restore.)
    """

    def snapshot_state(self) -> Any:
        return None

    def restore_state(self, state: Any) -> None:
        pass


class SinkOperator(Operator):
    """A sink: consumes batches, emits nothing downstream."""


def run_chain(operators: list[Operator], batch: Batch, sink: Emit) -> None:
    """Push one batch through a chain of operators in-process (forward edges, no serialization)."""
    emit = sink
    for op in reversed(operators):
        emit = _bind(op, emit)
    emit(batch)


def _bind(op: Operator, downstream: Emit) -> Emit:
    def emit(batch: Batch) -> None:
        if batch_len(batch):
            op.process_batch(batch, downstream)
    return emit


__all__ = [
    "MAX_WATERMARK",
    "Batch",
    "Emit",
    "ManagedMemory",
    "Operator",
    "OperatorContext",
    "SinkOperator",
    "SourceOperator",
    "Stateless",
    "TimestampedBatch",
    "batch_len",
    "run_chain",
    "to_records",
]
