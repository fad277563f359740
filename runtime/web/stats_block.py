"""The stats block: one fixed-layout slot per worker in the region's stats area, for counters that change often.

Imports: runtime.execution.job_run (SubtaskCounters, what a job reports of each subtask); numpy.

Ownership: slot ``i`` is written by worker ``i`` alone (its :class:`StatsWriter`),
and read by the coordinator (:func:`read_slot`), which never writes it. A
replacement worker takes over the slot of the one it replaces, after that one
died. No lock: the writer brackets every update with a sequence counter
(a seqlock: odd while writing), and the reader retries a copy taken while the
counter was odd or changed. So the coordinator learns the counters without a
message per metric, and a slow reader can never slow a worker.

Layout of a slot (little-endian int64 words)::

    [ header: HEADER_WORDS words | subtask 0: SUBTASK_WORDS words | subtask 1 | ... up to MAX_SUBTASKS ]

Times are nanoseconds. ``written_at`` is CLOCK_MONOTONIC, which is system-wide,
so the reader subtracts it from its own clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from runtime.execution.job_run import SubtaskCounters

SLOT_BYTES = 16384
HEADER_WORDS = 32
SUBTASK_WORDS = 14
MAX_SUBTASKS = (SLOT_BYTES // 8 - HEADER_WORDS) // SUBTASK_WORDS

# Header words.
SEQ, PID, WRITTEN_AT, STARTED_AT, RSS, GC_NS, GC_COLLECTIONS, HEARTBEATS = range(8)
NET_TOTAL, NET_AVAILABLE, MANAGED_BUDGET, MANAGED_USED, MANAGED_PEAK, SPILLED, JOB, SUBTASKS = range(8, 16)
# Subtask words, from the subtask's first word.
S_VERTEX, S_INDEX, S_IN, S_OUT, S_BUSY, S_BACKPRESSURED, S_IDLE, S_OUT_POOL, S_IN_POOL, S_FINISHED = range(10)
S_MANAGED, S_MANAGED_PEAK, S_SPILLED = range(10, 13)
#: Pool usages are stored in parts per million.
PPM = 1_000_000


def area_bytes(workers: int) -> int:
    """The stats area a region needs for ``workers`` worker slots."""
    return workers * SLOT_BYTES


@dataclass(frozen=True)
class WorkerCounters:
    """One worker's process and memory counters."""

    pid: int
    started_at_ns: int
    rss_bytes: int
    gc_ns: int
    gc_collections: int
    heartbeats: int
    network_buffers: int
    network_available: int
    managed_budget: int
    managed_used: int
    managed_peak: int
    spilled_bytes: int
    job: int  # the running job's id as an int (0: none), so a reader can tell a stale job's counters


@dataclass(frozen=True)
class WorkerSample:
    """What :func:`read_slot` saw: a consistent copy of one slot."""

    written_at_ns: int
    worker: WorkerCounters
    subtasks: tuple[SubtaskCounters, ...]


def _slot_words(area: memoryview, slot: int) -> np.ndarray:
    if (slot + 1) * SLOT_BYTES > len(area):
        msg = f"stats slot {slot} lies outside the stats area of {len(area)} bytes ({len(area) // SLOT_BYTES} slots)"
        raise IndexError(msg)
    return np.frombuffer(area, dtype="<i8", count=SLOT_BYTES // 8, offset=slot * SLOT_BYTES)


class StatsWriter:
    """The one writer of a worker's slot.

    Process: the worker that owns slot ``slot``; its one thread.
    """

    def __init__(self, area: memoryview, slot: int) -> None:
        self._words = _slot_words(area, slot)  # owner: this writer only
        if self._words[SEQ] % 2 == 0:  # odd while clearing (a dead writer may have left it odd already)
            self._words[SEQ] += 1
        self._words[SEQ + 1:] = 0
        self._words[SEQ] += 1

    def publish(self, worker: WorkerCounters, subtasks: list[SubtaskCounters]) -> None:
        """Write one consistent update (subtasks beyond MAX_SUBTASKS are left out)."""
        w = self._words
        w[SEQ] += 1  # odd: readers retry until the next increment
        w[PID], w[STARTED_AT], w[RSS], w[GC_NS] = worker.pid, worker.started_at_ns, worker.rss_bytes, worker.gc_ns
        w[GC_COLLECTIONS], w[HEARTBEATS] = worker.gc_collections, worker.heartbeats
        w[NET_TOTAL], w[NET_AVAILABLE] = worker.network_buffers, worker.network_available
        w[MANAGED_BUDGET], w[MANAGED_USED], w[MANAGED_PEAK] = (worker.managed_budget, worker.managed_used,
                                                               worker.managed_peak)
        w[SPILLED], w[JOB] = worker.spilled_bytes, worker.job
        shown = subtasks[:MAX_SUBTASKS]
        w[SUBTASKS] = len(shown)
        for i, st in enumerate(shown):
            base = HEADER_WORDS + i * SUBTASK_WORDS
            w[base:base + S_SPILLED + 1] = (
                st.vertex, st.index, st.records_in, st.records_out, st.busy_ns, st.backpressured_ns, st.idle_ns,
                int(st.out_pool_usage * PPM), int(st.in_pool_usage * PPM), int(st.finished), st.managed_bytes,
                st.managed_peak, st.spilled_bytes)
        w[WRITTEN_AT] = time.monotonic_ns()
        w[SEQ] += 1

    def close(self) -> None:
        """Drop the view of the region (the region can then be unmapped)."""
        self._words = np.empty(0, dtype="<i8")


def read_slot(area: memoryview, slot: int, *, attempts: int = 100) -> WorkerSample | None:
    """A consistent copy of slot ``slot``; None if it was never written (or no copy was consistent).

    Process: any; never writes the slot.
    """
    words = _slot_words(area, slot)
    for _ in range(attempts):
        before = int(words[SEQ])
        if before % 2:
            continue
        copy = words.copy()
        if int(words[SEQ]) != before:
            continue
        if copy[WRITTEN_AT] == 0:
            return None
        n = int(min(max(copy[SUBTASKS], 0), MAX_SUBTASKS))
        subtasks = []
        for i in range(n):
            b = HEADER_WORDS + i * SUBTASK_WORDS
            v = [int(x) for x in copy[b:b + S_SPILLED + 1]]
            subtasks.append(SubtaskCounters(v[S_VERTEX], v[S_INDEX], v[S_IN], v[S_OUT], v[S_BUSY],
                                            v[S_BACKPRESSURED], v[S_IDLE], v[S_OUT_POOL] / PPM, v[S_IN_POOL] / PPM,
                                            bool(v[S_FINISHED]), v[S_MANAGED], v[S_MANAGED_PEAK], v[S_SPILLED]))
        h = [int(x) for x in copy[:HEADER_WORDS]]
        worker = WorkerCounters(h[PID], h[STARTED_AT], h[RSS], h[GC_NS], h[GC_COLLECTIONS], h[HEARTBEATS],
                                h[NET_TOTAL], h[NET_AVAILABLE], h[MANAGED_BUDGET], h[MANAGED_USED], h[MANAGED_PEAK],
                                h[SPILLED], h[JOB])
        return WorkerSample(h[WRITTEN_AT], worker, tuple(subtasks))
    return None


__all__ = ["MAX_SUBTASKS", "SLOT_BYTES", "StatsWriter", "SubtaskCounters", "WorkerCounters", "WorkerSample",
           "area_bytes", "read_slot"]
