"""Timers kept in the keyed state backends, against a plain-Python model: the heap backend's TimerQueues and the
managed backend's timer records, at tiny shares and heads so that the records spill, compact and are read
back in order; the store's ordered key scan and the timestamps' byte order under them.

Real SharedRegion / MemoryManager / IOManager; every test checks that no page stays allocated and no
spill file stays on disk.
"""

from __future__ import annotations

import contextlib
import math
import struct
import tempfile
from pathlib import Path

import pytest
from helpers import managed_memory
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from runtime.errors import InvalidArgumentError, InvalidSizeError, StateAccessError
from runtime.state import codec
from runtime.state.backend import HeapKeyedStateBackend
from runtime.state.managed_backend import ManagedKeyedStateBackend
from runtime.state.store import ManagedKeyValueStore
from runtime.state.timers import EVENT_TIME, PROCESSING_TIME, timestamp_bytes, timestamp_of

PAGE = 4096
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BACKENDS = ["heap", "managed"]


@contextlib.contextmanager
def backend_on(kind, tmp_path, *, share_pages=8, head_timers=4096):
    """A backend with timers (managed: ``share_pages`` pages of 4 KiB, spilling), closed on the way out."""
    if kind == "heap":
        backend = HeapKeyedStateBackend()
        try:
            yield backend
        finally:
            backend.close()
        return
    with managed_memory(Path(tempfile.mkdtemp(dir=tmp_path)), 8 << 20, PAGE) as (mm, io):
        backend = ManagedKeyedStateBackend(mm, "op", share_pages * PAGE, io, timers=True, head_timers=head_timers)
        try:
            yield backend
        finally:
            backend.close()


# ------------------------------------------------------------------------------------- the model
class Model:
    """Pending timers as two sets; firing takes the least due timer (ties: ``tiebreak`` of the key) each step."""

    def __init__(self, tiebreak):
        self.live: dict[int, set] = {EVENT_TIME: set(), PROCESSING_TIME: set()}
        self.tiebreak = tiebreak

    def next_time(self, domain):
        return min((t for t, _ in self.live[domain]), default=None)

    def pop_due(self, domain, until):
        live = self.live[domain]
        while True:
            due = [timer for timer in live if timer[0] <= until]
            if not due:
                return
            timer = min(due, key=lambda x: (x[0], self.tiebreak(x[1])))
            live.remove(timer)
            yield timer


def chained(key):
    """The key a timer of ``key`` registers when it fires (a ``fire`` op with a delta): one step deep only."""
    return None if key[0] >= 100 else (key[0] + 100, key[1])


TIMES = st.integers(-5, 20).map(float) | st.sampled_from([math.inf, -math.inf, 2.5])
OPS = st.lists(st.one_of(
    st.tuples(st.just("register"), st.sampled_from([EVENT_TIME, EVENT_TIME, PROCESSING_TIME]), TIMES,
              st.integers(0, 12)),
    st.tuples(st.just("register"), st.just(EVENT_TIME), TIMES, st.integers(0, 12)),
    st.tuples(st.just("delete"), st.sampled_from([EVENT_TIME, PROCESSING_TIME]), TIMES, st.integers(0, 12)),
    st.tuples(st.just("fire"), st.sampled_from([EVENT_TIME, PROCESSING_TIME]),
              st.integers(-6, 25).map(float) | st.just(math.inf), st.none() | st.sampled_from([-3.0, 0.0, 4.0])),
), min_size=20, max_size=150)


@pytest.mark.parametrize("kind", BACKENDS)
@SETTINGS
@given(ops=OPS, pad=st.sampled_from([0, 300, 1000]), share_pages=st.integers(6, 11), head_timers=st.integers(1, 6))
def test_timers_equal_a_plain_python_model(tmp_path, kind, ops, pad, share_pages, head_timers):
    """Register, delete and fire in both domains; a fired timer may register another (due already or not).

    The managed backend must match the model exactly (ties in the order of the keys' encodings); the heap
    backend fires ties in registration order, so each firing pass is compared as a multiset there.
    """
    model = Model(codec.encode_key)
    with backend_on(kind, tmp_path, share_pages=share_pages, head_timers=head_timers) as backend:
        for name, domain, t, arg in ops:
            if name in ("register", "delete"):
                key = (arg, "x" * pad)
                if name == "register":
                    backend.register_timer(domain, t, key)
                    model.live[domain].add((t, key))
                else:
                    backend.delete_timer(domain, t, key)
                    model.live[domain].discard((t, key))
            else:
                got, want = [], []
                for fired, out, register in ((backend.pop_due_timers(domain, t), got, backend.register_timer),
                                             (model.pop_due(domain, t), want,
                                              lambda d, ts, k: model.live[d].add((ts, k)))):
                    for timer in fired:
                        out.append(timer)
                        if arg is not None and chained(timer[1]) is not None:
                            register(domain, timer[0] + arg, chained(timer[1]))
                if kind == "managed":
                    assert got == want
                else:
                    assert sorted(got, key=repr) == sorted(want, key=repr)
            for d in (EVENT_TIME, PROCESSING_TIME):
                assert backend.next_timer_time(d) == model.next_time(d)
            assert backend.timer_count() == len(model.live[EVENT_TIME]) + len(model.live[PROCESSING_TIME])
        assert sorted(backend.timers(), key=repr) == sorted(
            ((d, t, k) for d, timers in model.live.items() for t, k in timers), key=repr)
        if kind == "managed":
            event(f"timer store spilled: {backend.timer_store.stats().spills > 0}")


def test_managed_timers_far_past_their_share_spill_and_fire_in_order_at_every_watermark(tmp_path):
    n = 20_000
    with backend_on("managed", tmp_path, share_pages=8, head_timers=64) as backend:
        for i in range(n):  # out of order; every tenth twice
            backend.register_timer(EVENT_TIME, float((i * 7919) % n), f"key-{i:06d}")
            if i % 10 == 0:
                backend.register_timer(EVENT_TIME, float((i * 7919) % n), f"key-{i:06d}")
        for i in range(0, n, 3):
            backend.delete_timer(EVENT_TIME, float((i * 7919) % n), f"key-{i:06d}")
        stats = backend.timer_store.stats()
        assert stats.spills > 0 and stats.runs > 0
        assert backend.stats().bytes_on_disk > 0
        want = sorted(((i * 7919) % n, f"key-{i:06d}") for i in range(n) if i % 3)
        assert backend.timer_count() == len(want)
        got = []
        for watermark in range(-1, n, 997):
            got += [(int(t), k) for t, k in backend.pop_due_timers(EVENT_TIME, float(watermark))]
            assert backend.next_timer_time(EVENT_TIME) == next((t for t, _ in want[len(got):]), None)
        got += [(int(t), k) for t, k in backend.pop_due_timers(EVENT_TIME, math.inf)]
        assert got == want
        assert backend.timer_count() == 0 and backend.next_timer_time(EVENT_TIME) is None


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_watermark_with_nothing_due_reads_nothing(tmp_path, kind):
    with backend_on(kind, tmp_path, share_pages=8, head_timers=8) as backend:
        for i in range(3000):
            backend.register_timer(EVENT_TIME, 100.0 + i, i)
        assert list(backend.pop_due_timers(EVENT_TIME, 99.0)) == []
        if kind == "managed":
            store = backend.timer_store
            store.scan_keys = None  # any read of the store in order fails the test from here on
            for _ in range(100):
                assert list(backend.pop_due_timers(EVENT_TIME, 99.0)) == []
                assert backend.next_timer_time(EVENT_TIME) == 100.0
            del store.scan_keys


def test_timestamps_as_bytes_sort_as_the_floats_and_read_back():
    values = [-math.inf, -1e300, -2.5, -1.0, -5e-324, 0.0, -0.0, 5e-324, 1e-300, 1.0, 2.5, 1e300, math.inf]
    encoded = [timestamp_bytes(v) for v in values]
    assert sorted(encoded) == [timestamp_bytes(v) for v in sorted(values)]
    assert timestamp_bytes(-0.0) == timestamp_bytes(0.0)
    assert [timestamp_of(b) for b in encoded] == [v + 0.0 for v in values]
    with pytest.raises(InvalidArgumentError, match=r"^a timer's timestamp must be a number, not NaN; got nan$"):
        timestamp_bytes(math.nan)


@given(a=st.floats(allow_nan=False), b=st.floats(allow_nan=False))
def test_any_two_timestamps_compare_as_their_bytes(a, b):
    assert (timestamp_bytes(a) < timestamp_bytes(b)) == (a < b)
    assert timestamp_of(timestamp_bytes(a)) == a
    assert struct.unpack(">d", struct.pack(">d", timestamp_of(timestamp_bytes(a))))[0] == a


# ----------------------------------------------------------------------------- the store's key scan
SCAN_KEYS = st.binary(min_size=0, max_size=6) | st.sampled_from([b"k%03d" % i for i in range(60)])
SCAN_OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), SCAN_KEYS, st.integers(0, 400)),
    st.tuples(st.just("discard"), SCAN_KEYS, st.none()),
    st.tuples(st.just("scan"), SCAN_KEYS, st.integers(1, 12)),
), min_size=10, max_size=200)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=SCAN_OPS, share_pages=st.integers(3, 7), max_runs=st.integers(1, 4), stop=SCAN_KEYS)
def test_scan_keys_equals_a_sorted_model_while_spilling(tmp_path, ops, share_pages, max_runs, stop):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io), \
            ManagedKeyValueStore(mm, "op", share_pages * PAGE, io, key_groups=1, max_runs=max_runs) as store:
        model: set[bytes] = set()
        for name, key, arg in ops:
            if name == "put":
                store.put(key, bytes([7]) * arg)
                model.add(key)
            elif name == "discard":
                store.discard(key)
                model.discard(key)
            else:
                want = sorted(k for k in model if key <= k < stop)
                got, resume = store.scan_keys(key, stop, arg)
                assert len(got) <= arg
                assert got == [k for k in want if resume is None or k < resume]
                everything, at = list(got), resume
                while at is not None:  # resuming reads the rest
                    more, at = store.scan_keys(at, stop, arg)
                    everything += more
                assert everything == want


def test_scan_keys_refuses_a_store_of_several_key_groups(tmp_path):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io), ManagedKeyValueStore(mm, "op", 4 * PAGE, io) as store, \
            pytest.raises(InvalidSizeError, match=r"^scan_keys needs a store ordered by key \(key_groups=1\); "
                                                  r"state 'state' has 128 key groups$"):
        store.scan_keys(b"", b"\xff", 10)


# ----------------------------------------------------------------------------------------- errors
def test_a_share_too_small_for_state_and_timers_names_the_key_to_raise(tmp_path):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io):
        with pytest.raises(InvalidSizeError, match=r"^the managed share of 'op' must hold at least 6 pages "
                                                   r"\(24576 bytes: 3 for its state and 3 for its timers\); "
                                                   r"got 20480; raise memory.managed.size$"):
            ManagedKeyedStateBackend(mm, "op", 5 * PAGE, io, timers=True)
        assert ManagedKeyedStateBackend.split_share(40 * PAGE, PAGE, True) == (30 * PAGE, 10 * PAGE)
        assert ManagedKeyedStateBackend.split_share(7 * PAGE, PAGE, True) == (4 * PAGE, 3 * PAGE)
        assert ManagedKeyedStateBackend.split_share(3 * PAGE, PAGE, True, timers=False) == (3 * PAGE, 0)


def test_a_backend_made_without_timers_refuses_them_by_name(tmp_path):
    with managed_memory(tmp_path, 4 << 20, PAGE) as (mm, io):
        backend = ManagedKeyedStateBackend(mm, "op", 3 * PAGE, io)
        try:
            with pytest.raises(StateAccessError, match=r"^this managed state backend keeps no timers: make it with "
                                                       r"make_backend\(ctx, timers=True\)"):
                backend.register_timer(EVENT_TIME, 1.0, "a")
            assert backend.timer_count() == 0
        finally:
            backend.close()
    with pytest.raises(InvalidArgumentError, match=r"^a timer's time domain must be one of \(0, 1\)"):
        HeapKeyedStateBackend().register_timer(2, 1.0, "a")
