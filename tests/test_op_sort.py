"""sort_by: an external sort in managed memory (batch mode), stable, spilling past its share."""

from __future__ import annotations

import random

import pytest

from operators.sort import Sort
from runtime import JobFailedError, StreamEnvironment
from runtime.execution.task import OperatorContext


def test_without_managed_memory_the_operator_sorts_a_list_stably():
    op = Sort(lambda r: r[0], reverse=True)
    op.open(OperatorContext(mode="batch"))
    out: list = []
    op.process_batch([(1, "a"), (2, "b"), (1, "c")], out.extend)
    op.finish(out.extend)
    assert out == [(2, "b"), (1, "a"), (1, "c")]


def test_sort_by_needs_batch_mode():
    op = Sort(lambda r: r)
    with pytest.raises(ValueError, match=r"^sort_by needs batch mode \(bounded input\); got mode='streaming'"):
        op.open(OperatorContext(mode="streaming"))


def test_a_global_sort_spills_past_its_share_and_equals_sorted():
    rng = random.Random(5)
    records = [(rng.randrange(1_000_000), f"v{i}") for i in range(150_000)]
    env = StreamEnvironment(workers=2, config={"memory.managed.size": "1mb"})
    out = env.from_collection(records).sort_by(lambda r: r[0]).set_parallelism(1).collect()
    result = env.execute("global-sort")
    got = out.values()
    assert [r[0] for r in got] == sorted(r[0] for r in records)
    assert sorted(got) == sorted(records)  # every record once (equal keys arrive from two source subtasks)
    assert result.metrics["spilled_bytes"] > 0


def test_per_subtask_sort_descending_by_column():
    rows = [{"k": i % 97, "i": i} for i in range(20_000)]
    env = StreamEnvironment(workers=2, config={"memory.managed.size": "2mb"})
    out = env.from_collection(rows).sort_by("k", reverse=True).collect()
    env.execute("per-subtask-sort")
    got = out.values()
    assert sorted(r["i"] for r in got) == list(range(20_000))
    # each subtask's output is ordered: the collected stream is two descending runs, interleaved by batch
    assert sum(1 for a, b in zip(got, got[1:]) if a["k"] < b["k"]) < 20


def test_sort_by_in_a_streaming_job_fails_by_name():
    env = StreamEnvironment(workers=1, mode="streaming")
    env.from_collection([3, 1, 2]).sort_by(lambda x: x).collect()
    with pytest.raises(JobFailedError, match=r"sort_by needs batch mode"):
        env.execute("streaming-sort")
