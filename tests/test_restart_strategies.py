"""Restart strategies against Flink's documented behaviour, with an injected clock (no sleeping)."""

from __future__ import annotations

import random

import pytest

from runtime.cluster.restart import ExponentialDelay, FailureRate, FixedDelay, NoRestart, restart_strategy
from runtime.config import ShmflowConfig


def cfg(**values: object) -> ShmflowConfig:
    return ShmflowConfig.from_mapping(values, source="test", check_shm=False)


def test_unset_is_exponential_delay_with_checkpointing_and_none_without_as_flink():
    assert isinstance(restart_strategy(cfg()), NoRestart)
    assert isinstance(restart_strategy(cfg(**{"execution.checkpointing.interval": "1s"})), ExponentialDelay)
    chosen = restart_strategy(cfg(**{"execution.checkpointing.interval": "1s", "restart-strategy.type": "none"}))
    assert isinstance(chosen, NoRestart)


def test_fixed_delay_restarts_attempts_times_then_gives_up():
    s = restart_strategy(cfg(**{"restart-strategy.type": "fixed-delay", "restart-strategy.fixed-delay.attempts": 2,
                                "restart-strategy.fixed-delay.delay": "250ms"}))
    assert isinstance(s, FixedDelay)
    assert [s.on_failure(t) for t in (0.0, 1.0, 2.0)] == [0.25, 0.25, None]
    assert "restart-strategy.fixed-delay.attempts" in s.describe()


def test_failure_rate_gives_up_at_the_first_failure_over_the_rate_only():
    s = FailureRate(max_failures=2, interval=10.0, delay=1.0)
    assert s.on_failure(0.0) == 1.0
    assert s.on_failure(5.0) == 1.0
    assert s.on_failure(10.5) == 1.0  # the failure at 0 left the interval
    assert s.on_failure(12.0) is None  # 5, 10.5, 12 within 10 s
    assert "failure-rate-interval" in s.describe()


def test_exponential_delay_grows_by_the_multiplier_up_to_the_maximum_and_resets_after_a_quiet_run():
    s = ExponentialDelay(1.0, 5.0, 2.0, reset_threshold=100.0, jitter=0.0, attempts=1_000)
    assert [s.on_failure(t) for t in (0.0, 1.0, 3.0, 7.0, 15.0)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert s.on_failure(15.0 + 100.0 + 5.0) == 1.0  # ran threshold + backoff without failure: back to initial


def test_exponential_delay_jitter_stays_within_its_factor_and_attempts_bound_the_restarts():
    s = ExponentialDelay(10.0, 10.0, 1.5, reset_threshold=3600.0, jitter=0.1, attempts=50, rng=random.Random(7))
    delays = [s.on_failure(float(t)) for t in range(50)]
    assert all(d is not None and 9.0 <= d <= 11.0 for d in delays)
    assert len({round(d, 6) for d in delays if d is not None}) > 1  # jittered, not constant
    assert s.on_failure(50.0) is None


@pytest.mark.parametrize("name", ["none", "off", "disable"])
def test_none_never_restarts(name):
    s = restart_strategy(cfg(**{"restart-strategy.type": name, "execution.checkpointing.interval": "1s"}))
    assert s.on_failure(0.0) is None
