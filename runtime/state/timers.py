"""Timers of a keyed operator: per key, in event time and in processing time, each at most once per timestamp.

Imports: stdlib only.

:class:`TimerQueue` keeps ``(timestamp, key)`` timers in a heap with a set
beside it, so that registering the same timer twice keeps one (as Flink) and
deleting one is O(1) (it is skipped when it reaches the top). Timers fire in
timestamp order: event-time timers when a watermark reaches them (a timer
registered for a time the watermark has already passed fires at the next
watermark, as in Flink), processing-time timers when the clock does.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import Any

__all__ = ["TimerQueue"]


class TimerQueue:
    """``(timestamp, key)`` timers of one time domain. Keys must be hashable (they are keys of a keyed stream).

    Ownership: the operator's; the heap and set live on the worker's heap (a timer is two small objects).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._live: set[tuple[float, Any]] = set()
        self._order = itertools.count()  # ties in time fire in registration order; keys need not compare

    def __len__(self) -> int:
        return len(self._live)

    def register(self, timestamp: float, key: Any) -> None:
        timer = (timestamp, key)
        if timer in self._live:
            return
        self._live.add(timer)
        heapq.heappush(self._heap, (timestamp, next(self._order), key))

    def delete(self, timestamp: float, key: Any) -> None:
        self._live.discard((timestamp, key))

    def next_time(self) -> float | None:
        """The earliest live timer's timestamp, or None."""
        heap = self._heap
        while heap and (heap[0][0], heap[0][2]) not in self._live:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, until: float) -> Iterator[tuple[float, Any]]:
        """Remove and yield every live timer with ``timestamp <= until``, in order. Timers registered while
        iterating (by ``on_timer``) that are already due fire in the same pass."""
        heap, live = self._heap, self._live
        while heap and heap[0][0] <= until:
            timestamp, _, key = heapq.heappop(heap)
            timer = (timestamp, key)
            if timer in live:
                live.discard(timer)
                yield timer

    def items(self) -> list[tuple[float, Any]]:
        """Every live timer (for snapshots and tests), in no particular order."""
        return list(self._live)

    def snapshot(self) -> list[tuple[float, Any]]:
        """Every live timer in the order they would fire (timestamp, then registration), for a checkpoint."""
        live = self._live
        out: list[tuple[float, Any]] = []
        seen: set[tuple[float, Any]] = set()
        for timestamp, _, key in sorted(self._heap, key=lambda entry: entry[:2]):
            timer = (timestamp, key)
            if timer in live and timer not in seen:  # a timer deleted and registered again: its first entry fires
                seen.add(timer)
                out.append(timer)
        return out

    def restore(self, timers: list[Any]) -> None:
        """Register :meth:`snapshot`'s timers (decoded) again, in their order (so ties fire as they would have)."""
        for timestamp, key in timers:
            self.register(timestamp, key)
