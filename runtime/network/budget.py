"""How many network buffers a job needs: the one place the budget is computed.

Imports: nothing from the project.

Used alike by the configuration check (``runtime.config``: can a worker's
pool serve the worst case at all?), the coordinator (``Coordinator.check_network_buffers``:
does this job's graph fit, before it is deployed?) and a job run
(``JobRun._connect``: the size of each result partition's local pool).

A result partition with ``consumers`` channels is guaranteed one buffer per
channel plus one (so every channel can hold a partly filled buffer while one
more is being filled), and may grow to ``exclusive + floating`` buffers per
channel (the most its consumers can have granted it in credits) plus one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PartitionBudget:
    """The buffers of one result partition's local pool: guaranteed and at most."""

    guaranteed: int
    maximum: int
    max_backlog_per_channel: int  # buffers in flight per channel: exclusive + floating credits


def partition_budget(consumers: int, *, buffers_per_channel: int, floating_per_gate: int) -> PartitionBudget:
    """The local pool of a result partition with ``consumers`` channels (see the module's docstring)."""
    per_channel = buffers_per_channel + floating_per_gate
    return PartitionBudget(guaranteed=consumers + 1, maximum=consumers * per_channel + 1,
                           max_backlog_per_channel=per_channel)


def min_buffers_per_worker(workers: int, *, buffers_per_channel: int, floating_per_gate: int) -> int:
    """The smallest pool a worker must have: one all-to-all exchange's credits into one gate.

    Every one of ``workers`` producers holds ``buffers-per-channel`` exclusive
    credits of the gate, and the gate may lend ``floating-buffers-per-gate`` more.
    """
    return buffers_per_channel * workers + floating_per_gate


def job_buffers_required(output_consumers: list[int]) -> int:
    """Guaranteed buffers a worker needs for its subtasks' result partitions.

    ``output_consumers``: for each output edge of each subtask on that worker,
    the number of consumer channels it writes to (1 for a forward edge).
    """
    return sum(partition_budget(n, buffers_per_channel=1, floating_per_gate=0).guaranteed
               for n in output_consumers)


__all__ = ["PartitionBudget", "job_buffers_required", "min_buffers_per_worker", "partition_budget"]
