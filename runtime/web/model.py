"""The dashboard's figures: a sampler of the stats blocks, and the JSON documents of the REST API built from it.

Imports: runtime.web.stats_block, runtime.web.view, runtime.memory.layout, runtime.state.backend.

Ownership: a :class:`Sampler` has one thread of its own, the only writer of
its fields; request threads call :meth:`Sampler.latest` and the document
functions, which only read. Nothing here touches the job's sockets: counters
come from the region's stats area, layouts from what the coordinator kept of
the workers' heartbeats.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from runtime._version import __version__
from runtime.execution.graph import JobGraph
from runtime.memory.layout import AllocatorSnapshot
from runtime.state.backend import BackendStats
from runtime.web.stats_block import SLOT_BYTES, WorkerSample, read_slot
from runtime.web.view import RUNNING, ClusterView, JobRecord

#: How often the sampler reads the stats blocks (the page updates once a second).
SAMPLE_INTERVAL = 0.5
#: Points of history per vertex for the throughput charts (two minutes at SAMPLE_INTERVAL).
HISTORY = 240


@dataclass(frozen=True)
class SubtaskRates:
    """One subtask's counters and their rates between the sampler's last two reads."""

    worker: int
    records_in: int
    records_out: int
    in_per_second: float
    out_per_second: float
    busy_ms_per_second: float
    idle_ms_per_second: float
    backpressured_ms_per_second: float
    out_pool_usage: float
    in_pool_usage: float
    finished: bool
    managed_bytes: int
    managed_peak: int
    spilled_bytes: int


@dataclass
class Sample:
    """What the sampler saw at one instant. Replaced whole, never changed after it is published."""

    at: float  # time.time()
    workers: dict[int, WorkerSample] = field(default_factory=dict)
    #: ``(job attempt id as int, vertex id, subtask index)`` -> its rates.
    subtasks: dict[tuple[int, int, int], SubtaskRates] = field(default_factory=dict)
    #: vertex id -> deque of ``[time, records in/s, records out/s]`` of the running job (summed over subtasks).
    history: dict[int, list[list[float]]] = field(default_factory=dict)


class Sampler:
    """Reads every worker's stats slot every SAMPLE_INTERVAL and keeps rates and a short history.

    Process: the coordinator process; its own daemon thread (:meth:`start`, :meth:`stop`).
    """

    def __init__(self, view: ClusterView, *, interval: float = SAMPLE_INTERVAL) -> None:
        self.view = view
        self.interval = interval
        self._latest = Sample(time.time())  # replaced whole by the sampler thread
        self._previous: dict[int, WorkerSample] = {}
        self._history: dict[tuple[int, int], deque[list[float]]] = {}  # (job int, vertex) -> points
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmflow-web-sampler", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def latest(self) -> Sample:
        return self._latest

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a torn read of the coordinator's state: the next sample will do
                continue

    def sample(self) -> Sample:
        """Read every slot once; publish the rates against the previous read of each."""
        area = self.view.stats_area
        slots = len(area) // SLOT_BYTES
        workers: dict[int, WorkerSample] = {}
        subtasks: dict[tuple[int, int, int], SubtaskRates] = {}
        for info in self.view.worker_infos():  # cheap: arena layouts are parsed once per change
            if info.worker_id >= slots:
                continue
            got = read_slot(area, info.worker_id)
            if got is None:
                continue
            workers[info.worker_id] = got
            before = self._previous.get(info.worker_id)
            dt = (got.written_at_ns - before.written_at_ns) / 1e9 if before is not None else 0.0
            old = {(s.vertex, s.index): s for s in before.subtasks} if before is not None and \
                before.worker.job == got.worker.job else {}
            for st in got.subtasks:
                prev = old.get((st.vertex, st.index))

                def rate(now: int, then: int | None, dt: float = dt) -> float:
                    return max(0.0, (now - then) / dt) if then is not None and dt > 0 else 0.0

                busy = min(1000.0, rate(st.busy_ns, prev.busy_ns if prev else None) / 1e6)
                blocked = min(1000.0, rate(st.backpressured_ns, prev.backpressured_ns if prev else None) / 1e6)
                subtasks[(got.worker.job, st.vertex, st.index)] = SubtaskRates(
                    info.worker_id, st.records_in, st.records_out,
                    rate(st.records_in, prev.records_in if prev else None),
                    rate(st.records_out, prev.records_out if prev else None),
                    busy, max(0.0, 1000.0 - busy - blocked) if prev else 0.0, blocked,
                    st.out_pool_usage, st.in_pool_usage, st.finished, st.managed_bytes, st.managed_peak,
                    st.spilled_bytes)
            if before is None or got.written_at_ns != before.written_at_ns:
                self._previous[info.worker_id] = got
            elif before is not None:  # the worker did not write since: keep the rates of its last interval
                for key, value in self._latest.subtasks.items():
                    if value.worker == info.worker_id:
                        subtasks[key] = value
        now = time.time()
        totals: dict[tuple[int, int], list[float]] = {}
        for (job, vertex, _), r in subtasks.items():
            t = totals.setdefault((job, vertex), [0.0, 0.0])
            t[0] += r.in_per_second
            t[1] += r.out_per_second
        for pair, (rin, rout) in totals.items():
            self._history.setdefault(pair, deque(maxlen=HISTORY)).append([now, rin, rout])
        running = {job for job, _ in totals}
        for pair in [k for k in self._history if k[0] not in running]:
            del self._history[pair]
        sample = Sample(now, workers, subtasks, {vertex: list(points) for (_, vertex), points in self._history.items()})
        self._latest = sample
        return sample


# ------------------------------------------------------------------ documents
def job_int(record: JobRecord) -> int:
    """The id the stats blocks name a job's current run by."""
    return int(record.attempt, 16) if record.attempt else -1


def _ship(partitioning: str) -> str:
    return {"forward": "FORWARD", "hash": "HASH", "rebalance": "REBALANCE", "broadcast": "BROADCAST"}.get(
        partitioning, partitioning.upper())


def vertex_id(graph: JobGraph, vid: int) -> str:
    """A vertex's id in the REST API: Flink's are 32 hex digits; ours are stable per graph and position."""
    return f"{vid:032x}"


def subtask_rows(view: ClusterView, sample: Sample, record: JobRecord, vid: int) -> list[dict[str, Any]]:
    """Per subtask of vertex ``vid``: Flink's task metrics (from the stats block, or the final figures)."""
    vertex = record.graph.vertex(vid)
    rows = []
    for index in range(vertex.parallelism):
        live = sample.subtasks.get((job_int(record), vid, index)) if record.state == RUNNING else None
        final = record.final.get(f"{vertex.name}[{index}]", {})
        rin = live.records_in if live else int(final.get("records_in", 0))
        rout = live.records_out if live else int(final.get("records_out", 0))
        rows.append({
            "subtask": index, "status": "RUNNING" if live and not live.finished else
            ("FINISHED" if live or final else record.state), "taskmanager-id": str(index),
            "metrics": {
                "read-records": rin, "write-records": rout, "numRecordsIn": rin, "numRecordsOut": rout,
                "numRecordsInPerSecond": round(live.in_per_second, 1) if live else 0.0,
                "numRecordsOutPerSecond": round(live.out_per_second, 1) if live else 0.0,
                "busyTimeMsPerSecond": round(live.busy_ms_per_second, 1) if live else 0.0,
                "idleTimeMsPerSecond": round(live.idle_ms_per_second, 1) if live else 0.0,
                "backPressuredTimeMsPerSecond": round(live.backpressured_ms_per_second, 1) if live else 0.0,
                "buffers.inPoolUsage": round(live.in_pool_usage, 3) if live else 0.0,
                "buffers.outPoolUsage": round(live.out_pool_usage, 3) if live else 0.0,
                "managedMemoryUsed": live.managed_bytes if live else 0,
                "managedMemoryPeak": live.managed_peak if live else 0,
                "spilledBytes": live.spilled_bytes if live else int(final.get("spilled_bytes", 0)),
            }})
    return rows


def job_document(view: ClusterView, sample: Sample, record: JobRecord) -> dict[str, Any]:
    """``GET /jobs/<id>``: Flink's job details (vertices with summed metrics, the plan)."""
    now = int(time.time() * 1000)
    start = int(record.start_time * 1000)
    end = int(record.end_time * 1000) if record.end_time else -1
    vertices, nodes = [], []
    for v in record.graph.vertices:
        rows = subtask_rows(view, sample, record, v.id)
        m = [r["metrics"] for r in rows]
        summed = {k: sum(x[k] for x in m) for k in ("read-records", "write-records", "numRecordsInPerSecond",
                                                     "numRecordsOutPerSecond")}
        peak = {k: max((x[k] for x in m), default=0.0) for k in ("busyTimeMsPerSecond", "idleTimeMsPerSecond",
                                                                  "backPressuredTimeMsPerSecond")}
        status = "RUNNING" if any(r["status"] == "RUNNING" for r in rows) else \
            ("FINISHED" if record.state != RUNNING or all(r["status"] == "FINISHED" for r in rows) else "DEPLOYING")
        vid = vertex_id(record.graph, v.id)
        vertices.append({
            "id": vid, "name": v.name, "parallelism": v.parallelism, "status": status, "start-time": start,
            "end-time": end, "duration": (end if end > 0 else now) - start,
            "metrics": {**summed, **{f"max-{k}": round(val, 1) for k, val in peak.items()}},
            "subtasks": rows, "history": sample.history.get(v.id, []) if record.state == RUNNING else []})
        nodes.append({"id": vid, "parallelism": v.parallelism, "operator": "", "description": v.name,
                      "inputs": [{"num": i, "id": vertex_id(record.graph, e.source), "ship_strategy": _ship(
                          e.partitioning), "exchange": "pipelined_bounded"} for i, e in enumerate(v.inputs)]})
    return {"jid": record.job_id, "name": record.name, "isStoppable": False, "state": record.state,
            "job-type": record.graph.mode.upper(), "start-time": start, "end-time": end,
            "duration": (end if end > 0 else now) - start, "now": now, "restarts": record.restarts,
            "failure": record.failure, "vertices": vertices,
            "plan": {"jid": record.job_id, "name": record.name, "type": record.graph.mode.upper(), "nodes": nodes}}


def jobs_overview(view: ClusterView) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    out = []
    for record in list(view.jobs.values()):
        start, end = int(record.start_time * 1000), int(record.end_time * 1000) if record.end_time else -1
        out.append({"jid": record.job_id, "name": record.name, "state": record.state, "start-time": start,
                    "end-time": end, "duration": (end if end > 0 else now) - start,
                    "tasks": {"total": sum(v.parallelism for v in record.graph.vertices)}})
    return out


def overview(view: ClusterView) -> dict[str, Any]:
    """``GET /overview``: Flink's cluster overview."""
    states = [r.state for r in list(view.jobs.values())]
    workers = view.worker_infos()
    return {"taskmanagers": len(workers), "slots-total": len(workers), "slots-available": 0 if "RUNNING" in states
            else len(workers), "jobs-running": states.count("RUNNING"), "jobs-finished": states.count("FINISHED"),
            "jobs-cancelled": states.count("CANCELED"), "jobs-failed": states.count("FAILED"),
            "flink-version": f"shmflow {__version__}", "region": allocator_document(view.region_snapshot())}


def allocator_document(snap: AllocatorSnapshot) -> dict[str, Any]:
    """An allocator's blocks and free lists: free blocks per order, the largest, fragmentation."""
    by_order: dict[int, list[int]] = {}
    for _, nbytes in snap.free:
        order = max(0, (nbytes // snap.min_block).bit_length() - 1)
        entry = by_order.setdefault(order, [0, 0])
        entry[0] += 1
        entry[1] += nbytes
    free = snap.free_bytes
    largest = snap.largest_free_block
    return {"offset": snap.offset, "size": snap.size, "min_block": snap.min_block, "free_bytes": free,
            "used_bytes": snap.size - free, "largest_free_block": largest,
            "fragmentation": round(1 - largest / free, 4) if free else 0.0,
            "free_by_order": [{"order": o, "block_bytes": snap.min_block << o, "blocks": c, "bytes": b}
                              for o, (c, b) in sorted(by_order.items())],
            "blocks": [{"offset": o, "bytes": n, "owner": w, "count": c} for o, n, w, c in snap.runs],
            "free": [{"offset": o, "bytes": n} for o, n in snap.free]}


def taskmanagers(view: ClusterView, sample: Sample) -> list[dict[str, Any]]:
    """``GET /taskmanagers``: one entry per worker (Flink's TaskManagers)."""
    out = []
    for info in view.worker_infos():
        ws = sample.workers.get(info.worker_id)
        w = ws.worker if ws is not None else None
        out.append({
            "id": str(info.worker_id), "path": f"pid {info.pid}", "pid": info.pid, "slotsNumber": 1,
            "freeSlots": 0 if any(j.state == RUNNING for j in view.jobs.values()) else 1,
            "timeSinceLastHeartbeat": int(info.last_heard_age * 1000),
            "uptime": int((time.monotonic_ns() - w.started_at_ns) / 1e6) if w else 0,
            "heartbeats": w.heartbeats if w else 0,
            "memory": {"rss": w.rss_bytes if w else 0, "gc-time-ms": round(w.gc_ns / 1e6, 1) if w else 0,
                       "gc-count": w.gc_collections if w else 0},
            "network": {"total-segments": w.network_buffers if w else 0,
                        "available-segments": w.network_available if w else 0},
            "managed": {"total": w.managed_budget if w else 0, "used": w.managed_used if w else 0,
                        "peak": w.managed_peak if w else 0, "spilled": w.spilled_bytes if w else 0},
        })
    return out


def taskmanager_metrics(view: ClusterView, sample: Sample, worker: int) -> dict[str, float]:
    """A worker's metrics by Flink's names (``GET /taskmanagers/<id>/metrics``)."""
    ws = sample.workers.get(worker)
    if ws is None:
        return {}
    w = ws.worker
    return {
        "Status.Flink.Memory.Managed.Total": w.managed_budget, "Status.Flink.Memory.Managed.Used": w.managed_used,
        "Status.Flink.Memory.Managed.Peak": w.managed_peak, "Status.Flink.Memory.Managed.SpilledBytes": w.spilled_bytes,
        "Status.Shuffle.TotalMemorySegments": w.network_buffers,
        "Status.Shuffle.AvailableMemorySegments": w.network_available,
        "Status.Shuffle.UsedMemorySegments": w.network_buffers - w.network_available,
        "Status.Python.Memory.RSS": w.rss_bytes, "Status.Python.GarbageCollector.Time": round(w.gc_ns / 1e6, 3),
        "Status.Python.GarbageCollector.Count": w.gc_collections, "Status.Heartbeats": w.heartbeats,
    }


def memory_document(view: ClusterView, sample: Sample) -> dict[str, Any]:
    """``GET /memory``: the region and every arena, as the buddy allocators hold them now, with each worker's
    network pool, managed memory per operator and state backend bins."""
    workers = []
    segment = view.config.segment_size
    # owner of managed pages ("operator name[subtask]", as job_run names them) -> its operator chain's figures
    chains: dict[str, tuple[str, SubtaskRates]] = {}
    for record in [r for r in list(view.jobs.values()) if r.state == RUNNING]:
        for v in record.graph.vertices:
            for index in range(v.parallelism):
                rates = sample.subtasks.get((job_int(record), v.id, index))
                if rates is not None:
                    for node in v.nodes:
                        chains[f"{node.name}[{index}]"] = (f"{v.name}[{index}]", rates)
    for info in view.worker_infos():
        ws = sample.workers.get(info.worker_id)
        w = ws.worker if ws is not None else None
        arena = allocator_document(info.arena) if info.arena is not None else None
        operators = []
        if info.arena is not None:
            for owner, (nbytes, blocks) in info.arena.by_owner().items():
                if owner.endswith(" network"):
                    continue
                state = info.state.get(owner)
                stats = BackendStats.from_wire(state) if state else None
                described = None if stats is None else {
                    "backend": stats.backend, "entries": stats.entries, "bytes_in_memory": stats.bytes_in_memory,
                    "bytes_on_disk": stats.bytes_on_disk,
                    "bins": [{"size": s, "objects": o, "bytes": b, "slots": sl} for s, o, b, sl in stats.bins]}
                chain = chains.get(owner)
                operators.append({"owner": owner, "bytes": nbytes, "blocks": blocks, "state": described,
                                  "chain": chain[0] if chain else None,
                                  "chain_peak": chain[1].managed_peak if chain else None,
                                  "chain_spilled": chain[1].spilled_bytes if chain else None})
        workers.append({
            "id": info.worker_id, "pid": info.pid, "arena": arena,
            "network": {"segments": w.network_buffers if w else 0, "available": w.network_available if w else 0,
                        "segment_size": segment},
            "managed": {"budget": w.managed_budget if w else 0, "used": w.managed_used if w else 0,
                        "peak": w.managed_peak if w else 0, "spilled": w.spilled_bytes if w else 0,
                        "operators": operators}})
    return {"region": allocator_document(view.region_snapshot()), "workers": workers}


def checkpoints_document(record: JobRecord) -> dict[str, Any]:
    """``GET /jobs/<id>/checkpoints``: the checkpoint coordinator's figures (empty without checkpoints)."""
    figures = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.checkpoints.items()}
    return {"counts": {k: v for k, v in figures.items() if k.startswith("checkpoints_")}, "summary": figures,
            "restarts": record.restarts}


__all__ = ["HISTORY", "SAMPLE_INTERVAL", "Sample", "Sampler", "SubtaskRates", "allocator_document",
           "checkpoints_document", "job_document", "jobs_overview", "memory_document", "overview",
           "subtask_rows", "taskmanager_metrics", "taskmanagers", "vertex_id"]
