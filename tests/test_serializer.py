"""runtime.network.serializer: records, columnar batches and events through network buffers.

Round trips (hypothesis, spanning many small buffers, exact-fit boundaries),
zero-copy columnar views, and validation: every corrupt, truncated or oversize
input raises DeserializationError naming channel and offset, and nothing else.
"""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import DeserializationError, NestingTooDeepError
from runtime.memory import BuddyAllocator, SharedRegion
from runtime.network.events import CheckpointBarrier, EndOfPartition, UserEvent, Watermark
from runtime.network.serializer import (
    DEFAULT_MAX_RECORD_SIZE,
    MAX_NESTING,
    BufferDeserializer,
    BufferSerializer,
    SerializationResult,
    iter_records,
    pack_to_buffers,
)

CH = "map-1[0]->sum[1]"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- helpers
def same(a, b) -> bool:
    """Equality that also compares types (tuple vs list, bool vs int) and float bits (-0.0, nan)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(k in b and same(v, b[k]) for k, v in a.items()) and all(
            same(k, next(k2 for k2 in b if k2 == k)) for k in a)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def read_all(bufs, *, channel=CH, max_record_size=DEFAULT_MAX_RECORD_SIZE) -> list:
    des = BufferDeserializer(channel, max_record_size=max_record_size)
    out = []
    for buf, n in bufs:
        out.extend(des.feed(buf, n))
    des.finish()
    return out


def frame(kind: int, flags: int, payload: bytes, *, magic: int = 0xF7, version: int = 2, length=None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack("<BBBBI", kind, flags, magic, version, n) + payload


def columnar_frame(header, data: bytes = b"", form: int = 0) -> bytes:
    hb = msgpack.packb(header, use_bin_type=True)
    body = struct.pack("<I", len(hb)) + hb
    body += bytes(-len(body) % 8) + data
    return frame(2, form, body)


scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20))
keys = st.text(max_size=8) | st.integers(min_value=-(2**63), max_value=2**63) | st.tuples(st.integers(0, 9), st.text(max_size=3))
records = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=5) | st.lists(inner, max_size=5).map(tuple)
                   | st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20,
)
batches = st.lists(st.lists(records, min_size=1, max_size=8), min_size=1, max_size=6)


# ----------------------------------------------------------------------------- records
@pytest.mark.parametrize("recs", [
    [(1, 2.5), (3, 4.0)],
    [[1, 2], [3, [4, 5]]],
    [(1, [2, (3, [4])]), [(), []], {"a": (1, [2]), (1, "x"): [()]}],
    [None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.5, "é", b"\x00\xff", "", b""],
    [{"k": {"n": [(1,), [2]]}}],
    [((((1,),),),), [[[[1]]]]],
])
def test_records_round_trip_exactly(recs):
    out = list(iter_records(pack_to_buffers([recs], buffer_size=64)))
    assert same(out, recs)


def test_bytes_likes_come_back_as_bytes_and_subclasses_as_bases():
    from collections import namedtuple
    Point = namedtuple("Point", "x y")
    recs = [bytearray(b"ab"), memoryview(b"cd"), Point(1, 2), [Point(3, [4])]]
    out = list(iter_records(pack_to_buffers([recs])))
    assert same(out, [b"ab", b"cd", (1, 2), [(3, [4])]])


@SETTINGS
@given(batches=batches, size=st.sampled_from([16, 24, 64, 100, 1024, 32768]))
def test_random_records_round_trip_through_any_buffer_size(batches, size):
    bufs = pack_to_buffers(batches, buffer_size=size)
    assert all(n <= size for _, n in bufs)
    items = read_all(bufs)
    assert same(items, batches)


@SETTINGS
@given(recs=st.lists(records, min_size=1, max_size=4), extra=st.integers(-12, 12))
def test_exact_fit_boundaries(recs, extra):
    # the frame is HEADER_SIZE + len(payload); buffers around that size hit every boundary
    frame_len = pack_to_buffers([recs])[0][1]
    size = max(16, frame_len + extra)
    items = [recs, Watermark(1.0), recs, recs]
    bufs = pack_to_buffers(items, buffer_size=size)
    assert same(read_all(bufs), items)
    if size == frame_len:
        ser = BufferSerializer()
        ser.set_buffer(bytearray(size))
        assert ser.write_records(recs) is SerializationResult.FULL_RECORD_BUFFER_FULL
        assert ser.position == size


def test_spanning_across_many_64_byte_buffers():
    big = [("x" * 5000, list(range(300)), (b"y" * 700,))]
    bufs = pack_to_buffers([big, [(1, 2.0)]], buffer_size=64)
    assert len(bufs) > 100
    assert same(read_all(bufs), [big, [(1, 2.0)]])


def test_channel_loop_results_follow_flink_semantics():
    ser = BufferSerializer()
    ser.set_buffer(bytearray(64))
    assert ser.write_records([1]) is SerializationResult.FULL_RECORD
    r = ser.write_records(["z" * 200])
    assert r is SerializationResult.PARTIAL_RECORD_BUFFER_FULL and ser.position == 64 and ser.has_pending
    with pytest.raises(RuntimeError, match="pending"):
        ser.write_records([2])
    with pytest.raises(RuntimeError, match="continue_into"):
        ser.set_buffer(bytearray(64))
    results = []
    while r is SerializationResult.PARTIAL_RECORD_BUFFER_FULL:
        r = ser.continue_into(bytearray(64))
        results.append(r)
    assert results[-1].is_full_record and not ser.has_pending


def test_writer_rejects_bad_targets():
    ser = BufferSerializer()
    with pytest.raises(RuntimeError, match="set_buffer"):
        ser.write_records([1])
    with pytest.raises(TypeError, match="read-only"):
        ser.set_buffer(b"\x00" * 64)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ser.set_buffer(bytearray(15))


@pytest.mark.parametrize(("value", "text"), [
    (2**64, "int 18446744073709551616 at record 1[0] is outside the 64-bit range"),
    (-(2**63) - 1, "int -9223372036854775809 at record 1[0] is outside the 64-bit range"),
])
def test_ints_beyond_64_bits_raise_naming_the_value(value, text):
    ser = BufferSerializer()
    ser.set_buffer(bytearray(64))
    with pytest.raises(ValueError, match=r"^cannot serialize: " + __import__("re").escape(text)):
        ser.write_records([1, (value, 2)])
    assert ser.position == 0 and not ser.has_pending  # nothing was written
    assert ser.write_records([2**64 - 1]) is SerializationResult.FULL_RECORD


def test_unsupported_types_raise_type_error_naming_the_record():
    ser = BufferSerializer()
    ser.set_buffer(bytearray(64))
    with pytest.raises(TypeError, match=r"^cannot serialize: set \{1\} at record 0\['k'\] is not serializable"):
        ser.write_records([{"k": {1}}])
    with pytest.raises(TypeError, match=r"at record 1\[0\]\[1\]"):
        ser.write_records([[1], [(1, object())]])  # the marked (list + tuple) path too


def test_cyclic_and_oversize_batches_raise_value_error():
    cyc: list = []
    cyc.append(cyc)
    ser = BufferSerializer()
    ser.set_buffer(bytearray(64))
    with pytest.raises(NestingTooDeepError, match=r"nests deeper than 1023 levels \(or is cyclic\)"):
        ser.write_records([cyc])
    ser = BufferSerializer(max_record_size=1000)
    ser.set_buffer(bytearray(64))
    with pytest.raises(ValueError, match=r"exceeds the record size limit of 1000 bytes \(network.max-record-size\)"):
        ser.write_records(["x" * 2000])


# ----------------------------------------------------------------------------- nesting
def nested(depth: int, kind: str) -> object:
    """A record nesting ``depth`` containers: tuples only, lists only, or lists and tuples in turn
    (the MARKED encoding), with a dict at the bottom in the last case."""
    rec: object = {"leaf": 1} if kind == "mixed" else 1
    for level in range(depth - (kind == "mixed")):
        rec = [rec] if kind == "lists" or (kind == "mixed" and level % 2) else (rec,)
    return rec


def depth_of(rec: object) -> int:
    """Containers along the first-child path (iterative: deeper than Python's recursion limit)."""
    depth = 0
    while isinstance(rec, (list, tuple, dict)):
        depth += 1
        rec = next(iter(rec.values())) if isinstance(rec, dict) else rec[0]
    return depth


def test_msgpack_limits_are_the_ones_max_nesting_relies_on():
    # The frame's array of records + MAX_NESTING levels = 1,024: msgpack packs and unpacks exactly that deep.
    assert MAX_NESTING == 1023
    deepest = b"\x91" * (MAX_NESTING + 1) + b"\x01"
    assert msgpack.unpackb(deepest) is not None
    with pytest.raises(msgpack.StackError):
        msgpack.unpackb(b"\x91" + deepest)
    assert msgpack.packb(nested(MAX_NESTING + 1, "lists")) == deepest
    with pytest.raises(ValueError, match="recursion limit"):
        msgpack.packb(nested(MAX_NESTING + 2, "lists"))


@pytest.mark.parametrize("kind", ["tuples", "lists", "mixed"])
@pytest.mark.parametrize("depth", [100, 250, 450, 1000, MAX_NESTING, MAX_NESTING + 1, 2000])
def test_deeply_nested_records_round_trip_up_to_max_nesting_and_raise_beyond(depth, kind):
    rec = nested(depth, kind)
    assert depth_of(rec) == depth
    if depth > MAX_NESTING:
        with pytest.raises(NestingTooDeepError, match=rf"^cannot serialize: .*nest.* deeper than {MAX_NESTING} levels"):
            pack_to_buffers([[rec, 1]], buffer_size=64)
        return
    out = list(iter_records(pack_to_buffers([[rec, ("x", 2)]], buffer_size=64)))
    assert len(out) == 2 and out[1] == ("x", 2)
    assert depth_of(out[0]) == depth
    a, b = rec, out[0]
    while isinstance(a, (list, tuple)):  # same container types all the way down
        assert type(a) is type(b)
        a, b = a[0], b[0]
    assert a == b


def test_a_user_event_payload_nests_as_deep_as_a_record():
    ok = nested(MAX_NESTING, "mixed")
    (event,) = list(iter_records(pack_to_buffers([UserEvent(ok)], buffer_size=64)))
    assert depth_of(event.payload) == MAX_NESTING
    with pytest.raises(NestingTooDeepError, match=rf"deeper than {MAX_NESTING} levels"):
        pack_to_buffers([UserEvent(nested(MAX_NESTING + 1, "mixed"))])


def test_tuple_keys_of_dicts_stay_tuples_in_marked_frames():
    rec = {(1, (2, 3)): [(4,), [5]], "k": ((), [])}
    assert list(iter_records(pack_to_buffers([[rec]]))) == [rec]
    (back,) = iter_records(pack_to_buffers([[rec]]))
    assert type(next(iter(back))) is tuple and type(back["k"][0]) is tuple and type(back["k"][1]) is list


@pytest.mark.parametrize("flags", [0, 1, 2])
def test_the_reader_refuses_frames_nesting_deeper_than_max_nesting(flags):
    too_deep = b"\x91" * (MAX_NESTING + 2) + b"\x01"  # records array + MAX_NESTING + 1 levels
    with pytest.raises(DeserializationError, match=(
            rf"^channel 'map-1\[0\]->sum\[1\]': records frame at offset 0 of buffer 0 nests deeper than msgpack's "
            rf"1024 levels; records \(and event payloads\) may nest at most {MAX_NESTING} ")):
        BufferDeserializer(CH).feed(frame(1, flags, too_deep))
    deepest = b"\x91" * (MAX_NESTING + 1) + b"\x01"
    (batch,) = BufferDeserializer(CH).feed(frame(1, flags, deepest))
    assert depth_of(batch) == MAX_NESTING + 1


# ----------------------------------------------------------------------------- events
def test_events_round_trip_in_order_with_records():
    items = [[(1, 1.0)], Watermark(12.5), Watermark(float("inf")), Watermark(7), [("a", [1])],
             UserEvent({"ckpt": (1, [2, (3,)])}), CheckpointBarrier(7, 1.5e9), [(2, 2.0)], EndOfPartition()]
    for size in (16, 64, 32768):
        assert same(read_all(pack_to_buffers(items, buffer_size=size)), items)


def test_write_event_rejects_non_events():
    ser = BufferSerializer()
    ser.set_buffer(bytearray(64))
    with pytest.raises(TypeError, match="expected EndOfPartition, Watermark, UserEvent or CheckpointBarrier; got int"):
        ser.write_event(3)
    for bad in (CheckpointBarrier(0, 1.0), CheckpointBarrier(True, 1.0), CheckpointBarrier(1, "now")):
        with pytest.raises(TypeError, match="CheckpointBarrier needs an int id"):
            ser.write_event(bad)
    with pytest.raises(TypeError, match="timestamp must be an int or float; got str"):
        ser.write_event(Watermark("soon"))


# ----------------------------------------------------------------------------- columnar
def test_columnar_round_trip_is_zero_copy_within_one_buffer():
    cols = {"key": np.arange(100, dtype=np.int64), "value": np.linspace(0, 1, 100),
            "flag": np.arange(100) % 3 == 0, "name": np.array(["a", "bc"] * 50),
            "big": np.arange(100, dtype=">i4"), "when": np.arange(100).astype("M8[ms]"),
            "pair": np.arange(200, dtype=np.float32).reshape(100, 2), "odd": np.arange(300, dtype=np.int8)[::3]}
    ((buf, n),) = pack_to_buffers([[1, 2], cols, [3]], buffer_size=32768)
    des = BufferDeserializer(CH)
    recs1, out, recs2 = des.feed(buf, n)
    assert recs1 == [1, 2] and recs2 == [3]
    whole = np.frombuffer(buf, dtype=np.uint8)
    assert list(out) == list(cols)
    for name, arr in cols.items():
        assert same(out[name], np.ascontiguousarray(arr)), name
        assert np.shares_memory(out[name], whole), name
        assert out[name].ctypes.data % 8 == 0, name


def test_structured_array_round_trip_with_padding():
    dt = np.dtype({"names": ["k", "v", "tag"], "formats": ["<i4", "<f8", "S3"], "offsets": [0, 8, 16], "itemsize": 24})
    arr = np.zeros(50, dtype=dt)
    arr["k"], arr["v"], arr["tag"] = np.arange(50), np.arange(50) / 7, b"ab"
    nested = np.zeros(4, dtype=[("p", [("x", "<f4"), ("y", "<f4")]), ("m", "<i2", (2, 3))])
    nested["m"] = 7
    bufs = pack_to_buffers([arr, nested], buffer_size=4096)
    out = read_all(bufs)
    assert out[0].dtype == dt and same(out[0], arr)
    assert out[1].dtype == nested.dtype and same(out[1], nested)


def test_columnar_batch_that_does_not_fit_waits_for_the_next_buffer_and_stays_zero_copy():
    cols = {"a": np.arange(400, dtype=np.int64)}  # 3200 bytes + header: fits a 4096-byte buffer only empty
    ser = BufferSerializer()
    first = bytearray(4096)
    ser.set_buffer(first)
    ser.write_records(["x" * 2000])
    assert ser.write_batch(cols) is SerializationResult.PARTIAL_RECORD_BUFFER_FULL
    used = ser.position
    second = bytearray(4096)
    assert ser.continue_into(second).is_full_record
    des = BufferDeserializer(CH)
    assert des.feed(first, used) == [["x" * 2000]]
    (out,) = des.feed(second, ser.position)
    assert same(out["a"], cols["a"]) and np.shares_memory(out["a"], np.frombuffer(second, np.uint8))


@SETTINGS
@given(rows=st.integers(0, 300), size=st.sampled_from([16, 64, 256, 4096]),
       dtypes=st.lists(st.sampled_from(["<i8", "<f4", "|b1", "<U3", ">u2", "<c16", "|S2"]), min_size=1, max_size=4))
def test_random_columnar_batches_round_trip_spanning_by_copy(rows, size, dtypes):
    rng = np.random.default_rng(rows)
    cols = {f"c{i}": rng.integers(0, 200, rows).astype(dt) for i, dt in enumerate(dtypes)}
    items = [[("r", 1)], cols, cols, EndOfPartition()]
    out = read_all(pack_to_buffers(items, buffer_size=size))
    assert out[0] == [("r", 1)] and out[3] == EndOfPartition()
    for got in out[1:3]:
        assert list(got) == list(cols) and all(same(got[k], v) for k, v in cols.items())


@pytest.mark.parametrize(("batch", "exc", "text"), [
    ({"a": np.array([1, None], dtype=object)}, TypeError, "column 'a': dtype object holds Python objects"),
    ({"a": np.arange(3), "b": np.arange(4)}, ValueError, "column 'b' has shape (4,), expected 3 rows"),
    ({1: np.arange(3)}, TypeError, "column names must be str"),
    ({"a": [1, 2]}, TypeError, "column 'a' must be a numpy array; got list"),
    (np.arange(3), TypeError, "must be a 1-d structured array"),
    ([(1,)], TypeError, "expected a dict of numpy arrays or a structured array; got list"),
])
def test_write_batch_rejects_bad_batches(batch, exc, text):
    ser = BufferSerializer()
    ser.set_buffer(bytearray(64))
    with pytest.raises(exc, match=__import__("re").escape(text)):
        ser.write_batch(batch)
    assert ser.position == 0


# ----------------------------------------------------------------------------- validation
def test_oversize_frame_names_channel_offset_and_limit():
    buf = bytearray(frame(1, 0, b"\x91\x01")) + bytes(6) + frame(1, 0, b"", length=99999999)
    with pytest.raises(DeserializationError, match=(
            r"^channel 'map-1\[0\]->sum\[1\]': frame at offset 16 of buffer 0 claims 99999999 bytes, "
            r"limit 67108864 \(network.max-record-size\)$")):
        BufferDeserializer(CH).feed(buf)


@pytest.mark.parametrize(("data", "text"), [
    (frame(9, 0, b"\x90"), r"frame at offset 0 of buffer 0 is unknown kind 9"),
    (frame(4, 0, b"\x90"), r"frame at offset 0 of buffer 0 is a continuation without a spanning frame before it$"),
    (frame(1, 7, b"\x90"), r"frame at offset 0 of buffer 0 of kind records has invalid flags 7$"),
    (frame(1, 0, b"\x90", magic=0), r"frame at offset 0 of buffer 0 has magic 0x00 version 2; expected 0xf7 version 2 \(corrupt"),
    (frame(1, 0, b"\x90", version=1),
     r"frame at offset 0 of buffer 0 has magic 0xf7 version 1; expected 0xf7 version 2"),
    (frame(1, 0, b"\x05"), r"records frame at offset 0 of buffer 0 is corrupt: ValueError: payload is a int"),
    (frame(1, 0, b"\x92\x01"), r"records frame at offset 0 of buffer 0 is corrupt: ValueError: Unpack failed"),
    (frame(1, 0, b"\x91\x01\x01"), r"records frame at offset 0 of buffer 0 is corrupt: ExtraData"),
    (frame(3, 0, msgpack.packb([7])), r"event frame at offset 0 of buffer 0 is corrupt: ValueError: event body \[7\]"),
    (frame(1, 0, b"\x91\x01") + b"\x00\x01", r"padding at offset 10 of buffer 0 holds non-zero bytes"),
    (frame(1, 0, b"\x91\x01") + bytes(6) + b"\x01\x00", r"frame at offset 16 of buffer 0 is truncated: 2 bytes left"),
])
def test_corrupt_frames_raise_deserialization_error(data, text):
    with pytest.raises(DeserializationError, match=r"^channel 'map-1\[0\]->sum\[1\]': " + text):
        BufferDeserializer(CH).feed(bytearray(data))


COLS_OK = [1, 0, 2, [["a", "<i8", [2], 0, 16]]]


@pytest.mark.parametrize(("header", "data", "text"), [
    ([1, 0, 2, [["a", "<q9", [2], 0, 16]]], bytes(16), r"dtype '<q9' is not a numpy type string"),
    ([1, 0, 2, [["a", "|O8", [2], 0, 16]]], bytes(16), r"dtype '\|O8' is not a numpy type string"),
    ([1, 0, 2, [["a", "<i8", [2], 0, 16]]], bytes(8), r"claims 16 bytes at data offset 0; .* payload holds 8"),
    ([1, 0, 2, [["a", "<i8", [2], 8, 16]]], bytes(16), r"claims 16 bytes at data offset 8"),
    ([1, 0, -2, [["a", "<i8", [-2], 0, -16]]], bytes(16), r"header claims -2 rows"),
    ([1, 0, 2, [["a", "<i8", [2], -8, 16]]], bytes(16), r"claims 16 bytes at data offset -8"),
    ([1, 0, 2**40, [["a", "<i8", [2**40], 0, 2**43]]], bytes(16), r"claims 8796093022208 bytes"),
    ([1, 0, 2, [["a", "<i8", [3], 0, 24]]], bytes(24), r"has shape \[3\]; expected 2 rows"),
    ([1, 0, 2, [["a", [["x", "<i8", [2**30, 2**30]]], [2], 0, 16]]], bytes(16), r"not a valid numpy dtype|claims"),
    ([1, 0, 2, [["a", [["x", "<i8"], ["x", "<i8"]], [2], 0, 32]]], bytes(32), r"not a valid numpy dtype"),
    ([1, 1, 2, [["a", "<i8", [2], 0, 16]]], bytes(16), r"header .* is not \[1, 0, rows, columns\]"),
    ([1, 0, 2, [["a", "<i8", [2], 0, 16], ["a", "<i8", [2], 0, 16]]], bytes(16), r"column 'a' appears twice"),
    ([1, 0, 2, "cols"], b"", r"is not \[1, 0, rows, columns\]"),
    ([1, 0, 2, [["a", 5, [2], 0, 16]]], bytes(16), r"dtype 5 is not a type string or a structured descr"),
])
def test_corrupt_columnar_headers_raise_naming_channel_and_offset(header, data, text):
    good = columnar_frame(COLS_OK, np.arange(2, dtype="<i8").tobytes())
    assert same(BufferDeserializer(CH).feed(bytearray(good))[0]["a"], np.arange(2, dtype="<i8"))
    buf = bytearray(frame(1, 0, b"\x91\x01")) + bytes(6) + columnar_frame(header, data)
    with pytest.raises(DeserializationError,
                       match=r"^channel 'map-1\[0\]->sum\[1\]': columnar frame at offset 16 of buffer 0 is corrupt: .*"
                       + text):
        BufferDeserializer(CH).feed(buf)


def test_columnar_header_length_overflowing_the_frame():
    body = struct.pack("<I", 1000) + b"\x90"
    with pytest.raises(DeserializationError, match=r"offset 0 of buffer 0 is corrupt: ValueError: header of 1000 bytes"):
        BufferDeserializer(CH).feed(bytearray(frame(2, 0, body)))


def test_spanning_errors_name_where_the_frame_started():
    bufs = pack_to_buffers([["x" * 300]], buffer_size=64)
    des = BufferDeserializer(CH)
    des.feed(*bufs[0])
    with pytest.raises(DeserializationError, match=(
            r"^channel 'map-1\[0\]->sum\[1\]': frame at offset 0 of buffer 1 has kind 1 flags 0 magic 0xf7 version 2; "
            r"expected a continuation \(continuing the records frame at offset 0 of buffer 0, \d+ of \d+ bytes missing\)$")):
        des.feed(bytearray(frame(1, 0, b"\x91\x01")))
    des = BufferDeserializer(CH)
    des.feed(*bufs[0])
    with pytest.raises(DeserializationError, match=r"input ended inside the records frame at offset 0 of buffer 0"):
        des.finish()
    des = BufferDeserializer(CH)
    des.feed(*bufs[0])
    bad = bytearray(bufs[1][0])
    bad[4:8] = struct.pack("<I", 5)
    with pytest.raises(DeserializationError, match=r"continuation at offset 0 of buffer 1 claims 5 bytes"):
        des.feed(bad, bufs[1][1])


def test_bad_nbytes_and_buffers():
    des = BufferDeserializer(CH)
    with pytest.raises(DeserializationError, match=r"buffer 0 of 8 bytes announces 9 filled bytes"):
        des.feed(bytearray(8), 9)
    with pytest.raises(DeserializationError, match=r"announces -1 filled bytes"):
        des.feed(bytearray(8), -1)
    with pytest.raises(DeserializationError, match="is not a contiguous byte buffer"):
        des.feed(np.zeros((4, 4))[:, ::2])
    assert des.feed(bytearray(8), 0) == []


def _expect_only_deserialization_errors(chunks, max_record_size=1 << 20) -> None:
    des = BufferDeserializer(CH, max_record_size=max_record_size)
    try:
        for buf, n in chunks:
            des.feed(buf, n)
        des.finish()
    except DeserializationError as exc:
        assert str(exc).startswith(f"channel {CH!r}: ")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_random_bytes_raise_only_deserialization_errors(blobs):
    _expect_only_deserialization_errors([(bytearray(b), len(b)) for b in blobs])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=60), min_size=1, max_size=4), st.sampled_from([1, 2, 3, 4]),
       st.integers(0, 255))
def test_random_payloads_behind_valid_headers_raise_only_deserialization_errors(payloads, kind, flags):
    buf = bytearray()
    for p in payloads:
        buf += bytes(-len(buf) % 8) + frame(kind, flags % 3, p)
    _expect_only_deserialization_errors([(buf, len(buf))])


ITEMS = [[(1, 2.5), ("a", [1, (2,)])], Watermark(3.0), {"k": np.arange(20), "v": np.ones(20)},
         [{"x": b"yy" * 40}], UserEvent((1, [2])), np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]), EndOfPartition()]


@settings(max_examples=200, deadline=None)
@given(size=st.sampled_from([16, 64, 128, 4096]), data=st.data())
def test_mutated_streams_raise_only_deserialization_errors(size, data):
    bufs = [(bytearray(b), n) for b, n in pack_to_buffers(ITEMS, buffer_size=size)]
    how = data.draw(st.sampled_from(["flip", "truncate", "drop", "swap", "nbytes"]))
    i = data.draw(st.integers(0, len(bufs) - 1))
    buf, n = bufs[i]
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, max(0, n - 1)))
            buf[pos] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        bufs[i] = (buf, data.draw(st.integers(0, n)))
    elif how == "drop":
        del bufs[i]
    elif how == "swap":
        j = data.draw(st.integers(0, len(bufs) - 1))
        bufs[i], bufs[j] = bufs[j], bufs[i]
    else:
        bufs[i] = (buf, data.draw(st.integers(0, len(buf))))
    _expect_only_deserialization_errors(bufs)


# ----------------------------------------------------------------------------- real segments
def test_round_trip_through_shared_memory_segments_zero_copy():
    rows = [(k, k / 7) for k in range(5000)]
    cols = {"key": np.arange(1000, dtype=np.int64), "value": np.arange(1000) / 3}
    with SharedRegion.create(4 << 20) as region:
        alloc = BuddyAllocator(region, min_block=4096)
        segs = [alloc.allocate(32768) for _ in range(4)]
        try:
            ser, des = BufferSerializer(), BufferDeserializer(CH)
            got: list = []
            i = 0
            ser.set_buffer(segs[0].view())
            for batch, write in ((rows[:1000], ser.write_records), (cols, ser.write_batch),
                                 (rows[1000:], ser.write_records)):
                r = write(batch)
                while r.is_full_buffer:
                    got.extend(des.feed(segs[i].view(), ser.position))
                    i += 1
                    if r.is_full_record:
                        ser.set_buffer(segs[i].view())
                        break
                    r = ser.continue_into(segs[i].view())
            last = segs[i]
            got.extend(des.feed(last.view(), ser.position))
            des.finish()
            recs = [x for item in got if isinstance(item, list) for x in item]
            assert recs == rows
            (col,) = [item for item in got if isinstance(item, dict)]
            assert same(col["key"], cols["key"]) and same(col["value"], cols["value"])
            owners = [s for s in segs if np.shares_memory(col["key"], s.as_array())]
            assert len(owners) == 1
            del col, got, owners
        finally:
            for seg in segs:
                seg.free()


def test_statistics_count_frames_and_spans():
    bufs = pack_to_buffers([[(1, 2.0)] * 50, ["x" * 100]], buffer_size=64)
    des = BufferDeserializer(CH)
    for b, n in bufs:
        des.feed(b, n)
    stats = des.statistics()
    assert stats.frames == 2 and stats.records == 51 and stats.spanned_frames == 2 and stats.buffers == len(bufs)
    assert math.isfinite(stats.bytes_copied) and stats.bytes_copied > 0
