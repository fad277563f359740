"""Keyed process functions with state and timers in real jobs (real workers, real shuffles), on every backend."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import JobFailedError, KeyedProcessFunction, RuntimeContext, StreamEnvironment, ValueStateDescriptor

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["heap", "managed"]


class CountWithTimeout(KeyedProcessFunction):
    """The issue's example: a count per key, and a timeout record one minute after each element."""

    def open(self, runtime_context: RuntimeContext):
        self.count = runtime_context.get_state(ValueStateDescriptor("count"))

    def process_element(self, value, ctx):
        c = (self.count.value() or 0) + 1
        self.count.update(c)
        ctx.timer_service().register_event_time_timer(ctx.timestamp() + 60)
        yield ctx.get_current_key(), c

    def on_timer(self, timestamp, ctx):
        yield ctx.get_current_key(), "timeout", self.count.value()


@pytest.mark.parametrize("backend", BACKENDS)
def test_count_with_timeout_equals_a_model_on_a_real_job(backend):
    # Every timestamp is below 30 s and every timer at least 60 s: the timers fire at the end of the input.
    records = [(f"k{(i * 7) % 500}", (i % 3000) / 100) for i in range(20_000)]
    env = StreamEnvironment(workers=2, config={"state.backend": backend, "memory.managed.size": "2mb"})
    out = (env.from_collection(records).with_timestamps(lambda r: r[1])
              .key_by(lambda r: r[0]).process(CountWithTimeout()).collect())
    result = env.execute(f"count-with-timeout-{backend}")
    counts = collections.Counter(key for key, _ in records)
    timers = {(key, ts + 60) for key, ts in records}
    want = [(key, c) for key, n in counts.items() for c in range(1, n + 1)]
    want += [(key, "timeout", counts[key]) for key, _ in timers]
    assert sorted(out.values(), key=repr) == sorted(want, key=repr)
    chain = next(m for name, m in result.metrics["operators"].items() if name.startswith("process"))
    assert chain["state_entries"] == len(counts) and chain["timers_pending"] == 0
    assert 0.0 <= chain["state_cache_hit_rate"] <= 1.0
    summary = result.summary().splitlines()
    at = next(i for i, line in enumerate(summary) if line.startswith("  process"))
    assert summary[at + 1].startswith(f"    state: {len(counts)} entries, "), summary
    assert [line.split(":")[0] for line in summary if line.startswith("  worker ")] == ["  worker 0", "  worker 1"]
    assert all("GC pauses " in line for line in summary if line.startswith("  worker "))
    if backend == "managed":  # every entry is one object of the small-object allocator's bins
        objects = sum(v for k, v in chain.items() if k.startswith("state_bin_") and k.endswith("_objects"))
        assert objects == len(counts)
        assert chain["state_cache_hits"] + chain["state_cache_misses"] >= len(records)  # a read per record
        assert summary[at + 1].endswith(" reads") and summary[at + 2].startswith("    state bins: 16 B "), summary


class LastSeen(KeyedProcessFunction):
    """A timer per key and element, five seconds on; on_timer reports it, and that the key has a count."""

    def open(self, runtime_context: RuntimeContext):
        self.count = runtime_context.get_state(ValueStateDescriptor("count"))

    def process_element(self, value, ctx):
        self.count.update((self.count.value() or 0) + 1)
        ctx.timer_service().register_event_time_timer(ctx.timestamp() + 5)

    def on_timer(self, timestamp, ctx):
        yield ctx.get_current_key(), timestamp, self.count.value() > 0


def test_many_timers_on_the_managed_backend_spill_and_fire_as_on_the_heap_backend():
    # 60 k timers of 30 k keys, each once (how the watermarks interleave with the records then changes
    # nothing); at 1 MiB of managed memory a worker's timer store (a quarter) spills.
    records = [(f"key-{(i * 7919) % 30_000:06d}", i / 100) for i in range(60_000)]
    outputs, metrics = {}, {}
    for backend in BACKENDS:
        env = StreamEnvironment(workers=2, config={"state.backend": backend, "memory.managed.size": "1mb"})
        out = (env.from_collection(records).with_timestamps(lambda r: r[1])
                  .key_by(lambda r: r[0]).process(LastSeen()).collect())
        result = env.execute(f"many-timers-{backend}")
        outputs[backend] = sorted(out.values())
        metrics[backend] = next(m for name, m in result.metrics["operators"].items() if name.startswith("process"))
    assert outputs["managed"] == outputs["heap"]
    assert outputs["heap"] == sorted((key, ts + 5, True) for key, ts in records)
    assert metrics["managed"]["timers_pending"] == metrics["heap"]["timers_pending"] == 0
    assert metrics["managed"]["state_bytes_on_disk"] > 0


class RemembersSets(KeyedProcessFunction):
    def open(self, runtime_context):
        self.words = runtime_context.get_state(ValueStateDescriptor("words-seen"))

    def process_element(self, value, ctx):
        self.words.update({value})


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_value_that_cannot_be_stored_fails_the_job_naming_the_state_and_type(backend):
    env = StreamEnvironment(workers=2, config={"state.backend": backend})
    env.from_collection(["a", "b"]).key_by(lambda w: w).process(RemembersSets()).collect()
    with pytest.raises(JobFailedError, match=r"state 'words-seen' cannot hold a value of type set"):
        env.execute("unstorable-state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fraud_detection_example_runs_with_shmflow_run_on_each_backend(backend):
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(ROOT / "examples" / "fraud_detection.py"),
                           "-D", f"state.backend={backend}", "--", "60000"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"60,000 transactions, 10 alerts (state.backend={backend})" in proc.stdout, proc.stdout


def test_a_streaming_count_on_the_managed_backend_spills_and_equals_the_heap_backend():
    n, k = 120_000, 60_000

    def figures(batch):
        return [(len(batch), sum(c for _, c in batch), max(c for _, c in batch))]

    results = {}
    for backend in BACKENDS:
        env = StreamEnvironment(workers=2, mode="streaming",
                                config={"state.backend": backend, "memory.managed.size": "1mb"})
        out = (env.from_generator(lambda i: f"key-{(i * 7919) % k}", count=n).key_by(lambda w: w).count()
                  .map_batches(figures).collect())
        result = env.execute(f"streaming-count-{backend}")
        parts = out.values()
        chain = next(m for name, m in result.metrics["operators"].items() if name.startswith("count"))
        results[backend] = (sum(p[0] for p in parts), sum(p[1] for p in parts), max(p[2] for p in parts),
                            chain["state_entries"])
        if backend == "managed":
            assert chain["state_bytes_on_disk"] > 0
    assert results["heap"] == results["managed"] == (n, n * 3 // 2, 2, k)


def test_event_time_windows_on_the_managed_backend_equal_the_heap_backend():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import windowed_sensors as example
    finally:
        sys.path.remove(str(ROOT / "examples"))
    readings = example.generate(30_000)
    outputs = {}
    for backend in BACKENDS:
        env = StreamEnvironment(workers=2, config={"state.backend": backend, "memory.managed.size": "2mb"})
        tumbling, sliding = example.build(env, readings)
        result = env.execute(f"windows-{backend}")
        # float sums depend on the order two input channels interleave in: compare them rounded
        outputs[backend] = tuple(sorted(tuple(round(v, 9) if isinstance(v, float) else v for v in r) for r in rows)
                                 for rows in (tumbling.values(), sliding.values()))
        if backend == "managed":
            chains = [m for name, m in result.metrics["operators"].items() if "state_entries" in m]
            assert chains and all(m["state_entries"] == 0 for m in chains)  # every window fired and was dropped
    assert outputs["heap"] == outputs["managed"]
    assert len(outputs["heap"][0]) > 100


#: A streaming count over N records and K keys in a fresh client process (so that RUSAGE_CHILDREN is its
#: workers' peak RSS, measured from outside); the job reduces its updates to figures itself.
STREAMING_COUNT_JOB = """
import json, resource, sys
from runtime import StreamEnvironment
backend, n, k, managed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def figures(batch):
    return [(len(batch), sum(c for _, c in batch), sum(hash(w) % 1000 * c for w, c in batch))]

env = StreamEnvironment(workers=2, mode="streaming", config={"state.backend": backend, "memory.managed.size": managed})
out = (env.from_generator(lambda i: "key-%012d" % ((i * 7919) % k), count=n).key_by(lambda w: w).count()
          .map_batches(figures).collect())
result = env.execute("streaming-count")
parts = out.values()
print(json.dumps({"figures": [sum(p[i] for p in parts) for i in range(3)],
                  "spilled": result.metrics["spilled_bytes"],
                  "children_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def run_streaming_count(backend: str, n: int, k: int, managed: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", STREAMING_COUNT_JOB, backend, str(n), str(k), managed],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_streaming_count_over_2m_keys_in_16_mib_equals_heap_and_stays_within_the_bound():
    heap = run_streaming_count("heap", 2_000_000, 2_000_000, "16mb")
    managed = run_streaming_count("managed", 2_000_000, 2_000_000, "16mb")
    small = run_streaming_count("managed", 20_000, 10_000, "16mb")
    assert managed["figures"] == heap["figures"]
    assert managed["figures"][:2] == [2_000_000, 2_000_000]
    assert managed["spilled"] > 0 and small["spilled"] == 0
    bound = small["children_peak_rss"] + 16 * (1 << 20) + 96 * (1 << 20)  # W4's bound
    assert managed["children_peak_rss"] <= bound, (managed, small)
