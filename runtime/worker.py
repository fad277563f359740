"""The worker process (Flink's TaskManager): attaches the region, owns its arena, runs subtasks.

Imports: runtime.memory, runtime.network, runtime.control, runtime.graph,
runtime.subtask, runtime.task, runtime.errors. Never imports ``operators``:
the operators arrive pickled inside the job graph and run through
runtime.task's protocol.

Life of a worker: connect to the coordinator and ``register``; receive a
``welcome`` with the region's name and the arena granted to it; attach and
carve the arena into a network buffer pool and managed memory; then, per job,
``deploy`` (build subtasks, bind input gates, report their endpoints),
``start`` (connect result partitions, run the loop), report ``finished`` with
metrics, or ``failed`` with the operator's traceback. Heartbeats every
``HEARTBEAT_INTERVAL`` seconds let the coordinator tell a hung worker from a
busy one.

The loop is single-threaded and cooperative: it steps every subtask whose
outputs have room, fires processing-time timers, flushes buffers whose
``network.buffer-timeout`` expired, and otherwise waits on all its sockets at
once. A worker whose coordinator goes away shuts itself down.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
import traceback
from typing import Any

import zmq

from runtime import control
from runtime.graph import JobGraph
from runtime.memory import BuddyAllocator, SharedRegion
from runtime.memory.manager import MemoryManager
from runtime.network import NetworkBufferPool
from runtime.network.channel import InputGate, ResultPartition
from runtime.network.records import Partitioner, RecordReader, RecordWriter, pack_batch
from runtime.network.transport import connect, context, make_socket
from runtime.subtask import OperatorFailure, Subtask
from runtime.task import OperatorContext

log = logging.getLogger("shmflow.worker")

HEARTBEAT_INTERVAL = 0.5
COORDINATOR_SILENCE = 45.0  # seconds without a word from the coordinator before a worker gives up


class JobCancelled(Exception):
    pass


class Worker:
    """One worker process.

    Ownership: the worker owns its arena (granted by the coordinator): the
    network buffer pool and the managed memory carved from it, and every
    buffer and page handed out from them. It returns nothing explicitly: the
    coordinator reclaims the whole arena when the worker exits or dies.
    Process: the worker process, one thread.
    """

    def __init__(self, worker_id: int, endpoint: str, secret: bytes) -> None:
        self.worker_id = worker_id
        self.secret = secret
        self.ctx = context()
        self.sock = make_socket(self.ctx, zmq.DEALER, identity=f"worker-{worker_id}-{os.getpid()}".encode())
        connect(self.sock, endpoint)
        self.region: SharedRegion | None = None
        self.network: NetworkBufferPool | None = None
        self.memory: MemoryManager | None = None
        self.welcome: dict[str, Any] = {}
        self._last_heartbeat = 0.0
        self._last_heard = time.monotonic()
        self.progress: Any = None  # () -> {operator chain: [records in, records out]} while a job runs

    # ------------------------------------------------------------------ control
    def send(self, message: dict[str, Any]) -> None:
        control.send(self.sock, self.secret, message)

    def recv(self, timeout: float) -> dict[str, Any] | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        message = control.recv(self.sock, self.secret)
        if message is not None:
            self._last_heard = time.monotonic()
        return message

    def heartbeat(self, now: float) -> None:
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL:
            self._last_heartbeat = now
            progress = self.progress() if self.progress is not None else None
            self.send({"type": "heartbeat", "worker": self.worker_id, "progress": progress})
        if now - self._last_heard > COORDINATOR_SILENCE:
            raise SystemExit(f"worker {self.worker_id}: no word from the coordinator for {COORDINATOR_SILENCE}s")

    # ----------------------------------------------------------------- lifetime
    def register(self, *, timeout: float = 60.0) -> None:
        self.send({"type": "register", "worker": self.worker_id, "pid": os.getpid()})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.recv(0.5)
            if message is None:
                continue
            if message["type"] == "welcome":
                self.worker_id = int(message["worker"])
                self._setup_arena(message)
                self.send({"type": "attached", "worker": self.worker_id})
                return
            if message["type"] == "shutdown":
                raise SystemExit(0)
        raise SystemExit(f"worker {self.worker_id}: coordinator did not welcome it within {timeout}s")

    def _setup_arena(self, welcome: dict[str, Any]) -> None:
        self.welcome = welcome
        self.region = SharedRegion.attach(welcome["region"])
        offset, size = welcome["arena"][:2]
        alloc = BuddyAllocator(self.region, welcome["min_block"], offset=offset, size=size)
        self.network = NetworkBufferPool(alloc, welcome["network_buffers"], welcome["segment_size"],
                                         owner=f"worker-{self.worker_id} network")
        self.memory = MemoryManager(alloc, budget=welcome["managed_bytes"], page_size=welcome["segment_size"],
                                    name=f"worker-{self.worker_id} managed memory")

    def serve(self) -> None:
        """Run jobs until told to shut down (or the coordinator goes silent)."""
        while True:
            self.heartbeat(time.monotonic())
            message = self.recv(HEARTBEAT_INTERVAL)
            if message is None:
                continue
            kind = message["type"]
            if kind == "shutdown":
                return
            if kind == "deploy":
                run = JobRun(self, message)
                profile_dir = os.environ.get("SHMFLOW_INTERNAL_PROFILE")
                if profile_dir:  # a development aid: cProfile each job, one file per worker
                    import cProfile
                    cProfile.runctx("run.run()", {}, {"run": run},
                                    os.path.join(profile_dir, f"worker-{self.worker_id}-{run.job_id}.prof"))
                else:
                    run.run()

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
        if self.network is not None:
            self.network.close(check=False)
        if self.region is not None:
            self.region.close()
        self.sock.close(linger=1000)


class JobRun:
    """One job on one worker: its subtasks, gates, writers and the loop that drives them."""

    def __init__(self, worker: Worker, deploy: dict[str, Any]) -> None:
        self.worker = worker
        self.job_id = deploy["job"]
        self._payload: bytes | None = deploy.pop("graph")  # pickled; unpickled in run(), where failures are reported
        self.graph: JobGraph | None = None
        self.config: dict[str, Any] = deploy["config"]
        self._current: str | None = None  # the operator chain running now, for failure reports
        self.subtasks: list[Subtask] = []
        self.gates: dict[int, InputGate] = {}
        self.partitions: list[ResultPartition] = []
        self.pools: list[Any] = []
        self.writers: list[RecordWriter] = []

    def send(self, message: dict[str, Any]) -> None:
        self.worker.send({"job": self.job_id, "worker": self.worker.worker_id, **message})

    # ------------------------------------------------------------------ phases
    def run(self) -> None:
        self.worker.progress = lambda: {st.vertex.name: [st.records_in, st.records_out] for st in self.subtasks}
        try:
            import cloudpickle  # the job graph arrives pickled (its HMAC was verified on receipt)
            gc.disable()  # a graph may hold millions of records (from_collection): no collections while they load
            try:
                self.graph = cloudpickle.loads(self._payload)
            finally:
                gc.enable()
            self._payload = None
            gc.freeze()  # the graph lives as long as the job: keep it out of every collection until then
            self._deploy()
            start = self._wait_for("start")
            self._connect(start["gates"])
            self._loop()
            self._drain()
            self.send({"type": "finished", "metrics": self._metrics()})
        except JobCancelled:
            pass
        except OperatorFailure as exc:
            self.send({"type": "failed", "operator": exc.operator, "traceback": exc.traceback})
        except Exception as exc:  # runtime failure: report it with its traceback
            self.send({"type": "failed", "operator": self._current or "runtime",
                       "traceback": "".join(traceback.format_exception(exc))})
        finally:
            self.worker.progress = None
            self._close()
            gc.unfreeze()

    def _deploy(self) -> None:
        w = self.worker
        cfg = self.config
        mode = self.graph.mode
        gates: dict[str, str] = {}
        for vertex in self.graph.vertices:
            if w.worker_id >= vertex.parallelism:
                continue
            index = w.worker_id
            self._current = vertex.name
            operators = [self._instantiate(node, index) for node in vertex.nodes]
            gate = None
            if vertex.inputs:
                channels = self.graph.gate_channels(vertex)
                gate = InputGate(channels, exclusive=cfg["network.buffers-per-channel"],
                                 floating=cfg["network.floating-buffers-per-gate"],
                                 name=f"{vertex.name}[{index}]", region=w.region,
                                 endpoint="tcp://127.0.0.1:*" if cfg["network.transport"] == "tcp" else None)
                self.gates[vertex.id] = gate
                gates[str(vertex.id)] = gate.endpoint

            def ctx_factory(name: str, subtask: int, parallelism: int) -> OperatorContext:
                return OperatorContext(operator_name=name, subtask_index=subtask, parallelism=parallelism,
                                       worker_id=w.worker_id, mode=mode, memory=w.memory,
                                       send_to_client=self._send_to_client)

            st = Subtask(self.graph, vertex, index, operators, gate=gate, ctx_factory=ctx_factory)
            if gate is not None:
                st.attach_input(RecordReader(gate, max_record_size=cfg["network.max-record-size"]),
                                self.graph.gate_channels(vertex))
            self.subtasks.append(st)
        self._current = None
        self.send({"type": "deployed", "gates": gates})

    def _instantiate(self, node: Any, index: int) -> Any:
        op = node.operator
        if node.is_source and callable(getattr(op, "split", None)) and node.split_for != index:
            return op.split(node.parallelism)[index]  # the whole source arrived (a standing cluster's job)
        return op

    def _connect(self, gate_endpoints: dict[str, list[str]]) -> None:
        """Create one result partition per output edge, connected to every target subtask's gate."""
        w = self.worker
        cfg = self.config
        transport = "tcp" if cfg["network.transport"] == "tcp" else "shm"
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
                per_channel = cfg["network.buffers-per-channel"] + cfg["network.floating-buffers-per-gate"]
                # n + 1 guaranteed buffers: Coordinator.check_network_buffers counts the same
                pool = w.network.create_buffer_pool(n + 1, n * per_channel + 1,
                                                    name=f"{st.vertex.name}[{st.index}]->{target.id}")
                self.pools.append(pool)
                part = ResultPartition(pool, [endpoints[t] for t in targets], channel_ids=channel_id,
                                       transport=transport, name=f"{st.vertex.name}[{st.index}]",
                                       max_backlog=per_channel)
                self.partitions.append(part)
                writer = RecordWriter(part, Partitioner(edge.partitioning, n, key_fn=edge.key_fn,
                                                        columnar_key=edge.columnar_key),
                                      buffer_timeout=cfg["network.buffer-timeout"],
                                      max_record_size=cfg["network.max-record-size"])
                st.writers.append(writer)
                self.writers.append(writer)
        for gate in self.gates.values():
            gate.wait_connected(timeout=60)

    def _wait_for(self, kind: str) -> dict[str, Any]:
        while True:
            self.worker.heartbeat(time.monotonic())
            message = self.worker.recv(HEARTBEAT_INTERVAL)
            if message is None:
                continue
            if message["type"] == "cancel" or message["type"] == "shutdown":
                raise JobCancelled()
            if message["type"] == kind and message.get("job") == self.job_id:
                return message

    # -------------------------------------------------------------------- loop
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.worker.sock, zmq.POLLIN)
        for gate in self.gates.values():
            poller.register(gate.socket, zmq.POLLIN)
        for part in self.partitions:
            for ch in part.channels:
                poller.register(ch.socket, zmq.POLLIN)
        pending = [st for st in self.subtasks if not st.finished]
        while pending:
            now = time.monotonic()
            progressed = False
            for st in pending:
                self._current = st.vertex.name
                if st.step():
                    progressed = True
                if st.fire_timers(time.time()):
                    progressed = True
            self._current = None
            for writer in self.writers:
                writer.flush_if_due(now)
                writer.partition.ship_all()
            pending = [st for st in pending if not st.finished]
            self.worker.heartbeat(now)
            if self.worker.sock.poll(0):
                self._on_control()
            if not progressed and pending:
                poller.poll(int(self._idle_wait(pending, now) * 1000))

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

    def _on_control(self) -> None:
        message = self.worker.recv(0)
        if message is not None and message["type"] in ("cancel", "shutdown"):
            raise JobCancelled()

    def _drain(self) -> None:
        """Every subtask finished: ship what is left and wait until consumers recycled it all."""
        for writer in self.writers:
            writer.flush()
        deadline = time.monotonic() + 60
        for part in self.partitions:
            while part.stats().in_flight:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{part.name}: consumers did not recycle {part.stats().in_flight} buffers in 60s")
                self.worker.heartbeat(time.monotonic())
                if self.worker.sock.poll(0):
                    self._on_control()
                for gate in self.gates.values():
                    gate.flush_credits()
                part._wait_control(0.05)

    def _send_to_client(self, sink_id: str, batch: Any) -> None:
        self.send({"type": "collect", "sink": sink_id, "records": pack_batch(batch)})

    def _metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for st in self.subtasks:
            out[f"{st.vertex.name}[{st.index}]"] = st.metrics()
        network_peak = sum(p.stats().peak_in_use for p in self.pools) * self.worker.welcome["segment_size"]
        managed_peak = self.worker.memory.stats().high_water_mark if self.worker.memory is not None else 0
        out["memory_high_water_bytes"] = network_peak + managed_peak
        return out

    def _close(self) -> None:
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
        if self.worker.memory is not None:
            for owner in list(self.worker.memory.owners()):
                self.worker.memory.release_all(owner)


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


def worker_main(worker_id: int, endpoint: str, secret: bytes) -> None:
    """Run one worker until the coordinator shuts it down."""
    logging.basicConfig(level=logging.WARNING, format=f"worker {worker_id}: %(message)s")
    worker = Worker(worker_id, endpoint, secret)
    try:
        worker.register()
        worker.serve()
    finally:
        worker.close()


def main(argv: list[str]) -> None:
    """``python -m runtime.worker ID ENDPOINT PARENT_PID``; the secret (hex) comes on stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the coordinator tears down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    worker_id, endpoint, parent = int(argv[0]), argv[1], int(argv[2])
    _die_with_parent(parent)
    secret = bytes.fromhex(sys.stdin.readline().strip())
    worker_main(worker_id, endpoint, secret)


if __name__ == "__main__":
    main(sys.argv[1:])
