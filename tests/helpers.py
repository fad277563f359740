"""Test helpers: waiting on conditions without sleeping as synchronisation, spawn contexts."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable

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
