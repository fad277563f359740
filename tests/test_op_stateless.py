"""Map, Filter, FlatMap, MapBatches, WithTimestamps: ListSource -> op -> ListSink with run_chain."""

from __future__ import annotations

import numpy as np
import pytest

from operators.stateless import Filter, FlatMap, Map, MapBatches, WithTimestamps, to_records
from runtime.execution.task import MAX_WATERMARK, TimestampedBatch, run_chain


def run(ops, *batches):
    out = []
    for batch in batches:
        run_chain(ops, batch, out.append)
    return out


def flat(batches):
    return [r for b in batches for r in b]


def test_map():
    assert flat(run([Map(lambda x: x + 1)], [1, 2], [3])) == [2, 3, 4]


def test_map_keeps_timestamps():
    [out] = run([Map(str.upper)], TimestampedBatch(["a", "b"], [2.0, 1.0]))
    assert isinstance(out, TimestampedBatch)
    assert (list(out), out.timestamps) == (["A", "B"], [2.0, 1.0])


def test_map_columnar_sees_dict_rows():
    [out] = run([Map(lambda r: r["k"] * 10 + r["v"])], {"k": np.array([1, 2]), "v": np.array([3, 4])})
    assert out == [13, 24]


def test_filter():
    assert flat(run([Filter(lambda x: x > 1)], [1, 2, 3], [0])) == [2, 3]


def test_filter_timestamps_follow_kept_records():
    [out] = run([Filter(lambda x: x % 2)], TimestampedBatch([1, 2, 3, 4, 5], [10.0, 20.0, 30.0, 40.0, 50.0]))
    assert (list(out), out.timestamps) == ([1, 3, 5], [10.0, 30.0, 50.0])


def test_filter_columnar_stays_columnar():
    [out] = run([Filter(lambda r: r["v"] > 1.0)], {"k": np.array([1, 2, 3]), "v": np.array([0.5, 1.5, 2.5])})
    assert sorted(out) == ["k", "v"]
    assert out["k"].tolist() == [2, 3] and out["v"].tolist() == [1.5, 2.5]


def test_flat_map_str_split():
    assert flat(run([FlatMap(str.split)], ["to be or", "", "not to be"])) == ["to", "be", "or", "not", "to", "be"]


def test_flat_map_repeats_input_timestamp():
    batch = TimestampedBatch(["a b", "", "c", "d e f"], [1.0, 2.0, 3.0, 4.0])
    [out] = run([FlatMap(str.split)], batch)
    assert list(out) == ["a", "b", "c", "d", "e", "f"]
    assert out.timestamps == [1.0, 1.0, 3.0, 4.0, 4.0, 4.0]


def test_flat_map_generator_fn():
    def explode(n):
        yield from range(n)
    [out] = run([FlatMap(explode)], TimestampedBatch([2, 1], [5.0, 6.0]))
    assert (list(out), out.timestamps) == ([0, 1, 0], [5.0, 5.0, 6.0])


def test_map_batches_columnar():
    def add(b):
        return {"s": b["a"] + b["b"]}
    [out] = run([MapBatches(add)], {"a": np.arange(3), "b": np.arange(3) * 10})
    assert out["s"].tolist() == [0, 11, 22]


def test_map_batches_list_and_timestamps_carried():
    [out] = run([MapBatches(lambda b: [x * 2 for x in b])], TimestampedBatch([1, 2], [7.0, 8.0]))
    assert (list(out), out.timestamps) == ([2, 4], [7.0, 8.0])


def test_map_batches_changing_length_of_timestamped_batch_is_an_error():
    with pytest.raises(ValueError, match=r"^MapBatches on a timestamped batch: fn must return a TimestampedBatch "
                                         r"or a list of the same length; got 1 records for 2$"):
        run([MapBatches(lambda b: b[:1])], TimestampedBatch([1, 2], [7.0, 8.0]))


def test_chain_of_stateless_operators():
    ops = [FlatMap(str.split), Map(str.lower), Filter(lambda w: len(w) > 2)]
    assert flat(run(ops, ["The cat", "SAT on"], ["the MAT"])) == ["the", "cat", "sat", "the", "mat"]


def test_with_timestamps_and_watermarks():
    op = WithTimestamps(lambda r: r[1], out_of_orderness=2.0)
    assert op.pending_watermark() is None
    [out] = run([op], [("a", 5), ("b", 3)])
    assert isinstance(out, TimestampedBatch)
    assert out.timestamps == [5.0, 3.0] and all(type(t) is float for t in out.timestamps)
    assert op.pending_watermark() == 3.0
    assert op.pending_watermark() is None  # once
    run([op], [("c", 4)])  # max did not advance
    assert op.pending_watermark() is None
    run([op], [("d", 10), ("e", 9)])
    assert op.pending_watermark() == 8.0
    # upstream watermarks are replaced, end of input passes through
    assert op.process_watermark(100.0, lambda b: None) is None
    assert op.process_watermark(MAX_WATERMARK, lambda b: None) == MAX_WATERMARK


def test_with_timestamps_rejects_negative_bound():
    with pytest.raises(ValueError, match=r"^out_of_orderness must be >= 0 seconds; got -1$"):
        WithTimestamps(lambda r: r, out_of_orderness=-1)


def test_to_records_rejects_unknown_batches():
    with pytest.raises(TypeError, match=r"^a batch must be a list, a TimestampedBatch or a dict of numpy arrays; got tuple$"):
        to_records((1, 2))


def test_non_callable_is_a_type_error():
    with pytest.raises(TypeError, match=r"^Map needs a callable; got int$"):
        Map(3)
