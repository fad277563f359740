"""Streaming jobs end to end on real worker processes sharing one region."""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time

import failing_jobs
import pytest
from helpers import wait_until

from runtime import StreamEnvironment
from runtime.api import SlidingEventTimeWindows, TumblingEventTimeWindows
from runtime.errors import JobFailedError

CORPUS = [f"The quick brown fox {i % 7} jumps over THE lazy dog {i % 13}" for i in range(3000)]
EXPECTED = collections.Counter(w.lower() for line in CORPUS for w in line.split())


#: The three topologies every end-to-end job runs on.
TOPOLOGIES = {
    # every subtask in one worker process: chained operators call each other, exchanges loop back
    "one-process": {"workers": 1},
    # two workers on one host: descriptors travel, the bytes stay in the shared region
    "shm": {"workers": 2, "config": {"network.transport": "shm"}},
    # two workers that copy the bytes over ZeroMQ tcp, as between hosts
    "tcp": {"workers": 2, "config": {"network.transport": "tcp"}},
}


@pytest.fixture(params=list(TOPOLOGIES))
def make_env(request):
    """``make_env(mode=...)``: a StreamEnvironment on one of the three topologies."""
    def make(**kwargs):
        return StreamEnvironment(**TOPOLOGIES[request.param], **kwargs)
    return make


def wordcount(env):
    return (env.from_collection(CORPUS).flat_map(str.split).map(str.lower)
            .key_by(lambda w: w).count().collect())


def test_wordcount_equals_counter(make_env):
    env = make_env()
    out = wordcount(env)
    result = env.execute("wordcount")
    assert dict(out.values()) == EXPECTED
    assert len(out.values()) == len(EXPECTED)  # batch mode: one final record per key
    assert result.metrics["seconds"] > 0


def test_wordcount_on_three_workers_equals_counter():
    env = StreamEnvironment(workers=3)
    out = wordcount(env)
    env.execute("wordcount-3")
    assert dict(out.values()) == EXPECTED


def test_streaming_mode_last_update_per_key_equals_batch(make_env):
    env = make_env(mode="streaming")
    out = wordcount(env)
    env.execute("wordcount-streaming")
    assert len(out.values()) == sum(EXPECTED.values())  # every update
    last = {}
    for word, count in out.values():
        assert count == last.get(word, 0) + 1  # per key, updates arrive in order
        last[word] = count
    assert last == EXPECTED


def test_operators_chain_and_shuffle_with_tuples_intact(make_env):
    env = make_env()
    nums = env.from_collection(range(1000))
    out = (nums.filter(lambda x: x % 3 == 0).map(lambda x: (x % 10, x)).key_by(lambda t: t[0])
           .sum(1).collect())
    env.execute("sum")
    expected = {}
    for x in range(0, 1000, 3):
        expected[x % 10] = expected.get(x % 10, 0) + x
    assert sorted(out.values()) == sorted(expected.items())
    assert all(type(r) is tuple for r in out.values())


def test_union_rebalance_broadcast_and_reduce(make_env):
    env = make_env()
    a = env.from_collection([("a", 1)] * 10)
    b = env.from_collection([("b", 2)] * 10)
    out = a.union(b).rebalance().key_by(lambda t: t[0]).reduce(lambda x, y: (x[0], x[1] + y[1])).collect()
    bc = env.from_collection([1, 2, 3]).broadcast().collect()
    env.execute("union")
    assert sorted(out.values()) == [("a", 10), ("b", 20)]
    assert sorted(bc.values()) == sorted([1, 2, 3] * env.workers)  # every subtask got every record


def test_event_time_windows_equal_a_pure_python_reference(make_env):
    events = [(f"s{i % 3}", (i * 7) % 50 + (i // 50) * 50, 1.0) for i in range(600)]  # out of order within 50s
    env = make_env()
    stream = env.from_collection(events).with_timestamps(lambda e: float(e[1]), out_of_orderness=50.0)
    tumbling = stream.key_by(lambda e: e[0]).window(TumblingEventTimeWindows.of(10.0)).count().collect()
    sliding = stream.key_by(lambda e: e[0]).window(SlidingEventTimeWindows.of(20.0, 10.0)).count().collect()
    env.execute("windows")
    ref_t = collections.Counter((k, (t // 10) * 10.0) for k, t, _ in events)
    assert sorted((k, s, n) for k, n, s, e in tumbling.values()) == sorted((k, s, n) for (k, s), n in ref_t.items())
    ref_s = collections.Counter()
    for k, t, _ in events:
        start = (t // 10) * 10.0
        ref_s[(k, start)] += 1
        ref_s[(k, start - 10.0)] += 1
    assert sorted((k, s, n) for k, n, s, e in sliding.values()) == sorted((k, s, n) for (k, s), n in ref_s.items())
    assert all(e - s == 20.0 for _, _, s, e in sliding.values())


def test_batches_over_the_record_size_limit_are_split_and_one_record_over_it_fails_by_name():
    import numpy as np
    limit = {"network.max-record-size": "1kb"}  # every batch here needs splitting, and splitting again
    env = StreamEnvironment(workers=2, config=limit)
    counts = env.from_collection(CORPUS).flat_map(str.split).map(str.lower).key_by(lambda w: w).count().collect()
    events = [(f"s{i % 3}", float((i * 7) % 50 + (i // 50) * 50)) for i in range(3000)]
    windows = (env.from_collection(events).with_timestamps(lambda e: e[1], out_of_orderness=50.0)
               .key_by(lambda e: e[0]).window(TumblingEventTimeWindows.of(10.0)).count().collect())
    columns = env.from_collection({"key": np.arange(20_000) % 5, "value": np.ones(20_000)}).key_by("key") \
        .map_batches(lambda b: [len(b["key"])]).collect()
    env.execute("split-batches")
    assert dict(counts.values()) == EXPECTED
    assert sum(n for _k, n, _s, _e in windows.values()) == len(events)
    assert sum(columns.values()) == 20_000

    env = StreamEnvironment(workers=2, config=limit)
    env.from_collection(["x" * 5000]).rebalance().collect()
    with pytest.raises(JobFailedError, match=r"(?s)RecordTooLargeError: records frame of \d+ bytes exceeds the "
                                             r"record size limit of 1024 bytes \(network.max-record-size\)"):
        env.execute("one-record-too-large")


def _boom(x):
    if x == 777:
        raise ValueError(f"bad record {x}")
    return x


def test_a_failing_user_function_fails_the_job_with_its_traceback():
    env = StreamEnvironment(workers=2)
    env.from_collection(range(2000)).map(_boom, name="explode").collect()
    with pytest.raises(JobFailedError, match=r"(?s)operator 'explode' on worker \d \(pid \d+\) raised:.*"
                       r"ValueError: bad record 777"):
        env.execute("failing")


def test_a_function_that_cannot_be_shipped_fails_at_once_with_the_operator_name():
    lock = threading.Lock()
    env = StreamEnvironment(workers=2)
    env.from_collection([1]).map(lambda x: (lock, x), name="holds-a-lock").collect()
    started = time.monotonic()
    with pytest.raises(JobFailedError, match="operator 'holds-a-lock' of job 'unshippable' cannot be shipped"):
        env.execute("unshippable")
    assert time.monotonic() - started < 5


def _worker_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == os.getpid() and b"runtime.cluster.worker" in cmd:
            pids.append(int(entry))
    return pids


def _touch_then(marker):
    def fn(x):
        if not os.path.exists(marker):
            open(marker, "a").close()  # the job is running: records flow
        return x + 1
    return fn


def test_a_sigkilled_worker_fails_the_job_cleanly(tmp_path):
    marker = str(tmp_path / "running")
    env = StreamEnvironment(workers=2)
    env.from_generator(lambda i: i, rate=2000).map(_touch_then(marker)).key_by(lambda x: x % 5).count().collect()
    errors: list[BaseException] = []

    def run():
        try:
            env.execute("doomed")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_until(lambda: os.path.exists(marker), timeout=60, msg="records flowing")
        victim = _worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        thread.join(30)
        assert not thread.is_alive()
        assert time.monotonic() - killed_at < 15
    finally:
        thread.join(60)
    assert len(errors) == 1 and isinstance(errors[0], JobFailedError)
    assert f"(pid {victim}) exited with -9" in str(errors[0])
    assert "was reclaimed" in str(errors[0])
    wait_until(lambda: not _worker_pids(), timeout=15, msg="workers gone")


def test_a_job_needing_more_network_buffers_than_exist_fails_at_deployment():
    from runtime.errors import InsufficientNetworkBuffersError
    config = {"memory.region.size": "64mb", "memory.network.min": "0", "memory.network.max": "384kb",
              "memory.network.fraction": "0.5", "network.buffers-per-channel": 2,
              "network.floating-buffers-per-gate": 8}
    env = StreamEnvironment(workers=2, config=config)
    stream = env.from_collection(range(100))
    for _ in range(5):  # five shuffles: 5 x (2 channels + 1) = 15 buffers per worker, 12 exist
        stream = stream.rebalance()
    stream.collect()
    with pytest.raises(InsufficientNetworkBuffersError, match=r"^insufficient network buffers for job 'greedy' on "
                       r"worker 0: required 15, available 12 \(buffer size 32 KiB\); raise memory\.network"):
        env.execute("greedy")


CTRL_C_JOB = """
from runtime import StreamEnvironment
env = StreamEnvironment(workers=2)
env.from_generator(lambda i: i, rate=1000).key_by(lambda x: x % 3).count().collect()
print("starting", flush=True)
env.execute("forever")
"""


def test_ctrl_c_shuts_everything_down_cleanly(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "forever.py"
    script.write_text(CTRL_C_JOB)
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "run", str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "starting"

        def workers():
            return [pid for pid in _all_pids() if _ppid(pid) == proc.pid]
        wait_until(lambda: len(workers()) == 2, timeout=60, msg="two workers")
        children = workers()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        proc.wait(30)
        assert proc.returncode != 0
        wait_until(lambda: not [p for p in children if _alive(p)], timeout=15, msg="workers exited")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except OSError:
        return -1


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_the_same_environment_executes_twice_with_equal_results():
    env = StreamEnvironment(workers=2)
    out = wordcount(env)
    env.execute("first")
    first = dict(out.values())
    env.execute("second")
    assert dict(out.values()) == first == EXPECTED


def test_a_columnar_collection_shuffles_by_column_with_numpy(make_env):
    import numpy as np
    keys = np.arange(10_000, dtype=np.int64) % 97
    values = np.ones(10_000)
    env = make_env()
    sums = (env.from_collection({"key": keys, "value": values}).key_by("key")
            .map_batches(lambda b: {"key": np.unique(b["key"]), "sum": np.bincount(b["key"], b["value"])[np.unique(b["key"])]})
            .collect())
    env.execute("columnar")
    total = np.zeros(97)
    for batch in sums.values():
        assert isinstance(batch, dict)
        np.add.at(total, batch["key"], batch["sum"])
    assert np.array_equal(total, np.bincount(keys, values, minlength=97))


def test_a_columnar_source_is_polled_in_batches_of_half_a_mebibyte():
    import numpy as np

    from runtime.execution.subtask import SOURCE_COLUMNAR_BYTES
    n = 100_000
    env = StreamEnvironment(workers=1)
    # 16 bytes per row (int64 + float64): 32,768 rows per batch, large enough that numpy's work dominates
    lengths = (env.from_collection({"key": np.arange(n, dtype=np.int64), "value": np.ones(n)})
               .map_batches(lambda b: [len(b["key"])]).collect())
    env.execute("columnar-batches")
    rows = SOURCE_COLUMNAR_BYTES // 16
    assert lengths.values() == [rows, rows, rows, n - 3 * rows]


PRINT_AND_FILE_JOB = """
import sys
from runtime import StreamEnvironment
env = StreamEnvironment(workers=2)
stream = env.from_collection(range(6)).map(lambda x: x * 10)
stream.print()
stream.to_file(sys.argv[1])
env.execute("print-and-file")
"""


def test_print_and_to_file_sinks(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "job.py"
    script.write_text(PRINT_AND_FILE_JOB)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's runtime, as its workers'
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH")] if p)}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == ["1> 0", "1> 10", "1> 20", "2> 30", "2> 40", "2> 50"]
    parts = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in parts] == ["part-0", "part-1"]
    assert [line for p in parts for line in p.read_text().splitlines()] == ["0", "10", "20", "30", "40", "50"]


def _deep_record(depth: int, i: int) -> tuple:
    """Record ``i``: ``(i, nested)``, ``nested`` holding ``depth`` lists and tuples in turn (MARKED frames)."""
    rec: object = i
    for level in range(depth):
        rec = [rec] if level % 2 else (rec,)
    return (i, rec)


def _depths(batch: list) -> list:
    out = []
    for i, rec in batch:
        depth = 0
        while isinstance(rec, (list, tuple)):
            depth, rec = depth + 1, rec[0]
        out.append((i, depth, rec == i))
    return out


@pytest.mark.parametrize("depth", [100, 250, 450, 1000, 1023, 2000])
def test_deeply_nested_records_cross_a_shuffle_or_fail_the_job_typed(depth):
    # Each record nests depth + 1 levels (the (i, nested) tuple); 1,023 is serializer.MAX_NESTING.
    import functools
    env = StreamEnvironment(workers=2)
    out = (env.from_generator(functools.partial(_deep_record, depth), count=40)
           .key_by(lambda r: r[0] % 3).map_batches(_depths).collect())
    if depth + 1 > 1023:
        with pytest.raises(JobFailedError, match=r"(?s)NestingTooDeepError: cannot serialize: .*deeper than 1023 "
                                                 r"levels.*serializer\.MAX_NESTING") as info:
            env.execute("too-deep", timeout=60)
        assert "exited with" not in str(info.value)
    else:
        env.execute("deep", timeout=60)
        assert sorted(out.values()) == [(i, depth, True) for i in range(40)]
    env = StreamEnvironment(workers=2)
    again = env.from_collection(["ok"]).key_by(lambda w: w).count().collect()  # nothing is left broken
    env.execute("after", timeout=60)
    assert again.values() == [("ok", 1)]


@pytest.mark.slow
@pytest.mark.parametrize("quarter", range(4))
def test_100_jobs_failing_at_random_moments_each_return_within_2s_and_the_next_job_runs(quarter, monkeypatch):
    # The embedded twin of the standing cluster's loop (tests/test_cluster.py): a worker waiting for a peer
    # that failed acts on the coordinator's Cancel and Shutdown at once, so execute() does not wait for it.
    # Starting the worker processes is not counted: on a loaded 2-core machine that alone can take 1.5 s.
    # 4 x 25 jobs, each with its cluster: one test of 100 would pass the suite's 120 s hang watchdog.
    from runtime.cluster import local

    started = []
    start_cluster = local.LocalCluster.__init__

    def timed_start(self, config):
        t = time.monotonic()
        start_cluster(self, config)
        started.append(time.monotonic() - t)

    monkeypatch.setattr(local.LocalCluster, "__init__", timed_start)
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    for i in range(25 * quarter, 25 * quarter + 25):
        env = StreamEnvironment(workers=2)
        where = failing_jobs.failing_job(env, rng)
        start = time.monotonic()
        with pytest.raises(JobFailedError, match="injected failure"):
            env.execute(f"failing-{i}", timeout=60)
            pytest.fail(f"seed {seed}, job {i}: did not fail ({where})")
        took = time.monotonic() - start - started[-1]
        assert took < 2, f"seed {seed}, job {i}: the failing job ({where}) took {took:.2f}s to return"
        env = StreamEnvironment(workers=2)
        out = failing_jobs.healthy_job(env)
        env.execute(f"healthy-{i}", timeout=60)
        assert dict(out.values()) == failing_jobs.HEALTHY, f"seed {seed}, job {i} ({where})"


def test_a_job_graph_over_cluster_max_message_size_fails_before_it_is_sent_naming_the_key():
    env = StreamEnvironment(workers=2, config={"cluster.max-message-size": "1mb"})
    env.from_collection([("record", i) for i in range(600_000)]).key_by(lambda r: r[1] % 2).count().collect()
    with pytest.raises(JobFailedError, match=(
            r"^the graph of job 'big' for worker 0 is \d+\.\d MiB; cluster.max-message-size allows 1.0 MiB: "
            r"raise it .*the embedded cluster ships each worker only its share")):
        env.execute("big", timeout=60)


def test_the_job_reports_each_workers_peak_rss_and_gc_pauses():
    import resource
    env = StreamEnvironment(workers=2)
    wordcount(env)
    result = env.execute("memory-metrics")
    m = result.metrics
    assert sorted(m["workers"]) == [0, 1]
    for figures in m["workers"].values():
        assert 10 << 20 < figures["peak_rss_bytes"] < 1 << 30  # a Python process with numpy, zmq and a job
        assert figures["gc_pause_seconds"] >= 0.0
        assert figures["network_peak_bytes"] > 0
    assert m["worker_peak_rss_bytes"] == max(f["peak_rss_bytes"] for f in m["workers"].values())
    # the workers' own account agrees with what the kernel says of the children, measured from outside
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert m["worker_peak_rss_bytes"] <= children_peak * 1.1 + (8 << 20)
    assert "worker peak RSS" in result.summary() and "GC pauses" in result.summary()
