"""Records end to end between real processes: RecordWriter -> ResultPartition -> InputGate -> RecordReader.

The proof tests of the record path: a million mixed records arrive complete and in order per channel over both
transports; events keep their place among the batches; the buffer timeout decides when a partly
filled buffer leaves (driven by an injected clock, not by sleeping); a corrupt buffer fails the
reader with a DeserializationError naming its channel; a slow consumer backpressures the writer
within the credit bound.
"""

from __future__ import annotations

import hashlib
import random
import time

import pytest
import zmq
from helpers import SPAWN, reap, wait_until

from runtime.errors import DeserializationError
from runtime.memory import BuddyAllocator, SharedRegion
from runtime.network import NetworkBufferPool
from runtime.network.events import CheckpointBarrier, EndOfPartition, UserEvent, Watermark
from runtime.network.gate import InputGate
from runtime.network.partition import ResultPartition
from runtime.network.records import Partitioner, RecordReader, RecordWriter, TimestampedBatch
from runtime.network.serializer import BufferSerializer

MiB = 1 << 20
BUF = 32 * 1024
ARENA = 8 * MiB
BATCH = 1000
TOTAL_RECORDS = 1_000_000  # over two channels
EXCLUSIVE, FLOATING = 2, 4
IDLE_LIMIT = 30.0  # seconds without any progress before a loop gives up (a failure, not a hang)


# ------------------------------------------------------------------------------ records
def record_pool(seed: int, n: int = 997) -> list:
    """``n`` distinct records of every supported kind, nested freely; deterministic in ``seed``.

    The first ones are fixed so that every kind surely occurs: 64-bit extremes, unicode, bytes,
    tuples inside lists inside dicts, -0.0 and inf. (No nan: the test compares with ``==``.)
    """
    fixed = [
        None, True, False, 0, -1, 2**63 - 1, -2**63, 2**64 - 1, 1.5, -0.0, float("inf"),
        "", "héllo wörld", "日本語 🚀", b"", b"\x00\xffbytes",
        [], (), {}, [1, (2, 3), [4, (5,)]], (None, [True, b"x"], {"k": (1.0, "v")}),
        {"a": [1, 2], 3: ("x", {"nested": [(), []]}), "u": "ünï"}, ((((1,),),),), [[[["deep"]]]],
    ]
    rng = random.Random(seed)
    words = ["", "a", "héllo", "日本語", "emoji 🚀", "x" * 40, "Ωmega"]
    extremes = [0, 1, -1, 2**63 - 1, -2**63, 2**64 - 1, 2**32, -2**31]

    def scalar():
        k = rng.randrange(7)
        if k == 0:
            return None
        if k == 1:
            return rng.random() < 0.5
        if k == 2:
            return rng.choice(extremes) if rng.random() < 0.3 else rng.randrange(-10**12, 10**12)
        if k == 3:
            return rng.uniform(-1e6, 1e6)
        if k == 4:
            return rng.choice(words) + str(rng.randrange(1000))
        if k == 5:
            return rng.randbytes(rng.randrange(24))
        return rng.randrange(100)

    def value(depth):
        k = rng.randrange(10 if depth < 3 else 6)
        if k < 6:
            return scalar()
        if k == 6:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        if k == 7:
            return tuple(value(depth + 1) for _ in range(rng.randrange(4)))
        return {(f"k{j}" if rng.random() < 0.8 else j): value(depth + 1) for j in range(rng.randrange(4))}

    return fixed + [value(0) for _ in range(n - len(fixed))]


def make_batch(pool: list, channel: int, start: int, n: int) -> list:
    """Records ``start .. start+n`` of ``channel``: the pool cycled, every 4th wrapped with its index.

    (The wrapper is a list: a tuple costs the serializer a Python call, and the pool has tuples enough.)
    """
    size = len(pool)
    return [[channel, i, pool[i % size]] if i % 4 == 0 else pool[i % size] for i in range(start, start + n)]


def digest(batch: list) -> bytes:
    """A batch's fingerprint with its types: repr tells True from 1, 1.0 from 1, (x,) from [x], str from bytes."""
    return hashlib.sha1(repr(batch).encode()).digest()


# ------------------------------------------------------------------------- plumbing
def _endpoint_for(transport: str) -> str | None:
    return "tcp://127.0.0.1:*" if transport == "tcp" else None


class _Producer:
    """The sending side in one process: an allocator range of the region, a pool, a partition, a writer."""

    def __init__(self, region: SharedRegion, arena_offset: int, transport: str, endpoints: list[str],
                 channel_ids: list[int] | int, *, pool_max: int = 32, buffer_timeout: float = 0.1,
                 clock=time.monotonic, name: str = "producer") -> None:
        self.alloc = BuddyAllocator(region, offset=arena_offset, size=ARENA)
        self.net = NetworkBufferPool(self.alloc, 32, BUF)
        self.pool = self.net.create_buffer_pool(2, pool_max, name=name)
        self.part = ResultPartition(self.pool, endpoints, channel_ids=channel_ids, transport=transport, name=name)
        kind = "forward" if len(endpoints) == 1 else "rebalance"
        self.writer = RecordWriter(self.part, Partitioner(kind, len(endpoints)), buffer_timeout=buffer_timeout,
                                   clock=clock)
        self.poller = zmq.Poller()
        for ch in self.part.channels:
            self.poller.register(ch.socket, zmq.POLLIN)
        self.waits = 0  # times the writer had to wait for a credit or a buffer

    def wait(self) -> None:
        """Wait (at most 10 ms) for a credit or a recycle; tcp buffers return without a message."""
        self.waits += 1
        self.poller.poll(10)
        self.writer.pump()

    def emit(self, batch) -> None:
        """Emit as a worker does: only while the writer is available, else wait for the consumer."""
        idle_since = time.monotonic()
        while not self.writer.available():
            self.writer.pump()
            if self.writer.available():
                break
            assert time.monotonic() - idle_since < IDLE_LIMIT, "producer: no credit or buffer came back"
            self.wait()
        self.writer.emit(batch)

    def emit_event(self, event) -> None:
        self.writer.emit_event(event)

    def drain(self) -> None:
        """End of stream: flush and wait until everything is handed to the partition and shipped."""
        deadline = time.monotonic() + IDLE_LIMIT
        while not self.writer.drained():
            assert time.monotonic() < deadline, "producer: could not ship the rest within the time limit"
            self.wait()

    def close(self) -> None:
        self.writer.close()
        self.part.close()
        self.pool.destroy()
        self.net.close()


def producer_main(region_name: str, arena_offset: int, transport: str, endpoint: str, channel_id: int,
                  conn, spec: tuple) -> None:
    """A producer process: sends what ``spec`` says on channel ``channel_id`` of the gate at ``endpoint``.

    spec ("stream", seed, n): n generated records in batches of BATCH, then EndOfPartition.
    spec ("script", items): batches (lists), TimestampedBatches and events, in order.
    spec ("corrupt", kind): one valid batch, then a buffer corrupted as ``kind`` through the raw
        send_buffer API.
    Then it reports, and on "finish" waits until every buffer came back (reporting its pool's
    in-use count), on "abort" just closes.
    """
    region = SharedRegion.attach(region_name)
    prod = None
    try:
        prod = _Producer(region, arena_offset, transport, [endpoint], channel_id, name=f"producer{channel_id}")
        report: dict = {}
        if spec[0] == "stream":
            _, seed, n = spec
            pool = record_pool(seed)
            for start in range(0, n, BATCH):
                prod.emit(make_batch(pool, channel_id, start, min(BATCH, n - start)))
                prod.writer.flush_if_due(time.monotonic())
            prod.emit_event(EndOfPartition())
        elif spec[0] == "script":
            for item in spec[1]:
                if isinstance(item, (EndOfPartition, Watermark, UserEvent, CheckpointBarrier)):
                    prod.emit_event(item)
                else:
                    prod.emit(item)
        elif spec[0] == "corrupt":
            prod.emit([("valid", 1), ("valid", 2)])
            prod.drain()  # the valid batch leaves in its own buffer: buffer 0 of the channel
            buf = prod.part.request_buffer(timeout=IDLE_LIMIT)
            view = buf.segment.view()
            if spec[1] == "garbage":
                view[:64] = b"\xde\xad\xbe\xef" * 16
                buf.size = 64
            else:  # a well-formed frame whose msgpack payload starts with 0xc1, a byte msgpack never uses
                ser = BufferSerializer()
                ser.set_buffer(view)
                ser.write_records([("about to be corrupted", 1)])
                view[8] = 0xC1
                buf.size = ser.position
            prod.part.send_buffer(0, buf)
        prod.drain()
        stats = prod.part.stats()
        report.update(sent=stats.buffers_sent, max_in_flight=stats.max_in_flight_per_channel,
                      pool_max=prod.pool.max, peak=prod.pool.stats().peak_in_use, waits=prod.waits)
        conn.send(("done", report))
        assert conn.poll(60), "the test never said finish or abort"
        if conn.recv() == "finish":
            prod.part.wait_all_recycled(timeout=IDLE_LIMIT)
            conn.send(("closed", prod.pool.in_use()))
    finally:
        if prod is not None:
            prod.close()
        region.close()


def consumer_main(transport: str, num_channels: int, conn, delay: float, report: str = "items") -> None:
    """A consumer process: reads every channel of its gate until EndOfPartition on all of them.

    Reports each item as it arrives (``("item", channel, kind, value)``; with ``report="digests"`` a
    batch as ``(digest, length)``, so that the pipe never fills), or the error that failed the
    reader; sleeps ``delay`` seconds between polls (a slow consumer). On "bye" it closes.
    """
    gate = InputGate(num_channels, exclusive=EXCLUSIVE, floating=FLOATING, name="consumer",
                     endpoint=_endpoint_for(transport))
    reader = RecordReader(gate)
    try:
        conn.send(gate.endpoint)
        gate.wait_connected(timeout=60)
        conn.send(("connected",))
        ended = 0
        idle_since = time.monotonic()
        while ended < num_channels:
            try:
                items = reader.poll()
            except DeserializationError as exc:
                conn.send(("error", type(exc).__name__, str(exc)))
                break
            if not items:
                if time.monotonic() - idle_since > IDLE_LIMIT:
                    conn.send(("stalled",))
                    break
                gate.socket.poll(10)
                continue
            idle_since = time.monotonic()
            for ch, item in items:
                if isinstance(item, TimestampedBatch):
                    conn.send(("item", ch, "timestamped", (list(item), item.timestamps)))
                elif type(item) is list and report == "digests":
                    conn.send(("item", ch, "digest", (digest(item), len(item))))
                elif type(item) is list:
                    conn.send(("item", ch, "batch", item))
                else:
                    conn.send(("item", ch, "event", item))
                    ended += isinstance(item, EndOfPartition)
            if delay:
                time.sleep(delay)  # sleep-ok: a slow consumer is what the backpressure test needs
        reader.close()
        gate.flush_credits()  # every buffer goes back to its producer
        conn.send(("finished",))
        assert conn.poll(60), "the test never said bye"
        conn.recv()
    finally:
        reader.close()
        gate.close()


def _expect(conn, what: str, timeout: float = 60):
    assert conn.poll(timeout), f"no {what} within {timeout}s"
    return conn.recv()


class _Gate:
    """This process as the consumer: a gate of ``n`` channels and a reader; read() until all ended."""

    def __init__(self, n: int, transport: str, region: SharedRegion) -> None:
        self.gate = InputGate(n, exclusive=EXCLUSIVE, floating=FLOATING, name="consumer",
                              endpoint=_endpoint_for(transport), region=region)
        self.reader = RecordReader(self.gate)
        self.n = n
        self.empty_polls = 0

    def read(self, on_item) -> None:
        """Poll until EndOfPartition arrived on every channel; ``on_item(channel, item)`` for each item."""
        ended = [False] * self.n
        idle_since = time.monotonic()
        while not all(ended):
            items = self.reader.poll()
            if not items:
                assert time.monotonic() - idle_since < IDLE_LIMIT, f"consumer stalled; ended={ended}"
                self.empty_polls += 1
                self.gate.socket.poll(10)
                continue
            idle_since = time.monotonic()
            for ch, item in items:
                assert not ended[ch], f"channel {ch} sent {item!r:.80} after its EndOfPartition"
                ended[ch] = isinstance(item, EndOfPartition)
                on_item(ch, item)
        self.reader.close()
        self.gate.flush_credits()

    def close(self) -> None:
        self.reader.close()
        self.gate.close()


def _run_producers(transport: str, specs: list[tuple], consume, *, finish: str = "finish"):
    """Start one producer process per spec (channel i of this process's gate); ``consume(gate)`` reads.

    Returns the producers' reports. Every child is reaped, and the region unlinked, on any outcome.
    """
    with SharedRegion.create(64 * MiB) as region:
        gate = _Gate(len(specs), transport, region)
        procs, conns = [], []
        try:
            for cid, spec in enumerate(specs):
                parent, child = SPAWN.Pipe()
                proc = SPAWN.Process(target=producer_main, args=(region.name, cid * ARENA, transport,
                                                                 gate.gate.endpoint, cid, child, spec))
                proc.start()
                procs.append(proc)
                conns.append(parent)
            consume(gate)
            reports = []
            for conn in conns:
                status, report = _expect(conn, "producer report")
                assert status == "done"
                reports.append(report)
            for conn in conns:
                conn.send(finish)
            if finish == "finish":
                for conn in conns:
                    assert _expect(conn, "producer close") == ("closed", 0)  # every buffer came back
            for proc in procs:
                proc.join(30)
                assert proc.exitcode == 0
            return reports
        finally:
            for proc in procs:
                reap(proc)
            gate.close()


# ---------------------------------------------------------------------------- 1. volume
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_million_mixed_records_arrive_complete_and_in_order(transport):
    """Each channel's stream is regenerated here and compared batch by batch with ``==`` (which tells
    a tuple from a list and str from bytes, and catches loss and reordering); batch 0 (it holds every
    record of the pool) and every 25th batch are also compared by repr, which tells True from 1 and
    1.0 from 1 and -0.0 from 0.0."""
    seeds = [11, 29]
    pools = [record_pool(seed) for seed in seeds]
    per_channel = TOTAL_RECORDS // 2
    counts = [0, 0]
    batches = [0, 0]

    def on_item(ch, item):
        if isinstance(item, EndOfPartition):
            return
        assert type(item) is list, f"channel {ch}: unexpected {item!r:.80}"
        expected = make_batch(pools[ch], ch, counts[ch], len(item))
        if item != expected:
            i = next((i for i, (a, b) in enumerate(zip(item, expected)) if a != b), min(len(item), len(expected)))
            pytest.fail(f"channel {ch}, batch {batches[ch]}: record {counts[ch] + i} is {item[i]!r:.200}; "
                        f"expected {expected[i]!r:.200}")
        if batches[ch] % 25 == 0:
            assert repr(item) == repr(expected), f"channel {ch}, batch {batches[ch]}: types differ"
        counts[ch] += len(item)
        batches[ch] += 1

    specs = [("stream", seed, per_channel) for seed in seeds]
    reports = _run_producers(transport, specs, lambda gate: gate.read(on_item))

    assert counts == [per_channel, per_channel]
    assert batches == [per_channel // BATCH] * 2  # one frame per emitted batch
    for report in reports:
        assert report["max_in_flight"] <= EXCLUSIVE + FLOATING


# ----------------------------------------------------------------------------- 2. events
def _script(channel: int) -> list:
    big = [("big", channel, i, "ß" * 20) for i in range(3000)]  # spans buffers
    return [
        [(channel, 0), (channel, 1)],
        Watermark(1.0),
        UserEvent({"checkpoint": (channel, 7), "note": "ünï"}),
        [(channel, 2)],
        big,
        Watermark(2.5),
        TimestampedBatch([(channel, 3), (channel, 4)], [3.0, 4.0]),
        UserEvent(None),
        [],  # an empty batch writes nothing
        [(channel, 5)],
        Watermark(float("inf")),
        EndOfPartition(),
    ]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_events_keep_their_order_among_the_batches(transport):
    seen: list[list] = [[], []]

    def on_item(ch, item):
        if isinstance(item, TimestampedBatch):
            seen[ch].append(("timestamped", list(item), item.timestamps))
        else:
            seen[ch].append(item)

    _run_producers(transport, [("script", _script(0)), ("script", _script(1))], lambda gate: gate.read(on_item))

    for ch in range(2):
        expected = [("timestamped", list(x), x.timestamps) if isinstance(x, TimestampedBatch) else x
                    for x in _script(ch) if x != []]
        assert seen[ch] == expected
        assert repr(seen[ch]) == repr(expected)  # tuples in events and records come back as tuples


# ------------------------------------------------------------------------ 2b. barrier alignment
def _aligned_script(channel: int, after: int) -> list:
    """Records numbered per channel, barrier 1 after 3 batches, ``after`` batches behind it, barrier 2, one more."""
    batches = [[(channel, i, "x" * 40) for i in range(j * 100, (j + 1) * 100)] for j in range(4 + after)]
    return [*batches[:3], CheckpointBarrier(1, 1.0), *batches[3:3 + after], CheckpointBarrier(2, 2.0),
            batches[-1], EndOfPartition()]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_aligned_reader_holds_a_channel_behind_its_barrier_until_every_channel_delivered_it(transport):
    """Channel 0 has far more data behind barrier 1 than its credits carry; the reader must hold all of it
    back (backpressuring producer 0) until channel 1's barrier 1 arrives, then deliver it in order."""
    seen: list[tuple[int, object]] = []

    def consume(gate: _Gate) -> None:
        gate.reader.align = True
        barriers: dict[int, set[int]] = {}
        ended = [False, False]
        idle_since = time.monotonic()
        while not all(ended):
            items = gate.reader.poll()
            if not items:
                assert time.monotonic() - idle_since < IDLE_LIMIT, f"stalled; seen {len(seen)}"
                gate.gate.socket.poll(10)
                continue
            idle_since = time.monotonic()
            for ch, item in items:
                seen.append((ch, item))
                ended[ch] = isinstance(item, EndOfPartition)
                if isinstance(item, CheckpointBarrier):
                    got = barriers.setdefault(item.checkpoint_id, set())
                    got.add(ch)
                    if len(got) == 2:
                        gate.reader.unblock_all()
        gate.reader.close()
        gate.gate.flush_credits()

    _run_producers(transport, [("script", _aligned_script(0, 60)), ("script", _aligned_script(1, 1))], consume)
    for ch in range(2):  # every channel's items, complete and in order
        expected = [x for x in _aligned_script(ch, 60 if ch == 0 else 1)]
        assert [item for c, item in seen if c == ch] == expected
    for cid in (1, 2):  # nothing of a channel behind barrier cid comes before the other channel's barrier cid
        positions = {ch: next(i for i, (c, item) in enumerate(seen)
                              if c == ch and item == CheckpointBarrier(cid, float(cid))) for ch in range(2)}
        aligned_at = max(positions.values())
        for ch in range(2):
            behind = [i for i, (c, _) in enumerate(seen) if c == ch and i > positions[ch]]
            assert all(i > aligned_at for i in behind), (cid, ch)


# ------------------------------------------------------------------------ 3. buffer timeout
class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_buffer_timeout_decides_when_a_partly_filled_buffer_leaves():
    with SharedRegion.create(64 * MiB) as region:
        conn, child = SPAWN.Pipe()
        cons = SPAWN.Process(target=consumer_main, args=("shm", 1, child, 0.0))
        cons.start()
        prod = None
        try:
            endpoint = _expect(conn, "gate endpoint")
            clock = FakeClock(0.0)
            prod = _Producer(region, 0, "shm", [endpoint], 0, buffer_timeout=0, clock=clock)
            assert _expect(conn, "connected") == ("connected",)
            part = prod.part
            wait_until(lambda: part.ship_all() or all(ch.credits for ch in part.channels), timeout=10,
                       msg="the consumer's credits")

            # buffer_timeout=0: a one-record batch leaves at once, no further emit or flush needed
            prod.writer.emit([("now", 1)])
            assert part.stats().buffers_sent == 1
            assert _expect(conn, "the 1-record batch", 10) == ("item", 0, "batch", [("now", 1)])

            # buffer_timeout=0.05: a partly filled buffer waits for the timeout
            writer = RecordWriter(part, Partitioner("forward", 1), buffer_timeout=0.05, clock=clock)
            prod.writer = writer
            wait_until(lambda: part.ship_all() or part.stats().in_flight == 0, timeout=10,
                       msg="the first buffer to be recycled")
            clock.now = 0.0
            writer.emit([("later", 2)])
            assert part.stats().buffers_sent == 1  # nothing left yet
            clock.now = 1.0  # the clock moves, but only flush_if_due(now) decides
            writer.flush_if_due(0.049)
            assert part.stats().buffers_sent == 1
            assert writer.next_flush_due() == 0.05
            writer.flush_if_due(0.05)
            assert part.stats().buffers_sent == 2
            assert _expect(conn, "the timed-out batch", 10) == ("item", 0, "batch", [("later", 2)])

            # end of stream: flush() sends whatever is buffered, however young
            clock.now = 2.0
            for i in range(3):
                writer.emit([("tail", i)])
            writer.emit_event(EndOfPartition())
            assert part.stats().buffers_sent == 2
            prod.drain()
            assert part.stats().buffers_sent == 3
            for i in range(3):
                assert _expect(conn, "a tail batch", 10) == ("item", 0, "batch", [("tail", i)])
            assert _expect(conn, "end of partition", 10) == ("item", 0, "event", EndOfPartition())
            assert _expect(conn, "consumer finished") == ("finished",)
            part.wait_all_recycled(timeout=10)
            conn.send("bye")
            cons.join(30)
            assert cons.exitcode == 0
        finally:
            if prod is not None:
                prod.close()
            reap(cons)


# --------------------------------------------------------------------------- 4. corruption
# The deserializer finds the damage; each transport delivers it once (both kinds, both transports).
@pytest.mark.parametrize("transport, kind, message", [
    ("shm", "garbage", r"^channel 'consumer<-1': frame at offset 0 of buffer 1 has magic 0xbe version 239; "
                       r"expected 0xf7 version 2 \(corrupt data or a misaligned frame\)$"),
    ("tcp", "payload", r"^channel 'consumer<-1': records frame at offset 0 of buffer 1 is corrupt: .+$"),
])
def test_a_corrupt_buffer_fails_the_reader_naming_its_channel(transport, kind, message):
    healthy = [[("fine", 1)], EndOfPartition()]
    received: list = []

    def consume(gate: _Gate) -> None:
        gate.gate.wait_connected(timeout=60)  # both channels have their credits before the reader fails
        with pytest.raises(DeserializationError, match=message):
            gate.read(lambda ch, item: received.append((ch, item)))

    _run_producers(transport, [("script", healthy), ("corrupt", kind)], consume, finish="abort")
    # nothing of the corrupt buffer was delivered (the valid batch before it may have been)
    assert all(item != [("about to be corrupted", 1)] for _, item in received)


# ------------------------------------------------------------------------- 5. backpressure
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_slow_consumer_backpressures_the_record_writer(transport):
    pool_max = EXCLUSIVE + FLOATING + 2
    n_batches = 30  # of ~130 KB: 4 buffers each, packed in C (no list below the top level)
    with SharedRegion.create(64 * MiB) as region:
        conn, child = SPAWN.Pipe()
        cons = SPAWN.Process(target=consumer_main, args=(transport, 1, child, 0.005, "digests"))
        cons.start()
        prod = None
        try:
            endpoint = _expect(conn, "gate endpoint")
            prod = _Producer(region, 0, transport, [endpoint], 0, pool_max=pool_max)
            assert _expect(conn, "connected") == ("connected",)
            unavailable = 0
            peak = 0
            sent = []
            for b in range(n_batches):
                batch = [(b, i, f"record {b}/{i}", bytes(100)) for i in range(BATCH)]
                while not prod.writer.available():
                    unavailable += 1
                    prod.wait()
                prod.writer.emit(batch)
                sent.append(batch)
                peak = max(peak, prod.pool.in_use())
                prod.writer.flush_if_due(time.monotonic())
            prod.emit_event(EndOfPartition())
            prod.drain()

            received = []
            while True:
                msg = _expect(conn, "consumer output")
                if msg[0] != "item":
                    break
                received.append(msg[3])
            assert msg == ("finished",)
            assert received[:-1] == [(digest(b), len(b)) for b in sent]  # all of it, in order
            assert received[-1] == EndOfPartition()

            stats = prod.part.stats()
            assert unavailable > 0  # the writer said "not now" while the consumer lagged
            assert stats.max_in_flight_per_channel <= EXCLUSIVE + FLOATING
            assert peak <= pool_max and prod.pool.stats().peak_in_use <= pool_max
            prod.part.wait_all_recycled(timeout=10)
            assert prod.pool.in_use() == 0
            conn.send("bye")
            cons.join(30)
            assert cons.exitcode == 0
        finally:
            if prod is not None:
                prod.close()
            reap(cons)
