"""Managed hash tables and HashAggregator against plain Python (dict, Counter), with forced spills.

Real SharedRegion / BuddyAllocator / MemoryManager / IOManager. Every test checks that no page stays
allocated and no spill file stays on disk.
"""

from __future__ import annotations

import errno
import os
import re
from collections import Counter

import msgpack
import numpy as np
import pytest
from helpers import managed_memory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import InvalidSizeError, OutOfMemoryError, SpillError
from runtime.managed import FixedHashTable, HashAggregator, ManagedShare, SerializedHashTable, mix64, spilling, unmix64

KiB = 1024
MiB = 1024 * KiB
PAGE = 4 * KiB
SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def probe_loop(request, monkeypatch):
    """Every test runs with the compiled probe loop of the fixed-width table and with its numpy version."""
    from runtime.managed import hash_table

    if request.param == "numpy":
        monkeypatch.setattr(hash_table, "_kernels", None)
    return request.param


def test_the_compiled_probe_loop_is_built():
    """setup.py builds it where a C compiler is at hand, as in CI: a build that failed would only cost speed."""
    from runtime.managed import _kernels  # ImportError when it was not built

    assert callable(_kernels.upsert)


def managed(tmp_path, size: int = 16 * MiB):
    """A region, a MemoryManager with 4 KiB pages and an IOManager; checks for leaks on the way out."""
    return managed_memory(tmp_path, size, PAGE)


def reference(keys, values, kinds):
    out: dict = {}
    for k, v in zip(keys, values):
        cur = out.get(k)
        new = {"count": 1, "sum": v, "min": v, "max": v}
        if cur is None:
            out[k] = new
        else:
            out[k] = {"count": cur["count"] + 1, "sum": cur["sum"] + v, "min": min(cur["min"], v),
                      "max": max(cur["max"], v)}
    return {k: tuple(d[kind] for kind in kinds) for k, d in out.items()}


def collect_columns(batches, kinds) -> dict:
    got: dict = {}
    for cols in batches:
        for row in zip(cols["key"].tolist(), *(cols[k].tolist() for k in kinds)):
            assert row[0] not in got, f"key {row[0]!r} came out twice"
            got[row[0]] = tuple(row[1:])
    return got


def collect_pairs(batches) -> dict:
    got: dict = {}
    for batch in batches:
        for key, value in batch:
            assert key not in got, f"key {key!r} came out twice"
            got[key] = value
    return got


KINDS = ("count", "sum", "min", "max")
ints = st.integers(-(2 ** 40), 2 ** 40)


# ------------------------------------------------------------- hashing
def test_mix64_is_a_bijection_with_its_inverse():
    x = np.random.default_rng(1).integers(-2 ** 63, 2 ** 63 - 1, 10_000, dtype=np.int64).view(np.uint64)
    assert (unmix64(mix64(x)) == x).all()
    assert len(np.unique(mix64(np.arange(10_000, dtype=np.uint64)))) == 10_000


# ------------------------------------------------------- fixed-width table
@SETTINGS
@given(keys=st.lists(st.integers(-50, 50), max_size=400), data=st.data(),
       key_dtype=st.sampled_from(["int64", "float64"]), value_dtype=st.sampled_from(["int64", "float64"]))
def test_fixed_table_equals_a_dict(tmp_path_factory, keys, data, key_dtype, value_dtype):
    values = data.draw(st.lists(st.integers(-1000, 1000), min_size=len(keys), max_size=len(keys)))
    aggs = ["count", ("sum", value_dtype), ("min", value_dtype), ("max", value_dtype)]
    with managed(tmp_path_factory.mktemp("io")) as (mm, _):
        table = FixedHashTable(ManagedShare(mm, "fixed", 1 * MiB), aggs, key_dtype=key_dtype)
        for i in range(0, len(keys), 97):
            assert table.insert_batch(np.array(keys[i:i + 97], key_dtype), np.array(values[i:i + 97])) is None
        assert len(table) == len(set(keys))
        got = collect_columns(table.drain(batch_rows=64), KINDS)
    assert got == reference(keys, values, KINDS)


def test_fixed_table_keeps_the_key_that_hashes_to_zero_and_float_zero_and_nan(tmp_path):
    zero_key = int(unmix64(np.zeros(1, np.uint64)).view(np.int64)[0])
    with managed(tmp_path) as (mm, _):
        share = ManagedShare(mm, "fixed", 256 * KiB)
        table = FixedHashTable(share, ["count"])
        table.insert_batch(np.array([zero_key, 1, zero_key, 2], np.int64))
        assert collect_columns(table.drain(), ["count"]) == {zero_key: (2,), 1: (1,), 2: (1,)}
        floats = FixedHashTable(share, ["count"], key_dtype="float64")
        floats.insert_batch(np.array([0.0, -0.0, np.nan, float("nan"), 1.5]))
        got = {("nan" if k != k else k): v for k, v in collect_columns(floats.drain(), ["count"]).items()}
    assert got == {0.0: (2,), "nan": (2,), 1.5: (1,)}


@SETTINGS
@given(keys=st.lists(st.integers(0, 10_000), min_size=1, max_size=3000))
def test_fixed_table_that_is_full_returns_the_rows_left_out(tmp_path_factory, keys):
    with managed(tmp_path_factory.mktemp("io")) as (mm, _):
        table = FixedHashTable(ManagedShare(mm, "tiny", PAGE), ["count"])  # at most one 4 KiB block
        left = table.insert_batch(np.array(keys, np.int64))
        got = Counter({k: v[0] for k, v in collect_columns(table.iterate(), ["count"]).items()})
        if left is not None:
            assert table.full and len(table) <= 0.7 * PAGE // 16
            cols = table.rows_to_columns(left)
            overlap = set(cols["key"].tolist()) & set(got)
            assert not overlap, "a key left out must not be in the table too"
            got.update(dict(zip(cols["key"].tolist(), cols["count"].tolist())))
        table.release()
    assert got == Counter(keys)


# ---------------------------------------------------- serialized table
text_keys = st.one_of(st.text(max_size=6), st.tuples(st.integers(-3, 3), st.text(max_size=3)),
                      st.binary(max_size=4))


@SETTINGS
@given(keys=st.lists(st.one_of(st.text(max_size=8), st.tuples(st.integers(-5, 5), st.text(max_size=3))),
                     max_size=400), data=st.data())
def test_serialized_table_equals_a_dict_for_numeric_aggregations(tmp_path_factory, keys, data):
    values = data.draw(st.lists(st.integers(-1000, 1000), min_size=len(keys), max_size=len(keys)))
    with managed(tmp_path_factory.mktemp("io")) as (mm, _):
        table = SerializedHashTable(ManagedShare(mm, "ser", 1 * MiB), list(KINDS))
        for i in range(0, len(keys), 53):
            assert table.insert_batch(keys[i:i + 53], values[i:i + 53]) is None
        got = collect_pairs(table.drain(batch_rows=50))
    assert got == reference(keys, values, KINDS)


@SETTINGS
@given(keys=st.lists(text_keys, max_size=300), data=st.data())
def test_serialized_table_reduce_round_trips_tuples(tmp_path_factory, keys, data):
    values = data.draw(st.lists(st.tuples(st.integers(0, 9), st.text(max_size=3)),
                                min_size=len(keys), max_size=len(keys)))

    def fn(a, b):  # associative and commutative: min by value, longer text on ties
        return min(a, b)

    with managed(tmp_path_factory.mktemp("io")) as (mm, _):
        table = SerializedHashTable(ManagedShare(mm, "red", 1 * MiB), None, reduce_fn=fn)
        for i in range(0, len(keys), 41):
            assert table.insert_batch(keys[i:i + 41], values[i:i + 41]) is None
        got = collect_pairs(table.drain())
    want: dict = {}
    for k, v in zip(keys, values):
        want[k] = v if k not in want else fn(want[k], v)
    assert got == want


@SETTINGS
@given(keys=st.lists(st.sampled_from(["a", "é", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "a" * 70_000, b"a", 1, 1.0,
                                      True, -0.0, 0.0, (1, "a"), None]), max_size=300),
       batch=st.integers(1, 100))
def test_serialized_keys_are_equal_exactly_when_their_msgpack_bytes_are(tmp_path_factory, keys, batch):
    # One msgpack call per batch for ASCII str keys, one per key otherwise: the same bytes, the same groups.
    packb = msgpack.Packer(use_bin_type=True).pack
    with managed(tmp_path_factory.mktemp("io")) as (mm, _):
        table = SerializedHashTable(ManagedShare(mm, "ser", 2 * MiB), ["count"])
        for i in range(0, len(keys), batch):
            assert table.insert_batch(keys[i:i + batch]) is None
        got = Counter()
        for k, n in (pair for b in table.drain() for pair in b):
            assert packb(k) not in got
            got[packb(k)] = n
    assert got == Counter(map(packb, keys))


def test_serialized_keys_compare_by_their_bytes_even_on_fingerprint_collisions(tmp_path, monkeypatch):
    import runtime.managed.serialized_table as ser

    monkeypatch.setattr(ser, "fingerprints", lambda buf, offs, lens: np.full(len(lens), 7, np.uint64))
    with managed(tmp_path) as (mm, _):
        table = SerializedHashTable(ManagedShare(mm, "collide", 256 * KiB), ["count"])
        words = ["a", "b", "a", "c", "b", "a"] * 20
        for i in range(0, len(words), 5):
            table.insert_batch(words[i:i + 5])
        assert collect_pairs(table.drain()) == Counter(words)


def test_serialized_table_finds_every_key_after_rehashes_that_wrap_around(tmp_path, monkeypatch):
    import runtime.managed.serialized_table as ser

    # every fingerprint homes in the last four slots: each probe and each rehash runs past the end
    monkeypatch.setattr(ser, "fingerprints", lambda buf, offs, lens: ~(lens.astype(np.uint64) % np.uint64(4)))
    words = [f"w{i % 700}" for i in range(3000)]
    with managed(tmp_path) as (mm, _):
        table = SerializedHashTable(ManagedShare(mm, "wrap", 64 * KiB), ["count"])
        for i in range(0, len(words), 250):
            assert table.insert_batch(words[i:i + 250]) is None
        assert table.capacity > 64 and len(table) == 700
        assert collect_pairs(table.drain()) == Counter(words)


# --------------------------------------------------------- aggregator
@SETTINGS
@given(keys=st.lists(st.integers(0, 3000), max_size=2500), data=st.data(), pages=st.integers(4, 10),
       key_type=st.sampled_from(["int64", "float64"]))
def test_fixed_aggregator_at_tiny_budgets_equals_a_dict(tmp_path_factory, keys, data, pages, key_type):
    values = data.draw(st.lists(st.integers(-100, 100), min_size=len(keys), max_size=len(keys)))
    aggs = ["count", ("sum", "int64"), ("min", "int64"), ("max", "int64")]
    with managed(tmp_path_factory.mktemp("io")) as (mm, io):
        with HashAggregator(mm, "agg", pages * PAGE, io, aggs=aggs, key_type=key_type) as agg:
            for i in range(0, len(keys), 300):
                assert agg.add_batch(np.array(keys[i:i + 300], key_type), np.array(values[i:i + 300])) == []
            got = collect_columns(agg.results(), KINDS)
            stats = agg.statistics()
        assert stats.managed_peak_bytes <= pages * PAGE
    want = reference([float(k) if key_type == "float64" else k for k in keys], values, KINDS)
    assert got == want


byte_keys = st.binary(max_size=16).filter(lambda b: not b.endswith(b"\0"))


@SETTINGS
@given(keys=st.lists(st.one_of(byte_keys, st.sampled_from([b"k", b"key-000000000001", b"x" * 16])), max_size=2500),
       data=st.data(), pages=st.integers(4, 10), width=st.sampled_from(["S16", "S24"]))
def test_byte_key_aggregator_at_tiny_budgets_equals_a_dict(tmp_path_factory, keys, data, pages, width):
    values = data.draw(st.lists(st.integers(-100, 100), min_size=len(keys), max_size=len(keys)))
    aggs = ["count", ("sum", "int64"), ("min", "int64"), ("max", "int64")]
    with managed(tmp_path_factory.mktemp("io")) as (mm, io):
        with HashAggregator(mm, "agg", pages * PAGE, io, aggs=aggs, key_type=width) as agg:
            for i in range(0, len(keys), 300):
                chunk = np.array(keys[i:i + 300], "S16") if keys[i:i + 300] else np.array([], "S16")
                assert agg.add_batch(chunk, np.array(values[i:i + 300], np.int64)) == []
            got = collect_columns(agg.results(), KINDS)
        assert agg.statistics().managed_peak_bytes <= pages * PAGE
    assert got == reference(keys, values, KINDS)


def test_byte_keys_that_share_a_hash_stay_apart(tmp_path, monkeypatch):
    """Every key hashes alike: rows match on their key words, claims of one hash are made one at a time."""
    from runtime.managed import hash_table

    monkeypatch.setattr(hash_table, "hash_words", lambda words: np.full(len(words), 12345, np.uint64))
    keys = [b"k%d" % (i % 37) for i in range(500)]
    with managed(tmp_path) as (mm, io):
        table = FixedHashTable(ManagedShare(mm, "t", 1 * MiB), ["count", ("sum", "int64")], key_dtype="S8")
        for i in range(0, len(keys), 60):
            assert table.insert_batch(np.array(keys[i:i + 60], "S8"), np.arange(i, i + len(keys[i:i + 60]))) is None
        assert len(table) == 37
        got = collect_columns(table.drain(), ("count", "sum"))
    assert got == reference(keys, list(range(500)), ("count", "sum"))


def test_a_byte_key_wider_than_the_table_is_refused_by_name(tmp_path):
    with managed(tmp_path) as (mm, io):
        table = FixedHashTable(ManagedShare(mm, "t", 1 * MiB), ["count"], key_dtype="S8")
        with pytest.raises(ValueError, match="9 bytes do not fit a table of \\|S8 keys"):
            table.insert_batch(np.array([b"123456789"]))
        table.release()


@SETTINGS
@given(words=st.lists(st.text(alphabet="abcdefgh", max_size=5), max_size=2500), pages=st.integers(4, 10))
def test_serialized_aggregator_at_tiny_budgets_equals_a_counter(tmp_path_factory, words, pages):
    with (
        managed(tmp_path_factory.mktemp("io")) as (mm, io),
        HashAggregator(mm, "wc", pages * PAGE, io, key_type="object") as agg,
    ):
        for i in range(0, len(words), 250):
            agg.add_batch(words[i:i + 250])
        got = collect_pairs(agg.results())
    assert got == Counter(words)


@SETTINGS
@given(keys=st.lists(st.tuples(st.integers(0, 300), st.sampled_from("xyz")), max_size=1500),
       pages=st.integers(5, 9))
def test_reduce_aggregator_at_tiny_budgets_equals_a_dict(tmp_path_factory, keys, pages):
    values = [(i % 13, (k[0],)) for i, k in enumerate(keys)]

    def fn(a, b):
        return (a[0] + b[0], tuple(sorted(set(a[1]) | set(b[1]))))

    with (
        managed(tmp_path_factory.mktemp("io")) as (mm, io),
        HashAggregator(mm, "red", pages * PAGE, io, key_type="object", reduce_fn=fn) as agg,
    ):
        for i in range(0, len(keys), 200):
            agg.add_batch(keys[i:i + 200], values[i:i + 200])
        got = collect_pairs(agg.results())
    want: dict = {}
    for k, v in zip(keys, values):
        want[k] = v if k not in want else fn(want[k], v)
    assert got == want


@SETTINGS
@given(keys=st.lists(st.integers(0, 2000), max_size=3000), key_type=st.sampled_from(["int64", "object"]))
def test_combiner_emits_partials_when_full_and_a_final_aggregator_merges_them(tmp_path_factory, keys, key_type):
    batch = (lambda ks: np.array(ks, np.int64)) if key_type == "int64" else (lambda ks: ks)
    with managed(tmp_path_factory.mktemp("io")) as (mm, io):
        partials = []
        with HashAggregator(mm, "combine", 4 * PAGE, None, key_type=key_type, mode="combine") as comb:
            for i in range(0, len(keys), 400):
                partials.extend(comb.add_batch(batch(keys[i:i + 400])))
            partials.extend(comb.results())
            assert comb.statistics().spill_files == 0
        with HashAggregator(mm, "final", 6 * PAGE, io, key_type=key_type) as final:
            for p in partials:
                final.add_partials(p)
            res = list(final.results())
        got = collect_columns(res, ["count"]) if key_type == "int64" else collect_pairs(res)
        if key_type == "int64":
            got = {k: v[0] for k, v in got.items()}
    assert got == Counter(keys)


def test_200k_distinct_strings_in_a_1_mib_share_spill_and_equal_a_counter(tmp_path):
    rng = np.random.default_rng(7)
    words = [f"key-{i}" for i in range(200_000)] + [f"key-{i}" for i in rng.integers(0, 200_000, 100_000)]
    with (
        managed(tmp_path, size=8 * MiB) as (mm, io),
        HashAggregator(mm, "wc", 1 * MiB, io, key_type="object") as agg,
    ):
        for i in range(0, len(words), 50_000):
            agg.add_batch(words[i:i + 50_000])
        got = collect_pairs(agg.results())
        stats = agg.statistics()
    assert stats.spill_files > 0 and stats.spilled_bytes > 0 and stats.spill_passes > 0
    assert stats.managed_peak_bytes <= 1 * MiB
    assert got == Counter(words)


@pytest.mark.parametrize(("key_type", "n", "pages"), [("int64", 60_000, 5), ("object", 12_000, 7)])
def test_a_forced_deep_spill_writes_one_file_per_depth_and_leaves_none(tmp_path, key_type, n, pages):
    rng = np.random.default_rng(13)
    ints = rng.integers(0, n // 2, n)
    keys = ints if key_type == "int64" else [f"k{k}" for k in ints.tolist()]
    with managed(tmp_path) as (mm, io):
        with HashAggregator(mm, "deep", pages * PAGE, io, key_type=key_type) as agg:
            for i in range(0, n, 5_000):
                agg.add_batch(keys[i:i + 5_000])
            res = list(agg.results())
            stats = agg.statistics()
        files_created = io.stats().files_created
    got = {k: v[0] for k, v in collect_columns(res, ["count"]).items()} if key_type == "int64" else collect_pairs(res)
    assert got == Counter(ints.tolist() if key_type == "int64" else keys)
    assert stats.max_level >= 3 and stats.spill_passes > 500  # hundreds of partitions went to disk and back
    assert files_created == stats.spill_files <= stats.max_level + 1


def test_a_depth_whose_file_is_large_starts_a_new_one_and_leaves_none(tmp_path, monkeypatch):
    monkeypatch.setattr(spilling, "SPILL_FILE_REUSE_BYTES", 1)  # every level that spilled deletes its file
    keys = np.random.default_rng(17).integers(0, 20_000, 40_000)
    with managed(tmp_path) as (mm, io), HashAggregator(mm, "deep", 5 * PAGE, io) as agg:
        agg.add_batch(keys)
        got = {k: v[0] for k, v in collect_columns(agg.results(), ["count"]).items()}
        stats = agg.statistics()
    assert got == Counter(keys.tolist())
    assert stats.max_level >= 2 and stats.spill_files > stats.max_level + 1


# --------------------------------------------------------------- errors
def test_share_allocate_pages_takes_all_or_none_and_names_the_key(tmp_path):
    with managed(tmp_path) as (mm, io):
        share = ManagedShare(mm, "s", 3 * PAGE)
        assert len(share.allocate_pages(2)) == 2 and share.used_bytes == 2 * PAGE
        with pytest.raises(OutOfMemoryError, match=r"^cannot allocate 2 pages \(8 KiB\) for 's': 4 KiB of its share "
                           r"of 12 KiB left; raise memory\.managed\.fraction$"):
            share.allocate_pages(2)
        assert share.used_bytes == 2 * PAGE and mm.used_bytes == 2 * PAGE
        share.release_all()


def test_a_share_too_small_names_the_minimum_and_the_config_key(tmp_path):
    with (
        managed(tmp_path) as (mm, io),
        pytest.raises(InvalidSizeError, match=r"^share of 'agg' must hold at least \d+ bytes for final "
                      r"hash aggregation \(int64 keys\); got 8192; raise memory\.managed\.fraction$"),
    ):
        HashAggregator(mm, "agg", 2 * PAGE, io)


def test_an_unwritable_spill_directory_is_a_spill_error_naming_the_key_and_the_path(tmp_path):
    with managed(tmp_path) as (mm, io):
        agg = HashAggregator(mm, "agg", 5 * PAGE, io)
        os.rmdir(io.directory)  # nothing spilled yet: the directory is empty
        with pytest.raises(SpillError) as info:
            agg.add_batch(np.arange(50_000))
        msg = str(info.value)
        assert "io.tmp-dirs" in msg and io.directory in msg
        assert re.match(r"^cannot create a spill file ", msg)
        agg.release()
        assert mm.used_bytes == 0
        os.mkdir(io.directory)


def test_a_full_disk_is_a_spill_error_and_release_leaves_no_file_and_no_page(tmp_path, monkeypatch):
    with managed(tmp_path) as (mm, io):
        agg = HashAggregator(mm, "agg", 5 * PAGE, io)

        def enospc(*args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "pwritev", enospc)
        with pytest.raises(SpillError, match=r"io\.tmp-dirs") as info:
            agg.add_batch(np.arange(50_000))
        assert info.value.errno == errno.ENOSPC and io.directory in str(info.value)
        monkeypatch.undo()
        agg.release()


def test_an_exception_while_reading_results_releases_everything(tmp_path):
    with managed(tmp_path) as (mm, io):
        agg = HashAggregator(mm, "agg", 5 * PAGE, io)
        agg.add_batch(np.arange(20_000))
        assert os.listdir(io.directory)
        results = agg.results()
        next(results)
        results.close()  # the consumer stops early
        assert mm.used_bytes == 0 and not os.listdir(io.directory)


@pytest.mark.parametrize("key_type", ["int64", "float64", "object"])
def test_seeded_input_at_a_five_page_share_spills_recursively_and_equals_a_dict(tmp_path, key_type):
    rng = np.random.default_rng(11)
    keys = rng.integers(0, 4_000, 10_000)
    values = rng.integers(-10**6, 10**6, 10_000)
    pages = 7 if key_type == "object" else 5
    with managed(tmp_path) as (mm, io):
        aggs = ["count", ("sum", "int64"), ("min", "int64"), ("max", "int64")]
        with HashAggregator(mm, "agg", pages * PAGE, io, aggs=aggs, key_type=key_type) as agg:
            for i in range(0, len(keys), 4096):
                ks = keys[i:i + 4096]
                agg.add_batch(ks.tolist() if key_type == "object" else ks.astype(key_type), values[i:i + 4096])
            res = list(agg.results())
            stats = agg.statistics()
    got = collect_pairs(res) if key_type == "object" else collect_columns(res, KINDS)
    assert stats.spill_files > 0 and stats.max_level >= 1
    want = reference(keys.tolist(), values.tolist(), KINDS)
    if key_type == "float64":
        want = {float(k): v for k, v in want.items()}
    assert got == want
