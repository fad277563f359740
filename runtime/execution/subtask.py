"""One parallel instance of a job vertex: its operator chain, its input gate, its outputs.

Imports: runtime.execution (task, graph), runtime.network, runtime.errors. Runs
operators only through runtime.execution.task's protocol (never imports ``operators``).

A subtask makes progress in small :meth:`Subtask.step` s that the worker's
loop interleaves: one source batch, or the buffers that arrived on its gate.
A step runs only while the subtask's outputs have room (a free network
buffer and a short backlog): that is how backpressure stops sources and, in
turn, stops reading input, which stops returning credits upstream.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from runtime.execution.graph import JobGraph, JobVertex
from runtime.execution.task import MAX_WATERMARK, Operator, OperatorContext, SourceOperator, batch_len
from runtime.network.events import CheckpointBarrier, EndOfPartition, Watermark

if TYPE_CHECKING:
    from runtime.network.records import RecordReader

SOURCE_BATCH = 4096  # records per source poll: large enough to amortise Python, small for latency
# Bytes per poll of a columnar source (32,768 rows of an int64 key and a float64 value): numpy does a
# row's work in nanoseconds, so a batch must be large for the per-batch cost (partitioning, framing,
# messages) to vanish behind it. 2 MiB and more ran slower (the batch falls out of the cache).
SOURCE_COLUMNAR_BYTES = 512 << 10


#: The state a subtask acknowledges once its operators have finished (see Subtask.restore_finished).
FINISHED: list[Any] = []


class OperatorFailure(Exception):
    """A user function or operator raised: carries the operator's name and the traceback text."""

    def __init__(self, operator: str, tb: str) -> None:
        super().__init__(f"operator {operator!r} failed:\n{tb}")
        self.operator = operator
        self.traceback = tb


class Subtask:
    """Subtask ``index`` of ``vertex``: a chain of operators between a gate (or source) and writers.

    Ownership: the subtask owns its gate, its writers (and through them their
    network buffers) and its operators' state; :meth:`close` releases all.
    Process: the worker, in the loop's one thread.
    """

    def __init__(self, graph: JobGraph, vertex: JobVertex, index: int, operators: list[Operator], *,
                 gate: Any = None, writers: list[Any] | None = None,
                 ctx_factory: Callable[..., OperatorContext]) -> None:
        self.graph = graph
        self.vertex = vertex
        self.index = index
        self.name = f"{vertex.name} ({index + 1}/{vertex.parallelism})"
        self.operators = operators
        self.gate = gate
        self.reader: RecordReader | None = None
        self.writers = writers or []
        self.finished = False
        self._ending = False  # input done; waiting for the writers to drain
        self.records_in = 0
        self.records_out = 0
        self.step_ns = 0  # time in step() and fire_timers(), added by the job's loop (JobRun.counters)
        self.first_record_at: float | None = None  # time.monotonic() (system-wide) of the first record
        self.finished_at: float | None = None
        self._source: SourceOperator | None = cast(SourceOperator, operators[0]) if vertex.is_source else None
        row_bytes = getattr(self._source, "row_bytes", 0)  # set by columnar sources
        self._source_batch = max(SOURCE_BATCH, SOURCE_COLUMNAR_BYTES // row_bytes) if row_bytes else SOURCE_BATCH
        for i, op in enumerate(operators):
            op.open(ctx_factory(vertex.nodes[i].name, index, vertex.parallelism, op))
        # emits[i] pushes a batch into operator i (emits[len] is the output)
        self._emits: list[Callable[[Any], None]] = [None] * (len(operators) + 1)  # type: ignore[list-item]
        self._emits[-1] = self._output
        for i in range(len(operators) - 1, -1, -1):
            self._emits[i] = self._bind(i)
        self._watermarked = [i for i, op in enumerate(operators)
                            if type(op).pending_watermark is not Operator.pending_watermark]
        self._timed = [i for i, op in enumerate(operators) if type(op).next_timer is not Operator.next_timer]
        self._channel_watermarks: list[float] = []
        self._watermark = float("-inf")
        self._channels_open = 0
        # Checkpoints (see _on_barrier). on_snapshot(subtask, barrier, states) is the runtime's: it stores
        # the states and acknowledges the checkpoint; None: this job takes no checkpoints.
        self.on_snapshot: Callable[[Subtask, CheckpointBarrier, list[Any]], None] | None = None
        self._closed_channels: set[int] = set()
        self._aligning: CheckpointBarrier | None = None  # the checkpoint whose barriers are arriving
        self._barriers_seen: set[int] = set()
        self._aligning_since = 0.0
        self.alignment_seconds = 0.0
        self.last_checkpoint = 0  # the id of the last checkpoint this subtask snapshotted
        self._restored_finished = False  # see restore_finished

    def _bind(self, i: int) -> Callable[[Any], None]:
        op = self.operators[i]
        downstream = self._emits[i + 1]
        name = self.vertex.nodes[i].name

        def emit(batch: Any) -> None:
            if not batch_len(batch):
                return
            try:
                op.process_batch(batch, downstream)
            except OperatorFailure:
                raise
            except Exception:  # noqa: BLE001 - a user function may raise anything; it fails the job by name
                raise OperatorFailure(name, traceback.format_exc()) from None
        return emit

    def attach_input(self, reader: Any, channels: int) -> None:
        self.reader = reader
        self._channel_watermarks = [float("-inf")] * channels
        self._channels_open = channels

    # ------------------------------------------------------------------ output
    def _output(self, batch: Any) -> None:
        self.records_out += batch_len(batch)
        for w in self.writers:
            w.emit(batch)

    def _forward_watermark(self, start: int, watermark: float) -> None:
        """Pass ``watermark`` through operators ``start..`` and then to the outputs."""
        wm = watermark
        for i in range(start, len(self.operators)):
            op = self.operators[i]
            try:
                forwarded = op.process_watermark(wm, self._emits[i + 1])
            except Exception:  # noqa: BLE001 - a user function may raise anything; it fails the job by name
                raise OperatorFailure(self.vertex.nodes[i].name, traceback.format_exc()) from None
            if forwarded is None:  # the operator holds the watermark back
                return
            wm = forwarded
        for w in self.writers:
            w.emit_event(Watermark(wm))

    def _after_batch(self) -> None:
        for i in self._watermarked:
            wm = self.operators[i].pending_watermark()
            if wm is not None:
                self._forward_watermark(i + 1, wm)

    def wants_input(self) -> bool:
        """True when :meth:`step` would read the input gate now (it has one, and room to write)."""
        return (self.reader is not None and not self.finished and not self._ending
                and self.output_available())

    def output_available(self) -> bool:
        return all(w.available() for w in self.writers)

    # -------------------------------------------------------------------- step
    def step(self) -> bool:
        """Do one unit of work if outputs have room. Returns True if anything happened."""
        if self.finished:
            return False
        if self._ending:
            if all(w.drained() for w in self.writers):
                self.finished = True
                self.finished_at = time.monotonic()
                return True
            return False
        if not self.output_available():
            return False
        if self._restored_finished:
            return self._step_restored_finished()
        if self._source is not None:
            batch = self._source.poll_batch(self._source_batch)
            if batch is None:
                self._finish()
                return True
            if not batch_len(batch):
                return False
            if self.first_record_at is None:
                self.first_record_at = time.monotonic()
            self.records_in += batch_len(batch)
            self._source_emit(batch)
            return True
        if self.reader is None:  # not a source and no input: nothing to do
            return False
        items = self.reader.poll()
        if not items:
            return False
        for channel, item in items:
            if isinstance(item, Watermark):
                self._on_watermark(channel, item.timestamp)
            elif isinstance(item, CheckpointBarrier):
                self._on_barrier(channel, item)
            elif isinstance(item, EndOfPartition):
                self._channels_open -= 1
                self._closed_channels.add(channel)
                self._on_watermark(channel, MAX_WATERMARK) if self._channel_watermarks else None
                if self._aligning is not None:
                    self._check_aligned()  # a channel that ended has nothing more to align
                if self._channels_open == 0:
                    self._finish()
            else:
                self.records_in += batch_len(item)
                self._emits[0](item)
                self._after_batch()
        return True

    def _step_restored_finished(self) -> bool:
        if self.reader is not None:
            for _, item in self.reader.poll():
                if isinstance(item, EndOfPartition):
                    self._channels_open -= 1
            if self._channels_open > 0:
                return False
            self.reader.close()
            self.gate.flush_credits()
        for w in self.writers:
            w.emit_event(EndOfPartition())
            w.flush()
        self._ending = True
        return True

    def _source_emit(self, batch: Any) -> None:
        # The source itself is operator 0: its batch enters operator 1.
        self._emits[1](batch)
        self._after_batch()

    def _on_watermark(self, channel: int, wm: float) -> None:
        marks = self._channel_watermarks
        if wm <= marks[channel]:
            return
        marks[channel] = wm
        low = min(marks)
        if low > self._watermark:
            self._watermark = low
            self._forward_watermark(0, low)

    # ------------------------------------------------------------ checkpoints
    def _on_barrier(self, channel: int, barrier: CheckpointBarrier) -> None:
        """Barrier ``barrier`` arrived on ``channel``: once every open channel delivered it, snapshot.

        With exactly-once alignment the reader holds each channel back behind its barrier until
        :meth:`_check_aligned` unblocks them all; at-least-once goes on reading them meanwhile.
        A barrier of a newer checkpoint abandons an alignment still in progress (that checkpoint will time
        out at the coordinator); one of an older checkpoint is stale and ignored.
        """
        current = self._aligning
        if barrier.checkpoint_id <= self.last_checkpoint:
            return
        if current is None or barrier.checkpoint_id > current.checkpoint_id:
            if current is not None and self.reader is not None:
                self.reader.unblock_all()
            self._aligning, self._barriers_seen = barrier, set()
            self._aligning_since = time.monotonic()
        elif barrier.checkpoint_id < current.checkpoint_id:
            return
        self._barriers_seen.add(channel)
        self._check_aligned()

    def _check_aligned(self) -> None:
        barrier = self._aligning
        assert barrier is not None
        if len(self._barriers_seen | self._closed_channels) < len(self._channel_watermarks):
            return
        self.alignment_seconds += time.monotonic() - self._aligning_since
        self._aligning = None
        self.checkpoint(barrier)
        if self.reader is not None:
            self.reader.unblock_all()

    def checkpoint(self, barrier: CheckpointBarrier) -> None:
        """Snapshot every operator of the chain for ``barrier`` and pass the barrier on.

        Called for a source subtask when the coordinator triggers a checkpoint, for any other once its
        barriers are aligned; between two batches, in the worker's one thread. Operators first emit
        what they hold (``prepare_snapshot``, in chain order, so it goes downstream before the barrier),
        then each gives its state; the runtime stores them (``on_snapshot``) before the barrier leaves.
        """
        if self.on_snapshot is None or barrier.checkpoint_id <= self.last_checkpoint:
            return
        if self.done_processing:  # its operators finished: nothing to snapshot, no barrier to pass on
            self.on_snapshot(self, barrier, FINISHED)
            self.last_checkpoint = barrier.checkpoint_id
            return
        for i, op in enumerate(self.operators):
            ctx = getattr(op, "ctx", None)
            if ctx is not None:
                ctx.checkpoint_id = barrier.checkpoint_id
            try:
                op.prepare_snapshot(self._emits[i + 1])
            except Exception:  # noqa: BLE001 - a user function may raise anything; it fails the job by name
                raise OperatorFailure(self.vertex.nodes[i].name, traceback.format_exc()) from None
        self.on_snapshot(self, barrier, self.snapshot_states())
        self.last_checkpoint = barrier.checkpoint_id
        for w in self.writers:
            w.emit_event(barrier)

    @property
    def done_processing(self) -> bool:
        """Its operators have finished (end of input): it only waits for its outputs to drain, if at all."""
        return self.finished or self._ending

    def restore_finished(self) -> None:
        """Restored from a checkpoint taken after this subtask had finished: its operators ran to the end
        and everything they emitted is in the state downstream. It emits nothing again: it ends its
        outputs at once (a source) or once its inputs have ended (their subtasks were finished too)."""
        self._restored_finished = True

    def snapshot_states(self) -> list[Any]:
        """Every operator's ``snapshot_state()``, in chain order (raises OperatorFailure naming the operator)."""
        states = []
        for i, op in enumerate(self.operators):
            try:
                states.append(op.snapshot_state())
            except Exception:  # noqa: BLE001 - a user function may raise anything; it fails the job by name
                raise OperatorFailure(self.vertex.nodes[i].name, traceback.format_exc()) from None
        return states

    def restore(self, states: list[Any]) -> None:
        """Give each operator back what it snapshotted (after ``open``, before the first batch)."""
        if len(states) != len(self.operators):
            msg = (f"{self.name}: the checkpoint holds {len(states)} operator states, the chain has "
                   f"{len(self.operators)} operators")
            raise ValueError(msg)
        for i, (op, state) in enumerate(zip(self.operators, states)):
            if state is None:
                continue
            try:
                op.restore_state(state)
            except Exception:  # noqa: BLE001 - a user function may raise anything; it fails the job by name
                raise OperatorFailure(self.vertex.nodes[i].name, traceback.format_exc()) from None

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        for i, op in enumerate(self.operators):
            try:
                op.notify_checkpoint_complete(checkpoint_id)
            except Exception:  # noqa: BLE001 - a user function may raise anything; it fails the job by name
                raise OperatorFailure(self.vertex.nodes[i].name, traceback.format_exc()) from None

    def fire_timers(self, now: float) -> bool:
        fired = False
        for i in self._timed:
            op = self.operators[i]
            t = op.next_timer()
            if t is not None and t <= now:
                try:
                    op.on_processing_time(now, self._emits[i + 1])
                except Exception:  # noqa: BLE001 - a user function may raise anything; it fails the job by name
                    raise OperatorFailure(self.vertex.nodes[i].name, traceback.format_exc()) from None
                fired = True
        return fired

    def next_timer(self) -> float | None:
        times = [t for t in (self.operators[i].next_timer() for i in self._timed) if t is not None]
        return min(times) if times else None

    def _finish(self) -> None:
        """End of input: close event time, let every operator flush, end the partitions."""
        start = 1 if self._source is not None else 0
        if self._watermark < MAX_WATERMARK:
            self._watermark = MAX_WATERMARK
            self._forward_watermark(start, MAX_WATERMARK)
        for i in range(start, len(self.operators)):
            try:
                self.operators[i].finish(self._emits[i + 1])
            except Exception:  # noqa: BLE001 - a user function may raise anything; it fails the job by name
                raise OperatorFailure(self.vertex.nodes[i].name, traceback.format_exc()) from None
        for w in self.writers:
            w.emit_event(EndOfPartition())
            w.flush()
        if self.reader is not None:
            self.reader.close()  # release the last buffers: their producers wait for them
            self.gate.flush_credits()
        self._ending = True

    def metrics(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        for op in self.operators:
            ctx = getattr(op, "ctx", None)
            if ctx is not None and ctx.metrics:
                for k, v in ctx.metrics.items():
                    extra[k] = extra.get(k, 0) + v
        out = {"records_in": self.records_in, "records_out": self.records_out, **extra}
        if self._source is not None:
            out["source_records"] = self.records_in
            if self.first_record_at is not None:
                out["first_record_at"] = self.first_record_at
        if self.finished_at is not None:
            out["finished_at"] = self.finished_at
        if self.writers:
            out["backpressure_seconds"] = sum(w.stats().backpressure_seconds for w in self.writers)
        return out

    def close(self) -> None:
        for op in self.operators:
            try:
                op.close()
            except Exception:  # noqa: BLE001 - closing must not mask the original failure
                pass




__all__ = ["FINISHED", "SOURCE_BATCH", "SOURCE_COLUMNAR_BYTES", "OperatorFailure", "Subtask"]
