"""The coordinator's web server: REST documents, Prometheus /metrics, cancel with and without the secret,
the stats block's seqlock, and the config keys. Real processes and sockets; the browser test is
tests/test_web_browser.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import standing_cluster, start_cli, stop_processes, wait_until
from prometheus_client.parser import text_string_to_metric_families

from runtime import StreamEnvironment
from runtime.cluster.client import worker_payloads
from runtime.cluster.local import LocalCluster
from runtime.config import ShmflowConfig
from runtime.errors import ConfigError, JobCancelledError
from runtime.web.server import WebServer
from runtime.web.stats_block import SLOT_BYTES, StatsWriter, WorkerCounters, read_slot

RATE = 4000  # records per second per source subtask: the job runs long enough to be watched


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
        return json.loads(body) if response.headers["Content-Type"] == "application/json" else body.decode()


def _patch(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, method="PATCH")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@dataclass
class RunningJob:
    """A job running on an embedded cluster in a thread, with the coordinator's web server up."""

    cluster: LocalCluster
    web: WebServer
    thread: threading.Thread
    outcome: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.web.url

    def job_id(self) -> str:
        wait_until(lambda: bool(_get(self.url + "jobs")["jobs"]), msg="the job to be listed")
        return _get(self.url + "jobs")["jobs"][0]["id"]

    def join(self) -> None:
        self.thread.join(120)
        assert not self.thread.is_alive()


def start_job(count: int | None, *, workers: int = 2) -> Iterator[RunningJob]:
    env = StreamEnvironment(workers=workers, mode="streaming", config={"rest.port": 0, "state.backend": "managed"})
    (env.from_generator(lambda i: (i % 500, 1), rate=RATE, count=count, name="events")
        .map(lambda r: (r[0], r[1] * 2), name="double")
        .key_by(lambda r: r[0]).sum(1)
        .collect())
    graph = env.job_graph("dashboard-test")
    cluster = LocalCluster(env.config)
    try:
        web = WebServer(cluster.coordinator, address="127.0.0.1", port=0)
    except BaseException:
        cluster.close()
        raise
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["metrics"] = cluster.coordinator.run_job(graph, worker_payloads(graph),
                                                             on_collect=lambda sink, records: None, timeout=120)
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="test-job")
    running = RunningJob(cluster, web, thread, outcome)
    thread.start()
    try:
        yield running
    finally:
        thread.join(120)
        web.close()
        cluster.close()


@pytest.fixture
def bounded_job() -> Iterator[RunningJob]:
    yield from start_job(count=3 * RATE)  # about 3 s


@pytest.fixture
def unbounded_job() -> Iterator[RunningJob]:
    yield from start_job(count=None)


def test_rest_documents_describe_the_running_job_and_metrics_count_every_record(bounded_job):
    url, jid = bounded_job.url, bounded_job.job_id()
    overview = _get(url + "overview")
    assert overview["taskmanagers"] == 2 and overview["jobs-running"] == 1
    job = _get(url + f"jobs/{jid}")
    assert job["state"] == "RUNNING" and job["name"] == "dashboard-test"
    names = [v["name"] for v in job["vertices"]]
    assert names[0].startswith("events -> double") and len(job["plan"]["nodes"]) == len(names) == 2
    assert job["plan"]["nodes"][1]["inputs"][0]["ship_strategy"] == "HASH"
    source = job["vertices"][0]["id"]

    def records_read() -> int:
        return sum(s["metrics"]["read-records"] for s in _get(url + f"jobs/{jid}/vertices/{source}")["subtasks"])

    first = records_read()
    wait_until(lambda: records_read() > first > 0 or (first == 0 and records_read() > 0),
               timeout=30, msg="the source's record count to grow")
    wait_until(lambda: _get(url + f"jobs/{jid}")["vertices"][0]["metrics"]["max-busyTimeMsPerSecond"] > 0,
               timeout=30, msg="busy time to be measured")
    tms = _get(url + "taskmanagers")["taskmanagers"]
    assert [tm["id"] for tm in tms] == ["0", "1"] and all(tm["pid"] > 0 for tm in tms)
    assert _get(url + "taskmanagers/1")["id"] == "1"
    got = _get(url + "taskmanagers/0/metrics?get=Status.Shuffle.AvailableMemorySegments,Status.Flink.Memory.Managed.Total")
    assert [m["id"] for m in got] == ["Status.Shuffle.AvailableMemorySegments", "Status.Flink.Memory.Managed.Total"]
    assert int(got[1]["value"]) == bounded_job.cluster.config.memory_plan().managed_bytes_per_worker
    def sum_pages() -> list[dict[str, Any]]:  # the keyed sum keeps its state in managed pages
        return [o for w in _get(url + "memory")["workers"] for o in w["managed"]["operators"]
                if o["owner"].startswith("sum[") and o["chain_peak"] is not None]

    wait_until(lambda: any(o["chain_peak"] >= o["bytes"] > 0 for o in sum_pages()), timeout=30,
               msg="the sum's managed pages and their peak")
    memory = _get(url + "memory")
    assert memory["region"]["size"] == bounded_job.cluster.coordinator.allocator.size
    arena = memory["workers"][0]["arena"]
    assert arena is not None and sum(b["bytes"] for b in arena["blocks"]) + arena["free_bytes"] == arena["size"]
    assert sum(o["blocks"] for o in arena["free_by_order"]) == len(arena["free"])
    assert memory["workers"][0]["network"]["segments"] == bounded_job.cluster.config.memory_plan().network_buffers_per_worker
    assert _get(url + f"jobs/{jid}/checkpoints")["restarts"] == 0
    with pytest.raises(urllib.error.HTTPError, match="404"):
        _get(url + "jobs/0123")
    bounded_job.join()
    assert "error" not in bounded_job.outcome
    assert _get(url + f"jobs/{jid}")["state"] == "FINISHED"

    families = {f.name: f for f in text_string_to_metric_families(_get(url + "metrics"))}
    records_in = families["shmflow_taskmanager_job_task_numRecordsIn"]
    emitted = sum(s.value for s in records_in.samples if s.labels["task_name"].startswith("events"))
    sources = [figures["source_records"] for wid, metrics in bounded_job.outcome["metrics"].items() if wid >= 0
               for figures in metrics.values() if isinstance(figures, dict) and "source_records" in figures]
    assert emitted == sum(sources) == 3 * RATE  # every record the sources emitted
    sample = records_in.samples[0]
    assert {"job_id", "job_name", "task_id", "task_name", "subtask_index", "tm_id"} <= set(sample.labels)
    assert sample.labels["job_id"] == jid
    for name in ("shmflow_taskmanager_job_task_busyTimeMsPerSecond", "shmflow_taskmanager_job_task_numRecordsInPerSecond",
                 "shmflow_taskmanager_job_task_backPressuredTimeMsPerSecond"):
        assert name in families
    managed = families["shmflow_taskmanager_Status_Flink_Memory_Managed_Total"].samples
    assert {s.labels["tm_id"] for s in managed} == {"0", "1"}
    segments = families["shmflow_taskmanager_Status_Shuffle_AvailableMemorySegments"].samples
    total = bounded_job.cluster.config.memory_plan().network_buffers_per_worker
    assert all(0 < s.value <= total for s in segments)
    free = families["shmflow_memory_buddy_free_bytes"].samples
    by_worker = sum(s.value for s in free if s.labels["allocator"] == "worker-0")
    assert by_worker == memory["workers"][0]["arena"]["free_bytes"] or by_worker > 0
    assert "shmflow_memory_buddy_largest_free_block_bytes" in families
    assert "shmflow_memory_buddy_fragmentation" in families
    assert "shmflow_taskmanager_Status_Flink_Memory_Managed_SpilledBytes" in families


def test_cancel_needs_the_cluster_secret_and_stops_the_job(unbounded_job):
    url, jid = unbounded_job.url, unbounded_job.job_id()
    assert _patch(url + f"jobs/{jid}", None) == 401
    assert _patch(url + f"jobs/{jid}", "00" * 32) == 403
    assert _get(url + f"jobs/{jid}")["state"] == "RUNNING"
    assert _patch(url + f"jobs/{jid}", unbounded_job.cluster.coordinator.secret.hex()) == 202
    unbounded_job.join()
    assert isinstance(unbounded_job.outcome.get("error"), JobCancelledError)
    assert _get(url + f"jobs/{jid}")["state"] == "CANCELED"
    assert _get(url + "overview")["jobs-cancelled"] == 1
    # the workers are fine: the next job runs on them
    assert len(unbounded_job.cluster.coordinator.workers) == 2


def test_a_port_in_use_names_rest_port():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with LocalCluster(ShmflowConfig({"workers": 1})) as cluster, \
                pytest.raises(ConfigError, match=rf"^rest.port {port} is in use on 127.0.0.1: .*set rest.port"):
            WebServer(cluster.coordinator, address="127.0.0.1", port=port)
    finally:
        holder.close()


@pytest.mark.parametrize(("key", "value"), [("rest.port", 70000), ("rest.port", "http"),
                                            ("metrics.reporter.prom.port", -1)])
def test_bad_web_config_names_the_key_and_value(key, value):
    with pytest.raises(ConfigError, match=rf"^{key} .*; got {value}"):
        ShmflowConfig({key: value})


def test_the_stats_block_reader_never_sees_a_torn_update():
    area = memoryview(bytearray(2 * SLOT_BYTES))
    assert read_slot(area, 1) is None  # never written
    writer = StatsWriter(area, 1)
    counters = WorkerCounters(pid=7, started_at_ns=1, rss_bytes=2, gc_ns=3, gc_collections=4, heartbeats=5,
                              network_buffers=10, network_available=6, managed_budget=100, managed_used=40,
                              managed_peak=50, spilled_bytes=9, job=0xABC)
    writer.publish(counters, [])
    got = read_slot(area, 1)
    assert got is not None and got.worker == counters and got.subtasks == ()
    words, seq = area.cast("q"), SLOT_BYTES // 8  # slot 1's sequence word
    words[seq] += 1  # a writer in the middle of an update: no copy is consistent
    assert read_slot(area, 1, attempts=3) is None
    words[seq] += 1
    assert read_slot(area, 1) is not None
    with pytest.raises(IndexError, match="stats slot 2 lies outside"):
        StatsWriter(area, 2)
    writer.close()


def test_a_standing_coordinator_serves_the_dashboard(tmp_path):
    with standing_cluster(tmp_path) as (_, _, coord, _):
        line = coord.stdout.readline()
        assert line.startswith("dashboard and REST API on http://127.0.0.1:"), line
        url = line.split()[5]
        wait_until(lambda: _get(url + "overview")["taskmanagers"] == 2, timeout=30, msg="both workers listed")
        assert "Memory" in _get(url)  # the page itself


def test_a_standing_coordinator_refuses_a_busy_rest_port_unless_no_ui(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        busy = start_cli("coordinator", "--bind", "tcp://127.0.0.1:*", "--secret-file", str(tmp_path / "s"),
                         "--workers", "1", "-D", f"rest.port={port}")
        try:
            assert busy.wait(60) == 2
            assert f"rest.port {port} is in use on 127.0.0.1" in busy.stderr.read()
        finally:
            stop_processes([busy])
        with standing_cluster(tmp_path, "--no-ui", "-D", f"rest.port={port}", workers=1):
            pass  # it started: --no-ui binds nothing
    finally:
        holder.close()


def test_shmflow_run_ui_prints_the_dashboard_url(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("from runtime import StreamEnvironment\n"
                      "env = StreamEnvironment(workers=1)\n"
                      "out = env.from_collection(range(100)).map(lambda x: x + 1).collect()\n"
                      "env.execute('tiny')\n"
                      "print(sum(out.values()))\n")
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(script), "--ui", "-D", "rest.port=0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "5050"
    assert "shmflow dashboard: http://127.0.0.1:" in done.stderr
    refused = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(script), "--ui-linger", "-1"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--ui-linger: must be a number of seconds >= 0; got '-1'" in refused.stderr


def test_metrics_alone_on_the_prometheus_reporter_port():
    with LocalCluster(ShmflowConfig({"workers": 1})) as cluster, \
            WebServer(cluster.coordinator, address="127.0.0.1", port=0, prom_port=_free_port()) as web:
        assert web.prom_url is not None
        families = {f.name for f in text_string_to_metric_families(_get(web.prom_url))}
        assert "shmflow_taskmanager_Status_Shuffle_AvailableMemorySegments" in families
        assert "shmflow_memory_buddy_largest_free_block_bytes" in families
        with pytest.raises(urllib.error.HTTPError, match="404"):
            _get(web.prom_url.replace("/metrics", "/overview"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
