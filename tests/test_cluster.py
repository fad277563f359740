"""A standing cluster: `shmflow coordinator` + `shmflow worker` processes, jobs submitted by clients,
and a control plane that refuses peers without the cluster's secret."""

from __future__ import annotations

import os
import pickle
import random
import signal
import stat
import subprocess
import sys
import time

import failing_jobs
import pytest
import zmq
from helpers import wait_until

from runtime import StreamEnvironment
from runtime.cluster import protocol as control
from runtime.errors import JobFailedError


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runtime.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def cluster(tmp_path):
    secret = tmp_path / "cluster.secret"
    coord = _start("coordinator", "--bind", "tcp://127.0.0.1:*", "--secret-file", str(secret), "--workers", "2")
    procs = [coord]
    try:
        first = coord.stdout.readline()
        assert first.startswith("coordinator listening on "), first + coord.stderr.read()
        endpoint = first.split()[3].rstrip(";")
        for _ in range(2):
            procs.append(_start("worker", "--coordinator", endpoint, "--secret-file", str(secret)))
        yield endpoint, secret, coord, procs[1:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()


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


def test_a_peer_without_the_secret_is_refused_logged_and_never_unpickled(cluster, tmp_path):
    endpoint, secret, coord, _ = cluster
    _wait_for_workers(endpoint, secret)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    try:
        control.send(sock, control.new_secret(), control.Submit(graph=pickle.dumps(Evil())))
        sock.send_multipart([b"not", b"signed", b"at all"])
        assert not sock.poll(1000)  # no answer to an unauthenticated peer
    finally:
        sock.close()
    assert _submit(endpoint, secret, ["ok"]) == {"ok": 1}  # the cluster keeps working
    assert not marker.exists()
    coord.send_signal(signal.SIGTERM)
    coord.wait(15)
    log = coord.stderr.read()
    assert log.count("refused a control message") == 2
    assert "failed its HMAC check" in log and "has 3 frames; expected 2" in log


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
    slowest = 0.0
    for i in range(100):
        env = StreamEnvironment(workers=2, coordinator=endpoint, secret_file=str(secret))
        where = failing_jobs.failing_job(env, rng)
        start = time.monotonic()
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
        slowest = max(slowest, time.monotonic() - start)
    assert coord.poll() is None and all(w.poll() is None for w in workers)
    assert slowest < 30, f"seed {seed}: a failed job and the healthy one after it took {slowest:.1f}s"
