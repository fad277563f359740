"""MemorySegment, a bounds-checked view into a SharedRegion, and SegmentHandle, its portable name.

Imports: runtime.errors, runtime.memory.units (numpy and stdlib otherwise).

A segment is (region, offset, size, generation). Offsets passed to its methods
count from the segment's start; ``segment.offset`` counts from the start of the
region's usable area. Typed access is little-endian (``<``), like the header.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from runtime.errors import (
    InvalidHandleError,
    ReadOnlySegmentError,
    SegmentFreedError,
    SegmentIndexError,
)

if TYPE_CHECKING:  # pragma: no cover
    import numpy.typing as npt
    from typing_extensions import Buffer

    from runtime.memory.buddy import BuddyAllocator
    from runtime.memory.region import SharedRegion

__all__ = ["MemorySegment", "SegmentHandle", "SegmentHandleLike"]


class SegmentHandle(NamedTuple):
    """What crosses processes: offset in the usable area, size in bytes, generation.

    A plain tuple, so msgpack packs it as a 3-element array; any 3-sequence
    (offset, size, generation) is accepted back by ``SharedRegion.segment``.
    """

    offset: int
    size: int
    generation: int


#: What ``SharedRegion.segment`` and ``BuddyAllocator.free`` accept as a handle: a SegmentHandle, or the
#: (offset, size, generation) triple it became on the wire (msgpack turns tuples into lists).
SegmentHandleLike = SegmentHandle | tuple[int, int, int] | list[int]


# Typed accessors: name -> struct format. One table drives get_<name>/put_<name>.
_SCALARS = {
    "int8": "<b", "int16": "<h", "int32": "<i", "int64": "<q",
    "uint8": "<B", "uint16": "<H", "uint32": "<I", "uint64": "<Q",
    "float32": "<f", "float64": "<d",
}


class MemorySegment:
    """A view of ``size`` bytes at ``offset`` of a region.

    Ownership: a segment returned by ``BuddyAllocator.allocate`` belongs to
    that allocator's process, which alone writes it (unless it hands the
    segment on) and alone frees it, with ``free()`` or ``allocator.free(seg)``.
    A segment resolved from a handle (``region.segment(h)``) borrows the bytes:
    it may read (and, unless read-only, write) them but never frees them; the
    generation table tells it when the owner has freed them, and every access
    from then on raises :class:`SegmentFreedError`. Numpy arrays and
    memoryviews taken from a segment are not checked: they must not outlive it.
    Process: any process that maps the region.
    """

    __slots__ = ("region", "offset", "size", "generation", "owner", "readonly",
                 "_allocator", "_freed", "_checked", "_buf", "__weakref__")

    def __init__(self, region: SharedRegion, offset: int, size: int, generation: int,
                 owner: Hashable = None, *, readonly: bool = False, checked: bool = False,
                 allocator: BuddyAllocator | None = None) -> None:
        self.region = region
        self.offset = offset
        self.size = size
        self.generation = generation
        self.owner = owner
        self.readonly = readonly
        self._allocator = allocator
        self._freed = False
        self._checked = checked  # consult the region's generation table on each access
        self._buf = region.buf  # usable area; positions below are offset + pos

    @classmethod
    def _allocated(cls, region: SharedRegion, offset: int, size: int, generation: int, owner: Hashable,
                   allocator: BuddyAllocator) -> MemorySegment:
        """``cls(region, offset, size, generation, owner, allocator=allocator)`` for the allocator's hot
        path: keyword arguments cost as much as the rest of the constructor."""
        seg = object.__new__(cls)
        seg.region, seg.offset, seg.size, seg.generation, seg.owner = region, offset, size, generation, owner
        seg.readonly = seg._freed = seg._checked = False
        seg._allocator = allocator
        seg._buf = region.buf
        return seg

    # ------------------------------------------------------------------ checks
    def _check(self, pos: int, nbytes: int, what: str) -> int:
        """Validate an access of ``nbytes`` at ``pos``; returns the position in the usable area."""
        if self._freed or (self._checked and self.region.generation(self.offset) != self.generation):
            self._freed = True
            msg = (f"{what} on a freed segment (offset {self.offset}, {self.size} bytes, "
                   f"generation {self.generation}); it was freed by its owner")
            raise SegmentFreedError(msg)
        if pos < 0 or nbytes < 0 or pos + nbytes > self.size:
            msg = (f"{what} of {nbytes} bytes at offset {pos} is out of bounds of a segment of "
                   f"{self.size} bytes")
            raise SegmentIndexError(msg)
        return self.offset + pos

    def _check_writable(self, what: str) -> None:
        if self.readonly:
            msg = (f"{what} on a read-only segment (offset {self.offset}); buffers received from "
                   f"another worker are read-only until recycled")
            raise ReadOnlySegmentError(msg)

    @property
    def freed(self) -> bool:
        """True once the segment was freed (here, or by its owner for a handle-resolved view)."""
        if not self._freed and self._checked and not self.region.closed:
            self._freed = self.region.generation(self.offset) != self.generation
        return self._freed

    @property
    def nbytes(self) -> int:
        return self.size

    def __len__(self) -> int:
        return self.size

    # ------------------------------------------------------------------- bytes
    def put_bytes(self, pos: int, data: Buffer) -> None:
        """Copy a bytes-like ``data`` into the segment at ``pos``."""
        self._check_writable("put_bytes")
        mv = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
        start = self._check(pos, len(mv), "put_bytes")
        self._buf[start: start + len(mv)] = mv

    def get_bytes(self, pos: int, nbytes: int) -> bytes:
        """A copy of ``nbytes`` bytes at ``pos``."""
        start = self._check(pos, nbytes, "get_bytes")
        return bytes(self._buf[start: start + nbytes])

    def view(self, pos: int = 0, nbytes: int | None = None) -> memoryview:
        """A zero-copy memoryview of ``nbytes`` at ``pos`` (read-only for a read-only segment)."""
        nbytes = self.size - pos if nbytes is None else nbytes
        start = self._check(pos, nbytes, "view")
        mv = self._buf[start: start + nbytes]
        return mv.toreadonly() if self.readonly else mv

    def as_array(self, dtype: npt.DTypeLike = np.uint8, count: int = -1, pos: int = 0) -> np.ndarray:
        """A zero-copy numpy view of the segment (from ``pos``, ``count`` items or as many as fit)."""
        dtype = np.dtype(dtype)
        if count < 0:
            count = (self.size - pos) // dtype.itemsize
        start = self._check(pos, count * dtype.itemsize, "as_array")
        arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=start)
        if self.readonly:
            arr.flags.writeable = False
        return arr

    def fill(self, value: int = 0) -> None:
        """Set every byte to ``value``."""
        self._check_writable("fill")
        start = self._check(0, self.size, "fill")
        self.region.array[start: start + self.size] = value

    # ---------------------------------------------------------------- lifetime
    def handle(self) -> SegmentHandle:
        """The portable name of these bytes, for another process's ``region.segment(h)``."""
        self._check(0, 0, "handle")
        return SegmentHandle(self.offset, self.size, self.generation)

    def free(self) -> None:
        """Return the block to its allocator. Only the allocating process may call this.

        Raises:
            DoubleFreeError: already freed.
            InvalidHandleError: a view resolved from a handle (it borrows, never frees).
        """
        if self._allocator is None:
            msg = (f"segment at offset {self.offset} was resolved from a handle and borrows its bytes; "
                   f"only the allocating process frees it")
            raise InvalidHandleError(msg)
        self._allocator.free(self)

    def __repr__(self) -> str:
        state = " freed" if self._freed else (" ro" if self.readonly else "")
        owner = f" owner={self.owner!r}" if self.owner is not None else ""
        return f"<MemorySegment offset={self.offset} size={self.size} gen={self.generation}{owner}{state}>"


def _make_accessors(name: str, fmt: str) -> None:
    packer = struct.Struct(fmt)
    width = packer.size
    pack_into = packer.pack_into
    unpack_from = packer.unpack_from
    getter_name = f"get_{name}"
    putter_name = f"put_{name}"

    def get(self: MemorySegment, pos: int) -> int | float:
        value: int | float = unpack_from(self._buf, self._check(pos, width, getter_name))[0]
        return value

    def put(self: MemorySegment, pos: int, value: int | float) -> None:
        if self.readonly:
            self._check_writable(putter_name)
        start = self._check(pos, width, putter_name)
        try:
            pack_into(self._buf, start, value)
        except struct.error as exc:
            msg = f"{putter_name}: value {value!r} does not fit {name}"
            raise OverflowError(msg) from exc

    get.__name__, put.__name__ = getter_name, putter_name
    get.__doc__ = f"Read a little-endian {name} at ``pos``."
    put.__doc__ = f"Write ``value`` as a little-endian {name} at ``pos``."
    setattr(MemorySegment, getter_name, get)
    setattr(MemorySegment, putter_name, put)


for _name, _fmt in _SCALARS.items():
    _make_accessors(_name, _fmt)
del _name, _fmt
