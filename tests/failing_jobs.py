"""Jobs that fail in a user function on one worker at a chosen moment, and the healthy job that follows.

Shared by the failure loops of tests/test_cluster.py (standing cluster) and tests/test_e2e.py (embedded).
Shipped to the workers by value, like any module of the user's.
"""

from __future__ import annotations

import random

from runtime import StreamEnvironment
from runtime.execution.task import SourceOperator

COUNT = 2000
WHERE = ("first poll", "later poll", "map before the shuffle", "count after the shuffle")


class InjectedFailure(RuntimeError):
    pass


class FlakySource(SourceOperator):
    """``COUNT`` ints in batches of ``batch``; the share of ``fail_worker`` raises at its poll ``fail_poll``."""

    def __init__(self, batch: int, fail_worker: int | None = None, fail_poll: int | None = None,
                 index: int = 0, parallelism: int = 1) -> None:
        self.batch, self.fail_worker, self.fail_poll = batch, fail_worker, fail_poll
        self.index, self.parallelism = index, parallelism
        self.next, self.polls = index, 0

    def split(self, parallelism: int) -> list[FlakySource]:
        return [FlakySource(self.batch, self.fail_worker, self.fail_poll, i, parallelism) for i in range(parallelism)]

    def poll_batch(self, max_records: int) -> list | None:
        if self.index == self.fail_worker and self.polls == self.fail_poll:
            msg = f"injected failure at poll {self.polls} on worker {self.index}"
            raise InjectedFailure(msg)
        self.polls += 1
        if self.next >= COUNT:
            return None
        out = list(range(self.next, min(COUNT, self.next + self.batch * self.parallelism), self.parallelism))
        self.next += self.batch * self.parallelism
        return out


def _fail_at(value: int):
    def check(x: int) -> int:
        if x == value:
            msg = f"injected failure at record {x}"
            raise InjectedFailure(msg)
        return x
    return check


def _fail_at_key(key: int):
    def check(kv: tuple) -> tuple:
        if kv[0] == key:
            msg = f"injected failure at key {key}"
            raise InjectedFailure(msg)
        return kv
    return check


def failing_job(env: StreamEnvironment, rng: random.Random) -> str:
    """Add a job to ``env`` that fails on one worker at a random moment; returns where."""
    where = rng.choice(WHERE)
    worker = rng.randrange(2)
    batch = rng.choice([5, 50, 500])
    if where == "first poll":
        src = FlakySource(batch, fail_worker=worker, fail_poll=0)
    elif where == "later poll":
        polls = -(-COUNT // 2 // batch)  # a worker's share takes this many polls, then one that returns None
        src = FlakySource(batch, fail_worker=worker, fail_poll=rng.randint(1, min(4, polls)))
    else:
        src = FlakySource(batch)
    stream = env.from_source(src)
    if where == "map before the shuffle":
        stream = stream.map(_fail_at(rng.randrange(COUNT)))
    counts = stream.key_by(lambda x: x % 10).count()
    if where == "count after the shuffle":
        counts = counts.map(_fail_at_key(rng.randrange(10)))
    counts.collect()
    return f"{where} on worker {worker}, batches of {batch}"


def healthy_job(env: StreamEnvironment):
    """Add the job that must succeed after a failed one; returns its collect handle."""
    return env.from_source(FlakySource(500)).key_by(lambda x: x % 10).count().collect()


HEALTHY = {k: COUNT // 10 for k in range(10)}
