"""StreamingFixedState and its kernel (upsert_emit) against a dict model, with partitions evicted and loaded back;
streaming count/sum jobs on the managed backend against the heap backend.

Real SharedRegion / MemoryManager / IOManager: every test checks that no page stays allocated and no spill file
stays on disk.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import managed_memory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import StreamEnvironment
from runtime.errors import OutOfMemoryError
from runtime.managed import streaming_table
from runtime.managed.hash_table import hash_words
from runtime.managed.share import ManagedShare, mix64
from runtime.managed.streaming_table import StreamingFixedState

KiB = 1024
PAGE = 4 * KiB
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(params=["compiled", "python"])
def probe_loop(request, monkeypatch):
    """StreamingFixedState runs with the compiled upsert_emit and with its per-row Python loop."""
    if request.param == "python":
        monkeypatch.setattr(streaming_table, "_kernels", None)
    return request.param


def model_updates(model: dict, kind: str, keys: list, values: list | None) -> list:
    out = []
    for i, k in enumerate(keys):
        v = 1 if values is None else values[i]
        cur = model.get(k)
        if cur is None:
            new = v
        elif kind in ("count", "sum"):
            new = cur + v
        elif kind == "min":
            new = v if v < cur else cur
        else:
            new = v if v > cur else cur
        model[k] = new
        out.append(new)
    return out


# ------------------------------------------------------------------ kernel
def test_upsert_emit_merges_in_input_order_and_stops_at_room():
    from runtime.managed import _kernels

    cap, width = 16, 3  # [h, key word, acc]
    table = np.zeros((cap, width), np.uint64)
    words = np.array([[5], [7], [5], [9], [5]], np.uint64)
    rows = np.empty((5, width), np.uint64)
    rows[:, 0] = hash_words(words)
    rows[:, 1] = words[:, 0]
    rows[:, 2] = [10, 20, 30, 40, 50]
    out = np.zeros(5, np.uint64)
    # room for two new keys: the third (key 9, row 3) stops the call there
    assert _kernels.upsert_emit(table, cap, width, 1, b"i", rows, 0, 2, out) == (3, 2)
    assert out[:3].tolist() == [10, 20, 40]
    assert _kernels.upsert_emit(table, cap, width, 1, b"i", rows, 3, 5, out) == (5, 1)
    assert out.tolist() == [10, 20, 40, 40, 90]
    assert _kernels.upsert(table, cap, width, 1, b"i", rows[:1], 0, 0, True, np.empty(1, np.int64))[0] == 1
    assert sorted(table[table[:, 0] != 0, 2].tolist()) == [20, 40, 100]


@pytest.mark.parametrize("code,dtype,kind", [("n", np.int64, "min"), ("x", np.int64, "max"), ("f", np.float64, "sum"),
                                             ("N", np.float64, "min"), ("X", np.float64, "max")])
def test_upsert_emit_accumulators_of_every_kind(code, dtype, kind):
    from runtime.managed import _kernels

    rng = np.random.default_rng(7)
    keys = rng.integers(0, 20, 300)
    values = rng.integers(-1000, 1000, 300).astype(dtype)
    cap = 64
    table = np.zeros((cap, 2), np.uint64)
    rows = np.empty((300, 2), np.uint64)
    rows[:, 0] = mix64(keys.astype(np.uint64))
    rows[:, 1] = values.view(np.uint64)
    out = np.zeros(300, np.uint64)
    assert _kernels.upsert_emit(table, cap, 2, 0, code.encode(), rows, 0, cap, out) == (300, 20)
    assert out.view(dtype).tolist() == model_updates({}, kind, keys.tolist(), values.tolist())


def test_upsert_emit_checks_its_buffers():
    from runtime.managed import _kernels

    table = np.zeros((16, 2), np.uint64)
    rows = np.ones((4, 2), np.uint64)
    with pytest.raises(ValueError, match="out"):
        _kernels.upsert_emit(table, 16, 2, 0, b"i", rows, 0, 16, np.zeros(3, np.uint64))
    with pytest.raises(ValueError, match="inconsistent"):
        _kernels.upsert_emit(table, 12, 2, 0, b"i", rows, 0, 16, np.zeros(4, np.uint64))


# ------------------------------------------------------------------ state
batches_st = st.lists(st.lists(st.tuples(st.integers(0, 400), st.integers(-50, 50)), max_size=120),
                      min_size=1, max_size=8)


@pytest.mark.parametrize("kind", ["count", "sum", "min", "max"])
@pytest.mark.parametrize("key_type", ["int64", "S16"])
@SETTINGS
@given(batches=batches_st, float_values=st.booleans())
def test_updates_equal_a_dict_with_partitions_evicted_and_loaded(tmp_path, probe_loop, kind, key_type, batches,
                                                                 float_values):
    value_dtype = "float64" if float_values and kind != "count" else "int64"
    with managed_memory(tmp_path, 1 << 20, PAGE) as (mm, io):
        share = ManagedShare(mm, "op", 24 * KiB)  # a staging page and a few partitions' tables
        state = StreamingFixedState(share, io, kind, value_dtype=value_dtype, key_dtype=key_type, partitions=8)
        model: dict = {}
        try:
            for batch in batches:
                ks = [k * 7919 - 1000 for k, _ in batch]  # negative keys too
                vs = [float(v) if value_dtype == "float64" else v for _, v in batch]
                keys = (np.array(ks, np.int64) if key_type == "int64"
                        else np.array([b"key-%d" % k for k in ks], "S16").astype("S16"))
                got = state.update(keys, None if kind == "count" else np.array(vs, value_dtype))
                key_list = ks if key_type == "int64" else keys.tolist()
                assert got.tolist() == model_updates(model, kind, key_list, None if kind == "count" else vs)
                assert share.used_bytes <= share.share_bytes
            items = {}
            for keys, accs in state.items():
                items.update(zip(keys.tolist(), accs.tolist()))
            assert items == model
            stats = state.stats()
            assert stats.entries == len(model)
            if len(model) > 300:  # more than the share holds: partitions went to disk and came back
                assert stats.partition_evictions > 0 and stats.spilled_bytes > 0
        finally:
            state.release()
            share.release_all()


def test_the_key_whose_hash_is_zero_has_its_own_accumulator(tmp_path, probe_loop):
    from runtime.managed.share import unmix64

    zero_key = int(unmix64(np.zeros(1, np.uint64)).view(np.int64)[0])
    with managed_memory(tmp_path, 1 << 20, PAGE) as (mm, io):
        share = ManagedShare(mm, "op", 64 * KiB)
        state = StreamingFixedState(share, io, "sum", partitions=4)
        try:
            got = state.update(np.array([zero_key, 1, zero_key, 1]), np.array([3, 4, 5, 6]))
            assert got.tolist() == [3, 4, 8, 10]
            assert sorted((k, a) for ks, accs in state.items() for k, a in zip(ks.tolist(), accs.tolist())) == \
                sorted([(zero_key, 8), (1, 10)])
            assert len(state) == 2
        finally:
            state.release()
            share.release_all()


def test_a_partition_that_cannot_fit_alone_names_the_memory_key(tmp_path):
    with managed_memory(tmp_path, 1 << 20, PAGE) as (mm, io):
        share = ManagedShare(mm, "op", 12 * KiB)
        state = StreamingFixedState(share, io, "count", key_dtype="S16", partitions=1)
        try:
            with pytest.raises(OutOfMemoryError, match="memory.managed.size"):
                state.update(np.array([b"k%d" % i for i in range(2000)], "S16"))
        finally:
            state.release()
            share.release_all()


# ------------------------------------------------------------------ jobs
def _streaming_job(backend: str, records_fn, n: int, agg: str, key_fn):
    def figures(batch):
        return [(len(batch), sum(v for _, v in batch), max(v for _, v in batch))]

    env = StreamEnvironment(workers=2, mode="streaming",
                            config={"state.backend": backend, "memory.managed.size": "1mb"})
    keyed = env.from_generator(records_fn, count=n).key_by(key_fn)
    stream = keyed.count() if agg == "count" else keyed.sum(1)
    out = stream.map_batches(figures).collect()
    result = env.execute(f"streaming-{agg}-{backend}")
    chain = next(m for name, m in result.metrics["operators"].items() if name.startswith(agg))
    parts = out.values()
    return (sum(p[0] for p in parts), sum(p[1] for p in parts), max(p[2] for p in parts)), chain


@pytest.mark.parametrize("agg", ["count", "sum"])
def test_streaming_count_and_sum_on_the_managed_backend_equal_the_heap_backend_with_evictions(agg):
    n, k = 120_000, 60_000
    if agg == "count":
        def records(i):
            return f"key-{(i * 7919) % k:012d}"

        def key_fn(w):
            return w
    else:
        def records(i):
            return (f"key-{(i * 7919) % k:012d}", i % 7)

        key_fn = _first
    heap, _ = _streaming_job("heap", records, n, agg, key_fn)
    managed, chain = _streaming_job("managed", records, n, agg, key_fn)
    assert managed == heap
    assert chain["state_entries"] == k
    assert chain["state_bytes_on_disk"] > 0 and chain["state_partition_evictions"] > 0


def _first(r):
    return r[0]


def test_a_batch_that_does_not_fit_hands_the_state_over_with_the_same_results():
    n, k = 60_000, 30_000

    def records(i):  # str keys, then a float value: the fixed-width state hands over to the backend
        return (f"k{(i * 7919) % k}", 1.5 if i >= n - 2_000 else 1)

    heap, _ = _streaming_job("heap", records, n, "sum", _first)
    managed, chain = _streaming_job("managed", records, n, "sum", _first)
    assert managed == heap
    assert chain["state_entries"] == k
    assert "state_partition_loads" not in chain  # the backend's metrics: the state was handed over


def test_the_operator_emits_what_the_heap_path_emits_including_timestamps(tmp_path):
    from operators import keyed
    from runtime.execution.task import ManagedMemory, OperatorContext, TimestampedBatch

    with managed_memory(tmp_path, 1 << 20, PAGE) as (mm, io):
        for agg_fn, key_fn, batches in [
            (keyed.min, _first, [[("a", 3), ("b", 1), ("a", 2)], [("a", 5), ("b", 0)]]),
            (keyed.max, None, [[1.5, 2.5, 1.5], [0.5, 2.5]]),
            (keyed.max, _first, [[(1, 2.0), (2, 1.0)], [(1, -0.0), (1, 3.0)]]),  # -0.0: hands over
        ]:
            outs = []
            for backend in ("heap", "managed"):
                managed = ManagedMemory(mm, f"op-{backend}", 64 * KiB, lambda: io)
                ctx = OperatorContext(mode="streaming", state_backend=backend, managed=managed, operator_name="max",
                                      max_parallelism=16)
                op = keyed.KeyedAggregate(key_fn, agg_fn(1) if key_fn is _first else agg_fn(), mode="streaming")
                op.open(ctx)
                out: list = []
                for i, b in enumerate(batches):
                    op.process_batch(TimestampedBatch(b, [float(i)] * len(b)), out.append)
                op.finish(out.append)
                op.close()
                # the same records and timestamps, in order (managed folds mini-batches: other batch boundaries)
                outs.append(([r for b in out for r in b], [t for b in out for t in b.timestamps]))
            assert outs[0] == outs[1]
            assert [type(v) for _, v in outs[1][0]] == [type(v) for _, v in outs[0][0]]


def test_managed_streaming_updates_wait_for_a_mini_batch_at_most_its_latency_and_never_pass_a_watermark(tmp_path):
    from operators import keyed
    from runtime.execution.task import ManagedMemory, OperatorContext, TimestampedBatch

    now = [100.0]
    with managed_memory(tmp_path, 1 << 20, PAGE) as (mm, io):
        ctx = OperatorContext(mode="streaming", state_backend="managed", operator_name="count", clock=lambda: now[0],
                              managed=ManagedMemory(mm, "count[0]", 64 * KiB, lambda: io))
        op = keyed.KeyedAggregate(None, keyed.count(), mode="streaming")
        op.open(ctx)
        out: list = []
        op.process_batch(["a", "b", "a"], out.extend)
        assert out == [] and op.next_timer() == 100.0 + keyed.MINI_BATCH_LATENCY
        op.on_processing_time(100.01, out.extend)
        assert out == []
        op.on_processing_time(100.0 + keyed.MINI_BATCH_LATENCY, out.extend)
        assert out == [("a", 1), ("b", 1), ("a", 2)] and op.next_timer() is None
        op.process_batch(TimestampedBatch(["b"], [7.0]), out.extend)
        assert op.process_watermark(8.0, out.extend) == 8.0
        assert out[-1] == ("b", 2)
        op.process_batch(["c"] * (keyed.MINI_BATCH_RECORDS - 1), out.extend)
        assert out[-1] == ("b", 2)
        op.process_batch(["c"], out.extend)  # a full mini-batch folds at once
        assert out[-1] == ("c", keyed.MINI_BATCH_RECORDS)
        op.finish(out.extend)
        op.close()


@pytest.mark.parametrize(("first", "second", "expected_tail"), [
    (["a", "b", "a"], [1, "a"], [(1, 1), ("a", 3)]),  # mixed key types: the held str keys go first
    ([7, 8, 7], ["x", 7], [("x", 1), (7, 3)]),  # int keys held, then a str key
    (["a", "b", "a"], ["a" * 40, "b"], [("a" * 40, 1), ("b", 2)]),  # a key wider than the first batch's
])
def test_held_input_is_folded_before_a_batch_that_does_not_fit_hands_the_state_over(tmp_path, first, second,
                                                                                     expected_tail):
    from operators import keyed
    from runtime.execution.task import ManagedMemory, OperatorContext

    with managed_memory(tmp_path, 1 << 20, PAGE) as (mm, io):
        ctx = OperatorContext(mode="streaming", state_backend="managed", operator_name="count",
                              managed=ManagedMemory(mm, "count[0]", 64 * KiB, lambda: io), max_parallelism=16)
        op = keyed.KeyedAggregate(None, keyed.count(), mode="streaming")
        op.open(ctx)
        out: list = []
        op.process_batch(first, out.extend)
        assert out == []  # held for the mini-batch
        op.process_batch(second, out.extend)
        op.finish(out.extend)
        op.close()
    model: dict = {}
    expected = []
    for k in first:
        model[k] = model.get(k, 0) + 1
        expected.append((k, model[k]))
    assert out == expected + expected_tail


def test_a_worker_runs_a_job_with_the_configured_young_generation_threshold_and_restores_its_own():
    import gc

    def threshold(batch):
        return [gc.get_threshold()[0]] * len(batch)

    for configured in (None, 5000):
        config = {} if configured is None else {"python.gc.young-threshold": configured}
        env = StreamEnvironment(workers=1, config=config)
        out = env.from_collection(list(range(10))).map_batches(threshold).collect()
        env.execute("gc-threshold")
        assert set(out.values()) == {100_000 if configured is None else configured}


def test_a_managed_streaming_count_of_tuples_holds_no_records_for_the_collector():
    """A worker folding 400 k (str, int) tuples runs a few collections (2 each, measured), not hundreds (with
    Python's default threshold, 700: 227 and 281); the mini-batch holds keys and arrays, not the records."""
    n, k = 400_000, 1_000

    def records(i):
        return (f"key-{(i * 7919) % k:012d}", 1)

    env = StreamEnvironment(workers=2, mode="streaming",
                            config={"state.backend": "managed", "memory.managed.size": "4mb"})
    env.from_generator(records, count=n).key_by(_first).count().map_batches(lambda b: [len(b)]).collect()
    result = env.execute("streaming-count-gc")
    workers = result.metrics["workers"]
    assert sum(w["gc_collections"] for w in workers.values()) <= 10, workers
