"""The coordinator (Flink's JobManager + ResourceManager): owns the region, grants arenas, runs jobs.

Imports: runtime.memory, runtime.cluster.protocol, runtime.execution.graph, runtime.network
(transport), runtime.errors. Never imports ``operators``.

The coordinator alone creates, carves and unlinks the shared region. Each
worker that registers is granted an arena (one buddy block of
``MemoryPlan.arena_bytes``) and reclaimed when it leaves or dies. A job runs
in three steps: ``deploy`` the pickled job graph to every worker (each builds
subtask ``i`` of every vertex and binds its input gates), ``start`` once every
gate's endpoint is known, then wait for ``finished`` from every worker while
relaying ``collect`` batches to the client. A ``failed`` message, a worker
process that exits, or a worker that misses its heartbeats fails the job with
:class:`JobFailedError`; the other workers are told to ``cancel``.

:class:`LocalCluster` is the embedded cluster behind ``StreamEnvironment(workers=N)``
and ``shmflow run``: a coordinator in the calling process plus N worker
processes. Once every worker has attached, it unlinks the region's name
early, so even a SIGKILL of every process leaves nothing in /dev/shm.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle
import zmq

from runtime.checkpoint import CheckpointStorage, default_checkpoints_dir, load_checkpoint
from runtime.cluster import protocol as control
from runtime.cluster.checkpoints import CheckpointCoordinator, graph_fingerprint, job_directory_name
from runtime.cluster.protocol import (
    Ack,
    AckCheckpoint,
    Attached,
    Cancel,
    CheckpointDone,
    ClusterLayout,
    Collect,
    Deploy,
    Deployed,
    Failed,
    Finished,
    Heartbeat,
    Inspect,
    JobError,
    JobSucceeded,
    Message,
    Register,
    Results,
    Running,
    Shutdown,
    Start,
    Submit,
    Welcome,
)
from runtime.cluster.restart import RestartStrategy, restart_strategy
from runtime.errors import (
    CheckpointError,
    InsufficientNetworkBuffersError,
    JobCancelledError,
    JobFailedError,
    OutOfMemoryError,
    ProtocolError,
    WorkerLostError,
)
from runtime.execution.graph import JobGraph
from runtime.memory import BuddyAllocator, MemorySegment, SharedRegion, format_bytes
from runtime.memory.layout import AllocatorSnapshot
from runtime.memory.region import process_alive, process_start_ticks
from runtime.network.budget import job_buffers_required
from runtime.network.transport import bind, context, local_endpoint, make_socket
from runtime.web.stats_block import area_bytes
from runtime.web.view import CANCELED, FAILED, FINISHED, JobRecord, WorkerInfo

if TYPE_CHECKING:
    from runtime.config import ShmflowConfig

log = logging.getLogger("shmflow.coordinator")

#: The key of a job's own figures (checkpoints, restarts) in run_job's result, under worker id -1.
JOB_METRICS = "__job__"
#: ``JOB_METRICS["attempts"]``: one dict per run of the job, in order, of ``time.monotonic()`` instants (system-wide,
#: so they subtract from a time taken in another process) and, for a restart, what it restored:
#: ``restored_checkpoint`` (its id, 0: none) and ``restored_bytes`` (its state files' size); ``workers_replaced_at``
#: (every lost worker was started again and registered) and ``workers_attached_at`` (every worker the job needs
#: has attached); ``deploy_at`` (Deploy sent), ``deployed_at`` (every worker built and restored its subtasks),
#: ``started_at`` (Start sent); then ``failed_at`` (the failure was detected) or ``finished_at``. The sources'
#: first record of a run is its subtasks' ``first_record_at``.
ATTEMPT_TIMES = "attempts"
#: Ended jobs whose records (graph, final figures) the dashboard and REST API keep (Flink's
#: jobstore.max-capacity, smaller: a record holds its job graph, collections included).
KEEP_FINISHED_JOBS = 16
HEARTBEAT_TIMEOUT = 30.0  # seconds of silence after which a worker counts as lost (a busy step can be long)
STARTUP_TIMEOUT = 60.0


def _exitcode(proc: subprocess.Popen[bytes] | None) -> int | None:
    """The exit code of a worker process this coordinator started, None while it runs (or not ours)."""
    return None if proc is None else proc.poll()


@dataclass
class WorkerHandle:
    """The coordinator's view of one worker."""

    worker_id: int
    identity: bytes
    pid: int
    last_heard: float  # the coordinator's clock when this worker was last heard from
    arena: MemorySegment | None = None
    attached: bool = False
    progress: dict[str, list[int]] | None = None  # from the last heartbeat: chain -> [records in, out]
    arena_layout: list[Any] | None = None  # the arena's blocks as the worker last reported them (AllocatorSnapshot)
    state_layout: dict[str, list[Any]] = field(default_factory=dict)  # owner -> its state backend's last stats
    process: subprocess.Popen[bytes] | None = None  # the worker's process when this coordinator started it
    #: The worker's process start time when it runs on this host in this pid namespace (its Register said so
    #: and /proc agrees): its death is then seen at once, not after HEARTBEAT_TIMEOUT.
    local_start_ticks: int | None = None

    def exited(self) -> bool:
        """Whether the worker's process is known to be gone (started by us, or local and not alive)."""
        if self.process is not None:
            return self.process.poll() is not None
        return self.local_start_ticks is not None and not process_alive(self.pid, self.local_start_ticks)


@dataclass
class _Watch:
    """One run of a job as :meth:`Coordinator._watch` follows it."""

    job: str  # this run's id (each restart is a new run)
    participants: dict[int, WorkerHandle]
    collector: _Committer
    checkpoints: CheckpointCoordinator | None
    deadline: float | None
    job_id: str = ""  # the JobRecord's id, which a cancel request names


class _Committer:
    """``collect()`` batches on their way to the client (Flink's two-phase commit, for collect).

    Without checkpoints a batch goes on at once. With them, a batch carries
    the checkpoint that covers it (the first one its sink subtask takes after
    sending it) and is held until that checkpoint completes, or the job
    ends; a restart drops what the checkpoint it resumes from does not cover
    (those records come again). Memory: at most one interval's output.
    """

    def __init__(self, deliver: Callable[[str, bytes], None], *, enabled: bool) -> None:
        self.deliver, self.enabled = deliver, enabled
        self._held: list[tuple[int, str, bytes]] = []

    def add(self, sink: str, records: bytes, checkpoint: int) -> None:
        if not self.enabled or checkpoint <= 0:
            self.deliver(sink, records)
        else:
            self._held.append((checkpoint, sink, records))

    def commit(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` completed: what it covers goes to the client, in arrival order."""
        held, keep = self._held, []
        for item in held:
            if item[0] <= checkpoint_id:
                self.deliver(item[1], item[2])
            else:
                keep.append(item)
        self._held = keep

    def rewind(self, restored_id: int) -> None:
        """A restart from checkpoint ``restored_id`` (0: from the beginning): drop what it does not cover."""
        self._held = [item for item in self._held if item[0] <= restored_id]

    def release_all(self) -> None:
        """The job finished: everything it collected is final."""
        held, self._held = self._held, []
        for _, sink, records in held:
            self.deliver(sink, records)


def check_restore_point(graph: JobGraph, path: str) -> tuple[int, str]:
    """The id and directory of the checkpoint at ``path`` (a ``chk-<n>`` directory or its ``_metadata``),
    checked intact and taken of this job graph.

    Raises:
        CheckpointError: missing, corrupt or truncated (names the file), or of another job graph (names
            the operators that do not match).
    """
    restored = load_checkpoint(path)
    mismatches = restored.metadata.graph_mismatches(graph_fingerprint(graph))
    if mismatches:
        msg = (f"checkpoint {restored.directory} does not fit job {graph.name!r}: " + "; ".join(mismatches))
        raise CheckpointError(msg)
    return restored.checkpoint_id, str(restored.directory)


class Coordinator:
    """Owns the region and its global allocator; registers workers and runs jobs on them.

    Ownership: the coordinator allocates one arena per worker from the global
    allocator (``grant``) and frees it when the worker is gone (``reclaim``);
    nothing else is allocated from the global range. Only the coordinator
    unlinks the region.
    Process: the coordinator process, one thread. The web server's threads
    (runtime.web) only read ``jobs``, ``worker_infos()`` and ``region_snapshot()``,
    whose values this thread replaces whole, and call ``request_cancel()``.
    """

    def __init__(self, config: ShmflowConfig, *, endpoint: str | None = None, secret: bytes | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # heartbeat bookkeeping only; tests inject a fake one
        self.config = config
        self.plan = config.memory_plan()
        self.secret = secret or control.new_secret()
        self.region = SharedRegion.create(self.plan.shm_bytes, stats_bytes=area_bytes(config.workers))
        try:
            self.allocator = BuddyAllocator(self.region, config.min_block)
            self.ctx = context()
            self.sock = make_socket(self.ctx, zmq.ROUTER)
            self.sock.router_mandatory = True
            endpoint = endpoint or local_endpoint("ipc")
            # tcp: CURVE with keys from the secret, so a peer without it cannot deliver a byte; any: a size bound
            control.secure_server(self.sock, self.secret, endpoint, max_message_size=config.max_message_size)
            self.endpoint = bind(self.sock, endpoint)
        except BaseException:
            self.region.close()
            raise
        self.workers: dict[int, WorkerHandle] = {}
        #: Per worker slot: its checkpoint area (state.checkpoints.shared-memory.size). Kept when the worker
        #: dies, so that its replacement reads the last checkpoint's blobs there; freed with the region.
        self.checkpoint_areas: dict[int, MemorySegment] = {}
        self._by_identity: dict[bytes, WorkerHandle] = {}
        self.refused = 0  # messages that failed authentication
        self._on_tick: Callable[[], None] | None = None
        self._next_tick = 0.0
        self.current_job: str | None = None  # the name of the job running now
        #: Starts a replacement for a lost worker id (the embedded cluster's); None: wait for one to register.
        self.replace_worker: Callable[[int], None] | None = None
        #: Every job run here, by id (runtime.web.view.ClusterView: the web server reads them from its threads).
        self.jobs: dict[str, JobRecord] = {}
        self._next_view = 0.0  # when _watch next copies the checkpoints' figures into the JobRecord
        self._cancel_requests: set[str] = set()  # added to by request_cancel (any thread), polled by _watch
        self._region_snapshot = AllocatorSnapshot.of(self.allocator)  # replaced whenever an arena is granted/freed
        #: worker id -> (the arena layout last parsed, its snapshot); the web server's threads only
        self._parsed_arenas: dict[int, tuple[list[Any], AllocatorSnapshot]] = {}

    # ------------------------------------------------------ runtime.web.view.ClusterView
    @property
    def stats_area(self) -> memoryview:
        return self.region.stats_area

    def region_snapshot(self) -> AllocatorSnapshot:
        return self._region_snapshot

    def worker_infos(self) -> list[WorkerInfo]:
        now = self.clock()
        infos = []
        for wid, h in sorted(list(self.workers.items())):
            layout = h.arena_layout  # a heartbeat replaces the list when the arena changed: parse each once
            cached = self._parsed_arenas.get(wid)
            if layout and (cached is None or cached[0] is not layout):
                cached = self._parsed_arenas[wid] = (layout, AllocatorSnapshot.from_wire(layout))
            infos.append(WorkerInfo(wid, h.pid, cached[1] if layout and cached else None, dict(h.state_layout),
                                    now - h.last_heard))
        return infos

    def request_cancel(self, job_id: str) -> bool:
        record = self.jobs.get(job_id)
        if record is None or record.end_time:
            return False
        self._cancel_requests.add(job_id)
        return True

    # ---------------------------------------------------------------- messaging
    def send(self, handle: WorkerHandle, message: Message) -> None:
        self.send_to(handle.identity, message)

    def send_to(self, identity: bytes, message: Message) -> None:
        """Send to any peer (worker or client) by its ROUTER identity; a peer that is gone is ignored."""
        try:
            control.send(self.sock, self.secret, message, identity=identity)
        except zmq.ZMQError as exc:  # peer gone (router_mandatory): a worker's loss is detected separately
            log.debug("could not send %s to peer %s: %s", message.TYPE, identity.hex(), exc)

    def broadcast(self, message: Message) -> None:
        for handle in list(self.workers.values()):
            self.send(handle, message)

    def poll(self, timeout: float) -> tuple[bytes, Message] | None:
        """One authenticated message, or None on timeout. Unauthenticated ones are logged and dropped."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        received = control.recv_from(self.sock, self.secret)
        if received is None:
            self.refused += 1
            return None
        identity, message = received
        handle = self._by_identity.get(identity)
        if handle is not None:
            handle.last_heard = self.clock()
        if isinstance(message, Register):
            self._on_register(identity, message)
            return None
        if isinstance(message, Attached):
            if handle is not None:
                handle.attached = True
            return None
        if isinstance(message, Heartbeat):
            if handle is not None:
                handle.progress = message.progress
                if message.arena is not None:
                    handle.arena_layout = message.arena
                if message.state is not None:
                    handle.state_layout = message.state
                self.send(handle, Ack())  # lets the worker tell a live coordinator from a dead one
            return None
        if isinstance(message, Inspect):  # answered while idle and while a job runs
            workers = [[wid, h.pid, h.arena_layout] for wid, h in sorted(self.workers.items())]
            state = {wid: h.state_layout for wid, h in sorted(self.workers.items()) if h.state_layout}
            self.send_to(identity, ClusterLayout(region=AllocatorSnapshot.of(self.allocator).to_wire(),
                                                 workers=workers, job=self.current_job, state=state))
            return None
        return identity, message

    # ----------------------------------------------------------- grant/reclaim
    def _on_register(self, identity: bytes, message: Register) -> None:
        wid = message.worker
        if wid < 0:  # a standing worker: the coordinator numbers it
            wid = next(i for i in range(len(self.workers) + 1) if i not in self.workers)
        if wid >= self.config.workers:
            log.warning("refusing worker pid %s: the region has arenas for %d workers (raise workers)",
                        message.pid, self.config.workers)
            self.send_to(identity, Shutdown(reason="no arena left"))
            return
        if wid in self.workers:
            log.warning("worker %d registered twice; refusing pid %s", wid, message.pid)
            return
        handle = WorkerHandle(wid, identity, message.pid, last_heard=self.clock())
        if message.start_ticks and process_start_ticks(message.pid) == message.start_ticks:
            handle.local_start_ticks = message.start_ticks
        handle.arena = self.allocator.allocate(self.plan.arena_bytes, owner=f"worker-{wid} arena")
        if self.plan.checkpoint_bytes_per_worker and wid not in self.checkpoint_areas:
            try:
                self.checkpoint_areas[wid] = self.allocator.allocate(self.plan.checkpoint_bytes_per_worker,
                                                                     owner=f"worker-{wid} checkpoints")
            except OutOfMemoryError:
                log.warning("no checkpoint area of %s for worker %d: the region is full; its snapshots stay "
                            "on the heap and a restart reads their files",
                            format_bytes(self.plan.checkpoint_bytes_per_worker), wid)
        self.workers[wid] = handle
        self._by_identity[identity] = handle
        self._region_snapshot = AllocatorSnapshot.of(self.allocator)
        log.info("worker %d (pid %d) registered; granted %s", wid, handle.pid, format_bytes(handle.arena.size))
        self.send(handle, Welcome(
            worker=wid, region=self.region.name, arena=list(handle.arena.handle()),
            min_block=self.config.min_block, segment_size=self.config.segment_size,
            network_buffers=self.plan.network_buffers_per_worker,
            managed_bytes=self.plan.managed_bytes_per_worker,
        ))

    def reclaim(self, wid: int) -> None:
        """Forget a worker and free its arena (which makes every descriptor into it stale)."""
        handle = self.workers.pop(wid, None)
        if handle is None:
            return
        self._by_identity.pop(handle.identity, None)
        if handle.arena is not None and not handle.arena.freed:
            self.allocator.free(handle.arena)
        self._region_snapshot = AllocatorSnapshot.of(self.allocator)

    def wait_workers_attached(self, n: int, *, timeout: float = STARTUP_TIMEOUT,
                              processes: list[subprocess.Popen[bytes]] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while sum(h.attached for h in self.workers.values()) < n:
            for i, proc in enumerate(processes or []):
                code = _exitcode(proc)
                if code is not None:
                    msg = f"worker {i} (pid {proc.pid}) exited with {code} during start-up"
                    raise WorkerLostError(msg,
                                          worker_id=i, pid=proc.pid, exitcode=code)
            if time.monotonic() > deadline:
                attached = sum(h.attached for h in self.workers.values())
                msg = f"{attached} of {n} workers attached within {timeout}s"
                raise TimeoutError(msg)
            self.poll(0.1)

    # --------------------------------------------------------------------- jobs
    def run_job(self, graph: JobGraph, payload: bytes | list[bytes], *, on_collect: Callable[[str, bytes], None],
                timeout: float | None = None, on_tick: Callable[[], None] | None = None,
                restore_from: str = "") -> dict[int, dict[str, Any]]:
        """Run one job to its end, restarting it by the restart strategy; returns per-worker metrics (and,
        under key -1, the job's own: checkpoints, restarts). Raises JobFailedError.

        ``payload``: the pickled graph for every worker, or one per worker (``jobs.worker_payloads``).
        With checkpoints (``execution.checkpointing.interval`` > 0, streaming mode), a restart resumes
        from the latest complete checkpoint, and ``collect()`` batches reach ``on_collect`` only once the
        checkpoint that covers them completed (or the job finished): each record exactly once.
        ``restore_from``: a checkpoint directory to start from (``shmflow run --from-checkpoint``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        needed = graph.max_parallelism
        if len(self.workers) < needed:
            msg = (
                f"job {graph.name!r} needs {needed} workers (its largest parallelism); "
                f"{len(self.workers)} registered; raise workers"
            )
            raise JobFailedError(msg)
        self.check_network_buffers(graph)
        token = secrets.token_hex(6)
        checkpoints = self._checkpoint_coordinator(graph, token) if self._checkpointing(graph) else None
        restore_id, restore_dir = check_restore_point(graph, restore_from) if restore_from else (0, "")
        if checkpoints is not None:
            checkpoints.next_id = max(checkpoints.next_id, restore_id + 1)  # ids only grow: collect tags them
        collector = _Committer(on_collect, enabled=checkpoints is not None)
        strategy = restart_strategy(self.config)
        failures: list[str] = []
        attempts: list[dict[str, float]] = [{}]  # per run of the job: when each step happened (ATTEMPT_TIMES)
        self._on_tick, self._next_tick = on_tick, time.monotonic()
        self.current_job = graph.name
        record = JobRecord(secrets.token_hex(16), graph.name, graph, time.time())
        ended = [jid for jid, r in self.jobs.items() if r.end_time]
        for jid in ended[:max(0, len(ended) - KEEP_FINISHED_JOBS + 1)]:  # a standing cluster runs jobs for ever
            del self.jobs[jid]
        self.jobs[record.job_id] = record
        try:
            while True:
                try:
                    finished = self._run_attempt(graph, payload, collector, checkpoints, restore_dir, deadline,
                                                 times=attempts[-1], record=record)
                except JobFailedError as exc:
                    attempts[-1]["failed_at"] = time.monotonic()
                    failures.append(str(exc))
                    record.restarts, record.failure = len(failures), str(exc)
                    delay = None if exc.final else strategy.on_failure(time.monotonic())
                    if delay is None:
                        record.state = CANCELED if isinstance(exc, JobCancelledError) else FAILED
                        record.end_time = time.time()
                        if isinstance(exc, JobCancelledError):
                            raise
                        raise self._gave_up(graph, failures, strategy, exc) from None
                    log.warning("job %r failed (attempt %d); restarting in %.2fs: %s", graph.name, len(failures),
                                delay, exc)
                    if checkpoints is not None and checkpoints.latest is not None:
                        restore_id, restore_dir = checkpoints.restore_point()  # else: where this run began
                    collector.rewind(restore_id)
                    attempts.append(self._restore_figures(checkpoints, restore_id))
                    self._await_restart(graph, delay, deadline, times=attempts[-1])
                    continue
                attempts[-1]["finished_at"] = time.monotonic()
                collector.release_all()
                job: dict[str, Any] = {"restarts": len(failures), "failures": list(failures), ATTEMPT_TIMES: attempts}
                if checkpoints is not None:
                    job.update(checkpoints.describe())
                    job["checkpoint_dir"] = str(checkpoints.storage.job_dir)
                finished[-1] = {JOB_METRICS: job}
                record.final = {name: figures for wid, metrics in finished.items() if wid >= 0
                                for name, figures in metrics.items() if isinstance(figures, dict)}
                record.checkpoints = checkpoints.describe() if checkpoints is not None else {}
                record.state, record.end_time = FINISHED, time.time()
                return finished
        except BaseException as exc:
            if not record.end_time:
                record.state, record.failure, record.end_time = FAILED, str(exc), time.time()
            raise
        finally:
            self._cancel_requests.discard(record.job_id)
            self.current_job = None

    def _checkpointing(self, graph: JobGraph) -> bool:
        """Whether this job takes checkpoints: an interval is set and it runs in streaming mode (a batch job
        is restarted from its beginning, as in Flink). Refuses (JobFailedError) an operator that cannot."""
        if self.config.checkpoint_interval <= 0 or graph.mode != "streaming":
            return False
        for vertex in graph.vertices:
            for node in vertex.nodes:
                if not node.operator.can_snapshot():
                    msg = (f"job {graph.name!r} cannot take checkpoints: operator {node.name!r} "
                           f"({type(node.operator).__name__}) does not implement snapshot_state() and "
                           f"restore_state(state); implement them or turn checkpointing off "
                           f"(execution.checkpointing.interval = 0)")
                    raise JobFailedError(msg, final=True)
        return True

    def _checkpoint_coordinator(self, graph: JobGraph, token: str) -> CheckpointCoordinator:
        cfg = self.config
        job_id = job_directory_name(graph.name, token)
        storage = CheckpointStorage(cfg.checkpoints_dir or default_checkpoints_dir(), job_id,
                                    retained=cfg.checkpoints_retained)
        return CheckpointCoordinator(storage, graph, job_id=job_id, job_name=graph.name,
                                     interval=cfg.checkpoint_interval, timeout=cfg.checkpoint_timeout,
                                     clock=time.monotonic)

    def _gave_up(self, graph: JobGraph, failures: list[str], strategy: RestartStrategy,
                 last: JobFailedError) -> JobFailedError:
        if len(failures) == 1:
            return last
        listed = "\n".join(f"attempt {i}: {text}" for i, text in enumerate(failures, 1))
        msg = (f"job {graph.name!r} failed {len(failures)} times; the restart strategy gave up "
               f"({strategy.describe()}):\n{listed}")
        return JobFailedError(msg, final=True)

    @staticmethod
    def _restore_figures(checkpoints: CheckpointCoordinator | None, restored: int) -> dict[str, float]:
        """The start of a restarted run's ATTEMPT_TIMES: the checkpoint it restores and that checkpoint's size."""
        latest = checkpoints.latest if checkpoints is not None else None
        size = sum(h.nbytes for h in latest.metadata.subtasks.values()) if latest is not None else 0
        return {"restored_checkpoint": restored, "restored_bytes": size if restored else 0}

    def _await_restart(self, graph: JobGraph, delay: float, deadline: float | None,
                       times: dict[str, float] | None = None) -> None:
        """Wait ``delay`` (serving heartbeats), replace lost workers, and wait until enough are registered.
        ``times`` gets ``workers_replaced_at`` and ``workers_attached_at`` (ATTEMPT_TIMES)."""
        times = {} if times is None else times
        until = time.monotonic() + delay
        while time.monotonic() < until:
            self._idle_poll(min(0.1, max(0.0, until - time.monotonic())))
        needed = graph.max_parallelism
        missing = [wid for wid in range(needed) if wid not in self.workers]
        if missing and self.replace_worker is not None:
            for wid in missing:
                try:
                    self.replace_worker(wid)
                except WorkerLostError as exc:
                    msg = f"job {graph.name!r} cannot restart: {exc}"
                    raise JobFailedError(msg, final=True) from exc
        times["workers_replaced_at"] = time.monotonic()
        limit = time.monotonic() + STARTUP_TIMEOUT
        while any(wid not in self.workers or not self.workers[wid].attached for wid in range(needed)):
            if time.monotonic() > limit or (deadline is not None and time.monotonic() > deadline):
                msg = (f"job {graph.name!r} cannot restart: workers {missing} did not come back within "
                       f"{STARTUP_TIMEOUT:.0f}s")
                raise JobFailedError(msg, final=True)
            self._idle_poll(0.1)
        times["workers_attached_at"] = time.monotonic()

    def _idle_poll(self, timeout: float) -> None:
        """Between two attempts: serve registrations and heartbeats; drop the old run's messages."""
        received = self.poll(timeout)
        if received is not None and isinstance(received[1], Submit):
            busy = "the coordinator is running another job; submit again when it ends"
            self.send_to(received[0], JobError(message=busy))

    def _run_attempt(self, graph: JobGraph, payload: bytes | list[bytes], collector: _Committer,
                     checkpoints: CheckpointCoordinator | None, restore_dir: str,
                     deadline: float | None, times: dict[str, float] | None = None,
                     record: JobRecord | None = None) -> dict[int, dict[str, Any]]:
        """Deploy, start and watch one run of the job; per-worker metrics. Raises JobFailedError.
        ``times`` gets ``deploy_at``, ``deployed_at`` and ``started_at`` (ATTEMPT_TIMES)."""
        times = {} if times is None else times
        job = secrets.token_hex(6)
        if record is not None:
            record.attempt = job
        needed = graph.max_parallelism
        participants = {wid: self.workers[wid] for wid in sorted(self.workers)[:needed]}
        cfg = self.config.as_dict()
        for wid in participants:  # before anything is sent: the worker would drop a message over its bound
            graph_bytes = payload[wid] if isinstance(payload, list) else payload
            try:
                control.check_message_size(len(graph_bytes), self.config.max_message_size,
                                           f"the graph of job {graph.name!r} for worker {wid}")
            except ProtocolError as exc:
                raise JobFailedError(str(exc), final=True) from exc
        checkpoint_dir = str(checkpoints.storage.job_dir) if checkpoints is not None else ""
        restore_shared = checkpoints.shared_blobs(restore_dir) if checkpoints is not None else {}
        times["deploy_at"] = time.monotonic()
        for wid, handle in participants.items():  # worker ids are 0..needed-1: worker i runs subtask i
            graph_bytes = payload[wid] if isinstance(payload, list) else payload
            area = self.checkpoint_areas.get(wid) if checkpoints is not None else None
            self.send(handle, Deploy(job=job, graph=graph_bytes, config=cfg, checkpoint_dir=checkpoint_dir,
                                     restore_dir=restore_dir, restore_shared=restore_shared,
                                     checkpoint_area=[area.offset, area.size] if area is not None else []))
        deployed: dict[int, dict[str, str]] = {}
        finished: dict[int, dict[str, Any]] = {}
        watch = _Watch(job, participants, collector, checkpoints, deadline, record.job_id if record else "")
        try:
            while len(deployed) < len(participants):
                self._watch(graph, watch, deployed, None)
            times["deployed_at"] = time.monotonic()  # every subtask built and restored, every gate bound
            gates = {str(v.id): [deployed[i][str(v.id)] for i in range(v.parallelism)]
                     for v in graph.vertices if v.inputs}
            for handle in participants.values():
                self.send(handle, Start(job=job, gates=gates))
            times["started_at"] = time.monotonic()
            if checkpoints is not None:
                checkpoints.start_run()
            while len(finished) < len(participants):
                self._watch(graph, watch, None, finished)
        except BaseException:
            for handle in participants.values():
                self.send(handle, Cancel(job=job))
            if checkpoints is not None:
                checkpoints.abort_pending()
            raise
        return finished

    def check_network_buffers(self, graph: JobGraph) -> None:
        """Refuse a job whose partitions need more buffers than a worker's pool holds (before deploying).

        The budget is :mod:`runtime.network.budget`'s, as ``JobRun._connect`` sizes the pools.
        """
        available = self.plan.network_buffers_per_worker
        for wid in range(graph.max_parallelism):
            required = job_buffers_required([
                1 if edge.partitioning == "forward" else graph.vertex(edge.target).parallelism
                for vertex in graph.vertices if wid < vertex.parallelism for edge in vertex.outputs])
            if required > available:
                msg = (f"insufficient network buffers for job {graph.name!r} on worker {wid}: required {required}, "
                       f"available {available} (buffer size {format_bytes(self.config.segment_size)}); raise "
                       f"memory.network.fraction, memory.network.min/max or memory.region.size")
                raise InsufficientNetworkBuffersError(msg)

    def _watch(self, graph: JobGraph, watch: _Watch, deployed: dict[int, dict[str, str]] | None,
               finished: dict[int, dict[str, Any]] | None) -> None:
        participants = watch.participants
        self._check_alive(graph, participants)
        if self._on_tick is not None and time.monotonic() >= self._next_tick:
            self._next_tick = time.monotonic() + 0.5
            self._on_tick()
        if watch.deadline is not None and time.monotonic() > watch.deadline:
            msg = f"job {graph.name!r} did not finish within its timeout"
            raise JobFailedError(msg, final=True)
        if watch.job_id in self._cancel_requests:
            msg = f"job {graph.name!r} ({watch.job_id}) was cancelled through the REST API"
            raise JobCancelledError(msg)
        record = self.jobs.get(watch.job_id)
        if watch.checkpoints is not None and record is not None and time.monotonic() >= self._next_view:
            self._next_view = time.monotonic() + 1.0  # the dashboard shows them while the job runs
            record.checkpoints = watch.checkpoints.describe()
        checkpoints = watch.checkpoints
        if checkpoints is not None and finished is not None:
            trigger = checkpoints.maybe_trigger(watch.job)
            if trigger is not None:
                for participant in participants.values():
                    self.send(participant, trigger)
        received = self.poll(0.1)
        if received is None:
            return
        identity, message = received
        if isinstance(message, Submit):
            busy = "the coordinator is running another job; submit again when it ends"
            self.send_to(identity, JobError(message=busy))
            return
        if not isinstance(message, (Collect, Deployed, Finished, Failed, AckCheckpoint)) or message.job != watch.job:
            return
        wid = message.worker
        if isinstance(message, Collect):
            watch.collector.add(message.sink, message.records, message.checkpoint)
        elif isinstance(message, AckCheckpoint):
            if checkpoints is not None and checkpoints.on_ack(message) is not None:
                watch.collector.commit(message.checkpoint)
                done = CheckpointDone(job=watch.job, checkpoint=message.checkpoint)
                for participant in participants.values():
                    self.send(participant, done)
        elif isinstance(message, Deployed):
            if deployed is not None:
                deployed[wid] = message.gates
        elif isinstance(message, Finished):
            if finished is not None:
                finished[wid] = message.metrics
        else:
            failed = participants.get(wid)
            pid = failed.pid if failed else "?"
            msg = (f"job {graph.name!r} failed: operator {message.operator!r} on worker {wid} (pid {pid}) "
                   f"raised:\n{message.traceback}")
            raise JobFailedError(msg)

    def _check_alive(self, graph: JobGraph, participants: dict[int, WorkerHandle]) -> None:
        now = self.clock()
        for wid, handle in participants.items():
            code = _exitcode(handle.process)
            gone = code is not None or handle.exited()
            silent = not gone and now - handle.last_heard > HEARTBEAT_TIMEOUT
            if gone or silent:
                if silent and handle.process is not None:
                    handle.process.kill()  # hung: a replacement takes its place
                ops = ", ".join(repr(v.name) for v in graph.vertices if v.parallelism > wid)
                cause = (f"exited with {code}" if code is not None else "exited" if gone
                         else f"sent no heartbeat for {HEARTBEAT_TIMEOUT:.0f}s")
                arena = handle.arena.size if handle.arena is not None else 0
                self.reclaim(wid)
                msg = (f"job {graph.name!r} failed: worker {wid} (pid {handle.pid}) {cause} while running "
                       f"{ops}; its arena of {format_bytes(arena)} was reclaimed")
                raise JobFailedError(msg)

    # ----------------------------------------------------------- standing mode
    def serve(self, *, stop: Callable[[], bool] = lambda: False) -> None:
        """Accept workers and run the jobs clients submit, one at a time, until ``stop()``."""
        while not stop():
            self._reap_silent()
            received = self.poll(0.2)
            if received is None:
                continue
            identity, message = received
            if not isinstance(message, Submit):
                continue

            def relay(sink: str, records: bytes, client: bytes = identity) -> None:
                self.send_to(client, Results(sink=sink, records=records))

            def still_running(client: bytes = identity) -> None:
                self.send_to(client, Running())

            try:
                graph = check_graph_payload(message.graph)
                metrics = self.run_job(graph, message.graph, timeout=message.timeout, on_collect=relay,
                                       on_tick=still_running, restore_from=message.restore_from)
                self.send_to(identity, JobSucceeded(metrics=metrics))
            except Exception as exc:  # noqa: BLE001 - the client gets the failure; the coordinator keeps serving
                self.send_to(identity, JobError(message=str(exc)))

    def _reap_silent(self) -> None:
        now = self.clock()
        for wid, handle in list(self.workers.items()):
            if handle.exited() or now - handle.last_heard > HEARTBEAT_TIMEOUT:
                log.warning("worker %d (pid %d) is gone; reclaiming its arena", wid, handle.pid)
                self.reclaim(wid)

    # ----------------------------------------------------------------- shutdown
    def close(self) -> None:
        self.broadcast(Shutdown(reason="the coordinator is closing"))
        for wid in list(self.workers):
            self.reclaim(wid)
        self.sock.close(linger=500)
        self.region.close()


def check_graph_payload(payload: bytes) -> JobGraph:
    """Unpickle a submitted job graph (its HMAC was verified before this is called)."""
    graph = cloudpickle.loads(payload)
    if not isinstance(graph, JobGraph):
        msg = f"a submitted job must be a JobGraph; got {type(graph).__name__}"
        raise JobFailedError(msg)
    return graph


__all__ = ["ATTEMPT_TIMES", "HEARTBEAT_TIMEOUT", "JOB_METRICS", "Coordinator", "WorkerHandle", "check_graph_payload"]
