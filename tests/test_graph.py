"""The job graph a worker receives: each splittable source carries only that worker's share."""

from __future__ import annotations

import cloudpickle

from runtime import StreamEnvironment
from runtime.jobs import check_shippable, worker_payloads


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
        src = mine.vertices[0].nodes[0].operator
        assert src._split == (i, 2)
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
