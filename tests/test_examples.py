"""The example jobs (examples/*.py) on the real runtime, checked against single-process pure-Python references.

Each example's ``build(env, ...)`` runs with small inputs on an embedded
cluster; the references below recompute the answers from the examples'
documented inputs without the runtime. Each script also runs once as a user
runs it (``python examples/NAME.py <small args>``).
"""

from __future__ import annotations

import collections
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import StreamEnvironment

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import throughput  # noqa: E402
import windowed_sensors  # noqa: E402
import wordcount  # noqa: E402


def run_script(*args: str) -> subprocess.CompletedProcess:
    # This checkout's runtime, not another installed one: its workers (started from ROOT) run this checkout's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    return out


# ====================================================================================== windowed_sensors
def reference_windows(readings: list) -> tuple[dict, dict]:
    """Pure Python: ``{(sensor, start): (count, sum, max)}`` for 10 s tumbling windows and
    ``{(sensor, start): max}`` for 30 s windows sliding by 10 s (windows aligned to multiples of 10 s)."""
    tumbling: dict = {}
    sliding: dict = {}
    for sensor, t, temp in readings:
        start = math.floor(t / 10.0) * 10.0
        count, total, top = tumbling.get((sensor, start), (0, 0.0, -math.inf))
        tumbling[(sensor, start)] = (count + 1, total + temp, max(top, temp))
        for s in (start - 20.0, start - 10.0, start):  # every 30 s window [s, s + 30) holding t
            sliding[(sensor, s)] = max(sliding.get((sensor, s), -math.inf), temp)
    return tumbling, sliding


def operator_metric(result, chain_prefix: str, key: str) -> int:
    return sum(int(ops.get(key, 0)) for name, ops in result.metrics["operators"].items()
               if name.startswith(chain_prefix))


def test_generated_readings_are_out_of_order_within_the_bound():
    readings = windowed_sensors.generate(5_000, seed=1)
    assert readings == windowed_sensors.generate(5_000, seed=1)
    times = np.array([t for _, t, _ in readings])
    behind = np.maximum.accumulate(times) - times  # how far each reading is behind the latest before it
    assert behind.max() > 1.0  # really out of order
    assert behind.max() < windowed_sensors.MAX_DELAY
    assert len({s for s, _, _ in readings}) == windowed_sensors.SENSORS


@pytest.mark.parametrize("workers", [1, 3])
def test_windowed_sensors_equal_a_pure_python_reference(workers):
    readings = windowed_sensors.generate(60_000, seed=3)  # many source batches per worker: watermarks advance between them  # 50 sensors x 120 s
    env = StreamEnvironment(workers=workers)
    tumbling, sliding = windowed_sensors.build(env, readings)
    result = env.execute("windowed-sensors-test")
    ref_tumbling, ref_sliding = reference_windows(readings)

    got = {(sensor, start): (end, count, mean, top) for sensor, start, end, count, mean, top in tumbling.values()}
    assert len(got) == len(tumbling.values())  # one result per sensor and window
    assert got.keys() == ref_tumbling.keys()
    for key, (count, total, top) in ref_tumbling.items():
        end, got_count, got_mean, got_top = got[key]
        assert (end, got_count, got_top) == (key[1] + 10.0, count, top), key
        assert got_mean == pytest.approx(total / count, rel=1e-12), key

    got_sliding = {(sensor, start): (end, top) for sensor, start, end, top in sliding.values()}
    assert len(got_sliding) == len(sliding.values())
    assert got_sliding == {key: (key[1] + 30.0, top) for key, top in ref_sliding.items()}
    assert windowed_sensors.late_records(result) == 0


def test_late_readings_are_dropped_and_counted():
    readings = windowed_sensors.generate(60_000, seed=3)  # many source batches per worker: watermarks advance between them
    env = StreamEnvironment(workers=2)
    tumbling, _ = windowed_sensors.build(env, readings, out_of_orderness=0.5)  # readings are up to 3 s late
    result = env.execute("windowed-sensors-late")
    ref_tumbling, _ = reference_windows(readings)
    late = operator_metric(result, "window-reduce", "late_records_dropped")
    assert late > 0
    assert sum(count for *_, count, _, _ in tumbling.values()) + late == len(readings)  # dropped xor counted
    for sensor, start, _end, count, _mean, top in tumbling.values():
        ref_count, _, ref_top = ref_tumbling[(sensor, start)]
        assert count <= ref_count and top <= ref_top
    assert windowed_sensors.late_records(result) >= late


def test_windowed_sensors_script_runs():
    out = run_script("examples/windowed_sensors.py", "5000")  # 50 sensors x 100 s
    lines = out.stdout.splitlines()
    assert "tumbling 10 s windows: 500 (sensor x window); first windows of sensor s00:" in lines
    assert "sliding 30 s windows every 10 s: 600 (sensor x window); hottest:" in lines  # starts -20 .. 90
    assert any(line.startswith("  s00 [    0.0,    10.0)   ") for line in lines)
    assert "late records dropped: 0 (out-of-orderness 3 s, readings delayed up to 3 s)" in lines
    assert any(line.startswith("job 'windowed-sensors': 5,000 records in ") for line in lines)


# ============================================================================================ throughput
def reference_columns(n: int, chunk_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The documented data: chunk i from default_rng([seed, i]), keys first, then values."""
    keys, values = [], []
    for i in range(-(-n // chunk_rows)):
        rows = min(chunk_rows, n - i * chunk_rows)
        rng = np.random.default_rng([seed, i])
        keys.append(rng.integers(0, 100_000, size=rows, dtype=np.int64))
        values.append(rng.random(rows))
    return np.concatenate(keys), np.concatenate(values)


def test_throughput_batch_functions():
    chunks = [{"key": np.array([3, 1, 3]), "value": np.array([0.5, 1.0, 2.0])},
              {"key": np.array([7]), "value": np.array([4.0])}]
    columns = throughput.to_columns(chunks)
    assert columns["key"].tolist() == [3, 1, 3, 7] and columns["value"].tolist() == [0.5, 1.0, 2.0, 4.0]
    sums = throughput.per_key_sums(columns)
    assert sums["key"].tolist() == [1, 3, 7]
    assert sums["count"].tolist() == [1, 2, 1] and sums["sum"].tolist() == [1.0, 2.5, 4.0]
    counts, totals = throughput.totals([sums, sums], keys=8)
    assert counts.tolist() == [0, 2, 0, 4, 0, 0, 0, 2] and totals[3] == 5.0


@pytest.mark.parametrize("workers", [2, 3])
def test_throughput_equals_bincount(workers):
    n, chunk_rows, seed = 60_003, 10, 11  # 6,001 chunks, the last one short: several polls per subtask
    chunks = throughput.Chunks(n, chunk_rows, seed)
    env = StreamEnvironment(workers=workers)
    partials = throughput.build(env, chunks)
    result = env.execute("throughput-test")
    keys, values = reference_columns(n, chunk_rows, seed)
    for part in partials.values():
        assert len(np.unique(part["key"])) == len(part["key"])  # one partial per key and batch
    counts, sums = throughput.totals(partials.values())
    np.testing.assert_array_equal(counts, np.bincount(keys, minlength=100_000))
    np.testing.assert_allclose(sums, np.bincount(keys, weights=values, minlength=100_000), rtol=1e-9, atol=0)
    assert result.metrics["records"] == chunks.count


def test_throughput_script_runs():
    out = run_script("examples/throughput.py", "200000", "100")
    lines = out.stdout.splitlines()
    assert lines[0].startswith("200,000 records in 2,000 chunks of 100 rows on 2 workers: ")
    assert lines[0].endswith(" records/s")
    assert any(line.startswith("per-key sums of ") and " keys match np.bincount " in line for line in lines)
    assert any(line.startswith("job 'throughput': 2,000 records in ") for line in lines)


# ============================================================================================= wordcount
def test_wordcount_equals_counter(tmp_path):
    path = tmp_path / "corpus.txt"
    wordcount.generate_corpus(str(path), lines=2_000, vocabulary=500)
    expected = collections.Counter(word.lower() for line in path.read_text().splitlines() for word in line.split())
    env = StreamEnvironment(workers=2)
    counts = wordcount.build(env, str(path))
    env.execute("wordcount-test")
    assert len(counts.values()) == len(expected)  # batch mode: one final count per word
    assert dict(counts.values()) == expected


def test_wordcount_script_prints_the_top_ten(tmp_path):
    path = tmp_path / "corpus.txt"
    wordcount.generate_corpus(str(path), lines=2_000, vocabulary=500, seed=3)
    counter = collections.Counter(word.lower() for line in path.read_text().splitlines() for word in line.split())
    top = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    width = max(len(word) for word, _ in top)
    out = run_script("examples/wordcount.py", str(path))
    lines = out.stdout.splitlines()
    assert lines[:10] == [f"{word:<{width}}  {count:>9,}" for word, count in top]
    assert lines[10].startswith("job 'wordcount': 2,000 records in ")
