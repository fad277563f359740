"""What a worker process costs while it runs a job: peak RSS and Python GC pause time, measured from inside.

Imports: stdlib only.

A job reports both in its metrics, so that a user sees whether memory is
bounded by configuration (peak RSS) and what the heap costs (GC pauses).
Tests and benchmarks also measure RSS from outside (``RUSAGE_CHILDREN``,
/proc); these figures are the worker's own account of the same thing.

Peak RSS is the kernel's ``VmHWM`` of the process. :func:`reset_peak_rss`
asks the kernel to restart it from the current RSS (``/proc/self/clear_refs``,
Linux 4.0+), so a standing worker reports each job's own peak, not the
largest of every job it ran. Where that is not possible the peak is the
process's since it started, which only overstates.
"""

from __future__ import annotations

import gc
import resource
import time


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes (since start, or since :func:`reset_peak_rss`)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart the kernel's peak RSS count from the current RSS; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class GcTimer:
    """Total time this process spent in Python's cyclic garbage collector, from ``gc.callbacks``.

    One per process (:func:`gc_timer`); install it once, read :attr:`seconds`
    before and after a job. Process: any thread; the collector runs its
    callbacks under the GIL.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1
            self._started = None


_TIMER: GcTimer | None = None


def gc_timer() -> GcTimer:
    """This process's GC timer, installed in ``gc.callbacks`` on first use."""
    global _TIMER
    if _TIMER is None:
        _TIMER = GcTimer()
        gc.callbacks.append(_TIMER)
    return _TIMER


__all__ = ["GcTimer", "gc_timer", "peak_rss_bytes", "reset_peak_rss"]
