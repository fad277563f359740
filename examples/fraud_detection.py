"""Fraud detection, Flink's walkthrough: flag an account whose small transaction is followed, within a
minute, by a large one. A KeyedProcessFunction with two ValueStates and an event-time timer.

    python examples/fraud_detection.py                          # 200,000 transactions, heap state
    shmflow run examples/fraud_detection.py -D state.backend=managed
    shmflow run examples/fraud_detection.py --workers 3 -- 50000

A transaction is ``(account, event_time, amount)``. Per account, the function
remembers whether the last transaction was small (under 1.00) and when that
flag expires (one minute of event time later, by a timer). A large transaction
(over 500.00) while the flag is up is an alert ``(account, event_time, amount)``.
The stream is generated with a known number of planted frauds, so the run
checks its own answer against a plain-Python model (``expected_alerts``).
"""

from __future__ import annotations

import sys

import numpy as np

from runtime import KeyedProcessFunction, RuntimeContext, StreamEnvironment, ValueStateDescriptor

SMALL_AMOUNT = 1.00
LARGE_AMOUNT = 500.00
ONE_MINUTE = 60.0
ACCOUNTS = 1_000


class FraudDetector(KeyedProcessFunction):
    """Flink's FraudDetector: a flag per account, cleared by a timer one minute after a small transaction."""

    def open(self, runtime_context: RuntimeContext) -> None:
        self.flag = runtime_context.get_state(ValueStateDescriptor("flag"))
        self.timer = runtime_context.get_state(ValueStateDescriptor("timer-state"))

    def process_element(self, transaction, ctx):
        if self.flag.value() is not None:
            if transaction[2] > LARGE_AMOUNT:
                yield transaction  # an alert: the transaction that completed the pattern
            self._clean_up(ctx)
        if transaction[2] < SMALL_AMOUNT:
            self.flag.update(True)
            timer = ctx.timestamp() + ONE_MINUTE
            ctx.timer_service().register_event_time_timer(timer)
            self.timer.update(timer)

    def on_timer(self, timestamp, ctx):
        self.timer.clear()
        self.flag.clear()

    def _clean_up(self, ctx) -> None:
        timer = self.timer.value()
        if timer is not None:
            ctx.timer_service().delete_event_time_timer(timer)
        self.timer.clear()
        self.flag.clear()


def generate(n: int = 200_000, seed: int = 7, *, frauds: int = 200) -> list[tuple[int, float, float]]:
    """``n`` transactions in event-time order (one every 10 ms) with up to ``frauds`` planted patterns: a
    small transaction followed 0.05-0.5 s later by a large one on the same account (another transaction of
    the account in between, or a minute without one, clears the flag: not every planted pattern alerts)."""
    rng = np.random.default_rng(seed)
    accounts = rng.integers(0, ACCOUNTS, n)
    amounts = np.round(rng.uniform(5.0, 400.0, n), 2)
    times = np.arange(n) * 0.01
    for start in rng.choice(max(1, n - 6000), size=min(frauds, max(1, n // 6000)), replace=False):
        account = int(accounts[start])
        amounts[start] = 0.5
        later = start + int(rng.integers(5, 50))
        accounts[later] = account
        amounts[later] = 750.0
    return list(zip(accounts.tolist(), times.tolist(), amounts.tolist()))


def expected_alerts(transactions: list[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    """The alerts, computed in plain Python (the model the job is checked against)."""
    flag_until: dict[int, float] = {}
    alerts = []
    for account, ts, amount in transactions:
        until = flag_until.get(account)
        if until is not None and ts >= until:  # the timer fired before this transaction
            del flag_until[account]
            until = None
        if until is not None:
            if amount > LARGE_AMOUNT:
                alerts.append((account, ts, amount))
            del flag_until[account]
        if amount < SMALL_AMOUNT:
            flag_until[account] = ts + ONE_MINUTE
    return alerts


def build(env: StreamEnvironment, transactions: list):
    return (env.from_collection(transactions)
               .with_timestamps(lambda t: t[1])
               .key_by(lambda t: t[0])
               .process(FraudDetector(), name="fraud_detector")
               .collect())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 200_000
    transactions = generate(n)
    env = StreamEnvironment()
    alerts = build(env, transactions)
    result = env.execute("fraud-detection")
    got = sorted(alerts.values())
    want = sorted(expected_alerts(transactions))
    backend = env.config.state_backend
    print(f"{len(transactions):,} transactions, {len(got)} alerts (state.backend={backend})")
    for account, ts, amount in got[:5]:
        print(f"  account {account:4d} at {ts:9.2f} s: {amount:.2f} after a small transaction")
    print(result.summary())
    if got != want:
        print(f"MISMATCH: expected {len(want)} alerts", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
