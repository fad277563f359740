"""Keyed state and timers (PyFlink's API): state types and timers against plain-Python models, TTL with an
injected clock, clear errors; on every state backend.

The operator is driven in-process here (its backend is real: heap dicts, or managed memory on a real region);
tests/test_state_jobs.py runs the same functions in real jobs.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path

import pytest
from helpers import managed_memory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.process import KeyedProcessOperator
from runtime import (
    KeyedProcessFunction,
    ListStateDescriptor,
    MapStateDescriptor,
    ReducingStateDescriptor,
    StateTtlConfig,
    ValueStateDescriptor,
)
from runtime.errors import InvalidArgumentError, StateAccessError, StateSerializationError
from runtime.execution.task import ManagedMemory, OperatorContext, TimestampedBatch

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BACKENDS = ["heap", "managed"]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def opened(backend, function, tmp_path, *, key_fn=lambda r: r[0], clock=None, share=64 << 10):
    """A KeyedProcessOperator opened on ``backend`` (managed: ``share`` bytes of 4 KiB pages, so it spills),
    closed on the way out; the managed memory fixture then checks that no page and no spill file is left."""
    with contextlib.ExitStack() as stack:
        managed = None
        if backend == "managed":
            io_dir = Path(tempfile.mkdtemp(dir=tmp_path))
            mm, io = stack.enter_context(managed_memory(io_dir, 8 << 20, 4096))
            managed = ManagedMemory(mm, "process[0]", share, lambda: io)
        ctx = OperatorContext(operator_name="process", state_backend=backend, managed=managed,
                              clock=clock or FakeClock())
        op = KeyedProcessOperator(key_fn, function)
        try:
            op.open(ctx)
            yield op
        finally:
            op.close()


@pytest.fixture(params=BACKENDS)
def make_op(request, tmp_path):
    """``make_op(function, ...)``: an operator on the backend under test, closed after the test."""
    stack = contextlib.ExitStack()

    def make(function, **kw):
        return stack.enter_context(opened(request.param, function, tmp_path, **kw))

    make.backend = request.param
    with stack:
        yield make


def run(op, records, timestamps=None):
    out: list = []
    batch = TimestampedBatch(list(records), list(timestamps)) if timestamps is not None else list(records)
    op.process_batch(batch, out.extend)
    return out


# ------------------------------------------------------------------------------------------- models
INT64 = st.integers(-(2**63), 2**63 - 1)
OPS = st.one_of(
    st.tuples(st.just("value_update"), st.integers(0, 5), st.one_of(st.none(), INT64, st.text(max_size=5),
                                                                     st.tuples(INT64, st.text(max_size=3)))),
    st.tuples(st.just("value_clear"), st.integers(0, 5), st.none()),
    st.tuples(st.just("list_add"), st.integers(0, 5), INT64),
    st.tuples(st.just("list_add_all"), st.integers(0, 5), st.lists(INT64, max_size=4)),
    st.tuples(st.just("list_update"), st.integers(0, 5), st.lists(st.text(max_size=3), max_size=4)),
    st.tuples(st.just("list_clear"), st.integers(0, 5), st.none()),
    st.tuples(st.just("map_put"), st.integers(0, 5), st.tuples(st.sampled_from("abc"), INT64)),
    st.tuples(st.just("map_put_all"), st.integers(0, 5), st.dictionaries(st.sampled_from("abcd"), INT64,
                                                                         max_size=3)),
    st.tuples(st.just("map_remove"), st.integers(0, 5), st.sampled_from("abc")),
    st.tuples(st.just("map_clear"), st.integers(0, 5), st.none()),
    st.tuples(st.just("reduce_add"), st.integers(0, 5), st.integers(-100, 100)),
    st.tuples(st.just("reduce_clear"), st.integers(0, 5), st.none()),
)


class AllStates(KeyedProcessFunction):
    """Applies the op each record carries, then emits what every state of the key reads."""

    def open(self, runtime_context):
        self.value = runtime_context.get_state(ValueStateDescriptor("v"))
        self.list = runtime_context.get_list_state(ListStateDescriptor("l"))
        self.map = runtime_context.get_map_state(MapStateDescriptor("m"))
        self.reduce = runtime_context.get_reducing_state(ReducingStateDescriptor("r", lambda a, b: a + b))

    def process_element(self, record, ctx):
        _, op, arg = record
        if op == "value_update":
            self.value.update(arg)
        elif op == "value_clear":
            self.value.clear()
        elif op == "list_add":
            self.list.add(arg)
        elif op == "list_add_all":
            self.list.add_all(arg)
        elif op == "list_update":
            self.list.update(arg)
        elif op == "list_clear":
            self.list.clear()
        elif op == "map_put":
            self.map.put(*arg)
        elif op == "map_put_all":
            self.map.put_all(arg)
        elif op == "map_remove":
            self.map.remove(arg)
        elif op == "map_clear":
            self.map.clear()
        elif op == "reduce_add":
            self.reduce.add(arg)
        elif op == "reduce_clear":
            self.reduce.clear()
        yield (ctx.get_current_key(), self.value.value(), self.list.get(), dict(self.map.items()),
               self.reduce.get(), self.map.is_empty(), sorted(self.map.keys()), self.map.contains("a"))


def model_step(model: dict, key: int, op: str, arg):
    s = model.setdefault(key, {"v": None, "l": [], "m": {}, "r": None})
    if op == "value_update":
        s["v"] = arg
    elif op == "value_clear":
        s["v"] = None
    elif op == "list_add":
        s["l"].append(arg)
    elif op == "list_add_all":
        s["l"].extend(arg)
    elif op == "list_update":
        s["l"] = list(arg)
    elif op == "list_clear":
        s["l"] = []
    elif op == "map_put":
        s["m"][arg[0]] = arg[1]
    elif op == "map_put_all":
        s["m"].update(arg)
    elif op == "map_remove":
        s["m"].pop(arg, None)
    elif op == "map_clear":
        s["m"] = {}
    elif op == "reduce_add":
        s["r"] = arg if s["r"] is None else s["r"] + arg
    elif op == "reduce_clear":
        s["r"] = None
    return (key, s["v"], list(s["l"]), dict(s["m"]), s["r"], not s["m"], sorted(s["m"]), "a" in s["m"])


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
# 4 pages: the least share of an operator with state and timers (two for each store)
@given(ops=st.lists(OPS, max_size=120), batch=st.integers(1, 30), share_pages=st.integers(6, 14))
def test_every_state_type_equals_a_plain_python_model(tmp_path, backend, ops, batch, share_pages):
    model: dict = {}
    want = [model_step(model, key, name, arg) for name, key, arg in ops]
    records = [(key, name, arg) for name, key, arg in ops]
    got = []
    with opened(backend, AllStates(), tmp_path, share=share_pages * 4096) as op:
        for i in range(0, len(records), batch):
            got += run(op, records[i:i + batch])
    assert got == want


def test_managed_state_far_past_its_share_spills_and_reads_back(make_op):
    if make_op.backend != "managed":
        pytest.skip("managed backend only")

    class Sum(KeyedProcessFunction):
        def open(self, rc):
            self.total = rc.get_state(ValueStateDescriptor("total"))
            self.seen = rc.get_list_state(ListStateDescriptor("seen"))

        def process_element(self, r, ctx):
            self.total.update((self.total.value() or 0) + r[1])
            self.seen.add(r[1])
            yield r[0], self.total.value(), len(self.seen.get())

    op = make_op(Sum(), share=32 << 10)
    n, k = 20_000, 5_000
    got = run(op, [(i % k, i) for i in range(n)])
    assert got[-k:] == [(key, sum(range(key, n, k)), n // k) for key in range(k)]
    stats = op.backend.stats()
    assert stats.bytes_on_disk > 0 and stats.entries == 2 * k


# ------------------------------------------------------------------------------------------- timers
class TimerLog(KeyedProcessFunction):
    """Registers the timers a record asks for; on_timer reports (key, time, domain, watermark)."""

    def process_element(self, record, ctx):
        key, kind, when = record
        ts = ctx.timer_service()
        if kind == "event":
            ts.register_event_time_timer(when)
        elif kind == "delete_event":
            ts.delete_event_time_timer(when)
        elif kind == "processing":
            ts.register_processing_time_timer(when)
        return None

    def on_timer(self, timestamp, ctx):
        return [(ctx.get_current_key(), timestamp, ctx.time_domain().name, ctx.timer_service().current_watermark())]


def test_event_time_timers_fire_in_order_at_watermarks_once_each_and_a_past_one_at_the_next(make_op):
    op = make_op(TimerLog())
    run(op, [("a", "event", 10.0), ("b", "event", 5.0), ("a", "event", 10.0), ("c", "event", 20.0),
             ("c", "delete_event", 20.0)])
    out: list = []
    op.process_watermark(7.0, out.extend)
    assert out == [("b", 5.0, "EVENT_TIME", 7.0)]
    run(op, [("d", "event", 3.0)])  # already passed: fires at the next watermark
    out.clear()
    op.process_watermark(12.0, out.extend)
    assert out == [("d", 3.0, "EVENT_TIME", 12.0), ("a", 10.0, "EVENT_TIME", 12.0)]
    assert out.timestamps if isinstance(out, TimestampedBatch) else True


def test_the_end_of_input_fires_every_pending_event_time_timer_and_drops_processing_time_ones(make_op):
    op = make_op(TimerLog())
    run(op, [("a", "event", 1e9), ("b", "processing", 2e9)])
    out: list = []
    op.finish(out.extend)
    assert out == [("a", 1e9, "EVENT_TIME", math.inf)]


def test_processing_time_timers_fire_when_the_clock_reaches_them(make_op):
    clock = FakeClock(100.0)
    op = make_op(TimerLog(), clock=clock)
    run(op, [("a", "processing", 130.0), ("b", "processing", 110.0)])
    assert op.next_timer() == 110.0
    out: list = []
    op.on_processing_time(120.0, out.extend)
    assert out == [("b", 110.0, "PROCESSING_TIME", -math.inf)]
    assert op.next_timer() == 130.0


def test_outputs_keep_the_input_timestamp_and_timer_outputs_the_timers(make_op):
    class Echo(KeyedProcessFunction):
        def process_element(self, r, ctx):
            ctx.timer_service().register_event_time_timer(ctx.timestamp() + 1)
            yield r

        def on_timer(self, ts, ctx):
            yield ("timer", ctx.get_current_key(), ts)

    op = make_op(Echo())
    out: list = []
    op.process_batch(TimestampedBatch([("k", 1), ("j", 2)], [5.0, 6.0]), out.append)
    assert out[0] == [("k", 1), ("j", 2)] and out[0].timestamps == [5.0, 6.0]
    out.clear()
    op.process_watermark(10.0, out.append)
    assert out[0] == [("timer", "k", 6.0), ("timer", "j", 7.0)] and out[0].timestamps == [6.0, 7.0]


def test_many_timers_on_a_tiny_share_fire_as_on_the_heap_and_the_end_of_input_fires_the_rest(make_op):
    """3000 keys, a timer each (the managed backend's timer records spill); a fired timer of a key below 1000
    registers one already passed (it fires in the same pass, at once) and one past the last watermark (it
    fires at the end of the input)."""

    class Chain(KeyedProcessFunction):
        def process_element(self, r, ctx):
            ctx.timer_service().register_event_time_timer(r[1])

        def on_timer(self, ts, ctx):
            key = ctx.get_current_key()
            if key < 1000 and ts < 1e6 and ts == int(ts):
                ctx.timer_service().register_event_time_timer(ts - 0.5)
                ctx.timer_service().register_event_time_timer(2e6 + key)
                yield key, ts, "chained"
            yield key, ts

    op = make_op(Chain(), share=24 << 10)
    n = 3000
    run(op, [(k, float((k * 7919) % 500)) for k in range(n)])
    passes = []
    for watermark in (-1.0, 100.0, 100.0, 250.0, 499.0):
        out: list = []
        op.process_watermark(watermark, out.extend)
        passes.append(out)
    out = []
    op.finish(out.extend)
    passes.append(out)
    want: list = [[] for _ in passes]
    for k in range(n):
        ts = float((k * 7919) % 500)
        i = next(i for i, w in enumerate((-1.0, 100.0, 100.0, 250.0, 499.0)) if ts <= w)
        if k < 1000:
            want[i] += [(k, ts, "chained"), (k, ts), (k, ts - 0.5)]
            want[-1] += [(k, 2e6 + k)]
        else:
            want[i] += [(k, ts)]
    assert [sorted(p) for p in passes] == [sorted(w) for w in want]
    for p in passes:  # in time order, but for a chained timer, which fires at once
        times = [r[1] for r in p if len(r) == 2]
        assert all(a <= b or a - b == 0.5 for a, b in zip(times, times[1:]))
    assert op.backend.timer_count() == 0
    if make_op.backend == "managed":
        assert op.backend.timer_store.stats().spills > 0


# ---------------------------------------------------------------------------------------------- TTL
def test_state_nobody_reads_or_writes_for_its_ttl_disappears(make_op):
    clock = FakeClock(0.0)

    class Ttl(KeyedProcessFunction):
        def open(self, rc):
            desc = ValueStateDescriptor("v")
            desc.enable_time_to_live(StateTtlConfig(10))
            self.v = rc.get_state(desc)
            flink = ListStateDescriptor("l")
            flink.enable_time_to_live(StateTtlConfig.new_builder(10).set_update_type(
                StateTtlConfig.UpdateType.OnCreateAndWrite).build())
            self.l = rc.get_list_state(flink)

        def process_element(self, r, ctx):
            if r[1] == "write":
                self.v.update(1)
                self.l.add(1)
            yield r[0], self.v.value(), self.l.get()

    op = make_op(Ttl(), clock=clock)
    assert run(op, [("a", "write")]) == [("a", 1, [1])]
    clock.now = 9.0
    assert run(op, [("a", "read")]) == [("a", 1, [1])]  # a read at 9 s refreshes v, not l (OnCreateAndWrite)
    clock.now = 12.0
    assert run(op, [("a", "read")]) == [("a", 1, [])]
    clock.now = 22.5
    assert run(op, [("a", "read")]) == [("a", None, [])]


# -------------------------------------------------------------------------------------------- errors
def test_state_read_outside_a_keyed_context_is_a_typed_error(make_op):
    class Early(KeyedProcessFunction):
        def open(self, rc):
            rc.get_state(ValueStateDescriptor("count")).value()

    with pytest.raises(StateAccessError, match=r"state 'count' was used outside a keyed context"):
        make_op(Early())


def test_a_value_that_cannot_be_stored_names_the_state_and_the_type(make_op):
    class Bad(KeyedProcessFunction):
        def open(self, rc):
            self.seen = rc.get_state(ValueStateDescriptor("seen-words"))

        def process_element(self, r, ctx):
            self.seen.update([1, {"x": {r[1]}}])

    op = make_op(Bad())
    with pytest.raises(StateSerializationError, match=r"state 'seen-words' cannot hold a value of type list "
                                                      r"\(holding a set\)"):
        run(op, [("a", "w")])


def test_a_name_reused_for_another_kind_and_a_wrong_descriptor_are_refused(make_op):
    class Twice(KeyedProcessFunction):
        def open(self, rc):
            rc.get_state(ValueStateDescriptor("x"))
            rc.get_list_state(ListStateDescriptor("x"))

    with pytest.raises(InvalidArgumentError, match=r"state 'x' is already registered as a ValueStateDescriptor"):
        make_op(Twice())

    class Wrong(KeyedProcessFunction):
        def open(self, rc):
            rc.get_state(ListStateDescriptor("y"))

    with pytest.raises(InvalidArgumentError, match=r"get_state needs a ValueStateDescriptor"):
        make_op(Wrong())


def test_an_integer_past_64_bits_is_refused_by_name(make_op):
    class Big(KeyedProcessFunction):
        def open(self, rc):
            self.v = rc.get_state(ValueStateDescriptor("big"))

        def process_element(self, r, ctx):
            self.v.update(r[1])

    with pytest.raises(StateSerializationError, match=r"state 'big' cannot hold a value of type int: the integer "
                                                      r"18446744073709551616 is outside the 64-bit range"):
        run(make_op(Big()), [("a", 2**64)])


def test_process_element_returning_a_non_iterable_is_refused_by_name(make_op):
    class Returns(KeyedProcessFunction):
        def process_element(self, r, ctx):
            return 5

    with pytest.raises(TypeError, match=r"Returns.process_element must yield records, return an iterable"):
        run(make_op(Returns()), [("a", 1)])


def test_a_managed_backend_reports_to_its_share_until_closed_and_counts_only_reads_of_disk_as_misses(tmp_path):
    from runtime.state.backend import MISSING, make_backend

    desc = ValueStateDescriptor("v")
    with managed_memory(tmp_path, 8 << 20, 4096) as (mm, io):
        managed = ManagedMemory(mm, "process[0]", 64 << 10, lambda: io)
        backend = make_backend(OperatorContext(operator_name="process", state_backend="managed", managed=managed))
        try:
            for i in range(100):
                assert backend.get(desc, f"absent-{i}") is MISSING  # absent, nothing spilled: answered from memory
                backend.put(desc, f"k{i}", i)
            stats = managed.state_stats()
            assert stats is not None and stats.entries == 100 and stats.bytes_on_disk == 0
            assert (stats.cache_hits, stats.cache_misses) == (100, 0)
            for i in range(5_000):  # more than the 64 KiB share holds: it spills
                backend.put(desc, f"k{i}", "x" * 40)
            for i in range(5_000):
                assert backend.get(desc, f"k{i}") == "x" * 40
            stats = managed.state_stats()
            assert stats is not None and stats.bytes_on_disk > 0 and 0 < stats.cache_misses < 5_000
            assert stats.cache_hits + stats.cache_misses == 5_100
        finally:
            backend.close()
        assert managed.state_stats() is None  # detached
