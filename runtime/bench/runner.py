"""``shmflow bench``: shmflow and its baselines on W1 to W5, recovery, latency and alloc, in one invocation.

Imports: runtime.bench (workloads, baselines, shmflow_runs, alloc), runtime._version, rich, numpy,
the standard library; matplotlib lazily, for ``--plot`` only.

W4 (large keyed state) also reports memory: each worker's peak RSS, bytes spilled and GC pauses, and
a memory bound (:class:`MemoryBound`) against the same job with few keys, run in the same invocation.
``recovery`` (:mod:`runtime.bench.recovery`) compares W3 and W5 with checkpoints against the same jobs without,
and times W5's recovery from a SIGKILLed worker.

Per workload, every contender (shmflow runs, baselines, ceilings) runs once per
repetition, shmflow and baselines alternating, and repetition 2 starts only
after repetition 1 of every contender (../shared/WORKLOADS.md). Each figure
is the median of the repetitions with their min and max. The headline is the
ratio of shmflow's median to each baseline's median, measured in the same
invocation (the machines are shared and noisy, so absolute figures from
another run do not compare).

Output: a rich table (units, spread, ratios, targets), ``--json FILE`` with
every figure, its spread, the parameters, package versions and the git sha,
and ``--plot FILE.png`` (matplotlib: ``pip install -e '.[bench]'``).

Correctness: every run verifies its answer. A wrong or failed run gives
``ok: false`` in the JSON, a red row, and exit status 1. The hidden
``--corrupt NAME`` flag perturbs the answer of the contenders whose name
contains NAME (tests use it to prove that). Measures; never asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKLOADS = ("w1", "w2", "w3", "w4", "w5", "recovery", "latency", "alloc")
CHOICES = (*WORKLOADS, "all")
#: Repetitions of a full run (median of 3); ``--quick`` runs one.
REPS = 3
#: Scale names: the full workload, the smoke run, and a tiny one for tests.
SCALES = ("full", "quick", "tiny")
#: Tiny volumes (tests): W1 bytes and DRAM-ceiling array, W2 records, W3 lines, latency records, alloc pairs;
#: W4 records, keys and managed memory per worker (small enough that it still spills).
TINY = {"w1_bytes": 4 << 20, "w1_dram_bytes": 32 << 20, "w2_n": 20_000, "w3_lines": 2_000, "latency_n": 500,
        "alloc_pairs": 2_000, "w4_n": 200_000, "w4_k": 100_000, "w4_managed_bytes": 1 << 20,
        # the recovery run must outlast a checkpoint and the kill: W4's tiny job ends within about 0.3 s
        "recovery_n": 1_000_000, "recovery_k": 500_000, "recovery_area": 64 << 20}
ALLOC_PAIRS = {"full": 200_000, "quick": 20_000, "tiny": TINY["alloc_pairs"]}
PLOT_HINT = "pip install -e '.[bench]'"


# ============================================================================== contenders
@dataclass(frozen=True)
class Target:
    """A goal for a shmflow figure (reported, never asserted): ``value`` in the contender's unit."""

    value: float
    op: str  # ">=" or "<="
    text: str

    def met(self, figure: float | None) -> bool:
        if figure is None:
            return False
        return figure >= self.value if self.op == ">=" else figure <= self.value


@dataclass(frozen=True)
class RatioTarget:
    """A goal for a shmflow median as a ratio to a baseline's median from the same invocation: a slow
    or noisy machine moves both sides alike. ``against`` names the baseline contender."""

    against: str
    value: float
    text: str

    def met(self, ratio: float | None) -> bool:
        return ratio is not None and ratio >= self.value


@dataclass(frozen=True)
class MemoryBound:
    """W4's memory bound (reported, never asserted): in every repetition each worker's peak RSS is at most
    ``against``'s (the same job with small state, in the same invocation: the median over its repetitions
    of its largest worker's peak) + ``allowance`` bytes, and the job spilled."""

    against: str
    allowance: int
    text: str

    def check(self, reference_peak: float | None, peak: float | None, spilled: float | None) -> bool:
        if reference_peak is None or peak is None or spilled is None:
            return False
        return peak <= reference_peak + self.allowance and spilled > 0


@dataclass
class Contender:
    """One thing that is measured: ``run()`` does one repetition and returns a result record."""

    name: str
    workload: str          # w1 | w2 | w3 | w4 | w5 | latency | alloc
    section: str           # table group, e.g. "W1 32 KiB"
    kind: str              # shmflow | baseline | ceiling
    label: str             # short name for ratio cells and the plot
    run: Callable[[], dict[str, Any]]
    compare: tuple[str, ...] = ()   # shmflow only: names of the contenders to take ratios against
    target: Target | None = None
    ratio_targets: tuple[RatioTarget, ...] = ()  # shmflow only: goals relative to baselines (in compare)
    warmup: Callable[[], dict[str, Any]] | None = None  # shmflow only: an untimed tiny run before the reps
    memory_bound: MemoryBound | None = None  # W4: a goal for its workers' peak RSS and its spilling
    records: list[dict[str, Any]] = field(default_factory=list)


def _size_tag(size: int) -> str:
    return f"{size // 1024}KiB" if size < (1 << 20) else f"{size >> 20}MiB"


def build_contenders(workloads: list[str], *, scale: str = "full", workers: int = 2,
                     corrupt: str | None = None) -> list[Contender]:
    """Every contender of ``workloads`` at ``scale``, in run order (shmflow and baselines alternating)."""
    from runtime.bench import alloc as alloc_bench
    from runtime.bench import baselines as bl
    from runtime.bench import shmflow_runs as sf
    from runtime.bench.workloads import W1_BUFFER_SIZES

    quick = scale == "quick"
    tiny = scale == "tiny"
    P = functools.partial
    w1_kw: dict[str, Any] = {"quick": quick}
    if tiny:
        w1_kw["total_bytes"] = TINY["w1_bytes"]
    w2_kw: dict[str, Any] = {"quick": quick, **({"n": TINY["w2_n"]} if tiny else {})}
    w3_kw: dict[str, Any] = {"quick": quick, **({"lines": TINY["w3_lines"]} if tiny else {})}
    lat_kw: dict[str, Any] = {"quick": quick, **({"count": TINY["latency_n"]} if tiny else {})}

    def bad(name: str) -> bool:
        return bool(corrupt and corrupt in name)

    out: list[Contender] = []

    if "w1" in workloads:
        dram = TINY["w1_dram_bytes"] if tiny else bl.CEILING_DRAM_BYTES
        ceilings = [(f"w1_{op}_{_size_tag(dram)}", P(bl.w1_memory_bandwidth, op, dram, **w1_kw))
                    for op in ("copy", "sum")]
        for size in W1_BUFFER_SIZES:
            tag = _size_tag(size)
            section = f"W1 {size // 1024} KiB" if size < (1 << 20) else f"W1 {size >> 20} MiB"
            shm = f"w1_shmflow_shm_{tag}"
            base = [f"w1_mp_queue_{tag}", f"w1_zmq_{tag}", f"w1_shm_ring_{tag}", f"w1_inproc_{tag}"]
            hot = [f"w1_copy_{tag}", f"w1_sum_{tag}"]
            # 5.0 GB/s is 70% of the reference machine's copy+sum ceiling (7.2) and 3.5x its pyzmq (1.3)
            # at 32 KiB; 12 GB/s is 0.77 of a 15.5 ceiling and 3.2x pyzmq (3.8) at 1 MiB.
            small = size < (1 << 20)
            target = Target(5.0, ">=", ">= 5.0 GB/s") if small else Target(12.0, ">=", ">= 12 GB/s")
            ceiling_share, zmq_times = (0.70, 3.5) if small else (0.77, 3.2)
            # Local channels move descriptors through a ring in the region, as the hand-rolled ring does.
            ring_share = 1.0 if small else 0.9
            ratio_targets = (RatioTarget(f"w1_shm_ring_{tag}", ring_share, f"≥ {ring_share:.1f}× shm ring"),
                             RatioTarget(f"w1_inproc_{tag}", ceiling_share, f"≥ {ceiling_share:.2f}× copy+sum"),
                             RatioTarget(f"w1_zmq_{tag}", zmq_times, f"≥ {zmq_times:.1f}× pyzmq"))
            shmflow = [Contender(shm, "w1", section, "shmflow", "shmflow shm",
                                 P(sf.w1_shmflow, size, transport="shm", corrupt=bad(shm), **w1_kw),
                                 compare=(*base, *hot, *(name for name, _ in ceilings)), target=target,
                                 ratio_targets=ratio_targets,
                                 warmup=P(sf.w1_shmflow, size, transport="shm", total_bytes=TINY["w1_bytes"]))]
            tcp_base: list[Contender] = []
            if size < (1 << 20):
                tcp = f"w1_shmflow_tcp_{tag}"
                zmq_tcp = f"w1_zmq_tcp_{tag}"
                tcp_kw = {**w1_kw, "total_bytes": w1_kw.get("total_bytes") or sf.w1_tcp_bytes(quick)}
                shmflow.append(Contender(tcp, "w1", section, "shmflow", "shmflow tcp",
                                         P(sf.w1_shmflow, size, transport="tcp", corrupt=bad(tcp), **w1_kw),
                                         compare=(zmq_tcp, *base[:3]),
                                         ratio_targets=(RatioTarget(zmq_tcp, 1.0, "≥ 1.0× pyzmq tcp"),)))
                tcp_base.append(Contender(zmq_tcp, "w1", section, "baseline", "pyzmq tcp",
                                          P(bl.w1_zmq, size, transport="tcp", **tcp_kw)))
            others = [Contender(f"w1_mp_queue_{tag}", "w1", section, "baseline", "mp.Queue",
                                P(bl.w1_mp_queue, size, **w1_kw)),
                      Contender(f"w1_zmq_{tag}", "w1", section, "baseline", "pyzmq ipc",
                                P(bl.w1_zmq, size, **w1_kw)),
                      *tcp_base,
                      Contender(f"w1_shm_ring_{tag}", "w1", section, "baseline", "shm ring + Pipe",
                                P(bl.w1_shm_ring, size, **w1_kw)),
                      Contender(f"w1_inproc_{tag}", "w1", section, "ceiling", "copy+sum in-process",
                                P(bl.w1_inproc, size, **w1_kw))]
            for op in ("copy", "sum"):
                others.append(Contender(f"w1_{op}_{tag}", "w1", section, "ceiling", f"{op} {tag} (hot)",
                                        P(bl.w1_memory_bandwidth, op, size, **w1_kw)))
            out += _alternate(shmflow, others)
        out += [Contender(name, "w1", "W1 memory (DRAM)", "ceiling", name[3:].replace("_", " ") + " (DRAM)", fn)
                for name, fn in ceilings]

    if "w2" in workloads:
        rows, cols = "w2_shmflow_rows", "w2_shmflow_columnar"
        rows_base = ["w2_mp_queue_rows", "w2_zmq_msgpack", "w2_mp_queue_per_record"]
        out += _alternate(
            [Contender(rows, "w2", "W2 rows", "shmflow", "shmflow rows job",
                       P(sf.w2_rows_job, corrupt=bad(rows), **w2_kw, workers=workers),
                       compare=tuple(rows_base), target=Target(2.6e6, ">=", ">= 2.6 M records/s"),
                       ratio_targets=(RatioTarget("w2_mp_queue_rows", 1.0, "≥ 1.0× mp.Queue batches"),),
                       warmup=P(sf.w2_rows_job, n=TINY["w2_n"], workers=workers))],
            [Contender("w2_mp_queue_rows", "w2", "W2 rows", "baseline", "mp.Queue batches",
                       P(bl.w2_mp_queue_rows, **w2_kw)),
             Contender("w2_zmq_msgpack", "w2", "W2 rows", "baseline", "pyzmq msgpack", P(bl.w2_zmq_msgpack, **w2_kw)),
             Contender("w2_mp_queue_per_record", "w2", "W2 rows", "baseline", "mp.Queue per record",
                       P(bl.w2_mp_queue_per_record, **w2_kw))])
        out += _alternate(
            [Contender(cols, "w2", "W2 columnar", "shmflow", "shmflow columnar job",
                       P(sf.w2_columnar_job, corrupt=bad(cols), **w2_kw, workers=workers), compare=("w2_zmq_columns",),
                       target=Target(40e6, ">=", ">= 40 M records/s"),
                       ratio_targets=(RatioTarget("w2_zmq_columns", 0.76, "≥ 0.76× pyzmq columns"),),  # 40 / 52.7
                       warmup=P(sf.w2_columnar_job, n=TINY["w2_n"], workers=workers))],
            [Contender("w2_zmq_columns", "w2", "W2 columnar", "baseline", "pyzmq columns",
                       P(bl.w2_zmq_columns, **w2_kw))])

    if "w3" in workloads:
        name = "w3_shmflow"
        out += _alternate(
            [Contender(name, "w3", "W3 word count", "shmflow", "shmflow word count job",
                       P(sf.w3_job, corrupt=bad(name), **w3_kw, workers=workers), compare=("w3_mp_queue", "w3_counter"),
                       target=Target(3e6, ">=", ">= 3 M words/s"),
                       ratio_targets=(RatioTarget("w3_mp_queue", 0.65, "≥ 0.65× mp.Queue 2 proc"),),  # 3 / 4.6
                       warmup=P(sf.w3_job, lines=TINY["w3_lines"], workers=workers))],
            [Contender("w3_mp_queue", "w3", "W3 word count", "baseline", "mp.Queue, 2 processes",
                       P(bl.w3_mp_queue, **w3_kw)),
             Contender("w3_counter", "w3", "W3 word count", "ceiling", "Counter, one process",
                       P(bl.w3_counter, **w3_kw))])

    if "w4" in workloads:
        out += _w4_contenders(scale, workers, bad)

    if "w5" in workloads:
        out += _w5_contenders(scale, workers, bad)

    if "recovery" in workloads:
        out += _recovery_contenders(scale, workers, bad)

    if "latency" in workloads:
        name = "latency_shmflow"
        out.append(Contender(name, "latency", "latency", "shmflow", "shmflow keyed job",
                             P(sf.latency_job, corrupt=bad(name), **lat_kw, workers=workers),
                             target=Target(5.0, "<=", "p99 <= 5 ms"),
                             warmup=P(sf.latency_job, count=TINY["latency_n"], workers=workers)))

    if "alloc" in workloads:
        pairs = ALLOC_PAIRS[scale]
        for scenario, target in (("fixed_32KiB", Target(300e3, ">=", ">= 300k pairs/s")),
                                 ("mixed_4KiB_1MiB", Target(300e3, ">=", ">= 300k pairs/s"))):
            out.append(Contender(f"alloc_{scenario}", "alloc", "alloc", "shmflow", f"shmflow {scenario}",
                                 P(_alloc_run, alloc_bench, scenario, pairs), target=target))
    return out


def w4_settings(scale: str) -> dict[str, int]:
    """W4's records, keys and managed memory per worker at ``scale``, and the memory bound's K.

    Full: N 10 M over K 5 M with 64 MiB (WORKLOADS.md). Quick: a tenth of N and K, and of the managed
    memory too (6.4 MiB), so that the state still outgrows it and spills as in a full run. Tiny (tests):
    200,000 records over 100,000 keys in 1 MiB (more keys than an array indexed by key can hold there).
    """
    from runtime.bench.workloads import W4_BOUND_K, W4_MANAGED_BYTES, W4_N, w4_scale

    if scale == "tiny":
        n, k, managed = TINY["w4_n"], TINY["w4_k"], TINY["w4_managed_bytes"]
    else:
        n, k = w4_scale(scale == "quick")
        managed = W4_MANAGED_BYTES * n // W4_N
    return {"n": n, "k": k, "managed_bytes": managed, "bound_k": W4_BOUND_K}


def _w4_contenders(scale: str, workers: int, bad: Callable[[str], bool]) -> list[Contender]:
    """W4: shmflow rows and columns, the same jobs with K = 10,000 (the memory bound's reference), and
    the dict, DuckDB (int and str keys; skipped when not installed) and numpy baselines."""
    from runtime.bench import baselines as bl
    from runtime.bench import shmflow_runs as sf
    from runtime.bench.workloads import W4_RSS_SLACK, MiB

    P = functools.partial
    w4 = w4_settings(scale)
    n, k, managed, bound_k = w4["n"], w4["k"], w4["managed_bytes"], w4["bound_k"]
    duckdb = bl.duckdb_version() is not None
    tiny: dict[str, Any] = {"n": TINY["w4_n"], "k": TINY["w4_k"], "managed_bytes": TINY["w4_managed_bytes"],
                            "workers": workers}
    allowance = managed + W4_RSS_SLACK
    section = f"W4 {n / 1e6:g} M records, {k:,} keys, managed {managed / MiB:g} MiB"
    bound_section = f"W4 memory bound: the same jobs with {bound_k:,} keys"
    goals = {"rows": (("w4_dict", "w4_duckdb_str"), RatioTarget("w4_dict", 1.0, "≥ 1.0× python dict")),
             "columns": (("w4_duckdb_int", "w4_numpy"),
                         RatioTarget("w4_duckdb_int", 0.25, "≥ 0.25× DuckDB int keys") if duckdb else None)}
    shmflow: list[Contender] = []
    for form, (compare, ratio) in goals.items():
        name = f"w4_shmflow_{form}"
        bound = MemoryBound(f"{name}_k{bound_k}", allowance,
                            f"RSS ≤ K {bound_k:,} peak + {allowance / MiB:g} MiB, spilled")
        shmflow.append(Contender(name, "w4", section, "shmflow", f"shmflow {form} job",
                                 P(sf.w4_job, form, n=n, k=k, managed_bytes=managed, workers=workers,
                                   corrupt=bad(name)),
                                 compare=compare, ratio_targets=(ratio,) if ratio else (), memory_bound=bound,
                                 warmup=P(sf.w4_job, form, **tiny)))
    for form in ("rows", "columns"):
        name = f"w4_shmflow_{form}_k{bound_k}"
        shmflow.append(Contender(name, "w4", bound_section, "shmflow", f"shmflow {form}, K {bound_k:,}",
                                 P(sf.w4_job, form, n=n, k=bound_k, managed_bytes=managed, workers=workers,
                                   corrupt=bad(name))))
    others = [Contender("w4_dict", "w4", section, "baseline", "python dict", P(bl.w4_dict, n=n, k=k)),
              Contender("w4_duckdb_int", "w4", section, "baseline", "DuckDB int keys",
                        P(bl.w4_duckdb, "int", n=n, k=k)),
              Contender("w4_duckdb_str", "w4", section, "baseline", "DuckDB str keys",
                        P(bl.w4_duckdb, "str", n=n, k=k)),
              Contender("w4_numpy", "w4", section, "baseline", "numpy unique+bincount", P(bl.w4_numpy, n=n, k=k))]
    return _alternate(shmflow, others)


def _w5_contenders(scale: str, workers: int, bad: Callable[[str], bool]) -> list[Contender]:
    """W5: the streaming count with ``state.backend=managed``, the same job on the ``heap`` backend (its
    baseline: unbounded memory), and the managed job with K = 10,000 (the memory bound's reference).
    Records, keys and managed memory per worker are W4's at the same scale."""
    from runtime.bench import shmflow_runs as sf
    from runtime.bench.workloads import W4_RSS_SLACK, MiB

    P = functools.partial
    w5 = w4_settings(scale)
    n, k, managed, bound_k = w5["n"], w5["k"], w5["managed_bytes"], w5["bound_k"]
    allowance = managed + W4_RSS_SLACK
    section = f"W5 {n / 1e6:g} M records, {k:,} keys, streaming, managed {managed / MiB:g} MiB"
    tiny: dict[str, Any] = {"n": TINY["w4_n"], "k": TINY["w4_k"], "managed_bytes": TINY["w4_managed_bytes"],
                            "workers": workers}
    name, heap, small = "w5_shmflow_managed", "w5_shmflow_heap", f"w5_shmflow_managed_k{bound_k}"
    bound = MemoryBound(small, allowance, f"RSS ≤ K {bound_k:,} peak + {allowance / MiB:g} MiB, spilled")
    shmflow = [Contender(name, "w5", section, "shmflow", "shmflow, managed state",
                         P(sf.w5_job, "managed", n=n, k=k, managed_bytes=managed, workers=workers, corrupt=bad(name)),
                         compare=(heap,), ratio_targets=(RatioTarget(heap, 0.5, "≥ 0.5× heap backend"),),
                         memory_bound=bound, warmup=P(sf.w5_job, "managed", **tiny)),
               Contender(small, "w5", f"W5 memory bound: the same job with {bound_k:,} keys", "shmflow",
                         f"shmflow managed, K {bound_k:,}",
                         P(sf.w5_job, "managed", n=n, k=bound_k, managed_bytes=managed, workers=workers,
                           corrupt=bad(small)))]
    others = [Contender(heap, "w5", section, "baseline", "shmflow, heap state (unbounded)",
                        P(sf.w5_job, "heap", n=n, k=k, managed_bytes=managed, workers=workers, corrupt=bad(heap)))]
    return _alternate(shmflow, others)


#: ``recovery`` per scale: the checkpoint interval (s) and the share of the input a completed checkpoint covers
#: when the worker is killed. Full and quick: every second (the issue's), half way. Tiny (tests): the job lasts
#: under a second, so a checkpoint every 0.1 s, and the kill a quarter of the way.
RECOVERY_TIMING = {"full": (1.0, 0.5), "quick": (1.0, 0.5), "tiny": (0.1, 0.25)}


def _recovery_contenders(scale: str, workers: int, bad: Callable[[str], bool]) -> list[Contender]:
    """``recovery``: W3 and W5 in streaming mode with a checkpoint every second against the same jobs without
    (their ratio: checkpoint overhead), and W5's time from a SIGKILLed worker to processing again, restored
    from the checkpoint's blobs in the shared region and from its files."""
    from runtime.bench import recovery as rc
    from runtime.bench.workloads import MiB

    P = functools.partial
    interval, fraction = RECOVERY_TIMING[scale]
    w3_kw: dict[str, Any] = {"quick": scale == "quick", **({"lines": TINY["w3_lines"]} if scale == "tiny" else {}),
                             "workers": workers, "interval": interval}
    w5 = w4_settings(scale)
    w5_kw: dict[str, Any] = {"n": w5["n"], "k": w5["k"], "managed_bytes": w5["managed_bytes"], "workers": workers,
                             "interval": interval}
    every = f"checkpoints every {interval:g} s"
    w3_section = f"recovery: W3 streaming, {every} vs none"
    w5_section = f"recovery: W5 {w5['n'] / 1e6:g} M records, {w5['k']:,} keys, managed state, {every} vs none"
    kill_kw = {**w5_kw, **({"n": TINY["recovery_n"], "k": TINY["recovery_k"], "area": TINY["recovery_area"]}
                           if scale == "tiny" else {})}
    kill_section = (f"recovery: W5 {kill_kw['n'] / 1e6:g} M records, managed {w5['managed_bytes'] / MiB:g} MiB, a "
                    f"worker SIGKILLed; kill -> first record again")
    goal = "≥ 0.9× without checkpoints"
    names = {"w3": ("recovery_w3_checkpoints", "recovery_w3_plain"),
             "w5": ("recovery_w5_checkpoints", "recovery_w5_plain")}
    shmflow, others = [], []
    for wl, section, fn, kw in (("w3", w3_section, rc.w3_streaming_job, w3_kw),
                                ("w5", w5_section, rc.w5_checkpoint_job, w5_kw)):
        on, off = names[wl]
        shmflow.append(Contender(on, "recovery", section, "shmflow", f"{wl.upper()} with {every}",
                                 P(fn, checkpoints=True, corrupt=bad(on), **kw), compare=(off,),
                                 ratio_targets=(RatioTarget(off, 0.9, goal),)))
        others.append(Contender(off, "recovery", section, "baseline", f"{wl.upper()} without checkpoints",
                                P(fn, checkpoints=False, corrupt=bad(off), **kw)))
    files, shm = "recovery_w5_files", "recovery_w5_shm"
    shmflow.append(Contender(shm, "recovery", kill_section, "shmflow", "restored from shared memory",
                             P(rc.w5_recovery, fraction=fraction, restore_from="shared memory", corrupt=bad(shm),
                               **kill_kw),
                             target=Target(2.0, "<=", "≤ 2 s from shared memory")))
    others.append(Contender(files, "recovery", kill_section, "shmflow", "restored from files",
                            P(rc.w5_recovery, fraction=fraction, restore_from="files", corrupt=bad(files),
                              **kill_kw)))
    return _alternate(shmflow, others)


def _alternate(shmflow: list[Contender], others: list[Contender]) -> list[Contender]:
    """A B A B ...: shmflow runs and baselines alternate while both last."""
    out: list[Contender] = []
    for i in range(max(len(shmflow), len(others))):
        out += shmflow[i:i + 1] + others[i:i + 1]
    return out


def _alloc_run(alloc_bench: Any, scenario: str, pairs: int) -> dict[str, Any]:
    """One repetition of the allocator micro-benchmark, as a result record (pairs/s)."""
    from runtime.bench.workloads import record

    params = {"pairs": pairs, "live_blocks": 64, "scenario": scenario}
    variant = f"BuddyAllocator allocate+free, {scenario.replace('_', ' ')}, 64 blocks live"
    from runtime.bench.baselines import _run_children

    try:
        rate = _run_children([("alloc", alloc_bench.run_scenario, (scenario, pairs))])["alloc"]["pairs_per_s"]
    except Exception:  # noqa: BLE001
        return {"workload": "alloc", "peer": "shmflow", "variant": variant, "params": params, "seconds": None,
                "rate": None, "unit": "pairs/s", "ok": False, "error": traceback.format_exc()}
    done = pairs - 64
    return record("alloc", "shmflow", variant, params, done / rate, done, "pairs/s", True)


# ============================================================================== running
def run_contenders(contenders: list[Contender], *, reps: int, warmup: bool,
                   on_step: Callable[[str], None] = lambda _: None) -> None:
    """Run every contender ``reps`` times, per workload: rep 1 of each, then rep 2, ...; fills ``records``."""
    order: list[str] = []
    for c in contenders:
        if c.workload not in order:
            order.append(c.workload)
    for workload in order:
        group = [c for c in contenders if c.workload == workload]
        if warmup:
            for c in group:
                if c.warmup is not None:
                    on_step(f"{c.label}: warm-up")
                    c.warmup()
        for rep in range(reps):
            for c in group:
                on_step(f"{c.label}: rep {rep + 1} of {reps}")
                started = time.monotonic()
                try:
                    rec = c.run()
                except Exception:  # noqa: BLE001 - a run that raises is a failed run, reported
                    rec = {"workload": c.workload, "peer": c.kind, "variant": c.label, "params": {},
                           "seconds": None, "rate": None, "unit": "", "ok": False, "error": traceback.format_exc()}
                rec["rep"] = rep
                rec["wall_seconds"] = round(time.monotonic() - started, 3)  # with process start-up and checks
                rec["loadavg_1m"] = round(os.getloadavg()[0], 2)
                c.records.append(rec)


def _memory_spread(memory: list[dict[str, Any]]) -> dict[str, Any]:
    """W4's memory figures over the ok repetitions: each number's spread; per-worker lists element-wise
    (the largest of each worker over the repetitions, and the median)."""
    if not memory:
        return {}
    out: dict[str, Any] = {}
    for key, value in memory[0].items():
        if isinstance(value, list):
            columns = list(zip(*(m[key] for m in memory if len(m.get(key, ())) == len(value))))
            out[key] = {"max": [max(col) for col in columns], "median": [statistics.median(col) for col in columns]}
        elif isinstance(value, (int, float)):
            out[key] = _spread([float(m[key]) for m in memory if key in m])
    return out


def _largest_worker_peak(memory: dict[str, Any]) -> float | None:
    """The largest worker's peak RSS over the repetitions (workers' own account), else the outside one."""
    per_worker = (memory.get("worker_peak_rss_bytes") or {}).get("max") or []
    if per_worker:
        return float(max(per_worker))
    outside = memory.get("children_maxrss_bytes")
    return outside["max"] if outside else None


def _memory_bound(goal: MemoryBound, ok: bool, memory: dict[str, Any], reference: Contender | None) -> dict[str, Any]:
    """The memory bound's verdict: the largest worker peak of any repetition against the reference job's
    median largest-worker peak + the allowance, and the least spilled of any repetition > 0."""
    ref_peaks = []
    for r in reference.records if reference is not None else []:
        per_worker = (r.get("memory") or {}).get("worker_peak_rss_bytes") or []
        if r.get("ok") and per_worker:
            ref_peaks.append(float(max(per_worker)))
    ref_peak = statistics.median(ref_peaks) if ref_peaks else None
    peak = _largest_worker_peak(memory)
    spilled = (memory.get("spilled_bytes") or {}).get("min")
    return {"against": goal.against, "text": goal.text, "allowance_bytes": goal.allowance,
            "reference_peak_bytes": ref_peak, "bound_bytes": None if ref_peak is None else ref_peak + goal.allowance,
            "peak_bytes": peak, "spilled_bytes": spilled, "met": ok and goal.check(ref_peak, peak, spilled)}


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(contenders: list[Contender]) -> list[dict[str, Any]]:
    """One entry per contender: median/min/max over its ok repetitions, ratios to its baselines, target."""
    by_name = {c.name: c for c in contenders}
    rows: list[dict[str, Any]] = []
    stats: dict[str, dict[str, Any] | None] = {}
    for c in contenders:
        good = [r for r in c.records if r.get("ok") and r.get("rate") is not None]
        stats[c.name] = _spread([float(r["rate"]) for r in good])
    for c in contenders:
        recs = c.records
        first = recs[0] if recs else {}
        spread = stats[c.name]
        ok = bool(recs) and all(r.get("ok") for r in recs)
        entry: dict[str, Any] = {
            "name": c.name, "workload": c.workload, "section": c.section, "kind": c.kind, "label": c.label,
            "peer": first.get("peer"), "variant": first.get("variant"), "unit": first.get("unit"),
            "ok": ok, "reps": len(recs), "ok_reps": sum(1 for r in recs if r.get("ok")),
            "median": spread["median"] if spread else None,
            "min": spread["min"] if spread else None,
            "max": spread["max"] if spread else None,
            "params": first.get("params", {}),
        }
        figures = [r["figures"] for r in recs if r.get("ok") and r.get("figures")]
        if figures:
            entry["figures"] = {k: _spread([f[k] for f in figures]) for k in figures[0]}
        errors = [r["error"] for r in recs if r.get("error")]
        if errors:
            entry["errors"] = errors
        ratios: dict[str, Any] = {}
        for other in c.compare:
            theirs = stats.get(other)
            if other not in by_name:
                continue
            if spread is None or theirs is None or not theirs["median"] or not theirs["min"]:
                ratios[other] = None
                continue
            ratios[other] = {"ratio": spread["median"] / theirs["median"],
                             "min": spread["min"] / theirs["max"], "max": spread["max"] / theirs["min"]}
        if c.compare:
            entry["ratios"] = ratios
        if c.target is not None:
            entry["target"] = {"value": c.target.value, "op": c.target.op, "text": c.target.text,
                               "met": ok and c.target.met(entry["median"])}
        skipped = [r["skipped"] for r in recs if r.get("skipped")]
        if skipped:
            entry["skipped"] = skipped[0]
        memory = _memory_spread([r["memory"] for r in recs if r.get("ok") and r.get("memory")])
        if memory:
            entry["memory"] = memory
        if c.memory_bound is not None:
            entry["memory_bound"] = _memory_bound(c.memory_bound, ok, memory, by_name.get(c.memory_bound.against))
        if c.ratio_targets:
            entry["ratio_targets"] = []
            for rt in c.ratio_targets:
                got = ratios.get(rt.against)
                ratio = got["ratio"] if got else None
                entry["ratio_targets"].append({"against": rt.against, "value": rt.value, "text": rt.text,
                                               "ratio": ratio, "met": ok and rt.met(ratio)})
        entry["runs"] = recs
        rows.append(entry)
    return rows


# ============================================================================== environment facts
def _versions(plot: bool) -> dict[str, Any]:
    from importlib import metadata

    from runtime._version import __version__

    out: dict[str, Any] = {"shmflow": __version__, "python": sys.version.split()[0]}
    for dist in ("numpy", "pyzmq", "msgpack", "cloudpickle", "rich", "duckdb", *(("matplotlib",) if plot else ())):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    with contextlib.suppress(Exception):
        import zmq

        out["libzmq"] = zmq.zmq_version()
    return out


def git_sha() -> str | None:
    """HEAD of the git checkout this package runs from (``+dirty`` if it has changes), or None."""
    root = Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode or Path(top.stdout.strip()).resolve() != root:
            return None
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


@contextlib.contextmanager
def _hashseed_zero() -> Iterator[None]:
    """PYTHONHASHSEED=0 for every process started inside (W3 partitions by hash(word))."""
    saved = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = saved


# ============================================================================== output
_SCALE_UNITS = {"records/s": (1e6, "M records/s"), "words/s": (1e6, "M words/s"), "pairs/s": (1e3, "k pairs/s")}


def _display(value: float | None, unit: str | None) -> tuple[str, str]:
    """(number, unit) for the table: records/s in millions, pairs/s in thousands."""
    div, shown = _SCALE_UNITS.get(unit or "", (1.0, unit or ""))
    if value is None:
        return "—", shown
    v = value / div
    return (f"{v:,.3g}" if v < 100 else f"{v:,.0f}"), shown


def render_table(rows: list[dict[str, Any]], console: Any, title: str) -> None:
    """The results table: one row per contender, grouped by section; baseline rows carry shmflow's ratio."""
    from rich.table import Table

    wide = console.width >= 150
    table = Table(title=title, header_style="bold", title_justify="left")
    table.add_column("section")
    table.add_column("contender")
    if wide:
        table.add_column("variant", overflow="fold", max_width=70)
    for col in ("median", "min – max"):
        table.add_column(col, justify="right")
    table.add_column("unit")
    table.add_column("shmflow ÷ this", justify="right")
    table.add_column("target")
    table.add_column("ok", justify="center")
    # ratio cells: for each baseline, the ratios of the shmflow contenders that compare against it
    ratio_cells: dict[str, list[tuple[str, str]]] = {}
    section_of = {r["name"]: r["section"] for r in rows}
    for r in rows:
        for other, ratio in (r.get("ratios") or {}).items():
            text = "—" if ratio is None else f"{ratio['ratio']:.2f}×"
            tag = r["label"].removeprefix("shmflow ")
            if section_of.get(other) != r["section"]:
                tag += f" ({r['section']})"
            ratio_cells.setdefault(other, []).append((tag, text))
    last_section = None
    sections = list(dict.fromkeys(r["section"] for r in rows))  # interleaved contenders: grouped for display
    for r in sorted(rows, key=lambda r: sections.index(r["section"])):
        new_section = r["section"] != last_section
        if last_section is not None and new_section:
            table.add_section()
        last_section = r["section"]
        med, unit = _display(r["median"], r["unit"])
        lo, _ = _display(r["min"], r["unit"])
        hi, _ = _display(r["max"], r["unit"])
        spread = "—" if r["min"] is None else f"{lo} – {hi}"
        if r.get("figures") and r["workload"] == "latency":
            f = r["figures"]
            med = f"p99 {f['p99']['median']:.2f}"
            spread = f"p50 {f['p50']['median']:.2f}, max {f['max']['median']:.1f}"
        target = ""
        if "target" in r:
            t = r["target"]
            goal = f"{'≥' if t['op'] == '>=' else '≤'} {_display(t['value'], r['unit'])[0]}"
            target = f"[green]✓ {goal}[/]" if t["met"] else f"[yellow]✗ {goal}[/]"
        goals = [*r.get("ratio_targets", []), *([r["memory_bound"]] if r.get("memory_bound") else [])]
        for t in goals:
            mark = f"[green]✓ {t['text']}[/]" if t["met"] else f"[yellow]✗ {t['text']}[/]"
            target += ("\n" if target else "") + mark
        cells = ratio_cells.get(r["name"], [])
        ratio = cells[0][1] if len(cells) == 1 else "\n".join(f"{tag} {text}" for tag, text in cells)
        ok = "[green]ok[/]" if r["ok"] else "[bold red]FAIL[/]"
        if r.get("skipped") and r["median"] is None:
            ok, spread = "[yellow]skipped[/]", r["skipped"]
        row = [r["section"] if new_section else "", r["label"]]
        if wide:
            row.append(r["variant"] or "")
        row += [med, spread, unit, ratio, target, ok]
        table.add_row(*row, style="red" if not r["ok"] else ("bold" if r["kind"] == "shmflow" else None))
    console.print(table)
    render_memory_table(rows, console)
    render_recovery_table(rows, console)


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / (1 << 20):,.0f}"


def render_memory_table(rows: list[dict[str, Any]], console: Any) -> None:
    """W4's memory figures (medians over repetitions): each worker's peak RSS from inside (``VmHWM``), the
    workers' peak from outside (``RUSAGE_CHILDREN`` of the fresh process that ran the job), spilled bytes,
    GC pauses, managed memory in use, and the memory bound."""
    from rich.table import Table

    sections = list(dict.fromkeys(r["section"] for r in rows))
    mem_rows = sorted((r for r in rows if r.get("memory")), key=lambda r: sections.index(r["section"]))
    if not mem_rows:
        return
    table = Table(title="W4/W5 memory (MiB; medians over repetitions; a worker's peak RSS includes the pages of "
                        "the shared region it touched)", header_style="bold", title_justify="left")
    for col in ("contender", "worker peak RSS", "from outside", "spilled", "GC pause s", "managed peak (sum)",
                "bound", "ok"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for r in mem_rows:
        m = r["memory"]

        def med(key: str, m: dict[str, Any] = m) -> float | None:
            return (m.get(key) or {}).get("median")

        workers = (m.get("worker_peak_rss_bytes") or {}).get("median") or []
        peak = ", ".join(_mib(w) for w in workers) if workers else _mib(med("peak_rss_bytes"))
        gc = med("gc_pause_seconds")
        bound = r.get("memory_bound")
        verdict = ""
        if bound:
            verdict = "[green]✓[/]" if bound["met"] else "[yellow]✗[/]"
        table.add_row(r["label"] + ("" if r["kind"] == "shmflow" else f" ({r['kind']})"), peak,
                      _mib(med("children_maxrss_bytes")), _mib(med("spilled_bytes")),
                      "—" if gc is None else f"{gc:.2f}", _mib(med("managed_peak_bytes")),
                      _mib(bound["bound_bytes"]) if bound else "", verdict)
    console.print(table)


def render_recovery_table(rows: list[dict[str, Any]], console: Any) -> None:
    """``recovery``'s figures (medians over repetitions): each checkpointing job's checkpoints (completed, the
    last one's size and duration), and the recovery's steps from the kill to the first record again."""
    from rich.table import Table

    rec_rows = [r for r in rows if r["workload"] == "recovery" and r.get("figures")]
    if not rec_rows:
        return
    table = Table(title="recovery (medians over repetitions; steps in s: kill -> failure detected -> workers "
                        "replaced and attached -> deployed, of which restoring state -> started -> first source "
                        "record)", header_style="bold", title_justify="left")
    cols = ("contender", "checkpoints", "size MiB last / max", "duration s last / max", "detect", "replace",
            "deploy", "(restore)", "start", "first record", "total s")
    for col in cols:
        table.add_column(col, justify="left" if col == "contender" else "right")
    for r in rec_rows:
        f = r["figures"]

        def med(key: str, fmt: str = "{:.3f}", f: dict[str, Any] = f) -> str:
            spread = f.get(key)
            return "" if not spread else fmt.format(spread["median"])

        if "total_s" in f:
            size = f"{f['checkpoint_bytes']['median'] / (1 << 20):,.1f}" if f.get("checkpoint_bytes") else ""
            table.add_row(f"W5 {r['label']}", "", size, "",
                          med("detect_s"), med("replace_s"), med("deploy_s"), med("restore_s"), med("start_s"),
                          med("first_record_s"), med("total_s"))
        else:
            sizes = [f"{f[key]['median'] / (1 << 20):,.1f}" if f.get(key) else "—"
                     for key in ("checkpoint_size_bytes", "checkpoint_max_size_bytes")]
            durations = [med(key) or "—" for key in ("checkpoint_duration_seconds", "checkpoint_max_duration_seconds")]
            table.add_row(r["label"], med("checkpoints", "{:.0f}"), " / ".join(sizes), " / ".join(durations),
                          *[""] * 7)
    console.print(table)


def write_plot(rows: list[dict[str, Any]], path: str) -> None:
    """A bar chart per section: median with min–max whiskers, shmflow highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections: list[str] = []
    for r in rows:
        if r["section"] not in sections:
            sections.append(r["section"])
    fig, axes = plt.subplots(len(sections), 1, figsize=(9, 1.2 + 0.45 * len(rows) + 0.6 * len(sections)),
                             squeeze=False)
    for ax, section in zip(axes[:, 0], sections):
        group = [r for r in rows if r["section"] == section]
        labels = [r["label"] for r in group]
        med = [r["median"] or 0.0 for r in group]
        lo = [max(0.0, (r["median"] or 0) - (r["min"] or 0)) for r in group]
        hi = [max(0.0, (r["max"] or 0) - (r["median"] or 0)) for r in group]
        colors = ["tab:red" if not r["ok"] else ("tab:blue" if r["kind"] == "shmflow" else
                  ("tab:gray" if r["kind"] == "ceiling" else "tab:orange")) for r in group]
        ax.barh(range(len(group)), med, xerr=[lo, hi], color=colors, capsize=3)
        ax.set_yticks(range(len(group)), labels)
        ax.invert_yaxis()
        unit = group[0]["unit"] or ""
        ax.set_xlabel(f"{section} [{unit}]" + (" (p99, lower is better)" if section == "latency" else ""))
        for r in group:
            if r.get("target"):
                ax.axvline(r["target"]["value"], color="tab:green", linestyle="--", linewidth=1)
    fig.suptitle("shmflow bench: median of repetitions, min–max whiskers (blue: shmflow, orange: baseline, "
                 "gray: ceiling)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================== the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``shmflow bench`` arguments (also used by ``python -m runtime.bench.runner``)."""
    parser.add_argument("workload", nargs="?", default="all", choices=CHOICES,
                        help="what to run (default: all)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="worker processes of the W2/W3/latency jobs (default 2; W1 is always 1 -> 1)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of under a minute: small volumes, one repetition")
    parser.add_argument("--reps", type=int, default=None, metavar="N",
                        help=f"repetitions per contender (default {REPS}; 1 with --quick)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write every figure and parameter as JSON")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help=f"write a bar chart (needs matplotlib: {PLOT_HINT})")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help=argparse.SUPPRESS)
    # tests: tiny volumes, and a hook that corrupts the answer of contenders whose name contains NAME
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--corrupt", default=None, metavar="NAME", help=argparse.SUPPRESS)


def run(args: argparse.Namespace, *, console: Any = None) -> int:
    """Run ``shmflow bench`` as parsed by :func:`add_arguments`; returns the exit status."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = console or Console()
    if not console.is_terminal and console.width < 130:
        console.width = 130  # piped into a file: do not squeeze the table into 80 columns
    err = Console(stderr=True)
    if args.workers is not None and args.workers < 1:
        print("shmflow bench: --workers must be >= 1", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"shmflow bench --plot needs matplotlib, which is not installed: {PLOT_HINT}", file=sys.stderr)
            return 2
    scale = "tiny" if args.tiny else ("quick" if args.quick else "full")
    reps = args.reps if args.reps is not None else (1 if scale != "full" else REPS)
    if reps < 1:
        print("shmflow bench: --reps must be >= 1", file=sys.stderr)
        return 2
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    contenders = build_contenders(workloads, scale=scale, workers=args.workers, corrupt=args.corrupt)
    warmup = args.warmup and scale == "full"
    steps = reps * len(contenders) + (sum(c.warmup is not None for c in contenders) if warmup else 0)
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.monotonic()
    with _hashseed_zero(), Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"),
                                    BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    console=err, transient=True) as progress:
        task = progress.add_task("shmflow bench", total=steps)
        current: list[str] = []

        def on_step(what: str) -> None:
            if current:
                progress.advance(task)
            current[:] = [what]
            progress.update(task, description=what)

        run_contenders(contenders, reps=reps, warmup=warmup, on_step=on_step)
        progress.advance(task)
    wall = time.monotonic() - t0
    rows = summarize(contenders)
    ok = all(r["ok"] for r in rows)
    title = (f"shmflow bench {args.workload} ({scale}; median of {reps}, min – max; "
             f"ratio = shmflow median ÷ baseline median)")
    render_table(rows, console, title)
    for r in rows:
        if not r["ok"]:
            why = (r.get("errors") or ["no result"])[0].strip().splitlines()
            console.print(f"[bold red]FAILED[/] {r['name']}: " + " | ".join(why[-3:]), markup=True, highlight=False)
        elif r.get("skipped"):
            console.print(f"[yellow]skipped[/] {r['name']}: {r['skipped']}", markup=True, highlight=False)
    if {"w4", "w5", "recovery"} & set(workloads) and scale == "quick":
        console.print("W4/W5 quick: N and K are a tenth of a full run's, and so is the managed memory per worker "
                      "(6.4 MiB instead of 64 MiB), so that the state still spills")
    targets = [{"name": r["name"], "label": r["label"], "section": r["section"], "target": r["target"]["text"],
                "unit": r["unit"],
                "value": (r["figures"]["p99"]["median"] if r.get("figures") and r["workload"] == "latency"
                          else r["median"]), "met": r["target"]["met"]} for r in rows if "target" in r]
    targets += [{"name": r["name"], "label": r["label"], "section": r["section"], "target": t["text"], "unit": "×",
                 "against": t["against"], "value": t["ratio"], "met": t["met"]}
                for r in rows for t in r.get("ratio_targets", [])]
    targets += [{"name": r["name"], "label": r["label"], "section": r["section"], "target": b["text"],
                 "unit": "bytes", "against": b["against"], "value": b["peak_bytes"], "bound": b["bound_bytes"],
                 "spilled_bytes": b["spilled_bytes"], "met": b["met"]}
                for r in rows if (b := r.get("memory_bound"))]
    missed = [t for t in targets if not t["met"]]
    if targets:
        names = ", ".join(f"{t['label']} {t['target']} ({t['section']})" for t in missed)
        console.print(f"targets met: {len(targets) - len(missed)} of {len(targets)}"
                      + (f"; missed: {names}" if missed else ""))
        if scale != "full":  # fixed costs (start-up of a job, its final exchange) weigh on small volumes
            console.print(f"a {scale} run: the targets are set for full runs and shown here for reference")
    console.print(f"[bold]{'ok' if ok else '[red]FAILED: a result was wrong or a run failed[/]'}[/] "
                  f"({wall:.0f} s)")
    from runtime.bench.workloads import environment

    report = {
        "schema": "shmflow-bench/1",
        "command": _command_line(args),
        "ok": ok,
        "started_at": started.isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 2),
        "params": {"workloads": workloads, "scale": scale, "quick": bool(args.quick), "tiny": bool(args.tiny),
                   "reps": reps, "workers": args.workers, "warmup": warmup, "interleaved": True,
                   "corrupt": args.corrupt, "pythonhashseed": "0"},
        "git_sha": git_sha(),
        "versions": _versions(bool(args.plot)),
        "env": environment(),
        "targets": targets,
        "results": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        console.print(f"wrote {args.json}")
    if args.plot:
        write_plot(rows, args.plot)
        console.print(f"wrote {args.plot}")
    return 0 if ok else 1


def _command_line(args: argparse.Namespace) -> str:
    parts = ["shmflow", "bench", args.workload, f"--workers {args.workers}"]
    parts += ["--quick"] * bool(args.quick) + ["--tiny"] * bool(args.tiny)
    parts += [f"--reps {args.reps}"] * (args.reps is not None)
    parts += [f"--corrupt {args.corrupt}"] * bool(args.corrupt)
    return " ".join(parts)


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.runner", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CHOICES", "Contender", "RatioTarget", "Target", "WORKLOADS", "add_arguments", "build_contenders", "git_sha",
           "main", "render_table", "run", "run_contenders", "summarize", "write_plot"]
