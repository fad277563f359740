"""How state values and keys become bytes: msgpack that keeps tuples tuples, and a clear error for the rest.

Imports: runtime.errors, msgpack.

Values are None, bool, int (64-bit), float, str, bytes, and lists, tuples and
dicts of them. msgpack turns a tuple into a list; here a tuple travels as ext
type 1 wrapping its items, so a state read gives back exactly what was
written, on either backend.

Checkpoints add one more kind of value: :class:`Raw`, a large buffer (a
partition's table in managed memory) that :func:`encode_parts` leaves out of
the msgpack header (ext type 2 holds its index) so that it is copied once, to
wherever the snapshot goes, and :func:`decode_parts` gives back as a
memoryview of where it was read, never copied.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from runtime.errors import StateSerializationError

__all__ = ["Chain", "Incremental", "Raw", "check_value", "decode", "decode_parts", "encode", "encode_key",
           "encode_parts", "ext_hook"]

_TUPLE = 1
_RAW = 2
_INCREMENTAL = 3
_INDEX = struct.Struct("<I")
_SCALARS = (type(None), bool, int, float, str, bytes)


def _default(obj: Any) -> Any:
    if type(obj) is tuple:
        return msgpack.ExtType(_TUPLE, msgpack.packb(list(obj), default=_default, strict_types=True,
                                                     use_bin_type=True))
    if isinstance(obj, int) and not isinstance(obj, bool) and type(obj) is int:
        msg = f"the integer {obj} is outside the 64-bit range"
        raise OverflowError(msg)
    msg = f"{type(obj).__name__} is not msgpack-able"
    raise TypeError(msg)


class Raw:
    """A buffer a snapshot holds out of band (see :func:`encode_parts`): bytes, a memoryview or a C-contiguous
    numpy array, or a lazy buffer (``nbytes`` and ``write_into(view)``, which writes exactly that many bytes
    where the snapshot goes: rows packed straight from a table). Ownership: the caller's; it must not change
    until the snapshot was copied (encode_parts' caller copies the buffers before the operator runs again)."""

    __slots__ = ("view",)

    def __init__(self, buffer: Any) -> None:
        self.view: Any = buffer if hasattr(buffer, "write_into") else memoryview(buffer).cast("B")

    def __len__(self) -> int:
        return int(self.view.nbytes)


class Incremental:
    """An operator's snapshot that holds only what changed since its snapshot of checkpoint ``parent``;
    ``base`` is the checkpoint of the full snapshot the chain starts from (its files must be kept). The
    runtime resolves the chain when it restores: the operator's ``restore_state`` gets a :class:`Chain`."""

    __slots__ = ("base", "delta", "parent")

    def __init__(self, parent: int, base: int, delta: Any) -> None:
        self.parent, self.base, self.delta = parent, base, delta

    def __repr__(self) -> str:
        return f"Incremental(parent={self.parent}, base={self.base})"


class Chain:
    """What ``restore_state`` gets for an :class:`Incremental` snapshot: the full snapshot the chain starts
    from, and each delta after it, oldest first (decoded; buffers are views of where they were read)."""

    __slots__ = ("base", "deltas")

    def __init__(self, base: Any, deltas: list[Any]) -> None:
        self.base, self.deltas = base, deltas


def encode_parts(value: Any, *, state: str = "?") -> tuple[bytes, list[Any]]:
    """``value`` as a msgpack header and the buffers of its :class:`Raw` items, in order (not copied): each a
    memoryview or a lazy buffer.

    Raises:
        StateSerializationError: as :func:`encode`.
    """
    buffers: list[Any] = []

    def default(obj: Any) -> Any:
        if type(obj) is Raw:
            buffers.append(obj.view)
            return msgpack.ExtType(_RAW, _INDEX.pack(len(buffers) - 1))
        if type(obj) is Incremental:
            return msgpack.ExtType(_INCREMENTAL, msgpack.packb([obj.parent, obj.base, obj.delta], default=default,
                                                               strict_types=True, use_bin_type=True))
        if type(obj) is tuple:
            return msgpack.ExtType(_TUPLE, msgpack.packb(list(obj), default=default, strict_types=True,
                                                         use_bin_type=True))
        return _default(obj)

    return _pack(value, default, state), buffers


def decode_parts(header: bytes | memoryview, buffers: list[memoryview]) -> Any:
    """Inverse of :func:`encode_parts`: each :class:`Raw` comes back as the memoryview ``buffers[i]``.

    Raises:
        StateSerializationError: the header names a buffer that is not there.
    """

    def hook(code: int, data: bytes) -> Any:
        if code == _RAW:
            (index,) = _INDEX.unpack(data)
            if index >= len(buffers):
                msg = f"a snapshot names out-of-band buffer {index}; it has {len(buffers)}"
                raise StateSerializationError(msg)
            return buffers[index]
        if code == _TUPLE:
            return tuple(msgpack.unpackb(data, ext_hook=hook, raw=False, strict_map_key=False))
        if code == _INCREMENTAL:
            parent, base, delta = msgpack.unpackb(data, ext_hook=hook, raw=False, strict_map_key=False)
            return Incremental(parent, base, delta)
        return msgpack.ExtType(code, data)

    return msgpack.unpackb(header, ext_hook=hook, raw=False, strict_map_key=False)


def ext_hook(code: int, data: bytes) -> Any:
    """msgpack's ext_hook that turns ext type 1 back into a tuple."""
    if code == _TUPLE:
        return tuple(msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False))
    return msgpack.ExtType(code, data)


def encode(value: Any, *, state: str = "?") -> bytes:
    """``value`` as bytes.

    Raises:
        StateSerializationError: names the state, the value's type, and what a state may hold.
    """
    return _pack(value, _default, state)


def _pack(value: Any, default: Any, state: str) -> bytes:
    """msgpack of ``value`` with ``default`` for what msgpack does not know; StateSerializationError else."""
    try:
        data: bytes = msgpack.packb(value, default=default, strict_types=True, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        msg = (f"state {state!r} cannot hold a value of type {_type_path(value)}: {exc}; a state holds None, "
               f"bool, int (64-bit), float, str, bytes, and lists, tuples and dicts of them")
        raise StateSerializationError(msg) from exc
    return data


def decode(data: bytes) -> Any:
    """Inverse of :func:`encode`."""
    return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)


def encode_key(key: Any) -> bytes:
    """A key's bytes (the same encoding; a key that cannot be encoded names itself)."""
    return encode(key, state="<key>")


def check_value(value: Any, state: str) -> None:
    """Raise StateSerializationError unless ``value`` can be encoded (scalars pass without encoding)."""
    if type(value) in _SCALARS and not (type(value) is int and not -(1 << 63) <= value < 1 << 64):
        return
    encode(value, state=state)


def _type_path(value: Any) -> str:
    """The type name of ``value``, or of the first item inside it that cannot be stored."""
    bad = _first_bad(value, 0)
    if bad is None or bad is value:
        return type(value).__name__
    return f"{type(value).__name__} (holding a {type(bad).__name__})"


def _first_bad(value: Any, depth: int) -> Any:
    if depth > 100:
        return None
    if type(value) in _SCALARS:
        return None
    if type(value) in (list, tuple):
        for item in value:
            bad = _first_bad(item, depth + 1)
            if bad is not None:
                return bad
        return None
    if type(value) is dict:
        for k, v in value.items():
            for item in (k, v):
                bad = _first_bad(item, depth + 1)
                if bad is not None:
                    return bad
        return None
    return value
