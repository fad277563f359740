"""The data plane's wire messages between a subpartition (sender) and its input channel (receiver).

Imports: runtime.errors (and msgpack, numpy).

Every message is one zmq multipart message whose first frame starts with a
one-byte kind. Hot messages carry fixed little-endian structs and raw uint32
arrays (no per-buffer Python objects); the handshake is msgpack.

====== ========== ================================================================
kind   direction  first frame after the kind byte; further frames
====== ========== ================================================================
``H``  s -> r     msgpack map: version, channel, transport, region, pool offset,
                  buffer size, pool generation, number of buffers
``D``  s -> r     ``<II`` backlog, count; then ``count`` x ``<II`` (buffer index,
                  bytes filled): buffers in the shared region (shm transport)
``B``  s -> r     ``<II`` backlog, count; then ``count`` frames of raw bytes (tcp)
``C``  r -> s     ``<I`` credits granted
``R``  r -> s     ``<I`` credits granted, then uint32 indices of buffers recycled
``X``  s -> r     the sender closed the channel (after end-of-partition)
====== ========== ================================================================

Credits: the sender ships one buffer per credit. ``R`` returns buffers to
their pool (shm) and ``C``/``R`` grant new credits.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from runtime.errors import DeserializationError

if TYPE_CHECKING:  # pragma: no cover
    import numpy.typing as npt

__all__ = [
    "BYTES",
    "CLOSE",
    "CREDIT",
    "DATA",
    "DESCRIPTOR",
    "HELLO",
    "PROTOCOL_VERSION",
    "RECYCLE",
    "decode_bytes_header",
    "decode_credit",
    "decode_data",
    "decode_hello",
    "encode_bytes_header",
    "encode_credit",
    "encode_data",
    "encode_hello",
    "encode_recycle",
]

PROTOCOL_VERSION = 1
HELLO, DATA, BYTES, CREDIT, RECYCLE, CLOSE = (ord(c) for c in "HDBCRX")
_COUNTS = struct.Struct("<II")
_CREDIT = struct.Struct("<I")
DESCRIPTOR = np.dtype([("index", "<u4"), ("size", "<u4")])


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


def encode_data(backlog: int, descriptors: npt.NDArray[np.void]) -> bytes:
    """``D``: ``descriptors`` is a DESCRIPTOR array of (index, size)."""
    return b"D" + _COUNTS.pack(backlog, len(descriptors)) + descriptors.tobytes()


def decode_data(frame: bytes | memoryview, *, where: str) -> tuple[int, npt.NDArray[np.void]]:
    """(backlog, DESCRIPTOR array); the array is a view of ``frame``."""
    if len(frame) < 1 + _COUNTS.size:
        msg = f"{where}: data message of {len(frame)} bytes is shorter than its header"
        raise DeserializationError(msg)
    backlog, count = _COUNTS.unpack_from(frame, 1)
    expected = 1 + _COUNTS.size + count * DESCRIPTOR.itemsize
    if len(frame) != expected:
        msg = f"{where}: data message announces {count} descriptors ({expected} bytes); got {len(frame)} bytes"
        raise DeserializationError(msg)
    return backlog, np.frombuffer(frame, DESCRIPTOR, count, 1 + _COUNTS.size)


def encode_bytes_header(backlog: int, count: int) -> bytes:
    return b"B" + _COUNTS.pack(backlog, count)


def decode_bytes_header(frame: bytes | memoryview, nframes: int, *, where: str) -> int:
    """The backlog of a ``B`` message whose payload came as ``nframes`` further frames."""
    backlog: int
    if len(frame) != 1 + _COUNTS.size:
        msg = f"{where}: bytes header of {len(frame)} bytes; expected {1 + _COUNTS.size}"
        raise DeserializationError(msg)
    backlog, count = _COUNTS.unpack_from(frame, 1)
    if count != nframes:
        msg = f"{where}: bytes message announces {count} buffers; got {nframes} frames"
        raise DeserializationError(msg)
    return backlog


def encode_credit(credits: int) -> bytes:
    return b"C" + _CREDIT.pack(credits)


def encode_recycle(credits: int, indices: npt.NDArray[np.uint32] | list[int]) -> bytes:
    return b"R" + _CREDIT.pack(credits) + np.asarray(indices, dtype="<u4").tobytes()


def decode_credit(frame: bytes | memoryview, *, where: str) -> tuple[int, npt.NDArray[np.uint32]]:
    """(credits, indices recycled) of a ``C`` or ``R`` message."""
    if len(frame) < 1 + _CREDIT.size or (len(frame) - 1 - _CREDIT.size) % 4:
        msg = f"{where}: credit message of {len(frame)} bytes is malformed"
        raise DeserializationError(msg)
    (credits,) = _CREDIT.unpack_from(frame, 1)
    return credits, np.frombuffer(frame, "<u4", offset=1 + _CREDIT.size)
