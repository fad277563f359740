"""Checkpoint state of every streaming operator: snapshot at a random point, restore into a fresh operator.

Each test feeds random input to an operator, takes a snapshot between two steps exactly as the runtime does
(``prepare_snapshot`` on the running operator, ``snapshot_state``, encoded at once with
:mod:`runtime.state.codec`), opens a new operator with a new context, restores the decoded state into it and
feeds both the rest. The restored operator must emit exactly what the uninterrupted one emits after the
snapshot point. The managed paths run on real managed memory with small shares, so that state spills.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pkgutil
import tempfile
from collections.abc import Callable, Iterator
from operator import itemgetter
from pathlib import Path
from typing import Any

import pytest
from helpers import managed_memory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import operators
from operators import keyed
from operators.process import KeyedProcessFunction, KeyedProcessOperator
from operators.sinks import COLLECT_BATCH_RECORDS, CollectSink
from operators.sources import CollectionSource, GeneratorSource, TextFileSource
from operators.window import (
    SlidingEventTimeWindows,
    TumblingEventTimeWindows,
    TumblingProcessingTimeWindows,
    WindowAggregate,
)
from runtime.bench.shmflow_runs import W4Source
from runtime.checkpoint.blob import blob_size, write_blob
from runtime.errors import StateAccessError
from runtime.execution.checkpointing import decode_states, encode_states
from runtime.execution.task import ManagedMemory, Operator, OperatorContext, SourceOperator, TimestampedBatch
from runtime.managed.streaming_table import PackedRows, SpilledRows
from runtime.state.codec import Chain, Incremental, Raw
from runtime.state.descriptors import ListStateDescriptor, ValueStateDescriptor

KiB = 1024
SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def roundtrip(state: Any) -> Any:
    """What the runtime hands restore_state: the snapshot encoded and laid out as a blob at once (its
    out-of-band buffers copied), decoded from the blob on restart."""
    header, buffers = encode_states([state], "<checkpoint>")
    blob = memoryview(bytearray(blob_size(header, buffers)))
    write_blob(blob, header, buffers)
    return decode_states(blob)[0]


def flat(batch: Any) -> list[Any]:
    """A batch's records, each with its timestamp when the batch has them."""
    if isinstance(batch, TimestampedBatch):
        return list(zip(batch, batch.timestamps))
    return list(batch)


# ------------------------------------------------------------------ a driver
class Run:
    """One opened operator fed steps: ``("batch", records)``, ``("stamped", (records, timestamps))``,
    ``("wm", watermark)``, ``("time", now)`` (the clock moves; due processing-time timers fire)."""

    def __init__(self, op: Operator, ctx: dict[str, Any], now: float = 0.0) -> None:
        self.op = op
        self.now = now
        self.out: list[Any] = []
        op.open(OperatorContext(mode="streaming", clock=lambda: self.now, **ctx))

    def emit(self, batch: Any) -> None:
        self.out.extend(flat(batch))

    def step(self, step: tuple[str, Any]) -> None:
        kind, value = step
        if kind == "batch":
            self.op.process_batch(value, self.emit)
        elif kind == "stamped":
            records, stamps = value
            self.op.process_batch(TimestampedBatch(records, stamps), self.emit)
        elif kind == "wm":
            self.op.process_watermark(value, self.emit)
        else:
            self.now = value
            due = self.op.next_timer()
            if due is not None and due <= value:
                self.op.on_processing_time(value, self.emit)


def check_restore(make_op: Callable[[], Operator], steps: list[tuple[str, Any]], cut: int,
                  ctx_a: dict[str, Any], ctx_b: dict[str, Any]) -> tuple[Run, Run]:
    """Run ``steps`` uninterrupted (a snapshot taken after ``steps[:cut]``, as the runtime takes it) and, from
    that snapshot, in a fresh operator; assert both emit the same after the snapshot point."""
    a = Run(make_op(), ctx_a)
    b: Run | None = None
    try:
        for step in steps[:cut]:
            a.step(step)
        a.op.prepare_snapshot(a.emit)
        state = roundtrip(a.op.snapshot_state())
        mark = len(a.out)
        b = Run(make_op(), ctx_b, now=a.now)
        if state is not None:
            b.op.restore_state(state)
        for step in steps[cut:]:
            a.step(step)
            b.step(step)
        a.op.finish(a.emit)
        b.op.finish(b.emit)
        assert b.out == a.out[mark:]
        return a, b
    finally:
        a.op.close()
        if b is not None:
            b.op.close()


@contextlib.contextmanager
def contexts(backend: str, tmp_path: Path, share: int = 16 * KiB) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Context arguments of the uninterrupted and the restored operator on ``backend`` (managed: a share of
    ``share`` bytes each, 4 KiB pages, on one real managed memory checked for leaks on the way out)."""
    if backend == "heap":
        yield {}, {}
        return
    io_dir = Path(tempfile.mkdtemp(dir=tmp_path))
    with managed_memory(io_dir, 4 << 20, 4096) as (mm, io):
        a, b = ({"state_backend": "managed", "max_parallelism": 16,
                 "managed": ManagedMemory(mm, f"op-{name}", share, lambda: io)} for name in "ab")
        yield a, b


def cuts(steps: st.SearchStrategy[list[Any]]) -> st.SearchStrategy[tuple[list[Any], int]]:
    return steps.flatmap(lambda s: st.tuples(st.just(s), st.integers(0, len(s))))


# ------------------------------------------------------------------ sources
def take(src: SourceOperator, polls: list[int], stop: int) -> list[Any]:
    """What ``stop`` polls of ``src`` (sizes from ``polls``, in turn) give, fewer if it ends first."""
    out: list[Any] = []
    for k in range(stop):
        batch = src.poll_batch(polls[k % len(polls)])
        if batch is None:
            break
        out.extend(batch)
    return out


def drain(src: SourceOperator, polls: list[int]) -> list[Any]:
    out: list[Any] = []
    i = 0
    while True:
        batch = src.poll_batch(polls[i % len(polls)] if polls else 3)
        i += 1
        if batch is None:
            return out
        out.extend(batch)


@SETTINGS
@given(n=st.integers(0, 40), p=st.integers(1, 3), polls=st.lists(st.integers(1, 7), min_size=1, max_size=5),
       stop=st.integers(0, 10))
def test_collection_source_resumes_at_its_position(n, p, polls, stop):
    for i in range(p):
        a = CollectionSource(range(n))
        a.open(OperatorContext(subtask_index=i, parallelism=p))
        before = take(a, polls, stop)
        state = roundtrip(a.snapshot_state())
        rest = drain(a, polls)
        b = CollectionSource(range(n))
        b.open(OperatorContext(subtask_index=i, parallelism=p))
        b.restore_state(state)
        assert drain(b, polls[::-1]) == rest
        assert before + rest == list(range(i * n // p, (i + 1) * n // p))


@SETTINGS
@given(count=st.integers(0, 60), p=st.integers(1, 3), polls=st.lists(st.integers(1, 7), min_size=1, max_size=5),
       stop=st.integers(0, 10))
def test_generator_source_resumes_at_its_index(count, p, polls, stop):
    parts_a = GeneratorSource(lambda i: i * 3, count=count).split(p)
    parts_b = GeneratorSource(lambda i: i * 3, count=count).split(p)
    for i, (a, b) in enumerate(zip(parts_a, parts_b)):
        a.open(OperatorContext(subtask_index=i, parallelism=p))
        take(a, polls, stop)
        state = roundtrip(a.snapshot_state())
        b.open(OperatorContext(subtask_index=i, parallelism=p))
        b.restore_state(state)
        assert drain(b, polls) == drain(a, polls[::-1])


def test_a_restored_rate_limited_generator_keeps_its_rate_and_does_not_burst():
    now = [100.0]
    a = GeneratorSource(lambda i: i, rate=10.0)
    a.open(OperatorContext(clock=lambda: now[0]))
    now[0] = 101.0
    assert a.poll_batch(100) == list(range(10))
    state = roundtrip(a.snapshot_state())
    now[0] = 500.0  # the restart took minutes
    b = GeneratorSource(lambda i: i, rate=10.0)
    b.open(OperatorContext(clock=lambda: now[0]))
    b.restore_state(state)
    assert b.poll_batch(100) == []
    assert b.next_timer() == pytest.approx(500.1)
    now[0] = 500.5
    assert b.poll_batch(100) == list(range(10, 15))


lines_st = st.lists(st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12),
                    max_size=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(lines=lines_st, crlf=st.booleans(), last_newline=st.booleans(), chunk=st.integers(1, 40),
       p=st.integers(1, 3), polls=st.lists(st.integers(1, 6), min_size=1, max_size=4), stop=st.integers(0, 12),
       chunk_b=st.integers(1, 40), stop_b=st.integers(0, 4))
def test_text_file_source_resumes_at_the_next_unread_line(tmp_path, lines, crlf, last_newline, chunk, p, polls, stop,
                                                          chunk_b, stop_b):
    sep = "\r\n" if crlf else "\n"
    text = sep.join(lines) + (sep if last_newline and lines else "")
    fd, path = tempfile.mkstemp(dir=tmp_path)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode())
    try:
        for i in range(p):
            whole = TextFileSource(path).split(p)[i]
            whole.open(OperatorContext(subtask_index=i, parallelism=p))
            expected = drain(whole, polls)
            whole.close()
            a = TextFileSource(path).split(p)[i]
            a.CHUNK_BYTES = chunk
            a.open(OperatorContext(subtask_index=i, parallelism=p))
            before = take(a, polls, stop)
            state = roundtrip(a.snapshot_state())
            rest = drain(a, polls)
            a.close()
            b = TextFileSource(path).split(p)[i]
            b.CHUNK_BYTES = chunk_b  # another chunking after the seek: other tails
            b.open(OperatorContext(subtask_index=i, parallelism=p))
            b.restore_state(state)
            after: list[str] = []
            for k in range(stop_b):  # a snapshot of the restored source, still skipping lines, restored again
                batch = b.poll_batch(polls[-1 - k % len(polls)])
                if batch is None:
                    break
                after.extend(batch)
            c = TextFileSource(path).split(p)[i]
            c.CHUNK_BYTES = chunk
            c.open(OperatorContext(subtask_index=i, parallelism=p))
            c.restore_state(roundtrip(b.snapshot_state()))
            after_c = after + drain(c, polls)
            after += drain(b, polls[::-1])
            b.close()
            c.close()
            assert before + rest == expected
            assert after == rest
            assert after_c == rest
        if p == 1:  # a last line without newline is a line unless it is empty
            assert expected == (lines[:-1] if lines and not last_newline and lines[-1] == "" else lines)
    finally:
        os.remove(path)


def test_text_file_source_snapshots_of_a_restored_source_on_every_chunking(tmp_path):
    path = tmp_path / "lines.txt"
    lines = [f"l{i}" + "x" * (i % 3) for i in range(30)]
    path.write_bytes("\r\n".join(lines).encode())
    for chunk in range(1, 26):
        for poll in range(1, 5):
            for stop in range(5):
                a = TextFileSource(path)
                a.CHUNK_BYTES = chunk
                a.open(OperatorContext())
                read = [line for _ in range(stop) for line in a.poll_batch(poll) or []]
                state = roundtrip(a.snapshot_state())
                a.close()
                for stop_b in range(4):
                    b = TextFileSource(path)
                    b.CHUNK_BYTES = 40 - chunk
                    b.open(OperatorContext())
                    b.restore_state(state)
                    read_b = [line for _ in range(stop_b) for line in b.poll_batch(poll + 1) or []]
                    c = TextFileSource(path)
                    c.open(OperatorContext())
                    c.restore_state(roundtrip(b.snapshot_state()))
                    b.close()
                    assert read + read_b + drain(c, [poll]) == lines, (chunk, poll, stop, stop_b)
                    c.close()


@SETTINGS
@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=5), p=st.integers(1, 2),
       polls=st.lists(st.integers(1, 9), min_size=1, max_size=4), stop=st.integers(0, 12))
def test_w4_source_resumes_at_its_chunk_and_offset(sizes, p, polls, stop):
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    chunks = list(zip(bounds, bounds[1:]))
    n = bounds[-1]
    for i in range(p):
        a = W4Source(n, 7, "rows", list(chunks)).split(p)[i]
        a.open(OperatorContext(subtask_index=i, parallelism=p))
        take(a, polls, stop)
        state = roundtrip(a.snapshot_state())
        b = W4Source(n, 7, "rows", list(chunks)).split(p)[i]
        b.open(OperatorContext(subtask_index=i, parallelism=p))
        b.restore_state(state)
        assert drain(b, polls[::-1]) == drain(a, polls)


# ------------------------------------------------------------------ keyed aggregations
def _mod(r: int) -> int:
    return r % 211


def _str_mod(r: int) -> str:
    return f"k{r % 97}"


#: name -> (key_fn, aggregation, records): the records of one batch.
_ints = st.integers(-1000, 1000)
_values = st.one_of(_ints, _ints, _ints, _ints, st.floats(-100, 100))  # now and then a float: the managed
#                                                                          fixed-width path hands its state over
KEYED_CASES: dict[str, tuple[Any, keyed.Aggregation, st.SearchStrategy[Any]]] = {
    "count": (None, keyed.count(), st.integers(0, 3000).map(lambda i: f"w{i}")),
    "count-int": (None, keyed.count(), st.integers(-5000, 5000)),
    "sum": (_mod, keyed.sum(), _ints),
    "min": (_str_mod, keyed.min(), _ints),
    "max": (_mod, keyed.max(), st.floats(-1e6, 1e6)),
    "sum-field": (itemgetter(0), keyed.sum(1), st.tuples(st.integers(0, 2000), _values)),
    "max-field": (itemgetter(0), keyed.max(1), st.tuples(st.sampled_from("abcdefgh"), _ints)),
    "reduce": (itemgetter(0), keyed.reduce(lambda x, y: (x[0], x[1] + y[1])), st.tuples(st.integers(0, 50), _ints)),
}


def keyed_steps(records: st.SearchStrategy[Any]) -> st.SearchStrategy[list[tuple[str, Any]]]:
    batch = st.lists(records, min_size=1, max_size=300).map(lambda b: ("batch", b))
    stamped = st.lists(records, min_size=1, max_size=50).map(
        lambda b: ("stamped", (b, [float(i) for i in range(len(b))])))
    other = st.one_of(st.integers(0, 100).map(lambda w: ("wm", float(w))),
                      st.floats(0, 1).map(lambda t: ("time", t)))
    return st.lists(st.one_of(batch, batch, stamped, other), max_size=12)


@pytest.mark.parametrize("backend", ["heap", "managed"])
@pytest.mark.parametrize("case", sorted(KEYED_CASES))
def test_keyed_aggregate_restores_to_the_same_updates(tmp_path, backend, case):
    key_fn, aggregation, records = KEYED_CASES[case]

    @SETTINGS
    @given(data=cuts(keyed_steps(records)))
    def check(data):
        steps, cut = data
        with contexts(backend, tmp_path) as (ctx_a, ctx_b):
            check_restore(lambda: keyed.KeyedAggregate(key_fn, aggregation, mode="streaming"), steps, cut,
                          ctx_a, ctx_b)

    check()


def test_the_managed_fixed_width_state_snapshots_its_tables_and_spilled_rows_out_of_band(tmp_path):
    steps = [("batch", list(range(i * 1000, (i + 1) * 1000))) for i in range(4)]
    with contexts("managed", tmp_path, share=16 * KiB) as (ctx_a, ctx_b):
        a = Run(keyed.KeyedAggregate(None, keyed.count(), mode="streaming"), ctx_a)
        for step in steps:
            a.step(step)
        a.op.prepare_snapshot(a.emit)
        assert a.op._streaming is not None and a.op._streaming._state is not None
        assert a.op._streaming._state.stats().partition_evictions > 0
        kind, payload = a.op.snapshot_state()
        zero, parts = payload[-1]
        images = [part.view for part in parts if part is not None]
        assert kind == "fixed" and zero is None and all(type(part) is Raw for part in parts if part is not None)
        # tables in memory (rows packed as the blob is written) and evicted partitions' rows (read from disk)
        assert {type(image) for image in images} == {PackedRows, SpilledRows}
        b = Run(keyed.KeyedAggregate(None, keyed.count(), mode="streaming"), ctx_b)
        b.op.restore_state(roundtrip((kind, payload)))
        for run in (a, b):
            run.step(("batch", [5, 3999, 4000]))
            run.op.finish(run.emit)
            run.op.close()
        assert b.out == [(5, 2), (3999, 2), (4000, 1)] == a.out[-3:]


def test_a_held_mini_batch_must_be_emitted_before_the_snapshot(tmp_path):
    with contexts("managed", tmp_path) as (ctx, _):
        run = Run(keyed.KeyedAggregate(None, keyed.count(), mode="streaming"), ctx)
        try:
            run.step(("batch", ["a", "b", "a"]))
            assert run.out == []
            with pytest.raises(StateAccessError, match=r"prepare_snapshot\(emit\) emits it before snapshot_state"):
                run.op.snapshot_state()
            run.op.prepare_snapshot(run.emit)
            assert run.out == [("a", 1), ("b", 1), ("a", 2)]
            assert run.op.snapshot_state()[0] == "fixed"
        finally:
            run.op.close()


@pytest.mark.parametrize(("first", "second"), [("heap", "managed"), ("managed", "heap")])
def test_keyed_aggregate_state_moves_between_the_heap_and_the_fixed_width_path(tmp_path, first, second):
    steps = [("batch", [f"w{i % 37}" for i in range(500)]), ("batch", ["w1", "w40"])]
    with contexts("managed", tmp_path) as (ctx_managed, _):
        ctxs = {"heap": {}, "managed": ctx_managed}
        a = Run(keyed.KeyedAggregate(None, keyed.count(), mode="streaming"), ctxs[first])
        a.step(steps[0])
        a.op.prepare_snapshot(a.emit)
        state = roundtrip(a.op.snapshot_state())
        a.op.close()
        b = Run(keyed.KeyedAggregate(None, keyed.count(), mode="streaming"), ctxs[second])
        b.op.restore_state(state)
        b.step(steps[1])
        b.op.finish(b.emit)
        b.op.close()
        assert b.out == [("w1", 15), ("w40", 1)]


def test_keyed_combine_holds_nothing_in_streaming_mode_and_refuses_in_batch_mode():
    combine = keyed.KeyedCombine(None, keyed.count())
    combine.open(OperatorContext(mode="streaming"))
    out: list[Any] = []
    combine.process_batch(["a", "b", "a"], out.extend)
    assert out == [("a", 2), ("b", 1)] and combine.snapshot_state() is None
    combine = keyed.KeyedCombine(None, keyed.count())
    combine.open(OperatorContext(mode="batch"))
    combine.process_batch(["a"], out.extend)
    with pytest.raises(StateAccessError, match=r"apply to streaming mode only$"):
        combine.snapshot_state()


# ------------------------------------------------------------------ windows
def window_steps(event_time: bool) -> st.SearchStrategy[list[tuple[str, Any]]]:
    records = st.tuples(st.sampled_from("abcde"), st.integers(0, 9))
    if event_time:
        batch = st.lists(st.tuples(records, st.integers(0, 60)), min_size=1, max_size=20).map(
            lambda rs: ("stamped", ([r for r, _ in rs], [float(t) for _, t in rs])))
        other = st.integers(0, 70).map(lambda w: ("wm", float(w)))
    else:
        batch = st.lists(records, min_size=1, max_size=20).map(lambda b: ("batch", b))
        other = st.integers(1, 5).map(lambda dt: ("advance", dt))
    return st.lists(st.one_of(batch, batch, other), max_size=15)


def absolute_times(steps: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``("advance", dt)`` steps as ``("time", now)`` ones (the clock only moves forward)."""
    now = 0.0
    out = []
    for kind, value in steps:
        if kind == "advance":
            now += value
            out.append(("time", now))
        else:
            out.append((kind, value))
    return out


WINDOW_CASES = {
    "tumbling": (lambda: TumblingEventTimeWindows.of(10), 0.0, True),
    "tumbling-lateness": (lambda: TumblingEventTimeWindows.of(10), 15.0, True),
    "sliding-lateness": (lambda: SlidingEventTimeWindows.of(10, 5), 7.0, True),
    "processing": (lambda: TumblingProcessingTimeWindows.of(4), 0.0, False),
}


@pytest.mark.parametrize("backend", ["heap", "managed"])
@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
@pytest.mark.parametrize("agg", ["count", "sum-field"])
def test_window_aggregate_restores_its_windows_fired_windows_and_watermark(tmp_path, backend, case, agg):
    assigner, lateness, event_time = WINDOW_CASES[case]
    aggregation = keyed.count() if agg == "count" else keyed.sum(1)

    @SETTINGS
    @given(data=cuts(window_steps(event_time)))
    def check(data):
        steps, cut = data
        steps = absolute_times(steps)
        with contexts(backend, tmp_path, share=64 * KiB) as (ctx_a, ctx_b):
            check_restore(lambda: WindowAggregate(itemgetter(0), assigner(), aggregation, allowed_lateness=lateness),
                          steps, cut, ctx_a, ctx_b)

    check()


# ------------------------------------------------------------------ process functions
class CountWithTimers(KeyedProcessFunction):
    """Counts per key, keeps the values seen, and reports both from its timers (event and processing time)."""

    def open(self, runtime_context):
        self.count = runtime_context.get_state(ValueStateDescriptor("count"))
        self.seen = runtime_context.get_list_state(ListStateDescriptor("seen"))

    def process_element(self, value, ctx):
        key, v = value
        n = (self.count.value() or 0) + 1
        self.count.update(n)
        self.seen.add(v)
        timers = ctx.timer_service()
        if ctx.timestamp() is not None:
            timers.register_event_time_timer(ctx.timestamp() + v % 4)
            if v % 5 == 0:
                timers.delete_event_time_timer(ctx.timestamp() + 1)
        if v % 3 == 0:
            timers.register_processing_time_timer(timers.current_processing_time() + v % 7)
        yield (key, n)

    def on_timer(self, timestamp, ctx):
        yield (ctx.get_current_key(), self.count.value(), list(self.seen.get()), timestamp,
               ctx.time_domain().name, ctx.timer_service().current_watermark())


def process_steps() -> st.SearchStrategy[list[tuple[str, Any]]]:
    records = st.tuples(st.sampled_from(["a", "b", "c", ("t", 1)]), st.integers(0, 20))
    stamped = st.lists(st.tuples(records, st.integers(0, 40)), min_size=1, max_size=10).map(
        lambda rs: ("stamped", ([r for r, _ in rs], [float(t) for _, t in rs])))
    other = st.one_of(st.integers(0, 50).map(lambda w: ("wm", float(w))), st.integers(1, 4).map(lambda d: ("advance", d)))
    return st.lists(st.one_of(stamped, stamped, other), max_size=15)


@pytest.mark.parametrize("backend", ["heap", "managed"])
def test_keyed_process_operator_restores_its_state_and_pending_timers(tmp_path, backend):
    @SETTINGS
    @given(data=cuts(process_steps()))
    def check(data):
        steps, cut = data
        steps = absolute_times(steps)
        with contexts(backend, tmp_path, share=64 * KiB) as (ctx_a, ctx_b):
            check_restore(lambda: KeyedProcessOperator(itemgetter(0), CountWithTimers()), steps, cut, ctx_a, ctx_b)

    check()


def test_timer_queue_snapshot_keeps_the_firing_order_of_ties():
    from runtime.state.timers import TimerQueue

    q = TimerQueue()
    for key in ["z", "a", ("t", 1), "m"]:
        q.register(5.0, key)
    q.register(1.0, "late")
    q.delete(5.0, "a")
    q.register(5.0, "a")  # registered again: fires in its first place, as before
    r = TimerQueue()
    r.restore(roundtrip(q.snapshot()))
    assert list(r.pop_due(10.0)) == list(q.pop_due(10.0)) == [
        (1.0, "late"), (5.0, "z"), (5.0, "a"), (5.0, ("t", 1)), (5.0, "m")]


# ------------------------------------------------------------------ sinks
def test_collect_sink_sends_what_is_pending_before_the_barrier():
    sent: list[Any] = []
    sink = CollectSink("out")
    sink.open(OperatorContext(send_to_client=lambda sink_id, batch: sent.append(list(batch))))
    sink.process_batch([1, 2], None)
    sink.process_batch([3], None)
    assert sent == []
    sink.prepare_snapshot(None)
    assert sent == [[1, 2, 3]] and sink.snapshot_state() is None
    sink.process_batch(list(range(COLLECT_BATCH_RECORDS)), None)
    assert len(sent) == 2


# ------------------------------------------------------------------ every operator
#: Operators that never run in streaming mode (Sort refuses it at open).
NOT_CHECKPOINTED = {"Sort"}


def operator_classes() -> list[type]:
    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(operators.__path__):
        module = importlib.import_module(f"operators.{info.name}")
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if (issubclass(obj, Operator) and obj.__module__ == module.__name__ and not name.startswith("_")):
                found[name] = obj
    found["W4Source"] = W4Source
    return sorted(found.values(), key=lambda c: c.__name__)


def test_every_streaming_operator_can_snapshot():
    classes = operator_classes()
    assert {c.__name__ for c in classes} >= {"KeyedAggregate", "WindowAggregate", "KeyedProcessOperator",
                                             "TextFileSource", "CollectSink", "Sort", "FileSink"}
    missing = [c.__name__ for c in classes if c.__name__ not in NOT_CHECKPOINTED and not c.can_snapshot()]
    assert missing == []


def _snapshot_at(run: Run, checkpoint_id: int) -> Any:
    """What the runtime does at a barrier: emit what is held, snapshot for ``checkpoint_id``, encode at once."""
    run.op.prepare_snapshot(run.emit)
    run.op.ctx.checkpoint_id = checkpoint_id
    return roundtrip(run.op.snapshot_state())


@pytest.mark.parametrize("restored_on", ["managed", "heap"])
def test_the_fixed_width_state_snapshots_only_what_changed_since_the_last_completed_checkpoint(tmp_path,
                                                                                               restored_on):
    """Full at first; then the changelog since the last completed snapshot (checkpoint 3's holds 2's changes
    too: 2 was not known complete when 3 was taken); a restore of the chain (full, then each delta, as the
    runtime resolves it) continues exactly as the uninterrupted operator, on either path."""
    with contexts("managed", tmp_path, share=64 * KiB) as (ctx_a, ctx_b):
        a = Run(keyed.KeyedAggregate(None, keyed.count(), mode="streaming"), ctx_a)
        b: Run | None = None
        try:
            a.step(("batch", list(range(2000))))
            full = _snapshot_at(a, 1)
            a.op.notify_checkpoint_complete(1)
            a.step(("batch", [5, 6, 7] * 10))
            second = _snapshot_at(a, 2)
            a.step(("batch", [7, 8, 0]))
            third = _snapshot_at(a, 3)
            assert type(full) is list and full[0] == "fixed"
            assert type(second) is Incremental and (second.parent, second.base) == (1, 1)
            assert type(third) is Incremental and (third.parent, third.base) == (1, 1)
            kind, delta = third.delta
            assert kind == "fixed-delta" and len(delta[-1]) == (30 + 3) * 8 * 2  # every record since 1: h and acc
            mark = len(a.out)
            b = Run(keyed.KeyedAggregate(None, keyed.count(), mode="streaming"),
                    ctx_b if restored_on == "managed" else {})
            b.op.restore_state(Chain(full, [third.delta]))
            for run in (a, b):
                run.step(("batch", [5, 7, 8, 0, 1999, 4000]))
                run.op.finish(run.emit)
            assert b.out == a.out[mark:] == [(5, 12), (7, 13), (8, 3), (0, 3), (1999, 2), (4000, 1)]
            a.op.notify_checkpoint_complete(3)  # the chain now ends at 3; a snapshot builds on it
            fourth = _snapshot_at(a, 4)
            assert type(fourth) is Incremental and (fourth.parent, fourth.base) == (3, 1)
        finally:
            a.op.close()
            if b is not None:
                b.op.close()


def test_a_chain_of_changes_larger_than_half_the_state_makes_the_next_snapshot_full_again(tmp_path):
    with contexts("managed", tmp_path, share=64 * KiB) as (ctx, _):
        run = Run(keyed.KeyedAggregate(None, keyed.count(), mode="streaming"), ctx)
        try:
            run.step(("batch", list(range(100))))
            assert type(_snapshot_at(run, 1)) is list
            run.op.notify_checkpoint_complete(1)
            run.step(("batch", [1, 2, 3]))
            assert type(_snapshot_at(run, 2)) is Incremental
            run.op.notify_checkpoint_complete(2)
            run.step(("batch", [4] * 60))  # 63 changes since the full snapshot of 100 keys: more than half
            assert type(_snapshot_at(run, 3)) is list
        finally:
            run.op.close()
