"""How state values and keys become bytes: msgpack that keeps tuples tuples, and a clear error for the rest.

Imports: runtime.errors, msgpack.

Values are None, bool, int (64-bit), float, str, bytes, and lists, tuples and
dicts of them. msgpack turns a tuple into a list; here a tuple travels as ext
type 1 wrapping its items, so a state read gives back exactly what was
written, on either backend.
"""

from __future__ import annotations

from typing import Any

import msgpack

from runtime.errors import StateSerializationError

__all__ = ["check_value", "decode", "encode", "encode_key", "ext_hook"]

_TUPLE = 1
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
    try:
        data: bytes = msgpack.packb(value, default=_default, strict_types=True, use_bin_type=True)
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
