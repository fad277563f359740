"""The control protocol: every message round-trips; unknown types, versions and mistyped fields are refused."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

import msgpack
import pytest

from runtime.cluster import protocol
from runtime.errors import AuthenticationError, ProtocolError

SECRET = b"s" * 32

EXAMPLES: list[protocol.Message] = [
    protocol.Register(worker=-1, pid=123),
    protocol.Welcome(worker=0, region="shmflow-x", arena=[0, 1 << 20, 3], min_block=4096, segment_size=32768,
                     network_buffers=256, managed_bytes=1 << 22),
    protocol.Attached(worker=1),
    protocol.Heartbeat(worker=1, progress={"map -> sum": [10, 5]}),
    protocol.Heartbeat(worker=1),
    protocol.Ack(),
    protocol.Shutdown(reason="bye"),
    protocol.Deploy(job="j1", graph=b"\x80pickle", config={"workers": 2, "network.buffer-timeout": 0.1}),
    protocol.Deployed(job="j1", worker=0, gates={"3": "ipc://@x"}),
    protocol.Start(job="j1", gates={"3": ["ipc://@x", "ipc://@y"]}),
    protocol.Cancel(job="j1"),
    protocol.Deploy(job="j1", graph=b"\x80pickle", config={}, checkpoint_dir="/ck/j1", restore_dir="/ck/j0/chk-3"),
    protocol.TriggerCheckpoint(job="j1", checkpoint=4, timestamp=1.7e9),
    protocol.AckCheckpoint(job="j1", checkpoint=4, worker=1, subtask="2-1", state=["2-1.state", 99, "cd" * 4],
                           alignment_seconds=0.01, snapshot_seconds=0.2),
    protocol.CheckpointDone(job="j1", checkpoint=4),
    protocol.Collect(job="j1", worker=0, sink="collect-0", records=b"\x90"),
    protocol.Finished(job="j1", worker=0, metrics={"map[0]": {"records_in": 3}}),
    protocol.Failed(job="j1", worker=0, operator="map", traceback="Traceback ..."),
    protocol.Submit(graph=b"g", timeout=None),
    protocol.Submit(graph=b"g", timeout=2.5),
    protocol.Running(),
    protocol.Results(sink="collect-0", records=b"\x90"),
    protocol.JobSucceeded(metrics={0: {"records": 3}, 1: {}}),
    protocol.JobError(message="boom"),
    protocol.Heartbeat(worker=1, arena=[0, 1 << 20, 4096, [[0, 65536, "worker-1 network", 1]], [[65536, 65536]]]),
    protocol.Inspect(),
    protocol.ClusterLayout(region=[0, 1 << 21, 4096, [], []], workers=[[0, 1234, None]], job="j1"),
    protocol.Heartbeat(worker=1, state={"process[1]": ["managed", 3, 65536, 0, 5, 1, [[32, 3, 70, 1024]]]}),
    protocol.Heartbeat(worker=1, state={}),
    protocol.ClusterLayout(region=[0, 1 << 21, 4096, [], []], workers=[[0, 1234, None]], job="j1",
                           state={0: {"process[0]": ["managed", 3, 65536, 0, 5, 1, [[32, 3, 70, 1024]]]}}),
]


def test_every_message_type_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(protocol.MESSAGE_TYPES.values())


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_signed(message):
    assert protocol.open_message(SECRET, protocol.seal(SECRET, message)) == message


def sealed(body: dict) -> list[bytes]:
    payload = msgpack.packb(body, use_bin_type=True)
    return [hmac.new(SECRET, payload, hashlib.sha256).digest(), payload]


def test_a_wrong_mac_is_refused_before_decoding():
    frames = protocol.seal(SECRET, protocol.Ack())
    with pytest.raises(AuthenticationError, match=r"^control message from peer failed its HMAC check"):
        protocol.open_message(b"x" * 32, frames)


def test_another_protocol_version_is_refused_by_name():
    body = {"v": protocol.PROTOCOL_VERSION + 1, "t": "ack"}
    version = protocol.PROTOCOL_VERSION
    with pytest.raises(ProtocolError, match=rf"speaks protocol version {version + 1}; this process speaks {version}: "
                                            r"run the same shmflow"):
        protocol.open_message(SECRET, sealed(body))


def test_an_unknown_type_is_refused_listing_the_known_ones():
    with pytest.raises(ProtocolError, match=r"^control message from peer has unknown type 'hello'; known: ack, "):
        protocol.open_message(SECRET, sealed({"v": protocol.PROTOCOL_VERSION, "t": "hello"}))


@pytest.mark.parametrize("fields, message", [
    ({"worker": "0", "pid": 1}, r"^Register: expected `int`, got `str` at `\$.worker`$"),
    ({"worker": True, "pid": 1}, r"^Register: expected `int`, got `bool` at `\$.worker`$"),
    ({"worker": 0}, r"^Register from peer: missing field `\$.pid`$"),
    ({"worker": 0, "pid": 1, "evil": 2}, r"^Register from peer: unexpected field\(s\) 'evil'$"),
])
def test_mistyped_missing_and_extra_fields_are_refused(fields, message):
    with pytest.raises(ProtocolError, match=message):
        protocol.open_message(SECRET, sealed({"v": protocol.PROTOCOL_VERSION, "t": "register", **fields}))


def test_nested_field_types_are_checked_with_their_path():
    body = {"v": protocol.PROTOCOL_VERSION, "t": "start", "job": "j", "gates": {"3": ["ipc://@x", 7]}}
    with pytest.raises(ProtocolError, match=r"^Start: expected `str`, got `int` at `\$.gates.3\[1\]`$"):
        protocol.open_message(SECRET, sealed(body))


def test_messages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        protocol.Ack().x = 1  # type: ignore[attr-defined]


def test_garbage_that_verifies_is_a_protocol_error_not_a_crash():
    payload = b"\xc1\xc1\xc1"
    frames = [hmac.new(SECRET, payload, hashlib.sha256).digest(), payload]
    with pytest.raises(ProtocolError, match=r"is not msgpack"):
        protocol.open_message(SECRET, frames)
    with pytest.raises(ProtocolError, match=r"must be a map; got list"):
        protocol.open_message(SECRET, sealed([1, 2]))  # type: ignore[arg-type]
