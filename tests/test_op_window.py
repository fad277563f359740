"""Window assigners and WindowAggregate against an independent pure-Python reference.

The reference enumerates candidate windows by brute force (every multiple of
``slide``) instead of using ``t mod slide``, and simulates firing with plain lists.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators import keyed
from operators.stateless import WithTimestamps
from operators.window import (
    SlidingEventTimeWindows,
    SlidingProcessingTimeWindows,
    TumblingEventTimeWindows,
    TumblingProcessingTimeWindows,
    WindowAggregate,
)
from runtime.execution.task import MAX_WATERMARK, OperatorContext, TimestampedBatch, run_chain


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def windows_of(t, size, slide):
    """Every [k*slide, k*slide + size) containing t, by brute force over k."""
    k = math.floor((t - size) / slide) - 1
    out = []
    while k * slide <= t:
        start = k * slide
        if start <= t < start + size:
            out.append((float(start), float(start + size)))
        k += 1
    return out


AGGS = {
    "count": (keyed.count, lambda recs: len(recs)),
    "sum": (lambda: keyed.sum(1), lambda recs: (recs[0][0], sum(r[1] for r in recs), recs[0][2])),
    "reduce": (lambda: keyed.reduce(lambda a, b: (a[0], max(a[1], b[1]), a[2])),
               lambda recs: (recs[0][0], max(r[1] for r in recs), recs[0][2])),
}


def reference_event_time(batches, size, slide, out_of_orderness, agg):
    """Records (key, value, ts) arrive batch by batch; the watermark follows each batch."""
    contents = {}  # (start, end) -> list of records, arrival order
    fired = set()
    out, late = [], 0
    watermark = -math.inf
    max_ts = -math.inf

    def fire(bound):
        for window in sorted((w for w in contents if w[1] <= bound and w not in fired), key=lambda w: w[1]):
            fired.add(window)
            recs = contents[window]
            keys = []
            for r in recs:
                if r[0] not in keys:
                    keys.append(r[0])
            for key in keys:
                mine = [r for r in recs if r[0] == key]
                out.append(((key, AGGS[agg][1](mine), window[0], window[1]), math.nextafter(window[1], -math.inf)))

    for batch in batches:
        for rec in batch:
            candidates = windows_of(rec[2], size, slide)
            live = [w for w in candidates if w[1] > watermark]
            if candidates and not live:
                late += 1
            for w in live:
                contents.setdefault(w, []).append(rec)
            max_ts = max(max_ts, rec[2])
        if max_ts - out_of_orderness > watermark:
            watermark = max_ts - out_of_orderness
            fire(watermark)
    fire(math.inf)
    return out, late


def drive_event_time(batches, assigner, out_of_orderness, agg):
    """What the runtime does: chain, poll pending_watermark after each batch, MAX_WATERMARK at the end."""
    ctx = OperatorContext(mode="streaming")
    stamp = WithTimestamps(lambda r: r[2], out_of_orderness=out_of_orderness)
    window = WindowAggregate(lambda r: r[0], assigner, AGGS[agg][0]())
    stamp.open(ctx)
    window.open(ctx)
    out = []

    def sink(batch):
        assert isinstance(batch, TimestampedBatch)
        out.extend(zip(batch, batch.timestamps))

    for batch in batches:
        run_chain([stamp, window], batch, sink)
        watermark = stamp.pending_watermark()
        if watermark is not None:
            assert window.process_watermark(watermark, sink) == watermark
    assert window.process_watermark(MAX_WATERMARK, sink) == MAX_WATERMARK
    window.finish(sink)
    window.close()
    return out, ctx.metrics["late_records_dropped"]


def split(records, cuts):
    cuts = sorted({c % (len(records) + 1) for c in cuts})
    bounds = [0, *cuts, len(records)]
    return [records[a:b] for a, b in zip(bounds, bounds[1:])]


events_st = st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 9), st.integers(0, 80).map(lambda q: q / 4)),
                     max_size=40)


@settings(max_examples=150, deadline=None)
@given(events=events_st, cuts=st.lists(st.integers(0, 50), max_size=8),
       shape=st.sampled_from([(4.0, 4.0), (2.5, 2.5), (6.0, 2.0), (5.0, 1.25), (2.0, 3.0)]),
       out_of_orderness=st.sampled_from([0.0, 1.0, 3.5, 100.0]), agg=st.sampled_from(sorted(AGGS)))
def test_event_time_windows_match_reference(events, cuts, shape, out_of_orderness, agg):
    size, slide = shape
    assigner = (TumblingEventTimeWindows.of(size) if size == slide else SlidingEventTimeWindows.of(size, slide))
    batches = split(events, cuts)
    assert drive_event_time(batches, assigner, out_of_orderness, agg) == reference_event_time(
        batches, size, slide, out_of_orderness, agg)


def test_tumbling_event_time_exact():
    batches = [[("a", 1, 1.0), ("b", 1, 3.0)], [("a", 1, 4.5), ("a", 1, 0.5)], [("b", 1, 7.0)], [("a", 1, 2.0)]]
    out, late = drive_event_time(batches, TumblingEventTimeWindows.of(5), 0.0, "count")
    assert [rec for rec, _ in out] == [("a", 3, 0.0, 5.0), ("b", 1, 0.0, 5.0), ("b", 1, 5.0, 10.0)]
    assert late == 1  # ("a", 1, 2.0) arrived after watermark 7.0 fired [0, 5)


def test_sliding_event_time_exact():
    batches = [[("k", 2, 1.0), ("k", 3, 3.0), ("j", 1, 4.0)]]
    out, late = drive_event_time(batches, SlidingEventTimeWindows.of(4, 2), 0.0, "sum")
    assert [rec for rec, _ in out] == [
        ("k", ("k", 2, 1.0), -2.0, 2.0),
        ("k", ("k", 5, 1.0), 0.0, 4.0),
        ("k", ("k", 3, 3.0), 2.0, 6.0), ("j", ("j", 1, 4.0), 2.0, 6.0),
        ("j", ("j", 1, 4.0), 4.0, 8.0),
    ]
    assert late == 0


def test_allowed_lateness_refires_and_then_drops():
    ctx = OperatorContext()
    op = WindowAggregate(None, TumblingEventTimeWindows.of(10), keyed.count(), allowed_lateness=5)
    op.open(ctx)
    out = []
    op.process_batch(TimestampedBatch(["a", "b"], [1.0, 2.0]), out.extend)
    op.process_watermark(10.0, out.extend)
    assert out == [("a", 1, 0.0, 10.0), ("b", 1, 0.0, 10.0)]
    op.process_batch(TimestampedBatch(["a"], [3.0]), out.extend)  # late but within lateness: re-fire key a
    assert out[2:] == [("a", 2, 0.0, 10.0)]
    op.process_watermark(15.0, out.extend)  # end + lateness reached: state purged
    op.process_batch(TimestampedBatch(["a"], [4.0]), out.extend)
    assert ctx.metrics["late_records_dropped"] == 1
    op.finish(out.extend)
    assert out[3:] == []


def test_event_time_window_needs_timestamps():
    op = WindowAggregate(None, TumblingEventTimeWindows.of(10), keyed.count())
    op.open(OperatorContext())
    with pytest.raises(TypeError, match=r"^TumblingEventTimeWindows.of\(10\) needs timestamped records; got a list "
                                        r"batch; call with_timestamps\(\.\.\.\) before the window$"):
        op.process_batch(["a"], print)


def test_non_advancing_watermark_is_not_forwarded():
    op = WindowAggregate(None, TumblingEventTimeWindows.of(10), keyed.count())
    op.open(OperatorContext())
    assert op.process_watermark(5.0, print) == 5.0
    assert op.process_watermark(5.0, print) is None
    assert op.process_watermark(3.0, print) is None


def test_assigner_validation():
    with pytest.raises(ValueError, match=r"^window size must be > 0 seconds and finite; got 0$"):
        TumblingEventTimeWindows.of(0)
    with pytest.raises(TypeError, match=r"^window slide must be a number of seconds; got str '1'$"):
        SlidingEventTimeWindows.of(2, "1")


# -- processing time ------------------------------------------------------------------

def reference_processing_time(arrivals, size, slide):
    """arrivals: (time, batch of (key, value)); windows fire once the clock reaches their end."""
    contents = {}
    out = []

    def fire(bound):
        for window in sorted([w for w in contents if w[1] <= bound], key=lambda w: w[1]):
            recs = contents.pop(window)
            keys = list(dict.fromkeys(r[0] for r in recs))
            out.extend((key, sum(1 for r in recs if r[0] == key), window[0], window[1]) for key in keys)

    for now, batch in arrivals:
        fire(now)
        for w in windows_of(now, size, slide):
            contents.setdefault(w, []).extend(batch)
    fire(math.inf)
    return out


def drive_processing_time(arrivals, assigner):
    clock = FakeClock()
    op = WindowAggregate(lambda r: r[0], assigner, keyed.count())
    op.open(OperatorContext(clock=clock))
    out = []
    for now, batch in arrivals:
        clock.now = now
        while op.next_timer() is not None and op.next_timer() <= now:
            op.on_processing_time(now, out.extend)
        run_chain([op], batch, out.extend)
    op.finish(out.extend)
    return out


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 12).map(lambda q: q / 4),
                                st.lists(st.tuples(st.sampled_from("xyz"), st.just(1)), max_size=4)), max_size=15),
       shape=st.sampled_from([(2.0, 2.0), (3.0, 1.0), (1.5, 0.5)]))
def test_processing_time_windows_match_reference(steps, shape):
    arrivals, now = [], 0.0
    for dt, batch in steps:
        now += dt
        arrivals.append((now, batch))
    size, slide = shape
    assigner = TumblingProcessingTimeWindows.of(size) if size == slide else SlidingProcessingTimeWindows.of(size, slide)
    assert drive_processing_time(arrivals, assigner) == reference_processing_time(arrivals, size, slide)


def test_processing_time_exact_with_fake_clock():
    clock = FakeClock(100.0)
    op = WindowAggregate(None, TumblingProcessingTimeWindows.of(10), keyed.count())
    op.open(OperatorContext(clock=clock))
    out = []
    assert op.next_timer() is None
    op.process_batch(["a", "b", "a"], out.extend)
    assert op.next_timer() == 110.0
    clock.now = 109.0
    op.process_batch(["b"], out.extend)
    op.on_processing_time(109.5, out.extend)
    assert out == []
    clock.now = 112.0
    op.process_batch(["c"], out.extend)
    op.on_processing_time(112.0, out.extend)
    assert out == [("a", 2, 100.0, 110.0), ("b", 2, 100.0, 110.0)]
    assert op.next_timer() == 120.0
    op.finish(out.extend)
    assert out[2:] == [("c", 1, 110.0, 120.0)]
    assert op.next_timer() is None
