"""The coordinator (Flink's JobManager + ResourceManager): owns the region, grants arenas, runs jobs.

Imports: runtime.memory, runtime.control, runtime.graph, runtime.network
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
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from runtime import control
from runtime.errors import InsufficientNetworkBuffersError, JobFailedError, WorkerLostError
from runtime.graph import JobGraph
from runtime.memory import BuddyAllocator, MemorySegment, SharedRegion, format_bytes
from runtime.network.transport import bind, context, local_endpoint, make_socket

log = logging.getLogger("shmflow.coordinator")

HEARTBEAT_TIMEOUT = 30.0  # seconds of silence after which a worker counts as lost (a busy step can be long)
STARTUP_TIMEOUT = 60.0


def _exitcode(proc: Any) -> int | None:
    """The exit code of a worker process (Popen or multiprocessing.Process), None while it runs."""
    if proc is None:
        return None
    if hasattr(proc, "poll"):
        return proc.poll()
    return proc.exitcode


@dataclass
class WorkerHandle:
    """The coordinator's view of one worker."""

    worker_id: int
    identity: bytes
    pid: int
    arena: MemorySegment | None = None
    attached: bool = False
    last_heard: float = field(default_factory=time.monotonic)
    progress: dict[str, list[int]] | None = None  # from the last heartbeat: chain -> [records in, out]
    process: Any = None  # the worker's process handle when this coordinator started it


class Coordinator:
    """Owns the region and its global allocator; registers workers and runs jobs on them.

    Ownership: the coordinator allocates one arena per worker from the global
    allocator (``grant``) and frees it when the worker is gone (``reclaim``);
    nothing else is allocated from the global range. Only the coordinator
    unlinks the region.
    Process: the coordinator process, one thread.
    """

    def __init__(self, config: Any, *, endpoint: str | None = None, secret: bytes | None = None) -> None:
        self.config = config
        self.plan = config.memory_plan()
        self.secret = secret or control.new_secret()
        self.region = SharedRegion.create(config.region_size)
        try:
            self.allocator = BuddyAllocator(self.region, config.min_block)
            self.ctx = context()
            self.sock = make_socket(self.ctx, zmq.ROUTER)
            self.sock.router_mandatory = True
            self.endpoint = bind(self.sock, endpoint or local_endpoint("ipc"))
        except BaseException:
            self.region.close()
            raise
        self.workers: dict[int, WorkerHandle] = {}
        self._by_identity: dict[bytes, WorkerHandle] = {}
        self.refused = 0  # messages that failed authentication
        self._on_tick: Callable[[], None] | None = None
        self._next_tick = 0.0

    # ---------------------------------------------------------------- messaging
    def send(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        try:
            control.send(self.sock, self.secret, message, identity=handle.identity)
        except zmq.ZMQError as exc:  # peer gone (router_mandatory): its loss is detected separately
            log.debug("could not send %s to worker %d: %s", message["type"], handle.worker_id, exc)

    def broadcast(self, message: dict[str, Any]) -> None:
        for handle in list(self.workers.values()):
            self.send(handle, message)

    def poll(self, timeout: float) -> tuple[bytes, dict[str, Any]] | None:
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
            handle.last_heard = time.monotonic()
        kind = message["type"]
        if kind == "register":
            self._on_register(identity, message)
            return None
        if kind == "attached" and handle is not None:
            handle.attached = True
            return None
        if kind == "heartbeat":
            if handle is not None:
                handle.progress = message.get("progress")
                self.send(handle, {"type": "ack"})  # lets the worker tell a live coordinator from a dead one
            return None
        return identity, message

    # ----------------------------------------------------------- grant/reclaim
    def _on_register(self, identity: bytes, message: dict[str, Any]) -> None:
        wid = int(message["worker"])
        if wid < 0:  # a standing worker: the coordinator numbers it
            wid = next(i for i in range(len(self.workers) + 1) if i not in self.workers)
        if wid >= self.config.workers:
            log.warning("refusing worker pid %s: the region has arenas for %d workers (raise workers)",
                        message.get("pid"), self.config.workers)
            control.send(self.sock, self.secret, {"type": "shutdown", "reason": "no arena left"}, identity=identity)
            return
        if wid in self.workers:
            log.warning("worker %d registered twice; refusing pid %s", wid, message.get("pid"))
            return
        handle = WorkerHandle(wid, identity, int(message["pid"]))
        handle.arena = self.allocator.allocate(self.plan.arena_bytes, owner=f"worker-{wid} arena")
        self.workers[wid] = handle
        self._by_identity[identity] = handle
        log.info("worker %d (pid %d) registered; granted %s", wid, handle.pid, format_bytes(handle.arena.size))
        self.send(handle, {
            "type": "welcome", "worker": wid, "region": self.region.name,
            "arena": list(handle.arena.handle()), "min_block": self.config.min_block,
            "segment_size": self.config.segment_size,
            "network_buffers": self.plan.network_buffers_per_worker,
            "managed_bytes": self.plan.managed_bytes_per_worker,
        })

    def reclaim(self, wid: int) -> None:
        """Forget a worker and free its arena (which makes every descriptor into it stale)."""
        handle = self.workers.pop(wid, None)
        if handle is None:
            return
        self._by_identity.pop(handle.identity, None)
        if handle.arena is not None and not handle.arena.freed:
            self.allocator.free(handle.arena)

    def wait_workers_attached(self, n: int, *, timeout: float = STARTUP_TIMEOUT,
                              processes: list[Any] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while sum(h.attached for h in self.workers.values()) < n:
            for i, proc in enumerate(processes or []):
                code = _exitcode(proc)
                if code is not None:
                    raise WorkerLostError(f"worker {i} (pid {proc.pid}) exited with {code} during start-up",
                                          worker_id=i, pid=proc.pid, exitcode=code)
            if time.monotonic() > deadline:
                attached = sum(h.attached for h in self.workers.values())
                raise TimeoutError(f"{attached} of {n} workers attached within {timeout}s")
            self.poll(0.1)

    # --------------------------------------------------------------------- jobs
    def run_job(self, graph: JobGraph, payload: bytes | list[bytes], *, on_collect: Callable[[str, bytes], None],
                timeout: float | None = None, on_tick: Callable[[], None] | None = None) -> dict[int, dict[str, Any]]:
        """Deploy, start and watch one job; returns per-worker metrics. Raises JobFailedError.

        ``payload``: the pickled graph for every worker, or one per worker (``jobs.worker_payloads``).
        """
        job = secrets.token_hex(6)
        needed = graph.max_parallelism
        if len(self.workers) < needed:
            raise JobFailedError(f"job {graph.name!r} needs {needed} workers (its largest parallelism); "
                                 f"{len(self.workers)} registered; raise workers")
        participants = {wid: self.workers[wid] for wid in sorted(self.workers)[:needed]}
        self.check_network_buffers(graph)
        cfg = self.config.as_dict()
        for wid, handle in participants.items():  # worker ids are 0..needed-1: worker i runs subtask i
            graph_bytes = payload[wid] if isinstance(payload, list) else payload
            self.send(handle, {"type": "deploy", "job": job, "graph": graph_bytes, "config": cfg})
        deadline = None if timeout is None else time.monotonic() + timeout
        deployed: dict[int, dict[str, str]] = {}
        finished: dict[int, dict[str, Any]] = {}
        self._on_tick, self._next_tick = on_tick, time.monotonic()
        try:
            while len(deployed) < len(participants):
                self._watch(graph, participants, job, deadline, deployed, None, on_collect)
            gates = {str(v.id): [deployed[i][str(v.id)] for i in range(v.parallelism)]
                     for v in graph.vertices if v.inputs}
            for handle in participants.values():
                self.send(handle, {"type": "start", "job": job, "gates": gates})
            while len(finished) < len(participants):
                self._watch(graph, participants, job, deadline, None, finished, on_collect)
        except BaseException:
            for handle in participants.values():
                self.send(handle, {"type": "cancel", "job": job})
            raise
        return finished

    def check_network_buffers(self, graph: JobGraph) -> None:
        """Refuse a job whose partitions need more buffers than a worker's pool holds (before deploying).

        Each result partition of a subtask reserves one buffer per consumer channel
        plus one (see ``JobRun._connect`` in runtime.worker; keep the two in step).
        """
        available = self.plan.network_buffers_per_worker
        for wid in range(graph.max_parallelism):
            required = 0
            for vertex in graph.vertices:
                if wid >= vertex.parallelism:
                    continue
                for edge in vertex.outputs:
                    targets = 1 if edge.partitioning == "forward" else graph.vertex(edge.target).parallelism
                    required += targets + 1
            if required > available:
                msg = (f"insufficient network buffers for job {graph.name!r} on worker {wid}: required {required}, "
                       f"available {available} (buffer size {format_bytes(self.config.segment_size)}); raise "
                       f"memory.network.fraction, memory.network.min/max or memory.region.size")
                raise InsufficientNetworkBuffersError(msg)

    def _watch(self, graph: JobGraph, participants: dict[int, WorkerHandle], job: str, deadline: float | None,
               deployed: dict | None, finished: dict | None, on_collect: Callable[[str, bytes], None]) -> None:
        self._check_alive(graph, participants)
        if self._on_tick is not None and time.monotonic() >= self._next_tick:
            self._next_tick = time.monotonic() + 0.5
            self._on_tick()
        if deadline is not None and time.monotonic() > deadline:
            raise JobFailedError(f"job {graph.name!r} did not finish within its timeout")
        received = self.poll(0.1)
        if received is None:
            return
        identity, message = received
        if message["type"] == "submit":
            control.send(self.sock, self.secret, {"type": "error", "message": "the coordinator is running another job; "
                                                   "submit again when it ends"}, identity=identity)
            return
        if message.get("job") != job:
            return
        wid = message["worker"]
        kind = message["type"]
        if kind == "collect":
            on_collect(message["sink"], message["records"])
        elif kind == "deployed" and deployed is not None:
            deployed[wid] = message["gates"]
        elif kind == "finished" and finished is not None:
            finished[wid] = message["metrics"]
        elif kind == "failed":
            handle = participants.get(wid)
            pid = handle.pid if handle else "?"
            msg = (f"job {graph.name!r} failed: operator {message['operator']!r} on worker {wid} (pid {pid}) "
                   f"raised:\n{message['traceback']}")
            raise JobFailedError(msg)

    def _check_alive(self, graph: JobGraph, participants: dict[int, WorkerHandle]) -> None:
        now = time.monotonic()
        for wid, handle in participants.items():
            code = _exitcode(handle.process)
            silent = now - handle.last_heard > HEARTBEAT_TIMEOUT
            if code is not None or silent:
                ops = ", ".join(repr(v.name) for v in graph.vertices if v.parallelism > wid)
                cause = f"exited with {code}" if code is not None else f"sent no heartbeat for {HEARTBEAT_TIMEOUT:.0f}s"
                arena = handle.arena.size if handle.arena is not None else 0
                self.reclaim(wid)
                msg = (f"job {graph.name!r} failed: worker {wid} (pid {handle.pid}) {cause} while running "
                       f"{ops}; its arena of {format_bytes(arena)} was reclaimed")
                raise JobFailedError(msg)

    # ----------------------------------------------------------- standing mode
    def serve(self, *, stop: Callable[[], bool] = lambda: False) -> None:
        """Accept workers and run the jobs clients submit, one at a time, until ``stop()``."""
        from runtime.jobs import check_graph_payload
        while not stop():
            self._reap_silent()
            received = self.poll(0.2)
            if received is None:
                continue
            identity, message = received
            if message["type"] != "submit":
                continue
            try:
                graph = check_graph_payload(message["graph"])
                metrics = self.run_job(graph, message["graph"], timeout=message.get("timeout"),
                                       on_collect=lambda sink, records: control.send(
                                           self.sock, self.secret, {"type": "collect", "sink": sink,
                                                                    "records": records}, identity=identity),
                                       on_tick=lambda: control.send(self.sock, self.secret, {"type": "running"},
                                                                    identity=identity))
                control.send(self.sock, self.secret, {"type": "result", "metrics": metrics}, identity=identity)
            except Exception as exc:  # the client gets the failure; the coordinator keeps serving
                control.send(self.sock, self.secret, {"type": "error", "message": str(exc)}, identity=identity)

    def _reap_silent(self) -> None:
        now = time.monotonic()
        for wid, handle in list(self.workers.items()):
            if _exitcode(handle.process) is not None or now - handle.last_heard > HEARTBEAT_TIMEOUT:
                log.warning("worker %d (pid %d) is gone; reclaiming its arena", wid, handle.pid)
                self.reclaim(wid)

    # ----------------------------------------------------------------- shutdown
    def close(self) -> None:
        self.broadcast({"type": "shutdown"})
        for wid in list(self.workers):
            self.reclaim(wid)
        self.sock.close(linger=500)
        self.region.close()


class LocalCluster:
    """An embedded cluster: a coordinator in this process and ``config.workers`` worker processes.

    Workers start as ``python -m runtime.worker`` with this process's import
    path (so they can import the user's modules too), never by re-importing
    the user's main module, so job scripts need no ``if __name__ ==
    "__main__"`` guard. They die with this process (PR_SET_PDEATHSIG) and
    ignore Ctrl-C, which the coordinator handles by tearing everything down.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.coordinator = Coordinator(config)
        self.processes: list[subprocess.Popen] = []
        try:
            self._start_workers()
        except BaseException:
            self.close()
            raise

    def _start_workers(self) -> None:
        coord = self.coordinator
        env = dict(os.environ)
        env["PYTHONHASHSEED"] = env.get("PYTHONHASHSEED") or "0"  # hash partitioning needs one seed
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
        for wid in range(self.config.workers):
            proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.worker", str(wid), coord.endpoint, str(os.getpid())],
                stdin=subprocess.PIPE, env=env)
            assert proc.stdin is not None
            proc.stdin.write(coord.secret.hex().encode() + b"\n")  # the secret never shows in `ps`
            proc.stdin.close()
            self.processes.append(proc)
        coord.wait_workers_attached(len(self.processes), processes=self.processes)
        for wid, handle in coord.workers.items():
            handle.process = self.processes[wid]
        coord.region.unlink()  # every worker has mapped it: the name is no longer needed

    def close(self) -> None:
        try:
            self.coordinator.close()
        finally:
            for proc in self.processes:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(5)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_job(graph: JobGraph, config: Any, *, collect: dict[str, Any], coordinator: str | None = None,
            secret_file: str | None = None, timeout: float | None = None) -> Any:
    """Run ``graph`` and fill the collect results; returns a JobResult (see runtime.api)."""
    from runtime.jobs import JobResult, check_shippable, decode_collect, summarize, worker_payloads
    payload = check_shippable(graph) if coordinator is not None else worker_payloads(graph)
    started = time.monotonic()

    def on_collect(sink: str, records: bytes) -> None:
        collect[sink]._extend(decode_collect(records))

    if coordinator is None:
        try:
            cluster = LocalCluster(config)
        except (WorkerLostError, TimeoutError) as exc:
            raise JobFailedError(f"job {graph.name!r} failed: the local cluster did not start: {exc}") from exc
        with cluster:
            tick = _progress_printer(graph.name, cluster.coordinator, started) if sys.stderr.isatty() else None
            try:
                metrics = cluster.coordinator.run_job(graph, payload, on_collect=on_collect, timeout=timeout,
                                                      on_tick=tick)
            finally:
                if tick is not None:
                    sys.stderr.write("\r\x1b[K")
                    sys.stderr.flush()
    else:
        from runtime.client import submit
        metrics = submit(coordinator, graph, payload, on_collect=on_collect, secret_file=secret_file,
                         timeout=timeout)
    seconds = time.monotonic() - started
    return JobResult(graph.name, seconds, summarize(metrics, seconds))


def progress_line(name: str, elapsed: float, progress: dict[str, list[int]], *, width: int = 120) -> str:
    """``[wordcount 3.2s] read_text -> flat_map: 1,204 in / 9,811 out | count: ...`` cut to ``width``."""
    parts = []
    for chain, (records_in, records_out) in progress.items():
        short = chain if len(chain) <= 32 else chain[:29] + "..."
        parts.append(f"{short}: {records_in:,} in / {records_out:,} out")
    line = f"[{name} {elapsed:.1f}s] " + " | ".join(parts)
    return line if len(line) <= width else line[: width - 3] + "..."


def _progress_printer(name: str, coordinator: Coordinator, started: float) -> Callable[[], None]:
    """A tick callback that redraws the progress line on a terminal (stderr)."""
    import shutil

    def tick() -> None:
        merged: dict[str, list[int]] = {}
        for handle in coordinator.workers.values():
            for chain, (records_in, records_out) in (handle.progress or {}).items():
                acc = merged.setdefault(chain, [0, 0])
                acc[0] += records_in
                acc[1] += records_out
        width = shutil.get_terminal_size((120, 20)).columns - 1
        sys.stderr.write("\r\x1b[K" + progress_line(name, time.monotonic() - started, merged, width=width))
        sys.stderr.flush()
    return tick


def render_cluster_layout(config: Any, *, width: int = 64) -> str:
    """A text picture of how a cluster with ``config`` carves its region, built with the real parts.

    Creates the region (then removes it), grants one arena per worker as the
    coordinator does, and carves each arena's network buffer pool as a worker
    does; managed memory is allocated on demand from the rest of the arena.
    """
    from runtime.memory.layout import render_layout
    from runtime.network import NetworkBufferPool
    plan = config.memory_plan()
    with SharedRegion.create(config.region_size) as region:
        coordinator = BuddyAllocator(region, config.min_block)
        views = [("region (coordinator's allocator)", coordinator)]
        pools = []
        for wid in range(config.workers):
            arena = coordinator.allocate(plan.arena_bytes, owner=f"worker-{wid} arena")
            alloc = BuddyAllocator(region, config.min_block, offset=arena.offset, size=arena.size)
            pools.append(NetworkBufferPool(alloc, plan.network_buffers_per_worker, config.segment_size,
                                           owner=f"worker-{wid} network buffers"))
            views.append((f"worker {wid} arena", alloc))
        text = render_layout(views, width=width)
        for pool in pools:
            pool.close()
    managed = (f"managed memory: up to {format_bytes(plan.managed_bytes_per_worker)} per worker, "
               f"allocated on demand from the free part of its arena (memory.managed.fraction)")
    return f"{text}\n{managed}"
