"""Keyed aggregations: result shapes, streaming vs batch, and combiner + merge == direct aggregation."""

from __future__ import annotations

from collections import namedtuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators import keyed
from operators.keyed import Aggregation, KeyedAggregate, KeyedCombine, combinable, partial_key
from runtime.execution.task import OperatorContext, TimestampedBatch, run_chain


def run(op, batches, *, mode="batch"):
    op.open(OperatorContext(mode=mode))
    out = []
    for batch in batches:
        run_chain([op], batch, out.extend)
    op.finish(out.extend)
    op.close()
    return out


WORDS = ["to", "be", "or", "not", "to", "be", "that", "is", "to"]
PAIRS = [("a", 3), ("b", 1), ("a", -2), ("c", 5), ("b", 4)]


def test_count_word_count_batch():
    assert run(KeyedAggregate(None, keyed.count(), mode="batch"), [WORDS[:4], WORDS[4:]]) == [
        ("to", 3), ("be", 2), ("or", 1), ("not", 1), ("that", 1), ("is", 1)]


def test_count_streaming_emits_every_update():
    out = run(KeyedAggregate(str.lower, keyed.count(), mode="streaming"), [["A", "b"], ["a", "B", "a"]],
              mode="streaming")
    assert out == [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]


def test_sum_field_of_tuples_keeps_first_record():
    out = run(KeyedAggregate(lambda r: r[0], keyed.sum(1), mode="batch"), [PAIRS])
    assert out == [("a", 1), ("b", 5), ("c", 5)]
    assert all(type(r) is tuple for r in out)


def test_sum_field_of_dicts_and_lists():
    recs = [{"k": "x", "v": 1.5, "tag": "first"}, {"k": "x", "v": 2.0, "tag": "second"}]
    assert run(KeyedAggregate(lambda r: r["k"], keyed.sum("v"), mode="batch"), [recs]) == [
        {"k": "x", "v": 3.5, "tag": "first"}]
    assert run(KeyedAggregate(lambda r: r[0], keyed.sum(1), mode="batch"), [[["y", 1], ["y", 2]]]) == [["y", 3]]


def test_sum_field_keeps_namedtuples():
    Row = namedtuple("Row", "k v")
    assert run(KeyedAggregate(lambda r: r.k, keyed.sum(1), mode="batch"), [[Row("a", 1), Row("a", 2)]]) == [
        Row("a", 3)]


def test_sum_of_plain_numbers_emits_key_and_total():
    out = run(KeyedAggregate(lambda x: x % 2, keyed.sum(), mode="streaming"), [[1, 2, 3, 4]], mode="streaming")
    assert out == [(1, 1), (0, 2), (1, 4), (0, 6)]


def test_sum_without_field_on_tuples_is_a_clear_error():
    with pytest.raises(TypeError, match=r"^sum\(\) without a field needs plain values \(numbers\); got tuple "
                                        r"\('a', 3\); pass sum\(field=\.\.\.\)$"):
        run(KeyedAggregate(lambda r: r[0], keyed.sum(), mode="batch"), [PAIRS])


def test_min_max_like_flink():
    recs = [("a", 5, "first"), ("a", 2, "second"), ("a", 9, "third")]
    assert run(KeyedAggregate(lambda r: r[0], keyed.min(1), mode="batch"), [recs]) == [("a", 2, "first")]
    assert run(KeyedAggregate(lambda r: r[0], keyed.max(1), mode="batch"), [recs]) == [("a", 9, "first")]
    assert run(KeyedAggregate(lambda x: x % 3, keyed.min(), mode="batch"), [[7, 4, 1, 5, 8]]) == [(1, 1), (2, 5)]
    assert run(KeyedAggregate(lambda x: x % 3, keyed.max(), mode="streaming"), [[4, 7, 1]], mode="streaming") == [
        (1, 4), (1, 7), (1, 7)]


def test_reduce_emits_the_reduced_record():
    agg = keyed.reduce(lambda a, b: (a[0], a[1] + b[1]))
    assert run(KeyedAggregate(lambda r: r[0], agg, mode="streaming"), [PAIRS], mode="streaming") == [
        ("a", 3), ("b", 1), ("a", 1), ("c", 5), ("b", 5)]


def test_streaming_keeps_timestamps():
    op = KeyedAggregate(None, keyed.count(), mode="streaming")
    op.open(OperatorContext())
    out = []
    op.process_batch(TimestampedBatch(["x", "y", "x"], [1.0, 2.0, 3.0]), out.append)
    assert (list(out[0]), out[0].timestamps) == ([("x", 1), ("y", 1), ("x", 2)], [1.0, 2.0, 3.0])


def test_mode_none_follows_ctx():
    assert run(KeyedAggregate(None, keyed.count()), [["a", "a"]], mode="batch") == [("a", 2)]
    assert run(KeyedAggregate(None, keyed.count()), [["a", "a"]], mode="streaming") == [("a", 1), ("a", 2)]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"^KeyedAggregate: mode must be 'streaming', 'batch' or None; got 'fast'$"):
        KeyedAggregate(None, keyed.count(), mode="fast")
    with pytest.raises(TypeError, match=r"^KeyedAggregate needs an Aggregation"):
        KeyedAggregate(None, len)

    class NoMerge(Aggregation):
        def create(self, r):
            return r

    assert not combinable(NoMerge())
    with pytest.raises(ValueError, match=r"^KeyedCombine: aggregation 'aggregation' is not combinable"):
        KeyedCombine(None, NoMerge())


def test_combiner_flushes_when_it_holds_too_many_keys():
    combine = KeyedCombine(None, keyed.count(), max_keys=2)
    combine.open(OperatorContext(mode="batch"))
    out = []
    combine.process_batch(["a", "b", "a"], out.extend)
    assert out == []
    combine.process_batch(["c"], out.extend)  # 3 keys > 2: flush
    assert out == [("a", 2), ("b", 1), ("c", 1)]
    combine.process_batch(["a"], out.extend)
    combine.finish(out.extend)
    assert out[3:] == [("a", 1)]


def test_combiner_in_streaming_mode_flushes_every_batch():
    combine = KeyedCombine(lambda r: r[0], keyed.sum(1))
    combine.open(OperatorContext(mode="streaming"))
    out = []
    combine.process_batch([("a", 1), ("a", 2)], out.extend)
    assert out == [("a", (3, ("a", 1)))]  # accumulators ship as tuples


# -- properties ------------------------------------------------------------------------

AGGREGATIONS = {
    "count": (keyed.count, lambda recs: ("k", len(recs))),
    "sum": (lambda: keyed.sum(1), lambda recs: (recs[0][0], sum(r[1] for r in recs), recs[0][2])),
    "min": (lambda: keyed.min(1), lambda recs: (recs[0][0], min(r[1] for r in recs), recs[0][2])),
    "max": (lambda: keyed.max(1), lambda recs: (recs[0][0], max(r[1] for r in recs), recs[0][2])),
    "reduce": (lambda: keyed.reduce(lambda a, b: (a[0], a[1] + b[1], a[2])),
               lambda recs: (recs[0][0], sum(r[1] for r in recs), recs[0][2])),
}

# records (key, value, tag) whose tag depends on the key only, so "first record" is well defined
records_st = st.lists(st.tuples(st.sampled_from("abcdefg"), st.integers(-1000, 1000)), max_size=60).map(
    lambda rs: [(k, v, k.upper()) for k, v in rs])


def reference(name, records):
    by_key: dict = {}
    for r in records:
        by_key.setdefault(r[0], []).append(r)
    make = AGGREGATIONS[name][1]
    out = []
    for key, recs in by_key.items():
        res = make(recs)
        out.append((key, res[1]) if name == "count" else res)
    return out


def split(records, cuts):
    cuts = sorted({c % (len(records) + 1) for c in cuts})
    bounds = [0, *cuts, len(records)]
    return [records[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(AGGREGATIONS)), records=records_st,
       cuts=st.lists(st.integers(0, 100), max_size=5))
def test_streaming_last_update_equals_batch_result(name, records, cuts):
    make = AGGREGATIONS[name][0]
    batches = split(records, cuts)
    streaming = run(KeyedAggregate(partial_key, make(), mode="streaming"), batches, mode="streaming")
    batch = run(KeyedAggregate(partial_key, make(), mode="batch"), batches)
    assert len(streaming) == len(records)
    last = {}
    for rec in streaming:
        last[rec[0]] = rec
    assert list(last.values()) == batch
    assert batch == reference(name, records)


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(sorted(AGGREGATIONS)), records=records_st,
       cuts=st.lists(st.integers(0, 100), max_size=6), subtasks=st.integers(1, 3), max_keys=st.integers(1, 8),
       data=st.data())
def test_combiner_then_merge_equals_direct_aggregation(name, records, cuts, subtasks, max_keys, data):
    """Several upstream combiners (random batch splits, early flushes) -> shuffle -> merge == direct."""
    make = AGGREGATIONS[name][0]
    owners = data.draw(st.lists(st.integers(0, subtasks - 1), min_size=len(records), max_size=len(records)))
    partials = []
    for i in range(subtasks):
        mine = [r for r, o in zip(records, owners) if o == i]
        combine = KeyedCombine(partial_key, make(), max_keys=max_keys)
        partials.append(run(combine, split(mine, cuts)))
    # the shuffle delivers the upstream subtasks' partial batches in any interleaving
    partial_batches = [b for ps in partials for b in split(ps, cuts)]
    order = data.draw(st.permutations(range(len(partial_batches))))
    interleaved = [partial_batches[j] for j in order]
    final = run(KeyedAggregate(None, make(), mode="batch", partial_input=True), interleaved)
    direct = run(KeyedAggregate(partial_key, make(), mode="batch"), [records])
    assert sorted(map(repr, final)) == sorted(map(repr, direct))
    assert sorted(map(repr, direct)) == sorted(map(repr, reference(name, records)))


def test_partials_survive_a_msgpack_round_trip():
    """Partials cross the shuffle as msgpack: tuples come back as lists and merge must cope."""
    import msgpack

    combine = KeyedCombine(lambda r: r[0], keyed.sum(1))
    partials = run(combine, [[("a", 1, "x"), ("a", 2, "y"), ("b", 5, "z")]])
    wire = msgpack.unpackb(msgpack.packb(partials))
    final = run(KeyedAggregate(None, keyed.sum(1), mode="batch", partial_input=True), [wire, wire])
    assert final == [["a", 6, "x"], ["b", 10, "z"]]


def test_partial_input_streaming_emits_per_partial():
    out = run(KeyedAggregate(None, keyed.count(), mode="streaming", partial_input=True),
              [[("a", 2), ("b", 1)], [("a", 3)]], mode="streaming")
    assert out == [("a", 2), ("b", 1), ("a", 5)]
