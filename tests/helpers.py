"""Test helpers: waiting on conditions without sleeping as synchronisation, spawn contexts."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

SPAWN = multiprocessing.get_context("spawn")


def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0, msg: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail with ``msg`` after ``timeout`` seconds.

    For conditions that have no event to wait on (a /dev/shm entry vanishing,
    a process being reaped by the kernel).
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {msg}")
        time.sleep(delay)  # sleep-ok: polling a condition that has no event
        delay = min(delay * 2, 0.05)


def reap(proc, *, timeout: float = 5.0) -> int | None:
    """terminate -> join -> kill -> join; returns the exit code."""
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout)
    return proc.exitcode


class FakeClock:
    """A monotonic clock that moves only when a test says so: ``clock.advance(30)`` instead of waiting.

    Pass it where the code takes a ``clock`` (e.g. ``Coordinator(config, clock=clock)``).
    Reading it from several threads is safe: a float attribute is read atomically.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.contextmanager
def managed_memory(tmp_path: object, size: int = 16 << 20, page: int = 4096) -> Iterator[tuple]:
    """A real region, a MemoryManager over it (``page``-byte pages) and an IOManager in ``tmp_path``.

    On the way out it fails the test if any managed memory is still allocated or a spill file is left.
    """
    from runtime.io import IOManager
    from runtime.memory import SharedRegion
    from runtime.memory.manager import MemoryManager

    with SharedRegion.create(size) as region, IOManager(str(tmp_path), threads=1) as io:
        mm = MemoryManager.for_range(region, 0, size, page_size=page, min_block=256, name="test managed")
        try:
            yield mm, io
            assert mm.used_bytes == 0, f"managed memory left allocated: {mm.owners()}"
            assert os.listdir(io.directory) == [], "spill files left behind"
        finally:
            assert mm.close() == []
            assert mm.allocator.allocated_bytes == 0


def start_cli(*args: str) -> subprocess.Popen:
    """``python -m runtime.cli ARGS`` with its output captured as text."""
    return subprocess.Popen([sys.executable, "-m", "runtime.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running, wait (SIGKILL after 15 s), close their pipes."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()


@contextlib.contextmanager
def standing_cluster(tmp_path, *coordinator_args: str, workers: int = 2) -> Iterator[tuple]:
    """A standing cluster (``shmflow coordinator`` on a free tcp port, ``workers`` ``shmflow worker``s):
    ``(endpoint, secret file, coordinator process, worker processes)``. Processes appended to that list of
    workers are stopped on the way out too."""
    secret = tmp_path / "cluster.secret"
    coord = start_cli("coordinator", "--bind", "tcp://127.0.0.1:*", "--secret-file", str(secret), "--workers",
                      str(workers), "-D", "rest.port=0", *coordinator_args)  # its dashboard on any free port
    started: list[subprocess.Popen] = []
    try:
        first = coord.stdout.readline()
        assert first.startswith("coordinator listening on "), first + coord.stderr.read()
        endpoint = first.split()[3].rstrip(";")
        for _ in range(workers):
            started.append(start_cli("worker", "--coordinator", endpoint, "--secret-file", str(secret)))
        yield endpoint, secret, coord, started
    finally:
        stop_processes([coord, *started])
