"""The COLUMNAR frame payload: a dict of equal-length numpy arrays, or a structured array, as bytes.

Imports: msgpack, numpy, stdlib. Used by :mod:`runtime.network.serializer`, which frames the payload
(header, alignment, spanning) and documents the wire format::

    u32 hl | msgpack header (hl bytes) | zero pad to 8 | column data, each 8-byte aligned
    header = [1, form, rows, [[name, dtype, shape, offset, nbytes], ...]]

:class:`ColumnarLayout` validates a batch and writes its payload straight from the arrays (one copy
per column); :func:`read_columnar` checks a payload from the wire and returns ``np.frombuffer``
views of it (zero copy). Every inconsistency raises ValueError (the serializer names the frame).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from numpy.lib.format import descr_to_dtype

__all__ = ["COLUMNAR_VERSION", "FORM_DICT", "FORM_STRUCT", "ColumnarLayout", "align8", "read_columnar"]

FORM_DICT, FORM_STRUCT = 0, 1  # the COLUMNAR frame's flags: a dict of columns, a structured array
COLUMNAR_VERSION = 1
_U32 = struct.Struct("<I")
_TYPESTR = re.compile(r"[<>|=][?biufcSUVMm][0-9]{1,9}(\[[0-9]{0,9}[a-zA-Z]{1,3}\])?\Z")
_MAX_DIMS = 32

#: A dtype spec as it travels: a type string, or a structured descr of (name, spec[, shape]) fields.
_Descr = str | list[tuple[str, "_Descr"] | tuple[str, "_Descr", tuple[int, ...]]]


def _dtype_spec(dtype: np.dtype, where: str) -> str | list[tuple[Any, ...]]:
    if dtype.hasobject:
        msg = f"{where}: dtype {dtype} holds Python objects; columnar batches need fixed-size dtypes"
        raise TypeError(msg)
    if dtype.itemsize == 0:
        msg = f"{where}: dtype {dtype} has itemsize 0; columnar batches need sized dtypes"
        raise TypeError(msg)
    if dtype.fields is None:
        return dtype.str
    if any(len(f) > 2 for f in dtype.fields.values()):
        msg = f"{where}: structured dtypes with field titles are not supported; got {dtype}"
        raise TypeError(msg)
    return dtype.descr


@dataclass
class ColumnarLayout:
    """A validated batch laid out for the wire: header bytes, then (array, offset) pairs."""

    form: int
    header: bytes
    data_start: int  # payload offset of the column data (aligned)
    arrays: list[tuple[np.ndarray, int]]  # [(ndarray, offset from data_start)]
    length: int  # payload bytes

    @classmethod
    def prepare(cls, batch: dict[str, np.ndarray] | np.ndarray) -> ColumnarLayout:
        if isinstance(batch, np.ndarray):
            if batch.dtype.names is None or batch.ndim != 1:
                msg = (f"write_batch: an ndarray batch must be a 1-d structured array; got dtype {batch.dtype} "
                       f"with shape {batch.shape}; pass a dict of columns instead")
                raise TypeError(msg)
            form, items, rows = FORM_STRUCT, [("", batch)], len(batch)
        elif isinstance(batch, dict):
            form, items, rows = FORM_DICT, list(batch.items()), None
        else:
            msg = f"write_batch: expected a dict of numpy arrays or a structured array; got {type(batch).__name__}"
            raise TypeError(msg)
        cols, arrays, offset = [], [], 0
        for name, arr in items:
            if not isinstance(name, str):
                msg = f"write_batch: column names must be str; got {name!r}"
                raise TypeError(msg)
            if not isinstance(arr, np.ndarray):
                msg = f"write_batch: column {name!r} must be a numpy array; got {type(arr).__name__}"
                raise TypeError(msg)
            if arr.ndim == 0 or (rows is not None and arr.shape[0] != rows):
                msg = (f"write_batch: columns must have equal lengths; column {name!r} has shape {arr.shape}, "
                       f"expected {rows} rows")
                raise ValueError(msg)
            rows = arr.shape[0]
            spec = _dtype_spec(arr.dtype, f"write_batch: column {name!r}")
            offset = align8(offset)
            cols.append([name, spec, list(arr.shape), offset, arr.nbytes])
            arrays.append((arr, offset))
            offset += arr.nbytes
        header = msgpack.packb([COLUMNAR_VERSION, form, rows or 0, cols], use_bin_type=True)
        data_start = align8(4 + len(header))
        return cls(form, header, data_start, arrays, data_start + offset)

    def write_into(self, buf: memoryview, start: int) -> None:
        """Write the payload at ``buf[start:]``: one C-level copy per column (strided arrays too)."""
        hl = len(self.header)
        _U32.pack_into(buf, start, hl)
        buf[start + 4: start + 4 + hl] = self.header
        buf[start + 4 + hl: start + self.data_start] = bytes(self.data_start - 4 - hl)
        base = start + self.data_start
        end = start + 4 + hl
        for arr, off in self.arrays:
            pos = base + off
            if pos > end:
                buf[end:pos] = bytes(pos - end)  # alignment padding: deterministic bytes on the wire
            if arr.nbytes:
                dst = np.frombuffer(buf, dtype=arr.dtype, count=arr.size, offset=pos).reshape(arr.shape)
                dst[...] = arr
            end = pos + arr.nbytes


def _parse_descr(spec: object, depth: int) -> _Descr:
    """Validate a dtype spec from the wire; return it in the shape ``descr_to_dtype`` takes."""
    if isinstance(spec, str):
        if not _TYPESTR.match(spec):
            msg = f"dtype {spec!r:.60} is not a numpy type string"
            raise ValueError(msg)
        return spec
    if depth >= 4 or not isinstance(spec, list) or not spec or len(spec) > 1024:
        msg = f"dtype {spec!r:.60} is not a type string or a structured descr"
        raise ValueError(msg)
    fields: list[tuple[str, _Descr] | tuple[str, _Descr, tuple[int, ...]]] = []
    for entry in spec:
        if not isinstance(entry, list) or len(entry) not in (2, 3) or not isinstance(entry[0], str):
            msg = f"structured dtype field {entry!r:.60} is not [name, type] or [name, type, shape]"
            raise ValueError(msg)
        sub = _parse_descr(entry[1], depth + 1)
        if len(entry) == 3:
            shape = entry[2]
            if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                    or not all(type(d) is int and 0 <= d < 1 << 31 for d in shape)):
                msg = f"structured dtype field {entry[0]!r} has a bad shape {shape!r:.60}"
                raise ValueError(msg)
            fields.append((entry[0], sub, tuple(shape)))
        else:
            fields.append((entry[0], sub))
    return fields


def _wire_dtype(spec: object) -> np.dtype:
    parsed = _parse_descr(spec, 0)
    try:
        if isinstance(parsed, str):
            dtype = np.dtype(parsed)
        else:
            dtype = descr_to_dtype(parsed)  # type: ignore[arg-type]  # numpy's stub omits nested descrs; numpy takes them
    except Exception as exc:  # noqa: BLE001 - numpy raises TypeError, ValueError, SyntaxError... for odd specs
        msg = f"dtype {spec!r:.60} is not a valid numpy dtype ({exc})"
        raise ValueError(msg) from None
    if dtype.hasobject or dtype.itemsize == 0:
        msg = f"dtype {spec!r:.60} is an object or zero-size dtype"
        raise ValueError(msg)
    return dtype


def read_columnar(form: int, payload: memoryview) -> dict[str, np.ndarray] | np.ndarray:
    """Decode a COLUMNAR payload into views of ``payload`` (raises ValueError on any inconsistency)."""
    length = len(payload)
    if length < 4:
        msg = f"payload of {length} bytes is shorter than its header length field"
        raise ValueError(msg)
    (hl,) = _U32.unpack_from(payload, 0)
    if 4 + hl > length:
        msg = f"header of {hl} bytes overflows the {length}-byte payload"
        raise ValueError(msg)
    # an ext type fails the header checks below
    header = msgpack.unpackb(payload[4: 4 + hl], use_list=True, raw=False, strict_map_key=False)
    if not (type(header) is list and len(header) == 4 and header[0] == COLUMNAR_VERSION
            and header[1] == form and type(header[2]) is int and type(header[3]) is list):
        msg = f"header {header!r:.80} is not [1, {form}, rows, columns]"
        raise ValueError(msg)
    _, _, rows, cols = header
    if rows < 0 or (form == FORM_STRUCT and len(cols) != 1):
        msg = f"header claims {rows} rows and {len(cols)} columns"
        raise ValueError(msg)
    data_start = align8(4 + hl)
    out: dict[str, np.ndarray] = {}
    for col in cols:
        if not (type(col) is list and len(col) == 5 and isinstance(col[0], str) and type(col[2]) is list
                and type(col[3]) is int and type(col[4]) is int):
            msg = f"column entry {col!r:.80} is not [name, dtype, shape, offset, nbytes]"
            raise ValueError(msg)
        name, spec, shape, offset, nbytes = col
        if name in out:
            msg = f"column {name!r} appears twice"
            raise ValueError(msg)
        dtype = _wire_dtype(spec)
        if (not shape or len(shape) > _MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape)
                or shape[0] != rows):
            msg = f"column {name!r} has shape {shape!r:.60}; expected {rows} rows and at most {_MAX_DIMS} dims"
            raise ValueError(msg)
        count = 1
        for d in shape:
            count *= d
        if offset < 0 or nbytes != count * dtype.itemsize or data_start + offset + nbytes > length:
            msg = (f"column {name!r} ({dtype}, shape {tuple(shape)}) claims {nbytes} bytes at data offset {offset}; "
                   f"the shape needs {count * dtype.itemsize} and the payload holds {length - data_start}")
            raise ValueError(msg)
        if form == FORM_STRUCT and (dtype.names is None or len(shape) != 1):
            msg = f"structured batch has dtype {dtype} and shape {tuple(shape)}; expected a 1-d structured dtype"
            raise ValueError(msg)
        out[name] = np.frombuffer(payload, dtype=dtype, count=count, offset=data_start + offset).reshape(shape)
    if form == FORM_STRUCT:
        return next(iter(out.values()))
    return out


# ----------------------------------------------------------------------------- writer


def align8(n: int) -> int:
    """``n`` rounded up to a multiple of 8 (frames and columns start 8-byte aligned)."""
    return (n + 7) & -8
