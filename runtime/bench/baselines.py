"""The baselines ``shmflow bench`` runs beside shmflow: W1/W2/W3 over multiprocessing, raw pyzmq, a shm ring; W4
in one process (a dict, numpy) and in DuckDB (optional).

Imports: runtime.bench.workloads, runtime.memory (SharedRegion), numpy, pyzmq, msgpack, the standard library;
duckdb lazily, in W4's DuckDB child (optional: that baseline is skipped without it).

Each public ``w*_`` function runs ONE repetition in fresh processes of the
``spawn`` context and returns one result record (see
:func:`runtime.bench.workloads.record`): ``workload, peer, variant, params,
seconds, rate, unit, ok`` plus a secondary rate. Timing follows WORKLOADS.md:
``time.monotonic()``; the clock starts in the producer right before its first
send, after every process has passed a ready Barrier; it stops in the consumer
when it has done its work on the last item. Process start, imports and input
generation are outside. Every run checks its output; a wrong result, or a
child that failed, gives ``ok: False`` (with ``error``), never an exception.

``quick=True`` runs smaller volumes (W1 256 MiB, W2 500k records, W3 the first
1/10 of the corpus lines) for smoke runs; the ``total_bytes`` / ``n`` /
``lines`` keywords shrink them further for tests.

Resources: zmq endpoints are abstract (``ipc://@shmflow-bench-...``, no files),
every socket has linger 0, the one shared-memory block (the ring) is a
:class:`SharedRegion` (``shmflow-`` prefix, unlinked in ``finally``, never
registered with a child's resource tracker), and every child is joined, or
terminated in ``finally``.

Run ``python -m runtime.bench.baselines [--quick]`` to print one JSON line per
baseline. Measures; never asserts on time.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import multiprocessing
import os
import queue
import secrets
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from runtime.bench.workloads import (
    MASK64,
    W1_BUFFER_SIZES,
    W1_QUICK_BYTES,
    W1_RING_BYTES,
    W1_TOTAL_BYTES,
    W1_WINDOW,
    W2_BATCH,
    W2_KEYS,
    W2_N,
    W2_QUICK_N,
    W3_BATCH,
    W3_WORKERS,
    W4_K,
    W4_N,
    W4_STRIDE,
    MiB,
    clock,
    environment,
    record,
    w1_check_size,
    w1_expected_checksum,
    w1_nbufs,
    w1_pool,
    w1_record,
    w1_slice,
    w1_touch,
    w2_check,
    w2_columnar_consume,
    w2_columns,
    w2_expected,
    w2_record,
    w2_row_consume,
    w2_rows,
    w3_check,
    w3_corpus_text,
    w3_generate,
    w3_line_ranges,
    w3_merge,
    w3_record,
    w3_reference,
    w4_checksum_columns,
    w4_dict_baseline,
    w4_expected,
    w4_key_index,
    w4_record,
    w4_scale,
)

SPAWN = multiprocessing.get_context("spawn")

#: Seconds a run may take before it is abandoned (the slowest full run takes ~15 s).
RUN_TIMEOUT = 600.0
#: Seconds a child waits at the ready barrier for its siblings (spawn + numpy import + input).
READY_TIMEOUT = 120.0
#: Records sent one by one in the "one record per put" variant (10x fewer than W2's N: it is slow).
W2_PER_RECORD_N = 500_000
W2_PER_RECORD_QUICK_N = 50_000
#: W2's in-flight bound in messages (as W1's): Queue maxsize, zmq HWM.
W2_WINDOW = 64
#: Array size of the DRAM bandwidth ceiling.
CEILING_DRAM_BYTES = 256 * MiB


class _ChildFailed(Exception):
    """A child raised, died or never answered; the message says which and why."""


# ============================================================================== process plumbing
def _child_main(role: str, results: Any, target: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    """Body of every child: run ``target(*args)`` and send ``(role, ok, payload)`` to the driver."""
    try:
        profile_dir = os.environ.get("SHMFLOW_INTERNAL_PROFILE")
        if profile_dir:  # a development aid: cProfile each child, one file per role and process
            import cProfile
            box: dict[str, Any] = {}
            cProfile.runctx("box['out'] = target(*args)", {}, {"box": box, "target": target, "args": args},
                            os.path.join(profile_dir, f"bench-{role}-{os.getpid()}.prof"))
            payload = box["out"]
        else:
            payload = target(*args)
    except BaseException:  # noqa: BLE001 - reported to the driver, which fails the run
        results.put((role, False, traceback.format_exc()))
        raise SystemExit(1) from None
    results.put((role, True, payload))


def _run_children(children: list[tuple[str, Callable[..., dict[str, Any]], tuple[Any, ...]]], *,
                  timeout: float = RUN_TIMEOUT) -> dict[str, dict[str, Any]]:
    """Start one spawn process per ``(role, target, args)``, collect each one's result dict, join them all.

    Raises:
        _ChildFailed: a child raised or exited without a result, or ``timeout`` passed.
    """
    results = SPAWN.Queue()
    procs = [SPAWN.Process(target=_child_main, args=(role, results, target, args),
                           name=f"shmflow-bench-{role}", daemon=True)
             for role, target, args in children]
    try:
        for proc in procs:
            proc.start()
        got: dict[str, dict[str, Any]] = {}
        deadline = clock() + timeout
        while len(got) < len(procs):
            try:
                role, ok, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                if not dead and clock() <= deadline:
                    continue
                try:  # a child that failed may have exited just after sending why
                    role, ok, payload = results.get(timeout=1.0)
                except queue.Empty:
                    why = f"{', '.join(dead)} died without a result" if dead else f"no result after {timeout:.0f} s"
                    raise _ChildFailed(why) from None
            if not ok:
                raise _ChildFailed(f"{role} failed:\n{payload}")
            got[role] = payload
        for proc in procs:
            proc.join(30)
        return got
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            if proc.exitcode is not None:
                proc.close()
        results.close()
        results.join_thread()


def _failed(workload: str, peer: str, variant: str, params: dict[str, Any], unit: str, error: str) -> dict[str, Any]:
    """The record of a run that produced no trustworthy result."""
    return {"workload": workload, "peer": peer, "variant": variant, "params": params, "seconds": None,
            "rate": None, "unit": unit, "ok": False, "error": error}


def _zmq_endpoint() -> str:
    """A fresh abstract-namespace ipc endpoint (no socket file to leak)."""
    return f"ipc://@shmflow-bench-{os.getpid()}-{secrets.token_hex(6)}"


def _socket(ctx: Any, kind: int, hwm: int) -> Any:
    import zmq

    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    return sock


@functools.lru_cache(maxsize=1)
def _driver_pool() -> np.ndarray:
    return w1_pool()


@functools.lru_cache(maxsize=8)
def _w1_expected(buf_bytes: int, nbufs: int) -> int:
    return w1_expected_checksum(_driver_pool(), buf_bytes, nbufs)


def _w1_volume(buf_bytes: int, quick: bool, total_bytes: int | None) -> int:
    w1_check_size(buf_bytes)
    total = total_bytes if total_bytes is not None else (W1_QUICK_BYTES if quick else W1_TOTAL_BYTES)
    nbufs = w1_nbufs(buf_bytes, total)
    if nbufs <= 0:
        raise ValueError(f"W1 volume {total} B holds no buffer of {buf_bytes} B")
    return nbufs


def _w1_finish(peer: str, variant: str, buf_bytes: int, nbufs: int, params: dict[str, Any],
               children: list[tuple[str, Callable[..., dict[str, Any]], tuple[Any, ...]]]) -> dict[str, Any]:
    """Run a producer/consumer pair and turn their timestamps and checksum into a W1 record."""
    try:
        out = _run_children(children)
    except _ChildFailed as exc:
        full_params = {"buf_bytes": buf_bytes, "nbufs": nbufs, "total_bytes": buf_bytes * nbufs, **params}
        return _failed("W1", peer, variant, full_params, "GB/s", str(exc))
    cons = out["consumer"]
    seconds = cons["t_end"] - out["producer"]["t_start"]
    expected = _w1_expected(buf_bytes, nbufs)
    ok = cons["count"] == nbufs and cons["checksum"] == expected
    extra = {} if ok else {"error": f"checksum {cons['checksum']} over {cons['count']} buffers, "
                                    f"expected {expected} over {nbufs}"}
    return w1_record(peer, variant, buf_bytes, nbufs, seconds, ok, params=params, **extra)


# ============================================================================== W1 multiprocessing.Queue
def _w1_queue_producer(q: Any, barrier: Any, buf_bytes: int, nbufs: int) -> dict[str, Any]:
    pool = w1_pool()
    barrier.wait(READY_TIMEOUT)
    t_start = clock()
    put = q.put
    for i in range(nbufs):
        put(w1_slice(pool, i, buf_bytes))  # pickled (a copy of the slice) by the feeder thread
    put(None)
    return {"t_start": t_start}


def _w1_queue_consumer(q: Any, barrier: Any) -> dict[str, Any]:
    barrier.wait(READY_TIMEOUT)
    get = q.get
    acc = count = 0
    while (buf := get()) is not None:
        acc = (acc + w1_touch(buf)) & MASK64
        count += 1
    return {"t_end": clock(), "checksum": acc, "count": count}


def w1_mp_queue(buf_bytes: int, *, quick: bool = False, total_bytes: int | None = None) -> dict[str, Any]:
    """W1 over ``multiprocessing.Queue(maxsize=64)``: the producer puts ndarray slices, the consumer sums them."""
    nbufs = _w1_volume(buf_bytes, quick, total_bytes)
    q = SPAWN.Queue(maxsize=W1_WINDOW)
    barrier = SPAWN.Barrier(2)
    try:
        return _w1_finish("multiprocessing.Queue", f"ndarray per put, maxsize {W1_WINDOW}", buf_bytes, nbufs,
                          {"window": W1_WINDOW, "quick": quick},
                          [("producer", _w1_queue_producer, (q, barrier, buf_bytes, nbufs)),
                           ("consumer", _w1_queue_consumer, (q, barrier))])
    finally:
        q.close()
        q.join_thread()


# ============================================================================== W1 pyzmq PUSH/PULL
def _w1_zmq_producer(endpoints: Any, barrier: Any, done: Any, buf_bytes: int, nbufs: int) -> dict[str, Any]:
    import zmq

    ctx = zmq.Context()
    sock = _socket(ctx, zmq.PUSH, W1_WINDOW)
    try:
        sock.connect(endpoints.get(timeout=READY_TIMEOUT))
        pool = w1_pool()
        barrier.wait(READY_TIMEOUT)
        t_start = clock()
        send = sock.send
        for i in range(nbufs):
            send(w1_slice(pool, i, buf_bytes), copy=False)
        send(b"")
        done.wait(RUN_TIMEOUT)  # linger 0: closing earlier would drop queued messages
        return {"t_start": t_start}
    finally:
        sock.close()
        ctx.term()


def _w1_zmq_consumer(endpoint: str, endpoints: Any, barrier: Any, done: Any) -> dict[str, Any]:
    import zmq

    ctx = zmq.Context()
    sock = _socket(ctx, zmq.PULL, W1_WINDOW)
    try:
        sock.bind(endpoint)
        endpoints.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))  # tcp: with the port the kernel chose
        barrier.wait(READY_TIMEOUT)
        recv = sock.recv
        acc = count = 0
        while len(frame := recv(copy=False)):
            acc = (acc + w1_touch(frame.buffer)) & MASK64
            count += 1
        t_end = clock()
        done.set()
        return {"t_end": t_end, "checksum": acc, "count": count}
    finally:
        sock.close()
        ctx.term()


def w1_zmq(buf_bytes: int, *, quick: bool = False, total_bytes: int | None = None,
           transport: str = "ipc") -> dict[str, Any]:
    """W1 over raw pyzmq PUSH/PULL, HWM 64, ``copy=False`` sends and receives: on an abstract ipc
    endpoint, or (``transport="tcp"``) over tcp loopback, the baseline of shmflow's tcp channel (run
    with the same buffer size and volume).

    pyzmq copies messages below ``copy_threshold`` (64 KiB) even with
    ``copy=False``, so only the 1 MiB run is zero-copy on the send side.
    """
    import zmq

    if transport not in ("ipc", "tcp"):
        raise ValueError(f"transport must be 'ipc' or 'tcp'; got {transport!r}")
    nbufs = _w1_volume(buf_bytes, quick, total_bytes)
    endpoint = _zmq_endpoint() if transport == "ipc" else "tcp://127.0.0.1:*"
    endpoints = SPAWN.Queue()
    barrier = SPAWN.Barrier(2)
    done = SPAWN.Event()
    zero_copy = buf_bytes >= zmq.COPY_THRESHOLD
    variant = (f"PUSH/PULL {'tcp loopback' if transport == 'tcp' else 'ipc'}, hwm {W1_WINDOW}, "
               + ("zero-copy send" if zero_copy else "copy=False (copied: < 64 KiB)"))
    if transport == "tcp":
        variant += f", {nbufs * buf_bytes >> 20} MiB"
    try:
        return _w1_finish("pyzmq", variant, buf_bytes, nbufs,
                          {"hwm": W1_WINDOW, "zero_copy_send": zero_copy, "quick": quick, "pyzmq": zmq.__version__,
                           "transport": transport},
                          [("producer", _w1_zmq_producer, (endpoints, barrier, done, buf_bytes, nbufs)),
                           ("consumer", _w1_zmq_consumer, (endpoint, endpoints, barrier, done))])
    finally:
        endpoints.close()
        endpoints.join_thread()


# ============================================================================== W1 hand-rolled shm ring
def _ring_slots(region: Any, buf_bytes: int, nslots: int) -> np.ndarray:
    return np.frombuffer(region.buf, dtype=np.uint64, count=nslots * buf_bytes // 8).reshape(nslots, -1)


def _w1_ring_producer(region_name: str, data_out: Any, credits_in: Any, barrier: Any, done: Any,
                      buf_bytes: int, nbufs: int, nslots: int) -> dict[str, Any]:
    from runtime.memory import SharedRegion

    region = SharedRegion.attach(region_name)
    slots = _ring_slots(region, buf_bytes, nslots)
    try:
        pool = w1_pool()
        barrier.wait(READY_TIMEOUT)
        t_start = clock()
        send, recv = data_out.send_bytes, credits_in.recv_bytes
        credits = nslots
        for i in range(nbufs):
            while not credits:
                credits += int.from_bytes(recv(), "little")
            np.copyto(slots[i % nslots], w1_slice(pool, i, buf_bytes))
            send(b"\x01")  # "slot i % nslots is full"
            credits -= 1
        send(b"")  # end of stream
        done.wait(RUN_TIMEOUT)  # keep the credit pipe's read end open until the consumer is through
        return {"t_start": t_start}
    finally:
        del slots
        region.close()


def _w1_ring_consumer(region_name: str, data_in: Any, credits_out: Any, barrier: Any, done: Any,
                      buf_bytes: int, nslots: int, credit_every: int) -> dict[str, Any]:
    from runtime.memory import SharedRegion

    region = SharedRegion.attach(region_name)
    slots = _ring_slots(region, buf_bytes, nslots)
    try:
        barrier.wait(READY_TIMEOUT)
        recv, send = data_in.recv_bytes, credits_out.send_bytes
        grant = credit_every.to_bytes(4, "little")
        acc = count = pending = 0
        while recv():
            acc = (acc + w1_touch(slots[count % nslots])) & MASK64
            count += 1
            pending += 1
            if pending == credit_every:
                send(grant)
                pending = 0
        t_end = clock()
        done.set()
        return {"t_end": t_end, "checksum": acc, "count": count}
    finally:
        del slots
        region.close()


def w1_shm_ring(buf_bytes: int, *, quick: bool = False, total_bytes: int | None = None) -> dict[str, Any]:
    """W1 through an 8 MiB shared-memory ring of slots, with a Pipe for "full" notices and one for credits.

    The producer copies buffer i into slot ``i mod slots`` and sends one byte;
    the consumer sums the slot in place and returns credits every
    ``min(64, slots/2)`` buffers (64 for 256 x 32 KiB, 4 for 8 x 1 MiB).
    """
    from runtime.memory import SharedRegion

    nbufs = _w1_volume(buf_bytes, quick, total_bytes)
    nslots = W1_RING_BYTES // buf_bytes
    credit_every = max(1, min(W1_WINDOW, nslots // 2))
    barrier = SPAWN.Barrier(2)
    done = SPAWN.Event()
    data_in, data_out = SPAWN.Pipe(duplex=False)
    credits_in, credits_out = SPAWN.Pipe(duplex=False)
    region = None
    try:
        region = SharedRegion.create(W1_RING_BYTES, sweep_dead=False)
        return _w1_finish(
            "shm ring + Pipe", f"{nslots} x {buf_bytes // 1024} KiB slots, credit every {credit_every}",
            buf_bytes, nbufs, {"slots": nslots, "credit_every": credit_every, "quick": quick},
            [("producer", _w1_ring_producer,
              (region.name, data_out, credits_in, barrier, done, buf_bytes, nbufs, nslots)),
             ("consumer", _w1_ring_consumer,
              (region.name, data_in, credits_out, barrier, done, buf_bytes, nslots, credit_every))])
    finally:
        for conn in (data_in, data_out, credits_in, credits_out):
            conn.close()
        if region is not None:
            region.close()


# ============================================================================== W1 single-core ceilings
def _w1_inproc_child(buf_bytes: int, nbufs: int, nslots: int) -> dict[str, Any]:
    pool = w1_pool()
    slots = np.empty((nslots, buf_bytes // 8), dtype=np.uint64)
    slots[:] = 1  # fault the pages in before the clock
    acc = 0
    t_start = clock()
    for i in range(nbufs):
        slot = slots[i % nslots]
        np.copyto(slot, w1_slice(pool, i, buf_bytes))
        acc = (acc + w1_touch(slot)) & MASK64
    t_end = clock()
    return {"t_start": t_start, "t_end": t_end, "checksum": acc, "count": nbufs}


def w1_inproc(buf_bytes: int, *, quick: bool = False, total_bytes: int | None = None) -> dict[str, Any]:
    """Ceiling: the shm ring's work (copy into one of 8 MiB of slots, then sum it) in one process, no IPC."""
    nbufs = _w1_volume(buf_bytes, quick, total_bytes)
    nslots = W1_RING_BYTES // buf_bytes
    variant = f"copy into a slot + sum, one process ({nslots} x {buf_bytes // 1024} KiB private slots)"
    params = {"slots": nslots, "quick": quick}
    full_params = {"buf_bytes": buf_bytes, "nbufs": nbufs, "total_bytes": buf_bytes * nbufs, **params}
    try:
        out = _run_children([("inproc", _w1_inproc_child, (buf_bytes, nbufs, nslots))])["inproc"]
    except _ChildFailed as exc:
        return _failed("W1", "ceiling", variant, full_params, "GB/s", str(exc))
    expected = _w1_expected(buf_bytes, nbufs)
    ok = out["checksum"] == expected
    extra = {} if ok else {"error": f"checksum {out['checksum']}, expected {expected}"}
    return w1_record("ceiling", variant, buf_bytes, nbufs, out["t_end"] - out["t_start"], ok,
                     params=params, **extra)


def _w1_bandwidth_child(op: str, array_bytes: int, reps: int) -> dict[str, Any]:
    words = array_bytes // 8
    src = np.arange(words, dtype=np.uint64)
    expected_sum = (words * (words - 1) // 2) & MASK64
    if op == "copy":
        dst = np.zeros(words, dtype=np.uint64)
        np.copyto(dst, src)  # warm: faults dst in, brings hot arrays into cache
        dst[:] = 0
        t_start = clock()
        for _ in range(reps):
            np.copyto(dst, src)
        t_end = clock()
        ok = bool(np.array_equal(dst, src))
    else:
        total = src.sum(dtype=np.uint64)  # warm
        t_start = clock()
        for _ in range(reps):
            total = src.sum(dtype=np.uint64)
        t_end = clock()
        ok = int(total) == expected_sum
    return {"t_start": t_start, "t_end": t_end, "ok": ok}


def w1_memory_bandwidth(op: str, array_bytes: int, *, quick: bool = False,
                        total_bytes: int | None = None) -> dict[str, Any]:
    """Ceiling: single-core ``np.copyto`` (``op="copy"``, bytes copied/s) or ``np.sum`` (``op="sum"``, bytes read/s).

    ``array_bytes`` 256 MiB measures DRAM; 32 KiB and 1 MiB measure hot
    (cache-resident) arrays. The same array is processed until the W1 volume
    (at least one pass) has gone through, after one untimed warm-up pass.
    """
    if op not in ("copy", "sum"):
        raise ValueError(f"op must be 'copy' or 'sum'; got {op!r}")
    if array_bytes <= 0 or array_bytes % 8:
        raise ValueError(f"array_bytes must be a positive multiple of 8; got {array_bytes}")
    total = total_bytes if total_bytes is not None else (W1_QUICK_BYTES if quick else W1_TOTAL_BYTES)
    reps = max(1, total // array_bytes)
    what = "DRAM" if array_bytes >= 64 * MiB else "hot"
    name = "np.copyto" if op == "copy" else "np.sum(dtype=uint64)"
    size = f"{array_bytes // MiB} MiB" if array_bytes >= MiB else f"{array_bytes // 1024} KiB"
    variant = f"{name}, {size} array ({what}), one core"
    params = {"array_bytes": array_bytes, "reps": reps, "op": op, "quick": quick}
    try:
        out = _run_children([("bandwidth", _w1_bandwidth_child, (op, array_bytes, reps))])["bandwidth"]
    except _ChildFailed as exc:
        return _failed("W1", "ceiling", variant, params, "GB/s", str(exc))
    seconds = out["t_end"] - out["t_start"]
    return record("W1", "ceiling", variant, params, seconds, array_bytes * reps, "GB/s", out["ok"],
                  **({} if out["ok"] else {"error": "wrong copy or sum"}))


# ============================================================================== W2 keyed records
def _w2_n(quick: bool, n: int | None, full: int = W2_N, small: int = W2_QUICK_N) -> int:
    value = n if n is not None else (small if quick else full)
    if value <= 0:
        raise ValueError(f"W2 needs at least one record; got n={value}")
    return value


def _w2_finish(peer: str, variant: str, n: int, params: dict[str, Any],
               children: list[tuple[str, Callable[..., dict[str, Any]], tuple[Any, ...]]]) -> dict[str, Any]:
    try:
        out = _run_children(children)
    except _ChildFailed as exc:
        return _failed("W2", peer, variant, {"n": n, **params}, "records/s", str(exc))
    cons = out["consumer"]
    ok, maxerr = w2_check(cons["sums"], n, cons["count"], w2_expected(n))
    extra = {} if ok else {"error": f"{cons['count']} of {n} records; largest error {maxerr}"}
    return w2_record(peer, variant, n, cons["t_end"] - out["producer"]["t_start"], ok, maxerr,
                     params=params, **extra)


def _w2_queue_producer(q: Any, barrier: Any, n: int, batch: int) -> dict[str, Any]:
    rows = w2_rows(n)
    barrier.wait(READY_TIMEOUT)
    t_start = clock()
    put = q.put
    if batch == 1:
        for row in rows:
            put(row)
    else:
        for j in range(0, n, batch):
            put(rows[j:j + batch])
    put(None)
    return {"t_start": t_start}


def _w2_queue_consumer(q: Any, barrier: Any, batch: int) -> dict[str, Any]:
    acc = [0.0] * W2_KEYS
    count = 0
    barrier.wait(READY_TIMEOUT)
    get = q.get
    if batch == 1:
        while (row := get()) is not None:
            acc[row[0]] += row[1]
            count += 1
    else:
        while (rows := get()) is not None:
            w2_row_consume(acc, rows)
            count += len(rows)
    return {"t_end": clock(), "sums": acc, "count": count}


def w2_mp_queue_rows(*, quick: bool = False, n: int | None = None) -> dict[str, Any]:
    """W2 over ``multiprocessing.Queue(maxsize=64)``: lists of 1,000 (int, float) tuples, row-mode consumer."""
    n = _w2_n(quick, n)
    q, barrier = SPAWN.Queue(maxsize=W2_WINDOW), SPAWN.Barrier(2)
    try:
        return _w2_finish("multiprocessing.Queue", f"lists of {W2_BATCH} tuples, maxsize {W2_WINDOW}", n,
                          {"batch": W2_BATCH, "window": W2_WINDOW, "quick": quick},
                          [("producer", _w2_queue_producer, (q, barrier, n, W2_BATCH)),
                           ("consumer", _w2_queue_consumer, (q, barrier, W2_BATCH))])
    finally:
        q.close()
        q.join_thread()


def w2_mp_queue_per_record(*, quick: bool = False, n: int | None = None) -> dict[str, Any]:
    """W2 with one ``put`` per record. Slow, so N is 500,000 (quick 50,000), not 5,000,000: see ``params``."""
    n = _w2_n(quick, n, W2_PER_RECORD_N, W2_PER_RECORD_QUICK_N)
    window = W2_WINDOW * W2_BATCH
    q, barrier = SPAWN.Queue(maxsize=window), SPAWN.Barrier(2)
    try:
        return _w2_finish("multiprocessing.Queue", f"one record per put (N={n:,}, reduced), maxsize {window}", n,
                          {"batch": 1, "window": window, "reduced_n": True, "quick": quick},
                          [("producer", _w2_queue_producer, (q, barrier, n, 1)),
                           ("consumer", _w2_queue_consumer, (q, barrier, 1))])
    finally:
        q.close()
        q.join_thread()


def _w2_zmq_producer(endpoint: str, barrier: Any, done: Any, n: int, columnar: bool) -> dict[str, Any]:
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = _socket(ctx, zmq.PUSH, W2_WINDOW)
    try:
        sock.connect(endpoint)
        if columnar:
            keys, values = w2_columns(n)
        else:
            rows = w2_rows(n)
        barrier.wait(READY_TIMEOUT)
        t_start = clock()
        if columnar:
            send_multipart = sock.send_multipart
            for j in range(0, n, W2_BATCH):
                send_multipart([keys[j:j + W2_BATCH], values[j:j + W2_BATCH]], copy=False)
        else:
            send, packb = sock.send, msgpack.packb
            for j in range(0, n, W2_BATCH):
                send(packb(rows[j:j + W2_BATCH]))
        sock.send(b"")
        done.wait(RUN_TIMEOUT)
        return {"t_start": t_start}
    finally:
        sock.close()
        ctx.term()


def _w2_zmq_consumer(endpoint: str, barrier: Any, done: Any, columnar: bool) -> dict[str, Any]:
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = _socket(ctx, zmq.PULL, W2_WINDOW)
    try:
        sock.bind(endpoint)
        count = 0
        barrier.wait(READY_TIMEOUT)
        if columnar:
            sums = np.zeros(W2_KEYS, dtype=np.float64)
            recv_multipart = sock.recv_multipart
            while len((frames := recv_multipart())[0]):
                keys = np.frombuffer(frames[0], dtype=np.int64)
                w2_columnar_consume(sums, keys, np.frombuffer(frames[1], dtype=np.float64))
                count += keys.size
        else:
            acc = [0.0] * W2_KEYS
            recv, unpackb = sock.recv, msgpack.unpackb
            while msg := recv():
                rows = unpackb(msg)
                w2_row_consume(acc, rows)
                count += len(rows)
        t_end = clock()
        done.set()
        return {"t_end": t_end, "sums": sums if columnar else acc, "count": count}
    finally:
        sock.close()
        ctx.term()


def _w2_zmq(columnar: bool, quick: bool, n: int | None) -> dict[str, Any]:
    import msgpack
    import zmq

    n = _w2_n(quick, n)
    endpoint = _zmq_endpoint()
    barrier, done = SPAWN.Barrier(2), SPAWN.Event()
    if columnar:
        variant = f"raw numpy columns, {W2_BATCH} per message, columnar consumer (np.add.at)"
    else:
        variant = f"msgpack batches of {W2_BATCH} rows, row consumer"
    params = {"batch": W2_BATCH, "hwm": W2_WINDOW, "quick": quick, "pyzmq": zmq.__version__}
    if not columnar:
        params["msgpack"] = ".".join(map(str, msgpack.version))
    return _w2_finish("pyzmq", variant, n, params,
                      [("producer", _w2_zmq_producer, (endpoint, barrier, done, n, columnar)),
                       ("consumer", _w2_zmq_consumer, (endpoint, barrier, done, columnar))])


def w2_zmq_msgpack(*, quick: bool = False, n: int | None = None) -> dict[str, Any]:
    """W2 over pyzmq PUSH/PULL ipc: msgpack-encoded batches of 1,000 rows, row-mode consumer."""
    return _w2_zmq(False, quick, n)


def w2_zmq_columns(*, quick: bool = False, n: int | None = None) -> dict[str, Any]:
    """W2 over pyzmq PUSH/PULL ipc: raw int64/float64 column slices of 1,000 records, ``np.add.at`` consumer."""
    return _w2_zmq(True, quick, n)


# ============================================================================== W3 word count
_W3_INPUTS: dict[Any, tuple[str, collections.Counter[str]]] = {}


def _w3_input(quick: bool, lines: int | None) -> tuple[str, collections.Counter[str]]:
    """(corpus text, its reference Counter), cached per process: full, quick (first 1/10), or generated ``lines``."""
    key = ("lines", lines) if lines is not None else ("quick" if quick else "full")
    if key not in _W3_INPUTS:
        text = w3_generate(lines) if lines is not None else w3_corpus_text(quick=quick)
        _W3_INPUTS.clear()  # hold one corpus at a time (50 MB + its Counter)
        _W3_INPUTS[key] = (text, w3_reference(text))
    return _W3_INPUTS[key]


def _hash_facts() -> dict[str, Any]:
    return {"hash_randomization": sys.flags.hash_randomization, "hash_abc": hash("abc"),
            "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED")}


def _w3_worker(me: int, text: str, inboxes: list[Any], barrier: Any) -> dict[str, Any]:
    parts = len(inboxes)
    facts = _hash_facts()
    inbox = inboxes[me]
    barrier.wait(READY_TIMEOUT)
    t_start = clock()
    mine: list[str] = []
    outgoing: list[list[str]] = [[] for _ in range(parts)]
    words = 0
    for word in text.lower().split():  # = line.lower().split() for every line
        owner = hash(word) % parts
        if owner == me:
            mine.append(word)
        else:
            batch = outgoing[owner]
            batch.append(word)
            if len(batch) == W3_BATCH:
                inboxes[owner].put(batch)
                outgoing[owner] = []
        words += 1
    for owner in range(parts):
        if owner != me:
            if outgoing[owner]:
                inboxes[owner].put(outgoing[owner])
            inboxes[owner].put(None)  # end of my words for you
    counts = collections.Counter(mine)
    ends = 0
    while ends < parts - 1:
        batch = inbox.get()
        if batch is None:
            ends += 1
        else:
            counts.update(batch)
    t_end = clock()
    return {"t_start": t_start, "t_end": t_end, "counts": dict(counts), "words": words, **facts}


def w3_mp_queue(*, quick: bool = False, lines: int | None = None) -> dict[str, Any]:
    """W3 by 2 hand-rolled worker processes: each tokenises its half, keeps the words it owns, ships the rest.

    Worker i owns ``hash(word) % 2 == i`` (``PYTHONHASHSEED=0`` is put into
    the environment the children inherit, and each reports that hash
    randomisation is off and its ``hash("abc")``, which must agree). Foreign
    words go in lists of up to 1,000 through the owner's unbounded
    ``multiprocessing.Queue``; no pre-aggregation. words/s = all words /
    (last worker end - first worker start).
    """
    text, ref = _w3_input(quick, lines)
    total_words = sum(ref.values())
    params = {"workers": W3_WORKERS, "batch": W3_BATCH, "quick": quick,
              "lines": lines if lines is not None else ("1/10 of corpus" if quick else "full corpus")}
    peer, variant = "multiprocessing.Queue", f"hand-rolled, {W3_WORKERS} processes, hash(word) % {W3_WORKERS}"
    inboxes = [SPAWN.Queue() for _ in range(W3_WORKERS)]
    barrier = SPAWN.Barrier(W3_WORKERS)
    ranges = w3_line_ranges(text, W3_WORKERS)
    saved = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"  # spawned children inherit os.environ
    try:
        out = _run_children([(f"worker{i}", _w3_worker, (i, text[a:b], inboxes, barrier))
                             for i, (a, b) in enumerate(ranges)])
    except _ChildFailed as exc:
        return _failed("W3", peer, variant, params, "words/s", str(exc))
    finally:
        if saved is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = saved
        for q in inboxes:
            q.close()
            q.join_thread()
    workers = [out[f"worker{i}"] for i in range(W3_WORKERS)]
    merged, disjoint = w3_merge(w["counts"] for w in workers)
    hashes_agree = len({w["hash_abc"] for w in workers}) == 1 and all(w["hash_randomization"] == 0 for w in workers)
    seen = sum(w["words"] for w in workers)
    ok = hashes_agree and disjoint and seen == total_words and w3_check(merged, ref)
    seconds = max(w["t_end"] for w in workers) - min(w["t_start"] for w in workers)
    extra: dict[str, Any] = {}
    if not ok:
        extra["error"] = (f"hash randomisation off and equal in workers: {hashes_agree}; disjoint: {disjoint}; "
                          f"words {seen} of {total_words}; counts equal: {w3_check(merged, ref)}")
    return w3_record(peer, variant, total_words, seconds, ok, params=params, **extra)


def _w3_counter_child(text: str) -> dict[str, Any]:
    t_start = clock()
    counts = collections.Counter(text.lower().split())
    t_end = clock()
    return {"t_start": t_start, "t_end": t_end, "counts": dict(counts)}


def w3_counter(*, quick: bool = False, lines: int | None = None) -> dict[str, Any]:
    """W3 single-process reference: ``Counter(text.lower().split())`` on the whole text, in a fresh process."""
    text, ref = _w3_input(quick, lines)
    total_words = sum(ref.values())
    params = {"workers": 1, "quick": quick,
              "lines": lines if lines is not None else ("1/10 of corpus" if quick else "full corpus")}
    peer, variant = "one process", "Counter(text.lower().split())"
    try:
        out = _run_children([("counter", _w3_counter_child, (text,))])["counter"]
    except _ChildFailed as exc:
        return _failed("W3", peer, variant, params, "words/s", str(exc))
    ok = w3_check(out["counts"], ref)
    return w3_record(peer, variant, total_words, out["t_end"] - out["t_start"], ok, params=params,
                     **({} if ok else {"error": "counts differ from the reference"}))


# ============================================================================== W4 large keyed state, batch
#: DuckDB's settings in W4 (WORKLOADS.md): its memory limit and threads.
W4_DUCKDB_MEMORY_LIMIT = "256MB"
W4_DUCKDB_THREADS = 2
W4_DUCKDB_HINT = "pip install duckdb (or pip install -e '.[bench]')"


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _w4_dict_child(n: int, k: int) -> dict[str, Any]:
    out = w4_dict_baseline(n, k)
    return {**out, "peak_rss_bytes": _maxrss_bytes()}


def w4_dict(*, n: int = W4_N, k: int = W4_K) -> dict[str, Any]:
    """W4's reference baseline in a fresh process: ``w4_dict_baseline`` folds the row chunks into a ``dict``
    (unbounded memory), generation included in the clock. Reports its process's peak RSS."""
    peer, variant = "python dict", "one process: w4_rows chunks folded into a dict (unbounded memory)"
    params = {"n": n, "k": k, "form": "rows", "workers": 1}
    try:
        out = _run_children([("dict", _w4_dict_child, (n, k))])["dict"]
    except _ChildFailed as exc:
        return _failed("W4", peer, variant, params, "records/s", str(exc))
    extra: dict[str, Any] = {"memory": {"peak_rss_bytes": out["peak_rss_bytes"]}}
    if not out["ok"]:
        extra["error"] = "checksums differ from w4_expected"
    return w4_record(peer, variant, n, out["seconds"], out["ok"], params=params, **extra)


def _w4_numpy_child(n: int, k: int) -> dict[str, Any]:
    keys = w4_key_index(0, n, k)  # the int key column, materialised before the clock (values are all 1)
    t_start = clock()
    uniq, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse, minlength=uniq.size)
    checksums = w4_checksum_columns(uniq, sums)
    t_end = clock()
    return {"t_start": t_start, "t_end": t_end, "checksums": checksums, "peak_rss_bytes": _maxrss_bytes()}


def w4_numpy(*, n: int = W4_N, k: int = W4_K) -> dict[str, Any]:
    """W4 in numpy, one fresh process: ``np.unique(keys, return_inverse=True)`` + ``np.bincount`` over the
    int key column (materialised before the clock; the values are all 1), then the checksums."""
    peer, variant = "numpy", "one process: np.unique(return_inverse) + np.bincount, int keys materialised"
    params = {"n": n, "k": k, "form": "columns", "workers": 1}
    try:
        out = _run_children([("numpy", _w4_numpy_child, (n, k))])["numpy"]
    except _ChildFailed as exc:
        return _failed("W4", peer, variant, params, "records/s", str(exc))
    return _w4_child_record(peer, variant, params, n, k, out)


def duckdb_version() -> str | None:
    """The installed DuckDB's version, or None when it is not installed (W4's DuckDB baseline is optional)."""
    from importlib import metadata

    try:
        return metadata.version("duckdb")
    except metadata.PackageNotFoundError:
        return None


def _w4_duckdb_child(n: int, k: int, keys: str, tmp_dir: str) -> dict[str, Any]:
    import duckdb

    con = duckdb.connect()
    try:
        con.execute(f"SET temp_directory='{tmp_dir}'")
        con.execute(f"SET memory_limit='{W4_DUCKDB_MEMORY_LIMIT}'")
        con.execute(f"SET threads={W4_DUCKDB_THREADS}")
        # The table of W4's columns, materialised before the clock: key (i * 7919) % k, value 1.
        idx = f"(i * {W4_STRIDE}) % {k}"
        key = idx if keys == "int" else f"'key-' || lpad(CAST({idx} AS VARCHAR), 12, '0')"
        con.execute(f"CREATE TABLE w4 AS SELECT {key} AS key, CAST(1 AS BIGINT) AS value FROM range({n}) r(i)")
        key_index = "key" if keys == "int" else "CAST(substr(key, 5) AS BIGINT)"
        query = (f"SELECT count(*), sum(s), sum({key_index} * 3 + s) "
                 "FROM (SELECT key, sum(value) AS s FROM w4 GROUP BY key)")
        t_start = clock()
        row = con.execute(query).fetchone()
        t_end = clock()
        if row is None:
            msg = "the checksum query returned no row"
            raise RuntimeError(msg)
        groups, total, weighted = row
        spilled_row = con.execute("SELECT coalesce(sum(size), 0) FROM duckdb_temporary_files()").fetchone()
        spilled = spilled_row[0] if spilled_row else 0
    finally:
        con.close()
    checksums = {"groups": int(groups), "total": int(total or 0), "weighted": int(weighted or 0) & MASK64}
    return {"t_start": t_start, "t_end": t_end, "checksums": checksums, "peak_rss_bytes": _maxrss_bytes(),
            "temp_files_bytes_after": int(spilled)}


def w4_duckdb(keys: str = "int", *, n: int = W4_N, k: int = W4_K) -> dict[str, Any]:
    """W4 in DuckDB, one fresh process: ``SET memory_limit='256MB'; SET threads=2``, a table of W4's columns
    (``key`` int64 key indices, or the row form's ``"key-%012d"`` strings with ``keys="str"``; ``value`` 1)
    made before the clock, then ``SELECT key, sum(value) ... GROUP BY key`` reduced to the three checksums
    in the same query (as the shmflow job reduces its results). Skipped, not failed, without duckdb."""
    version = duckdb_version()
    peer = "DuckDB" + (f" {version}" if version else "")
    variant = (f"{keys} keys: SELECT key, sum(value) GROUP BY key (checksums in SQL), memory_limit "
               f"{W4_DUCKDB_MEMORY_LIMIT}, threads {W4_DUCKDB_THREADS}, table materialised before the clock")
    params = {"n": n, "k": k, "keys": keys, "memory_limit": W4_DUCKDB_MEMORY_LIMIT, "threads": W4_DUCKDB_THREADS}
    if version is None:  # optional: reported as skipped, never a failure
        return {"workload": "W4", "peer": peer, "variant": variant, "params": params, "seconds": None,
                "rate": None, "unit": "records/s", "ok": True, "skipped": f"duckdb is not installed: {W4_DUCKDB_HINT}"}
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="shmflow-bench-duckdb-") as tmp_dir:
            out = _run_children([("duckdb", _w4_duckdb_child, (n, k, keys, tmp_dir))])["duckdb"]
    except _ChildFailed as exc:
        return _failed("W4", peer, variant, params, "records/s", str(exc))
    return _w4_child_record(peer, variant, params, n, k, out)



def _w4_child_record(peer: str, variant: str, params: dict[str, Any], n: int, k: int,
                     out: dict[str, Any]) -> dict[str, Any]:
    """A W4 baseline's record from what its child process reported: checked against ``w4_expected``."""
    expected = w4_expected(n, k)
    ok = out["checksums"] == expected
    extra: dict[str, Any] = {"checksums": out["checksums"], "memory": {"peak_rss_bytes": out["peak_rss_bytes"]}}
    if not ok:
        extra["error"] = f"checksums {out['checksums']}, expected {expected}"
    return w4_record(peer, variant, n, out["t_end"] - out["t_start"], ok, params=params, **extra)

# ============================================================================== registry and CLI
def baselines() -> list[tuple[str, Callable[..., dict[str, Any]]]]:
    """Every baseline as ``(name, fn)``; call ``fn(quick=...)`` for one repetition."""
    runs: list[tuple[str, Callable[..., dict[str, Any]]]] = []
    for size in W1_BUFFER_SIZES:
        tag = f"{size // 1024}KiB" if size < MiB else f"{size // MiB}MiB"
        runs += [
            (f"w1_mp_queue_{tag}", functools.partial(w1_mp_queue, size)),
            (f"w1_zmq_{tag}", functools.partial(w1_zmq, size)),
            (f"w1_shm_ring_{tag}", functools.partial(w1_shm_ring, size)),
            (f"w1_inproc_{tag}", functools.partial(w1_inproc, size)),
        ]
    for op in ("copy", "sum"):
        for array_bytes, tag in ((CEILING_DRAM_BYTES, "256MiB"), (32 * 1024, "32KiB"), (MiB, "1MiB")):
            runs.append((f"w1_{op}_{tag}", functools.partial(w1_memory_bandwidth, op, array_bytes)))
    runs += [
        ("w2_mp_queue_rows", w2_mp_queue_rows),
        ("w2_mp_queue_per_record", w2_mp_queue_per_record),
        ("w2_zmq_msgpack", w2_zmq_msgpack),
        ("w2_zmq_columns", w2_zmq_columns),
        ("w3_mp_queue", w3_mp_queue),
        ("w3_counter", w3_counter),
        ("w4_dict", functools.partial(_w4_at_scale, w4_dict)),
        ("w4_duckdb_int", functools.partial(_w4_at_scale, functools.partial(w4_duckdb, "int"))),
        ("w4_duckdb_str", functools.partial(_w4_at_scale, functools.partial(w4_duckdb, "str"))),
        ("w4_numpy", functools.partial(_w4_at_scale, w4_numpy)),
    ]
    return runs


def _w4_at_scale(fn: Callable[..., dict[str, Any]], quick: bool = False) -> dict[str, Any]:
    n, k = w4_scale(quick)
    return fn(n=n, k=k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.baselines",
                                     description="Run every W1-W4 baseline once; print one JSON line each.")
    parser.add_argument("--quick", action="store_true", help="smaller volumes (a smoke run)")
    parser.add_argument("--only", default="", help="run only baselines whose name contains this text")
    parser.add_argument("--reps", type=int, default=1, help="repetitions, interleaved across baselines")
    args = parser.parse_args(argv)
    runs = [(name, fn) for name, fn in baselines() if args.only in name]
    env = environment()
    failures = 0
    for rep in range(args.reps):
        for name, fn in runs:
            load_before = os.getloadavg()[0]
            result = {"name": name, "rep": rep, **fn(quick=args.quick), "env": env,
                      "loadavg_1m_before": round(load_before, 2)}
            failures += not result["ok"]
            print(json.dumps(result, sort_keys=False), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "baselines", "main", "w1_inproc", "w1_memory_bandwidth", "w1_mp_queue", "w1_shm_ring", "w1_zmq",
    "w2_mp_queue_per_record", "w2_mp_queue_rows", "w2_zmq_columns", "w2_zmq_msgpack", "w3_counter",
    "w3_mp_queue", "w4_dict", "w4_duckdb", "w4_numpy",
]
