"""How a worker's managed memory is shared by its stateful operators, and what an operator is lent."""

from __future__ import annotations

import os

from runtime import StreamEnvironment
from runtime.execution.job_run import managed_shares
from runtime.execution.task import Operator, SourceOperator

PAGE = 32 << 10


class Weighted(Operator):
    def __init__(self, weight: int) -> None:
        self.managed_memory_weight = weight


def test_shares_follow_the_weights_in_whole_pages_and_never_exceed_the_budget():
    a, b, c = Weighted(1), Weighted(3), Weighted(0)
    shares = managed_shares([a, b, c], budget=100 * PAGE + 5, page_size=PAGE)
    assert shares == {id(a): 25 * PAGE, id(b): 75 * PAGE}
    assert managed_shares([c], budget=100 * PAGE, page_size=PAGE) == {}
    assert managed_shares([a], budget=PAGE - 1, page_size=PAGE) == {}


class ReportsItsShare(SourceOperator):
    """A stateful source: reports the managed memory the runtime lent it, and whether spilling works."""

    managed_memory_weight = 1
    name = "reports-share"

    def __init__(self) -> None:
        self.done = False

    def split(self, parallelism: int) -> list[ReportsItsShare]:
        return [ReportsItsShare() for _ in range(parallelism)]

    def poll_batch(self, max_records: int):
        if self.done:
            return None
        self.done = True
        managed = self.ctx.managed
        assert managed is not None
        io = managed.io()
        assert io is managed.io()  # one IOManager per job
        pages = managed.memory.allocate_pages(managed.owner, 2)
        managed.memory.release(pages)
        return [(self.ctx.worker_id, managed.owner, managed.share_bytes, io.directory)]


def test_a_stateful_operator_gets_its_share_and_a_spill_directory_removed_with_the_job(tmp_path):
    env = StreamEnvironment(workers=2, config={"memory.managed.size": "8mb", "io.tmp-dirs": str(tmp_path)})
    out = env.from_source(ReportsItsShare()).collect()
    env.execute("shares")
    rows = sorted(out.values())
    assert [(w, owner, share) for w, owner, share, _ in rows] == [
        (0, "reports-share[0]", 8 << 20), (1, "reports-share[1]", 8 << 20)]
    for *_, directory in rows:
        assert os.path.dirname(directory) == str(tmp_path)
        assert not os.path.exists(directory)  # removed when the job ended
    assert os.listdir(tmp_path) == []
