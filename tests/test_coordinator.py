"""The coordinator's bookkeeping of workers, driven by a test that speaks the control protocol itself.

Real region, real ZeroMQ sockets, the real signed protocol; only time is
injected (:class:`helpers.FakeClock`), so heartbeat expiry is tested without
waiting 30 seconds.
"""

from __future__ import annotations

import os
import threading

import pytest
import zmq

from runtime import StreamEnvironment
from runtime.cluster import protocol
from runtime.cluster.coordinator import HEARTBEAT_TIMEOUT, Coordinator
from runtime.config import load_config
from runtime.errors import JobFailedError
from runtime.network.transport import connect, context, make_socket


class ProtocolWorker:
    """A stand-in worker process: registers and heartbeats over a real DEALER socket, runs nothing."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.secret = coordinator.secret
        self.sock = make_socket(context(), zmq.DEALER, identity=f"test-worker-{os.getpid()}".encode())
        connect(self.sock, coordinator.endpoint)

    def send(self, message: protocol.Message) -> None:
        protocol.send(self.sock, self.secret, message)

    def recv(self, *, timeout: float = 10.0) -> protocol.Message:
        assert self.sock.poll(int(timeout * 1000)), "no message from the coordinator"
        message = protocol.recv(self.sock, self.secret)
        assert message is not None
        return message

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def coordinator(clock):
    coord = Coordinator(load_config(overrides={"workers": 1, "memory.region.size": "32mb"}), clock=clock)
    try:
        yield coord
    finally:
        coord.close()


@pytest.fixture
def worker(coordinator):
    w = ProtocolWorker(coordinator)
    w.send(protocol.Register(worker=-1, pid=os.getpid()))
    while not coordinator.workers:
        coordinator.poll(0.1)
    welcome = w.recv()
    assert isinstance(welcome, protocol.Welcome)
    w.send(protocol.Attached(worker=welcome.worker))
    while not coordinator.workers[welcome.worker].attached:
        coordinator.poll(0.1)
    try:
        yield w
    finally:
        w.close()


def test_a_registered_worker_is_granted_an_arena_and_numbered(coordinator, worker):
    assert list(coordinator.workers) == [0]
    handle = coordinator.workers[0]
    assert handle.arena is not None and handle.arena.size == coordinator.plan.arena_bytes
    assert coordinator.allocator.stats().allocated_bytes == handle.arena.size


def test_a_silent_worker_is_reclaimed_after_the_heartbeat_timeout(coordinator, worker, clock):
    coordinator._reap_silent()
    assert 0 in coordinator.workers  # heard from just now
    clock.advance(HEARTBEAT_TIMEOUT - 1)
    coordinator._reap_silent()
    assert 0 in coordinator.workers
    worker.send(protocol.Heartbeat(worker=0))
    assert coordinator.poll(5) is None  # heartbeats are handled inside poll
    assert isinstance(worker.recv(), protocol.Ack)
    clock.advance(HEARTBEAT_TIMEOUT - 1)  # the heartbeat renewed its lease
    coordinator._reap_silent()
    assert 0 in coordinator.workers
    clock.advance(2)
    coordinator._reap_silent()
    assert coordinator.workers == {}
    assert coordinator.allocator.stats().allocated_bytes == 0  # its arena was reclaimed


def test_a_job_fails_by_name_when_its_worker_stops_heartbeating(coordinator, worker, clock):
    env = StreamEnvironment(workers=1)
    env.from_collection([1, 2, 3]).map(lambda x: x).collect()
    graph = env.job_graph("silent")
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            coordinator.run_job(graph, b"never unpickled", on_collect=lambda sink, records: None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    deploy = worker.recv()  # the stand-in never answers
    assert isinstance(deploy, protocol.Deploy)
    clock.advance(HEARTBEAT_TIMEOUT + 1)
    runner.join(30)
    assert not runner.is_alive()
    error = outcome["error"]
    assert isinstance(error, JobFailedError)
    assert f"worker 0 (pid {os.getpid()}) sent no heartbeat for {HEARTBEAT_TIMEOUT:.0f}s" in str(error)
    assert "its arena of 32 MiB was reclaimed" in str(error)
    assert coordinator.workers == {}
