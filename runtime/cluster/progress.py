"""What a person sees of a running job: the terminal progress line and the summary at its end.

Imports: runtime.cluster.coordinator (the workers' last heartbeats), runtime.memory (byte formatting).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from runtime.cluster.coordinator import JOB_METRICS, Coordinator
from runtime.execution.job_run import WORKER_METRICS
from runtime.memory.units import format_bytes


def progress_line(name: str, elapsed: float, progress: dict[str, list[int]], *, width: int = 120) -> str:
    """``[wordcount 3.2s] read_text -> flat_map: 1,204 in / 9,811 out | count: ...`` cut to ``width``."""
    parts = []
    for chain, (records_in, records_out) in progress.items():
        short = chain if len(chain) <= 32 else chain[:29] + "..."
        parts.append(f"{short}: {records_in:,} in / {records_out:,} out")
    line = f"[{name} {elapsed:.1f}s] " + " | ".join(parts)
    return line if len(line) <= width else line[: width - 3] + "..."


def progress_printer(name: str, coordinator: Coordinator, started: float) -> Callable[[], None]:
    """A tick callback that redraws the progress line on a terminal (stderr)."""
    def tick() -> None:
        merged: dict[str, list[int]] = {}
        for handle in coordinator.workers.values():
            for chain, (records_in, records_out) in (handle.progress or {}).items():
                acc = merged.setdefault(chain, [0, 0])
                acc[0] += records_in
                acc[1] += records_out
        width = shutil.get_terminal_size((120, 20)).columns - 1
        sys.stderr.write("\r\x1b[K" + progress_line(name, time.monotonic() - started, merged, width=width))
        sys.stderr.flush()
    return tick


def summarize(per_worker: dict[int, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Merge the workers' metrics: per operator chain, records in/out and backpressure; totals.

    Per operator chain, its subtasks' counters summed; with a keyed state
    backend (heap or managed) also ``state_cache_hit_rate``: the share of state
    reads served from memory (``state_cache_hits`` over hits and
    ``state_cache_misses``, the reads that went to disk), in [0, 1]; 1.0 when
    no read was counted (none happened, or the heap backend, which keeps every
    entry in memory and counts none). The fixed-width streaming state counts
    whole partitions loaded instead (``state_partition_loads``): no rate.
    Per worker (``workers``): peak RSS, GC pause time, network and managed memory
    peaks. Totals: ``managed_peak_bytes`` and ``spilled_bytes`` summed over
    workers, ``worker_peak_rss_bytes`` the largest worker's.
    """
    operators: dict[str, dict[str, float]] = {}
    workers: dict[int, dict[str, float]] = {}
    job: dict[str, Any] = {"restarts": 0}
    for wid, metrics in per_worker.items():
        for name, values in metrics.items():
            if name == JOB_METRICS:  # the coordinator's figures of the job itself: checkpoints, restarts
                job.update(values)
                continue
            if name == WORKER_METRICS:
                workers[int(wid)] = dict(values)
                continue
            chain = name.rsplit("[", 1)[0]
            agg = operators.setdefault(chain, {})
            for k, v in values.items():
                if k == "first_record_at":
                    agg[k] = min(agg.get(k, v), v)
                elif k == "finished_at":
                    agg[k] = max(agg.get(k, v), v)
                else:
                    agg[k] = agg.get(k, 0) + v
    for agg in operators.values():
        if "state_cache_hits" in agg:  # derived from the sums: a rate over every subtask's reads
            reads = agg.get("state_cache_hits", 0) + agg.get("state_cache_misses", 0)
            agg["state_cache_hit_rate"] = agg.get("state_cache_hits", 0) / reads if reads else 1.0
    records = sum(m.get("source_records", 0) for m in operators.values())
    starts = [m["first_record_at"] for m in operators.values() if "first_record_at" in m]
    ends = [m["finished_at"] for m in operators.values() if "finished_at" in m]
    # The timed region of WORKLOADS.md: first source record to the last subtask's end (monotonic, system-wide).
    timed = (max(ends) - min(starts)) if starts and ends else seconds
    return {
        "timed_seconds": timed,
        "seconds": seconds,
        "operators": operators,
        "records": records,
        "records_per_s": records / timed if timed > 0 else 0.0,
        "backpressure_seconds": sum(m.get("backpressure_seconds", 0) for m in operators.values()),
        "workers": workers,
        "worker_peak_rss_bytes": max((w.get("peak_rss_bytes", 0) for w in workers.values()), default=0),
        "gc_pause_seconds": sum(w.get("gc_pause_seconds", 0.0) for w in workers.values()),
        "gc_collections": sum(w.get("gc_collections", 0) for w in workers.values()),
        "network_peak_bytes": sum(w.get("network_peak_bytes", 0) for w in workers.values()),
        "managed_peak_bytes": sum(w.get("managed_peak_bytes", 0) for w in workers.values()),
        "spilled_bytes": sum(m.get("spilled_bytes", 0) for m in operators.values()),
        "spill_files": sum(m.get("spill_files", 0) for m in operators.values()),
        **job,
    }


def checkpoint_line(m: dict[str, Any]) -> str:
    """The summary's line on checkpoints and restarts."""
    parts = []
    if "checkpoints" in m:
        last = (f" (last: #{int(m['checkpoint_last_id'])}, {format_bytes(m.get('checkpoint_size_bytes', 0))}, "
                f"{m.get('checkpoint_duration_seconds', 0.0) * 1000:.0f} ms; longest alignment "
                f"{m.get('checkpoint_alignment_seconds', 0.0) * 1000:.0f} ms)" if m.get("checkpoints") else "")
        parts.append(f"checkpoints: {int(m['checkpoints'])} completed{last}, {int(m.get('checkpoints_failed', 0))} "
                     f"aborted")
    parts.append(f"restarts: {int(m.get('restarts', 0))}")
    return "  " + "; ".join(parts)


def render_summary(name: str, seconds: float, metrics: dict[str, Any]) -> str:
    """One paragraph: records and throughput; memory (managed, spilled, worker RSS, GC); per worker; per operator
    chain, and under a chain with keyed state its entries, bytes, cache hit rate and bins."""
    m = metrics
    spilled = (f", spilled {format_bytes(m['spilled_bytes'])} in {m.get('spill_files', 0)} files"
               if m.get("spilled_bytes") else "")
    lines = [f"job {name!r}: {m.get('records', 0):,} records in {m.get('timed_seconds', seconds):.2f}s "
             f"({m.get('records_per_s', 0):,.0f} records/s; {seconds:.2f}s with start-up); backpressure "
             f"{m.get('backpressure_seconds', 0):.2f}s",
             f"  memory: managed peak {format_bytes(m.get('managed_peak_bytes', 0))}{spilled}; network peak "
             f"{format_bytes(m.get('network_peak_bytes', 0))}; worker peak RSS "
             f"{format_bytes(m.get('worker_peak_rss_bytes', 0))} (largest); GC pauses "
             f"{m.get('gc_pause_seconds', 0.0):.2f}s"]
    for wid, w in sorted(m.get("workers", {}).items()):
        lines.append(f"  worker {wid}: GC pauses {w.get('gc_pause_seconds', 0.0):.2f}s, peak RSS "
                     f"{format_bytes(w.get('peak_rss_bytes', 0))}, managed peak "
                     f"{format_bytes(w.get('managed_peak_bytes', 0))}, network peak "
                     f"{format_bytes(w.get('network_peak_bytes', 0))}")
    if "checkpoints" in m or m.get("restarts"):
        lines.append(checkpoint_line(m))
    for chain, ops in m.get("operators", {}).items():
        late = f", {ops['late_records_dropped']:,} late records dropped" if ops.get("late_records_dropped") else ""
        spill = (f", managed peak {format_bytes(ops['managed_peak_bytes'])}" if ops.get("managed_peak_bytes")
                 else "")
        if ops.get("spilled_bytes"):
            spill += f", spilled {format_bytes(ops['spilled_bytes'])}"
        lines.append(f"  {chain}: {ops.get('records_in', 0):,} in, {ops.get('records_out', 0):,} out{late}{spill}")
        if "state_entries" in ops:
            lines.extend(_state_lines(ops))
    return "\n".join(lines)


def _state_lines(ops: dict[str, float]) -> list[str]:
    """Under an operator chain with keyed state: entries, bytes in memory and on disk, cache hit rate; its bins."""
    reads = int(ops.get("state_cache_hits", 0) + ops.get("state_cache_misses", 0))
    if reads:
        rate = f"cache hit rate {ops.get('state_cache_hit_rate', 1.0):.1%} of {reads:,} reads"
    elif "state_partition_loads" in ops:  # the fixed-width streaming state reads whole partitions back
        rate = f"{int(ops['state_partition_loads']):,} partitions read back from disk"
    else:
        rate = "no reads counted"
    lines = [f"    state: {int(ops['state_entries']):,} entries, {format_bytes(ops.get('state_bytes_in_memory', 0))} "
             f"in memory, {format_bytes(ops.get('state_bytes_on_disk', 0))} on disk; {rate}"]
    bins = sorted(int(k.split("_")[2]) for k in ops if k.startswith("state_bin_") and k.endswith("_objects"))
    if bins:  # size class 0: objects larger than every class, a block each
        lines.append("    state bins: " + ", ".join(
            f"{f'{size} B' if size else 'large'} {int(ops[f'state_bin_{size}_objects']):,} "
            f"({ops[f'state_bin_{size}_objects'] / max(1, ops[f'state_bin_{size}_slots']):.0%} full)"
            for size in bins))
    return lines


__all__ = ["progress_line", "progress_printer", "render_summary", "summarize"]
