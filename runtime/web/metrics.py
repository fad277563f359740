"""Prometheus ``/metrics``: a custom collector over the sampler's figures, named as Flink's PrometheusReporter names.

Imports: runtime.web.model, runtime.web.view (prometheus_client).

Flink's reporter joins a metric's scope and name with ``_`` (``taskmanager.job.task`` +
``numRecordsIn`` -> ``flink_taskmanager_job_task_numRecordsIn``), replaces every
character outside ``[a-zA-Z0-9_]`` with ``_``, and turns scope variables into labels
(``job_id``, ``job_name``, ``task_id``, ``task_name``, ``subtask_index``, ``tm_id``).
shmflow does the same with the prefix ``shmflow_``, and adds what Flink lacks:
the buddy allocators' free bytes per order, largest free block and fragmentation,
and bytes spilled.

Ownership: a collector reads; the registry is this module's, one per server.
Process: the coordinator, any web request thread.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from runtime.web.model import Sampler, allocator_document, subtask_rows, taskmanager_metrics, vertex_id
from runtime.web.view import RUNNING, ClusterView

PREFIX = "shmflow_"
_ILLEGAL = re.compile(r"[^a-zA-Z0-9_]")
TASK_LABELS = ["job_id", "job_name", "task_id", "task_name", "subtask_index", "tm_id"]
#: Task metrics: Flink's name -> (this metric's key in subtask_rows, help).
TASK_METRICS = {
    "numRecordsIn": ("numRecordsIn", "records the subtask read"),
    "numRecordsOut": ("numRecordsOut", "records the subtask emitted"),
    "numRecordsInPerSecond": ("numRecordsInPerSecond", "records read per second"),
    "numRecordsOutPerSecond": ("numRecordsOutPerSecond", "records emitted per second"),
    "busyTimeMsPerSecond": ("busyTimeMsPerSecond", "ms per second the subtask worked"),
    "idleTimeMsPerSecond": ("idleTimeMsPerSecond", "ms per second the subtask waited for input or its turn"),
    "backPressuredTimeMsPerSecond": ("backPressuredTimeMsPerSecond",
                                     "ms per second the subtask was blocked on credits or buffers"),
    "buffers.inPoolUsage": ("buffers.inPoolUsage", "share of the input gate's floating buffers in use"),
    "buffers.outPoolUsage": ("buffers.outPoolUsage", "share of the output partitions' buffers in use"),
    "managedMemoryUsed": ("managedMemoryUsed", "bytes of managed memory the subtask's operators hold"),
    "managedMemoryPeak": ("managedMemoryPeak", "the sum of its operators' peaks of managed memory in this job"),
    "spilledBytes": ("spilledBytes", "bytes its operators spilled to io.tmp-dirs"),
}


def prometheus_name(*parts: str) -> str:
    """Flink's PrometheusReporter translation: scope and name joined by ``_``, other characters as ``_``."""
    return PREFIX + _ILLEGAL.sub("_", "_".join(parts))


class ShmflowCollector(Collector):
    """Every figure of the dashboard as Prometheus metric families, computed at scrape time."""

    def __init__(self, view: ClusterView, sampler: Sampler) -> None:
        self.view, self.sampler = view, sampler

    def collect(self) -> Iterator[Metric]:
        yield from self._taskmanagers()
        yield from self._tasks()
        yield from self._memory()

    def _taskmanagers(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily] = {}
        for info in self.view.worker_infos():
            for name, value in taskmanager_metrics(self.view, self.sampler.latest(), info.worker_id).items():
                full = prometheus_name("taskmanager", name)
                family = families.get(full)
                if family is None:
                    family = families[full] = GaugeMetricFamily(full, f"Flink's {name} of a worker", labels=["tm_id"])
                family.add_metric([str(info.worker_id)], float(value))
        yield from families.values()

    def _tasks(self) -> Iterator[Metric]:
        """Task metrics of the running jobs and of the last job that ended (its final counts)."""
        records = list(self.view.jobs.values())
        shown = [r for r in records if r.state == RUNNING]
        ended = [r for r in records if r.state != RUNNING]
        if ended:
            shown.append(ended[-1])
        families: dict[str, GaugeMetricFamily] = {}
        for flink, (key, text) in TASK_METRICS.items():
            name = prometheus_name("taskmanager", "job", "task", flink)
            families[key] = GaugeMetricFamily(name, text, labels=TASK_LABELS)  # Flink reports counters as gauges
        latest = self.sampler.latest()
        for record in shown:
            for v in record.graph.vertices:
                for row in subtask_rows(self.view, latest, record, v.id):
                    labels = [record.job_id, record.name, vertex_id(record.graph, v.id), v.name,
                              str(row["subtask"]), row["taskmanager-id"]]
                    for key, family in families.items():
                        family.add_metric(labels, float(row["metrics"][key]))
        yield from families.values()

    def _memory(self) -> Iterator[Metric]:
        free = GaugeMetricFamily(PREFIX + "memory_buddy_free_bytes", "free bytes in blocks of one order",
                                 labels=["allocator", "order", "block_bytes"])
        blocks = GaugeMetricFamily(PREFIX + "memory_buddy_free_blocks", "free blocks of one order",
                                   labels=["allocator", "order", "block_bytes"])
        largest = GaugeMetricFamily(PREFIX + "memory_buddy_largest_free_block_bytes", "the largest free block",
                                    labels=["allocator"])
        frag = GaugeMetricFamily(PREFIX + "memory_buddy_fragmentation",
                                 "1 - largest free block / free bytes (0: all free memory in one block)",
                                 labels=["allocator"])
        size = GaugeMetricFamily(PREFIX + "memory_buddy_size_bytes", "bytes the allocator manages",
                                 labels=["allocator"])
        allocators = [("region", allocator_document(self.view.region_snapshot()))]
        allocators += [(f"worker-{i.worker_id}", allocator_document(i.arena))
                       for i in self.view.worker_infos() if i.arena is not None]
        for name, doc in allocators:
            for entry in doc["free_by_order"]:
                labels = [name, str(entry["order"]), str(entry["block_bytes"])]
                free.add_metric(labels, entry["bytes"])
                blocks.add_metric(labels, entry["blocks"])
            largest.add_metric([name], doc["largest_free_block"])
            frag.add_metric([name], doc["fragmentation"])
            size.add_metric([name], doc["size"])
        yield from (free, blocks, largest, frag, size)


def registry(view: ClusterView, sampler: Sampler) -> CollectorRegistry:
    """A registry of its own (not the process-wide default) holding only shmflow's collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ShmflowCollector(view, sampler))
    return reg


__all__ = ["PREFIX", "ShmflowCollector", "prometheus_name", "registry"]
