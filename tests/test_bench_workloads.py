"""The bench workloads generate the reference's exact data, their checks reject wrong results, every baseline runs.

The comparisons import ``workloads_reference.py`` from ``$SHMFLOW_TEST_WORKLOADS_REFERENCE`` or
``<repo>/../shared/bench`` when it is there and are skipped when it is not.
Baselines run once at tiny volumes; nothing here looks at timings.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib.util
import json
import operator
import os
from pathlib import Path

import numpy as np
import pytest

from runtime.bench import baselines as bl
from runtime.bench import workloads as wl

KiB, MiB = 1024, 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
REFERENCE_CANDIDATES = [Path(p) for p in [os.environ.get("SHMFLOW_TEST_WORKLOADS_REFERENCE")] if p] + [
    REPO.parent / "shared" / "bench" / "workloads_reference.py"]


def _load_reference():
    for path in REFERENCE_CANDIDATES:
        if path.is_file():
            spec = importlib.util.spec_from_file_location("shmflow_workloads_reference", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return None


_REFERENCE = _load_reference()


@pytest.fixture
def ref():
    if _REFERENCE is None:
        pytest.skip("workloads_reference.py is not available next to this checkout")
    return _REFERENCE


@pytest.fixture(scope="module")
def pool():
    return wl.w1_pool()


# ------------------------------------------------------------------------------------ identical to the reference
def test_w1_pool_is_the_reference_pool(ref, pool):
    assert pool.dtype == np.uint64 and pool.nbytes == wl.W1_POOL_BYTES
    assert np.array_equal(pool, ref.w1_pool())


@pytest.mark.parametrize("buf_bytes", [32 * KiB, MiB])
@pytest.mark.parametrize("nbufs", [0, 1, 7, 64, 2048, 2049, 4096, 131_072])
def test_w1_checksum_is_the_reference_checksum(ref, pool, buf_bytes, nbufs):
    assert wl.w1_expected_checksum(pool, buf_bytes, nbufs) == ref.w1_expected_checksum(pool, buf_bytes, nbufs)


def test_w1_slices_and_touch_are_the_references(ref, pool):
    for i in (0, 1, 2047, 2048, 5000):
        mine = wl.w1_slice(pool, i, 32 * KiB)
        assert np.shares_memory(mine, pool)
        assert np.array_equal(mine, ref.w1_slice(pool, i, 32 * KiB))
        assert wl.w1_touch(mine) == ref.w1_touch(mine)


def test_w2_columns_and_rows_are_the_references(ref):
    keys, values = wl.w2_columns(10_000)
    ref_keys, ref_values = ref.w2_columns(10_000)
    assert keys.dtype == np.int64 and values.dtype == np.float64
    assert np.array_equal(keys, ref_keys) and np.array_equal(values, ref_values)
    assert wl.w2_rows(10_000) == ref.w2_rows(10_000)
    assert np.array_equal(wl.w2_expected(10_000), ref.w2_reference(10_000))


@pytest.mark.parametrize("lines", [1, 3, 2_000])
def test_w3_text_is_the_reference_text(ref, lines):
    assert wl.w3_generate(lines) == ref.w3_generate(lines)


def test_w3_line_ranges_are_the_references(ref):
    text = wl.w3_generate(500)
    for parts in (1, 2, 3):
        assert wl.w3_line_ranges(text, parts) == ref.w3_line_ranges(text, parts)


def test_w4_generators_are_the_references(ref):
    for start, stop, k in ((0, 70_000, wl.W4_K), (65_536, 131_072, 10_000), (3, 8, 11), (5, 5, 7)):
        assert np.array_equal(wl.w4_key_index(start, stop, k), ref.w4_key_index(start, stop, k))
        mine, theirs = wl.w4_columns(start, stop, k), ref.w4_columns(start, stop, k)
        assert set(mine) == set(theirs) == {"key", "value"}
        for col in ("key", "value"):
            assert mine[col].dtype == theirs[col].dtype == np.int64 and np.array_equal(mine[col], theirs[col])
        assert wl.w4_rows(start, stop, k) == ref.w4_rows(start, stop, k)
    assert wl.w4_key_str(42) == ref.w4_key_str(42)
    for n in (0, 1, 65_536, 200_001):
        assert wl.w4_chunks(n) == ref.w4_chunks(n)
    assert wl.w4_chunks() == ref.w4_chunks()


@pytest.mark.parametrize("n, k", [(10_000_000, 5_000_000), (1_000_000, 500_000), (1_000_000, 10_000),
                                  (100_000, 50_000), (100, 1_000), (50_000, 20_000), (12_345, 7919 * 3), (0, 5)])
def test_w4_expected_is_the_references(ref, n, k):
    assert wl.w4_expected(n, k) == ref.w4_expected(n, k)


def test_w4_checksums_and_dict_baseline_are_the_references(ref):
    n, k = 30_000, 12_000
    rows = [row for a, b in wl.w4_chunks(n) for row in wl.w4_rows(a, b, k)]
    sums: dict[str, int] = {}
    for key, value in rows:
        sums[key] = sums.get(key, 0) + value
    assert wl.w4_checksum(sums.items()) == ref.w4_checksum(sums.items()) == ref.w4_expected(n, k)
    assert wl.w4_checksum_rows(list(sums.items())) == ref.w4_checksum(sums.items())
    int_pairs = [(int(key[4:]), value) for key, value in sums.items()]
    assert wl.w4_checksum(int_pairs) == ref.w4_checksum(int_pairs)
    mine, theirs = wl.w4_dict_baseline(n, k), ref.w4_dict_baseline(n, k)
    assert mine["ok"] is theirs["ok"] is True
    assert {key: mine[key] for key in ("peer", "variant", "n", "k")} == \
        {key: theirs[key] for key in ("peer", "variant", "n", "k")}


# ------------------------------------------------------------------------------------ self-consistency, no reference
def test_w4_expected_counts_every_key():
    for n, k in ((100_000, 50_000), (1_000, 10_000), (25_000, 10_000), (5_000, 7919 * 2)):
        per = np.bincount(wl.w4_key_index(0, n, k), minlength=k)
        present = np.flatnonzero(per)
        weighted = int((present.astype(np.uint64) * np.uint64(3) + per[present].astype(np.uint64)).sum(dtype=np.uint64))
        assert wl.w4_expected(n, k) == {"groups": present.size, "total": n, "weighted": weighted}
    assert wl.w4_expected() == {"groups": 5_000_000, "total": 10_000_000, "weighted": 37_500_002_500_000}


def test_w4_columnar_checksums_and_their_sum_match_the_row_checksums():
    keys = np.array([0, 5, 2**62, 7], dtype=np.int64)
    sums = np.array([2, 1, 3, 2**40], dtype=np.int64)
    pairs = list(zip(keys.tolist(), sums.tolist()))
    assert wl.w4_checksum_columns(keys, sums) == wl.w4_checksum(pairs)  # weighted wraps mod 2**64
    halves = [wl.w4_checksum(pairs[:2]), wl.w4_checksum_columns(keys[2:], sums[2:])]
    assert wl.w4_add_checksums(halves) == wl.w4_checksum(pairs)
    assert wl.w4_checksum([("key-000000000005", 1)]) == {"groups": 1, "total": 1, "weighted": 16}


def test_w4_vectorised_row_checksums_equal_the_loop_and_fall_back_on_other_keys():
    cases = [[("key-000000000005", 1), ("key-999999999999", 2**40)], [], [(3, 1), (4, 2)],
             [("key-00000000005", 1)], [("key-0000000000x5", 1), ("kex-000000000005", 1)][1:],
             [("key-000000000005", 2**70)], [("clé-000000000005", 1)],
             [("key-000000000005", 1), ("key-0000000000051", 1), ("key-000000000006", 1)]]
    for pairs in cases:
        assert wl.w4_checksum_rows(pairs) == wl.w4_checksum(pairs), pairs


def test_w4_source_shares_cover_the_records_once_in_chunks():
    from runtime.bench.shmflow_runs import W4Source

    n, k = 300_000, 70_000
    for form in ("rows", "columns"):
        seen: list[np.ndarray] = []
        for part in W4Source(n, k, form).split(3):
            first = True
            while (batch := part.poll_batch(4096 if first else 50_000)) is not None:
                size = len(batch["key"]) if form == "columns" else len(batch)
                assert size <= (4096 if first else 50_000)
                first = False
                keys = batch["key"] if form == "columns" else np.array([int(key[4:]) for key, _ in batch])
                seen.append(keys)
            assert part._pending is None  # nothing kept after the end
        assert np.array_equal(np.concatenate(seen), wl.w4_key_index(0, n, k))


@pytest.mark.parametrize("buf_bytes", [32 * KiB, MiB])
def test_w1_checksum_equals_touching_every_buffer(pool, buf_bytes):
    nbufs = wl.W1_POOL_BYTES // buf_bytes + 3  # wraps around the pool
    acc = 0
    for i in range(nbufs):
        acc = (acc + wl.w1_touch(wl.w1_slice(pool, i, buf_bytes).tobytes())) & wl.MASK64
    assert acc == wl.w1_expected_checksum(pool, buf_bytes, nbufs)


@pytest.mark.parametrize("bad", [0, 12, 3 * KiB, 48 * KiB])
def test_w1_rejects_buffer_sizes_that_do_not_tile_the_pool(bad):
    with pytest.raises(ValueError, match="multiple of 8"):
        wl.w1_nbufs(bad)


def test_w2_check_accepts_the_right_sums_and_rejects_wrong_ones():
    n = 10_000
    keys, values = wl.w2_columns(n)
    rows = wl.w2_rows(n)
    acc = [0.0] * wl.W2_KEYS
    for j in range(0, n, wl.W2_BATCH):
        wl.w2_row_consume(acc, rows[j:j + wl.W2_BATCH])
    columnar = np.zeros(wl.W2_KEYS)
    wl.w2_columnar_consume(columnar, keys, values)
    assert wl.w2_check(acc, n, n)[0]
    assert wl.w2_check(columnar, n, n)[0]
    assert wl.w2_check({int(k): v for k, v in enumerate(acc) if v}, n, n)[0]
    assert not wl.w2_check(acc, n, n - 1)[0]  # a record missing from the count
    acc[int(keys[0])] += 1e-6
    ok, err = wl.w2_check(acc, n, n)
    assert not ok and err == pytest.approx(1e-6, rel=1e-3)
    assert not wl.w2_check(acc[:-1], n, n)[0]


def test_w3_corpus_shape():
    text = wl.w3_generate(2_000)
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == 2_001
    for line in lines[:-1]:
        words = line.split(" ")
        assert 5 <= len(words) <= 15 and all(w.isalpha() and w.isascii() for w in words)
        assert words[0][0].isupper()
    assert wl.w3_generate(0) == "\n"


def test_w3_line_ranges_cover_the_text_on_line_boundaries():
    text = wl.w3_generate(300)
    for parts in (1, 2, 5):
        ranges = wl.w3_line_ranges(text, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(text[end - 1] == "\n" for _, end in ranges if end)
    assert wl.w3_line_ranges("a b\n", 3) == [(0, 4), (4, 4), (4, 4)]


def test_w3_merge_and_check():
    text = wl.w3_generate(200)
    ref = wl.w3_reference(text)
    halves = [{w: c for w, c in ref.items() if wl.w3_owner(w) == i} for i in range(2)]
    merged, disjoint = wl.w3_merge(halves)
    assert disjoint and wl.w3_check(merged, ref)
    merged, disjoint = wl.w3_merge([ref, {next(iter(ref)): 1}])
    assert not disjoint and not wl.w3_check(merged, ref)
    assert not wl.w3_check({w: c for w, c in list(ref.items())[1:]}, ref)
    assert wl.w3_head_lines(text, 2) == "".join(text.splitlines(keepends=True)[:2])
    assert wl.w3_head_lines(text, 10_000) == text


def test_w3_corpus_path_generates_and_verifies_the_full_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path))
    path = wl.w3_corpus_path()
    assert path.parent == tmp_path and path.stat().st_size == wl.W3_BYTES
    assert wl.sha256_file(path) == wl.W3_SHA256
    assert hashlib.sha256(path.read_bytes()).hexdigest() == wl.W3_SHA256
    assert wl.w3_corpus_path() == path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_records_carry_rates_and_units():
    r = wl.w1_record("p", "v", 32 * KiB, 1000, 0.5, True, params={"window": 64})
    assert r["rate"] == pytest.approx(32 * KiB * 1000 / 0.5 / 1e9, abs=1e-4) and r["unit"] == "GB/s"
    assert r["params"] == {"buf_bytes": 32 * KiB, "nbufs": 1000, "total_bytes": 32 * KiB * 1000, "window": 64}
    assert r["buffers_per_s"] == 2000.0
    r = wl.w2_record("p", "v", 1000, 2.0, False, 0.5)
    assert (r["rate"], r["unit"], r["ok"], r["max_abs_err"]) == (500.0, "records/s", False, 0.5)
    r = wl.w3_record("p", "v", 300, 3.0, True)
    assert (r["rate"], r["unit"], r["params"]) == (100.0, "words/s", {"words": 300})
    json.dumps(r)


# ------------------------------------------------------------------------------------ every baseline runs, tiny
def _assert_ok(result: dict) -> None:
    assert result["ok"], result.get("error", result)
    assert result["seconds"] > 0 and result["rate"] > 0
    for key in ("workload", "peer", "variant", "params", "unit"):
        assert result[key]
    json.dumps(result)


@pytest.mark.parametrize("transport, buf_bytes", [(bl.w1_mp_queue, 32 * KiB), (bl.w1_zmq, MiB),
                                                   (functools.partial(bl.w1_zmq, transport="tcp"), 32 * KiB),
                                                   (bl.w1_shm_ring, 32 * KiB), (bl.w1_shm_ring, MiB),
                                                   (bl.w1_inproc, 32 * KiB)])
def test_w1_baselines(transport, buf_bytes):
    # 16 MiB: more buffers than the ring has slots (256 x 32 KiB, 8 x 1 MiB), so credits cycle.
    result = transport(buf_bytes, quick=True, total_bytes=16 * MiB)
    _assert_ok(result)
    assert result["params"]["nbufs"] == 16 * MiB // buf_bytes


@pytest.mark.parametrize("op, array_bytes", [("copy", 32 * KiB), ("sum", MiB)])
def test_w1_memory_ceilings(op, array_bytes):
    result = bl.w1_memory_bandwidth(op, array_bytes, total_bytes=4 * MiB)
    _assert_ok(result)
    assert result["params"]["reps"] == 4 * MiB // array_bytes


@pytest.mark.parametrize("baseline, n", [(bl.w2_mp_queue_rows, 20_500), (bl.w2_mp_queue_per_record, 3_000),
                                         (bl.w2_zmq_msgpack, 20_500), (bl.w2_zmq_columns, 20_500)])
def test_w2_baselines(baseline, n):
    result = baseline(quick=True, n=n)
    _assert_ok(result)
    assert result["params"]["n"] == n and result["max_abs_err"] < 1e-9


@pytest.mark.parametrize("baseline", [bl.w4_dict, bl.w4_numpy, functools.partial(bl.w4_duckdb, "int"),
                                      functools.partial(bl.w4_duckdb, "str")])
def test_w4_baselines(baseline):
    result = baseline(n=40_000, k=15_000)
    if result.get("skipped"):
        assert "duckdb" in result["skipped"] and result["ok"] is True and result["rate"] is None
        pytest.skip(result["skipped"])
    _assert_ok(result)
    assert result["params"]["n"] == 40_000 and result["memory"]["peak_rss_bytes"] > 0


def test_w4_duckdb_is_skipped_not_failed_without_duckdb(monkeypatch):
    monkeypatch.setattr(bl, "duckdb_version", lambda: None)
    result = bl.w4_duckdb("int", n=1_000, k=100)
    assert result["ok"] is True and result["skipped"] and result["rate"] is None and "error" not in result


@pytest.mark.parametrize("baseline", [bl.w3_mp_queue, bl.w3_counter])
def test_w3_baselines(baseline):
    result = baseline(lines=3_000)
    _assert_ok(result)
    assert result["params"]["words"] == sum(wl.w3_reference(wl.w3_generate(3_000)).values())


def test_a_failing_child_gives_a_failed_run_not_an_exception():
    with pytest.raises(bl._ChildFailed, match="ZeroDivisionError"):
        bl._run_children([("boom", operator.truediv, (1, 0))])


def test_registry_and_command_line(capsys):
    names = [name for name, _ in bl.baselines()]
    assert len(names) == len(set(names)) == 24
    assert bl.main(["--quick", "--only", "w1_sum_32KiB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["name"] == "w1_sum_32KiB" and result["ok"] and result["env"]["numpy"] == np.__version__


def test_collections_counter_is_the_w3_reference():
    text = wl.w3_generate(50)
    assert wl.w3_reference(text) == collections.Counter(text.lower().split())
