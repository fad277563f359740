"""Sinks: CollectSink ships batches to the client, PrintSink prints like Flink, FileSink writes files."""

from __future__ import annotations

import numpy as np
import pytest

from operators.sinks import CollectSink, FileSink, PrintSink
from operators.stateless import Map
from runtime.errors import ShmflowError
from runtime.execution.task import OperatorContext, TimestampedBatch, run_chain


def test_collect_sink_ships_every_batch():
    shipped = []
    sink = CollectSink("result-1")
    sink.open(OperatorContext(send_to_client=lambda sink_id, batch: shipped.append((sink_id, list(batch)))))
    run_chain([Map(lambda x: x * 2), sink], [1, 2], None)
    run_chain([Map(lambda x: x * 2), sink], [], None)  # empty batches never reach a sink
    run_chain([Map(lambda x: x * 2), sink], TimestampedBatch([3], [1.0]), None)
    sink.finish(None)
    sink.close()
    assert shipped == [("result-1", [2, 4]), ("result-1", [6])]


def test_collect_sink_gathers_small_batches_until_full_lingering_or_finished():
    from operators.sinks import COLLECT_BATCH_RECORDS, COLLECT_LINGER
    shipped, now = [], [100.0]
    sink = CollectSink("r")
    sink.open(OperatorContext(send_to_client=lambda sink_id, batch: shipped.append(list(batch)),
                              clock=lambda: now[0]))
    assert sink.next_timer() is None
    sink.process_batch([1, 2], None)
    sink.process_batch([3], None)
    assert shipped == [] and sink.next_timer() == 100.0 + COLLECT_LINGER
    sink.on_processing_time(100.0 + COLLECT_LINGER / 2, None)
    assert shipped == []  # not yet lingered long enough
    sink.on_processing_time(100.0 + COLLECT_LINGER, None)
    assert shipped == [[1, 2, 3]] and sink.next_timer() is None
    sink.process_batch(list(range(COLLECT_BATCH_RECORDS)), None)  # full: ships at once
    assert len(shipped) == 2 and len(shipped[1]) == COLLECT_BATCH_RECORDS
    sink.process_batch([7], None)
    sink.process_batch({"k": np.arange(2)}, None)  # a columnar batch ships after what is pending
    assert shipped[2] == [7] and list(shipped[3]) == ["k"]
    sink.finish(None)
    assert len(shipped) == 4


def test_collect_sink_without_a_client_channel_is_an_error():
    with pytest.raises(ShmflowError, match=r"^CollectSink 'x' needs a runtime that ships results to the client; "
                                           r"got OperatorContext.send_to_client=None$"):
        CollectSink("x").open(OperatorContext())


def test_print_sink_parallelism_one(capsys):
    sink = PrintSink()
    sink.open(OperatorContext())
    run_chain([sink], ["a", ("b", 2), {"c": 3}], None)
    assert capsys.readouterr().out == "a\n('b', 2)\n{'c': 3}\n"


def test_print_sink_prefixes_like_flink(capsys):
    sink = PrintSink()
    sink.open(OperatorContext(subtask_index=2, parallelism=4))
    run_chain([sink], [1, 2], None)
    named = PrintSink("words")
    named.open(OperatorContext(subtask_index=0, parallelism=2))
    run_chain([named], ["x"], None)
    single = PrintSink("words")
    single.open(OperatorContext())
    run_chain([single], ["y"], None)
    assert capsys.readouterr().out == "3> 1\n3> 2\nwords:1> x\nwords> y\n"


def test_print_sink_columnar(capsys):
    sink = PrintSink()
    sink.open(OperatorContext())
    run_chain([sink], {"k": np.array([1, 2])}, None)
    assert capsys.readouterr().out == "{'k': 1}\n{'k': 2}\n"


def test_file_sink_parallelism_one_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    sink = FileSink(path)
    sink.open(OperatorContext())
    run_chain([sink], ["to", "be"], None)
    run_chain([sink], [("or", 1)], None)
    sink.finish(None)
    sink.close()
    assert path.read_text() == "to\nbe\n('or', 1)\n"


def test_file_sink_parallel_writes_part_files(tmp_path):
    path = tmp_path / "out"
    for i in range(3):
        sink = FileSink(path)
        sink.open(OperatorContext(subtask_index=i, parallelism=3))
        run_chain([sink], [f"record-{i}", i], None)
        sink.close()
    assert sorted(p.name for p in path.iterdir()) == ["part-0", "part-1", "part-2"]
    assert (path / "part-1").read_text() == "record-1\n1\n"


def test_file_sink_parallel_onto_an_existing_file_is_an_error(tmp_path):
    path = tmp_path / "taken"
    path.write_text("x")
    with pytest.raises(FileExistsError, match=r"^FileSink with parallelism 2 writes a directory of part files, "):
        FileSink(path).open(OperatorContext(parallelism=2))


def test_file_sink_close_is_idempotent(tmp_path):
    sink = FileSink(tmp_path / "o.txt")
    sink.close()  # close is always called, also when open failed
    sink.open(OperatorContext())
    sink.close()
    sink.close()
    assert (tmp_path / "o.txt").read_text() == ""
