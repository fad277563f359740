"""One job inside a worker: build its subtasks, connect its channels, run the cooperative loop.

Imports: runtime.execution (graph, task, subtask), runtime.network, runtime.memory, runtime.io,
runtime.state.backend (its stats type).
Never imports runtime.cluster or ``operators``: the worker process that hosts
a job is reached through the :class:`JobHost` protocol, and the operators
arrive pickled inside the job graph and run through runtime.execution.task.

Phases of a :class:`JobRun`: unpickle the graph; ``_deploy`` (build subtask
``i`` of every vertex, bind input gates, report their endpoints); wait for
the start with every gate's endpoint; ``_connect`` (one result partition per
output edge); ``_loop`` until every subtask finished; ``_drain`` (wait until
consumers recycled every buffer); report finished, or failed with the
operator's traceback.

The loop is single-threaded and cooperative: it steps every subtask whose
outputs have room, fires processing-time timers, flushes buffers whose
``network.buffer-timeout`` expired, keeps the host alive (heartbeats, cancel),
and otherwise waits on all its sockets at once.
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from runtime.errors import SpillError
from runtime.execution.checkpoint_area import CheckpointArea
from runtime.execution.checkpointing import CheckpointSetup, subtask_key
from runtime.execution.graph import JobGraph
from runtime.execution.process_stats import gc_timer, peak_rss_bytes, reset_peak_rss
from runtime.execution.snapshot_writer import SnapshotWriter, WrittenSnapshot
from runtime.execution.subtask import FINISHED, OperatorFailure, Subtask
from runtime.execution.task import ManagedMemory, Operator, OperatorContext
from runtime.io import IOManager
from runtime.memory.manager import MemoryManager
from runtime.memory.region import SharedRegion
from runtime.network.batch import pack_batch
from runtime.network.budget import partition_budget
from runtime.network.buffer_pool import LocalBufferPool, NetworkBufferPool
from runtime.network.events import CheckpointBarrier
from runtime.network.gate import InputGate
from runtime.network.partition import ResultPartition
from runtime.network.records import Partitioner, RecordReader, RecordWriter
from runtime.network.ring import AVAILABLE as rings_available
from runtime.state.backend import BackendStats

#: The key of a job's per-worker figures in its metrics (the other keys are subtasks, ``name[index]``).
WORKER_METRICS = "__worker__"


def managed_shares(operators: list[Operator], *, budget: int, page_size: int,
                   state_backend: str = "heap") -> dict[int, int]:
    """Each stateful operator's share of a worker's managed ``budget``: ``id(op) -> bytes``.

    Shares are proportional to :attr:`Operator.managed_memory_weight` (Flink's
    use-case weights), whole pages, and together never above the budget.
    Operators of weight 0 get nothing (and are absent); so do operators whose
    managed memory would hold keyed state (:attr:`Operator.keyed_state`) unless
    ``state_backend`` is ``"managed"``.
    """
    weights = {id(op): op.managed_memory_weight for op in operators if op.managed_memory_weight > 0
               and (state_backend == "managed" or not op.keyed_state)}
    total = sum(weights.values())
    if not total or budget < page_size:
        return {}
    return {key: budget * weight // total // page_size * page_size for key, weight in weights.items()}


@dataclass(frozen=True)
class SubtaskCounters:
    """One subtask's cumulative counters (the stats block's subtask record, runtime.web.stats_block).

    ``busy_ns``: time in its steps, less ``backpressured_ns`` (blocked for want of a credit or a
    buffer). ``idle_ns``: the rest of the time since the job started. The worker's subtasks share one
    thread, so a subtask is idle also while another one works.
    """

    vertex: int
    index: int
    records_in: int
    records_out: int
    busy_ns: int
    backpressured_ns: int
    idle_ns: int
    out_pool_usage: float  # 0..1: buffers of its output partitions' pools in use
    in_pool_usage: float  # 0..1: floating buffers its input gate has lent
    finished: bool
    managed_bytes: int = 0  # managed memory its operators hold now
    managed_peak: int = 0  # the sum of its operators' peaks in this job
    spilled_bytes: int = 0  # its operators' ``spilled_bytes`` metric


@dataclass(frozen=True)
class JobCounters:
    """What a running job reports to its worker's stats block: each subtask's counters, bytes spilled."""

    subtasks: list[SubtaskCounters]
    spilled_bytes: int  # written to spill files by the job's IOManager so far


class JobCancelled(Exception):
    """Raised inside a job's loop when its host was told to cancel the job or shut down."""


class CheckpointControl(Protocol):
    """What the host calls when a checkpoint message of the running job arrives (possibly inside one of the
    job's waits: an implementation only queues it)."""

    def trigger_checkpoint(self, checkpoint_id: int, timestamp: float) -> None: ...

    def checkpoint_done(self, checkpoint_id: int) -> None: ...


class JobHost(Protocol):
    """What a job needs of the worker process that runs it (implemented by runtime.cluster.worker.Worker).

    Ownership: the host owns the region mapping, the network buffer pool and
    the managed memory; a job borrows them for its lifetime.
    """

    worker_id: int
    region: SharedRegion | None
    network: NetworkBufferPool | None
    memory: MemoryManager | None

    @property
    def control_socket(self) -> zmq.Socket[bytes]:
        """The socket control messages arrive on; the job's loop polls it with its data sockets."""

    def keep_alive(self, now: float) -> None:
        """Heartbeat when due and act on control messages. Raises JobCancelled on cancel or shutdown.

        Every wait of a job calls it at least every ``KEEP_ALIVE_INTERVAL`` (0.1 s): the loop once per
        round, gates and partitions from inside their waits (see ``JobRun._keep_alive``).
        """

    def wait_start(self, job_id: str) -> dict[str, list[str]]:
        """Block (heartbeating) until the job may start; returns every gate's endpoints by vertex id.

        Raises:
            JobCancelled: the job was cancelled or the worker told to shut down meanwhile.
        """

    def report_deployed(self, job_id: str, gates: dict[str, str]) -> None: ...

    def report_finished(self, job_id: str, metrics: dict[str, Any]) -> None: ...

    def report_failed(self, job_id: str, operator: str, traceback: str) -> None: ...

    def send_to_client(self, job_id: str, sink_id: str, records: bytes, checkpoint: int = 0) -> None:
        """Ship a ``collect()`` batch; ``checkpoint``: the checkpoint that covers it (0: no checkpoints)."""

    def ack_checkpoint(self, job_id: str, checkpoint: int, subtask: str, state: list[Any],
                       alignment_seconds: float, snapshot_seconds: float, source_position: Any = None,
                       shared_memory: list[int] | None = None, depends_on: int = 0) -> None:
        """Tell the coordinator that ``subtask`` snapshotted ``checkpoint``: its state file's handle ([]: finished),
        for a source its position, where its blob lies in the region (``[offset, bytes]``; None: nowhere), and
        the oldest checkpoint whose files it needs (0: none but its own)."""

    def set_job_control(self, job: CheckpointControl | None) -> None:
        """Install (or clear, with None) the job the host hands checkpoint messages to as they arrive."""

    def set_progress(self, progress: Any) -> None:
        """Install (or clear, with None) a callable: operator chain -> [records in, records out]."""

    def set_state_report(self, report: Callable[[], dict[str, BackendStats]] | None) -> None:
        """Install (or clear, with None) a callable: owner of managed pages -> the stats of the state backend
        kept in them (the host reports them while the job runs)."""

    def set_counters(self, counters: Callable[[], JobCounters] | None) -> None:
        """Install (or clear, with None) a callable: every subtask's counters now (the host publishes them
        in its stats block a few times a second)."""


class JobRun:
    """One job on one worker: its subtasks, gates, writers and the loop that drives them.

    Ownership: the job owns the local buffer pools it creates from the host's
    network pool (destroyed in ``_close``) and every managed page its
    operators take (released per owner in ``_close``); the host keeps the
    pools themselves.
    Process: the worker process, its one thread.
    """

    def __init__(self, host: JobHost, job_id: str, payload: bytes, config: dict[str, Any],
                 checkpointing: CheckpointSetup | None = None) -> None:
        if host.region is None or host.network is None or host.memory is None:
            msg = f"worker {host.worker_id} cannot run job {job_id}: its arena is not set up (no welcome yet)"
            raise RuntimeError(msg)
        self.host = host
        self.network: NetworkBufferPool = host.network
        self.memory: MemoryManager = host.memory
        self.job_id = job_id
        self._payload: bytes | None = payload  # pickled; unpickled in run(), where failures are reported
        self.graph: JobGraph  # unpickled in run(), where a failure is reported
        self.config: dict[str, Any] = config
        self.checkpointing = checkpointing or CheckpointSetup()
        self._control: list[CheckpointBarrier | int] = []  # triggers and completed ids, handled between steps
        self._last_trigger: CheckpointBarrier | None = None
        self._epochs: dict[str, int] = {}  # subtask key -> the checkpoint its sinks' output belongs to now
        self._checkpoints_acked = 0
        self._current: str | None = None  # the operator chain running now, for failure reports
        self.subtasks: list[Subtask] = []
        self.gates: dict[int, InputGate] = {}
        self.partitions: list[ResultPartition] = []
        self.pools: list[LocalBufferPool] = []
        self.writers: list[RecordWriter] = []
        self._gc_before = 0.0
        self._started_ns = time.perf_counter_ns()  # reset when the run starts (SubtaskCounters.idle_ns)
        self._gc_collections_before = 0
        self._io_manager: IOManager | None = None
        self._managed: list[ManagedMemory] = []  # every operator's managed share, for the state report
        self._restore_seconds = 0.0  # reading and decoding the restored checkpoint's files, restoring the operators
        setup = self.checkpointing
        area = CheckpointArea(*setup.area) if setup.enabled and setup.area and setup.area[1] > 0 else None
        if area is not None and setup.restore_shared:  # keep the blobs restored from until a checkpoint completes
            area.reserve([(offset, nbytes) for offset, nbytes in setup.restore_shared.values()])
        self._snapshots = SnapshotWriter(setup.directory, area, setup.region_view)

    # ------------------------------------------------------------------ phases
    def run(self) -> None:
        reset_peak_rss()  # this job's peak, not the largest of every job this worker ran
        self.memory.reset_peaks()
        self._started_ns = time.perf_counter_ns()
        self._gc_before = gc_timer().seconds
        self._gc_collections_before = gc_timer().collections
        thresholds: tuple[int, ...] | None = None  # the process's GC thresholds, restored after the job
        self.host.set_progress(lambda: {st.vertex.name: [st.records_in, st.records_out] for st in self.subtasks})
        self.host.set_state_report(self._state_report)
        self.host.set_counters(self.counters)
        self.host.set_job_control(self)
        try:
            import cloudpickle  # the job graph arrives pickled (its HMAC was verified on receipt)
            gc.disable()  # a graph may hold millions of records (from_collection): no collections while they load
            try:
                self.graph = cloudpickle.loads(self._payload)
            finally:
                gc.enable()
            self._payload = None
            gc.freeze()  # the graph lives as long as the job: keep it out of every collection until then
            thresholds = gc.get_threshold()
            gc.set_threshold(int(self.config.get("python.gc.young-threshold", thresholds[0])), *thresholds[1:])
            self._deploy()
            self._connect(self.host.wait_start(self.job_id))
            self._loop()
            self._drain()
            self._snapshots.poll(wait=True)
            self.host.report_finished(self.job_id, self._metrics())
        except JobCancelled:
            pass
        except OperatorFailure as exc:
            self.host.report_failed(self.job_id, exc.operator, exc.traceback)
        except Exception as exc:  # noqa: BLE001 - runtime failure: report it with its traceback
            self.host.report_failed(self.job_id, self._current or "runtime",
                                      "".join(traceback.format_exception(exc)))
        finally:
            self.host.set_progress(None)
            self.host.set_state_report(None)
            self.host.set_counters(None)
            self.host.set_job_control(None)
            self._close()
            gc.unfreeze()
            if thresholds is not None:
                gc.set_threshold(*thresholds)

    def _keep_alive(self) -> None:
        """The callback of every gate, partition and long-running operator (OperatorContext.keep_alive) of
        this job: heartbeat, and raise JobCancelled on cancel or shutdown."""
        self.host.keep_alive(time.monotonic())

    def _deploy(self) -> None:
        w = self.host
        cfg = self.config
        mode = self.graph.mode
        gates: dict[str, str] = {}
        index = w.worker_id
        mine = [v for v in self.graph.vertices if index < v.parallelism]
        chains = {v.id: [self._instantiate(node, index) for node in v.nodes] for v in mine}
        shares = managed_shares([op for ops in chains.values() for op in ops], budget=self.memory.budget,
                                state_backend=cfg.get("state.backend", "heap"),
                                page_size=self.memory.page_size)
        for vertex in mine:
            self._current = vertex.name
            operators = chains[vertex.id]
            gate = None
            if vertex.inputs:
                channels = self.graph.gate_channels(vertex)
                gate = InputGate(channels, exclusive=cfg["network.buffers-per-channel"],
                                 floating=cfg["network.floating-buffers-per-gate"],
                                 name=f"{vertex.name}[{index}]", region=w.region,
                                 endpoint="tcp://127.0.0.1:*" if cfg["network.transport"] == "tcp" else None,
                                 keep_alive=self._keep_alive)
                self.gates[vertex.id] = gate
                gates[str(vertex.id)] = gate.endpoint

            def ctx_factory(name: str, subtask: int, parallelism: int, op: Operator,
                            vertex_id: int = vertex.id) -> OperatorContext:
                share = shares.get(id(op), 0)
                managed = (ManagedMemory(self.memory, f"{name}[{subtask}]", share, self._io) if share else None)
                if managed is not None:
                    self._managed.append(managed)
                return OperatorContext(operator_name=name, subtask_index=subtask, parallelism=parallelism,
                                       worker_id=w.worker_id, mode=mode, memory=self.memory, managed=managed,
                                       send_to_client=self._client_sender(subtask_key(vertex_id, subtask)),
                                       keep_alive=self._keep_alive,
                                       checkpointing=self.checkpointing.enabled,
                                       state_backend=cfg.get("state.backend", "heap"),
                                       max_parallelism=cfg.get("pipeline.max-parallelism", 128))

            st = Subtask(self.graph, vertex, index, operators, gate=gate, ctx_factory=ctx_factory)
            if gate is not None:
                st.attach_input(RecordReader(gate, max_record_size=cfg["network.max-record-size"],
                                             align=self.checkpointing.align),
                                self.graph.gate_channels(vertex))
            if self.checkpointing.enabled:
                st.on_snapshot = self._on_snapshot
            if self.checkpointing.restore_dir:
                self._current = vertex.name
                restore_started = time.monotonic()
                states = self.checkpointing.restored_states(subtask_key(vertex.id, index))
                if states is None:
                    st.restore_finished()
                else:
                    st.restore(states)
                self._restore_seconds += time.monotonic() - restore_started
            self.subtasks.append(st)
        self._current = None
        self.host.report_deployed(self.job_id, gates)

    def counters(self) -> JobCounters:
        """Every subtask's counters now, and bytes spilled. Cheap: a few reads per subtask, no I/O."""
        now = time.perf_counter_ns()
        out = []
        for st in self.subtasks:
            blocked = int(sum(w.partition.stats().backpressure_seconds for w in st.writers) * 1e9)
            step = st.step_ns
            pools = [w.partition.pool.stats() for w in st.writers]
            held = sum(p.max for p in pools)
            out_usage = sum(p.in_use for p in pools) / held if held else 0.0
            gate = st.gate
            floating = gate.floating_total if gate is not None else 0
            in_usage = (floating - gate.floating_free) / floating if gate is not None and floating else 0.0
            held = peak = spilled = 0
            for op in st.operators:
                ctx = getattr(op, "ctx", None)
                if ctx is None:
                    continue
                if ctx.managed is not None:
                    now_held, most = self.memory.owner_figures(ctx.managed.owner)
                    held, peak = held + now_held, peak + most
                if ctx.metrics:
                    spilled += int(ctx.metrics.get("spilled_bytes", 0))
            out.append(SubtaskCounters(
                st.vertex.id, st.index, st.records_in, st.records_out, max(0, step - blocked), min(blocked, step),
                max(0, now - self._started_ns - step), out_usage, in_usage, st.finished, held, peak, spilled))
        io = self._io_manager
        return JobCounters(out, io.stats().bytes_written if io is not None else 0)

    def _state_report(self) -> dict[str, BackendStats]:
        """The stats of each managed state backend now, by the owner of its managed pages (``name[subtask]``,
        as the arena's blocks name them). Not always cheap: see ``ManagedMemory.state_stats``."""
        return {m.owner: stats for m in self._managed if (stats := m.state_stats()) is not None}

    def _io(self) -> IOManager:
        """The job's IOManager, created on first use in one of ``io.tmp-dirs`` (closed in ``_close``)."""
        if self._io_manager is None:
            dirs = self.config["io.tmp-dirs"]
            directory = dirs[self.host.worker_id % len(dirs)]  # spread workers over the directories, as Flink
            try:
                self._io_manager = IOManager(directory, threads=2)
            except SpillError as exc:
                msg = (f"cannot spill: io.tmp-dirs entry {directory} cannot hold the job's spill directory "
                       f"({exc.__cause__ or exc}); set io.tmp-dirs to a writable directory with free space")
                raise SpillError(msg) from exc
        return self._io_manager

    def _instantiate(self, node: Any, index: int) -> Any:
        op = node.operator
        if node.is_source and callable(getattr(op, "split", None)) and node.split_for != index:
            return op.split(node.parallelism)[index]  # the whole source arrived (a standing cluster's job)
        return op

    def _connect(self, gate_endpoints: dict[str, list[str]]) -> None:
        """Create one result partition per output edge, connected to every target subtask's gate."""
        cfg = self.config
        # Without the compiled ring (no C compiler at install) local channels send their bytes instead.
        transport = "shm" if cfg["network.transport"] != "tcp" and rings_available else "tcp"
        for st in self.subtasks:
            for edge in st.vertex.outputs:
                target = self.graph.vertex(edge.target)
                endpoints = gate_endpoints[str(target.id)]
                if edge.partitioning == "forward":
                    targets = [st.index]
                else:
                    targets = list(range(target.parallelism))
                channel_id = edge.channel_offset + (0 if edge.partitioning == "forward" else st.index)
                n = len(targets)
                budget = partition_budget(n, buffers_per_channel=cfg["network.buffers-per-channel"],
                                          floating_per_gate=cfg["network.floating-buffers-per-gate"])
                pool = self.network.create_buffer_pool(budget.guaranteed, budget.maximum,
                                                    name=f"{st.vertex.name}[{st.index}]->{target.id}")
                self.pools.append(pool)
                part = ResultPartition(pool, [endpoints[t] for t in targets], channel_ids=channel_id,
                                       transport=transport, name=f"{st.vertex.name}[{st.index}]",
                                       max_backlog=budget.max_backlog_per_channel, keep_alive=self._keep_alive)
                self.partitions.append(part)
                writer = RecordWriter(part, Partitioner(edge.partitioning, n, key_fn=edge.key_fn,
                                                        columnar_key=edge.columnar_key),
                                      buffer_timeout=cfg["network.buffer-timeout"],
                                      max_record_size=cfg["network.max-record-size"])
                st.writers.append(writer)
                self.writers.append(writer)
        for gate in self.gates.values():  # heartbeating, and ending at once on cancel (gate.keep_alive)
            gate.wait_connected(timeout=60)

    # -------------------------------------------------------------------- loop
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.host.control_socket, zmq.POLLIN)
        for gate in self.gates.values():
            poller.register(gate.socket, zmq.POLLIN)
        for part in self.partitions:
            for ch in part.channels:
                poller.register(ch.socket, zmq.POLLIN)
            if part.doorbell is not None:  # tcp: buffers zmq let go of are back; ship_all drains it
                poller.register(part.doorbell, zmq.POLLIN)
        pending = [st for st in self.subtasks if not st.finished]
        while pending:
            now = time.monotonic()
            progressed = False
            if self._control:
                self._handle_control()
            for st in pending:
                self._current = st.vertex.name
                began = time.perf_counter_ns()
                if st.step():
                    progressed = True
                if st.fire_timers(time.time()):
                    progressed = True
                st.step_ns += time.perf_counter_ns() - began  # busy + backpressured time (SubtaskCounters)
            self._current = None
            if self._snapshots.pending:
                self._snapshots.poll()
            if self._last_trigger is not None:
                self._ack_finished()
            for writer in self.writers:
                writer.flush_if_due(now)
                writer.partition.ship_all()
            pending = [st for st in pending if not st.finished]
            self.host.keep_alive(now)
            if not progressed and pending:
                if self._park():
                    try:
                        poller.poll(int(self._idle_wait(pending, now) * 1000))
                    finally:
                        self._unpark()
                else:
                    os.sched_yield()  # a peer is streaming: look again soon, letting others run meanwhile

    def _park(self) -> bool:
        """Nothing progressed: park in the rings of every gate whose subtask would read and every partition
        that waits for credits or buffers, so that a peer publishing there wakes this loop with one message.
        Every gate takes what its socket holds (a late wake-up left there would keep the poller awake).
        False (parked nowhere) when something arrived meanwhile: do not sleep."""
        for st in self.subtasks:
            if st.gate is not None and not st.gate.park(reading=st.wants_input()):
                self._unpark()
                return False
        for part in self.partitions:
            if not part.park():
                self._unpark()
                return False
        return True

    def _unpark(self) -> None:
        for gate in self.gates.values():
            gate.unpark()
        for part in self.partitions:
            part.unpark()

    def _idle_wait(self, pending: list[Subtask], now: float) -> float:
        wait = 0.05
        for st in pending:
            t = st.next_timer()
            if t is not None:
                wait = min(wait, max(0.0, t - time.time()))
        for writer in self.writers:
            due = writer.next_flush_due()
            if due is not None:
                wait = min(wait, max(0.0, due - now))
        return wait

    def _drain(self) -> None:
        """Every subtask finished: ship what is left and wait until consumers recycled it all."""
        for writer in self.writers:
            writer.flush()
        deadline = time.monotonic() + 60
        for part in self.partitions:
            while part.stats().in_flight:
                if time.monotonic() > deadline:
                    msg = f"{part.name}: consumers did not recycle {part.stats().in_flight} buffers in 60s"
                    raise TimeoutError(msg)
                self.host.keep_alive(time.monotonic())
                for gate in self.gates.values():
                    gate.flush_credits()
                part._wait_control(0.05)

    def _client_sender(self, key: str) -> Callable[[str, Any], None]:
        """The ``send_to_client`` of subtask ``key``'s operators: batches tagged with the checkpoint that will
        cover them, so that the coordinator releases them only once it completed (exactly-once collect)."""
        self._epochs[key] = self.checkpointing.first_checkpoint() if self.checkpointing.enabled else 0

        def send(sink_id: str, batch: Any) -> None:
            self.host.send_to_client(self.job_id, sink_id, pack_batch(batch), self._epochs[key])
        return send

    # ------------------------------------------------------------ checkpoints
    def trigger_checkpoint(self, checkpoint_id: int, timestamp: float) -> None:
        """CheckpointControl: queued, acted on between steps."""
        self._control.append(CheckpointBarrier(checkpoint_id, timestamp))

    def checkpoint_done(self, checkpoint_id: int) -> None:
        """CheckpointControl: queued, acted on between steps."""
        self._control.append(checkpoint_id)

    def _handle_control(self) -> None:
        """Act on the checkpoint messages that arrived: a barrier to trigger at the sources, or the id of a
        checkpoint that completed. Subtasks that have finished acknowledge a triggered checkpoint at once."""
        queued, self._control = self._control, []
        for item in queued:
            if isinstance(item, CheckpointBarrier):
                self._last_trigger = item
                for st in self.subtasks:
                    if st.vertex.is_source or st.done_processing:
                        self._current = st.vertex.name
                        st.checkpoint(item)
            else:
                self._snapshots.completed(item)
                for st in self.subtasks:
                    self._current = st.vertex.name
                    st.notify_checkpoint_complete(item)
        self._current = None

    def _ack_finished(self) -> None:
        """A subtask that finished after the last trigger (its inputs ended before that checkpoint's
        barriers could reach it) acknowledges it as finished."""
        barrier = self._last_trigger
        if barrier is None:
            return
        for st in self.subtasks:
            if st.done_processing and st.last_checkpoint < barrier.checkpoint_id:
                st.checkpoint(barrier)

    def _on_snapshot(self, st: Subtask, barrier: CheckpointBarrier, states: list[Any]) -> None:
        """Subtask ``st`` snapshotted ``barrier``'s checkpoint: copy it into a blob, have its file written, and
        acknowledge it once the file is durable (from the loop: ``SnapshotWriter.poll``). From here on, the
        subtask's output belongs to the next checkpoint."""
        key = subtask_key(st.vertex.id, st.index)
        self._epochs[key] = barrier.checkpoint_id + 1
        position = states[0] if st.vertex.is_source and states is not FINISHED else None
        alignment = st.alignment_seconds
        if states is FINISHED:
            self._checkpoints_acked += 1
            self.host.ack_checkpoint(self.job_id, barrier.checkpoint_id, key, [], alignment, 0.0, position)
            return

        def acknowledge(written: WrittenSnapshot) -> None:
            self._checkpoints_acked += 1
            self.host.ack_checkpoint(self.job_id, written.checkpoint_id, key, written.handle, alignment,
                                     written.copy_seconds, position, written.shared_memory, written.depends_on)

        self._snapshots.submit(barrier.checkpoint_id, key, states, f"{st.vertex.name}[{st.index}]", acknowledge)

    def _metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for st in self.subtasks:
            out[f"{st.vertex.name}[{st.index}]"] = st.metrics()
        out[WORKER_METRICS] = {
            "peak_rss_bytes": peak_rss_bytes(),
            "gc_pause_seconds": gc_timer().seconds - self._gc_before,
            "gc_collections": gc_timer().collections - self._gc_collections_before,
            "network_peak_bytes": sum(p.stats().peak_in_use for p in self.pools) * self.network.buffer_size,
            "managed_peak_bytes": self.memory.stats().high_water_mark,
            "restore_seconds": self._restore_seconds,
            "restored_from_memory": self.checkpointing.restored_from_memory,
            "restored_from_files": self.checkpointing.restored_from_files,
            "snapshot_blobs_in_memory": self._snapshots.blobs_in_memory,
            "snapshot_blobs_on_heap": self._snapshots.blobs_on_heap,
        }
        return out

    def _close(self) -> None:
        self._snapshots.close()  # a write in progress reads managed pages' copies in the region: finish it first
        for st in self.subtasks:
            st.close()
        for writer in self.writers:
            writer.close()
        for part in self.partitions:
            part.close()
        for gate in self.gates.values():
            gate.close()
        for pool in self.pools:
            pool.destroy()
        for owner in list(self.memory.owners()):
            self.memory.release_all(owner)
        if self._io_manager is not None:
            self._io_manager.close()  # removes the job's spill directory and every file in it
            self._io_manager = None


__all__ = ["WORKER_METRICS", "JobCancelled", "JobCounters", "JobHost", "JobRun", "SubtaskCounters", "managed_shares"]
