"""Channels between real processes: buffers arrive in order, credits bound what is in flight,
a dead consumer's buffers return to their pool. Over the shm (descriptor) and tcp (bytes) transports."""

from __future__ import annotations

import os
import signal
import struct
import time

import numpy as np
import pytest
from helpers import SPAWN, reap

from runtime.memory import BuddyAllocator, SharedRegion
from runtime.network import NetworkBufferPool
from runtime.network.gate import InputGate
from runtime.network.partition import ResultPartition

MiB = 1 << 20
BUF = 32 * 1024


def _endpoint_for(transport: str) -> str | None:
    return "tcp://127.0.0.1:*" if transport == "tcp" else None


def producer(region_name, arena, transport, endpoint, nbufs, conn, exclusive_bound, batched=False):
    """Send ``nbufs`` buffers; buffer i holds the uint64 value i in every word.

    ``batched``: request up to 5 buffers at a time and send them together (the batch path)."""
    region = SharedRegion.attach(region_name)
    alloc = BuddyAllocator(region, offset=arena[0], size=arena[1])
    net = NetworkBufferPool(alloc, 64, BUF)
    pool = net.create_buffer_pool(8, 64, name="producer")
    part = ResultPartition(pool, [endpoint], channel_ids=0, transport=transport, name="p", max_backlog=4)
    conn.send("ready")
    conn.recv()  # start
    i = 0
    while i < nbufs:
        bufs = part.request_buffers(min(5, nbufs - i), timeout=30) if batched else [part.request_buffer(timeout=30)]
        assert 1 <= len(bufs) <= 5
        for buf in bufs:
            buf.segment.as_array(np.uint64)[:] = i
            buf.size = BUF if i % 3 else BUF // 2  # partly filled buffers too
            i += 1
        if batched:
            part.send_buffers(0, bufs)
        else:
            part.send_buffer(0, bufs[0])
    part.flush(timeout=30)
    part.wait_all_recycled(timeout=30)
    stats = part.stats()
    conn.send({"max_in_flight": stats.max_in_flight_per_channel, "sent": stats.buffers_sent,
               "peak_pool": pool.stats().peak_in_use, "blocked": stats.backpressure_seconds,
               "in_use_after": pool.in_use()})
    conn.recv()  # the test may kill the consumer meanwhile
    part.close()
    pool.destroy()
    net.close()
    region.close()


def consumer(transport, nbufs, conn, slow, exclusive, floating, hold_forever):
    gate = InputGate(1, exclusive=exclusive, floating=floating, endpoint=_endpoint_for(transport))
    conn.send(gate.endpoint)
    got, expected_next, ok = 0, 0, True
    while got < nbufs:
        rb = gate.next_buffer(timeout=30)
        assert rb is not None, "no buffer within 30s"
        words = np.frombuffer(rb.view, np.uint64)
        size_ok = len(rb.view) == (BUF if got % 3 else BUF // 2)
        ok = ok and size_ok and bool((words == expected_next).all())
        expected_next += 1
        got += 1
        if hold_forever:
            conn.send(("holding", got))
            conn.recv()  # never answered: SIGKILL
        if slow:
            time.sleep(0.002)  # sleep-ok: a slow consumer is what this test measures
        rb.release()
    conn.send(("done", got, ok))
    gate.close()


def _run_pair(transport, nbufs, *, slow=False, exclusive=2, floating=4, batched=False):
    with SharedRegion.create(64 * MiB) as region:
        p_conn, p_child = SPAWN.Pipe()
        c_conn, c_child = SPAWN.Pipe()
        cons = SPAWN.Process(target=consumer, args=(transport, nbufs, c_child, slow, exclusive, floating, False))
        cons.start()
        try:
            assert c_conn.poll(60)
            endpoint = c_conn.recv()
            prod = SPAWN.Process(target=producer, args=(region.name, (0, 8 * MiB), transport, endpoint, nbufs,
                                                        p_child, exclusive + floating, batched))
            prod.start()
            try:
                assert p_conn.poll(60) and p_conn.recv() == "ready"
                p_conn.send("go")
                assert c_conn.poll(120), "consumer did not finish"
                status, got, ok = c_conn.recv()
                assert (status, got, ok) == ("done", nbufs, True)
                assert p_conn.poll(60)
                stats = p_conn.recv()
                p_conn.send("bye")
                prod.join(30)
                cons.join(30)
                assert prod.exitcode == 0 and cons.exitcode == 0
                return stats
            finally:
                reap(prod)
        finally:
            reap(cons)


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "batched"])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_buffers_arrive_in_order_and_all_return(transport, batched):
    stats = _run_pair(transport, 3000, batched=batched)
    assert stats["sent"] == 3000
    assert stats["in_use_after"] == 0


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "batched"])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_slow_consumer_backpressures_within_the_credit_bound(transport, batched):
    exclusive, floating = 2, 4
    stats = _run_pair(transport, 400, slow=True, exclusive=exclusive, floating=floating, batched=batched)
    assert stats["max_in_flight"] <= exclusive + floating
    assert stats["blocked"] > 0  # the producer waited for credits
    # the producer's memory is flat: bounded by credits and the backlog limit, not by the input
    filling = 5 if batched else 1  # the buffers requested at once
    assert stats["peak_pool"] <= exclusive + floating + 4 + filling  # in flight + max_backlog + being filled


def test_a_dead_consumers_buffers_return_to_the_pool():
    with SharedRegion.create(64 * MiB) as region:
        alloc = BuddyAllocator(region, offset=0, size=8 * MiB)
        net = NetworkBufferPool(alloc, 16, BUF)
        pool = net.create_buffer_pool(4, 16, name="producer")
        c_conn, c_child = SPAWN.Pipe()
        cons = SPAWN.Process(target=consumer, args=("shm", 100, c_child, False, 4, 0, True))
        cons.start()
        try:
            assert c_conn.poll(60)
            part = ResultPartition(pool, [c_conn.recv()], channel_ids=0, transport="shm", name="p")
            for _ in range(4):
                buf = part.request_buffer(timeout=30)
                buf.size = 8
                part.send_buffer(0, buf)
            part.flush(timeout=30)
            assert c_conn.poll(60) and c_conn.recv() == ("holding", 1)
            assert pool.in_use() == 4
            os.kill(cons.pid, signal.SIGKILL)
            cons.join(30)
            assert part.reclaim_channel(0) == 4
            assert pool.in_use() == 0
            part.close()
        finally:
            reap(cons)
        pool.destroy()
        net.close()


class _Cancelled(Exception):
    pass


def test_every_wait_of_a_gate_and_a_partition_calls_keep_alive_and_ends_when_it_raises():
    # A producer that never says hello: the gate's wait_connected keeps calling keep_alive (the worker's
    # heartbeat and cancel check) and ends as soon as it raises, long before its own timeout.
    from runtime.network.transport import KEEP_ALIVE_INTERVAL

    calls: list[float] = []

    def keep_alive():
        calls.append(time.monotonic())
        if len(calls) == 6:
            raise _Cancelled

    with InputGate(2, name="lonely", keep_alive=keep_alive) as gate:
        start = time.monotonic()
        with pytest.raises(_Cancelled):
            gate.wait_connected(timeout=60)
        assert time.monotonic() - start < 5  # six calls, at most KEEP_ALIVE_INTERVAL apart (generous bound)
        assert max(b - a for a, b in zip([start, *calls], calls)) < 2 * KEEP_ALIVE_INTERVAL + 0.5
        calls.clear()
        with pytest.raises(_Cancelled):
            gate.next_buffer(timeout=60)
    with SharedRegion.create(4 * MiB) as region:  # a partition whose consumer grants no credit: flush waits
        alloc = BuddyAllocator(region)
        net = NetworkBufferPool(alloc, 8, BUF)
        pool = net.create_buffer_pool(2, 8, name="p")
        with InputGate(1, name="silent") as gate:
            calls.clear()
            part = ResultPartition(pool, [gate.endpoint], channel_ids=0, name="p", keep_alive=keep_alive)
            try:
                buf = part.request_buffer(timeout=5)
                buf.size = 8
                part.send_buffer(0, buf, block=False)
                with pytest.raises(_Cancelled):
                    part.flush(timeout=60)  # the gate never reads its socket: no credit ever arrives
            finally:
                part.close()
        pool.destroy()
        net.close(check=False)


@pytest.mark.parametrize("header, payload, what", [
    (b"B" + struct.pack("<III", 0, 1, 5), [b"1234"], r"bytes message announces 5 bytes of buffers; got 4"),
    (b"B" + struct.pack("<II", 0, 2) + struct.pack("<I", 4), [b"1234"],
     r"bytes header announces 2 buffers \(17 bytes\); got 13 bytes"),
    (b"B" + struct.pack("<III", 0, 1, 6), [b"123", b"456"], r"a buffer of 6 bytes crosses the end of a payload frame"),
])
def test_a_malformed_bytes_message_is_refused(header, payload, what):
    """tcp: a batch whose header does not match its payload frames fails with DeserializationError."""
    import zmq

    from runtime.errors import DeserializationError
    from runtime.network import messages
    from runtime.network.transport import context, make_socket

    with InputGate(1, name="g", endpoint="tcp://127.0.0.1:*") as gate:
        sock = make_socket(context(), zmq.DEALER, identity=b"ch0")
        try:
            sock.connect(gate.endpoint)
            sock.send(messages.encode_hello(channel=0, transport="tcp"))
            gate.wait_connected(timeout=30)
            sock.send_multipart([header, *payload])
            with pytest.raises(DeserializationError, match=r"^channel g<-0: " + what + "$"):
                gate.next_buffer(timeout=30)
        finally:
            sock.close(linger=0)


def _tcp_pair(region, nbuffers, credits):
    """A tcp partition and its gate in this process: (net, pool, part, gate), the gate connected."""
    net = NetworkBufferPool(BuddyAllocator(region), nbuffers, BUF)
    pool = net.create_buffer_pool(nbuffers, nbuffers, name="producer")
    gate = InputGate(1, exclusive=credits, floating=0, name="g", endpoint="tcp://127.0.0.1:*")
    part = ResultPartition(pool, [gate.endpoint], channel_ids=0, transport="tcp", name="p", ship_batch=1,
                           max_backlog=nbuffers)
    gate.wait_connected(timeout=30)
    gate.flush_credits()
    return net, pool, part, gate


def _receive(gate, n):
    got = []
    while len(got) < n:
        more = gate.next_buffers(timeout=30)
        assert more, "no buffer within 30 s"
        got.extend(more)
    return got


@pytest.mark.parametrize("order", ["back to back", "scattered"])
def test_tcp_sends_runs_of_buffers_without_a_copy_and_takes_them_back_once_zmq_let_go(order):
    """tcp: buffers back to back in the pool travel as views of it (zero-copy frames, one per run of full
    buffers); a batch scattered over more than MAX_FRAMES runs is joined into one frame. Either way the
    consumer reads every buffer's bytes in order, and each buffer returns to the pool once sent."""
    from runtime.network.partition import MAX_FRAMES

    n = 24
    with SharedRegion.create(8 * MiB) as region:
        net, pool, part, gate = _tcp_pair(region, n, credits=n)
        try:
            bufs = part.request_buffers(n, timeout=30)
            assert [b.index for b in bufs] == list(range(n))
            if order == "scattered":
                bufs = bufs[::2] + bufs[1::2]  # no two neighbours in a row: n runs
            sizes = []
            for k, buf in enumerate(bufs):
                size = BUF if k % 5 else BUF - 8 * k  # some partly filled: a run ends there
                buf.segment.as_array(np.uint64)[:] = k
                buf.size = size
                sizes.append(size)
            part.send_buffers(0, bufs)
            part.flush(timeout=30)
            channel = part.channels[0]
            assert channel.zero_copy_sent == (n if order == "back to back" else 0)
            assert order == "back to back" or n > MAX_FRAMES
            got = _receive(gate, n)
            assert [len(rb.view) for rb in got] == sizes
            for k, rb in enumerate(got):
                assert (np.frombuffer(rb.view, np.uint64) == k).all()
            gate.release_all(got)
            part.wait_all_recycled(timeout=30)  # zmq let go of every frame: all buffers are back
            assert channel.zero_copy_returned == channel.zero_copy_sent
            assert pool.in_use() == 0 and part.stats().in_flight == 0
        finally:
            part.close()
            gate.close()
            pool.destroy()
            net.close()


def test_closing_a_tcp_partition_takes_back_the_buffers_zmq_still_held():
    """tcp: closing right after shipping (zmq may not have sent the zero-copy frames yet, and drops what it
    did not) returns every buffer to the pool: the pool closes without a leak."""
    n = 16
    with SharedRegion.create(8 * MiB) as region:
        net, pool, part, gate = _tcp_pair(region, n, credits=n)
        try:
            bufs = part.request_buffers(n, timeout=30)
            for buf in bufs:
                buf.size = BUF
            part.send_buffers(0, bufs)
            part.flush(timeout=30)
            assert part.channels[0].zero_copy_sent == n
        finally:
            part.close()
            gate.close()
        assert pool.in_use() == 0
        assert part.doorbell is None
        pool.destroy()
        net.close()  # check=True: raises if a buffer were still lent


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_producer_without_credits_announces_its_backlog_and_gets_floating_credits(transport):
    """Its last data said "no backlog", so the gate took its floating credits back; once its queue grows with
    no credit left, it announces the backlog (an ``A`` message) and the gate lends it floating credits: all
    six buffers arrive although the consumer releases none."""
    exclusive, floating = 2, 4
    with SharedRegion.create(8 * MiB) as region:
        net = NetworkBufferPool(BuddyAllocator(region), 16, BUF)
        pool = net.create_buffer_pool(16, 16, name="producer")
        gate = InputGate(1, exclusive=exclusive, floating=floating, name="g", endpoint=_endpoint_for(transport))
        part = ResultPartition(pool, [gate.endpoint], channel_ids=0, transport=transport, name="p", ship_batch=1,
                               max_backlog=16)
        try:
            gate.wait_connected(timeout=30)
            gate.flush_credits()
            got = []
            for _ in range(exclusive + floating):
                buf = part.request_buffer(timeout=30)
                buf.size = 8
                part.send_buffer(0, buf, block=False)
                got.extend(gate.next_buffers(timeout=0))
            deadline = time.monotonic() + 30
            while len(got) < exclusive + floating and time.monotonic() < deadline:
                part.ship_all()
                got.extend(gate.next_buffers(timeout=0.05))
            assert len(got) == exclusive + floating
            assert part.stats().backlog == 0
            assert gate.stats().floating_lent == floating
            gate.release_all(got)
        finally:
            part.close()
            gate.close()
            pool.destroy()
            net.close(check=False)
