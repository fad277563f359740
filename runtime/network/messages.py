"""The data plane's wire messages between a subpartition (sender) and its input channel (receiver).

Imports: runtime.errors (and msgpack).

Every message is one zmq multipart message whose first frame starts with a
one-byte kind. Hot messages carry fixed little-endian structs; the handshake is
msgpack. On one host (``shm``) only the hello and wake-ups travel here: the
descriptors, recycled buffer indices and credits go through the channel's ring
in the shared region (:mod:`runtime.network.ring`).

====== ========== ================================================================
kind   direction  first frame after the kind byte; further frames
====== ========== ================================================================
``H``  s -> r     msgpack map: version, channel, transport; shm adds the region,
                  pool offset, buffer size, pool generation, number of buffers,
                  and the ring's offset, capacity and generation
``B``  s -> r     ``<II`` backlog, count, then ``count`` x ``<I`` buffer sizes; then one
                  or more frames: the ``count`` buffers' bytes in order, back to back,
                  each buffer whole in one frame (tcp)
``C``  r -> s     ``<I`` credits granted (tcp)
``A``  s -> r     ``<I`` backlog: the sender has this many buffers queued and no credit
                  (both transports; the receiver may lend it floating credits)
``W``  both       nothing: a wake-up for a peer that parked in the ring (shm)
``X``  s -> r     the sender closed the channel (after end-of-partition)
====== ========== ================================================================

Credits (tcp): the sender ships one buffer per credit; ``C`` grants new ones.
Backlog: every ``B`` message and every ring push carries the sender's backlog; a
sender whose queue grows while it has no credit (so it ships nothing that could
carry it) announces it once with ``A``, as Flink's BacklogAnnouncement does.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from runtime.errors import DeserializationError

__all__ = [
    "BACKLOG",
    "BYTES",
    "CLOSE",
    "CREDIT",
    "HELLO",
    "PROTOCOL_VERSION",
    "WAKE",
    "WAKE_FRAME",
    "decode_backlog",
    "decode_bytes_header",
    "decode_credit",
    "decode_hello",
    "encode_backlog",
    "encode_bytes_header",
    "encode_credit",
    "encode_hello",
]

PROTOCOL_VERSION = 3  # 2: shm descriptors, recycles and credits in rings; 3: tcp payload frames, A
HELLO, BYTES, CREDIT, WAKE, CLOSE, BACKLOG = (ord(c) for c in "HBCWXA")
WAKE_FRAME = b"W"
_COUNTS = struct.Struct("<II")
_CREDIT = struct.Struct("<I")


def encode_hello(**fields: str | int) -> bytes:
    packed: bytes = msgpack.packb({"version": PROTOCOL_VERSION, **fields})
    return b"H" + packed


def decode_hello(frame: bytes, *, where: str) -> dict[str, Any]:
    try:
        hello = msgpack.unpackb(frame[1:])
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types for garbage
        msg = f"{where}: malformed hello ({exc})"
        raise DeserializationError(msg) from None
    if not isinstance(hello, dict) or hello.get("version") != PROTOCOL_VERSION:
        msg = f"{where}: hello must be a map with version {PROTOCOL_VERSION}; got {hello!r:.200}"
        raise DeserializationError(msg)
    return hello


def encode_bytes_header(backlog: int, sizes: list[int]) -> bytes:
    return b"B" + _COUNTS.pack(backlog, len(sizes)) + struct.pack(f"<{len(sizes)}I", *sizes)


def decode_bytes_header(frame: bytes | memoryview, payload_bytes: int, *, where: str) -> tuple[int, list[int]]:
    """(backlog, buffer sizes) of a ``B`` message whose buffers came in frames of ``payload_bytes`` in all."""
    if len(frame) < 1 + _COUNTS.size:
        msg = f"{where}: bytes header of {len(frame)} bytes is shorter than its counts"
        raise DeserializationError(msg)
    backlog, count = _COUNTS.unpack_from(frame, 1)
    expected = 1 + _COUNTS.size + 4 * count
    if len(frame) != expected:
        msg = f"{where}: bytes header announces {count} buffers ({expected} bytes); got {len(frame)} bytes"
        raise DeserializationError(msg)
    sizes = list(struct.unpack_from(f"<{count}I", frame, 1 + _COUNTS.size))
    if sum(sizes) != payload_bytes:
        msg = f"{where}: bytes message announces {sum(sizes)} bytes of buffers; got {payload_bytes}"
        raise DeserializationError(msg)
    return backlog, sizes


def encode_backlog(backlog: int) -> bytes:
    return b"A" + _CREDIT.pack(backlog)


def decode_backlog(frame: bytes | memoryview, *, where: str) -> int:
    """The backlog of an ``A`` message."""
    return _decode_count(frame, "backlog", where)


def encode_credit(credits: int) -> bytes:
    return b"C" + _CREDIT.pack(credits)


def decode_credit(frame: bytes | memoryview, *, where: str) -> int:
    """The credits of a ``C`` message."""
    return _decode_count(frame, "credit", where)


def _decode_count(frame: bytes | memoryview, what: str, where: str) -> int:
    """The one ``<I`` count after the kind byte of a ``C`` or ``A`` message."""
    if len(frame) != 1 + _CREDIT.size:
        msg = f"{where}: {what} message of {len(frame)} bytes; expected {1 + _CREDIT.size}"
        raise DeserializationError(msg)
    count: int = _CREDIT.unpack_from(frame, 1)[0]
    return count
