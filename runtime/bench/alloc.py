"""Allocator micro-benchmark: allocate+free pairs per second, printed as JSON.

Imports: runtime.memory (stdlib otherwise). Run as ``shmflow bench alloc`` or
``python -m runtime.bench.alloc``. Measures; never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any

from runtime.memory import BuddyAllocator, SharedRegion


def _pairs_per_second(alloc: BuddyAllocator, sizes: list[int], *, live: int) -> float:
    """Allocate+free pairs per second with ``live`` blocks held (a steady state, not an empty heap)."""
    held = [alloc.allocate(s) for s in sizes[:live]]
    n = len(sizes)
    start = time.perf_counter()
    for i in range(live, n):
        held.append(alloc.allocate(sizes[i]))
        held.pop(i * 7919 % len(held)).free()
    elapsed = time.perf_counter() - start
    for seg in held:
        seg.free()
    return (n - live) / elapsed


def _scenarios(pairs: int, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {
        "fixed_32KiB": [32 << 10] * pairs,
        "mixed_4KiB_1MiB": [rng.choice((4 << 10, 16 << 10, 32 << 10, 256 << 10, 1 << 20)) for _ in range(pairs)],
    }


def run_scenario(scenario: str, pairs: int, region_bytes: int = 256 << 20, min_block: int = 4096,
                 seed: int = 1) -> dict[str, Any]:
    """One repetition of one scenario: ``{"pairs_per_s": ...}`` (``shmflow bench`` runs it in a fresh
    process, as every other contender, so that no other workload's heap slows the collector)."""
    sizes = _scenarios(pairs, seed)[scenario]
    with SharedRegion.create(region_bytes) as region:
        alloc = BuddyAllocator(region, min_block=min_block)
        rate = _pairs_per_second(alloc, sizes, live=64)
        alloc.check_invariants()
    return {"pairs_per_s": rate}


def run(pairs: int = 200_000, repeats: int = 3, region_bytes: int = 256 << 20, min_block: int = 4096,
        seed: int = 1) -> dict[str, Any]:
    scenarios = _scenarios(pairs, seed)
    results = {}
    with SharedRegion.create(region_bytes) as region:
        alloc = BuddyAllocator(region, min_block=min_block)
        for name, sizes in scenarios.items():
            rates = [_pairs_per_second(alloc, sizes, live=64) for _ in range(repeats)]
            results[name] = {
                "pairs_per_s": statistics.median(rates),
                "min": min(rates),
                "max": max(rates),
            }
        alloc.check_invariants()
    return {
        "benchmark": "alloc",
        "unit": "allocate+free pairs/s",
        "params": {"pairs": pairs, "repeats": repeats, "region_bytes": region_bytes, "min_block": min_block,
                   "live_blocks": 64},
        "python": sys.version.split()[0],
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shmflow bench alloc", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20,000 pairs, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.repeats = 20_000, 1
    print(json.dumps(run(args.pairs, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "run", "run_scenario"]
