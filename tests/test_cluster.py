"""A standing cluster: `shmflow coordinator` + `shmflow worker` processes, jobs submitted by clients,
and a control plane that refuses peers without the cluster's secret."""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import failing_jobs
import pytest
import zmq
from helpers import standing_cluster, wait_until

from runtime import KeyedProcessFunction, StreamEnvironment, ValueStateDescriptor
from runtime.cluster import protocol as control
from runtime.errors import JobFailedError


@pytest.fixture
def cluster(tmp_path):
    with standing_cluster(tmp_path) as running:
        yield running


@pytest.fixture
def managed_state_cluster(tmp_path):
    """A standing cluster whose jobs keep keyed state in managed memory (the coordinator's configuration)."""
    with standing_cluster(tmp_path, "-D", "state.backend=managed") as running:
        yield running


def _submit(endpoint, secret, words):
    env = StreamEnvironment(workers=2, coordinator=endpoint, secret_file=str(secret))
    out = env.from_collection(words).key_by(lambda w: w).count().collect()
    env.execute("remote-count", timeout=60)
    return dict(out.values())


def _wait_for_workers(endpoint, secret):
    # The first job can arrive before both workers registered: retry until the cluster is complete.
    def ready():
        try:
            return _submit(endpoint, secret, ["x"]) == {"x": 1}
        except JobFailedError as exc:
            assert "needs 2 workers" in str(exc)
            return False
    wait_until(ready, timeout=60, msg="two workers registered")


def test_jobs_run_on_a_standing_cluster(cluster):
    endpoint, secret, _, _ = cluster
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    _wait_for_workers(endpoint, secret)
    assert _submit(endpoint, secret, list("abracadabra")) == {"a": 5, "b": 2, "r": 2, "c": 1, "d": 1}
    assert _submit(endpoint, secret, ["x", "y", "x"]) == {"x": 2, "y": 1}  # the cluster serves job after job


def test_a_peer_without_the_secret_cannot_deliver_a_message_and_a_wrong_signature_is_refused(cluster, tmp_path):
    endpoint, secret, coord, _ = cluster
    _wait_for_workers(endpoint, secret)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ctx = zmq.Context.instance()
    stranger = ctx.socket(zmq.DEALER)  # no CURVE keys: its handshake with the coordinator never completes
    stranger.linger = 0
    stranger.connect(endpoint)
    insider = ctx.socket(zmq.DEALER)  # the cluster's CURVE keys, but messages signed with another secret
    insider.linger = 0
    control.secure_client(insider, control.load_or_create_secret(secret, create=False), endpoint,
                          max_message_size=1 << 20)
    insider.connect(endpoint)
    try:
        control.send(stranger, control.new_secret(), control.Submit(graph=pickle.dumps(Evil())))
        control.send(insider, control.new_secret(), control.Submit(graph=pickle.dumps(Evil())))
        insider.send_multipart([b"not", b"signed", b"at all"])
        assert not stranger.poll(1000) and not insider.poll(0)  # no answer to either
    finally:
        stranger.close()
        insider.close()
    assert _submit(endpoint, secret, ["ok"]) == {"ok": 1}  # the cluster keeps working
    assert not marker.exists()
    coord.send_signal(signal.SIGTERM)
    coord.wait(15)
    log = coord.stderr.read()
    assert log.count("refused a control message") == 2  # the insider's two; the stranger's never arrived
    assert "failed its HMAC check" in log and "has 3 frames; expected 2" in log


def _peak_rss(pid: int) -> int:
    """VmHWM of a process (its peak resident set), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_a_256_mib_message_from_a_peer_without_the_keys_costs_the_coordinator_no_memory(cluster):
    endpoint, secret, coord, _ = cluster
    _wait_for_workers(endpoint, secret)
    before = _peak_rss(coord.pid)
    garbage = bytes(256 << 20)
    # 1. a ZeroMQ peer without the CURVE keys: the message never leaves it
    stranger = zmq.Context.instance().socket(zmq.DEALER)
    stranger.linger = 0
    stranger.connect(endpoint)
    try:
        stranger.send_multipart([b"mac", garbage], copy=False)
        assert not stranger.poll(1000)
    finally:
        stranger.close()
    # 2. raw bytes: a ZMTP 3.0 greeting (NULL mechanism), then a frame that claims and carries 256 MiB
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    greeting = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            raw.sendall(greeting + b"\x02" + (len(garbage)).to_bytes(8, "big"))
            raw.sendall(garbage)
        except OSError:
            pass  # the coordinator hung up on the greeting: what it should do
    del garbage
    assert _submit(endpoint, secret, ["still", "serving"]) == {"still": 1, "serving": 1}
    grew = _peak_rss(coord.pid) - before
    assert grew < 8 << 20, f"the coordinator's peak RSS grew by {grew >> 20} MiB"
    assert coord.poll() is None


def test_stopping_the_coordinator_stops_its_workers_and_unlinks_the_region(cluster):
    endpoint, secret, coord, workers = cluster
    _wait_for_workers(endpoint, secret)
    coord.send_signal(signal.SIGINT)  # Ctrl-C
    coord.wait(15)
    assert coord.returncode == 0
    assert "region unlinked" in coord.stdout.read()
    for worker in workers:  # told to shut down, the workers exit by themselves
        worker.wait(15)
        assert worker.returncode == 0


def test_a_standing_cluster_keeps_every_worker_through_100_jobs_failing_at_random_moments(cluster):
    # Each job fails in a user function on one worker (a source's first or a later poll, a map before the
    # shuffle, the count after it); the healthy job after it must run on both workers. A worker left waiting
    # for a peer that failed keeps heartbeating and ends its part of the job on Cancel.
    endpoint, secret, coord, workers = cluster
    _wait_for_workers(endpoint, secret)
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    for i in range(100):
        env = StreamEnvironment(workers=2, coordinator=endpoint, secret_file=str(secret))
        where = failing_jobs.failing_job(env, rng)
        with pytest.raises(JobFailedError, match="injected failure"):
            env.execute(f"failing-{i}", timeout=60)
            pytest.fail(f"seed {seed}, job {i}: did not fail ({where})")
        env = StreamEnvironment(workers=2, coordinator=endpoint, secret_file=str(secret))
        out = failing_jobs.healthy_job(env)
        try:
            env.execute(f"healthy-{i}", timeout=60)
        except JobFailedError as exc:
            pytest.fail(f"seed {seed}, job {i}: the healthy job after a failure ({where}) failed: {exc}")
        assert dict(out.values()) == failing_jobs.HEALTHY, f"seed {seed}, job {i} ({where})"
    assert coord.poll() is None and all(w.poll() is None for w in workers)


def test_workers_of_a_sigkilled_coordinator_exit_within_5s_and_remove_its_region(cluster, shm_prefix):
    # No Shutdown comes and the heartbeat timeout is 45 s; but on one host the coordinator is the region's
    # creator, whose pid (and start time) a worker checks every heartbeat.
    endpoint, secret, coord, workers = cluster
    _wait_for_workers(endpoint, secret)
    (region,) = [n for n in os.listdir("/dev/shm") if n.startswith(f"{shm_prefix}{coord.pid}-")]
    coord.kill()  # and no wait(): a zombie is as dead as a reaped process
    killed = time.monotonic()
    for worker in workers:
        worker.wait(15)
    took = time.monotonic() - killed
    assert took < 5, f"the workers exited {took:.1f}s after the coordinator was SIGKILLed"
    assert all(w.returncode != 0 for w in workers)  # they did not finish: they gave up
    assert "the coordinator (pid" in workers[0].stderr.read() + workers[1].stderr.read()
    wait_until(lambda: not os.path.exists(f"/dev/shm/{region}"), timeout=5, msg=f"{region} removed")


def _layout(endpoint, secret, *extra):
    return subprocess.run([sys.executable, "-m", "runtime.cli", "layout", "--coordinator", endpoint,
                           "--secret-file", str(secret), *extra], capture_output=True, text=True, timeout=60)


#: A legend line of an operator's managed pages, e.g. "  D combine(sum)[0]   16 MiB in 16 blocks".
OPERATOR_PAGES = re.compile(r"^  \S (combine\()?sum\)?\[\d+\] +[\d.]+ [KM]iB in \d+ blocks?$", re.MULTILINE)


def _layout_of_held_job(env, name, endpoint, secret, release, shown, msg):
    """Run ``env``'s job ``name`` in a thread (its source holds it until ``release`` exists), wait until
    ``shmflow layout --coordinator`` shows it running with a match of ``shown``, release it and wait for its
    end; the layout's text."""
    import threading
    failure: list[BaseException] = []

    def run():
        try:
            env.execute(name, timeout=120)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failure.append(exc)

    job = threading.Thread(target=run)
    job.start()
    seen = {}
    try:
        def visible():
            proc = _layout(endpoint, secret)
            assert proc.returncode == 0, proc.stderr
            seen["text"] = proc.stdout
            return f"running job {name!r}" in proc.stdout and shown.search(proc.stdout) is not None
        wait_until(visible, timeout=60, msg=msg)
    finally:
        release.touch()
        job.join(120)
    assert not failure, failure
    return seen["text"]


def test_layout_of_a_standing_cluster_shows_each_operators_managed_pages_while_a_job_runs(cluster, tmp_path):
    endpoint, secret, _, _ = cluster
    _wait_for_workers(endpoint, secret)
    release = tmp_path / "release"
    n, hold_at = 1_200_000, 1_150_000  # the fixed form gathers 256 Ki rows before it takes its table's pages

    def record(i, release=str(release)):
        if i == hold_at:  # hold the job here (on one worker) until the test has looked at the layout
            deadline = time.monotonic() + 60
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.05)
        return ((i * 7919) % 1_000_003 + 10_000_000, 1)

    env = StreamEnvironment(workers=2, coordinator=endpoint, secret_file=str(secret))
    out = env.from_generator(record, count=n).key_by(lambda r: r[0]).sum(1).collect()
    text = _layout_of_held_job(env, "held-sum", endpoint, secret, release, OPERATOR_PAGES,
                               "the layout shows the keyed sum's managed pages")
    assert "worker 0 arena (pid" in text and "worker 1 arena (pid" in text
    assert "worker-0 network" in text and "worker-1 network" in text
    assert len(out.values()) == len({(i * 7919) % 1_000_003 for i in range(n)})
    idle = _layout(endpoint, secret)
    assert idle.returncode == 0 and "no job running" in idle.stdout


class RemembersLast(KeyedProcessFunction):
    """Keeps each key's last value (its length depends on the key: several size classes); emits nothing."""

    def open(self, runtime_context):
        self.last = runtime_context.get_state(ValueStateDescriptor("last"))

    def process_element(self, value, ctx):
        if self.last.value() != value[1]:  # a read of the state, then a write
            self.last.update(value[1])


#: The head and one row of a state backend's bins under its operator's pages, e.g.
#: "      managed state: 1,000 entries, 384 KiB in memory, 0 B on disk, cache hit rate 100% of 74,000 reads"
#: "            96 B        182    15.1 KiB      1,023   18%"
STATE_HEAD = re.compile(r"^      managed state: ([\d,]+) entries, [\d.]+ [KM]iB in memory, [\d.]+ [KMG]?i?B on disk, "
                        r"cache hit rate \d+% of [\d,]+ reads$", re.MULTILINE)
BIN_ROW = re.compile(r"^ +(\d+) B +([\d,]+) +[\d.]+ [KM]?i?B +([\d,]+) +\d+%$", re.MULTILINE)


def test_layout_of_a_standing_cluster_shows_a_managed_state_backends_bins_under_its_pages(managed_state_cluster,
                                                                                         tmp_path):
    endpoint, secret, _, _ = managed_state_cluster
    _wait_for_workers(endpoint, secret)
    release = tmp_path / "release"
    keys, n, hold_at = 2_000, 200_000, 150_000  # an even index: worker 0's source holds, worker 1's runs on

    def record(i, release=str(release)):
        if i == hold_at:  # hold the job here until the test has looked at the layout
            deadline = time.monotonic() + 60
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.05)  # sleep-ok: a job held for the test, released by a file
        return f"k{i % keys}", "x" * (i % keys % 300)

    env = StreamEnvironment(workers=2, coordinator=endpoint, secret_file=str(secret))
    env.from_generator(record, count=n).key_by(lambda r: r[0]).process(RemembersLast()).collect()
    text = _layout_of_held_job(env, "held-state", endpoint, secret, release, BIN_ROW,
                               "the layout shows the process function's state bins")
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if STATE_HEAD.match(line))
    assert re.match(r"^  \S process\[\d\] +[\d.]+ [KM]iB in \d+ blocks?$", lines[head - 1]), text
    assert lines[head + 1].split() == ["bin", "objects", "bytes", "used", "slots", "fill"], text
    rows = BIN_ROW.findall(text)
    assert len(rows) >= 3, text  # values of 0 to 299 characters: several size classes
    for size, objects, slots in rows:
        assert int(size) >= 16 and 0 < int(objects.replace(",", "")) <= int(slots.replace(",", "")), text
    entries = sum(int(m.replace(",", "")) for m in STATE_HEAD.findall(text))
    assert 0 < entries <= keys, text

    def state_gone():  # with the next heartbeat of each worker after the job's end
        idle = _layout(endpoint, secret)
        return idle.returncode == 0 and "no job running" in idle.stdout and "managed state:" not in idle.stdout
    wait_until(state_gone, timeout=10, msg="the layout shows no state once the job ended")


def test_layout_of_a_coordinator_that_does_not_answer_says_so_by_name(tmp_path):
    secret = tmp_path / "cluster.secret"
    from runtime.cluster import protocol as control_
    control_.load_or_create_secret(str(secret), create=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _layout(f"tcp://127.0.0.1:{port}", secret, "--timeout", "1")
    assert proc.returncode == 1
    assert f"no answer from the coordinator at tcp://127.0.0.1:{port} within 1s" in proc.stderr
