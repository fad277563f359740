"""The numeric fast path of keyed aggregations equals the generic dict loops, record for record.

Batch mode only (the combiner, the merge of its partials, and a direct batch
aggregation). Each case runs the same batches through ``vectorize=True`` and
``vectorize=False`` and compares ``repr`` of the outputs: same records, same
order, same types (tuples stay tuples, int sums stay exact Python ints) and the
same float bits (both paths add left to right). Batches the fast path cannot
take exactly (str/bool/None, huge ints, NaN or -0.0 under min/max) must switch
the operator to the generic path with its state and still give the same output.
"""

from __future__ import annotations

import re
from collections import namedtuple

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators import keyed
from operators.keyed import KeyedAggregate, KeyedCombine
from runtime.execution.task import OperatorContext

AGGS = {
    "count": keyed.count,
    "sum": lambda: keyed.sum(1),
    "min": lambda: keyed.min(1),
    "max": lambda: keyed.max(1),
}
PLAIN_AGGS = {"sum": keyed.sum, "min": keyed.min, "max": keyed.max}


def key0(r):
    return r[0]


def run(op, batches, *, mode="batch"):
    """Feed ``batches``; returns (output, whether the fast path was still on before finish)."""
    op.open(OperatorContext(mode=mode))
    out = []
    for batch in batches:
        op.process_batch(list(batch), out.extend)
    still_fast = op.vectorize
    op.finish(out.extend)
    op.close()
    return out, still_fast


def split(records, cuts):
    cuts = sorted({c % (len(records) + 1) for c in cuts})
    bounds = [0, *cuts, len(records)]
    return [records[a:b] for a, b in zip(bounds, bounds[1:])]


def both(make_op, batches):
    """Run the same batches with the fast path on and off; returns (fast_out, generic_out, fast_still_on)."""
    fast, still_fast = run(make_op(True), batches)
    generic, _ = run(make_op(False), batches)
    return fast, generic, still_fast


def same(a, b):
    assert repr(a) == repr(b)
    assert [type(x) for x in a] == [type(x) for x in b]


# -- strategies ------------------------------------------------------------------------------

small_keys = st.integers(0, 30)
wide_keys = st.one_of(small_keys, st.integers(-2**40, 2**40), st.integers(-2**63, 2**63 - 1))
int_values = st.integers(-10**6, 10**6)
float_values = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).map(
    lambda x: x + 0.0)  # no -0.0 here: min/max fall back on it (see test_nan_inf_and_negative_zero)
odd_floats = st.one_of(float_values, st.sampled_from([0.0, -0.0, float("inf"), float("-inf"), float("nan")]))


@st.composite
def numeric_records(draw, keys=small_keys, values=None, max_size=80):
    values = values if values is not None else draw(st.sampled_from([int_values, float_values]))
    rows = draw(st.lists(st.tuples(keys, values), max_size=max_size))
    tag = draw(st.sampled_from(["pair", "triple"]))
    if tag == "triple":  # an extra field that differs per record: "first record" must be the first one
        return [(k, v, f"r{i}") for i, (k, v) in enumerate(rows)]
    return rows


cuts_st = st.lists(st.integers(0, 200), max_size=8)


# -- properties ------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(sorted(AGGS)), records=numeric_records(keys=wide_keys), cuts=cuts_st,
       max_keys=st.sampled_from([1, 3, 100_000]))
def test_combiner_partials_equal_generic(name, records, cuts, max_keys):
    batches = split(records, cuts)
    fast, generic, still_fast = both(
        lambda v: KeyedCombine(key0, AGGS[name](), max_keys=max_keys, vectorize=v), batches)
    same(fast, generic)
    assert still_fast


@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(sorted(AGGS)), records=numeric_records(keys=wide_keys), cuts=cuts_st)
def test_direct_batch_aggregate_equals_generic(name, records, cuts):
    fast, generic, still_fast = both(
        lambda v: KeyedAggregate(key0, AGGS[name](), mode="batch", vectorize=v), split(records, cuts))
    same(fast, generic)
    assert still_fast


@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(sorted(AGGS)), records=numeric_records(), cuts=cuts_st,
       subtasks=st.integers(1, 3), max_keys=st.integers(1, 40), wire=st.booleans(), data=st.data())
def test_combine_then_merge_equals_generic(name, records, cuts, subtasks, max_keys, wire, data):
    """Several combiners (random splits, early flushes) -> any interleaving -> merge; both paths agree."""
    owners = data.draw(st.lists(st.integers(0, subtasks - 1), min_size=len(records), max_size=len(records)))
    partial_batches = []
    for i in range(subtasks):
        mine = [r for r, o in zip(records, owners) if o == i]
        fast, generic, still_fast = both(
            lambda v: KeyedCombine(key0, AGGS[name](), max_keys=max_keys, vectorize=v), split(mine, cuts))
        same(fast, generic)
        assert still_fast
        partial_batches.extend(split(fast, cuts))
    order = data.draw(st.permutations(range(len(partial_batches))))
    interleaved = [partial_batches[j] for j in order]
    if wire:  # across the network tuples may come back as lists
        interleaved = [msgpack.unpackb(msgpack.packb(b)) for b in interleaved]
    fast, generic, still_fast = both(
        lambda v: KeyedAggregate(None, AGGS[name](), mode="batch", partial_input=True, vectorize=v), interleaved)
    same(fast, generic)
    assert still_fast
    direct, _ = run(KeyedAggregate(key0, AGGS[name](), mode="batch", vectorize=False), [records])
    if wire:
        direct = msgpack.unpackb(msgpack.packb(direct))
    if name == "sum" and records and isinstance(records[0][1], float):  # summation order differs
        assert sorted(r[0] for r in fast) == sorted(r[0] for r in direct)
        by_key = {r[0]: r[1] for r in direct}
        assert all(r[1] == pytest.approx(by_key[r[0]], rel=1e-12, abs=1e-6) for r in fast)
    else:
        # after a combiner "first record" is the first merged one: compare key and value only
        assert sorted(repr(list(r[:2])) for r in fast) == sorted(repr(list(r[:2])) for r in direct)


@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(sorted(PLAIN_AGGS) + ["count"]),
       values=st.one_of(st.lists(int_values, max_size=80), st.lists(float_values, max_size=80)),
       modulus=st.integers(1, 9), cuts=cuts_st)
def test_plain_number_streams(name, values, modulus, cuts):
    """sum()/min()/max()/count() on plain numbers: ``(key, value)`` results, combiner and merge."""
    make = keyed.count if name == "count" else PLAIN_AGGS[name]

    def key(x):
        return int(x) % modulus

    batches = split(values, cuts)
    fast, generic, still_fast = both(lambda v: KeyedAggregate(key, make(), mode="batch", vectorize=v), batches)
    same(fast, generic)
    assert still_fast
    partials, generic_partials, still_fast = both(lambda v: KeyedCombine(key, make(), vectorize=v), batches)
    same(partials, generic_partials)
    assert still_fast
    fast, generic, _ = both(
        lambda v: KeyedAggregate(None, make(), mode="batch", partial_input=True, vectorize=v), split(partials, cuts))
    same(fast, generic)


@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(sorted(AGGS)),
       records=numeric_records(values=odd_floats), cuts=cuts_st)
def test_nan_inf_and_negative_zero(name, records, cuts):
    """Float edge cases: sums stay exact (-0.0 included); min/max fall back on NaN or -0.0."""
    batches = split(records, cuts)
    for make_op in (lambda v: KeyedCombine(key0, AGGS[name](), vectorize=v),
                    lambda v: KeyedAggregate(key0, AGGS[name](), mode="batch", vectorize=v)):
        fast, generic, _ = both(make_op, batches)
        same(fast, generic)


# -- fallbacks -------------------------------------------------------------------------------

INTRUDERS = {
    "str key": ("k", 1.0),
    "bool key": (True, 1.0),
    "float key": (1.5, 1.0),
    "None key": (None, 1.0),
    "bool value": (1, True),
    "None value": (1, None),
    "str value": (1, "x"),
    "int value among floats": (1, 7),
    "numpy value": (1, __import__("numpy").float64(2.5)),
}


@pytest.mark.parametrize("name", ["count", "sum", "min", "max"])
@pytest.mark.parametrize("intruder", sorted(INTRUDERS))
@pytest.mark.parametrize("op_kind", ["combine", "direct"])
def test_a_foreign_batch_in_the_middle_falls_back_and_stays_correct(name, intruder, op_kind):
    good = [(i % 5, i * 0.5) for i in range(40)]
    bad = [(2, 1.25), INTRUDERS[intruder], (9, 3.0)]
    batches = [good[:20], bad, good[20:]]
    if op_kind == "combine":
        def make(v):
            return KeyedCombine(key0, AGGS[name](), vectorize=v)
    else:
        def make(v):
            return KeyedAggregate(key0, AGGS[name](), mode="batch", vectorize=v)
    try:
        generic, _ = run(make(False), batches)
    except TypeError as exc:  # e.g. min over 1.0 and "x": the fast path must raise the same error
        with pytest.raises(TypeError, match=re.escape(str(exc))):
            run(make(True), batches)
        return
    fast, still_fast = run(make(True), batches)
    same(fast, generic)
    if name != "count" or "key" in intruder:
        assert not still_fast


def test_fallback_keeps_state_and_order():
    op = KeyedCombine(key0, keyed.sum(1))
    op.open(OperatorContext(mode="batch"))
    out = []
    op.process_batch([(3, 1), (1, 2), (3, 4)], out.extend)
    assert op.vectorize and op._vec is not None
    op.process_batch([("s", 5), (1, 1)], out.extend)
    assert not op.vectorize and op._vec is None
    op.process_batch([(7, 1)], out.extend)
    op.finish(out.extend)
    assert out == [(3, (5, (3, 1))), (1, (3, (1, 2))), ("s", (5, ("s", 5))), (7, (1, (7, 1)))]


def test_int_sums_near_int64_overflow_fall_back_exactly():
    big = 2**62 + 12345
    records = [(1, big), (1, big), (2, -big), (1, big), (2, -big), (2, 3)]
    fast, generic, still_fast = both(lambda v: KeyedCombine(key0, keyed.sum(1), vectorize=v),
                                     [records[:2], records[2:4], records[4:]])
    same(fast, generic)
    assert fast == [(1, (3 * big, (1, big))), (2, (3 - 2 * big, (2, -big)))]
    assert not still_fast
    # values and keys beyond int64 never enter numpy
    for records in ([(1, 2**63), (1, 1)], [(2**63, 1), (1, 1)], [(1, -2**63 - 1)]):
        fast, generic, still_fast = both(lambda v: KeyedAggregate(key0, keyed.sum(1), mode="batch", vectorize=v),
                                         [[(0, 1)], records])
        same(fast, generic)
        assert not still_fast
    # min/max of int64 extremes are exact and need no fallback
    records = [(0, 2**63 - 1), (0, -2**63), (1, 5)]
    for agg in (keyed.min, keyed.max):
        fast, generic, still_fast = both(lambda v, agg=agg: KeyedAggregate(key0, agg(1), mode="batch", vectorize=v),
                                         [records])
        same(fast, generic)
        assert still_fast


def test_many_small_int_sums_stay_on_the_fast_path():
    records = [(i % 7, 10**9 + i) for i in range(5000)]
    fast, generic, still_fast = both(lambda v: KeyedAggregate(key0, keyed.sum(1), mode="batch", vectorize=v),
                                     split(records, list(range(0, 5000, 700))))
    same(fast, generic)
    assert still_fast


def test_keys_outside_the_table_use_the_dict_and_keep_first_seen_order():
    records = [(5, 1.0), (2**40, 2.0), (-3, 3.0), (5, 4.0), (2**62, 5.0), (-3, 6.0), (7, 7.0)]
    fast, generic, still_fast = both(lambda v: KeyedAggregate(key0, keyed.max(1), mode="batch", vectorize=v),
                                     [records[:2], records[2:5], records[5:]])
    same(fast, generic)
    assert [r[0] for r in fast] == [5, 2**40, -3, 2**62, 7]
    assert still_fast


def test_record_shapes_dicts_lists_namedtuples():
    Row = namedtuple("Row", "k v tag")
    cases = [
        (lambda r: r["k"], "v", [{"k": 1, "v": 2.5, "t": "a"}, {"k": 1, "v": 1.0, "t": "b"}, {"k": 2, "v": 3.0}]),
        (key0, 1, [[1, 5, "a"], [2, 6, "b"], [1, 7, "c"]]),
        (key0, 1, [Row(1, 5, "a"), Row(2, 6, "b"), Row(1, 7, "c")]),
        (key0, -2, [(1, 5, "a"), (2, 6, "b"), (1, 7, "c")]),
    ]
    for key_fn, field, records in cases:
        for agg in (keyed.sum, keyed.min, keyed.max):
            fast, generic, still_fast = both(
                lambda v, key_fn=key_fn, agg=agg, field=field: KeyedAggregate(key_fn, agg(field), mode="batch",
                                                                            vectorize=v),
                [records[:1], records[1:]])
            same(fast, generic)
            assert still_fast


def test_clear_errors_are_the_generic_ones():
    with pytest.raises(IndexError, match=r"^sum\(5\): index out of range for a record of length 2"):
        run(KeyedAggregate(key0, keyed.sum(5), mode="batch"), [[(1, 2)]])
    with pytest.raises(TypeError, match=r"^sum\(\) without a field needs plain values"):
        run(KeyedCombine(key0, keyed.sum()), [[(1, 2)]])
    with pytest.raises(TypeError, match=r"^sum\(1\) needs tuple, list or dict records"):
        run(KeyedAggregate(lambda r: 1, keyed.sum(1), mode="batch"), [["ab"]])


def test_streaming_mode_and_reduce_stay_generic():
    op = KeyedAggregate(key0, keyed.sum(1), mode="streaming")
    out, _ = run(op, [[(1, 2), (1, 3)]], mode="streaming")
    assert out == [(1, 2), (1, 5)] and op._vec is None
    combine = KeyedCombine(key0, keyed.sum(1))
    out, _ = run(combine, [[(1, 2), (1, 3)]], mode="streaming")
    assert out == [(1, (5, (1, 2)))]
    assert not KeyedCombine(key0, keyed.reduce(lambda a, b: a)).vectorize


def test_operator_reuse_after_finish():
    op = KeyedCombine(key0, keyed.count())
    op.open(OperatorContext(mode="batch"))
    out = []
    op.process_batch([(1, 0), (2, 0), (1, 0)], out.extend)
    op.finish(out.extend)
    op.process_batch([(2, 0)], out.extend)
    op.finish(out.extend)
    assert out == [(1, 2), (2, 1), (2, 1)]
