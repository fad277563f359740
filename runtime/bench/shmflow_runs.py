"""shmflow's side of ``shmflow bench``: W1 through the network stack; W2, W3, W4 and latency as jobs.

Imports: runtime.bench.workloads, runtime.bench.baselines (its process plumbing), runtime.execution.task (the
Operator protocol), runtime.memory, runtime.network, runtime.api, numpy, the standard library.

Each public function runs ONE repetition and returns one result record in the
shape of :func:`runtime.bench.workloads.record` (the baselines' shape), so the
runner treats shmflow and its baselines alike. Every run checks its answer
(checksum, per-key sums, word counts, record counts); a wrong answer or a
failure gives ``ok: False`` with an ``error``, never an exception.

``corrupt=True`` perturbs the answer after it is produced and before it is
checked (one bit of the W1 checksum, one W2 sum, one W3 count, one latency
record dropped): the test hook that proves a wrong answer fails loudly.

Timing follows ../shared/WORKLOADS.md. W1: ``time.monotonic()`` right before the
producer's first send (after both processes passed a ready barrier) to the
consumer's end of work on the last buffer. Jobs: ``JobResult.metrics
["timed_seconds"]``, from the first source record to the last subtask's end
(monotonic, system-wide). W4 runs its job in a fresh process, so that process's ``RUSAGE_CHILDREN``
after the job is its workers' peak RSS, measured from outside. Measures; never asserts on time.
"""

from __future__ import annotations

import collections
import os
import time
import traceback
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bench.baselines import (
    READY_TIMEOUT,
    RUN_TIMEOUT,
    SPAWN,
    _ChildFailed,
    _failed,
    _run_children,
    _w1_expected,
    _w1_volume,
    _w2_n,
)
from runtime.bench.workloads import (
    MASK64,
    W1_RING_BYTES,
    W1_WINDOW,
    W2_KEYS,
    W3_LINES,
    W3_QUICK_FRACTION,
    W4_K,
    W4_MANAGED_BYTES,
    W4_N,
    MiB,
    clock,
    data_dir,
    w1_pool,
    w1_record,
    w1_touch,
    w2_check,
    w2_columnar_consume,
    w2_columns,
    w2_expected,
    w2_record,
    w2_rows,
    w3_check,
    w3_corpus_path,
    w3_generate,
    w3_record,
    w3_reference,
    w4_add_checksums,
    w4_checksum_columns,
    w4_checksum_rows,
    w4_chunks,
    w4_columns,
    w4_expected,
    w4_record,
    w4_rows,
    w5_checksum_updates,
)
from runtime.errors import InvalidArgumentError
from runtime.execution.task import Emit, Operator, SourceOperator

#: The W1 producer requests buffers in batches of up to this many bytes (16 x 32 KiB, 1 x 1 MiB).
W1_REQUEST_BYTES = 512 << 10
#: W1 over tcp is slower than shm; its full volume is 1 GiB, its quick volume 64 MiB.
W1_TCP_BYTES = 1 << 30
W1_TCP_QUICK_BYTES = 64 << 20
#: Latency job: records/s and how many records (full: 10 s, quick: 2 s).
LATENCY_RATE = 10_000
LATENCY_N = 100_000
LATENCY_QUICK_N = 20_000
LATENCY_KEYS = 100
#: Workers of the W2/W3/latency jobs.
JOB_WORKERS = 2
#: The config's memory.network.min: W4's region gives each arena this much network besides managed memory.
W4_NETWORK_MIN = 8 << 20


# ============================================================================== W1 through the network stack
def w1_credits(buf_bytes: int) -> tuple[int, int]:
    """(exclusive, floating) credits of the W1 channel, half of the window exclusive. The window is the
    larger of the baselines' in-flight bounds: the shm ring's 8 MiB (256 x 32 KiB) and the Queue's and
    zmq's 64 buffers (64 x 1 MiB)."""
    window = max(W1_RING_BYTES // buf_bytes, W1_WINDOW)
    return window // 2, window - window // 2


def w1_batch(buf_bytes: int) -> int:
    """Buffers per data message and per batch of releases: an eighth of the window (32 x 32 KiB,
    8 x 1 MiB). Enough to amortise a message; small enough that neither process waits for a whole
    window to come back."""
    return max(1, sum(w1_credits(buf_bytes)) // 8)


def w1_pool_buffers(buf_bytes: int) -> int:
    """Buffers in the producer's pool: the credit window, plus 2 to fill while it is in flight when
    buffers are big (66 x 1 MiB; 256 x 32 KiB is the ring's 8 MiB already)."""
    window = sum(w1_credits(buf_bytes))
    return window if window * buf_bytes <= W1_RING_BYTES else window + 2


def w1_tcp_bytes(quick: bool) -> int:
    """W1's volume over tcp (shmflow's tcp channel and its raw pyzmq tcp baseline alike)."""
    return W1_TCP_QUICK_BYTES if quick else W1_TCP_BYTES


def _w1_region_bytes(buf_bytes: int) -> int:
    """A power of two holding the producer's buffer pool (the buddy allocator carves it as one block)
    and, beside it, its channel's ring: twice the pool's power of two."""
    need = w1_pool_buffers(buf_bytes) * buf_bytes
    return 2 << (need - 1).bit_length()


def _w1_producer(region_name: str, endpoints: Any, barrier: Any, done: Any, buf_bytes: int, nbufs: int,
                 nbuffers: int, transport: str) -> dict[str, Any]:
    from runtime.memory import BuddyAllocator, SharedRegion
    from runtime.network import NetworkBufferPool
    from runtime.network.heap import keep_message_memory
    from runtime.network.partition import ResultPartition

    keep_message_memory()  # as a worker process does at start
    region = SharedRegion.attach(region_name)
    net = pool = part = None
    try:
        net = NetworkBufferPool(BuddyAllocator(region), nbuffers, buf_bytes, owner="bench-w1")
        pool = net.create_buffer_pool(nbuffers, nbuffers, name="bench-w1-producer")
        src = w1_pool()
        part = ResultPartition(pool, [endpoints.get(timeout=READY_TIMEOUT)], channel_ids=0, transport=transport,
                               name="bench-w1", max_backlog=nbuffers, ship_batch=w1_batch(buf_bytes))
        request, send, copyto = part.request_buffers, part.send_buffers, np.copyto
        src8 = src.view(np.uint8)  # w1_slice(src, i, B) as bytes: buffer i is bytes [(i*B) mod 64 MiB, +B)
        span = src8.size
        per_request = max(1, min(W1_REQUEST_BYTES // buf_bytes, nbuffers // 4))
        barrier.wait(READY_TIMEOUT)
        t_start = clock()
        i = 0
        while i < nbufs:
            bufs = request(min(per_request, nbufs - i), timeout=RUN_TIMEOUT)
            for buf in bufs:
                start = (i * buf_bytes) % span
                copyto(buf.array, src8[start:start + buf_bytes])
                buf.size = buf_bytes
                i += 1
            send(0, bufs)
        part.flush(timeout=RUN_TIMEOUT)
        t_sent = clock()
        done.wait(RUN_TIMEOUT)
        part.wait_all_recycled(timeout=30)
        return {"t_start": t_start, "t_sent": t_sent, "stats": part.stats().as_dict()}
    finally:
        if part is not None:
            part.close()
        if pool is not None:
            pool.destroy()
        if net is not None:
            net.close()
        region.close()


def _w1_consumer(endpoints: Any, barrier: Any, done: Any, nbufs: int, buf_bytes: int, transport: str) -> dict[str, Any]:
    from runtime.network.gate import InputGate
    from runtime.network.heap import keep_message_memory

    keep_message_memory()  # as a worker process does at start
    exclusive, floating = w1_credits(buf_bytes)
    gate = InputGate(1, exclusive=exclusive, floating=floating, name="bench-w1",
                     endpoint="tcp://127.0.0.1:*" if transport == "tcp" else None)
    try:
        endpoints.put(gate.endpoint)
        gate.wait_connected(timeout=READY_TIMEOUT)
        barrier.wait(READY_TIMEOUT)
        next_buffers, release_all, touch = gate.next_buffers, gate.release_all, w1_touch
        acc = count = 0
        while count < nbufs:
            got = next_buffers(timeout=RUN_TIMEOUT)
            if not got:
                raise TimeoutError(f"no buffer within {RUN_TIMEOUT} s after {count} of {nbufs}")
            step = w1_batch(buf_bytes)  # release in batches: buffers return before the window is through
            for k in range(0, len(got), step):
                chunk = got[k:k + step]
                for rb in chunk:
                    acc = (acc + touch(rb.view)) & MASK64
                release_all(chunk)
            count += len(got)
        t_end = clock()
        gate.flush_credits()
        done.set()
        return {"t_end": t_end, "checksum": acc, "count": count, "stats": gate.stats().as_dict()}
    finally:
        gate.close()


def w1_shmflow(buf_bytes: int, *, transport: str = "shm", quick: bool = False, total_bytes: int | None = None,
               corrupt: bool = False) -> dict[str, Any]:
    """W1 through a ResultPartition -> InputGate channel between two spawned processes.

    The driver creates the SharedRegion; the producer attaches it, carves a
    NetworkBufferPool from a BuddyAllocator over it, requests network buffers
    a few at a time, ``np.copyto``-s ``w1_slice(pool, i, B)`` into buffer i
    and sends them. The consumer's InputGate (:func:`w1_credits`: 256 x 32 KiB
    or 64 x 1 MiB in flight) hands out buffers; it ``w1_touch``-es each and
    releases them an eighth of the window at a time. ``shm`` moves (index,
    size) descriptors through the channel's ring in the region, the bytes stay
    there; ``tcp`` moves the bytes as zmq frames over loopback, an eighth of
    the credit window per data message.
    """
    from runtime.memory import SharedRegion

    if transport not in ("shm", "tcp"):
        raise ValueError(f"transport must be 'shm' or 'tcp'; got {transport!r}")
    if total_bytes is None and transport == "tcp":
        total_bytes = w1_tcp_bytes(quick)
    nbufs = _w1_volume(buf_bytes, quick, total_bytes)
    nbuffers = w1_pool_buffers(buf_bytes)
    peer = "shmflow"
    exclusive, floating = w1_credits(buf_bytes)
    variant = (f"{transport}: ResultPartition -> InputGate, credits {exclusive}+{floating}, "
               f"pool {nbuffers} x {buf_bytes // 1024} KiB")
    if transport == "tcp":
        variant += f", {nbufs * buf_bytes >> 20} MiB (reduced volume)"
    params = {"transport": transport, "exclusive_credits": exclusive, "floating_credits": floating,
              "pool_buffers": nbuffers, "quick": quick}
    full_params = {"buf_bytes": buf_bytes, "nbufs": nbufs, "total_bytes": buf_bytes * nbufs, **params}
    endpoints, barrier, done = SPAWN.Queue(), SPAWN.Barrier(2), SPAWN.Event()
    region = None
    try:
        region = SharedRegion.create(_w1_region_bytes(buf_bytes), sweep_dead=False)
        out = _run_children([
            ("consumer", _w1_consumer, (endpoints, barrier, done, nbufs, buf_bytes, transport)),
            ("producer", _w1_producer, (region.name, endpoints, barrier, done, buf_bytes, nbufs, nbuffers,
                                        transport)),
        ])
    except _ChildFailed as exc:
        return _failed("W1", peer, variant, full_params, "GB/s", str(exc))
    except Exception:  # noqa: BLE001 - a broken run is reported, not raised
        return _failed("W1", peer, variant, full_params, "GB/s", traceback.format_exc())
    finally:
        endpoints.close()
        endpoints.join_thread()
        if region is not None:
            region.close()
    cons, prod = out["consumer"], out["producer"]
    checksum = cons["checksum"] ^ 1 if corrupt else cons["checksum"]
    expected = _w1_expected(buf_bytes, nbufs)
    ok = cons["count"] == nbufs and checksum == expected
    stats = prod["stats"]
    extra: dict[str, Any] = {"channel": {"max_in_flight": stats.get("max_in_flight_per_channel"),
                                         "messages_sent": stats.get("messages_sent"),
                                         "consumer_wakeups_sent": cons["stats"].get("wakeups_sent"),
                                         "backpressure_seconds": round(stats.get("backpressure_seconds", 0), 4)}}
    if not ok:
        extra["error"] = f"checksum {checksum} over {cons['count']} buffers, expected {expected} over {nbufs}"
    return w1_record(peer, variant, buf_bytes, nbufs, cons["t_end"] - prod["t_start"], ok, params=params, **extra)


# ============================================================================== jobs: shared helpers
def _job_env(workers: int, **kw: Any) -> Any:
    from runtime.api import StreamEnvironment

    return StreamEnvironment(workers=workers, **kw)


def _job_extra(result: Any) -> dict[str, Any]:
    m = result.metrics
    return {"job": {"wall_seconds": round(result.seconds, 4), "timed_seconds": round(m.get("timed_seconds", 0), 6),
                    "records": m.get("records"), "backpressure_seconds": round(m.get("backpressure_seconds", 0), 4),
                    "worker_peak_rss_bytes": m.get("worker_peak_rss_bytes"),
                    "managed_peak_bytes": m.get("managed_peak_bytes"), "spilled_bytes": m.get("spilled_bytes"),
                    "gc_pause_seconds": m.get("gc_pause_seconds")}}


_first = itemgetter(0)


def _identity(x: Any) -> Any:
    return x


# ============================================================================== W2 keyed records
def w2_rows_job(*, quick: bool = False, n: int | None = None, workers: int = JOB_WORKERS,
                corrupt: bool = False) -> dict[str, Any]:
    """W2 as a job: ``from_collection(w2_rows(N)).key_by(r[0]).sum(1).collect()``.

    Batch mode (every source bounded), so shmflow puts its combiner before the
    keyed shuffle (one partial per key and source subtask crosses the network).
    """
    n = _w2_n(quick, n)
    peer = "shmflow"
    variant = f"job, {workers} workers: from_collection(rows).key_by(r[0]).sum(1), batch mode (own combiner)"
    params = {"workers": workers, "quick": quick, "mode": "batch", "combiner": True}
    try:
        rows = w2_rows(n)
        env = _job_env(workers)
        out = env.from_collection(rows).key_by(_first).sum(1).collect()
        del rows
        result = env.execute("bench-w2-rows", timeout=RUN_TIMEOUT)
        pairs = out.values()
        sums = {key: total for key, total in pairs}
        if corrupt and sums:
            key = next(iter(sums))
            sums[key] += 1.0
        count = result.metrics["records"]
        ok, maxerr = w2_check(sums, n, count, w2_expected(n))
        ok = ok and len(pairs) == len(sums)  # one result per key
    except Exception:  # noqa: BLE001
        return _failed("W2", peer, variant, {"n": n, **params}, "records/s", traceback.format_exc())
    extra = _job_extra(result)
    if not ok:
        extra["error"] = f"{count} of {n} records, {len(pairs)} results for {len(sums)} keys; largest error {maxerr}"
    return w2_record(peer, variant, n, result.metrics["timed_seconds"], ok, maxerr, params=params, **extra)


class _ColumnSums:
    """``map_batches`` state of the columnar W2 job: per-key sums of the batches a subtask saw.

    Called per shuffled columnar batch (``{"key": int64[], "value": float64[]}``):
    adds it with ``np.add.at`` (W2's columnar consumer work) and emits nothing.
    :class:`_ColumnSumsOp` emits the sums once, at end of input (plain ``map_batches`` has no end hook).
    """

    def __init__(self) -> None:
        self.acc: np.ndarray | None = None
        self.count = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.acc is None:
            self.acc = np.zeros(W2_KEYS, dtype=np.float64)
        keys = batch["key"]
        w2_columnar_consume(self.acc, keys, batch["value"])
        self.count += len(keys)
        return {}


class _ColumnSumsOp(Operator):
    """``key_by("key").map_batches(_ColumnSums())`` plus a ``finish`` that emits the sums once, at end of input:
    a columnar batch ``{"key": 0..99999, "value": sums}`` and then ``[("records", count)]``.

    An Operator of its own rather than a MapBatches: MapBatches takes any ``fn(batch) -> batch``, this one
    needs the :class:`_ColumnSums` it reads in ``finish``."""

    name = "w2_column_sums"

    def __init__(self, sums: _ColumnSums) -> None:
        self.sums = sums

    def process_batch(self, batch: Any, emit: Emit) -> None:
        self.sums(batch)

    def finish(self, emit: Emit) -> None:
        sums = self.sums
        acc = sums.acc if sums.acc is not None else np.zeros(W2_KEYS, dtype=np.float64)
        emit({"key": np.arange(W2_KEYS, dtype=np.int64), "value": acc})  # columnar: ships as raw arrays
        emit([("records", sums.count)])


def w2_columnar_job(*, quick: bool = False, n: int | None = None, workers: int = JOB_WORKERS,
                    corrupt: bool = False) -> dict[str, Any]:
    """W2 columnar as a job: a dict of numpy columns, hash-shuffled by the ``key`` column, summed per subtask.

    ``from_collection({"key": keys, "value": values}).key_by("key")`` then a
    ``map_batches`` operator that does ``np.add.at(acc, key, value)`` per
    batch and emits its 100,000 sums once at end of input; the client adds
    the subtasks' sums (keys are disjoint across subtasks).
    """
    n = _w2_n(quick, n)
    peer = "shmflow"
    variant = f"job, {workers} workers: columnar from_collection.key_by('key'), map_batches np.add.at, sums at end"
    params = {"workers": workers, "quick": quick, "mode": "batch"}
    try:
        keys, values = w2_columns(n)
        env = _job_env(workers)
        keyed = env.from_collection({"key": keys, "value": values}).key_by("key")
        # KeyedStream.map_batches with an operator that also has finish(): the same hash shuffle by column.
        stream = keyed.stream._then("w2_column_sums", _ColumnSumsOp(_ColumnSums()), partitioning="hash",
                                    key_fn=keyed.key_fn, columnar_key=keyed.columnar_key)
        out = stream.collect()
        del keys, values
        result = env.execute("bench-w2-columnar", timeout=RUN_TIMEOUT)
        got = out.values()
        parts = [v for v in got if isinstance(v, dict)]
        counts = [v[1] for v in got if isinstance(v, tuple)]
        sums = np.zeros(W2_KEYS, dtype=np.float64)
        for part in parts:
            np.add.at(sums, part["key"], part["value"])
        count = sum(counts)
        if corrupt:
            sums[0] += 1.0
        ok, maxerr = w2_check(sums, n, count, w2_expected(n))
        ok = ok and len(parts) == len(counts) == workers
    except Exception:  # noqa: BLE001
        return _failed("W2", peer, variant, {"n": n, **params}, "records/s", traceback.format_exc())
    extra = _job_extra(result)
    if not ok:
        extra["error"] = f"{count} of {n} records in {len(parts)} partial results; largest error {maxerr}"
    return w2_record(peer, variant, n, result.metrics["timed_seconds"], ok, maxerr, params=params, **extra)


# ============================================================================== W3 word count
def _tokens(line: str) -> list[str]:
    return line.lower().split()


_W3_REF: dict[str, tuple[Path, collections.Counter[str]]] = {}


def w3_input(quick: bool = False, lines: int | None = None) -> tuple[Path, collections.Counter[str]]:
    """(a corpus file, its reference Counter): the full corpus, its first 1/10 (quick), or ``lines`` generated.

    Cached in :func:`data_dir`; the Counter is cached per process (one at a time).
    """
    key = f"lines={lines}" if lines is not None else ("quick" if quick else "full")
    if key not in _W3_REF:
        full: Path | None = None  # the full corpus, unless the input is generated
        if lines is not None:
            path = data_dir() / f"w3_corpus_generated_l{lines}.txt"
            text = w3_generate(lines)
        else:
            full = w3_corpus_path()
            if quick:
                path = data_dir() / f"w3_corpus_quick_l{W3_LINES // W3_QUICK_FRACTION}.txt"
                with open(full, encoding="ascii") as f:
                    text = "".join(line for _, line in zip(range(W3_LINES // W3_QUICK_FRACTION), f))
            else:
                path, text = full, full.read_text(encoding="ascii")
        if path != full and (not path.exists() or path.read_text(encoding="ascii") != text):
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text, encoding="ascii")
            os.replace(tmp, path)
        _W3_REF.clear()
        _W3_REF[key] = (path, w3_reference(text))
    return _W3_REF[key]


def w3_job(*, quick: bool = False, lines: int | None = None, workers: int = JOB_WORKERS,
           corrupt: bool = False) -> dict[str, Any]:
    """W3 as a job: ``read_text(corpus).flat_map(line.lower().split()).key_by(word).count().collect()``.

    Batch mode, so shmflow's own combiner pre-aggregates counts before the
    keyed shuffle (WORKLOADS.md requires saying so; the reference does not
    pre-aggregate). Workers read contiguous line ranges of the file.
    """
    peer = "shmflow"
    variant = (f"job, {workers} workers: read_text.flat_map(line.lower().split()).key_by(word).count(), "
               "batch mode: shmflow's combiner pre-aggregates before the shuffle")
    params = {"workers": workers, "quick": quick, "mode": "batch", "combiner": True,
              "lines": lines if lines is not None else ("1/10 of corpus" if quick else "full corpus")}
    try:
        path, ref = w3_input(quick, lines)
        total_words = sum(ref.values())
        env = _job_env(workers)
        out = env.read_text(str(path)).flat_map(_tokens).key_by(_identity).count().collect()
        result = env.execute("bench-w3", timeout=RUN_TIMEOUT)
        pairs = out.values()
        counts = dict(pairs)
        if corrupt and counts:
            counts[next(iter(counts))] += 1
        ok = len(pairs) == len(counts) and w3_check(counts, ref)
    except Exception:  # noqa: BLE001
        return _failed("W3", peer, variant, params, "words/s", traceback.format_exc())
    extra = _job_extra(result)
    if not ok:
        extra["error"] = f"{len(pairs)} results for {len(counts)} words, {len(ref)} expected; counts differ"
    return w3_record(peer, variant, total_words, result.metrics["timed_seconds"], ok, params=params, **extra)


# ============================================================================== W4 large keyed state, batch
class W4Source(SourceOperator):
    """W4's input, generated inside the worker while the job runs: ``w4_rows`` or ``w4_columns`` chunks.

    ``split(p)`` gives subtask ``i`` a contiguous share of the chunks of :func:`w4_chunks` (``i * C // p``
    up to ``(i + 1) * C // p`` of ``C``); a share generates one chunk of 65,536 records at a time and hands
    it out in slices of at most ``max_records``, so at most one chunk is alive and nothing exists in
    advance. The first chunk's first slice is generated on its own (the same records): the job's clock
    starts at the first record a source returns, so this leaves only that slice's generation untimed.

    ``form`` is ``"rows"`` (``("key-%012d", 1)`` tuples) or ``"columns"`` (``{"key", "value"}`` int64 columns).
    """

    name = "w4_source"
    bounded = True

    def __init__(self, n: int, k: int, form: str, chunks: list[tuple[int, int]] | None = None) -> None:
        if form not in ("rows", "columns"):
            msg = f"W4Source form must be 'rows' or 'columns'; got {form!r}"
            raise ValueError(msg)
        self.n, self.k, self.form = n, k, form
        self.chunks = w4_chunks(n) if chunks is None else chunks
        self._split: tuple[int, int] | None = None
        if form == "columns":
            self.row_bytes = 16  # two int64 columns: the subtask polls columnar sources by bytes
        self._next = 0  # index into chunks
        self._pending: Any = None  # the current chunk (list or dict of arrays)
        self._pos = 0
        self._len = 0
        self._started = False
        self._chunk = 0  # index in chunks of the chunk _pending was generated from
        self._base = 0  # the record number of _pending's first record

    def split(self, parallelism: int) -> list[W4Source]:
        count = len(self.chunks)
        parts = []
        for i in range(parallelism):
            part = W4Source(self.n, self.k, self.form,
                            self.chunks[i * count // parallelism:(i + 1) * count // parallelism])
            part._split = (i, parallelism)
            parts.append(part)
        return parts

    def open(self, ctx: Any) -> None:
        super().open(ctx)
        if self._split is None and ctx.parallelism > 1:  # not split by the graph: take share i by itself
            mine = self.split(ctx.parallelism)[ctx.subtask_index]
            self.chunks, self._split = mine.chunks, mine._split

    def _generate(self, start: int, stop: int) -> Any:
        return w4_rows(start, stop, self.k) if self.form == "rows" else w4_columns(start, stop, self.k)

    def poll_batch(self, max_records: int) -> Any:
        if self._pos >= self._len:
            if self._next >= len(self.chunks):
                self._pending = None
                return None
            start, stop = self.chunks[self._next]
            if not self._started:  # the first slice alone, then the rest of its chunk
                self._started = True
                first = min(stop, start + max(1, max_records))
                if first < stop:
                    self.chunks[self._next] = (first, stop)
                    self._pending, self._pos, self._len = self._generate(start, first), 0, first - start
                    self._chunk, self._base = self._next, start
                    return self._take(max_records)
            self._chunk, self._base = self._next, start
            self._next += 1
            self._pending, self._pos, self._len = self._generate(start, stop), 0, stop - start
        return self._take(max_records)

    def snapshot_state(self) -> tuple[int, int]:
        """The position: ``(index of the chunk holding the next record, that record's number)``."""
        if self._pending is not None and self._pos < self._len:
            return (self._chunk, self._base + self._pos)
        if self._next < len(self.chunks):
            return (self._next, self.chunks[self._next][0])
        return (len(self.chunks), self.n)

    def restore_state(self, state: Any) -> None:
        """Resume at a snapshotted position: the rest of its chunk is generated from the record on."""
        index, record = state
        self.chunks = list(self.chunks)
        if index < len(self.chunks):
            start, stop = self.chunks[index]
            if not start <= record <= stop:
                msg = f"W4Source: a restored record must be in chunk {index} [{start}, {stop}]; got {record}"
                raise InvalidArgumentError(msg)
            self.chunks[index] = (record, stop)
        self._next, self._started = index, True
        self._pending, self._pos, self._len = None, 0, 0

    def _take(self, max_records: int) -> Any:
        a = self._pos
        b = self._pos = min(self._len, a + max(1, max_records))
        chunk = self._pending
        if a == 0 and b == self._len:
            return chunk
        if isinstance(chunk, dict):
            return {name: col[a:b] for name, col in chunk.items()}
        return chunk[a:b]


def _w4_checksum_batch(batch: Any) -> list[tuple[int, int, int]]:
    """``map_batches`` after the keyed sum: one ``(groups, total, weighted)`` record per batch of results."""
    if isinstance(batch, dict):
        c = w4_checksum_columns(batch["key"], batch["value"])
    else:
        c = w4_checksum_rows(batch)
    return [(c["groups"], c["total"], c["weighted"])]


def w4_region_bytes(managed_bytes: int, workers: int) -> int:
    """``memory.region.size`` whose per-worker arena (a power of two) holds the network buffers and
    ``managed_bytes``: network is 10% of the arena, at least 8 MiB (the config's defaults)."""
    arena = 1 << max(0, (managed_bytes + W4_NETWORK_MIN - 1).bit_length())
    while max(W4_NETWORK_MIN, arena // 10) + managed_bytes > arena:
        arena *= 2
    return arena * workers


def _w4_job_child(form: str, n: int, k: int, managed_bytes: int, workers: int) -> dict[str, Any]:
    """One W4 job, run in a fresh process (so ``RUSAGE_CHILDREN`` afterwards is its workers' peak RSS)."""

    config = {"memory.managed.size": managed_bytes, "memory.region.size": w4_region_bytes(managed_bytes, workers)}
    env = _job_env(workers, config=config, mode="batch")
    src = env.from_source(W4Source(n, k, form), name=f"w4_{form}")
    keyed = src.key_by(_first).sum(1) if form == "rows" else src.key_by("key").sum("value")
    out = keyed.map_batches(_w4_checksum_batch).collect()
    result = env.execute(f"bench-w4-{form}", timeout=RUN_TIMEOUT)
    parts = [{"groups": g, "total": t, "weighted": w} for g, t, w in out.values()]
    m = result.metrics
    return {"checksums": w4_add_checksums(parts), "partial_records": len(parts),
            **_job_figures(result, spilled=int(m.get("spilled_bytes", 0)),
                           managed_peak=int(m.get("managed_peak_bytes", 0)))}


def _job_figures(result: Any, *, spilled: int, managed_peak: int) -> dict[str, Any]:
    """A W4/W5 job's figures, read in the process that ran it: its workers' peaks from inside and (``RUSAGE_CHILDREN``)
    from outside, GC pauses, spilled bytes and managed memory at peak."""
    import resource

    m = result.metrics
    workers_m = m.get("workers", {})
    return {
        "records": m.get("records"), "timed_seconds": m["timed_seconds"], "wall_seconds": result.seconds,
        "worker_peak_rss_bytes": [int(workers_m[w].get("peak_rss_bytes", 0)) for w in sorted(workers_m)],
        "worker_gc_pause_seconds": [round(workers_m[w].get("gc_pause_seconds", 0.0), 4) for w in sorted(workers_m)],
        "children_maxrss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "driver_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "spilled_bytes": spilled, "spill_files": int(m.get("spill_files", 0)), "managed_peak_bytes": managed_peak,
        "gc_pause_seconds": float(m.get("gc_pause_seconds", 0.0)),
        "backpressure_seconds": float(m.get("backpressure_seconds", 0.0)),
    }


def w4_job(form: str, *, n: int = W4_N, k: int = W4_K, managed_bytes: int = W4_MANAGED_BYTES,
           workers: int = JOB_WORKERS, corrupt: bool = False) -> dict[str, Any]:
    """W4 as a job, in a fresh process: a :class:`W4Source` per worker, ``key_by(...).sum(...)`` in batch
    mode with ``managed_bytes`` of managed memory per worker, reduced to ``w4_checksum`` s in the job.

    rows: ``.key_by(r[0]).sum(1)`` over ``("key-%012d", 1)`` tuples; columns: ``.key_by("key").sum("value")``
    over int64 columns (results come out as columnar batches). ``map_batches`` turns every batch of results
    into one ``(groups, total, weighted)`` record; the driver adds those up (``weighted`` mod 2**64) and the
    run is ok only if they equal :func:`w4_expected`. Records/s is N over the job's timed region.
    """
    key = "r[0]).sum(1)" if form == "rows" else "'key').sum('value')"
    variant = (f"job, {workers} workers, batch: W4Source({form}, generated in the workers).key_by({key}"
               f", managed {managed_bytes / MiB:g} MiB per worker; checksums reduced in the job")
    params = {"n": n, "k": k, "form": form, "workers": workers, "mode": "batch", "managed_bytes": managed_bytes,
              "region_bytes": w4_region_bytes(managed_bytes, workers), "combiner": True}
    return _large_state_run("W4", (_w4_job_child, (form, n, k, managed_bytes, workers)), variant, params, n, k,
                            corrupt)


def _large_state_run(workload: str, child: tuple[Any, tuple[Any, ...]], variant: str, params: dict[str, Any],
                     n: int, k: int, corrupt: bool) -> dict[str, Any]:
    """Run a W4/W5 job child in a fresh process and check its checksums against :func:`w4_expected`."""
    peer = "shmflow"
    try:
        out = _run_children([("job", *child)])["job"]
    except _ChildFailed as exc:
        return _failed(workload, peer, variant, params, "records/s", str(exc))
    except Exception:  # noqa: BLE001
        return _failed(workload, peer, variant, params, "records/s", traceback.format_exc())
    got = dict(out["checksums"])
    if corrupt:
        got["weighted"] = (got["weighted"] + 1) & MASK64
    expected = w4_expected(n, k)
    ok = got == expected and out["records"] == n
    extra: dict[str, Any] = {"checksums": got, "expected": expected, "memory": _w4_memory(out)}
    if "checkpointing" in out:
        extra["checkpointing"] = out["checkpointing"]
    if not ok:
        extra["error"] = f"checksums {got} over {out['records']} records; expected {expected} over {n}"
    result = w4_record(peer, variant, n, out["timed_seconds"], ok, params=params, **extra)
    result["workload"] = workload
    return result


# ============================================================================== W5 large keyed state, streaming
def _w5_checksum_batch(batch: Any) -> list[tuple[int, int, int]]:
    """``map_batches`` after the streaming count: one ``(groups, total, weighted)`` record per batch of updates,
    the checksums of the last update per key (they telescope: see :func:`w5_checksum_updates`)."""
    c = w5_checksum_updates(batch)
    return [(c["groups"], c["total"], c["weighted"])]


def w5_config(backend: str, managed_bytes: int, workers: int) -> dict[str, Any]:
    """The configuration of a W5 job: its region, managed memory per worker and state backend."""
    return {"memory.managed.size": managed_bytes, "memory.region.size": w4_region_bytes(managed_bytes, workers),
            "state.backend": backend}


def w5_graph(env: Any, n: int, k: int) -> Any:
    """W5's job on ``env``: W4's rows, ``key_by(r[0]).count()``, reduced to checksums; its ``collect()`` handle."""
    src = env.from_source(W4Source(n, k, "rows"), name="w5_rows")
    return src.key_by(_first).count().map_batches(_w5_checksum_batch).collect()


def checkpoint_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """A job's checkpoint figures from its metrics: completed and aborted, the last one's size and duration, the
    largest and the longest, their total time and the longest alignment."""
    keys = ("checkpoints", "checkpoints_failed", "checkpoint_size_bytes", "checkpoint_duration_seconds",
            "checkpoint_max_size_bytes", "checkpoint_max_duration_seconds", "checkpoint_total_seconds",
            "checkpoint_alignment_seconds")
    return {key: metrics.get(key, 0) for key in keys}


def _w5_job_child(backend: str, n: int, k: int, managed_bytes: int, workers: int,
                  config_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One W5 job, run in a fresh process (so ``RUSAGE_CHILDREN`` afterwards is its workers' peak RSS);
    ``config_extra``: more configuration (checkpoints)."""

    config = {**w5_config(backend, managed_bytes, workers), **(config_extra or {})}
    env = _job_env(workers, config=config, mode="streaming")
    out = w5_graph(env, n, k)
    result = env.execute(f"bench-w5-{backend}", timeout=RUN_TIMEOUT)
    parts = [{"groups": g, "total": t, "weighted": w} for g, t, w in out.values()]
    m = result.metrics
    chain: dict[str, Any] = next((c for name, c in m.get("operators", {}).items() if name.startswith("count")), {})
    spilled = int(chain.get("state_bytes_on_disk", 0)) or int(m.get("spilled_bytes", 0))
    return {"checksums": w4_add_checksums(parts), "partial_records": len(parts),
            "checkpointing": checkpoint_figures(m),
            **_job_figures(result, spilled=spilled, managed_peak=int(chain.get("state_bytes_in_memory", 0)))}


def w5_job(backend: str, *, n: int = W4_N, k: int = W4_K, managed_bytes: int = W4_MANAGED_BYTES,
           workers: int = JOB_WORKERS, corrupt: bool = False) -> dict[str, Any]:
    """W5 as a job, in a fresh process: W4's rows generated in the workers, ``key_by(r[0]).count()`` in
    streaming mode (every update emitted) with ``state.backend`` = ``backend`` and ``managed_bytes`` of
    managed memory per worker; the updates are reduced in the job to the checksums of the last update per
    key, which must equal :func:`w4_expected`. Records/s is N over the job's timed region."""
    variant = (f"job, {workers} workers, streaming: W4Source(rows).key_by(r[0]).count(), every update emitted, "
               f"state.backend={backend}, managed {managed_bytes / MiB:g} MiB per worker")
    params = {"n": n, "k": k, "backend": backend, "workers": workers, "mode": "streaming",
              "managed_bytes": managed_bytes}
    return _large_state_run("W5", (_w5_job_child, (backend, n, k, managed_bytes, workers)), variant, params, n, k,
                            corrupt)


def _w4_memory(out: dict[str, Any]) -> dict[str, Any]:
    keys = ("worker_peak_rss_bytes", "worker_gc_pause_seconds", "children_maxrss_bytes", "driver_maxrss_bytes",
            "spilled_bytes", "spill_files", "managed_peak_bytes", "gc_pause_seconds", "backpressure_seconds",
            "wall_seconds", "partial_records")
    return {key: out[key] for key in keys}


# ============================================================================== latency
def _stamp(i: int) -> tuple[int, float]:
    return (i % LATENCY_KEYS, time.monotonic())


def _latencies(batch: list[Any]) -> list[float]:
    now = time.monotonic
    return [now() - r[1] for r in batch]


def latency_job(*, quick: bool = False, count: int | None = None, rate: float = LATENCY_RATE,
                workers: int = JOB_WORKERS, corrupt: bool = False) -> dict[str, Any]:
    """End-to-end latency of a keyed job at ``rate`` records/s, ``network.buffer-timeout`` 1 ms, streaming mode.

    ``from_generator((i % 100, monotonic()), rate, count).key_by(r[0])`` then,
    after the hash shuffle, ``map_batches`` computes ``monotonic() - r[1]``
    per record (CLOCK_MONOTONIC is system-wide, so stamps from the source's
    process subtract). Reports p50, p99 and max in ms; checks that every
    record arrived once.
    """
    count = count if count is not None else (LATENCY_QUICK_N if quick else LATENCY_N)
    peer = "shmflow"
    variant = (f"job, {workers} workers, streaming, {rate:,.0f} records/s, buffer-timeout 1 ms: "
               "generator -> key_by (shuffle) -> map_batches(now - stamp)")
    params = {"workers": workers, "rate": rate, "count": count, "buffer_timeout": "1ms", "mode": "streaming",
              "quick": quick}
    fail = {"workload": "latency", "peer": peer, "variant": variant, "params": params, "seconds": None,
            "rate": None, "unit": "ms", "ok": False}
    try:
        env = _job_env(workers, config={"network.buffer-timeout": "1ms"}, mode="streaming")
        out = (env.from_generator(_stamp, rate=rate, count=count).key_by(_first)
               .map_batches(_latencies).collect())
        result = env.execute("bench-latency", timeout=RUN_TIMEOUT)
        lat = np.asarray(out.values(), dtype=np.float64)
        if corrupt:
            lat = lat[1:]
    except Exception:  # noqa: BLE001
        return {**fail, "error": traceback.format_exc()}
    ok = lat.size == count and bool(np.all(np.isfinite(lat))) and bool(np.all(lat >= 0))
    ms = lat * 1e3 if lat.size else np.zeros(1)
    figures = {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}
    out_rec = {"workload": "latency", "peer": peer, "variant": variant, "params": params,
               "seconds": round(result.metrics["timed_seconds"], 6), "rate": round(figures["p99"], 4), "unit": "ms",
               "ok": ok, "figures": {k: round(v, 4) for k, v in figures.items()}, **_job_extra(result)}
    if not ok:
        out_rec["error"] = f"{lat.size} latencies for {count} records (or a negative / non-finite one)"
    return out_rec


__all__ = ["W4Source", "latency_job", "w1_pool_buffers", "w1_shmflow", "w2_columnar_job", "w2_rows_job", "w3_input",
           "w3_job", "w4_job", "w4_region_bytes", "w5_config", "w5_graph", "w5_job",
           "checkpoint_figures"]
