"""The coordinator's side of checkpoints: trigger them, gather the acknowledgements, complete them.

Imports: runtime.checkpoint, runtime.execution (graph, checkpointing), runtime.cluster.protocol.

One :class:`CheckpointCoordinator` per run of a job (Flink's
CheckpointCoordinator). Every ``execution.checkpointing.interval`` it starts
checkpoint ``n`` (one at a time: the next is triggered once the last one
completed or was aborted): it makes ``chk-<n>`` in the job's checkpoint
directory and returns the TriggerCheckpoint the coordinator sends to every
worker; sources snapshot and inject barrier ``n``. Each subtask
acknowledges ``n`` once it snapshotted (its state file's handle, or none if
it had finished); when every subtask of the graph did, the checkpoint's
``_metadata`` is written (atomically, last) and it is complete. A
checkpoint not complete after ``execution.checkpointing.timeout`` is aborted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime.checkpoint import DEPENDS_ON_KEY, CheckpointMetadata, CheckpointStorage, CompletedCheckpoint, StateHandle
from runtime.cluster.protocol import AckCheckpoint, TriggerCheckpoint
from runtime.execution.checkpointing import FINISHED_KEY, shared_key, subtask_key
from runtime.execution.graph import JobGraph

__all__ = ["SOURCES_KEY", "CheckpointCoordinator", "CheckpointStats", "graph_fingerprint", "job_directory_name"]

#: The key of a checkpoint's metadata ``extra`` with each source subtask's position.
SOURCES_KEY = "sources"


def graph_fingerprint(graph: JobGraph) -> dict[str, str]:
    """Per vertex id: its operator chain and parallelism (a checkpoint restores only onto the same)."""
    return {str(v.id): f"{' -> '.join(node.name for node in v.nodes)} (parallelism {v.parallelism})"
            for v in graph.vertices}


def job_directory_name(job_name: str, token: str) -> str:
    """A job's checkpoint directory name: its name made path-safe, and a token unique to this submission."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", job_name).strip("._") or "job"
    return f"{safe[:60]}-{token}"


@dataclass
class _Pending:
    checkpoint_id: int
    timestamp: float  # wall clock, when triggered
    started: float  # monotonic
    handles: dict[str, StateHandle] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    sources: dict[str, Any] = field(default_factory=dict)  # subtask key -> its source's position
    shared: dict[str, list[int]] = field(default_factory=dict)  # subtask key -> [region offset, bytes] of its blob
    depends_on: int = 0  # the oldest checkpoint whose files its subtasks' snapshots need
    alignment_seconds: float = 0.0


@dataclass
class CheckpointStats:
    """What the job's metrics say of its checkpoints."""

    completed: int = 0
    failed: int = 0
    last_id: int = 0
    last_duration_seconds: float = 0.0
    last_size_bytes: int = 0
    max_alignment_seconds: float = 0.0
    total_duration_seconds: float = 0.0
    #: The largest and the longest of the job's checkpoints (the last one of a job whose subtasks had all
    #: finished holds no state: 0 bytes).
    max_size_bytes: int = 0
    max_duration_seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        return {"checkpoints": self.completed, "checkpoints_failed": self.failed,
                "checkpoint_last_id": self.last_id, "checkpoint_duration_seconds": self.last_duration_seconds,
                "checkpoint_size_bytes": self.last_size_bytes,
                "checkpoint_max_size_bytes": self.max_size_bytes,
                "checkpoint_max_duration_seconds": self.max_duration_seconds,
                "checkpoint_alignment_seconds": self.max_alignment_seconds,
                "checkpoint_total_seconds": self.total_duration_seconds}


class CheckpointCoordinator:
    """Checkpoints of one job (across its restarts): see the module docstring.

    Ownership: the coordinator's; ``storage`` owns the files. ``clock`` is
    monotonic (intervals, timeouts), ``wall`` the time recorded in barriers.
    Process: the coordinator, its one thread.
    """

    def __init__(self, storage: CheckpointStorage, graph: JobGraph, *, job_id: str, job_name: str,
                 interval: float, timeout: float, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.job_id, self.job_name = job_id, job_name
        self.interval, self.timeout = interval, timeout
        self.clock, self.wall = clock, wall
        self.expected = {subtask_key(v.id, i) for v in graph.vertices for i in range(v.parallelism)}
        self.fingerprint = graph_fingerprint(graph)
        self.latest: CompletedCheckpoint | None = storage.latest()
        #: Where the blobs of the checkpoints this coordinator completed lie in the region, by checkpoint id
        #: (subtask key -> [offset, bytes]): the latest one's and those it builds on. (One found on disk was
        #: taken by another region.)
        self.shared: dict[int, dict[str, list[int]]] = {}
        self.next_id = (self.latest.checkpoint_id if self.latest else 0) + 1
        self.pending: _Pending | None = None
        self.stats = CheckpointStats()
        self._next_trigger = clock() + interval

    def start_run(self) -> None:
        """A (re)started run of the job: the first checkpoint comes one interval from now."""
        self.abort_pending()
        self._next_trigger = self.clock() + self.interval

    def maybe_trigger(self, job: str) -> TriggerCheckpoint | None:
        """The TriggerCheckpoint to send now (for the run ``job``), or None (not due, or one is pending)."""
        now = self.clock()
        pending = self.pending
        if pending is not None:
            if now - pending.started > self.timeout:
                self.abort_pending()
            return None
        if now < self._next_trigger:
            return None
        checkpoint_id = self.next_id
        self.next_id += 1
        self.storage.checkpoint_dir(checkpoint_id)
        self.pending = _Pending(checkpoint_id, self.wall(), now)
        return TriggerCheckpoint(job=job, checkpoint=checkpoint_id, timestamp=self.pending.timestamp)

    def on_ack(self, message: AckCheckpoint) -> CompletedCheckpoint | None:
        """Record an acknowledgement; the checkpoint, once every subtask acknowledged it (else None)."""
        pending = self.pending
        if pending is None or message.checkpoint != pending.checkpoint_id or message.subtask not in self.expected:
            return None  # late (aborted), or of an older run
        if message.state:
            pending.handles[message.subtask] = StateHandle.from_wire(message.state,
                                                                     source=f"worker {message.worker}")
        else:
            pending.finished.append(message.subtask)
        if message.source_position is not None:
            pending.sources[message.subtask] = message.source_position
        if len(message.shared_memory) == 2:
            pending.shared[message.subtask] = list(message.shared_memory)
        if 0 < message.depends_on < pending.checkpoint_id:
            pending.depends_on = min(pending.depends_on or message.depends_on, message.depends_on)
        pending.alignment_seconds = max(pending.alignment_seconds, message.alignment_seconds)
        if len(pending.handles) + len(pending.finished) < len(self.expected):
            return None
        duration = self.clock() - pending.started
        metadata = CheckpointMetadata(
            checkpoint_id=pending.checkpoint_id, job_id=self.job_id, job_name=self.job_name,
            timestamp=pending.timestamp, duration=duration, subtasks=dict(pending.handles),
            graph_fingerprint=self.fingerprint,
            extra={FINISHED_KEY: sorted(pending.finished), SOURCES_KEY: pending.sources,
                   DEPENDS_ON_KEY: pending.depends_on or pending.checkpoint_id})
        completed = self.storage.complete(metadata)
        self.latest, self.pending = completed, None
        keep_from = pending.depends_on or pending.checkpoint_id
        self.shared = {c: blobs for c, blobs in self.shared.items() if c >= keep_from}
        self.shared[pending.checkpoint_id] = dict(pending.shared)
        self._next_trigger = max(self._next_trigger + self.interval, self.clock())
        s = self.stats
        s.completed += 1
        s.last_id = pending.checkpoint_id
        s.last_duration_seconds = duration
        s.total_duration_seconds += duration
        s.last_size_bytes = sum(h.nbytes for h in pending.handles.values())
        s.max_size_bytes = max(s.max_size_bytes, s.last_size_bytes)
        s.max_duration_seconds = max(s.max_duration_seconds, duration)
        s.max_alignment_seconds = max(s.max_alignment_seconds, pending.alignment_seconds)
        return completed

    def abort_pending(self) -> None:
        """Give up the checkpoint in progress (a failure, or its timeout): its directory goes."""
        pending, self.pending = self.pending, None
        if pending is not None:
            self.stats.failed += 1
            self.storage.abort(pending.checkpoint_id)

    def restore_point(self) -> tuple[int, str]:
        """The latest complete checkpoint's id and directory ((0, "") if none): where a restart begins."""
        latest = self.latest
        return (0, "") if latest is None else (latest.checkpoint_id, str(latest.directory))

    def shared_blobs(self, restore_dir: str) -> dict[str, list[int]]:
        """Where the blobs of the checkpoint in ``restore_dir`` lie in the region, if it is the latest one this
        coordinator completed (else {}: the restart reads files). Each is checked against its file's checksum
        before it is used: a blob overwritten since is read from its file instead."""
        latest = self.latest
        if not restore_dir or latest is None or str(latest.directory) != restore_dir:
            return {}
        return {shared_key(c, key): where for c, blobs in self.shared.items() for key, where in blobs.items()}

    def describe(self) -> dict[str, Any]:
        return self.stats.metrics()
