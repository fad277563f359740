"""The job graph a worker receives: each splittable source carries only that worker's share."""

from __future__ import annotations

import cloudpickle
import pytest

from runtime import StreamEnvironment
from runtime.cluster.client import check_shippable, worker_payloads
from runtime.execution.task import SourceOperator


def _graph(workers: int, n: int):
    env = StreamEnvironment(workers=workers)
    env.from_collection(range(n)).map(str).collect()
    return env.job_graph("shares")


def test_each_worker_payload_holds_only_its_share_of_a_collection():
    n = 200_000
    graph = _graph(2, n)
    whole = check_shippable(graph)
    payloads = worker_payloads(graph)
    assert len(payloads) == 2
    shares = []
    for i, payload in enumerate(payloads):
        mine = cloudpickle.loads(payload)
        node = mine.vertices[0].nodes[0]
        src = node.operator
        assert node.split_for == i and src._split == (i, 2)
        shares.append(list(src.items))
        assert len(payload) < 0.7 * len(whole)  # about half the records, not all of them
    assert shares[0] + shares[1] == list(range(n))
    # the original graph is untouched: it still holds the whole collection
    assert len(graph.vertices[0].nodes[0].operator.items) == n


def test_per_worker_payloads_give_the_same_results_as_one_shared_graph():
    env = StreamEnvironment(workers=3)
    out = env.from_collection(range(10_000)).key_by(lambda x: x % 7).sum().collect()
    env.execute("shares-e2e")
    assert sorted(out.values()) == sorted((k, sum(range(k, 10_000, 7))) for k in range(7))


class Numbers(SourceOperator):
    """A user's own source: the numbers of ``items``, 7 per poll; split(p) deals them round-robin."""

    name = "numbers"

    def __init__(self, items):
        self.items = list(items)

    def split(self, parallelism):
        return [Numbers(self.items[i::parallelism]) for i in range(parallelism)]

    def poll_batch(self, max_records):
        if not self.items:
            return None
        batch, self.items = self.items[:7], self.items[7:]
        return batch


class Unsplittable(Numbers):
    split = None  # one instance only: runs on worker 0


@pytest.mark.parametrize("source", [Numbers, Unsplittable])
def test_a_users_source_runs_once_per_share_and_loses_nothing(source):
    env = StreamEnvironment(workers=3)
    out = env.from_source(source(range(1000))).map(lambda x: x * 2).collect()
    result = env.execute("own-source")
    assert sorted(out.values()) == [2 * i for i in range(1000)]
    shares = [ops for name, ops in result.metrics["operators"].items() if name.startswith("numbers")]
    assert shares and shares[0]["source_records"] == 1000


def test_from_source_rejects_what_is_not_a_source():
    with pytest.raises(TypeError, match=r"from_source needs a source with poll_batch\(max_records\); got list"):
        StreamEnvironment(workers=1).from_source([1, 2, 3])


def test_a_source_without_a_name_of_its_own_is_named_after_its_class():
    class Ticks(SourceOperator):
        def poll_batch(self, max_records):
            return None

    env = StreamEnvironment(workers=1)
    env.from_source(Ticks()).collect()
    env.from_source(Numbers([1]), name="mine").collect()
    assert [v.nodes[0].name for v in env.job_graph("names").vertices if v.is_source] == ["Ticks", "mine"]
