"""``shmflow bench recovery``: what checkpoints cost a running job, and how soon a job whose worker was SIGKILLed
processes records again.

Imports: runtime.bench (workloads, baselines' process plumbing, shmflow_runs' W3 and W5 jobs), runtime.checkpoint,
runtime.api (through shmflow_runs), the standard library.

Checkpoint overhead: W3 (word count) and W5 (streaming count in managed state) in streaming mode, with a
checkpoint every :data:`CHECKPOINT_INTERVAL` (state files under a temporary ``state.checkpoints.dir``) against
the same job without checkpoints; the runner alternates the two and reports the ratio of their medians.

Recovery: W5 with a checkpoint every second and ``restart-strategy`` fixed-delay with delay 0. A thread of the
process that runs the job (its coordinator's process) watches the job's checkpoint directory; once a
completed checkpoint's source positions say about half the input was read (:data:`KILL_FRACTION`), it
SIGKILLs worker :data:`VICTIM`, noting ``time.monotonic()`` right before the signal. The embedded cluster
replaces the worker and restores the job from that checkpoint: from its blobs kept in the shared region (the
default) or, with ``state.checkpoints.shared-memory.size`` 0, from its files. The end is the restarted run's first
source record (its sources' ``first_record_at``; the job's metrics are the final run's); CLOCK_MONOTONIC is
system-wide, so the two instants subtract. The coordinator's ``attempts`` timings
(``runtime.cluster.coordinator.ATTEMPT_TIMES``) and the workers' ``restore_seconds`` break the time down. The
run is ok only if the job restarted exactly once, every subtask was restored from where the run says
(the workers' ``restored_from_memory`` / ``restored_from_files``), and W5's checksums equal ``w4_expected``
(exactly-once).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from runtime.bench.baselines import RUN_TIMEOUT, _ChildFailed, _failed, _run_children
from runtime.bench.shmflow_runs import (
    JOB_WORKERS,
    W4Source,
    _identity,
    _job_env,
    _job_extra,
    _large_state_run,
    _tokens,
    _w5_job_child,
    checkpoint_figures,
    w3_input,
    w5_config,
    w5_graph,
)
from runtime.bench.workloads import MASK64, W4_K, W4_MANAGED_BYTES, W4_N, MiB, w3_check, w3_record, w4_add_checksums
from runtime.bench.workloads import w4_expected as _w4_expected

#: Seconds between two checkpoints (the issue's "checkpoints every second").
CHECKPOINT_INTERVAL = 1.0
#: The recovery run kills a worker once a completed checkpoint covers this share of the input.
KILL_FRACTION = 0.5
#: The worker the recovery run kills.
VICTIM = 1
#: How often the killer looks at the checkpoint directory (seconds); the kill time is taken at the kill itself.
KILL_POLL = 0.02


def checkpoint_config(root: str, *, interval: float = CHECKPOINT_INTERVAL, restart: str = "none") -> dict[str, Any]:
    """Checkpoints every ``interval`` seconds into ``root``; ``restart``: the restart strategy."""
    config: dict[str, Any] = {"execution.checkpointing.interval": interval,
                              "state.checkpoints.dir": root, "restart-strategy.type": restart}
    if restart == "fixed-delay":
        config.update({"restart-strategy.fixed-delay.attempts": 1, "restart-strategy.fixed-delay.delay": 0})
    return config


def _with(checkpoints: bool, interval: float) -> str:
    return f"checkpoints every {interval:g} s (files)" if checkpoints else "no checkpoints"


# ============================================================================== W3 streaming
def _last_counts(batch: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``map_batches`` after the streaming count: the last update per word of the batch (the job's output
    is every update; this keeps what reaches the client small, the same in both contenders)."""
    return list(dict(batch).items())


def w3_streaming_job(*, checkpoints: bool, quick: bool = False, lines: int | None = None,
                     workers: int = JOB_WORKERS, interval: float = CHECKPOINT_INTERVAL,
                     corrupt: bool = False) -> dict[str, Any]:
    """W3 in streaming mode (no combiner: every update of a word's count is emitted), with or without a
    checkpoint every :data:`CHECKPOINT_INTERVAL`: ``read_text.flat_map(split).key_by(word).count()`` then the
    last update per word of each batch; the client keeps the largest count per word and checks them all."""
    peer = "shmflow"
    variant = (f"job, {workers} workers, streaming: read_text.flat_map(line.lower().split()).key_by(word).count(), "
               f"last update per word and batch collected; {_with(checkpoints, interval)}")
    params = {"workers": workers, "quick": quick, "mode": "streaming", "checkpoints": checkpoints,
              "checkpoint_interval": interval if checkpoints else 0,
              "lines": lines if lines is not None else ("1/10 of corpus" if quick else "full corpus")}
    try:
        path, ref = w3_input(quick, lines)
        with tempfile.TemporaryDirectory(prefix="shmflow-bench-chk-") as root:
            config = checkpoint_config(root, interval=interval) if checkpoints else {}
            env = _job_env(workers, config=config, mode="streaming")
            out = (env.read_text(str(path)).flat_map(_tokens).key_by(_identity).count().map_batches(_last_counts)
                   .collect())
            result = env.execute("bench-w3-streaming", timeout=RUN_TIMEOUT)
        counts: dict[str, int] = {}
        for word, count in out.values():
            if count > counts.get(word, 0):
                counts[word] = count
        if corrupt and counts:
            counts[next(iter(counts))] += 1
        ok = w3_check(counts, ref)
    except Exception:  # noqa: BLE001 - a broken run is reported, not raised
        return _failed("W3", peer, variant, params, "words/s", traceback.format_exc())
    extra = _job_extra(result)
    figures = checkpoint_figures(result.metrics)
    extra["checkpointing"] = figures
    if checkpoints:
        extra["figures"] = figures
    if not ok:
        extra["error"] = f"{len(counts)} words counted, {len(ref)} expected; counts differ"
    return w3_record(peer, variant, sum(ref.values()), result.metrics["timed_seconds"], ok, params=params, **extra)


# ============================================================================== W5 with checkpoints
def w5_checkpoint_job(*, checkpoints: bool, n: int = W4_N, k: int = W4_K, managed_bytes: int = W4_MANAGED_BYTES,
                      workers: int = JOB_WORKERS, interval: float = CHECKPOINT_INTERVAL,
                      corrupt: bool = False) -> dict[str, Any]:
    """W5 as ``w5_job("managed")`` runs it (a fresh process), with or without a checkpoint every
    :data:`CHECKPOINT_INTERVAL`; the checksums must equal :func:`w4_expected`."""
    variant = (f"job, {workers} workers, streaming: W4Source(rows).key_by(r[0]).count(), state.backend=managed, "
               f"managed {managed_bytes / MiB:g} MiB per worker; {_with(checkpoints, interval)}")
    params = {"n": n, "k": k, "backend": "managed", "workers": workers, "mode": "streaming",
              "managed_bytes": managed_bytes, "checkpoints": checkpoints,
              "checkpoint_interval": interval if checkpoints else 0}
    with tempfile.TemporaryDirectory(prefix="shmflow-bench-chk-") as root:
        extra = checkpoint_config(root, interval=interval) if checkpoints else {}
        rec = _large_state_run("W5", (_w5_job_child, ("managed", n, k, managed_bytes, workers, extra)), variant,
                               params, n, k, corrupt)
    if checkpoints and rec.get("checkpointing"):
        rec["figures"] = rec["checkpointing"]
    return rec


# ============================================================================== recovery
class _Killer:
    """SIGKILLs worker ``victim`` of this process's embedded cluster once a completed checkpoint under ``root``
    covers ``fraction`` of the ``n`` records (W4Source positions). Runs in a thread of the job's process."""

    def __init__(self, root: Path, n: int, k: int, workers: int, fraction: float, victim: int) -> None:
        self.root, self.n, self.fraction, self.victim = root, n, fraction, victim
        # the first record of each source subtask's share: a position minus it is what that subtask read
        shares = W4Source(n, k, "rows").split(workers)
        self.starts = [share.chunks[0][0] if share.chunks else n for share in shares]
        self.stop = threading.Event()
        self.killed_at: float | None = None
        self.pid: int | None = None
        self.checkpoint_id = 0
        self.records_checkpointed = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(KILL_POLL):
                found = self._latest_checkpoint()
                if found is None or found[1] < self.fraction * self.n:
                    continue
                pid = self._victim_pid()
                if pid is None:
                    continue
                self.checkpoint_id, self.records_checkpointed = found
                self.pid = pid
                self.killed_at = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                return
        except Exception:  # noqa: BLE001 - reported with the run
            self.error = traceback.format_exc()

    def _latest_checkpoint(self) -> tuple[int, int] | None:
        """(id, records its sources had read) of the newest completed checkpoint, or None."""
        from runtime.checkpoint import load_checkpoint
        from runtime.errors import CheckpointError

        done = sorted(self.root.glob("*/chk-*/_metadata"), key=lambda p: int(p.parent.name.split("-")[1]))
        if not done:
            return None
        try:
            checkpoint = load_checkpoint(done[-1], verify_state=False)
        except (CheckpointError, OSError):  # retention removed it meanwhile: look again
            return None
        positions = checkpoint.metadata.extra.get("sources", {})
        read = 0
        for key, position in positions.items():
            index = int(str(key).rsplit("-", 1)[1])
            read += int(position[1]) - self.starts[index]
        return checkpoint.checkpoint_id, read

    def _victim_pid(self) -> int | None:
        """The pid of this process's worker ``victim`` (``python -m runtime.cluster.worker <id> ...``)."""
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) != me or b"runtime.cluster.worker" not in args:
                continue
            at = args.index(b"runtime.cluster.worker")
            if at + 1 < len(args) and args[at + 1] == str(self.victim).encode():
                return int(entry)
        return None


#: How each recovery run keeps the checkpoint it restores: the config it adds.
RESTORE_FROM = {"shared memory": {}, "files": {"state.checkpoints.shared-memory.size": 0}}


def _recovery_child(n: int, k: int, managed_bytes: int, workers: int, root: str, interval: float,
                    fraction: float, restore_from: str = "shared memory", area: int | None = None) -> dict[str, Any]:
    """One W5 job with checkpoints and a restart, a worker SIGKILLed part way (fresh process). ``area``: the
    checkpoint area's size (None: ``auto``) when restoring from shared memory."""
    config = {**w5_config("managed", managed_bytes, workers),
              **checkpoint_config(root, interval=interval, restart="fixed-delay"), **RESTORE_FROM[restore_from]}
    if area is not None and restore_from == "shared memory":
        config["state.checkpoints.shared-memory.size"] = area
    env = _job_env(workers, config=config, mode="streaming")
    out = w5_graph(env, n, k)
    killer = _Killer(Path(root), n, k, workers, fraction, VICTIM)
    thread = threading.Thread(target=killer.run, name="shmflow-bench-killer", daemon=True)
    thread.start()
    try:
        result = env.execute("bench-recovery-w5", timeout=RUN_TIMEOUT)
    finally:
        killer.stop.set()
        thread.join(10)
    parts = [{"groups": g, "total": t, "weighted": w} for g, t, w in out.values()]
    m = result.metrics
    starts = [op["first_record_at"] for op in m.get("operators", {}).values() if "first_record_at" in op]
    return {"checksums": w4_add_checksums(parts), "restarts": m.get("restarts", 0), "attempts": m.get("attempts", []),
            "first_record_at": min(starts) if starts else None, "failures": m.get("failures", []),
            "restore_seconds": max((w.get("restore_seconds", 0.0) for w in m.get("workers", {}).values()),
                                   default=0.0),
            "restored_from_memory": sum(w.get("restored_from_memory", 0) for w in m.get("workers", {}).values()),
            "restored_from_files": sum(w.get("restored_from_files", 0) for w in m.get("workers", {}).values()),
            "records_after_restart": m.get("records"), "timed_seconds": m.get("timed_seconds"),
            "wall_seconds": result.seconds, "checkpointing": checkpoint_figures(m),
            "killed_at": killer.killed_at, "killed_pid": killer.pid, "kill_checkpoint": killer.checkpoint_id,
            "kill_records_checkpointed": killer.records_checkpointed, "killer_error": killer.error}


def recovery_breakdown(out: dict[str, Any]) -> dict[str, float]:
    """The recovery time and its steps (seconds) from a recovery child's result: kill -> failure detected ->
    workers replaced and attached -> deployed (subtasks built, state restored) -> started -> first source record."""
    failed, final = out["attempts"][-2], out["attempts"][-1]
    kill, first = out["killed_at"], out["first_record_at"]
    return {
        "total_s": first - kill,
        "detect_s": failed["failed_at"] - kill,
        "replace_s": final["workers_attached_at"] - failed["failed_at"],
        "deploy_s": final["deployed_at"] - final["workers_attached_at"],
        "restore_s": out["restore_seconds"],
        "start_s": final["started_at"] - final["deployed_at"],
        "first_record_s": first - final["started_at"],
        "checkpoint_bytes": final.get("restored_bytes", 0),
        "checkpoint_id": final.get("restored_checkpoint", 0),
    }


def w5_recovery(*, n: int = W4_N, k: int = W4_K, managed_bytes: int = W4_MANAGED_BYTES, workers: int = JOB_WORKERS,
                interval: float = CHECKPOINT_INTERVAL, fraction: float = KILL_FRACTION,
                restore_from: str = "shared memory", area: int | None = None,
                corrupt: bool = False) -> dict[str, Any]:
    """Recovery of W5 after a worker is SIGKILLed half way (module docstring), restored ``restore_from``
    ("shared memory" or "files"; ``area``: the checkpoint area's size, None for ``auto``, which holds W5's
    state at full scale but not the tiny run's, whose state is eight times its managed memory). ``rate`` is
    the time from the kill to the restarted run's first source record, in seconds."""
    peer = "shmflow"
    variant = (f"W5 job ({workers} workers, managed state, {managed_bytes / MiB:g} MiB per worker), checkpoints every "
               f"{interval:g} s, fixed-delay 0: worker {VICTIM} SIGKILLed once a checkpoint covers "
               f"{fraction:.0%} of the input; kill -> first source record of the restarted run, from {restore_from}")
    params = {"n": n, "k": k, "backend": "managed", "workers": workers, "mode": "streaming",
              "managed_bytes": managed_bytes, "checkpoint_interval": interval, "restart_delay": 0,
              "kill_fraction": fraction, "victim": VICTIM, "restore_from": restore_from}
    try:
        with tempfile.TemporaryDirectory(prefix="shmflow-bench-chk-") as root:
            out = _run_children([("job", _recovery_child, (n, k, managed_bytes, workers, root, interval,
                                                           fraction, restore_from, area))])["job"]
    except _ChildFailed as exc:
        return _failed("recovery", peer, variant, params, "s", str(exc))
    except Exception:  # noqa: BLE001
        return _failed("recovery", peer, variant, params, "s", traceback.format_exc())
    got = dict(out["checksums"])
    if corrupt:
        got["weighted"] = (got["weighted"] + 1) & MASK64
    expected = _w4_expected(n, k)
    problems = []
    if out["killed_at"] is None:
        problems.append("no worker was killed (the job ended before a checkpoint covered "
                        f"{fraction:.0%} of its input)" + (f": {out['killer_error']}" if out["killer_error"] else ""))
    elif out["restarts"] != 1 or len(out["attempts"]) != 2:
        problems.append(f"{out['restarts']} restarts in {len(out['attempts'])} runs; expected 1 in 2")
    elif out["first_record_at"] is None or out["first_record_at"] < out["attempts"][-1]["started_at"]:
        problems.append("the restarted run's first source record is unknown or before its start")
    elif restore_from == "files" and out["restored_from_memory"]:
        problems.append(f"{out['restored_from_memory']} subtasks were restored from shared memory; expected files")
    elif restore_from == "shared memory" and out["restored_from_files"]:
        problems.append(f"{out['restored_from_files']} subtasks were restored from files, "
                        f"{out['restored_from_memory']} from shared memory; expected shared memory only")
    if got != expected:
        problems.append(f"checksums {got}; expected {expected} (not exactly-once)")
    extra: dict[str, Any] = {"checksums": got, "expected": expected, "checkpointing": out["checkpointing"],
                             "kill": {key: out[key] for key in ("killed_pid", "kill_checkpoint",
                                                                 "kill_records_checkpointed")},
                             "attempts": out["attempts"], "failures": out["failures"],
                             "records_after_restart": out["records_after_restart"],
                             "restored": {"from_memory": out["restored_from_memory"],
                                          "from_files": out["restored_from_files"]},
                             "job_wall_seconds": out["wall_seconds"]}
    if problems:
        return {**_failed("recovery", peer, variant, params, "s", "; ".join(problems)), **extra}
    figures = recovery_breakdown(out)
    total = figures["total_s"]
    return {"workload": "recovery", "peer": peer, "variant": variant, "params": params, "seconds": round(total, 6),
            "rate": round(total, 6), "unit": "s", "ok": True, "figures": figures, **extra}


__all__ = ["CHECKPOINT_INTERVAL", "KILL_FRACTION", "VICTIM", "checkpoint_config", "recovery_breakdown",
           "w3_streaming_job", "w5_checkpoint_job", "w5_recovery"]
