"""Snapshot blobs and the checkpoint area: the layout a state file and its copy in the region share, the ring
that keeps the latest checkpoint's blobs, and a restore that reads a blob in place only when it is intact."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.checkpoint import CheckpointMetadata, CheckpointStorage, write_state_file
from runtime.checkpoint.blob import blob_size, read_blob, write_blob
from runtime.errors import CheckpointError, StateSerializationError
from runtime.execution.checkpoint_area import ALIGN, CheckpointArea
from runtime.execution.checkpointing import CheckpointSetup, decode_states, encode_states
from runtime.state import codec


def blob_of(states: list) -> bytearray:
    header, buffers = encode_states(states, "t[0]")
    out = bytearray(blob_size(header, buffers))
    write_blob(memoryview(out), header, buffers)
    return out


class Lazy:
    """A lazy buffer as the streaming state gives one: it writes its bytes where the blob wants them."""

    def __init__(self, data: bytes) -> None:
        self.data, self.nbytes = data, len(data)

    def write_into(self, target: memoryview) -> None:
        target[:] = self.data


def test_out_of_band_buffers_come_back_as_aligned_views_of_the_blob():
    table = np.arange(10, dtype=np.uint64)
    blob = blob_of([("src", 7), {"rows": codec.Raw(table), "odd": codec.Raw(b"abc"), "lazy": codec.Raw(Lazy(b"xy"))}])
    source, state = decode_states(blob)
    assert source == ("src", 7)
    rows = state["rows"]
    assert isinstance(rows, memoryview) and rows.obj is not None
    assert np.frombuffer(rows, np.uint64).tolist() == list(range(10))
    assert bytes(state["odd"]) == b"abc" and bytes(state["lazy"]) == b"xy"
    base = np.frombuffer(blob, np.uint8).ctypes.data
    assert (np.frombuffer(rows, np.uint8).ctypes.data - base) % 8 == 0  # numpy views of it are aligned


@pytest.mark.parametrize("damage", ["truncated", "extended", "magic"])
def test_a_torn_blob_is_refused_naming_its_source(damage):
    blob = blob_of([codec.Raw(b"x" * 100)])
    if damage == "truncated":
        blob = blob[:-8]
    elif damage == "extended":
        blob += b"\0" * 8
    else:
        blob[0:8] = b"NOTABLOB"
    with pytest.raises(CheckpointError, match=r"^the copy of 1-0 (holds|is not)"):
        read_blob(memoryview(blob), source="the copy of 1-0")


def test_a_header_naming_a_buffer_that_is_not_there_is_refused():
    header, _ = codec.encode_parts([codec.Raw(b"x")])
    with pytest.raises(StateSerializationError, match="names out-of-band buffer 0; it has 0"):
        codec.decode_parts(header, [])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("alloc"), st.integers(1, 900)), st.just(("next", 0)),
                          st.just(("complete", 0))), max_size=60),
       st.sampled_from([256, 1000, 4096]))
def test_the_ring_never_hands_out_bytes_of_a_blob_it_keeps(steps, size):
    """Against a model: blobs live from allocation until a later checkpoint completes; no two overlap; a blob
    is refused only when the free bytes at the head and before the tail are each too few."""
    area = CheckpointArea(4096, size)
    live: list[tuple[int, int, int]] = []  # (checkpoint, start, end) relative to the area
    checkpoint = 1
    for op, n in steps:
        if op == "alloc":
            offset = area.allocate(checkpoint, n)
            if offset is None:
                assert live or -(-n // ALIGN) * ALIGN > size  # an empty area holds any blob that fits it
                continue
            start, end = offset - 4096, offset - 4096 + n
            assert start >= 0 and end <= size and start % ALIGN == 0
            assert all(end <= s or start >= e for _, s, e in live), (start, end, live)
            live.append((checkpoint, start, end))
        elif op == "next":
            checkpoint += 1
        else:
            area.release_before(checkpoint)
            live = [blob for blob in live if blob[0] >= checkpoint]
    assert area.used_bytes >= sum(e - s for _, s, e in live)


def test_reserved_blobs_of_a_restore_are_kept_until_a_checkpoint_completes():
    area = CheckpointArea(1 << 20, 4096)
    area.reserve([((1 << 20) + 1024, 500), ((1 << 20) + 64, 100), (5, 10)])  # the last lies outside: ignored
    first = area.allocate(1, 1000)
    assert first is not None and first - (1 << 20) >= 1024 + 500  # after the reserved range
    assert area.allocate(1, 3000) is None  # wrapping would reach the reserved range
    area.release_before(1)  # checkpoint 1 completed: the restore's blobs may go, checkpoint 1's stay
    assert area.allocate(2, 1000) is not None


def _checkpoint_with(tmp_path, states: list) -> tuple[CheckpointStorage, str, bytearray]:
    storage = CheckpointStorage(str(tmp_path), "job", retained=1)
    directory = storage.checkpoint_dir(1)
    blob = blob_of(states)
    handle = write_state_file(directory, "1-0", blob)
    storage.complete(CheckpointMetadata(checkpoint_id=1, job_id="job", job_name="job", timestamp=0.0,
                                        duration=0.0, subtasks={"1-0": handle}, graph_fingerprint={}))
    return storage, str(directory), blob


def test_a_restore_reads_the_blob_in_the_region_when_it_is_intact_and_the_file_otherwise(tmp_path):
    states = [{"count": 3}, codec.Raw(np.arange(4, dtype=np.uint64))]
    _, directory, blob = _checkpoint_with(tmp_path, states)
    region = bytearray(64) + blob + bytearray(64)
    view = memoryview(region)

    def setup() -> CheckpointSetup:
        return CheckpointSetup(directory=str(tmp_path), restore_dir=directory,
                               restore_shared={"1/1-0": [64, len(blob)]}, region_view=lambda o, n: view[o:o + n])

    intact = setup()
    got = intact.restored_states("1-0")
    assert got[0] == {"count": 3} and np.frombuffer(got[1], np.uint64).tolist() == [0, 1, 2, 3]
    assert (intact.restored_from_memory, intact.restored_from_files) == (1, 0)
    assert got[1].obj is not None and np.shares_memory(np.frombuffer(got[1], np.uint8), np.frombuffer(region, np.uint8))

    region[64 + len(blob) - 1] ^= 0xFF  # a newer snapshot overwrote part of it: its checksum no longer matches
    overwritten = setup()
    got = overwritten.restored_states("1-0")
    assert np.frombuffer(got[1], np.uint64).tolist() == [0, 1, 2, 3]
    assert (overwritten.restored_from_memory, overwritten.restored_from_files) == (0, 1)
