"""The worker process (Flink's TaskManager): registers, attaches the region, owns its arena, hosts jobs.

Imports: runtime.cluster.protocol, runtime.execution.job_run, runtime.memory,
runtime.network, runtime.state.backend (its stats type), runtime.web.stats_block (its writer),
runtime.errors. Never imports ``operators``: the operators
arrive pickled inside the job graph and run through runtime.execution.

Life of a worker: connect to the coordinator and ``register``; receive a
``welcome`` with the region's name and the arena granted to it; attach and
carve the arena into a network buffer pool and managed memory; then host one
:class:`~runtime.execution.job_run.JobRun` per ``deploy`` until told to shut
down. Heartbeats every ``HEARTBEAT_INTERVAL`` seconds, also while a job runs or
waits, let the coordinator tell a hung worker from a busy one. A worker whose
coordinator goes silent shuts itself down.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from runtime.cluster import protocol as control
from runtime.cluster.protocol import (
    AckCheckpoint,
    Attached,
    Cancel,
    CheckpointDone,
    Collect,
    Deploy,
    Deployed,
    Failed,
    Finished,
    Heartbeat,
    Message,
    Register,
    Shutdown,
    Start,
    TriggerCheckpoint,
    Welcome,
)
from runtime.errors import CheckpointError
from runtime.execution.checkpointing import CheckpointSetup
from runtime.execution.job_run import CheckpointControl, JobCancelled, JobCounters, JobRun
from runtime.execution.process_stats import gc_timer
from runtime.memory import BuddyAllocator, SharedRegion
from runtime.memory.layout import AllocatorSnapshot
from runtime.memory.manager import MemoryManager
from runtime.memory.region import process_start_ticks
from runtime.network import NetworkBufferPool, heap
from runtime.network.transport import connect, context, make_socket
from runtime.state.backend import BackendStats
from runtime.web.stats_block import SLOT_BYTES, StatsWriter, WorkerCounters

log = logging.getLogger("shmflow.worker")

HEARTBEAT_INTERVAL = 0.5
# How often a worker publishes its counters in its stats block (the dashboard updates once a second). A publish
# costs a few microseconds per subtask: at this rate it is far below 0.1% of a worker's time.
STATS_INTERVAL = 0.25
# Seconds without a word from the coordinator before a worker gives up. A coordinator on this host is also
# watched by its pid (the region's creator), every heartbeat: its death is noticed within HEARTBEAT_INTERVAL.
COORDINATOR_SILENCE = 45.0
# The state report (each managed state backend's stats, for ``shmflow layout --coordinator``) may take this share
# of a worker's time. It is exact: counting the entries of a store that spilled merges its runs (measured: 0.6 s
# for 400 k entries in 3 runs, then cached until the next write), so such a store is reported less often.
STATE_REPORT_SHARE = 0.02


class Worker:
    """One worker process.

    Ownership: the worker owns its arena (granted by the coordinator): the
    network buffer pool and the managed memory carved from it, and every
    buffer and page handed out from them. It returns nothing explicitly: the
    coordinator reclaims the whole arena when the worker exits or dies.
    Process: the worker process, one thread.
    """

    def __init__(self, worker_id: int, endpoint: str, secret: bytes, *,
                 max_message_size: int = control.DEFAULT_MAX_MESSAGE_SIZE, region_fd: int | None = None) -> None:
        self.worker_id = worker_id
        self.region_fd = region_fd  # a replacement worker maps the region by this (its name is gone)
        self.secret = secret
        self.ctx = context()
        self.sock = make_socket(self.ctx, zmq.DEALER, identity=f"worker-{worker_id}-{os.getpid()}".encode())
        control.secure_client(self.sock, secret, endpoint, max_message_size=max_message_size)
        connect(self.sock, endpoint)
        self.region: SharedRegion | None = None
        self.network: NetworkBufferPool | None = None
        self.memory: MemoryManager | None = None
        self.arena_allocator: BuddyAllocator | None = None  # carves the arena; owner: this worker
        self._last_arena: list[Any] | None = None  # the arena as last reported in a heartbeat
        self._last_state: dict[str, list[Any]] = {}  # the state backends' stats as last reported
        self._next_state_report = 0.0  # monotonic time of the next state report (see STATE_REPORT_SHARE)
        self._last_heartbeat = 0.0
        self._last_heard = time.monotonic()
        self.progress: Callable[[], dict[str, list[int]]] | None = None  # set by the running job
        self.state_report: Callable[[], dict[str, BackendStats]] | None = None  # set by the running job
        self._job: str | None = None  # the job being run (a Cancel for another one is stale)
        self._watch_creator = False  # the region's creator (the coordinator) runs in our pid namespace
        self._shutdown = False  # a Shutdown arrived while a job ran: exit once it has been torn down
        self._job_control: CheckpointControl | None = None  # the running job, told of its checkpoint messages
        self.counters: Callable[[], JobCounters] | None = None  # set by the running job
        self.stats: StatsWriter | None = None  # this worker's slot of the region's stats block; owner: this worker
        self._next_stats = 0.0
        self._started_ns = time.monotonic_ns()
        self._heartbeats = 0

    # ------------------------------------------------------------------ control
    def send(self, message: Message) -> None:
        control.send(self.sock, self.secret, message)

    def recv(self, timeout: float) -> Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        message = control.recv(self.sock, self.secret)
        if message is not None:
            self._last_heard = time.monotonic()
        return message

    def heartbeat(self, now: float) -> None:
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL:
            self._last_heartbeat = now
            self._check_creator()
            progress = self.progress() if self.progress is not None else None
            self._heartbeats += 1
            self.send(Heartbeat(worker=self.worker_id, progress=progress, arena=self._arena_if_changed(),
                                state=self._state_if_changed(now)))
        if self.stats is not None and now >= self._next_stats:
            self._next_stats = now + STATS_INTERVAL
            self.publish_stats()
        if now - self._last_heard > COORDINATOR_SILENCE:
            msg = f"worker {self.worker_id}: no word from the coordinator for {COORDINATOR_SILENCE}s"
            raise SystemExit(msg)

    def publish_stats(self) -> None:
        """Write this worker's counters (process, memory, the running job's subtasks) into its stats slot."""
        if self.stats is None or self.network is None or self.memory is None:
            return
        job = self.counters() if self.counters is not None else None
        net, managed, gc_time = self.network.stats(), self.memory.stats(), gc_timer()
        self.stats.publish(WorkerCounters(
            pid=os.getpid(), started_at_ns=self._started_ns, rss_bytes=_rss_bytes(),
            gc_ns=int(gc_time.seconds * 1e9), gc_collections=gc_time.collections, heartbeats=self._heartbeats,
            network_buffers=net.num_buffers, network_available=net.num_buffers - net.in_use,
            managed_budget=managed.budget, managed_used=managed.used_bytes, managed_peak=managed.high_water_mark,
            spilled_bytes=job.spilled_bytes if job is not None else 0,
            job=int(self._job, 16) if self._job else 0), job.subtasks if job is not None else [])

    def _arena_if_changed(self) -> list[Any] | None:
        """The arena's blocks (network pool, each operator's managed pages, free), if they changed since the
        last heartbeat: the coordinator keeps the last one for ``shmflow layout --coordinator``."""
        if self.arena_allocator is None:
            return None
        wire = AllocatorSnapshot.of(self.arena_allocator).to_wire()
        if wire == self._last_arena:
            return None
        self._last_arena = wire
        return wire

    def _state_if_changed(self, now: float) -> dict[str, list[Any]] | None:
        """Each managed state backend's stats by the owner of its pages ({}: none any more), if they changed
        since the last report; None also while the last report's cost keeps the next one waiting (its cost
        over STATE_REPORT_SHARE). The coordinator keeps the last one for ``shmflow layout --coordinator``."""
        if now < self._next_state_report:
            return None
        started = time.perf_counter()
        report = self.state_report() if self.state_report is not None else {}
        wire = {owner: stats.to_wire() for owner, stats in report.items()}
        self._next_state_report = now + (time.perf_counter() - started) / STATE_REPORT_SHARE
        if wire == self._last_state:
            return None
        self._last_state = wire
        return wire

    # ------------------------------------------------- JobHost (runtime.execution.job_run)
    @property
    def control_socket(self) -> zmq.Socket[bytes]:
        return self.sock

    def keep_alive(self, now: float) -> None:
        """Heartbeat when due; raise JobCancelled if the running job was cancelled or the worker told to shut down.

        Called by every wait of a job (see ``JobHost.keep_alive``), so cheap: one poll(0) of the control socket.
        """
        self.heartbeat(now)
        while self.sock.poll(0):
            self._on_control(self.recv(0))

    def _on_control(self, message: Message | None) -> None:
        """A control message that arrived while a job runs: act on Cancel (of this job) and Shutdown; hand
        the running job its checkpoint messages."""
        if isinstance(message, Shutdown):
            self._shutdown = True
            raise JobCancelled()
        if isinstance(message, Cancel) and message.job == self._job:
            raise JobCancelled()
        control = self._job_control
        if control is not None and isinstance(message, TriggerCheckpoint) and message.job == self._job:
            control.trigger_checkpoint(message.checkpoint, message.timestamp)
        if control is not None and isinstance(message, CheckpointDone) and message.job == self._job:
            control.checkpoint_done(message.checkpoint)

    def wait_start(self, job_id: str) -> dict[str, list[str]]:
        while True:
            self.heartbeat(time.monotonic())
            message = self.recv(HEARTBEAT_INTERVAL)
            if message is None:
                continue
            self._on_control(message)
            if isinstance(message, Start) and message.job == job_id:
                return message.gates

    def report_deployed(self, job_id: str, gates: dict[str, str]) -> None:
        self.send(Deployed(job=job_id, worker=self.worker_id, gates=gates))

    def report_finished(self, job_id: str, metrics: dict[str, Any]) -> None:
        self.send(Finished(job=job_id, worker=self.worker_id, metrics=metrics))

    def report_failed(self, job_id: str, operator: str, traceback: str) -> None:
        self.send(Failed(job=job_id, worker=self.worker_id, operator=operator, traceback=traceback))

    def send_to_client(self, job_id: str, sink_id: str, records: bytes, checkpoint: int = 0) -> None:
        self.send(Collect(job=job_id, worker=self.worker_id, sink=sink_id, records=records, checkpoint=checkpoint))

    def ack_checkpoint(self, job_id: str, checkpoint: int, subtask: str, state: list[Any],
                       alignment_seconds: float, snapshot_seconds: float, source_position: Any = None,
                       shared_memory: list[int] | None = None, depends_on: int = 0) -> None:
        self.send(AckCheckpoint(job=job_id, checkpoint=checkpoint, worker=self.worker_id, subtask=subtask,
                                state=state, alignment_seconds=alignment_seconds,
                                snapshot_seconds=snapshot_seconds, source_position=source_position,
                                shared_memory=list(shared_memory or []), depends_on=depends_on))

    def _region_view(self, offset: int, nbytes: int) -> memoryview:
        """A view of ``nbytes`` of the region at ``offset`` (a checkpoint's blob), checked to lie inside it."""
        region = self.region
        if region is None or offset < 0 or nbytes < 0 or offset + nbytes > len(region.buf):
            size = len(region.buf) if region is not None else 0
            msg = f"a blob of {nbytes} bytes at region offset {offset} lies outside the region of {size} bytes"
            raise CheckpointError(msg)
        return region.buf[offset:offset + nbytes]

    def set_job_control(self, job: CheckpointControl | None) -> None:
        self._job_control = job

    def set_progress(self, progress: Callable[[], dict[str, list[int]]] | None) -> None:
        self.progress = progress

    def set_state_report(self, report: Callable[[], dict[str, BackendStats]] | None) -> None:
        self.state_report = report

    def set_counters(self, counters: Callable[[], JobCounters] | None) -> None:
        if counters is None:  # the job ends: publish its final counters first
            self.publish_stats()
        self.counters = counters

    # ----------------------------------------------------------------- lifetime
    def register(self, *, timeout: float = 60.0) -> None:
        self.send(Register(worker=self.worker_id, pid=os.getpid(), start_ticks=process_start_ticks(os.getpid()) or 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.recv(0.5)
            if message is None:
                continue
            if isinstance(message, Welcome):
                self.worker_id = message.worker
                self._setup_arena(message)
                self.send(Attached(worker=self.worker_id))
                return
            if isinstance(message, Shutdown):
                raise SystemExit(0)
        msg = f"worker {self.worker_id}: coordinator did not welcome it within {timeout}s"
        raise SystemExit(msg)

    def _check_creator(self) -> None:
        """Exit at once if the coordinator that created the region died (SIGKILL: no Shutdown came, and
        its heartbeat timeout is long); remove the region's name, which it cannot any more."""
        region = self.region
        if self._watch_creator and region is not None and not region.creator_alive():
            region.unlink_if_orphaned()
            msg = (f"worker {self.worker_id}: the coordinator (pid {region.creator_pid}) is gone; "
                   f"removed its region {region.name}")
            raise SystemExit(msg)

    def _setup_arena(self, welcome: Welcome) -> None:
        if self.region_fd is not None:
            self.region = SharedRegion.attach_fd(self.region_fd, welcome.region)
            self.region_fd = None
        else:
            self.region = SharedRegion.attach(welcome.region)
        # A creator we can see now is in our pid namespace: from now on its death is the coordinator's.
        self._watch_creator = self.region.creator_alive()
        offset, size = welcome.arena[:2]
        alloc = self.arena_allocator = BuddyAllocator(self.region, welcome.min_block, offset=offset, size=size)
        self.network = NetworkBufferPool(alloc, welcome.network_buffers, welcome.segment_size,
                                         owner=f"worker-{self.worker_id} network")
        self.memory = MemoryManager(alloc, budget=welcome.managed_bytes, page_size=welcome.segment_size,
                                    name=f"worker-{self.worker_id} managed memory")
        if len(self.region.stats_area) >= (self.worker_id + 1) * SLOT_BYTES:  # a region without one: no stats
            self.stats = StatsWriter(self.region.stats_area, self.worker_id)
            self.publish_stats()

    def serve(self) -> None:
        """Run jobs until told to shut down (or the coordinator goes silent)."""
        while True:
            self.heartbeat(time.monotonic())
            message = self.recv(HEARTBEAT_INTERVAL)
            if message is None:
                continue
            if isinstance(message, Shutdown):
                return
            if isinstance(message, Deploy):
                self._job = message.job
                setup = CheckpointSetup(
                    directory=message.checkpoint_dir, restore_dir=message.restore_dir,
                    align=message.config.get("execution.checkpointing.mode", "exactly-once") == "exactly-once",
                    restore_shared=message.restore_shared, region_view=self._region_view,
                    area=message.checkpoint_area)
                run = JobRun(self, message.job, message.graph, message.config, setup)
                del message  # the run holds the pickled graph until it has unpickled it
                profile_dir = os.environ.get("SHMFLOW_INTERNAL_PROFILE")
                if profile_dir:  # a development aid: cProfile each job, one file per worker
                    import cProfile
                    cProfile.runctx("run.run()", {}, {"run": run},
                                    os.path.join(profile_dir, f"worker-{self.worker_id}-{run.job_id}.prof"))
                else:
                    run.run()
                self._job = None
                del run
                if self._shutdown:  # told to shut down while the job ran
                    return

    def close(self) -> None:
        if self.stats is not None:
            self.stats.close()
        if self.memory is not None:
            self.memory.close()
        if self.network is not None:
            self.network.close(check=False)
        if self.region is not None:
            self.region.close()
        self.sock.close(linger=1000)


def _rss_bytes() -> int:
    """This process's resident set size now (/proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGTERM this worker when its parent exits (Linux), so none is orphaned."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(1)


def worker_main(worker_id: int, endpoint: str, secret: bytes, *,
                max_message_size: int = control.DEFAULT_MAX_MESSAGE_SIZE, region_fd: int | None = None) -> None:
    """Run one worker until the coordinator shuts it down."""
    logging.basicConfig(level=logging.WARNING, format=f"worker {worker_id}: %(message)s")
    worker = Worker(worker_id, endpoint, secret, max_message_size=max_message_size, region_fd=region_fd)
    try:
        worker.register()
        worker.serve()
    finally:
        worker.close()


def main(argv: list[str]) -> None:
    """``python -m runtime.cluster.worker ID ENDPOINT PARENT_PID [MAX_MESSAGE_SIZE [REGION_FD]]``; the secret
    (hex) on stdin. REGION_FD: an inherited descriptor of the region (a replacement worker's)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the coordinator tears down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    heap.keep_message_memory()  # zmq's message memory stays mapped between messages
    worker_id, endpoint, parent = int(argv[0]), argv[1], int(argv[2])
    max_message_size = int(argv[3]) if len(argv) > 3 else control.DEFAULT_MAX_MESSAGE_SIZE
    region_fd = int(argv[4]) if len(argv) > 4 else None
    _die_with_parent(parent)
    secret = bytes.fromhex(sys.stdin.readline().strip())
    worker_main(worker_id, endpoint, secret, max_message_size=max_message_size, region_fd=region_fd)


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["COORDINATOR_SILENCE", "HEARTBEAT_INTERVAL", "STATE_REPORT_SHARE", "Worker", "main", "worker_main"]
