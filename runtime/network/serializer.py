"""Records, columnar batches and events <-> network buffers, as validated length-prefixed frames.

Imports: runtime.errors, runtime.network.events, runtime.network.columnar (the columnar payload codec);
msgpack, numpy and stdlib otherwise.

Role: the channel layer asks for a buffer, lets a :class:`BufferSerializer`
fill it, sends it, and asks for the next; the receiving side hands every
buffer to a :class:`BufferDeserializer`, which yields what was written, in
order. A frame that does not fit the space left spans the next buffer(s)
[Flink ``SpanningRecordSerializer`` / ``SpillingAdaptiveSpanningRecordDeserializer``].
Buffers are anything with the buffer protocol: ``MemorySegment.view()``
memoryviews, bytearrays, zmq frames.

Wire format (version 2; all integers little-endian)
---------------------------------------------------
A buffer holds frames; each frame starts at an 8-byte aligned offset (the
writer zeroes the up-to-7 padding bytes before it) with an 8-byte header::

    0  u8   kind      1 RECORDS, 2 COLUMNAR, 3 EVENT, 4 CONTINUATION (0, 5..255 invalid)
    1  u8   flags     RECORDS: array encoding 0 TUPLES | 1 LISTS | 2 MARKED;
                      COLUMNAR: 0 dict of columns | 1 structured array; EVENT, CONTINUATION: 0
    2  u8   magic     0xF7
    3  u8   version   2 (1 wrapped MARKED tuples in nested ext payloads)
    4  u32  length    payload bytes of the frame (CONTINUATION: payload bytes still to come)

followed by ``length`` payload bytes. If the payload is longer than the rest
of the buffer, the frame fills the buffer to its end and *spans*: the next
buffer of the channel starts (offset 0) with a CONTINUATION header whose length
is the number of payload bytes still missing, followed by as many of them as
fit, and so on. A buffer's filled size (``nbytes``) ends after its last frame.

RECORDS payload: one msgpack array of the batch's records (``write_records``
packs the whole list with one msgpack call). msgpack has one array type, so
the flags say how arrays decode: TUPLES - no list anywhere below the top
level, every array is a tuple (``use_list=False``, all in C); LISTS - no tuple
anywhere, every array is a list; MARKED - both occur: lists are plain arrays,
a tuple is an array whose first item is the empty ext type 1 (the mark),
followed by its items. The reader decodes a MARKED frame with one ``unpackb``
call too, whose ``list_hook`` turns marked arrays into tuples bottom-up (a
Python call per array, never a nested unpack: the C stack does not grow with
the nesting). So nested lists and tuples round-trip exactly; ints must fit 64
bits (signed or unsigned); bytes-likes come back as ``bytes``.

Nesting: a record (or a user event's payload) nests at most ``MAX_NESTING``
(1,023) lists, tuples and dicts, the record itself counting as one: the frame's
array of records makes 1,024, msgpack's own limit for packing and unpacking
(pinned by tests/test_serializer.py). The writer refuses a deeper record with
:class:`~runtime.errors.NestingTooDeepError` before writing anything; the reader
refuses a deeper frame with :class:`DeserializationError`. Neither recurses on
the C stack per level, so no depth can crash a process.

COLUMNAR payload (a dict of equal-length numpy arrays, or a structured array)::

    u32 hl | msgpack header (hl bytes) | zero pad to 8 | column data, each 8-byte aligned
    header = [1, form, rows, [[name, dtype, shape, offset, nbytes], ...]]

``dtype`` is ``dtype.str`` (e.g. ``"<i8"``) or, for structured dtypes,
``dtype.descr``; ``offset`` counts from the aligned end of the header. The
reader returns ``np.frombuffer`` views *of the buffer itself* (zero copy) when
the frame lies within one buffer: they are valid only while that buffer is.
The writer starts a columnar frame that does not fit the space left in a
non-empty buffer in the next buffer instead, so a batch up to a buffer's size
stays zero-copy; a larger batch spans, and the reader reassembles it by copying
(its arrays are then views of a private copy).

EVENT payload: msgpack ``[code, *args]``: ``[0]`` EndOfPartition, ``[1, ts]``
Watermark, ``[2, payload]`` UserEvent (payload in MARKED encoding), ``[3, id,
timestamp]`` CheckpointBarrier; codes 4..15 are reserved.

Public API
----------
``BufferSerializer(max_record_size=)``: ``set_buffer(buf)``, ``write_records(list)``,
``write_record(rec)``, ``write_batch(columns)``, ``write_event(ev)`` and
``continue_into(next_buf)``, each returning a :class:`SerializationResult`;
``position`` (bytes filled: the buffer's size to send), ``has_pending``.
``BufferDeserializer(channel=, max_record_size=)``: ``feed(buf, nbytes) -> list`` of
batches (``list`` of records; ``dict`` of arrays or structured array) and events;
``finish()`` checks that no frame was left half-received.
``pack_to_buffers`` / ``iter_records``: the channel loop in miniature (tests, benchmarks).
Every malformed input raises :class:`DeserializationError` naming channel, buffer and offset.
"""

from __future__ import annotations

import enum
import operator
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast, overload

import msgpack
import numpy as np

from runtime.errors import DeserializationError, NestingTooDeepError, RecordTooLargeError
from runtime.network.columnar import FORM_DICT, FORM_STRUCT, ColumnarLayout, read_columnar
from runtime.network.columnar import align8 as _align
from runtime.network.events import EVENT_TYPES, CheckpointBarrier, EndOfPartition, Event, UserEvent, Watermark

if TYPE_CHECKING:  # pragma: no cover
    import numpy.typing as npt
    from typing_extensions import Buffer

__all__ = [
    "DEFAULT_MAX_RECORD_SIZE",
    "HEADER_SIZE",
    "MAX_NESTING",
    "BufferDeserializer",
    "BufferSerializer",
    "DeserializerStats",
    "Item",
    "SerializationResult",
    "SerializerStats",
    "iter_records",
    "pack_to_buffers",
]

#: What a channel carries and ``BufferSerializer.write`` takes: a record batch (a list, also a
#: TimestampedBatch), a columnar batch (a dict of arrays or a structured array), or an event.
Item = list[Any] | dict[str, np.ndarray] | np.ndarray | Event
_B = TypeVar("_B", bound="Buffer")

# ----------------------------------------------------------------------------- wire constants
MAGIC = 0xF7
VERSION = 2
_HEADER = struct.Struct("<BBBBI")
HEADER_SIZE = _HEADER.size  # 8
#: a frame starts only where its header and at least 8 payload bytes fit; else the buffer is full
MIN_FRAME_ROOM = HEADER_SIZE + 8
#: network.max-record-size: the largest frame payload a reader accepts (and a writer produces)
DEFAULT_MAX_RECORD_SIZE = 64 << 20
_MAX_LENGTH = 0xFFFFFFFF

KIND_RECORDS, KIND_COLUMNAR, KIND_EVENT, KIND_CONTINUATION = 1, 2, 3, 4
_KIND_NAMES = {KIND_RECORDS: "records", KIND_COLUMNAR: "columnar", KIND_EVENT: "event",
               KIND_CONTINUATION: "continuation"}
MODE_TUPLES, MODE_LISTS, MODE_MARKED = 0, 1, 2  # RECORDS flags
_VALID_FLAGS = {KIND_RECORDS: (MODE_TUPLES, MODE_LISTS, MODE_MARKED), KIND_COLUMNAR: (FORM_DICT, FORM_STRUCT),
                KIND_EVENT: (0,)}
EVENT_END_OF_PARTITION, EVENT_WATERMARK, EVENT_USER, EVENT_BARRIER = 0, 1, 2, 3
EXT_TUPLE = 1
#: The deepest a record (or a user event's payload) may nest lists, tuples and dicts, itself counting as one.
#: The frame's array of records adds one level: 1,024 is msgpack's limit for packing and for unpacking
#: (its unpacker's stack), so the reader refuses deeper frames for free. Python code cannot walk records
#: much deeper anyway (its recursion limit is 1,000). tests/test_serializer.py pins msgpack's limits.
MAX_NESTING = 1023
_NESTING_RULE = (f"records (and event payloads) may nest at most {MAX_NESTING} lists, tuples and dicts "
                 f"(serializer.MAX_NESTING)")


class SerializationResult(enum.Enum):
    """What a ``write_*`` call achieved [Flink ``RecordSerializer.SerializationResult``].

    FULL_RECORD: written completely; the buffer has room for more.
    FULL_RECORD_BUFFER_FULL: written completely; the buffer is full: send it.
    PARTIAL_RECORD_BUFFER_FULL: the buffer is full and part (or all) of the
    item is pending: send the buffer, then ``continue_into(next_buffer)``
    until the result is a full record.
    """

    FULL_RECORD = (True, False)
    FULL_RECORD_BUFFER_FULL = (True, True)
    PARTIAL_RECORD_BUFFER_FULL = (False, True)

    @property
    def is_full_record(self) -> bool:
        return self.value[0]

    @property
    def is_full_buffer(self) -> bool:
        return self.value[1]


FULL_RECORD = SerializationResult.FULL_RECORD
FULL_RECORD_BUFFER_FULL = SerializationResult.FULL_RECORD_BUFFER_FULL
PARTIAL_RECORD_BUFFER_FULL = SerializationResult.PARTIAL_RECORD_BUFFER_FULL


@dataclass(frozen=True)
class SerializerStats:
    frames: int
    records: int
    batches: int
    events: int
    spanned_frames: int
    bytes_written: int


@dataclass(frozen=True)
class DeserializerStats:
    buffers: int
    frames: int
    records: int
    spanned_frames: int
    bytes_copied: int  # reassembly of spanning frames


# ----------------------------------------------------------------------------- record encoding
_SCALARS = frozenset({int, float, str, bytes, bool, type(None), bytearray, memoryview})


def _children(level: list[Any], types: set[type]) -> tuple[Iterator[Any], bool, bool]:
    """An iterator over the elements one level below ``level``, and whether tuples / lists occur in it."""
    mixed = len(types) > 1
    groups: list[Iterator[Any]] = []
    has_tuple = has_list = False
    for t in types - _SCALARS:
        members: list[Any] = [x for x in level if type(x) is t] if mixed else level
        if issubclass(t, tuple):
            has_tuple = True
            groups.append(chain.from_iterable(members))
        elif issubclass(t, list):
            has_list = True
            groups.append(chain.from_iterable(members))
        elif issubclass(t, dict):
            groups.append(chain.from_iterable(map(dict.keys, members)))
            groups.append(chain.from_iterable(map(dict.values, members)))
        # anything else: a scalar subclass (packs natively) or unpackable (the packer says so)
    return chain.from_iterable(groups), has_tuple, has_list


def _array_mode(records: list[Any], max_elements: int) -> int:
    """MODE_TUPLES if no list occurs below the top level, MODE_LISTS if no tuple does, else MODE_MARKED.

    A level-by-level scan of element types with C-level ``map``/``set``/``chain``:
    a few calls per nesting level, not per element; a level of scalars is never
    materialised. ``max_elements`` bounds the work on shared or cyclic
    structures (every element packs to at least one byte).

    Raises:
        NestingTooDeepError: a record nests deeper than ``MAX_NESTING`` (or is cyclic).
        RecordTooLargeError: more elements than ``max_elements``.
    """
    level: list[Any] = records
    types = set(map(type, level))
    seen_tuple = seen_list = False
    total = 0
    for depth in range(MAX_NESTING + 1):  # depth: the nesting of the containers in ``level``
        if types <= _SCALARS:
            break
        if depth == MAX_NESTING:
            msg = f"cannot serialize: a record nests deeper than {MAX_NESTING} levels (or is cyclic); {_NESTING_RULE}"
            raise NestingTooDeepError(msg)
        children, has_tuple, has_list = _children(level, types)
        seen_tuple |= has_tuple
        seen_list |= has_list
        child_types = set(map(type, children))
        if child_types <= _SCALARS:
            break
        level = list(_children(level, types)[0])
        types = child_types
        total += len(level)
        if total > max_elements:
            msg = (f"record batch has more than {max_elements} elements, so it exceeds the record size limit "
                   f"of {max_elements} bytes (network.max-record-size); write smaller batches")
            raise RecordTooLargeError(msg)
    if seen_tuple and seen_list:
        return MODE_MARKED
    return MODE_LISTS if seen_list else MODE_TUPLES


#: The mark that makes an array a tuple in MARKED frames: the empty ext type 1 (3 bytes on the wire).
_TUPLE_MARK = msgpack.ExtType(EXT_TUPLE, b"")


_MARK_BASES: tuple[type, ...] = (list, dict, str, bytes, float)


def _mark(obj: Any) -> Any:
    """``default`` of the MARKED packer (strict types): a tuple becomes ``[mark, *items]``; subclasses their base.

    The packer packs what this returns in place, at the same nesting level: no nested ``packb``.
    """
    if isinstance(obj, tuple):
        return [_TUPLE_MARK, *obj]
    for base in _MARK_BASES:
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, int) and not isinstance(obj, bool):
        return int(obj)
    msg = f"can not serialize {type(obj).__name__!r} object"
    raise TypeError(msg)


class _Mark:
    """What the reader's ``ext_hook`` returns for the tuple mark (one instance: compared by identity)."""

    __slots__ = ()


_MARK = _Mark()


def _unmark_ext(code: int, data: bytes) -> _Mark:
    """``ext_hook`` of MARKED frames: the tuple mark is the only ext type they hold."""
    if code != EXT_TUPLE or data:
        msg = f"unknown msgpack ext type {code} ({len(data)} bytes); MARKED frames hold only the tuple mark"
        raise ValueError(msg)
    return _MARK


def _unmark_list(items: list[Any]) -> Any:
    """``list_hook`` of MARKED frames, called bottom-up by msgpack's (iterative) unpacker: a marked
    array becomes a tuple of its items. See ``_mark``; keep the two in step."""
    if items and items[0] is _MARK:
        return tuple(items[1:])
    return items


def _unpack_marked(payload: Any) -> Any:
    return msgpack.unpackb(payload, use_list=True, raw=False, strict_map_key=False, ext_hook=_unmark_ext,
                           list_hook=_unmark_list)


def _no_ext(code: int, data: bytes) -> NoReturn:
    msg = f"unexpected msgpack ext type {code} in a frame without marked tuples"
    raise ValueError(msg)


_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_SUPPORTED = "None, bool, int, float, str, bytes, list, tuple or dict"


def _find_unpackable(record: Any, path: str) -> tuple[type[Exception], str] | None:
    """Slow path after a failed pack: the first value msgpack cannot take, with its path.

    Depth first with an explicit stack (a record may nest ``MAX_NESTING`` levels: more than
    Python's recursion limit)."""
    stack: list[tuple[Any, str, int]] = [(record, path, 1)]
    while stack:
        obj, where, depth = stack.pop()
        if isinstance(obj, bool) or obj is None or isinstance(obj, (float, str, bytes, bytearray, memoryview)):
            continue
        if isinstance(obj, int):
            if not _INT_MIN <= obj <= _INT_MAX:
                return ValueError, (f"int {obj} at {where} is outside the 64-bit range [-2**63, 2**64 - 1]; "
                                    f"send it as a str")
            continue
        if isinstance(obj, (list, tuple, dict)) and depth > MAX_NESTING:
            return NestingTooDeepError, f"nesting deeper than {MAX_NESTING} levels at {where:.200}; {_NESTING_RULE}"
        if isinstance(obj, (list, tuple)):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in reversed(list(enumerate(obj))))
            continue
        if isinstance(obj, dict):
            for key, value in reversed(list(obj.items())):
                stack.append((value, f"{where}[{key!r}]", depth + 1))
                stack.append((key, f"{where} key {key!r}", depth + 1))
            continue
        return TypeError, f"{type(obj).__name__} {obj!r:.60} at {where} is not serializable; records hold {_SUPPORTED}"
    return None


def _pack_error(records: Sequence[Any], exc: Exception) -> Exception:
    for i, rec in enumerate(records):
        found = _find_unpackable(rec, f"record {i}")
        if found:
            cls, text = found
            return cls(f"cannot serialize: {text}")
    cls = TypeError if isinstance(exc, TypeError) else ValueError
    return cls(f"cannot serialize records: {exc}")


class _Pending:
    """The part of an item that did not fit the last buffer."""

    __slots__ = ("kind", "flags", "data", "offset", "batch")

    def __init__(self, kind: int, flags: int, data: bytes | memoryview | None, offset: int,
                 batch: ColumnarLayout | None = None) -> None:
        self.kind = kind
        self.flags = flags
        self.data = data  # the whole payload (bytes-like), or None for a deferred columnar batch
        self.offset = offset  # payload bytes already written; 0: the frame has not started
        self.batch = batch


class BufferSerializer:
    """Writes frames into the current target buffer; a frame that does not fit spans the next ones.

    The channel loop (``pack_to_buffers`` runs it on bytearrays)::

        ser.set_buffer(buf.segment.view())
        for batch in batches:
            result = ser.write_records(batch)
            while result.is_full_buffer:
                buf.size = ser.position; send(buf); buf = request()
                if result.is_full_record:
                    ser.set_buffer(buf.segment.view()); break
                result = ser.continue_into(buf.segment.view())

    i.e. after a ``*_BUFFER_FULL`` result send the buffer (filled size
    ``position``); after ``PARTIAL_RECORD_BUFFER_FULL`` call
    ``continue_into(next)`` until the result is a full record. Nothing else may
    be written while a remainder is pending. A call that raises (bad record,
    oversize) writes nothing.

    Ownership: borrows the target buffer from ``set_buffer``/``continue_into``
    until the next such call; the caller keeps owning it. Columnar arrays of a
    pending batch must not change until the batch is fully written.
    Process: the producing worker. Not thread-safe.
    """

    def __init__(self, *, max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> None:
        if not 0 < max_record_size <= _MAX_LENGTH:
            msg = (f"max_record_size must be in [1, {_MAX_LENGTH}] bytes (network.max-record-size); got "
                   f"{max_record_size}")
            raise ValueError(msg)
        self.max_record_size = max_record_size
        self._buf: memoryview | None = None  # the current target; owner: this serializer's caller
        self._cap = 0
        self._pos = 0
        self._pending: _Pending | None = None
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=False)
        self._marked_packer = msgpack.Packer(use_bin_type=True, autoreset=False, strict_types=True, default=_mark)
        self._frames = self._records = self._batches = self._events = self._spans = self._bytes = 0

    # ----------------------------------------------------------------- target buffer
    def set_buffer(self, buffer: Buffer) -> None:
        """Make ``buffer`` (writable, >= 16 bytes, buffer protocol) the target, filled from offset 0.

        Raises:
            RuntimeError: a spanning remainder is pending (use ``continue_into``).
            TypeError: ``buffer`` is read-only or not a buffer.
            ValueError: ``buffer`` is shorter than 16 bytes.
        """
        if self._pending is not None:
            msg = "set_buffer: a spanning frame is pending; call continue_into(next_buffer) to finish it"
            raise RuntimeError(msg)
        self._target(buffer)

    def _target(self, buffer: Buffer) -> None:
        mv = memoryview(buffer)
        if mv.readonly:
            msg = "target buffer is read-only; serialize into a buffer requested from the pool"
            raise TypeError(msg)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if len(mv) < MIN_FRAME_ROOM:
            msg = f"target buffer must hold at least {MIN_FRAME_ROOM} bytes; got {len(mv)}"
            raise ValueError(msg)
        self._buf, self._cap, self._pos = mv, len(mv), 0

    def continue_into(self, buffer: Buffer) -> SerializationResult:
        """Make ``buffer`` the target and write what is pending into it (if anything)."""
        self._target(buffer)
        pend = self._pending
        if pend is None:
            return FULL_RECORD
        if pend.batch is not None:  # a deferred columnar batch: try it whole first
            self._pending = None
            return self._write_columnar(pend.batch)
        # Without a columnar batch, data holds the payload (see _Pending).
        data = cast("bytes | memoryview", pend.data)
        if pend.offset == 0:  # the header did not fit the last buffer
            self._pending = None
            return self._write_frame(pend.kind, pend.flags, data)
        buf, off = cast(memoryview, self._buf), pend.offset  # set by _target above
        left = len(data) - off
        _HEADER.pack_into(buf, 0, KIND_CONTINUATION, 0, MAGIC, VERSION, left)
        n = min(left, self._cap - HEADER_SIZE)
        buf[HEADER_SIZE: HEADER_SIZE + n] = data[off: off + n]
        self._pos = HEADER_SIZE + n
        self._bytes += HEADER_SIZE + n
        if n < left:
            pend.offset = off + n
            return PARTIAL_RECORD_BUFFER_FULL
        self._pending = None
        return self._status()

    # ----------------------------------------------------------------- state
    @property
    def position(self) -> int:
        """Bytes filled in the current buffer: the size to send it with."""
        return self._pos

    @property
    def has_pending(self) -> bool:
        """True while part of an item waits for ``continue_into``."""
        return self._pending is not None

    def remaining(self) -> int:
        """Payload bytes a frame started now could put in this buffer (0 when it is full)."""
        room = self._cap - _align(self._pos)
        return room - HEADER_SIZE if room >= MIN_FRAME_ROOM else 0

    def clear(self) -> None:
        """Drop any pending remainder and forget the target (after a failed send, on cancel)."""
        self._pending, self._buf, self._cap, self._pos = None, None, 0, 0

    def statistics(self) -> SerializerStats:
        return SerializerStats(self._frames, self._records, self._batches, self._events, self._spans, self._bytes)

    def _status(self) -> SerializationResult:
        return FULL_RECORD_BUFFER_FULL if _align(self._pos) + MIN_FRAME_ROOM > self._cap else FULL_RECORD

    def _check_ready(self, what: str) -> None:
        if self._pending is not None:
            msg = f"{what}: a spanning frame is pending; call continue_into(next_buffer) first"
            raise RuntimeError(msg)
        if self._buf is None:
            msg = f"{what}: no target buffer; call set_buffer(buffer) first"
            raise RuntimeError(msg)

    # ----------------------------------------------------------------- writing
    def write_records(self, records: Sequence[Any]) -> SerializationResult:
        """Write a batch of records as one RECORDS frame, packed with one msgpack call.

        An empty batch writes nothing. Records are None, bool, int (64-bit), float,
        str, bytes, list, tuple and dict, nested freely.

        Raises:
            TypeError: a value msgpack cannot pack (names the record and the value).
            ValueError: an int outside 64 bits, or a batch over ``max_record_size``.
            RuntimeError: a remainder is pending, or no buffer was set.
        """
        self._check_ready("write_records")
        if type(records) is not list:
            records = list(records)
        if not records:
            return self._status()
        mode = _array_mode(records, self.max_record_size)  # raises NestingTooDeepError past MAX_NESTING
        packer = self._marked_packer if mode == MODE_MARKED else self._packer
        try:
            packer.pack(records)
        except Exception as exc:  # noqa: BLE001 - msgpack: TypeError (type), OverflowError (int), ValueError (depth)
            packer.reset()
            raise _pack_error(records, exc) from None
        payload = packer.getbuffer()
        try:
            result = self._write_frame(KIND_RECORDS, mode, payload)
        finally:
            payload.release()
            packer.reset()
        self._records += len(records)
        return result

    def write(self, item: Item) -> SerializationResult:
        """Write what a channel carries: a ``list`` (a record batch: :meth:`write_records`), an event
        (:meth:`write_event`) or a columnar batch (:meth:`write_batch`). Raises as those do."""
        if isinstance(item, list):
            return self.write_records(item)
        if isinstance(item, EVENT_TYPES):
            return self.write_event(item)
        return self.write_batch(item)

    def write_record(self, record: Any) -> SerializationResult:
        """Write one record (a batch of one: prefer ``write_records`` for throughput)."""
        return self.write_records([record])

    def write_event(self, event: Event) -> SerializationResult:
        """Write an in-band event (EndOfPartition, Watermark, UserEvent) as an EVENT frame."""
        self._check_ready("write_event")
        if isinstance(event, EndOfPartition):
            body: list[Any] = [EVENT_END_OF_PARTITION]
        elif isinstance(event, Watermark):
            ts = event.timestamp
            if isinstance(ts, bool) or not isinstance(ts, (int, float)):
                msg = f"Watermark.timestamp must be an int or float; got {type(ts).__name__}"
                raise TypeError(msg)
            body = [EVENT_WATERMARK, ts]
        elif isinstance(event, UserEvent):
            body = [EVENT_USER, event.payload]
        elif isinstance(event, CheckpointBarrier):
            cid, ts = event.checkpoint_id, event.timestamp
            bad_ts = isinstance(ts, bool) or not isinstance(ts, (int, float))
            if type(cid) is not int or not 0 < cid < 1 << 63 or bad_ts:
                msg = f"CheckpointBarrier needs an int id in [1, 2**63) and a number timestamp; got {event!r}"
                raise TypeError(msg)
            body = [EVENT_BARRIER, cid, float(ts)]
        else:
            msg = (f"write_event: expected EndOfPartition, Watermark, UserEvent or CheckpointBarrier; "
                   f"got {type(event).__name__}")
            raise TypeError(msg)
        try:
            data = msgpack.packb(body, use_bin_type=True, strict_types=True, default=_mark)
        except Exception as exc:  # noqa: BLE001 - msgpack raises several types; re-raised typed
            raise _pack_error([body[-1]], exc) from None
        self._events += 1
        return self._write_frame(KIND_EVENT, 0, data)

    def write_batch(self, columns: dict[str, np.ndarray] | np.ndarray) -> SerializationResult:
        """Write a columnar batch (dict of equal-length numpy arrays, or a 1-d structured array).

        The arrays are copied straight into the buffer (no intermediate bytes)
        when the frame fits; a frame that does not fit the space left but fits
        an empty buffer waits for the next buffer (PARTIAL_RECORD_BUFFER_FULL
        with nothing written), so that the reader can return zero-copy views.

        Raises:
            TypeError: not a dict of arrays / structured array, non-str names, object dtypes.
            ValueError: columns of unequal length, or a frame over ``max_record_size``.
        """
        self._check_ready("write_batch")
        layout = ColumnarLayout.prepare(columns)
        if layout.length > self.max_record_size:
            msg = (f"columnar batch of {layout.length} bytes exceeds the record size limit of "
                   f"{self.max_record_size} bytes (network.max-record-size); write smaller batches")
            raise RecordTooLargeError(msg)
        self._batches += 1
        return self._write_columnar(layout)

    def _write_columnar(self, layout: ColumnarLayout) -> SerializationResult:
        p = _align(self._pos)
        n = layout.length
        if p + HEADER_SIZE + n <= self._cap:
            buf = cast(memoryview, self._buf)  # _check_ready or _target set it
            buf[self._pos: p] = bytes(p - self._pos)
            _HEADER.pack_into(buf, p, KIND_COLUMNAR, layout.form, MAGIC, VERSION, n)
            layout.write_into(buf, p + HEADER_SIZE)
            self._pos = p + HEADER_SIZE + n
            self._frames += 1
            self._bytes += HEADER_SIZE + n
            return self._status()
        if self._pos > 0 and HEADER_SIZE + n <= self._cap:
            self._pending = _Pending(KIND_COLUMNAR, layout.form, None, 0, layout)
            return PARTIAL_RECORD_BUFFER_FULL
        data = np.empty(n, dtype=np.uint8)  # larger than a buffer: it spans, so materialise once
        layout.write_into(data.data, 0)
        return self._write_frame(KIND_COLUMNAR, layout.form, data.data, owned=True)

    def _write_frame(self, kind: int, flags: int, payload: bytes | memoryview, *,
                     owned: bool = False) -> SerializationResult:
        """Write header + payload at the next aligned offset; keep what does not fit as pending.

        ``owned``: the payload is the serializer's own copy, so what does not fit is kept without
        copying it again (a caller's bytes-like is copied: the caller may reuse it)."""
        n = len(payload)
        if n > self.max_record_size:
            msg = (f"{_KIND_NAMES[kind]} frame of {n} bytes exceeds the record size limit of "
                   f"{self.max_record_size} bytes (network.max-record-size); write smaller batches")
            raise RecordTooLargeError(msg)
        buf, pos = cast(memoryview, self._buf), self._pos  # _check_ready or _target set it
        p = _align(pos)
        if p + MIN_FRAME_ROOM > self._cap:  # not even a header and 8 bytes: all of it waits
            self._pending = _Pending(kind, flags, payload if owned else bytes(payload), 0)
            return PARTIAL_RECORD_BUFFER_FULL
        if p > pos:
            buf[pos:p] = bytes(p - pos)
        _HEADER.pack_into(buf, p, kind, flags, MAGIC, VERSION, n)
        start = p + HEADER_SIZE
        room = self._cap - start
        self._frames += 1
        if n <= room:
            buf[start: start + n] = payload
            self._pos = start + n
            self._bytes += start + n - pos
            return self._status()
        buf[start:] = payload[:room]
        self._pos = self._cap
        self._bytes += self._cap - pos
        self._spans += 1
        self._pending = _Pending(kind, flags, payload if owned else memoryview(bytes(payload)), room)
        return PARTIAL_RECORD_BUFFER_FULL


# ----------------------------------------------------------------------------- reader
class BufferDeserializer:
    """Turns the buffers of one channel back into batches and events, validating every frame.

    ``feed`` returns, in order, one item per frame: a ``list`` of records, a
    ``dict`` of numpy arrays or a structured array (zero-copy views of the
    buffer, unless the frame spanned), or an event object. A frame that spans
    buffers is reassembled in a private buffer of at most ``max_record_size``
    bytes. Any malformed input raises :class:`DeserializationError` naming
    the channel, the buffer (count of buffers fed before it) and the offset; the
    work per buffer is bounded by its size.

    Ownership: ``feed`` borrows the buffer for the call only, except that
    columnar views returned for an unspanned frame point into it: copy them,
    or drop them, before the buffer is released/recycled.
    Process: the consuming worker. Not thread-safe.
    """

    def __init__(self, channel: str = "?", *, max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> None:
        if not 0 < max_record_size <= _MAX_LENGTH:
            msg = (f"max_record_size must be in [1, {_MAX_LENGTH}] bytes (network.max-record-size); got "
                   f"{max_record_size}")
            raise ValueError(msg)
        self.channel = channel
        self.max_record_size = max_record_size
        self._nbuf = 0  # index of the buffer being fed
        self._span: npt.NDArray[np.uint8] | None = None  # reassembly of a spanning frame
        self._span_filled = 0
        self._span_kind = self._span_flags = 0
        self._span_where = ""
        self._frames = self._records = self._spans = self._copied = 0

    # ----------------------------------------------------------------- errors
    def _error(self, offset: int, what: str, text: str, buffer: int | None = None) -> DeserializationError:
        b = self._nbuf if buffer is None else buffer
        return DeserializationError(f"channel {self.channel!r}: {what} at offset {offset} of buffer {b} {text}")

    @property
    def pending_bytes(self) -> int:
        """Bytes still missing from a frame that spans into buffers not yet fed (0 if none)."""
        return 0 if self._span is None else len(self._span) - self._span_filled

    def finish(self) -> None:
        """Check the end of the channel's input: raises DeserializationError if a frame is incomplete."""
        if self._span is not None:
            msg = (f"channel {self.channel!r}: input ended inside the {_KIND_NAMES[self._span_kind]} frame "
                   f"{self._span_where}: {self.pending_bytes} of {len(self._span)} bytes never arrived")
            self._span = None
            raise DeserializationError(msg)

    def statistics(self) -> DeserializerStats:
        return DeserializerStats(self._nbuf, self._frames, self._records, self._spans, self._copied)

    # ----------------------------------------------------------------- reading
    def feed(self, buffer: Buffer, nbytes: int | None = None) -> list[Any]:
        """Decode the first ``nbytes`` (default: all) bytes of the channel's next buffer.

        Returns the items of every frame that ends in this buffer, in order.
        Raises:
            DeserializationError: a corrupt, truncated or oversize frame (the
                deserializer is then in an undefined state: fail the channel).
        """
        try:
            view = memoryview(buffer)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
        except (TypeError, ValueError) as exc:
            msg = f"channel {self.channel!r}: buffer {self._nbuf} is not a contiguous byte buffer ({exc})"
            raise DeserializationError(msg) from None
        try:
            n = len(view) if nbytes is None else operator.index(nbytes)
        except TypeError:
            n = -1
        if not 0 <= n <= len(view):
            msg = (f"channel {self.channel!r}: buffer {self._nbuf} of {len(view)} bytes announces {n!r} filled "
                   f"bytes; expected 0..{len(view)}")
            raise DeserializationError(msg)
        out: list[Any] = []
        pos = 0
        if self._span is not None:
            pos = self._continue_span(view, n, out)
        unpack = _HEADER.unpack_from
        limit = self.max_record_size
        while pos < n:
            p = (pos + 7) & -8
            if p >= n:
                if any(view[pos:n]):
                    raise self._error(pos, "padding", f"holds non-zero bytes after the last frame ({n - pos} bytes)")
                break
            if n - p < HEADER_SIZE:
                raise self._error(p, "frame", f"is truncated: {n - p} bytes left for an {HEADER_SIZE}-byte header")
            kind, flags, magic, version, length = unpack(view, p)
            if magic != MAGIC or version != VERSION:
                raise self._error(p, "frame", f"has magic 0x{magic:02x} version {version}; expected "
                                  f"0x{MAGIC:02x} version {VERSION} (corrupt data or a misaligned frame)")
            valid = _VALID_FLAGS.get(kind)
            if valid is None:
                what = ("a continuation without a spanning frame before it" if kind == KIND_CONTINUATION
                        else f"unknown kind {kind}")
                raise self._error(p, "frame", f"is {what}")
            if flags not in valid:
                raise self._error(p, "frame", f"of kind {_KIND_NAMES[kind]} has invalid flags {flags}")
            if length > limit:
                raise self._error(p, "frame", f"claims {length} bytes, limit {limit} (network.max-record-size)")
            start = p + HEADER_SIZE
            end = start + length
            if end > n:  # spans into the next buffer(s)
                self._span = np.empty(length, dtype=np.uint8)
                have = n - start
                self._span[:have] = view[start:n]
                self._span_filled = have
                self._span_kind, self._span_flags = kind, flags
                self._span_where = f"at offset {p} of buffer {self._nbuf}"
                self._copied += have
                break
            out.append(self._decode(kind, flags, view[start:end], p, self._nbuf))
            pos = end
        self._nbuf += 1
        return out

    def _continue_span(self, view: memoryview, n: int, out: list[Any]) -> int:
        span = cast("npt.NDArray[np.uint8]", self._span)  # feed calls this only while a frame spans
        total = len(span)
        missing = total - self._span_filled
        where = (f"(continuing the {_KIND_NAMES[self._span_kind]} frame {self._span_where}, {missing} of {total} bytes "
                 "missing)")
        if n < HEADER_SIZE:
            raise self._error(0, "continuation", f"is truncated: buffer holds {n} bytes {where}")
        kind, flags, magic, version, length = _HEADER.unpack_from(view, 0)
        if magic != MAGIC or version != VERSION or kind != KIND_CONTINUATION or flags != 0:
            raise self._error(0, "frame", f"has kind {kind} flags {flags} magic 0x{magic:02x} version {version}; "
                              f"expected a continuation {where}")
        if length != missing:
            raise self._error(0, "continuation", f"claims {length} bytes {where}")
        take = min(missing, n - HEADER_SIZE)
        filled = self._span_filled
        span[filled: filled + take] = view[HEADER_SIZE: HEADER_SIZE + take]
        self._copied += take
        self._span_filled = filled + take
        if self._span_filled < total:  # the continuation filled this whole buffer
            return n
        self._span = None
        self._spans += 1
        origin = self._span_where
        try:
            out.append(self._decode(self._span_kind, self._span_flags, span.data, 0, self._nbuf, origin))
        finally:
            self._span = None
        return HEADER_SIZE + take

    def _decode(self, kind: int, flags: int, payload: memoryview, offset: int, nbuf: int,
                origin: str | None = None) -> Any:
        self._frames += 1
        try:
            if kind == KIND_RECORDS:
                if flags == MODE_TUPLES:
                    obj = msgpack.unpackb(payload, use_list=False, raw=False, strict_map_key=False, ext_hook=_no_ext)
                    if type(obj) is not tuple:
                        msg = f"payload is a {type(obj).__name__}, not an array of records"
                        raise ValueError(msg)
                    records = list(obj)
                else:
                    if flags == MODE_MARKED:
                        obj = _unpack_marked(payload)
                    else:
                        obj = msgpack.unpackb(payload, use_list=True, raw=False, strict_map_key=False,
                                              ext_hook=_no_ext)
                    if type(obj) is not list:
                        msg = f"payload is a {type(obj).__name__}, not an array of records"
                        raise ValueError(msg)
                    records = obj
                self._records += len(records)
                return records
            if kind == KIND_COLUMNAR:
                return read_columnar(flags, payload)
            return _read_event(payload)
        except msgpack.StackError:  # msgpack's unpacker stops at 1,024 nested containers
            where = origin or f"at offset {offset} of buffer {nbuf}"
            msg = (f"channel {self.channel!r}: {_KIND_NAMES[kind]} frame {where} nests deeper than msgpack's 1024 "
                   f"levels; {_NESTING_RULE}")
            raise DeserializationError(msg) from None
        except Exception as exc:  # noqa: BLE001 - msgpack/numpy raise many types on garbage; report them all alike
            where = origin or f"at offset {offset} of buffer {nbuf}"
            msg = f"channel {self.channel!r}: {_KIND_NAMES[kind]} frame {where} is corrupt: {type(exc).__name__}: {exc}"
            raise DeserializationError(msg) from None


def _read_event(payload: memoryview) -> Event:
    body = _unpack_marked(payload)
    if type(body) is list and body and type(body[0]) is int:
        code = body[0]
        if code == EVENT_END_OF_PARTITION and len(body) == 1:
            return EndOfPartition()
        if code == EVENT_WATERMARK and len(body) == 2 and type(body[1]) in (int, float):
            return Watermark(body[1])
        if code == EVENT_USER and len(body) == 2:
            return UserEvent(body[1])
        if (code == EVENT_BARRIER and len(body) == 3 and type(body[1]) is int and body[1] > 0
                and type(body[2]) is float):
            return CheckpointBarrier(body[1], body[2])
    msg = f"event body {body!r:.80} is not [0], [1, timestamp], [2, payload] or [3, checkpoint id, timestamp]"
    raise ValueError(msg)


# ----------------------------------------------------------------------------- the loop in miniature
@overload
def pack_to_buffers(items: Iterable[Item], *, buffer_size: int = ...,
                    max_record_size: int = ...) -> list[tuple[bytearray, int]]: ...
@overload
def pack_to_buffers(items: Iterable[Item], *, buffer_size: int = ..., new_buffer: Callable[[int], _B],
                    max_record_size: int = ...) -> list[tuple[_B, int]]: ...
def pack_to_buffers(items: Iterable[Item], *, buffer_size: int = 32768,
                    new_buffer: Callable[[int], Any] = bytearray,  # the overloads above carry the types
                    max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> list[tuple[Any, int]]:
    """Serialize ``items`` into fresh buffers as a channel would; returns ``[(buffer, nbytes)]``.

    Items: a ``list`` is a record batch, a dict / structured ndarray a columnar
    batch, an event an event. For tests and benchmarks; the channel layer runs
    the same loop with pool buffers.
    """
    ser = BufferSerializer(max_record_size=max_record_size)
    out: list[tuple[Any, int]] = []
    buf = new_buffer(buffer_size)
    ser.set_buffer(buf)
    for item in items:
        result = ser.write(item)
        while result.is_full_buffer:
            out.append((buf, ser.position))
            buf = new_buffer(buffer_size)
            if result.is_full_record:
                ser.set_buffer(buf)
                break
            result = ser.continue_into(buf)
    if ser.position:
        out.append((buf, ser.position))
    return out


def iter_records(buffers: Iterable[Buffer | tuple[Buffer, int]], *, channel: str = "?",
                 max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> Iterator[Any]:
    """Yield the records of a channel's buffers one by one (columnar batches and events as they are).

    ``buffers`` holds buffer-likes (all bytes filled) or ``(buffer, nbytes)``
    pairs. Checks at the end that no frame was left incomplete.
    """
    des = BufferDeserializer(channel, max_record_size=max_record_size)
    for entry in buffers:
        items = des.feed(*entry) if isinstance(entry, tuple) else des.feed(entry)
        for item in items:
            if type(item) is list:
                yield from item
            else:
                yield item
    des.finish()
