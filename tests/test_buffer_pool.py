"""Network buffer pools: counts, min/max shares, redistribution, errors, stats, timeouts, and
backpressure across a real consumer process."""

from __future__ import annotations

import dataclasses
import gc
import os
import queue
import re
import threading

import msgpack
import pytest
from helpers import SPAWN, reap, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import (
    DoubleFreeError,
    InsufficientNetworkBuffersError,
    InvalidHandleError,
    InvalidSizeError,
    OutOfMemoryError,
    ReadOnlySegmentError,
    SegmentFreedError,
    ShmflowError,
)
from runtime.memory import SharedRegion
from runtime.network.buffer_pool import (
    BufferDescriptor,
    ClosedResourceError,
    LocalBufferPool,
    LocalBufferPoolStats,
    NetworkBuffer,
    NetworkBufferPool,
    NetworkBufferPoolStats,
    buffer_view,
    release_buffers,
)

KiB = 1024
REMEDY = ("raise memory.network.fraction, memory.network.min or memory.region.size, "
          "or lower network.buffers-per-channel / network.floating-buffers-per-gate")


@pytest.fixture
def net(alloc):
    pool = NetworkBufferPool(alloc, 8, 4096)
    yield pool
    pool.close()


# ------------------------------------------------------------------ carving
def test_carves_one_block_of_fixed_size_buffers(alloc):
    with NetworkBufferPool(alloc, 6, 8192, owner="net-w0") as net:
        assert alloc.stats().allocated_bytes_by_owner == {"net-w0": 64 * KiB}  # 48 KiB rounded up
        stats = net.stats()
        assert (stats.num_buffers, stats.buffer_size, stats.block_bytes, stats.free) == (6, 8192, 64 * KiB, 6)
        pool = net.create_buffer_pool(6, 6, name="gate-0")
        bufs = [pool.request_buffer(timeout=5) for _ in range(6)]
        assert sorted(b.index for b in bufs) == list(range(6))
        for b in bufs:
            assert b.segment.offset == net.block_offset + b.index * 8192
            assert (b.capacity, b.size, b.refcount, b.segment.size) == (8192, 0, 1, 8192)
            b.segment.fill(b.index)
        assert [net.region.array[net.block_offset + i * 8192 + 100] for i in range(6)] == list(range(6))
        for b in bufs:
            b.release()
    assert alloc.stats().allocated_bytes == 0
    alloc.check_invariants()


@pytest.mark.parametrize(("num", "size", "exc", "message"), [
    (0, 4096, InvalidSizeError, "num_buffers must be >= 1; got 0"),
    ("8", 4096, TypeError, "num_buffers must be an int; got str"),
    (8, 6000, InvalidSizeError, "network buffer size must be a power of two >= the allocator's min_block "
                                "(4096); got 6000; change memory.segment.size"),
    (8, 2048, InvalidSizeError, "network buffer size must be a power of two >= the allocator's min_block "
                                "(4096); got 2048; change memory.segment.size"),
])
def test_bad_arguments_are_rejected(alloc, num, size, exc, message):
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        NetworkBufferPool(alloc, num, size)
    assert alloc.stats().allocated_bytes == 0


def test_carving_more_than_the_allocator_holds_names_numbers_and_keys(alloc):
    with pytest.raises(OutOfMemoryError, match=r"^cannot carve 256 network buffers of 32 KiB \(8 MiB\) for "
                       r"'network': largest free block 4 MiB, 4 MiB of 4 MiB free; raise memory.region.size, "
                       r"or lower memory.network.fraction / memory.network.max$"):
        NetworkBufferPool(alloc, 256, 32 * KiB)


def test_from_segment_carves_a_granted_block_without_freeing_it(alloc):
    arena = alloc.allocate(64 * KiB, owner="worker-1")
    with NetworkBufferPool.from_segment(arena, 16 * KiB) as net:
        assert (net.num_buffers, net.block_offset, net.generation) == (4, arena.offset, arena.generation)
        pool = net.create_buffer_pool(1, 4, name="p")
        assert pool.network_pool is net and net.segment is arena
        buf = pool.request_buffer(timeout=5)
        assert buf.segment.offset == arena.offset + buf.index * 16 * KiB
        buf.release()
    assert not arena.freed  # the granter's to free
    with pytest.raises(InsufficientNetworkBuffersError, match=r"^num_buffers must be <= 4 for a segment of "
                       r"64 KiB and buffers of 16 KiB; got 5$"):
        NetworkBufferPool.from_segment(arena, 16 * KiB, num_buffers=5)
    with pytest.raises(InvalidSizeError, match=r"power of two in \[256, 65536\] for this segment; got 3000"):
        NetworkBufferPool.from_segment(arena, 3000)
    arena.free()
    with pytest.raises(SegmentFreedError):
        NetworkBufferPool.from_segment(arena, 16 * KiB)


# ------------------------------------------------------------------ shares
def test_sum_of_mins_must_fit_flinks_insufficient_network_buffers(alloc):
    with NetworkBufferPool(alloc, 64, 32 * KiB) as net:
        pools = [net.create_buffer_pool(20, 40, name="gate-1"), net.create_buffer_pool(20, 40, name="gate-2")]
        message = (f"insufficient network buffers for 'gate-3': required 40, available 24 of 64 "
                   f"(buffer size 32 KiB); {REMEDY}")
        with pytest.raises(InsufficientNetworkBuffersError, match=f"^{re.escape(message)}$"):
            net.create_buffer_pool(40, 40, name="gate-3")
        assert net.stats().required == 40
        net.destroy_buffer_pool(pools[0])  # frees its guarantee
        gate3 = net.create_buffer_pool(40, 40, name="gate-3")
        assert net.stats().required == 60
        assert gate3.available() == 40


@pytest.mark.parametrize(("lo", "hi", "exc", "message"), [
    (-1, 4, InvalidSizeError, "min_buffers must be >= 0; got -1"),
    (3, 2, InvalidSizeError, "max_buffers must be >= 3; got 2"),
    (0, 0, InvalidSizeError, "max_buffers must be >= 1; got 0"),
    (1, 2.0, TypeError, "max_buffers must be an int; got float"),
])
def test_bad_shares_are_rejected(net, lo, hi, exc, message):
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        net.create_buffer_pool(lo, hi, name="x")


def test_min_is_guaranteed_and_max_caps_excess(net):
    a = net.create_buffer_pool(2, 4, name="a")
    b = net.create_buffer_pool(2, 3, name="b")
    assert (a.available(), b.available()) == (4, 3)
    held_a = [a.try_request_buffer() for _ in range(4)]
    assert a.try_request_buffer() is None  # at its max although 4 are free
    assert (net.stats().free, b.available()) == (4, 3)
    held_b = [b.try_request_buffer() for _ in range(3)]
    assert b.try_request_buffer() is None and None not in held_a + held_b
    assert net.stats().as_dict() == {
        "num_buffers": 8, "buffer_size": 4096, "block_bytes": 32 * KiB, "free": 1, "required": 4,
        "reserved": 0, "in_use": 7, "local_pools": 2, "in_use_by_pool": {"a": 4, "b": 3}}
    for buf in held_a + held_b:
        buf.release()
    # each keeps its min; the excess went back to the network pool
    assert (a.stats().held, b.stats().held, net.stats().free) == (2, 2, 4)


def test_try_request_buffers_takes_what_the_share_allows_under_one_lock(net):
    a = net.create_buffer_pool(2, 5, name="a")
    first = a.try_request_buffers(3)
    assert [b.refcount for b in first] == [1, 1, 1] and len({b.index for b in first}) == 3
    rest = a.try_request_buffers(10)
    assert len(rest) == 2  # capped at the pool's max of 5
    assert a.try_request_buffers(4) == [] and a.in_use() == 5
    for buf in first + rest:
        buf.release()
    assert a.in_use() == 0
    a.destroy()
    with pytest.raises(ClosedResourceError, match="destroyed"):
        a.try_request_buffers(1)


def test_batch_release_recycles_and_voids_each_buffer(net):
    pool = net.create_buffer_pool(2, 6, name="p")
    bufs = pool.try_request_buffers(6)
    bufs[0].retain()
    release_buffers(bufs)
    assert pool.in_use() == 1 and bufs[0].refcount == 1  # the retained one is still lent
    for buf in bufs[1:]:
        assert buf.refcount == 0
        with pytest.raises(SegmentFreedError):
            buf.segment.get_int64(0)
        with pytest.raises(SegmentFreedError, match=r"^array of network buffer \d+ of 'p', which was recycled"):
            buf.array  # noqa: B018
    bufs[0].release()
    assert (pool.stats().held, net.stats().free) == (2, 6)  # the min stays with the pool, the excess went back


def test_batch_release_of_a_buffer_released_twice_names_it_and_stops_there(net):
    pool = net.create_buffer_pool(0, 8, name="p")
    a, b, c = pool.try_request_buffers(3)
    b.release()
    message = (f"network buffer {b.index} of local pool 'p' was released after it was recycled; "
               "release each reference exactly once")
    with pytest.raises(DoubleFreeError, match=f"^{re.escape(message)}$"):
        release_buffers([a, b, c])
    assert (a.refcount, c.refcount, pool.in_use()) == (0, 1, 1)  # a before it released; c after it untouched
    with pytest.raises(DoubleFreeError):
        release_buffers([c, c])  # the same reference twice in one batch
    assert pool.in_use() == 0 and net.stats().free == 8


def test_batch_release_runs_each_pools_listeners_once_outside_the_lock(net):
    p = net.create_buffer_pool(2, 4, name="p")
    q = net.create_buffer_pool(0, 4, name="q")
    calls = []

    def listener(pool: LocalBufferPool) -> None:
        calls.append((pool.name, pool.available()))  # would deadlock if called under the lock

    p.add_listener(listener)
    q.add_listener(listener)
    mine, theirs = p.try_request_buffers(2), q.try_request_buffers(3)
    release_buffers(mine)  # p keeps both (its min): only p hears, once
    assert calls == [("p", 4)]
    calls.clear()
    release_buffers(theirs)  # excess back to the network pool: every listening pool with room hears, once
    assert sorted(calls) == [("p", 4), ("q", 4)]
    calls.clear()
    p.remove_listener(listener)
    q.remove_listener(listener)
    release_buffers(p.try_request_buffers(1))
    assert calls == []


class _PoolModel:
    """The redistribution policy one buffer at a time, in counts (see the module docstring of buffer_pool)."""

    def __init__(self, num_buffers: int, shares: list[tuple[int, int]]) -> None:
        self.free, self.reserved = num_buffers, sum(lo for lo, _ in shares)
        self.pools = [{"min": lo, "max": hi, "out": 0, "avail": 0, "destroyed": False} for lo, hi in shares]

    def take(self, i: int) -> bool:
        p = self.pools[i]
        if p["avail"]:
            p["avail"] -= 1
        elif p["out"] < p["min"] and self.free:
            self.reserved -= 1
            self.free -= 1
        elif p["out"] < p["max"] and self.free > self.reserved:
            self.free -= 1
        else:
            return False
        p["out"] += 1
        return True

    def recycle(self, i: int) -> None:
        p = self.pools[i]
        p["out"] -= 1
        if not p["destroyed"] and p["out"] + p["avail"] < p["min"]:
            p["avail"] += 1
        else:
            self.free += 1

    def destroy(self, i: int) -> None:
        p = self.pools[i]
        p["destroyed"] = True
        self.reserved -= max(0, p["min"] - p["out"] - p["avail"])
        self.free += p["avail"]
        p["avail"] = 0

    def counts(self) -> tuple[int, int, list[tuple[int, int]]]:
        return self.free, self.reserved, [(p["out"] + p["avail"], p["out"]) for p in self.pools]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["take", "take", "release", "destroy"]), st.integers(0, 2),
                          st.integers(0, 9)), max_size=30))
def test_batch_take_and_release_match_the_policy_one_at_a_time(alloc, steps):
    """Pools driven in batches (try_request_buffers, release_buffers) and one buffer at a time hold what
    the policy gives one buffer at a time. (Each example closes its network pools, so the shared
    allocator is as fresh as the fixture's.)"""
    shares = [(1, 4), (2, 8), (0, 3)]
    model = _PoolModel(8, shares)
    nets = [NetworkBufferPool(alloc, 8, 4096, owner=f"n{k}") for k in range(2)]
    pools = [[n.create_buffer_pool(lo, hi, name=f"p{i}") for i, (lo, hi) in enumerate(shares)] for n in nets]
    held: list[list[list[NetworkBuffer]]] = [[[], [], []], [[], [], []]]
    try:
        for kind, which, count in steps:
            if model.pools[which]["destroyed"]:
                continue
            if kind == "take":
                expected = sum(model.take(which) for _ in range(count))
            elif kind == "release":
                for _ in range(min(count, model.pools[which]["out"])):
                    model.recycle(which)
            else:
                model.destroy(which)
            for batch in (False, True):
                pool, mine = pools[batch][which], held[batch][which]
                if kind == "take":
                    got = pool.try_request_buffers(count) if batch else [
                        b for b in (pool.try_request_buffer() for _ in range(count)) if b is not None]
                    assert len(got) == expected
                    mine.extend(got)
                elif kind == "release":
                    gone, mine[:] = mine[:count], mine[count:]
                    if batch:
                        release_buffers(gone)
                    else:
                        for buf in gone:
                            buf.release()
                else:
                    pool.destroy()
                stats = nets[batch].stats()
                assert (stats.free, stats.reserved, [(p.stats().held, p.in_use()) for p in pools[batch]]) \
                    == model.counts()
            assert [sorted(b.index for b in h) for h in held[0]] == [sorted(b.index for b in h) for h in held[1]]
    finally:
        for k in range(2):
            for h in held[k]:
                release_buffers(h)
            nets[k].close()


def test_excess_is_redistributed_to_a_pool_that_still_needs_its_min(net):
    a = net.create_buffer_pool(2, 8, name="a")
    held = [a.try_request_buffer() for _ in range(8)]  # a takes every excess buffer
    assert None not in held and a.try_request_buffer() is None
    c = net.create_buffer_pool(4, 4, name="c")  # guaranteed 4, but a holds them for now
    assert c.try_request_buffer() is None and c.available() == 0
    held.pop().release()  # a is above its min: the buffer goes back and c may take it
    assert c.available() == 1
    first = c.try_request_buffer()
    assert first is not None and c.try_request_buffer() is None
    held.pop().release()
    assert a.try_request_buffer() is None  # a free buffer, but reserved for c's min
    got = [first, c.try_request_buffer()]
    for buf in held[:-2]:
        buf.release()  # down to a's min: the last ones stay with a
    got += [c.try_request_buffer(), c.try_request_buffer()]
    assert None not in got and c.try_request_buffer() is None
    assert (a.stats().held, a.stats().in_use, c.stats().in_use, net.stats().reserved) == (2, 2, 4, 0)
    for buf in held[-2:] + got:
        buf.release()
    assert (a.stats().held, c.stats().held, net.stats().free) == (2, 4, 2)


def test_blocked_requester_of_another_pool_is_woken_by_returned_excess(net):
    a = net.create_buffer_pool(0, 8, name="a")
    b = net.create_buffer_pool(0, 8, name="b")
    held = [a.request_buffer(timeout=5) for _ in range(8)]
    result, done = [], threading.Event()

    def request():
        result.append(b.request_buffer(timeout=30))
        done.set()

    thread = threading.Thread(target=request)
    thread.start()
    wait_until(lambda: b.stats().waiters == 1, timeout=10, msg="b's requester to block")
    assert not done.is_set()
    held[3].release()
    assert done.wait(30)
    thread.join(10)
    assert result[0].index == held[3].index and b.stats().blocked_requests == 1
    for buf in held[:3] + held[4:] + result:
        buf.release()


# ------------------------------------------------------------------ buffers
def test_refcount_retain_release_and_use_after_recycle(net):
    pool = net.create_buffer_pool(1, 1, name="p")
    buf = pool.request_buffer(timeout=5)
    assert buf.retain() is buf and buf.refcount == 2
    buf.release()
    assert (buf.refcount, pool.in_use()) == (1, 1)
    buf.segment.put_int64(0, 7)
    buf.release()
    assert (buf.refcount, pool.in_use()) == (0, 0)
    with pytest.raises(SegmentFreedError, match=r"^get_int64 on a freed segment"):
        buf.segment.get_int64(0)
    message = (f"network buffer {buf.index} of local pool 'p' was released after it was recycled; "
               "release each reference exactly once")
    with pytest.raises(DoubleFreeError, match=f"^{re.escape(message)}$"):
        buf.release()
    with pytest.raises(DoubleFreeError, match=r"^retain of network buffer \d+ of 'p', which was recycled"):
        buf.retain()
    with pytest.raises(DoubleFreeError):
        buf.descriptor()
    again = pool.request_buffer(timeout=5)
    assert again.index == buf.index and again is not buf and again.segment is not buf.segment
    assert again.segment.get_int64(0) == 7  # same bytes, fresh view
    with pytest.raises(DoubleFreeError):
        pool.recycle(buf)  # the stale object cannot return the new owner's buffer
    pool.recycle(again)
    assert pool.in_use() == 0


def test_size_is_bounded_by_capacity(net):
    pool = net.create_buffer_pool(1, 1, name="p")
    buf = pool.request_buffer(timeout=5)
    buf.size = 4096
    with pytest.raises(InvalidSizeError, match=r"^buffer size must be in \[0, 4096\]; got 4097$"):
        buf.size = 4097
    with pytest.raises(InvalidSizeError):
        buf.size = -1
    assert buf.size == 4096
    buf.release()


def test_recycle_rejects_foreign_and_unknown_buffers(net):
    p = net.create_buffer_pool(1, 2, name="p")
    q = net.create_buffer_pool(1, 2, name="q")
    buf = p.request_buffer(timeout=5)
    with pytest.raises(InvalidHandleError, match=r"^network buffer \d+ belongs to 'p', not to 'q'$"):
        q.recycle(buf)
    with pytest.raises(InvalidHandleError, match=r"^buffer descriptor .* does not name a buffer of local pool "
                       r"'q' \(pool id 1, block offset 0, generation 0\)$"):
        q.recycle_descriptor(buf.descriptor())
    with pytest.raises(InvalidHandleError, match=r"^buffer index must be in \[0, 8\); got 8$"):
        p.recycle_index(8)
    with pytest.raises(InvalidHandleError, match=r"^a buffer descriptor is \(pool_id, index, size, offset, "
                       r"generation, block_offset\); got 'junk'$"):
        p.recycle_descriptor("junk")
    desc = buf.descriptor()
    p.recycle_descriptor(list(desc))  # any 6-sequence, as msgpack gives it back
    with pytest.raises(DoubleFreeError):
        p.recycle_descriptor(desc)
    with pytest.raises(DoubleFreeError):
        p.recycle_index(desc.index)


def test_descriptor_resolves_to_a_read_only_view_of_the_filled_bytes(region, net):
    pool = net.create_buffer_pool(1, 1, name="p")
    buf = pool.request_buffer(timeout=5)
    buf.segment.put_bytes(0, b"hello")
    buf.size = 5
    desc = buf.descriptor()
    assert desc == BufferDescriptor(pool.pool_id, buf.index, 5, buf.segment.offset, 0, net.block_offset)
    assert BufferDescriptor(*msgpack.unpackb(msgpack.packb(desc))) == desc
    view = buffer_view(region, msgpack.unpackb(msgpack.packb(desc)))
    assert view.get_bytes(0, 5) == b"hello" and view.size == 5
    with pytest.raises(ReadOnlySegmentError):
        view.put_bytes(0, b"x")
    with pytest.raises(IndexError):
        view.get_bytes(0, 6)  # past the filled bytes
    buf.release()
    net.close()
    with pytest.raises(SegmentFreedError):
        view.get_bytes(0, 1)  # the pool's block was freed
    assert view.freed
    with pytest.raises(InvalidHandleError, match=r"^stale buffer descriptor \(pool 0, buffer \d+\): generation 0, "
                       r"block at offset 0 has 1; its network buffer pool was closed$"):
        buffer_view(region, desc)
    with pytest.raises(InvalidHandleError, match="must lie in region"):
        buffer_view(region, (0, 0, 8, region.size, 0, 0))


# ------------------------------------------------------------------ blocking
def test_request_blocks_until_another_thread_recycles(net):
    pool = net.create_buffer_pool(2, 2, name="p")
    held = [pool.request_buffer(timeout=5) for _ in range(2)]
    result, done = [], threading.Event()

    def request():
        result.append(pool.request_buffer(timeout=30))
        done.set()

    thread = threading.Thread(target=request)
    thread.start()
    wait_until(lambda: pool.stats().waiters == 1, timeout=10, msg="requester to block")
    assert not done.is_set() and pool.available() == 0
    held[1].release()
    assert done.wait(30)
    thread.join(10)
    assert result[0].index == held[1].index
    stats = pool.stats()
    assert (stats.requests, stats.blocked_requests, stats.waiters, stats.peak_in_use) == (3, 1, 0, 2)
    assert stats.blocked_seconds > 0.0
    held[0].release()
    result[0].release()


def test_request_timeout_names_pool_shares_and_key(net):
    pool = net.create_buffer_pool(1, 1, name="gate-7")
    buf = pool.request_buffer(timeout=5)
    assert pool.try_request_buffer() is None
    message = ("request_buffer on local buffer pool 'gate-7' timed out after 0.01 s: 1 buffers in use "
               "(min 1, max 1), 7 of 8 free in the network pool; the consumers recycle too slowly, "
               "or raise network.buffers-per-channel")
    with pytest.raises(TimeoutError, match=f"^{re.escape(message)}$"):
        pool.request_buffer(timeout=0.01)
    with pytest.raises(TimeoutError, match="^request_buffer on local buffer pool 'gate-7' timed out after 0 s"):
        pool.request_buffer(timeout=0)
    with pytest.raises(TimeoutError, match="^wait_available on local buffer pool 'gate-7'"):
        pool.wait_available(timeout=0.01)
    stats = pool.stats()
    assert (stats.requests, stats.blocked_requests, stats.waiters) == (1, 2, 0)
    buf.release()
    pool.wait_available(timeout=0)  # returns at once: a buffer is there


def test_destroy_wakes_blocked_requesters_and_returns_buffers(net):
    pool = net.create_buffer_pool(2, 2, name="gate-1")
    other = net.create_buffer_pool(0, 8, name="other")
    held = [pool.request_buffer(timeout=5) for _ in range(2)]
    errors, done = [], threading.Event()

    def request():
        try:
            pool.request_buffer(timeout=30)
        except ClosedResourceError as exc:
            errors.append(str(exc))
        done.set()

    thread = threading.Thread(target=request)
    thread.start()
    wait_until(lambda: pool.stats().waiters == 1, timeout=10, msg="requester to block")
    net.destroy_buffer_pool(pool)
    assert done.wait(30)
    thread.join(10)
    assert errors == ["local buffer pool 'gate-1' was destroyed; no buffers can be requested from it"]
    assert pool.destroyed and pool.available() == 0 and net.stats().local_pools == 1
    with pytest.raises(ClosedResourceError):
        pool.try_request_buffer()
    assert other.available() == 6  # lent buffers stay lent until released
    held[0].segment.put_int64(0, 1)  # still valid
    for buf in held:
        buf.release()
    assert other.available() == 8 and net.stats().in_use_by_pool == {}
    pool.destroy()  # idempotent


def test_close_reports_leaked_buffers_and_voids_them(alloc):
    net = NetworkBufferPool(alloc, 4, 4096, owner="net-w3")
    a = net.create_buffer_pool(1, 4, name="gate-a")
    b = net.create_buffer_pool(1, 4, name="part-b")
    leaked = [a.request_buffer(timeout=5), a.request_buffer(timeout=5), b.request_buffer(timeout=5)]
    with pytest.raises(ShmflowError, match=r"^network buffer pool 'net-w3' closed with 3 buffers still in use: "
                       r"2 by 'gate-a', 1 by 'part-b'; release them before close\(\)$"):
        net.close()
    assert net.closed and a.destroyed and b.destroyed
    assert alloc.stats().allocated_bytes == 0  # the block was freed all the same
    with pytest.raises(SegmentFreedError):
        leaked[0].segment.get_bytes(0, 1)
    leaked[0].release()  # a late release is harmless
    net.close()  # idempotent
    with pytest.raises(ClosedResourceError, match=r"^network buffer pool 'net-w3' is closed; cannot create"):
        net.create_buffer_pool(1, 1, name="late")


def test_unclosed_pool_warns(alloc):
    net = NetworkBufferPool(alloc, 2, 4096)
    block = net._block
    with pytest.warns(ResourceWarning, match="unclosed <NetworkBufferPool 'network' 2 x 4 KiB at offset 0>"):
        del net
        gc.collect()
    block.free()


# ------------------------------------------------------------------ listeners and stats
def test_listeners_run_after_recycle_outside_the_lock(net):
    pool = net.create_buffer_pool(1, 2, name="p")
    other = net.create_buffer_pool(0, 8, name="other")
    buf = pool.request_buffer(timeout=5)
    calls = []

    def listener(p: LocalBufferPool) -> None:
        calls.append((p.name, p.available()))  # would deadlock if called under the lock

    pool.add_listener(listener)
    other.add_listener(listener)
    buf.release()
    assert calls == [("p", 2)]  # kept by p (its min): other cannot use it
    calls.clear()
    held = [other.request_buffer(timeout=5) for _ in range(7)]
    held[0].release()
    assert sorted(calls) == [("other", 1), ("p", 2)]  # an excess buffer: every pool with room hears of it
    other.remove_listener(listener)
    pool.remove_listener(listener)
    calls.clear()
    held[1].release()
    assert calls == []
    for b in held[2:]:
        b.release()


def test_stats_are_frozen_dataclasses_with_mapping_access(net):
    pool = net.create_buffer_pool(2, 3, name="p")
    buf = pool.request_buffer(timeout=5)
    stats = pool.statistics()
    assert isinstance(stats, LocalBufferPoolStats) and dataclasses.is_dataclass(stats)
    assert stats["in_use"] == 1 and stats.as_dict() == {
        "name": "p", "pool_id": 0, "min": 2, "max": 3, "held": 1, "in_use": 1, "available": 2,
        "peak_in_use": 1, "requests": 1, "blocked_requests": 0, "blocked_seconds": 0.0, "waiters": 0,
        "destroyed": False}
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.in_use = 3  # type: ignore[misc]
    assert isinstance(net.statistics(), NetworkBufferPoolStats) and net.stats()["reserved"] == 1
    buf.release()


def test_concurrent_requests_and_cross_thread_recycles_keep_counts(net):
    """Task threads request while a receiving thread recycles by index, as a channel would."""
    pools = [net.create_buffer_pool(1, 4, name=f"p{i}") for i in range(3)]
    returns: queue.Queue = queue.Queue()
    errors: list[BaseException] = []

    def task(pool: LocalBufferPool, tag: int) -> None:
        try:
            for i in range(300):
                buf = pool.request_buffer(timeout=30)
                buf.segment.put_int64(0, tag)
                assert buf.segment.get_int64(0) == tag
                if i % 2:
                    buf.release()
                else:
                    returns.put((pool, buf.index))  # "sent"; the receiver recycles it
        except BaseException as exc:  # noqa: BLE001 - the thread's failure is re-raised in the test
            errors.append(exc)

    def receiver() -> None:
        for _ in range(3 * 150):
            pool, index = returns.get(timeout=30)
            pool.recycle_index(index)

    threads = [threading.Thread(target=task, args=(p, i)) for i, p in enumerate(pools)]
    threads.append(threading.Thread(target=receiver))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and errors == []
    stats = net.stats()
    assert stats.in_use == 0 and stats.reserved == 0
    assert stats.free + sum(p.stats().held for p in pools) == 8
    assert all(p.stats().requests == 300 for p in pools)


# ------------------------------------------------------------------ across processes
def _consumer(region_name: str, conn, returns) -> None:
    """Reads buffers named by descriptors from the region; sends a descriptor back when told."""
    region = SharedRegion.attach(region_name)
    held: dict[int, list] = {}
    returned = 0
    try:
        conn.send(("ready", os.getpid()))
        while conn.poll(60):
            msg = conn.recv()
            if msg[0] == "buffer":
                desc = msgpack.unpackb(msg[1])
                view = buffer_view(region, desc)
                data = view.get_bytes(0, view.size)
                try:
                    view.put_bytes(0, b"!")
                    writable = True
                except ReadOnlySegmentError:
                    writable = False
                del view
                held[desc[1]] = desc
                conn.send(("read", desc[1], data, writable))
            elif msg[0] == "status":
                conn.send(("status", sorted(held), returned))
            elif msg[0] == "return":
                returns.send_bytes(msgpack.packb(held.pop(msg[1])))
                returned += 1
            elif msg[0] == "stop":
                for desc in held.values():
                    returns.send_bytes(msgpack.packb(desc))
                break
    finally:
        returns.send_bytes(b"")  # end of returns
        region.close()


def _receive_returns(conn, pool: LocalBufferPool, log: list, errors: list) -> None:
    """The producer's receiving thread: recycles the descriptors the consumer sends back."""
    try:
        while conn.poll(60):
            data = conn.recv_bytes()
            if not data:
                return
            desc = BufferDescriptor(*msgpack.unpackb(data))
            log.append(desc.index)
            pool.recycle_descriptor(desc)
        errors.append("no return from the consumer within 60 s")
    except BaseException as exc:  # noqa: BLE001 - the thread's failure is re-raised in the test
        errors.append(exc)


def test_producer_blocked_on_exhausted_pool_resumes_when_consumer_process_recycles(region, alloc):
    with NetworkBufferPool(alloc, 4, 4096) as net:
        pool = net.create_buffer_pool(2, 4, name="partition-0")
        conn, child_conn = SPAWN.Pipe()
        ret_recv, ret_send = SPAWN.Pipe(duplex=False)
        proc = SPAWN.Process(target=_consumer, args=(region.name, child_conn, ret_send))
        proc.start()
        child_conn.close()
        ret_send.close()
        returned, errors = [], []
        receiver = threading.Thread(target=_receive_returns, args=(ret_recv, pool, returned, errors))
        try:
            assert conn.poll(60), "consumer did not start"
            kind, pid = conn.recv()
            assert kind == "ready" and pid != os.getpid()
            receiver.start()
            sent: dict[int, NetworkBuffer] = {}
            for i in range(4):
                buf = pool.request_buffer(timeout=10)
                payload = f"record-{i}".encode()
                buf.segment.put_bytes(0, payload)
                buf.size = len(payload)
                conn.send(("buffer", msgpack.packb(buf.descriptor())))
                sent[buf.index] = buf  # its reference travelled with the descriptor
                assert conn.poll(30)
                assert conn.recv() == ("read", buf.index, payload, False)  # same bytes, read-only there
            assert pool.try_request_buffer() is None  # exhausted

            result, done = [], threading.Event()

            def produce() -> None:
                try:
                    result.append(pool.request_buffer(timeout=60))
                except BaseException as exc:  # noqa: BLE001 - the thread's failure is re-raised in the test
                    result.append(exc)
                done.set()

            producer = threading.Thread(target=produce)
            producer.start()
            wait_until(lambda: pool.stats().waiters == 1, timeout=10, msg="producer to block in request_buffer")
            conn.send(("status",))
            assert conn.poll(30)
            assert conn.recv() == ("status", sorted(sent), 0)  # the consumer has returned nothing yet
            assert not done.is_set() and returned == []  # so the producer is still blocked
            victim = sorted(sent)[2]
            conn.send(("return", victim))
            assert done.wait(30), "producer did not resume after the consumer recycled a buffer"
            producer.join(10)
            new = result[0]
            assert isinstance(new, NetworkBuffer) and new.index == victim and returned == [victim]
            with pytest.raises(SegmentFreedError):
                sent[victim].segment.get_bytes(0, 1)  # the old lease is over
            new.segment.put_bytes(0, b"reused")  # the producer owns it again, writable
            stats = pool.stats()
            assert (stats.requests, stats.blocked_requests, stats.in_use, stats.peak_in_use) == (5, 1, 4, 4)
            assert stats.blocked_seconds > 0.0
            new.release()
            conn.send(("stop",))
            receiver.join(30)
            assert not receiver.is_alive() and errors == []
            assert sorted(returned) == sorted(sent)
            proc.join(30)
            assert proc.exitcode == 0
        finally:
            reap(proc)
            if receiver.is_alive():
                receiver.join(30)
            conn.close()
            ret_recv.close()
        assert pool.stats().in_use == 0 and net.stats().in_use == 0
