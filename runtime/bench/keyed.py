"""Keyed-aggregation micro-benchmark: generic vs vectorized combine + merge on W2 records, printed as JSON.

Imports: operators.keyed, runtime.execution.task (OperatorContext), runtime.bench.workloads (w2_rows), numpy, the
standard library. Run as ``python -m runtime.bench.keyed [--records N] [--repeats R] [--quick]``.
Measures; never asserts on time.

The W2 job ``key_by(lambda r: r[0]).sum(1)`` in batch mode, one process, no IPC:
the records are split between ``--subtasks`` upstream subtasks (round robin
over batches of 1,000); each runs a ``KeyedCombine``; its partials are
partitioned by key (``hash(key) % subtasks``, as the shuffle does), copied
with pickle (fresh objects, as a deserializer makes them; not timed) and cut
into batches of 1,000; subtask 0's ``KeyedAggregate(partial_input=True)``
merges them. Reported per configuration (``vectorize`` False = the generic
dict loops): microseconds per input record of the combiners (fold + flush),
per partial of the merge (merge + results), and both together per record
of one subtask's share, the figure a worker pays end to end for keyed work.
Every run checks that both configurations give the same results.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import time
from typing import Any

import numpy as np

from operators import keyed
from operators.keyed import KeyedAggregate, KeyedCombine
from runtime.bench.workloads import w2_rows
from runtime.execution.task import OperatorContext

BATCH = 1000
_clock = time.process_time  # CPU time: the 2 cores are shared with other jobs, wall time is noise


def _batches(records: list[Any], size: int = BATCH) -> list[list[Any]]:
    return [records[i:i + size] for i in range(0, len(records), size)]


def _one_run(rows: list[Any], subtasks: int, vectorize: bool) -> dict[str, Any]:
    """One combine + shuffle + merge pass; returns seconds and the merged results of subtask 0."""
    batches = _batches(rows)
    combine_seconds = 0.0
    combined = 0
    shuffled: list[list[Any]] = [[] for _ in range(subtasks)]
    for s in range(subtasks):
        mine = batches[s::subtasks]
        combine = KeyedCombine(lambda r: r[0], keyed.sum(1), vectorize=vectorize)
        combine.open(OperatorContext(mode="batch"))
        partials: list[Any] = []
        start = _clock()
        for batch in mine:
            combine.process_batch(batch, partials.extend)
        combine.finish(partials.extend)
        combine_seconds += _clock() - start
        combined += sum(map(len, mine))
        for p in partials:  # the shuffle: hash partitioning of (key, acc) partials (not timed)
            shuffled[hash(p[0]) % subtasks].append(p)
    inbound = _batches(pickle.loads(pickle.dumps(shuffled[0], protocol=5)))
    merge = KeyedAggregate(None, keyed.sum(1), mode="batch", partial_input=True, vectorize=vectorize)
    merge.open(OperatorContext(mode="batch"))
    results: list[Any] = []
    start = _clock()
    for batch in inbound:
        merge.process_batch(batch, results.extend)
    merge.finish(results.extend)
    merge_seconds = _clock() - start
    n_partials = sum(map(len, inbound))
    return {"combine_us_per_record": combine_seconds / combined * 1e6,
            "merge_us_per_partial": merge_seconds / max(n_partials, 1) * 1e6,
            "worker_us_per_record": (combine_seconds / subtasks + merge_seconds) / (combined / subtasks) * 1e6,
            "partials_merged": n_partials, "results": results}


def run(records: int = 1_000_000, repeats: int = 3, subtasks: int = 2) -> dict[str, Any]:
    rows = w2_rows(records)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(repeats):  # interleaved repetitions
        for vectorize in (False, True):
            runs[vectorize].append(_one_run(rows, subtasks, vectorize))
    generic, fast = runs[False][0]["results"], runs[True][0]["results"]
    same_keys = [r[0] for r in generic] == [r[0] for r in fast]
    g = np.array([r[1] for r in generic])
    f = np.array([r[1] for r in fast])
    out: dict[str, Any] = {
        "benchmark": "keyed_combine_merge",
        "workload": {"records": records, "batch": BATCH, "subtasks": subtasks, "keys": "int in [0, 100000)",
                     "values": "float in [0, 1)", "job": "key_by(lambda r: r[0]).sum(1)",
                     "clock": "process_time (CPU seconds of this process; robust when cores are shared)"},
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "same_results": bool(same_keys and len(g) == len(f) and np.array_equal(g, f)),
        "max_rel_diff": float(np.max(np.abs(g - f) / np.maximum(np.abs(g), 1e-300))) if len(g) and same_keys else None,
    }
    for vectorize, label in ((False, "generic"), (True, "vectorized")):
        entry: dict[str, Any] = {"partials_merged": runs[vectorize][0]["partials_merged"]}
        for metric in ("combine_us_per_record", "merge_us_per_partial", "worker_us_per_record"):
            values = [r[metric] for r in runs[vectorize]]
            entry[metric] = {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
                             "max": round(max(values), 4)}
        out[label] = entry
    g_med = out["generic"]["worker_us_per_record"]["median"]
    f_med = out["vectorized"]["worker_us_per_record"]["median"]
    out["speedup_worker"] = round(g_med / f_med, 2) if f_med else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.keyed", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--subtasks", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="200,000 records, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.repeats = 200_000, 1
    print(json.dumps(run(args.records, args.repeats, args.subtasks), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BATCH", "main", "run"]
