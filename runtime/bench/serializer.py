"""Serializer micro-benchmark: W2-style records written + read through 32 KiB network buffers, printed as JSON.

Imports: runtime.memory (SharedRegion, BuddyAllocator), runtime.network.serializer,
runtime.bench.workloads (w2_rows, w2_columns), msgpack, numpy, the standard library.
Run as ``python -m runtime.bench.serializer [--records N] [--quick]``. Measures;
never asserts on time.

One process, no IPC: a producer loop fills buffers from a small ring of
shared-memory segments with ``BufferSerializer``; each full buffer is handed
straight to a ``BufferDeserializer`` and recycled, as a channel would. The
records are the W2 ``(int, float)`` tuples in batches of 1,000; the consumer
does the W2 row work (``acc[k] += v``) so the numbers compare with the
in-process baseline ``msgpack.packb`` / ``unpackb`` per batch, which returns
lists, not tuples, and moves no buffers. ``columnar`` sends the same records
as dicts of two 1,000-row numpy columns, consumed with ``np.add.at``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from runtime.bench.workloads import w2_columns, w2_rows
from runtime.memory import BuddyAllocator, SharedRegion
from runtime.network.serializer import BufferDeserializer, BufferSerializer

BATCH = 1000
BUFFER_SIZE = 32 << 10
KEYS = 100_000


def _roundtrip(batches: list[Any], views: list[memoryview], consume: Callable[[Any], None], *,
               write: str) -> float:
    """Write every batch, feeding each full buffer to a reader at once; returns seconds."""
    ser = BufferSerializer()
    des = BufferDeserializer("bench")
    feed = des.feed
    ring = len(views)
    i = 0
    start = time.perf_counter()
    ser.set_buffer(views[0])
    writer = getattr(ser, write)
    for batch in batches:
        result = writer(batch)
        while result.is_full_buffer:
            for item in feed(views[i % ring], ser.position):
                consume(item)
            i += 1
            if result.is_full_record:
                ser.set_buffer(views[i % ring])
                break
            result = ser.continue_into(views[i % ring])
    if ser.position:
        for item in feed(views[i % ring], ser.position):
            consume(item)
    des.finish()
    return time.perf_counter() - start


def _write_only(batches: list[Any], views: list[memoryview]) -> tuple[float, list[int]]:
    ser = BufferSerializer()
    sizes: list[int] = []
    ring = len(views)
    start = time.perf_counter()
    ser.set_buffer(views[0])
    for batch in batches:
        result = ser.write_records(batch)
        while result.is_full_buffer:
            sizes.append(ser.position)
            if result.is_full_record:
                ser.set_buffer(views[len(sizes) % ring])
                break
            result = ser.continue_into(views[len(sizes) % ring])
    sizes.append(ser.position)
    return time.perf_counter() - start, sizes


def run(records: int = 1_000_000, repeats: int = 3) -> dict[str, Any]:
    rows = w2_rows(records)
    keys, values = w2_columns(records)
    row_batches = [rows[i: i + BATCH] for i in range(0, records, BATCH)]
    col_batches = [{"key": keys[i: i + BATCH], "value": values[i: i + BATCH]} for i in range(0, records, BATCH)]
    expected = np.bincount(keys, weights=values, minlength=KEYS)
    results: dict[str, dict[str, float]] = {}

    def summary(name: str, seconds: list[float]) -> None:
        rates = [records / s for s in seconds]
        results[name] = {"records_per_s": statistics.median(rates), "min": min(rates), "max": max(rates)}

    with SharedRegion.create(64 << 20) as region:
        alloc = BuddyAllocator(region, min_block=4096)
        segments = [alloc.allocate(BUFFER_SIZE) for _ in range(64)]
        views = [seg.view() for seg in segments]
        try:
            # rows: write + read + W2 row consumer
            times = []
            for _ in range(repeats):
                acc = [0.0] * KEYS

                def consume_rows(batch: Any, acc: list[Any] = acc) -> None:
                    for k, v in batch:
                        acc[k] += v
                times.append(_roundtrip(row_batches, views, consume_rows, write="write_records"))
            if not np.allclose(acc, expected, rtol=1e-9, atol=1e-9):
                raise AssertionError("row round trip lost or changed records")
            summary("rows_write_read_consume", times)

            # rows: write + read only (no consumer work)
            times = [_roundtrip(row_batches, views, lambda b: None, write="write_records") for _ in range(repeats)]
            summary("rows_write_read", times)

            # rows: write only, then read only (buffers kept as bytes)
            wtimes, rtimes = [], []
            for _ in range(repeats):
                wt, sizes = _write_only(row_batches, [memoryview(bytearray(BUFFER_SIZE)) for _ in range(1)])
                wtimes.append(wt)
            summary("rows_write_only", wtimes)
            blobs = _serialized(row_batches)
            for _ in range(repeats):
                des = BufferDeserializer("bench")
                start = time.perf_counter()
                for blob, n in blobs:
                    des.feed(blob, n)
                rtimes.append(time.perf_counter() - start)
            summary("rows_read_only", rtimes)

            # columnar: write + read (zero-copy views) + np.add.at consumer
            times = []
            for _ in range(repeats):
                cacc = np.zeros(KEYS)

                def consume_cols(batch: Any, cacc: np.ndarray = cacc) -> None:
                    np.add.at(cacc, batch["key"], batch["value"])
                times.append(_roundtrip(col_batches, views, consume_cols, write="write_batch"))
            if not np.allclose(cacc, expected, rtol=1e-9, atol=1e-9):
                raise AssertionError("columnar round trip lost or changed records")
            summary("columnar_write_read_consume", times)
        finally:
            del views
            for seg in segments:
                seg.free()

    # in-process baseline: one packb + one unpackb per batch of 1,000 (lists come back, not tuples)
    times = []
    for _ in range(repeats):
        acc = [0.0] * KEYS
        packb, unpackb = msgpack.packb, msgpack.unpackb
        start = time.perf_counter()
        for batch in row_batches:
            for k, v in unpackb(packb(batch)):
                acc[k] += v
        times.append(time.perf_counter() - start)
    summary("baseline_msgpack_batches_consume", times)
    results["ratio_rows_to_baseline"] = {
        "ratio": results["rows_write_read_consume"]["records_per_s"]
        / results["baseline_msgpack_batches_consume"]["records_per_s"]}
    return {
        "benchmark": "serializer",
        "unit": "records/s",
        "params": {"records": records, "batch": BATCH, "buffer_size": BUFFER_SIZE, "repeats": repeats,
                   "record": "(int, float) tuple (W2)"},
        "versions": {"python": sys.version.split()[0], "msgpack": ".".join(map(str, msgpack.version)),
                     "numpy": np.__version__},
        "results": results,
    }


def _serialized(batches: list[Any]) -> list[tuple[bytes, int]]:
    from runtime.network.serializer import pack_to_buffers
    return [(bytes(b), n) for b, n in pack_to_buffers(batches, buffer_size=BUFFER_SIZE)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.serializer", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100,000 records, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.repeats = 100_000, 1
    print(json.dumps(run(args.records, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BATCH", "BUFFER_SIZE", "KEYS", "main", "run"]
