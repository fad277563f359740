"""Checkpoints and restarts of whole jobs: real worker processes, real SIGKILL, real files.

The check of exactly-once is strict: a streaming keyed count emits every update, so each key's updates,
as collected, must be exactly 1, 2, ..., n (nothing lost, nothing twice, in order), however the job failed.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import standing_cluster, start_cli

from runtime import KeyedProcessFunction, StreamEnvironment, ValueStateDescriptor
from runtime.errors import CheckpointError, JobFailedError
from runtime.execution.task import SourceOperator

KEYS = 50


def _key(i: int) -> tuple[str, int]:
    return (f"k{i % KEYS}", i)


def _first(record):
    return record[0]


def _assert_exactly_once(updates: list, n: int) -> None:
    per_key: dict[str, list[int]] = {}
    for key, count in updates:
        per_key.setdefault(key, []).append(count)
    assert sum(len(v) for v in per_key.values()) == n, "records lost or counted twice"
    for key, counts in per_key.items():
        assert counts == list(range(1, len(counts) + 1)), f"{key}: {counts[:20]}..."


def _kill_a_worker_once(thread: threading.Thread, box: dict, ready) -> object:
    """Once ``ready()`` (polled; the job still running), SIGKILL worker 1; the job's result after it ended."""
    deadline = time.monotonic() + 60
    while not ready():
        assert time.monotonic() < deadline and thread.is_alive(), box
        time.sleep(0.02)  # sleep-ok: waiting for a file another process writes
    os.kill(_workers_of_this_process()[1], signal.SIGKILL)
    thread.join(120)
    assert "error" not in box, box.get("error")
    return box["result"]


def _assert_restored_from(metrics: dict, kept_in: str) -> None:
    """Every restored subtask was read from ``kept_in`` ("shared memory" or "files"), per the workers' metrics."""
    workers = metrics["workers"].values()
    restored = {"shared memory": sum(w["restored_from_memory"] for w in workers),
                "files": sum(w["restored_from_files"] for w in workers)}
    assert restored[kept_in] >= 2 and sum(restored.values()) == restored[kept_in], restored


def _workers_of_this_process() -> list[int]:
    """The pids of the worker processes this test process started."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"runtime.cluster.worker" in cmdline:
            pids.append(int(entry))
    return sorted(pids)


def _completed(checkpoints: Path) -> list[Path]:
    return sorted(checkpoints.glob("*/chk-*/_metadata"))


def _run_in_thread(env: StreamEnvironment, name: str) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = env.execute(name, timeout=120)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _env(tmp_path: Path, **config: object) -> StreamEnvironment:
    base = {"execution.checkpointing.interval": "200ms", "state.checkpoints.dir": str(tmp_path / "checkpoints"),
            "restart-strategy.type": "fixed-delay", "restart-strategy.fixed-delay.attempts": 3,
            "restart-strategy.fixed-delay.delay": "100ms"}
    return StreamEnvironment(workers=2, mode="streaming", config={**base, **config})


@pytest.mark.parametrize("kept_in", ["shared memory", "files"])
def test_a_worker_killed_mid_run_loses_nothing_and_counts_nothing_twice(tmp_path, kept_in):
    """Restored from the blobs the checkpoint left in the region (the default), or, with no checkpoint area,
    from its files; the workers' metrics say which."""
    n = 40_000
    env = _env(tmp_path, **({"state.checkpoints.shared-memory.size": 0} if kept_in == "files" else {}))
    out = env.from_generator(_key, rate=10_000, count=n).key_by(_first).count().collect()
    thread, box = _run_in_thread(env, "killed-mid-run")
    result = _kill_a_worker_once(thread, box, lambda: bool(_completed(tmp_path / "checkpoints")))
    _assert_exactly_once(out.values(), n)
    assert result.metrics["restarts"] == 1
    assert result.metrics["checkpoints"] >= 1
    _assert_restored_from(result.metrics, kept_in)


def _incremental_completed(checkpoints: Path) -> bool:
    """Whether a completed checkpoint builds on an earlier one (an incremental snapshot in it)."""
    from runtime.checkpoint import DEPENDS_ON_KEY, load_checkpoint

    for meta in _completed(checkpoints):
        try:
            checkpoint = load_checkpoint(meta, verify_state=False)
        except CheckpointError:  # retention removed it meanwhile
            continue
        if checkpoint.metadata.extra.get(DEPENDS_ON_KEY, checkpoint.checkpoint_id) < checkpoint.checkpoint_id:
            return True
    return False


@pytest.mark.parametrize("kept_in", ["shared memory", "files"])
def test_a_worker_killed_after_incremental_checkpoints_restores_the_chain_exactly_once(tmp_path, kept_in):
    """Managed state of 20,000 keys: after a full snapshot, checkpoints hold only the changes; a worker killed
    once one of them completed restores the full snapshot and every delta since, from the region or from files."""
    n = 100_000
    env = _env(tmp_path, **{"state.backend": "managed", "state.checkpoints.num-retained": 1,
                            **({"state.checkpoints.shared-memory.size": 0} if kept_in == "files" else {})})
    out = env.from_generator(lambda i: (f"k{i % 20_000}", i), rate=20_000, count=n).key_by(_first).count().collect()
    thread, box = _run_in_thread(env, "incremental")
    result = _kill_a_worker_once(thread, box, lambda: _incremental_completed(tmp_path / "checkpoints"))
    _assert_exactly_once(out.values(), n)
    assert result.metrics["restarts"] == 1
    _assert_restored_from(result.metrics, kept_in)


def _failing_once_at(index: int, marker: Path):
    """A map function that raises on record ``index`` the first time only (``marker``, a file, remembers it
    across restarts and worker processes)."""

    def fail_once(record):
        if record[1] == index and not marker.exists():
            marker.touch()
            raise RuntimeError("a transient failure")
        return record
    return fail_once


def test_a_user_function_that_raises_once_is_restarted_from_the_checkpoint(tmp_path):
    n = 20_000
    marker = tmp_path / "raised"

    fail_once = _failing_once_at(n // 2, marker)

    env = _env(tmp_path)
    out = env.from_generator(_key, rate=10_000, count=n).map(fail_once).key_by(_first).count().collect()
    result = env.execute("raises-once", timeout=120)
    assert marker.exists()
    _assert_exactly_once(out.values(), n)
    assert result.metrics["restarts"] == 1
    assert "a transient failure" in result.metrics["failures"][0]


def test_with_restarts_exhausted_the_job_fails_listing_every_attempt(tmp_path):
    def always(record):
        raise RuntimeError(f"bad record {record!r}")

    env = _env(tmp_path, **{"restart-strategy.fixed-delay.attempts": 2})
    env.from_generator(_key, count=100).map(always).collect()
    with pytest.raises(JobFailedError, match=r"(?s)failed 3 times; the restart strategy gave up \(fixed-delay with 2 "
                                             r"attempt\(s\).*attempt 1:.*bad record.*attempt 3:") as info:
        env.execute("always-fails", timeout=120)
    assert info.value.final


def test_without_a_restart_strategy_a_failure_fails_the_job_as_before(tmp_path):
    def always(record):
        raise RuntimeError("no restarts here")

    env = _env(tmp_path, **{"restart-strategy.type": "none"})
    env.from_generator(_key, count=100).map(always).collect()
    with pytest.raises(JobFailedError, match="no restarts here"):
        env.execute("no-restarts", timeout=120)


class SlowSnapshotSource(SourceOperator):
    """Records ``_key(i)`` for its share of ``range(n)``, at most ``rate`` per second per subtask; its
    ``snapshot_state`` of checkpoint 3 (only the first time, marked by a file) takes a second, so a test can
    kill a worker between that checkpoint's barrier and its acknowledgement."""

    name = "slow_snapshot_source"
    bounded = True

    def __init__(self, n: int, rate: float, marker: str, part: tuple[int, int] = (0, 1)) -> None:
        self.n, self.rate, self.marker, self.part = n, rate, marker, part
        self.position = 0  # records emitted by this subtask
        self.snapshots = 0
        self._t0 = 0.0

    def split(self, parallelism: int) -> list[SlowSnapshotSource]:
        return [SlowSnapshotSource(self.n, self.rate, self.marker, (i, parallelism)) for i in range(parallelism)]

    def open(self, ctx) -> None:
        super().open(ctx)
        self._t0 = time.monotonic()

    def poll_batch(self, max_records: int):
        index, parallelism = self.part
        mine = range(index, self.n, parallelism)
        if self.position >= len(mine):
            return None
        due = int((time.monotonic() - self._t0) * self.rate)
        stop = min(len(mine), self.position + max_records, max(due, self.position))
        batch = [_key(i) for i in mine[self.position:stop]]
        self.position = stop
        return batch

    def snapshot_state(self):
        self.snapshots += 1
        if self.snapshots == 3 and self.part[0] == 0 and not os.path.exists(self.marker):
            Path(self.marker).touch()
            time.sleep(1.0)  # sleep-ok: the window in which the test kills a worker
        return self.position

    def restore_state(self, state) -> None:
        self.position = state
        self._t0 = time.monotonic() - state / self.rate


def test_a_worker_killed_during_a_checkpoint_recovers_from_the_previous_complete_one(tmp_path):
    n = 30_000
    marker = tmp_path / "snapshotting"
    env = _env(tmp_path)
    out = env.from_source(SlowSnapshotSource(n, 5_000, str(marker))).key_by(_first).count().collect()
    thread, box = _run_in_thread(env, "killed-in-checkpoint")
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline and thread.is_alive(), box
        time.sleep(0.01)  # sleep-ok: waiting for a file another process writes
    complete_before = _completed(tmp_path / "checkpoints")
    os.kill(_workers_of_this_process()[1], signal.SIGKILL)
    thread.join(120)
    assert "error" not in box, box.get("error")
    # checkpoint 3 was in progress (one checkpoint is retained): the restart resumed from checkpoint 2
    assert [p.parent.name for p in complete_before] == ["chk-2"]
    _assert_exactly_once(out.values(), n)
    assert box["result"].metrics["restarts"] == 1


def _failing_run(tmp_path: Path, n: int, marker: Path):
    """A job that fails for good (no restarts) once past half its input, unless ``marker`` exists."""

    def fail_without_marker(record):
        if record[1] >= n // 2 and not marker.exists():
            raise RuntimeError("stopped half way")
        return record

    env = _env(tmp_path, **{"restart-strategy.type": "none", "execution.checkpointing.interval": "100ms"})
    out = env.from_generator(_key, rate=10_000, count=n).map(fail_without_marker).key_by(_first).count().collect()
    return env, out


def test_a_failed_job_resumes_from_its_retained_checkpoint_and_the_two_runs_give_each_record_once(tmp_path):
    n = 20_000
    marker = tmp_path / "go-on"
    env, first = _failing_run(tmp_path, n, marker)
    with pytest.raises(JobFailedError, match="stopped half way"):
        env.execute("resumable", timeout=120)
    (checkpoint,) = _completed(tmp_path / "checkpoints")
    marker.touch()
    env, second = _failing_run(tmp_path, n, marker)
    env.config = env.config.with_overrides({"execution.savepoint.path": str(checkpoint.parent)})
    env.execute("resumable", timeout=120)
    assert 0 < len(first.values()) < n  # the first run delivered what its last checkpoint covered, no more
    _assert_exactly_once([*first.values(), *second.values()], n)


def test_a_checkpoint_of_another_graph_or_a_corrupt_one_is_refused_naming_why(tmp_path):
    n = 20_000
    marker = tmp_path / "go-on"
    env, _ = _failing_run(tmp_path, n, marker)
    with pytest.raises(JobFailedError):
        env.execute("resumable", timeout=120)
    (checkpoint,) = _completed(tmp_path / "checkpoints")
    other = _env(tmp_path, **{"execution.savepoint.path": str(checkpoint.parent)})
    other.from_generator(_key, count=10).key_by(_first).sum(1).collect()  # sum where the checkpoint has count
    with pytest.raises(CheckpointError, match=r"does not fit job 'other'.*count"):
        other.execute("other", timeout=60)
    state_file = next(p for p in checkpoint.parent.iterdir() if p.name != "_metadata")
    state_file.write_bytes(state_file.read_bytes()[:-1])
    env, _ = _failing_run(tmp_path, n, marker)
    env.config = env.config.with_overrides({"execution.savepoint.path": str(checkpoint.parent)})
    with pytest.raises(CheckpointError, match=rf"{state_file.name}.*expected \d+ bytes, found \d+"):
        env.execute("resumable", timeout=60)


def test_shmflow_checkpoints_lists_them_with_the_sources_positions(tmp_path):
    import json
    import subprocess
    import sys

    n = 20_000
    env, _ = _failing_run(tmp_path, n, tmp_path / "go-on")
    with pytest.raises(JobFailedError):
        env.execute("listed", timeout=120)
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "checkpoints", str(tmp_path / "checkpoints"),
                           "--json"], capture_output=True, text=True, timeout=60, check=True)
    (row,) = json.loads(done.stdout)
    assert row["job"].startswith("listed-") and row["complete"] and row["bytes"] > 0
    positions = row["sources"]
    assert sorted(positions) == ["0-0", "0-1"] and all(positions.values())
    text = subprocess.run([sys.executable, "-m", "runtime.cli", "checkpoints", str(tmp_path / "checkpoints")],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"chk-{row['checkpoint']}" in text and "source 0-0: position" in text


def _committed_lines(directory: Path) -> list:
    import ast
    lines = []
    for part in sorted(directory.glob("part-*"), key=lambda p: tuple(int(x) for x in p.name.split("-")[1:])):
        lines += [ast.literal_eval(line) for line in part.read_text().splitlines()]
    return lines


def test_to_file_commits_each_record_once_across_a_killed_worker_and_shows_no_uncommitted_part(tmp_path):
    n = 40_000
    out = tmp_path / "out"
    env = _env(tmp_path)
    env.from_generator(_key, rate=10_000, count=n).key_by(_first).count().to_file(str(out))
    thread, box = _run_in_thread(env, "to-file")
    deadline = time.monotonic() + 60
    while len(_completed(tmp_path / "checkpoints")) < 1 or not list(out.glob("part-*")):
        assert time.monotonic() < deadline and thread.is_alive(), box
        time.sleep(0.02)  # sleep-ok: waiting for files other processes write
    committed_so_far = _committed_lines(out)
    os.kill(_workers_of_this_process()[0], signal.SIGKILL)
    thread.join(120)
    assert "error" not in box, box.get("error")
    assert box["result"].metrics["restarts"] == 1
    final = _committed_lines(out)
    assert all(line in final for line in committed_so_far)  # committed files are never taken back
    _assert_exactly_once(final, n)
    assert not list(out.glob(".*inprogress"))


def test_a_standing_cluster_restarts_a_job_whose_worker_was_killed_once_a_new_worker_joins(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    with standing_cluster(tmp_path, "-D", "execution.checkpointing.interval=200ms",
                          "-D", f"state.checkpoints.dir={checkpoints}", "-D", "restart-strategy.type=fixed-delay",
                          "-D", "restart-strategy.fixed-delay.attempts=2",
                          "-D", "restart-strategy.fixed-delay.delay=100ms") as (endpoint, secret, _, workers):
        n = 40_000
        env = StreamEnvironment(workers=2, mode="streaming", coordinator=endpoint, secret_file=str(secret))
        out = env.from_generator(_key, rate=10_000, count=n).key_by(_first).count().collect()
        deadline = time.monotonic() + 60
        while True:  # the first submission can come before both workers registered
            thread, box = _run_in_thread(env, "standing-killed")
            while thread.is_alive() and not _completed(checkpoints):
                assert time.monotonic() < deadline, "no checkpoint completed"
                time.sleep(0.02)  # sleep-ok: waiting for a file other processes write
            if thread.is_alive():
                break
            assert "needs 2 workers" in str(box.get("error")), box
            time.sleep(0.2)  # sleep-ok: a worker is still registering
        workers[1].kill()
        workers.append(start_cli("worker", "--coordinator", endpoint, "--secret-file", str(secret)))
        thread.join(120)
        assert "error" not in box, box.get("error")
        _assert_exactly_once(out.values(), n)
        assert box["result"].metrics["restarts"] == 1


def test_a_function_that_raises_once_with_to_file_leaves_each_record_once_in_the_committed_files(tmp_path):
    n = 20_000
    marker = tmp_path / "raised"
    out = tmp_path / "out"

    fail_once = _failing_once_at(n // 2, marker)

    env = _env(tmp_path)
    env.from_generator(_key, rate=10_000, count=n).map(fail_once).key_by(_first).count().to_file(str(out))
    result = env.execute("raises-once-to-file", timeout=120)
    assert marker.exists() and result.metrics["restarts"] == 1
    _assert_exactly_once(_committed_lines(out), n)
    assert not list(out.glob(".*inprogress"))


class CountAndFinal(KeyedProcessFunction):
    """A count per key in a ValueState, every update emitted, and one event-time timer per key (far in the
    future: the final watermark fires it) that emits the key's final count."""

    def open(self, runtime_context):
        self.count = runtime_context.get_state(ValueStateDescriptor("count"))

    def process_element(self, value, ctx):
        c = (self.count.value() or 0) + 1
        self.count.update(c)
        ctx.timer_service().register_event_time_timer(1e12)
        yield ctx.get_current_key(), c

    def on_timer(self, timestamp, ctx):
        yield ctx.get_current_key(), "final", self.count.value()


@pytest.mark.parametrize("backend", ["heap", "managed"])
def test_a_process_function_with_state_and_timers_survives_a_killed_worker(tmp_path, backend):
    n = 20_000
    env = _env(tmp_path, **{"state.backend": backend, "memory.managed.size": "1mb"})
    out = (env.from_generator(_key, rate=10_000, count=n).key_by(_first).process(CountAndFinal()).collect())
    thread, box = _run_in_thread(env, f"process-{backend}")
    assert _kill_a_worker_once(thread, box, lambda: bool(_completed(tmp_path / "checkpoints"))).metrics[
        "restarts"] == 1
    updates = [r for r in out.values() if len(r) == 2]
    finals = sorted(r for r in out.values() if len(r) == 3)
    _assert_exactly_once(updates, n)
    assert finals == sorted((f"k{k}", "final", n // KEYS) for k in range(KEYS))  # each timer fired once


def test_shmflow_run_from_checkpoint_names_the_operator_that_does_not_match(tmp_path):
    import subprocess
    import sys

    env, _ = _failing_run(tmp_path, 20_000, tmp_path / "go-on")
    with pytest.raises(JobFailedError):
        env.execute("resumable", timeout=120)
    (checkpoint,) = _completed(tmp_path / "checkpoints")
    script = tmp_path / "other_job.py"
    script.write_text(
        "from runtime import StreamEnvironment\n"
        "env = StreamEnvironment(mode='streaming')\n"
        "env.from_generator(lambda i: (f'k{i % 5}', i), count=100).key_by(lambda r: r[0]).max(1).collect()\n"
        "env.execute('other')\n")
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(script), "--from-checkpoint",
                           str(checkpoint.parent)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert re.search(r"CheckpointError: checkpoint .*chk-\d+ does not fit job 'other'.*max", done.stderr), done.stderr
    missing = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(script), "--from-checkpoint",
                              str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--from-checkpoint" in missing.stderr and "nowhere" in missing.stderr
