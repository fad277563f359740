"""Sources: split covers the input exactly once, rate limiting on a fake clock, text ranges at line boundaries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.sources import CollectionSource, GeneratorSource, TextFileSource
from runtime.execution.task import OperatorContext


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def drain(src, max_records=3):
    out = []
    while (batch := src.poll_batch(max_records)) is not None:
        assert batch != []  # bounded, unthrottled sources never return "nothing yet"
        assert len(batch) <= max_records
        out.extend(batch)
    return out


def drain_all(sources, max_records=3):
    outs = []
    for i, src in enumerate(sources):
        src.open(OperatorContext(subtask_index=i, parallelism=len(sources)))
        outs.append(drain(src, max_records))
        src.close()
    return outs


@settings(max_examples=50, deadline=None)
@given(items=st.lists(st.integers(), max_size=40), p=st.integers(1, 6), max_records=st.integers(1, 7))
def test_collection_split_gives_contiguous_chunks(items, p, max_records):
    parts = CollectionSource(items).split(p)
    assert len(parts) == p
    outs = drain_all(parts, max_records)
    assert [x for out in outs for x in out] == items
    assert max(map(len, outs)) - min(map(len, outs)) <= 1


def test_collection_unsplit_source_selects_its_share_at_open():
    outs = []
    for i in range(3):
        src = CollectionSource(range(10))
        src.open(OperatorContext(subtask_index=i, parallelism=3))
        outs.append(drain(src))
    assert outs == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


def test_collection_split_opened_as_the_wrong_subtask_is_an_error():
    part = CollectionSource([1, 2]).split(2)[1]
    with pytest.raises(ValueError, match=r"^CollectionSource split as part 1 of 2 was opened as subtask 0 of 2; "):
        part.open(OperatorContext(subtask_index=0, parallelism=2))


def test_collection_columnar():
    src = CollectionSource({"k": np.arange(5), "v": np.arange(5) * 0.5})
    a, b = src.split(2)
    a.open(OperatorContext(subtask_index=0, parallelism=2))
    batch = a.poll_batch(10)
    assert batch["k"].tolist() == [0, 1] and batch["v"].tolist() == [0.0, 0.5]
    assert a.poll_batch(10) is None
    assert b.poll_batch(2)["k"].tolist() == [2, 3]


@settings(max_examples=50, deadline=None)
@given(count=st.integers(0, 50), p=st.integers(1, 5), max_records=st.integers(1, 8))
def test_generator_split_covers_every_index_once(count, p, max_records):
    outs = drain_all(GeneratorSource(lambda i: i * 10, count=count).split(p), max_records)
    assert [out == [i * 10 for i in range(s, count, p)] for s, out in enumerate(outs)] == [True] * p
    assert sorted(x for out in outs for x in out) == [i * 10 for i in range(count)]


def test_generator_is_unbounded_without_count():
    src = GeneratorSource(str)
    assert not src.bounded and GeneratorSource(str, count=3).bounded
    src.open(OperatorContext())
    assert src.poll_batch(3) == ["0", "1", "2"]
    assert src.poll_batch(2) == ["3", "4"]


def test_generator_rate_limit_on_fake_clock():
    clock = FakeClock(1000.0)
    parts = GeneratorSource(lambda i: i, rate=10, count=15).split(2)  # 5 records/s per subtask
    for i, part in enumerate(parts):
        part.open(OperatorContext(subtask_index=i, parallelism=2, clock=clock))
    a, b = parts
    assert a.poll_batch(100) == []  # nothing due yet; never sleeps
    assert a.next_timer() == 1000.2
    clock.now = 1000.2
    assert a.poll_batch(100) == [0]
    clock.now = 1001.0
    assert a.poll_batch(100) == [2, 4, 6, 8]
    assert a.poll_batch(100) == []
    assert b.poll_batch(2) == [1, 3]  # max_records still bounds a batch
    assert b.poll_batch(100) == [5, 7, 9]
    clock.now = 1010.0
    assert a.poll_batch(100) == [10, 12, 14]
    assert a.poll_batch(100) is None and a.next_timer() is None
    assert b.poll_batch(100) == [11, 13]
    assert b.poll_batch(100) is None


def test_generator_argument_errors():
    with pytest.raises(ValueError, match=r"^GeneratorSource rate must be > 0 records/s or None; got 0$"):
        GeneratorSource(str, rate=0)
    with pytest.raises(ValueError, match=r"^GeneratorSource count must be an int >= 0 or None; got -1$"):
        GeneratorSource(str, count=-1)
    with pytest.raises(ValueError, match=r"^parallelism must be an int >= 1; got 0$"):
        GeneratorSource(str).split(0)


lines_st = st.lists(st.text(alphabet="ab é\r", max_size=12).map(lambda s: s.replace("\r", "")), max_size=30)


@settings(max_examples=60, deadline=None)
@given(lines=lines_st, p=st.integers(1, 5), max_records=st.integers(1, 6), trailing=st.booleans(),
       chunk=st.sampled_from([1, 3, 64, 1 << 20]))
def test_text_split_reads_every_line_once(tmp_path_factory, lines, p, max_records, trailing, chunk):
    path = tmp_path_factory.mktemp("text") / "in.txt"
    text = "\n".join(lines) + ("\n" if trailing and lines else "")
    path.write_bytes(text.encode())
    parts = TextFileSource(path).split(p)
    for part in parts:
        part.CHUNK_BYTES = chunk
    outs = drain_all(parts, max_records)
    expected = text.split("\n")
    if expected and expected[-1] == "":
        expected.pop()
    assert [line for out in outs for line in out] == expected


def test_text_ranges_match_the_workload_reference(tmp_path):
    """Range i ends after the first newline at or after size*(i+1)//p (WORKLOADS.md w3_line_ranges)."""
    text = "aaaa\nbb\ncccccc\nd\neeeeeee\n"
    path = tmp_path / "w.txt"
    path.write_text(text)
    parts = TextFileSource(path).split(3)
    n = len(text)
    bounds = [0]
    for i in range(1, 3):
        cut = text.find("\n", n * i // 3)
        bounds.append(n if cut < 0 else cut + 1)
    bounds.append(n)
    assert [part._range for part in parts] == list(zip(bounds, bounds[1:]))
    assert drain_all(parts, 10) == [["aaaa", "bb", "cccccc"], ["d"], ["eeeeeee"]]


def test_text_crlf_and_unsplit_share(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"one\r\ntwo\r\nthree")
    outs = []
    for i in range(2):
        src = TextFileSource(path)
        src.open(OperatorContext(subtask_index=i, parallelism=2))
        outs.append(drain(src, 10))
        src.close()
    assert outs == [["one", "two"], ["three"]]


def test_text_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=rf"^text file source: no such file '{missing}'$"):
        TextFileSource(missing).open(OperatorContext())
    with pytest.raises(FileNotFoundError, match=rf"^text file source: no such file '{missing}'$"):
        TextFileSource(missing).split(2)
