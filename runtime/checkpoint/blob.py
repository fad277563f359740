"""A subtask's snapshot as one contiguous blob: a small header and its large buffers, each copied once.

Imports: runtime.errors (stdlib otherwise).

A snapshot is a msgpack header (operator states, small values) and the
buffers it holds out of band (``runtime.state.codec.Raw``: a partition's
table in managed memory). :func:`write_blob` lays them out in one buffer of
:func:`blob_size` bytes that the caller provides: a block of the worker's
checkpoint area in the shared region (then a restarted worker maps it and
reads it in place), or a bytearray. That same buffer is what the state file
holds, byte for byte, so the file's checksum (in the checkpoint's metadata)
checks the copy in memory too. Layout, integers little-endian::

    magic (8) | version u32 | buffers u32 | header length u64 | buffer lengths u64 x buffers
    | header | pad to 8 | buffer 0 | pad to 8 | buffer 1 | ...

Buffers start 8-aligned, so that a numpy view of one (``np.frombuffer``) is aligned. A buffer is a
memoryview, or a :class:`LazyBuffer` that writes its bytes itself (rows packed straight from a table into
the blob, with no copy between).
"""

from __future__ import annotations

import struct
from typing import Protocol, TypeAlias

from runtime.errors import CheckpointError

__all__ = ["BLOB_MAGIC", "LazyBuffer", "blob_size", "read_blob", "write_blob"]


class LazyBuffer(Protocol):
    """A buffer that writes itself: exactly ``nbytes`` bytes into the view :meth:`write_into` is given."""

    @property
    def nbytes(self) -> int: ...

    def write_into(self, target: memoryview) -> None: ...


Buffer: TypeAlias = "memoryview | LazyBuffer"

BLOB_MAGIC = b"SHMFBLOB"
_VERSION = 1
_FIXED = struct.Struct("<8sIIQ")
_LENGTH = struct.Struct("<Q")


def _pad(n: int) -> int:
    return -n % 8


def blob_size(header: bytes, buffers: list[Buffer]) -> int:
    """The bytes :func:`write_blob` writes for ``header`` and ``buffers``."""
    size = _FIXED.size + _LENGTH.size * len(buffers) + len(header)
    size += _pad(size)
    for buf in buffers:
        size += buf.nbytes + _pad(buf.nbytes)
    return size


def write_blob(target: memoryview, header: bytes, buffers: list[Buffer]) -> None:
    """Lay ``header`` and ``buffers`` out in ``target`` (exactly :func:`blob_size` bytes): one copy of each.

    Ownership: the caller owns ``target`` and keeps the buffers unchanged until this returns.
    """
    out = target.cast("B") if target.format != "B" else target
    if out.nbytes != blob_size(header, buffers):
        msg = f"a blob of this snapshot takes {blob_size(header, buffers)} bytes; the target has {out.nbytes}"
        raise ValueError(msg)
    pos = _FIXED.size
    _FIXED.pack_into(out, 0, BLOB_MAGIC, _VERSION, len(buffers), len(header))
    for buf in buffers:
        _LENGTH.pack_into(out, pos, buf.nbytes)
        pos += _LENGTH.size
    out[pos:pos + len(header)] = header
    pos += len(header)
    out[pos:pos + _pad(pos)] = bytes(_pad(pos))
    pos += _pad(pos)
    for buf in buffers:
        n = buf.nbytes
        if isinstance(buf, memoryview):
            out[pos:pos + n] = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        else:
            buf.write_into(out[pos:pos + n])
        pos += n
        out[pos:pos + _pad(n)] = bytes(_pad(n))
        pos += _pad(n)


def read_blob(data: memoryview, *, source: str) -> tuple[memoryview, list[memoryview]]:
    """The header and the buffers of a blob, as views of ``data`` (nothing copied).

    Raises:
        CheckpointError: ``data`` is not a blob, or its lengths do not add up to its size (names ``source``).
    """
    view = data.cast("B") if data.format != "B" else data
    total = view.nbytes
    if total < _FIXED.size:
        msg = f"{source} holds {total} bytes, too few for a snapshot ({_FIXED.size} at least)"
        raise CheckpointError(msg)
    magic, version, count, header_len = _FIXED.unpack_from(view, 0)
    if magic != BLOB_MAGIC or version != _VERSION:
        msg = f"{source} is not a shmflow snapshot of version {_VERSION} (magic {bytes(magic)!r}, version {version})"
        raise CheckpointError(msg)
    pos = _FIXED.size
    if pos + _LENGTH.size * count > total:
        msg = f"{source} lists {count} buffers and holds only {total} bytes: truncated"
        raise CheckpointError(msg)
    lengths = [_LENGTH.unpack_from(view, pos + _LENGTH.size * i)[0] for i in range(count)]
    pos += _LENGTH.size * count
    end = pos + header_len
    expected = end + _pad(end) + sum(n + _pad(n) for n in lengths)
    if expected != total:
        msg = f"{source} holds {total} bytes; its header and buffer lengths add up to {expected}: torn or truncated"
        raise CheckpointError(msg)
    header = view[pos:end]
    pos = end + _pad(end)
    buffers = []
    for n in lengths:
        buffers.append(view[pos:pos + n])
        pos += n + _pad(n)
    return header, buffers
