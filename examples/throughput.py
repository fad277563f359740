"""Columnar throughput: numpy columns through map_batches and a hash shuffle by a key column.

    python examples/throughput.py                 # 5,000,000 records, 2 workers
    python examples/throughput.py 20000000        # more records
    python examples/throughput.py 1000000 10000   # 1,000,000 records in chunks of 10,000 rows
    shmflow run examples/throughput.py --workers 3

The data is W2-like: records ``(key, value)`` with int64 keys in ``[0, 100000)``
and float64 values in ``[0, 1)``, generated inside the workers in chunks of
``chunk_rows`` rows (chunk ``i`` from its own seeded generator, so the data does
not depend on how many workers run the job). The job:

    from_generator(chunk i -> {"key": int64[], "value": float64[]})
      .map_batches(to_columns)            # the chunks of one source poll -> one batch of columns
      .key_by("key")                      # hash shuffle of whole columns: row -> subtask key % parallelism
      .map_batches(per_key_sums)          # np.bincount per batch -> {"key", "count", "sum"}
      .collect()

Chunks come from ``from_generator``, so the data is made in the workers rather
than shipped with the job; one source poll hands ``to_columns`` up to 1,000
chunks. ``map_batches`` has no end-of-input hook, so each shuffled batch emits
its own small per-key partial sums and the client adds them up (:func:`totals`).

Prints the records per second (first source record to the last subtask's end,
generation included), the largest per-key sums, a check against a single-process
``np.bincount`` and the run's summary. The summary counts *source records*, which
here are chunks, not rows.

The shuffle is bound by network credits with the default two exclusive buffers
per input channel; more credits make it several times faster on 2 cores:

    shmflow run examples/throughput.py -D network.buffers-per-channel=16 -D network.floating-buffers-per-gate=32
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from runtime import StreamEnvironment

KEYS = 100_000
CHUNK_ROWS = 1_000
SEED = 20240601


@dataclass(frozen=True)
class Chunks:
    """``n`` records in chunks of ``chunk_rows`` rows: ``Chunks(n)(i)`` is chunk ``i`` (the last one may be short)."""

    n: int
    chunk_rows: int = CHUNK_ROWS
    seed: int = SEED

    @property
    def count(self) -> int:
        return -(-self.n // self.chunk_rows)

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        rows = min(self.chunk_rows, self.n - i * self.chunk_rows)
        rng = np.random.default_rng([self.seed, i])
        return {"key": rng.integers(0, KEYS, size=rows, dtype=np.int64), "value": rng.random(rows)}

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        """All records as two columns ``(keys, values)``, in chunk order (for references and checks)."""
        columns = to_columns([self(i) for i in range(self.count)])
        return columns["key"], columns["value"]


def to_columns(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A batch of chunk records -> one columnar batch (a dict of equal-length arrays)."""
    return {"key": np.concatenate([c["key"] for c in chunks]),
            "value": np.concatenate([c["value"] for c in chunks])}


def per_key_sums(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch's rows per key and value sum per key, for the keys present in it."""
    keys = batch["key"]
    counts = np.bincount(keys)
    sums = np.bincount(keys, weights=batch["value"], minlength=len(counts))
    present = np.flatnonzero(counts)
    return {"key": present, "count": counts[present], "sum": sums[present]}


def build(env: StreamEnvironment, chunks: Chunks):
    """The job over ``chunks``; returns the collect handle of per-batch partials (see :func:`totals`)."""
    return (env.from_generator(chunks, count=chunks.count, name="chunks")
               .map_batches(to_columns, name="to_columns")
               .key_by("key")
               .map_batches(per_key_sums, name="per_key_sums")
               .collect())


def totals(partials, keys: int = KEYS) -> tuple[np.ndarray, np.ndarray]:
    """Add the collected partials up: ``(counts, sums)`` per key, both of length ``keys``."""
    batches = [p for p in partials if len(p["key"])]
    if not batches:
        return np.zeros(keys, dtype=np.int64), np.zeros(keys, dtype=np.float64)
    key = np.concatenate([p["key"] for p in batches])
    counts = np.bincount(key, weights=np.concatenate([p["count"] for p in batches]), minlength=keys)
    sums = np.bincount(key, weights=np.concatenate([p["sum"] for p in batches]), minlength=keys)
    return counts.astype(np.int64), sums


def main(argv: list[str] | None = None) -> None:
    argv = [] if argv is None else argv
    n = int(argv[0]) if argv else 5_000_000
    chunk_rows = int(argv[1]) if len(argv) > 1 else CHUNK_ROWS
    chunks = Chunks(n, chunk_rows)
    env = StreamEnvironment()
    partials = build(env, chunks)
    result = env.execute("throughput")

    counts, sums = totals(partials.values())
    seconds = result.metrics["timed_seconds"]
    print(f"{int(counts.sum()):,} records in {chunks.count:,} chunks of {chunk_rows:,} rows on {env.workers} workers: "
          f"{seconds:.2f}s, {n / seconds:,.0f} records/s")
    print(f"per-key partials shipped to the client: {sum(len(p['key']) for p in partials.values()):,} rows "
          f"in {len(partials):,} batches")
    keys, values = chunks.columns()
    expected = np.bincount(keys, weights=values, minlength=KEYS)
    ok = np.array_equal(counts, np.bincount(keys, minlength=KEYS)) and np.allclose(sums, expected, rtol=1e-9, atol=0)
    print(f"per-key sums of {np.count_nonzero(counts):,} keys {'match' if ok else 'DO NOT match'} np.bincount "
          f"(largest difference {np.max(np.abs(sums - expected)):.1e})")
    for key in np.argsort(-sums, kind="stable")[:3].tolist():
        print(f"  key {key:>6}: {counts[key]:,} records, sum {sums[key]:.4f}")
    print(result.summary())
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
