"""What the web server reads of the coordinator: its jobs (:class:`JobRecord`) and the :class:`ClusterView` protocol.

Imports: runtime.execution.graph, runtime.memory.layout, runtime.config.

Ownership: the coordinator writes every field named here, from its one
thread; the server's threads only read them. A field is replaced, never
mutated in place (a ``JobRecord`` changes by assignment of whole values), so
a reader sees the old value or the new one. The one call the other way,
:meth:`ClusterView.request_cancel`, only adds to a set the coordinator polls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from runtime.config import ShmflowConfig
from runtime.execution.graph import JobGraph
from runtime.memory.layout import AllocatorSnapshot

#: Flink's job states that shmflow's jobs pass through.
RUNNING, FINISHED, FAILED, CANCELED = "RUNNING", "FINISHED", "FAILED", "CANCELED"


@dataclass
class JobRecord:
    """One job the coordinator ran or runs. Written by the coordinator; read by the web server."""

    job_id: str  # 32 hex digits, as Flink's
    name: str
    graph: JobGraph
    start_time: float  # wall clock, seconds
    state: str = RUNNING
    end_time: float = 0.0  # 0: running
    attempt: str = ""  # the current run's id; the stats blocks name it (as an int of its hex digits)
    restarts: int = 0
    failure: str = ""
    #: When finished: ``"vertex name[index]"`` -> that subtask's final metrics (records_in, records_out, ...).
    final: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, Any] = field(default_factory=dict)  # CheckpointCoordinator.describe()


@dataclass(frozen=True)
class WorkerInfo:
    """What the coordinator knows of one worker besides its stats slot."""

    worker_id: int
    pid: int
    arena: AllocatorSnapshot | None
    state: dict[str, list[Any]]  # owner -> its state backend's stats (BackendStats.to_wire())
    last_heard_age: float  # seconds since the coordinator last heard from it


class ClusterView(Protocol):
    """The coordinator as the web server sees it (implemented by runtime.cluster.coordinator.Coordinator)."""

    config: ShmflowConfig
    secret: bytes
    jobs: dict[str, JobRecord]  # by job id, in submission order

    @property
    def stats_area(self) -> memoryview:
        """The region's stats area (runtime.web.stats_block), one slot per worker id."""

    def region_snapshot(self) -> AllocatorSnapshot:
        """The global allocator's blocks (arenas, checkpoint areas, free) as last changed."""

    def worker_infos(self) -> list[WorkerInfo]:
        """Every registered worker, by id."""

    def request_cancel(self, job_id: str) -> bool:
        """Ask the coordinator to cancel ``job_id``; False if no such job runs. Thread-safe."""


__all__ = ["CANCELED", "FAILED", "FINISHED", "RUNNING", "ClusterView", "JobRecord", "WorkerInfo"]
