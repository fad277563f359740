"""Restart strategies: whether a failed job restarts, and after how long (Flink's ``restart-strategy.*`` keys).

Imports: runtime.config (stdlib otherwise).

The coordinator asks its job's strategy once per failure
(:meth:`RestartStrategy.on_failure`) and gets the delay before the restart, or
None: give up, the job fails with every failure listed. The strategies and
their defaults are Flink's (1.19 and later):

- ``none``: never restart.
- ``fixed-delay``: at most ``attempts`` restarts, each after ``delay``.
- ``failure-rate``: restart after ``delay`` unless more than
  ``max-failures-per-interval`` failures fell within ``failure-rate-interval``.
- ``exponential-delay``: the first restart after ``initial-backoff``, each
  following one ``backoff-multiplier`` times later, at most ``max-backoff``,
  with ``jitter-factor`` of the backoff added or taken at random; a job that
  ran ``reset-backoff-threshold`` since its last failure starts over at the
  initial backoff; at most ``attempts-before-reset-backoff`` restarts between
  two resets.

Unset (``restart-strategy.type`` empty), the strategy is ``exponential-delay``
when checkpointing is on and ``none`` when it is off, as in Flink.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

__all__ = ["ExponentialDelay", "FailureRate", "FixedDelay", "NoRestart", "RestartStrategy", "restart_strategy",
           "strategy_name"]


class RestartStrategy:
    """Decides, failure by failure, whether and when a job restarts.

    Ownership: one per job run, the coordinator's; ``now`` is the caller's
    clock (seconds, monotonic). Not thread-safe.
    """

    name = "none"

    def on_failure(self, now: float) -> float | None:
        """Record a failure at ``now``: the seconds to wait before restarting, or None to give up."""
        raise NotImplementedError

    def describe(self) -> str:
        """The strategy and its settings, for the final failure's message."""
        return self.name


class NoRestart(RestartStrategy):
    """``none``: every failure fails the job."""

    def on_failure(self, now: float) -> float | None:
        return None

    def describe(self) -> str:
        return "none (restart-strategy.type)"


class FixedDelay(RestartStrategy):
    """``fixed-delay``: at most ``attempts`` restarts, each ``delay`` seconds after its failure."""

    name = "fixed-delay"

    def __init__(self, attempts: int, delay: float) -> None:
        self.attempts, self.delay = attempts, delay
        self.restarts = 0

    def on_failure(self, now: float) -> float | None:
        if self.restarts >= self.attempts:
            return None
        self.restarts += 1
        return self.delay

    def describe(self) -> str:
        return (f"fixed-delay with {self.attempts} attempt(s) (restart-strategy.fixed-delay.attempts) "
                f"of which {self.restarts} used")


class FailureRate(RestartStrategy):
    """``failure-rate``: restarts after ``delay`` while at most ``max_failures`` failures fall in ``interval``."""

    name = "failure-rate"

    def __init__(self, max_failures: int, interval: float, delay: float) -> None:
        self.max_failures, self.interval, self.delay = max_failures, interval, delay
        self._failures: deque[float] = deque()

    def on_failure(self, now: float) -> float | None:
        failures = self._failures
        failures.append(now)
        while failures and now - failures[0] > self.interval:
            failures.popleft()
        return None if len(failures) > self.max_failures else self.delay

    def describe(self) -> str:
        return (f"failure-rate: at most {self.max_failures} failure(s) "
                f"(restart-strategy.failure-rate.max-failures-per-interval) in {self.interval:g} s "
                f"(restart-strategy.failure-rate.failure-rate-interval)")


class ExponentialDelay(RestartStrategy):
    """``exponential-delay`` (see the module docstring). ``rng`` draws the jitter (seed it in tests)."""

    name = "exponential-delay"

    def __init__(self, initial: float, maximum: float, multiplier: float, reset_threshold: float, jitter: float,
                 attempts: int, *, rng: random.Random | None = None) -> None:
        self.initial, self.maximum, self.multiplier = initial, maximum, multiplier
        self.reset_threshold, self.jitter, self.attempts = reset_threshold, jitter, attempts
        self._rng = rng or random.Random()
        self._backoff: float | None = None  # the last backoff before jitter; None: none since the last reset
        self._last_failure: float | None = None
        self.restarts = 0  # since the last reset

    def on_failure(self, now: float) -> float | None:
        last = self._last_failure
        if last is not None and self._backoff is not None and now - last >= self.reset_threshold + self._backoff:
            self._backoff, self.restarts = None, 0  # it ran long enough without failure
        self._last_failure = now
        if self.restarts >= self.attempts:
            return None
        self.restarts += 1
        self._backoff = self.initial if self._backoff is None else min(self._backoff * self.multiplier, self.maximum)
        spread = self._backoff * self.jitter
        return max(0.0, self._backoff + (self._rng.uniform(-spread, spread) if spread else 0.0))

    def describe(self) -> str:
        return (f"exponential-delay with {self.attempts} attempt(s) before the backoff resets "
                f"(restart-strategy.exponential-delay.attempts-before-reset-backoff), {self.restarts} used")


def strategy_name(config: Any) -> str:
    """The strategy ``config`` (a ShmflowConfig) selects: ``restart-strategy.type``, or Flink's default."""
    name: str = config.restart_strategy
    if name:
        return name
    return "exponential-delay" if config.checkpoint_interval > 0 else "none"


def restart_strategy(config: Any, *, rng: random.Random | None = None) -> RestartStrategy:
    """A fresh strategy for one job run, from ``config`` (a ShmflowConfig)."""
    name = strategy_name(config)
    if name == "fixed-delay":
        return FixedDelay(config.fixed_delay_attempts, config.fixed_delay_delay)
    if name == "failure-rate":
        return FailureRate(config.failure_rate_max_failures, config.failure_rate_interval, config.failure_rate_delay)
    if name == "exponential-delay":
        return ExponentialDelay(config.exponential_initial_backoff, config.exponential_max_backoff,
                                config.exponential_multiplier, config.exponential_reset_threshold,
                                config.exponential_jitter, config.exponential_attempts, rng=rng)
    return NoRestart()
