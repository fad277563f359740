"""Batch keyed aggregations keep their state in managed memory and spill past it: real jobs, real workers.

Each job whose memory is measured runs in a fresh client process, so that
``RUSAGE_CHILDREN`` there is the peak RSS of exactly that job's workers,
measured from outside (the kernel's account, not the workers' own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from runtime import JobFailedError, StreamEnvironment

MiB = 1 << 20

#: A batch count over N records and K distinct string keys, run in a fresh client process. It checks its
#: answer against collections.Counter itself and prints its figures as JSON.
COUNT_JOB = textwrap.dedent("""
    import json, resource, sys
    from collections import Counter
    from runtime import StreamEnvironment
    n, k, managed = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

    def key(i):
        return "key-%012d" % ((i * 7919) % k)

    env = StreamEnvironment(workers=2, config={"memory.managed.size": managed})
    out = env.from_generator(key, count=n).key_by(lambda w: w).count().collect()
    result = env.execute("managed-count")
    got = dict(out.values())
    expected = Counter(map(key, range(n)))
    figures = {name: result.metrics[name] for name in
               ("spilled_bytes", "spill_files", "managed_peak_bytes", "worker_peak_rss_bytes", "gc_pause_seconds")}
    print(json.dumps({"equal": got == expected, "distinct": len(got), "results": len(out.values()),
                      "children_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                      **figures}))
""")


def run_count_job(n: int, k: int, managed: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", COUNT_JOB, str(n), str(k), managed], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_count_over_many_times_its_managed_memory_spills_equals_counter_and_stays_bounded():
    managed = 8 * MiB
    small = run_count_job(400_000, 10_000, "8mb")
    big = run_count_job(400_000, 200_000, "8mb")  # ~100k keys per worker: several times its managed memory
    assert big["equal"] and small["equal"]
    assert big["distinct"] == big["results"] == 200_000  # one final record per key
    assert big["spilled_bytes"] > 0 and big["spill_files"] > 0
    assert small["spilled_bytes"] == 0
    # W4's bound: the same job with few keys + managed memory + 96 MiB, measured from outside
    bound = small["children_peak_rss"] + managed + 96 * MiB
    assert big["children_peak_rss"] <= bound, (big, small)
    assert big["worker_peak_rss_bytes"] <= bound
    assert big["managed_peak_bytes"] <= 2 * managed  # both workers' peaks, each within its budget


#: A batch reduce(fn) with tuple values, and a global sort_by, over N records, in a fresh client process.
#: Each reduces its output to figures inside the job (no millions of records in the client) and checks
#: them against plain Python itself; it prints its figures as JSON.
REDUCE_AND_SORT_JOBS = textwrap.dedent("""
    import json, resource, sys
    from runtime import StreamEnvironment
    kind, n, k, managed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    env = StreamEnvironment(workers=2, config={"memory.managed.size": managed})

    def record(i):
        return ("key-%012d" % ((i * 7919) % k), (i % 13, i % 7))

    def merge(a, b):
        return (a[0], (a[1][0] + b[1][0], max(a[1][1], b[1][1])))

    def reduce_figures(batch):
        return [(len(batch), sum(r[1][0] for r in batch), sum(r[1][1] for r in batch),
                 len({r[0] for r in batch}))]

    def sort_figures(batch):
        keys = [r[0] for r in batch]
        return [(len(keys), keys[0], keys[-1], all(a <= b for a, b in zip(keys, keys[1:])), sum(keys))]

    if kind == "reduce":
        stream = env.from_generator(record, count=n).key_by(lambda r: r[0]).reduce(merge)
        out = stream.map_batches(reduce_figures).collect()
    else:  # ~100 bytes of payload per record: the sort's state is the records themselves
        stream = env.from_generator(lambda i: ((i * 7919) % n, "payload-%090d" % i), count=n)
        out = stream.sort_by(lambda r: r[0]).set_parallelism(1).map_batches(sort_figures).set_parallelism(1).collect()
    result = env.execute(f"managed-{kind}")
    parts = out.values()
    if kind == "reduce":
        expected = {}
        for i in range(n):
            key, (s, m) = record(i)
            old = expected.get(key)
            expected[key] = (s, m) if old is None else (old[0] + s, max(old[1], m))
        want = (len(expected), sum(v[0] for v in expected.values()), sum(v[1] for v in expected.values()))
        got = (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts))
        equal = got == want and sum(p[3] for p in parts) == len(expected)
    else:
        in_order = all(p[3] for p in parts) and all(a[2] <= b[1] for a, b in zip(parts, parts[1:]))
        equal = in_order and sum(p[0] for p in parts) == n and sum(p[4] for p in parts) == n * (n - 1) // 2
    figures = {name: result.metrics[name] for name in
               ("spilled_bytes", "spill_files", "managed_peak_bytes", "worker_peak_rss_bytes")}
    print(json.dumps({"equal": equal, "children_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                      * 1024, **figures}))
""")


def run_managed_job(kind: str, n: int, k: int, managed: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", REDUCE_AND_SORT_JOBS, kind, str(n), str(k), managed],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "n_big", "k_big"), [("reduce", 2_000_000, 1_000_000), ("sort", 1_500_000, 0)])
def test_reduce_and_sort_far_past_managed_memory_spill_equal_python_and_stay_bounded(kind, n_big, k_big):
    """On the heap, this reduce's 1 M keys with tuple values, or this sort's 1.5 M records of ~100
    bytes, would take several hundred MiB; in 8 MiB of managed memory per worker they spill, and each
    worker's peak RSS (measured from outside) stays within W4's bound: the same job at 10,000 records
    (or keys) + its managed memory + 96 MiB."""
    managed = 8 * MiB
    small = run_managed_job(kind, 20_000 if kind == "reduce" else 10_000, 10_000, "8mb")
    big = run_managed_job(kind, n_big, k_big or n_big, "8mb")
    assert small["equal"] and big["equal"], (small, big)
    assert big["spilled_bytes"] > 0 and big["spill_files"] > 0
    assert small["spilled_bytes"] == 0
    bound = small["children_peak_rss"] + managed + 96 * MiB
    assert big["children_peak_rss"] <= bound, (big, small)
    assert big["worker_peak_rss_bytes"] <= bound


def test_reduce_with_tuple_values_in_managed_memory_equals_python():
    n, k = 500_000, 250_000  # more keys than the staging dict holds (operators.managed_keyed.STAGING_KEYS)
    records = [(f"k{(i * 31) % k}", (i % 13, i % 7)) for i in range(n)]
    env = StreamEnvironment(workers=2, config={"memory.managed.size": "2mb"})
    out = (env.from_collection(records).key_by(lambda r: r[0])
           .reduce(lambda a, b: (a[0], (a[1][0] + b[1][0], max(a[1][1], b[1][1])))).collect())
    result = env.execute("managed-reduce")
    expected: dict[str, tuple[int, int]] = {}
    for key, (s, m) in records:
        old = expected.get(key)
        expected[key] = (s, m) if old is None else (old[0] + s, max(old[1], m))
    got = {r[0]: r[1] for r in out.values()}
    assert got == expected
    assert all(type(r) is tuple and type(r[1]) is tuple for r in out.values())
    assert result.metrics["managed_peak_bytes"] > 0 and result.metrics["spilled_bytes"] > 0


def test_a_columnar_sum_by_int_key_stays_columnar_and_equals_numpy():
    n, k = 400_000, 150_000
    keys = (np.arange(n, dtype=np.int64) * 7919) % k
    values = np.arange(n, dtype=np.int64) % 5
    env = StreamEnvironment(workers=2, config={"memory.managed.size": "2mb"})
    out = env.from_collection({"k": keys, "v": values}).key_by("k").sum("v").collect()
    result = env.execute("managed-columnar")
    batches = out.values()
    assert batches and all(isinstance(b, dict) and set(b) == {"k", "v"} for b in batches)
    got_keys = np.concatenate([b["k"] for b in batches])
    got_sums = np.concatenate([b["v"] for b in batches])
    assert len(np.unique(got_keys)) == len(got_keys) == k
    expected = np.bincount(keys, weights=values, minlength=k).astype(np.int64)
    assert np.array_equal(got_sums[np.argsort(got_keys)], expected)
    assert result.metrics["spilled_bytes"] > 0


def test_an_unwritable_spill_directory_fails_the_job_naming_io_tmp_dirs(tmp_path):
    blocked = tmp_path / "no-such-dir" / "spill"
    env = StreamEnvironment(workers=2, config={"memory.managed.size": "2mb", "io.tmp-dirs": str(blocked)})
    env.from_generator(lambda i: f"key-{i}", count=300_000).key_by(lambda w: w).count().collect()
    with pytest.raises(JobFailedError, match=r"io\.tmp-dirs") as failure:
        env.execute("unwritable-spill")
    assert str(blocked) in str(failure.value)
    assert not blocked.exists()


def test_key_value_pairs_sum_in_numpy_columns_and_hand_over_when_a_record_breaks_the_shape():
    records = [(i % 1000, i % 7) for i in range(30_000)]
    records[20_000] = (5, 3, "a third field")  # from here on the object form, with the state handed over
    env = StreamEnvironment(workers=2, config={"memory.managed.size": "2mb"})
    out = env.from_collection(records).key_by(lambda r: r[0]).sum(1).collect()
    env.execute("pairs-then-triples")
    sums: dict[int, int] = {}
    for r in records:
        sums[r[0]] = sums.get(r[0], 0) + r[1]
    got = out.values()
    assert {r[0]: r[1] for r in got} == sums and len(got) == len(sums)
    assert all(type(r) is tuple for r in got)


def test_small_int_keys_aggregate_in_an_array_and_hand_over_to_the_hash_table_when_a_key_leaves_it():
    rng = np.random.default_rng(3)
    keys = np.concatenate([rng.integers(0, 1_000, 100_000), rng.integers(0, 10**9, 100_000)]).astype(np.int64)
    values = rng.integers(-5, 6, len(keys)).astype(np.int64)
    env = StreamEnvironment(workers=2, config={"memory.managed.size": "2mb"})
    out = env.from_collection({"k": keys, "v": values}).key_by("k").min("v").collect()
    env.execute("dense-then-hash")
    got_k = np.concatenate([b["k"] for b in out.values()])
    got_v = np.concatenate([b["v"] for b in out.values()])
    uniq, inverse = np.unique(keys, return_inverse=True)
    expected = np.full(len(uniq), np.iinfo(np.int64).max)
    np.minimum.at(expected, inverse, values)
    order = np.argsort(got_k)
    assert np.array_equal(got_k[order], uniq) and np.array_equal(got_v[order], expected)


@pytest.mark.parametrize("breaker", [None, "k" * 40, "clé-é", "nul\0", 7])
def test_str_key_pairs_sum_as_bytes_in_pages_spill_and_hand_over_on_a_key_that_does_not_fit(breaker):
    """(str, int) pairs keyed by the str: ASCII bytes in the fixed form's rows, spilled at 2 MiB; a key that
    the form cannot take (too long, not ASCII, a NUL, not a str) hands the state to the object form."""
    n, k = 300_000, 120_000
    records = [(f"key-{(i * 7919) % k}", i % 5) for i in range(n)]
    if breaker is not None:
        records[250_000] = (breaker, 3)
        records.append((breaker, 4))
    env = StreamEnvironment(workers=2, config={"memory.managed.size": "2mb"})
    out = env.from_collection(records).key_by(lambda r: r[0]).sum(1).collect()
    result = env.execute("str-pairs")
    sums: dict[object, int] = {}
    for key, value in records:
        sums[key] = sums.get(key, 0) + value
    got = out.values()
    assert {r[0]: r[1] for r in got} == sums and len(got) == len(sums)
    assert all(type(r) is tuple for r in got)
    assert {type(r[0]) for r in got} == {type(key) for key in sums}
    assert result.metrics["spilled_bytes"] > 0
