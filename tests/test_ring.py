"""Descriptor rings between two real processes: hypothesis-generated interleavings of producer and consumer
steps against a model, a free-running stress with real ZeroMQ wake-ups, and a gate that refuses a torn
descriptor. The ring lives in a real shared region; the producer and the consumer are spawned processes."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
from collections import deque

import numpy as np
import pytest
import zmq
from helpers import SPAWN, reap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import DeserializationError, DoubleFreeError
from runtime.memory import BuddyAllocator, SharedRegion
from runtime.network import NetworkBufferPool
from runtime.network import _ring as compiled
from runtime.network.gate import InputGate
from runtime.network.partition import ResultPartition
from runtime.network.ring import attach_ring, create_ring, free_ring, ring_capacity

MiB = 1 << 20
NUM_BUFFERS = 64
BUFFER_SIZE = 4096
REPLY_TIMEOUT = 30


# ------------------------------------------------------------------------------------------ agents
def agent(region_name: str, conn) -> None:
    """One side of a ring in its own process: runs the ring operations the test sends, replies with results."""
    region = SharedRegion.attach(region_name)
    ring = None
    try:
        while True:
            cmd, args = conn.recv()
            try:
                if cmd == "quit":
                    return
                if cmd == "create":
                    offset, capacity, generation = args
                    ring = compiled.Ring(region.buf, region.generation_table, region.granule, offset, capacity,
                                         generation, True)
                    result = None
                elif cmd == "attach":
                    offset, capacity, generation = args
                    ring = attach_ring(region, offset, capacity, generation, num_buffers=NUM_BUFFERS,
                                       buffer_size=BUFFER_SIZE)
                    result = None
                elif cmd == "close":
                    ring.close()
                    ring = None
                    result = None
                else:
                    result = getattr(ring, cmd)(*args)
                conn.send(("ok", result))
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        if ring is not None:
            ring.close()
        region.close()


class Agents:
    def __init__(self, region: SharedRegion) -> None:
        self.region = region
        self.alloc = BuddyAllocator(region, min_block=4096)
        self.procs = []
        self.conns = {}
        for side in ("producer", "consumer"):
            mine, theirs = SPAWN.Pipe()
            proc = SPAWN.Process(target=agent, args=(region.name, theirs))
            proc.start()
            self.procs.append(proc)
            self.conns[side] = mine

    def call(self, side: str, cmd: str, *args):
        conn = self.conns[side]
        conn.send((cmd, args))
        assert conn.poll(REPLY_TIMEOUT), f"{side} agent did not answer {cmd}"
        status, result = conn.recv()
        assert status == "ok", f"{side} {cmd}{args}: {result}"
        return result

    def close(self) -> None:
        for conn in self.conns.values():
            conn.send(("quit", ()))
        for proc in self.procs:
            proc.join(10)
            assert proc.exitcode == 0
            reap(proc)


@pytest.fixture(scope="module")
def agents():
    with SharedRegion.create(4 * MiB) as region:
        a = Agents(region)
        try:
            yield a
        finally:
            a.close()


# ------------------------------------------------------------------------- interleavings vs a model
STEP = st.one_of(
    st.tuples(st.just("push"), st.integers(1, 5), st.integers(0, 7)),
    st.tuples(st.just("pop")),
    st.tuples(st.just("give_back"), st.integers(0, 5), st.integers(0, 3)),
    st.tuples(st.just("take_returns")),
    st.tuples(st.just("park_consumer")),
    st.tuples(st.just("unpark_consumer")),
    st.tuples(st.just("park_producer")),
    st.tuples(st.just("unpark_producer")),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=40), capacity=st.sampled_from([2, 4, 8]))
def test_interleaved_steps_of_two_processes_match_the_model(agents, steps, capacity):
    """Each step runs in the process of its side, in the order hypothesis chose; every result is what a
    sequential model says: FIFO descriptors, returns and credits, and a wake-up exactly when the other side
    was parked (and only once per park)."""
    block = agents.alloc.allocate(compiled.ring_bytes(capacity), owner="ring under test")
    call = agents.call
    try:
        call("producer", "create", block.offset, capacity, block.generation)
        call("consumer", "attach", block.offset, capacity, block.generation)
        fwd: deque[tuple[int, int]] = deque()  # published, not popped
        held: deque[int] = deque()  # popped, not given back
        bwd: deque[int] = deque()  # given back, not taken
        granted = granted_seen = 0
        consumer_parked = producer_parked = False
        backlog = 0
        next_index = 0
        for step in steps:
            kind = step[0]
            if kind == "push":
                n = min(step[1], capacity - len(fwd) - len(held) - len(bwd))  # distinct buffers: never overflows
                if n <= 0:
                    continue
                indices = [(next_index + i) % NUM_BUFFERS for i in range(n)]
                sizes = [(next_index + i) * 7 % (BUFFER_SIZE + 1) for i in range(n)]
                next_index += n
                backlog = step[2]
                wake = call("producer", "push", indices, sizes, backlog)
                assert wake == consumer_parked
                consumer_parked = False
                fwd.extend(zip(indices, sizes))
            elif kind == "pop":
                got = call("consumer", "pop")
                if fwd:
                    assert got == (backlog, [i for i, _ in fwd], [s for _, s in fwd])
                else:
                    assert got == (0, [], [])
                held.extend(i for i, _ in fwd)
                fwd.clear()
            elif kind == "give_back":
                k = min(step[1], len(held))
                indices = [held.popleft() for _ in range(k)]
                credits = step[2]
                wake = call("consumer", "give_back", indices, credits)
                assert wake == (producer_parked and bool(k or credits))
                if k or credits:
                    producer_parked = False
                bwd.extend(indices)
                granted += credits
            elif kind == "take_returns":
                assert call("producer", "take_returns") == (granted, list(bwd))
                bwd.clear()
                granted_seen = granted
            elif kind == "park_consumer":
                consumer_parked = call("consumer", "park_consumer")
                assert consumer_parked == (not fwd)
            elif kind == "unpark_consumer":
                call("consumer", "unpark_consumer")
                consumer_parked = False
            elif kind == "park_producer":
                producer_parked = call("producer", "park_producer", granted_seen)
                assert producer_parked == (granted == granted_seen and not bwd)
            else:
                call("producer", "unpark_producer")
                producer_parked = False
            counters = call("consumer", "counters")
            assert counters["consumer_parked"] == consumer_parked
            assert counters["producer_parked"] == producer_parked
            assert counters["fwd_tail"] - counters["fwd_head"] == len(fwd)
            assert counters["bwd_tail"] - counters["bwd_head"] == len(bwd)
    finally:
        for side in ("consumer", "producer"):
            call(side, "close")
        agents.alloc.free(block)


# ------------------------------------------------------------------------- free-running, real doorbell
def stress_side(role: str, region_name: str, offset: int, capacity: int, generation: int, count: int,
                endpoint: str, conn) -> None:
    """Producer: fills buffer i with the value i and pushes its descriptor; consumer: checks and gives
    back. Both park and sleep on a ZeroMQ PAIR socket when they find nothing to do; a wake-up that never
    comes shows as a 10 s silence, reported as a lost wake-up."""
    region = SharedRegion.attach(region_name)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.linger = 0
    data = region.array[offset + compiled.ring_bytes(capacity):][:NUM_BUFFERS * BUFFER_SIZE]
    slots = np.frombuffer(data, np.uint64).reshape(NUM_BUFFERS, -1)
    ring = None
    wakeups = parks = 0

    def sleep() -> None:
        nonlocal parks
        parks += 1
        if not sock.poll(10_000):
            raise AssertionError(f"{role}: lost wake-up after {parks} parks")
        sock.recv()

    try:
        if role == "producer":
            sock.connect(endpoint)
            ring = compiled.Ring(region.buf, region.generation_table, region.granule, offset, capacity, generation,
                                 True)
            conn.send("ready")
            free = deque(range(min(capacity, NUM_BUFFERS)))
            seen = 0
            for i in range(count):  # buffer i needs a free slot and a credit: i buffers were pushed
                while not free or seen <= i:
                    seen, back = ring.take_returns()
                    free.extend(back)
                    if free and seen > i:
                        break
                    if ring.park_producer(seen):
                        sleep()
                        ring.unpark_producer()
                slot = free.popleft()
                slots[slot][:] = i
                if ring.push([slot], [BUFFER_SIZE], 0):
                    sock.send(b"W")
                    wakeups += 1
        else:
            sock.bind(endpoint)
            conn.send("ready")
            conn.recv()  # the producer created the ring
            ring = attach_ring(region, offset, capacity, generation, num_buffers=NUM_BUFFERS, buffer_size=BUFFER_SIZE)
            if ring.give_back([], capacity):
                sock.send(b"W")
                wakeups += 1
            expected = 0
            while expected < count:
                _, indices, _ = ring.pop()
                if not indices:
                    if ring.park_consumer():
                        sleep()
                        ring.unpark_consumer()
                    continue
                for slot in indices:
                    row = slots[slot]
                    if not (row[0] == expected and row[-1] == expected):
                        raise AssertionError(f"buffer {slot} holds {row[0]}..{row[-1]}, expected {expected}")
                    expected += 1
                if ring.give_back(indices, len(indices)):
                    sock.send(b"W")
                    wakeups += 1
        conn.send(("done", wakeups, parks))
        conn.recv()  # both sides are done before either closes its socket
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        if ring is not None:
            ring.close()
        del slots, data
        sock.close()
        ctx.term()
        region.close()


@settings(max_examples=4, deadline=None)
@given(capacity=st.sampled_from([2, 8, 64]), count=st.integers(2_000, 20_000))
def test_free_running_producer_and_consumer_with_zeromq_wakeups(capacity, count):
    """Both sides run at full speed in their own processes: every value arrives once and in order (the
    buffer's bytes are visible before its descriptor), and no park misses its wake-up."""
    with SharedRegion.create(4 * MiB) as region:
        alloc = BuddyAllocator(region, min_block=4096)
        block = alloc.allocate(compiled.ring_bytes(capacity) + NUM_BUFFERS * BUFFER_SIZE, owner="stress")
        endpoint = f"ipc://@shmflow-test-ring-{os.getpid()}-{capacity}-{count}"
        conns, procs = {}, {}
        try:
            for role in ("consumer", "producer"):
                mine, theirs = SPAWN.Pipe()
                conns[role] = mine
                procs[role] = SPAWN.Process(target=stress_side, args=(role, region.name, block.offset, capacity,
                                                                      block.generation, count, endpoint, theirs))
                procs[role].start()
                assert mine.poll(60) and mine.recv() == "ready"
            conns["consumer"].send("go")
            results = {}
            for role, conn in conns.items():
                assert conn.poll(120), f"{role} did not finish"
                results[role] = conn.recv()
            for conn in conns.values():
                conn.send("bye")
            for role, result in results.items():
                assert result[0] == "done", f"{role}: {result}"
            for proc in procs.values():
                proc.join(30)
                assert proc.exitcode == 0
        finally:
            for proc in procs.values():
                reap(proc)
            alloc.free(block)


# ------------------------------------------------------------------------- gate: torn descriptors
@contextlib.contextmanager
def _partition_and_gate(region: SharedRegion):
    """(net, pool, part, gate): a shm channel in this process, connected; all closed after."""
    alloc = BuddyAllocator(region, min_block=4096)
    net = NetworkBufferPool(alloc, 16, BUFFER_SIZE)
    pool = net.create_buffer_pool(4, 16, name="producer")
    gate = InputGate(1, exclusive=4, floating=0, name="g")
    part = ResultPartition(pool, [gate.endpoint], channel_ids=0, name="p")
    try:
        gate.wait_connected(timeout=30)
        yield net, pool, part, gate
    finally:
        part.close()
        gate.close()
        pool.destroy()
        net.close(check=False)


def _publish_raw(region: SharedRegion, part: ResultPartition, index: int, size: int, *, advance: int = 1) -> None:
    """Write one forward entry the way a broken producer would, bypassing every check, and publish it."""
    ch = part.channels[0]
    base = ch.ring_block.offset
    tail = ch.ring.counters()["fwd_tail"]
    slot = tail & (ch.ring.capacity - 1)
    struct.pack_into("<II", region.buf, base + compiled.ENTRIES + 8 * slot, index, size)
    struct.pack_into("<Q", region.buf, base + compiled.FWD_TAIL, tail + advance)


@pytest.mark.parametrize("index, size, advance, what", [
    (16, 8, 1, r"descriptor \(16, 8\) at ring position 1 outside the sender's pool \(16 buffers of 4096 bytes\)"),
    (3, BUFFER_SIZE + 1, 1, r"descriptor \(3, 4097\) at ring position 1 outside"),
    (3, 8, 1 << 40, r"ring tail \d+ is \d+ entries ahead of head 1; it holds 16"),
])
def test_a_torn_descriptor_is_refused_never_followed(index, size, advance, what):
    with SharedRegion.create(4 * MiB) as region, _partition_and_gate(region) as (net, pool, part, gate):
        buf = part.request_buffer(timeout=5)
        buf.segment.put_bytes(0, b"fine")
        buf.size = 4
        part.send_buffer(0, buf)
        rb = gate.next_buffer(timeout=5)
        assert rb is not None and bytes(rb.view) == b"fine"
        rb.release()
        _publish_raw(region, part, index, size, advance=advance)
        with pytest.raises(DeserializationError, match=r"^channel g<-0: " + what):
            gate.next_buffer(timeout=5)
        with pytest.raises(DeserializationError):  # still refused: the head did not move past it
            gate.next_buffer(timeout=0)


def test_release_all_stops_at_a_buffer_released_twice_naming_it():
    with SharedRegion.create(4 * MiB) as region, _partition_and_gate(region) as (net, pool, part, gate):
        part.send_buffers(0, part.request_buffers(3, timeout=5))
        a, b, c = gate.next_buffers(timeout=5)
        b.release()
        with pytest.raises(DoubleFreeError, match=rf"^buffer {b.index} of channel 0 was released twice$"):
            gate.release_all([a, b, c])
        assert a.view is None and c.view is not None  # a before it released; c after it untouched
        assert gate.stats().unreleased == 1
        gate.release_all([c])
        assert gate.stats().unreleased == 0
        part.wait_all_recycled(timeout=5)
        assert pool.in_use() == 0


def test_a_return_of_a_buffer_not_in_flight_is_refused_naming_it():
    """The producer releases what came back before the bad index; what follows it stays in flight."""
    with SharedRegion.create(4 * MiB) as region, _partition_and_gate(region) as (net, pool, part, gate):
        bufs = part.request_buffers(3, timeout=5)
        part.send_buffers(0, bufs)
        a, b, c = (buf.index for buf in bufs)
        got = gate.next_buffers(timeout=5)
        assert [rb.index for rb in got] == [a, b, c]
        stray = next(i for i in range(16) if i not in (a, b, c))
        gate.channels[0].ring.give_back([a, stray, c], 0)  # what a broken consumer would send
        with pytest.raises(DeserializationError, match=rf"^channel p\[0\]: consumer recycled buffer {stray}, "
                           "not in flight$"):
            part.channels[0].take_returns()
        assert sorted(part.channels[0].in_flight) == [b, c] and pool.in_use() == 2
        assert bufs[0].refcount == 0 and bufs[2].refcount == 1


def test_a_closed_ring_is_detached_and_its_block_freed():
    """The producer closes: the ring's block returns to the allocator, and the gate stops using the ring
    (it parks without it instead of reading freed memory)."""
    with SharedRegion.create(4 * MiB) as region, _partition_and_gate(region) as (net, _pool, part, gate):
        alloc = net.allocator
        used = alloc.allocated_bytes
        part.close()
        assert alloc.allocated_bytes == used - 4096  # the ring's block (16 slots: one 4 KiB block)
        assert gate.next_buffer(timeout=0.2) is None
        assert gate._rings == []  # detached: RingGone was seen, nothing else


def test_ring_capacity_covers_the_pool():
    assert [ring_capacity(n) for n in (1, 2, 3, 49, 64, 65)] == [2, 2, 4, 64, 64, 128]


def ring_holder(region_name, offset, capacity, generation, conn):
    region = SharedRegion.attach(region_name)
    ring = compiled.Ring(region.buf, region.generation_table, region.granule, offset, capacity, generation, True)
    ring.push([1, 2], [10, 20], 0)
    conn.send("pushed")
    conn.recv()  # never answered: SIGKILL mid-ring


def test_descriptors_published_before_the_producer_is_killed_stay_readable():
    with SharedRegion.create(4 * MiB) as region:
        alloc = BuddyAllocator(region, min_block=4096)
        block = alloc.allocate(compiled.ring_bytes(8), owner="ring")
        mine, theirs = SPAWN.Pipe()
        proc = SPAWN.Process(target=ring_holder, args=(region.name, block.offset, 8, block.generation, theirs))
        proc.start()
        try:
            assert mine.poll(60) and mine.recv() == "pushed"
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(30)
            ring = attach_ring(region, block.offset, 8, block.generation, num_buffers=4, buffer_size=64)
            assert ring.pop() == (0, [1, 2], [10, 20])
            assert ring.park_consumer()  # nothing more: a consumer parks and waits for its keep-alive
            ring.close()
        finally:
            reap(proc)
        alloc.free(block)  # the arena's owner reclaims it (the coordinator, for a dead worker)


def test_a_ring_freed_by_its_producer_is_gone_for_its_consumer():
    with SharedRegion.create(4 * MiB) as region:
        alloc = BuddyAllocator(region, min_block=4096)
        block, producer = create_ring(alloc, 4, owner="ring")
        consumer = attach_ring(region, block.offset, 4, block.generation, num_buffers=4, buffer_size=64)
        offset, generation = block.offset, block.generation
        free_ring(producer, block, alloc)
        with pytest.raises(compiled.RingGone):
            consumer.park_consumer()
        consumer.close()
        with pytest.raises(compiled.RingGone):
            attach_ring(region, offset, 4, generation, num_buffers=4, buffer_size=64)
