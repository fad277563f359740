"""ManagedShare, key hashing and spill streams: what the hash tables, the aggregator and the sorter share.

Imports: runtime.memory, runtime.io, runtime.errors (numpy and stdlib otherwise).

- :class:`ManagedShare` is one operator's share of a worker's managed memory:
  blocks and pages taken lazily from the :class:`~runtime.memory.manager.MemoryManager`
  on behalf of one owner, never more than ``share_bytes`` together. Running
  out is an answer (``None``), not an error: the caller spills.
- :func:`mix64` / :func:`unmix64` are the splitmix64 finalizer and its
  inverse over numpy ``uint64`` arrays. The finalizer is a bijection, so the
  fixed-width table stores the hash instead of the key and inverts it on the
  way out; partitions take the top bits, table slots the low bits.
- :class:`SpillStream` appends bytes to one spill file through a staging page
  (one or more blocks per call) and reads them back block by block. Every
  ``SpillError`` crossing this boundary is re-raised naming ``io.tmp-dirs``
  and the path.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from runtime.errors import InvalidSizeError, OutOfMemoryError, SpillError
from runtime.io import BlockRef, IOManager, SpillFile
from runtime.memory.manager import MemoryManager
from runtime.memory.segment import MemorySegment
from runtime.memory.units import format_bytes

__all__ = [
    "SHARE_KEY",
    "SPILL_DIR_KEY",
    "BoolArray",
    "Buffer",
    "IndexArray",
    "ManagedShare",
    "NumArray",
    "SpillCounters",
    "SpillStream",
    "U64Array",
    "bits_key",
    "fingerprints",
    "key_bits",
    "mix64",
    "spill_error",
    "unmix64",
]

SHARE_KEY = "memory.managed.fraction"
SPILL_DIR_KEY = "io.tmp-dirs"

U64Array: TypeAlias = npt.NDArray[np.uint64]  # hashes, fingerprints, table rows
IndexArray: TypeAlias = npt.NDArray[np.intp]  # positions: slots, row numbers
BoolArray: TypeAlias = npt.NDArray[np.bool_]
NumArray: TypeAlias = npt.NDArray[np.int64 | np.float64]  # keys and accumulators of the fixed-width forms
Buffer: TypeAlias = bytes | bytearray | memoryview | npt.NDArray[np.generic]

# ------------------------------------------------------------------ hashing
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_C1_INV = np.uint64(pow(0xBF58476D1CE4E5B9, -1, 1 << 64))
_C2_INV = np.uint64(pow(0x94D049BB133111EB, -1, 1 << 64))
_S = {n: np.uint64(n) for n in (27, 30, 31, 54, 60, 62)}
_CANONICAL_NAN = np.float64("nan")


def mix64(bits: U64Array) -> U64Array:
    """splitmix64 of every element of a ``uint64`` array: a new array, a bijection of uint64.

    Six numpy passes (about 1.5 ns per key here); in-place after the first.
    """
    z: U64Array = bits + _GAMMA
    z ^= z >> _S[30]
    z *= _C1
    z ^= z >> _S[27]
    z *= _C2
    z ^= z >> _S[31]
    return z


def unmix64(h: U64Array) -> U64Array:
    """The inverse of :func:`mix64`: ``unmix64(mix64(x)) == x``."""
    z: U64Array = h ^ (h >> _S[31]) ^ (h >> _S[62])
    z *= _C2_INV
    z ^= (z >> _S[27]) ^ (z >> _S[54])
    z *= _C1_INV
    z ^= (z >> _S[30]) ^ (z >> _S[60])
    z -= _GAMMA
    return z


def key_bits(keys: npt.ArrayLike, dtype: np.dtype[Any]) -> U64Array:
    """The uint64 bits that identify fixed-width keys: int64 as is; float64 with -0.0 -> 0.0 and one NaN.

    So keys equal under ``==`` share bits (0.0 and -0.0), and every NaN is one key (as SQL's GROUP BY).
    """
    if dtype.kind == "f":
        k: npt.NDArray[np.float64] = np.asarray(keys, np.float64) + 0.0  # -0.0 + 0.0 == 0.0
        nan = np.isnan(k)
        if nan.any():
            k[nan] = _CANONICAL_NAN
        return k.view(np.uint64)
    return np.ascontiguousarray(keys, np.int64).view(np.uint64)


def bits_key(bits: U64Array, dtype: np.dtype[Any]) -> NumArray:
    """Inverse of :func:`key_bits` (a view)."""
    return bits.view(np.float64 if dtype.kind == "f" else np.int64)


def fingerprints(packed: list[bytes]) -> U64Array:
    """64-bit fingerprints of serialized keys, never 0: ``mix64(hash(b))`` over the list in C loops.

    ``hash(bytes)`` is cached on the bytes object (a dict that saw it has
    computed it already) and salted per process; spill files are read back by
    the process that wrote them, so that is enough.
    """
    fp = mix64(np.fromiter(map(hash, packed), np.int64, len(packed)).view(np.uint64))
    fp[fp == 0] = 1  # 0 marks an empty slot
    return fp


# ------------------------------------------------------------------- share
class ManagedShare:
    """One operator's share of a worker's managed memory: at most ``share_bytes`` for ``owner``.

    Blocks (``try_allocate``, a power of two from the buddy allocator, counted
    at their rounded size) and pages (``try_allocate_page``) are taken lazily;
    both return ``None`` when the share, the budget or the arena has no room:
    the caller spills, it never fails for lack of memory.

    Ownership: the share allocates every segment through ``memory`` on behalf
    of ``owner`` and frees it in :meth:`release` or :meth:`release_all`. The
    structure that asked for a segment (a table, a sorter) is the only writer
    of it until it hands it back with :meth:`release`; the IOManager holds a
    staging page only for the duration of a blocking read or write.
    Process: the worker owning the arena. Not thread-safe (one task's thread).
    """

    def __init__(self, memory: MemoryManager, owner: Hashable, share_bytes: int) -> None:
        if not isinstance(share_bytes, int) or isinstance(share_bytes, bool):
            msg = f"share_bytes must be an int; got {type(share_bytes).__name__}"
            raise TypeError(msg)
        if share_bytes < memory.page_size:
            msg = (f"share_bytes of {owner!r} must be at least one page ({memory.page_size} bytes); "
                   f"got {share_bytes}; raise {SHARE_KEY}")
            raise InvalidSizeError(msg)
        self.memory = memory
        self.owner = owner
        self.share_bytes = share_bytes
        self.page_size = memory.page_size
        self.min_block = memory.allocator.min_block
        self.arena: npt.NDArray[np.uint8] = memory.allocator.region.array  # uint8 view of the usable area
        self.arena_view: memoryview = memory.allocator.region.buf
        self._held: dict[MemorySegment, None] = {}  # owner of this share only
        self._used = 0
        self._peak = 0

    def block_size(self, nbytes: int) -> int:
        """The rounded size a block of ``nbytes`` occupies."""
        return self.min_block << self.memory.allocator.order_for(nbytes)

    def fits(self, nbytes: int) -> bool:
        """Whether a block of ``nbytes`` (rounded) fits in what is left of the share."""
        return self._used + self.block_size(nbytes) <= self.share_bytes

    def try_allocate(self, nbytes: int) -> MemorySegment | None:
        """A block of at least ``nbytes``, or None if the share (or the manager) has no room.

        Ownership: the caller holds the block until it passes it to :meth:`release`;
        :meth:`release_all` takes it back in any case.
        """
        if not self.fits(nbytes):
            return None
        try:
            seg = self.memory.allocate(self.owner, nbytes)
        except OutOfMemoryError:
            return None
        return self._take(seg)

    def try_allocate_page(self) -> MemorySegment | None:
        """One page of ``page_size`` bytes, or None (see :meth:`try_allocate`)."""
        if self._used + self.page_size > self.share_bytes:
            return None
        try:
            (seg,) = self.memory.allocate_pages(self.owner, 1)
        except OutOfMemoryError:
            return None
        return self._take(seg)

    def _take(self, seg: MemorySegment) -> MemorySegment:
        self._held[seg] = None
        self._used += seg.size
        if self._used > self._peak:
            self._peak = self._used
        return seg

    def release(self, seg: MemorySegment) -> None:
        """Give back one segment taken from this share.

        Ownership: the caller gives it up; arrays viewed on it must be dropped first.
        """
        del self._held[seg]
        self._used -= seg.size
        self.memory.release(seg)

    def release_all(self) -> None:
        """Give back every segment still held. Idempotent."""
        held, self._held = list(self._held), {}
        self._used = 0
        if held:
            self.memory.release(held)

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def peak_bytes(self) -> int:
        """The most bytes held at once."""
        return self._peak

    @property
    def available_bytes(self) -> int:
        return self.share_bytes - self._used

    def __repr__(self) -> str:
        return (f"<ManagedShare {self.owner!r} {format_bytes(self._used)} of "
                f"{format_bytes(self.share_bytes)}>")


# ------------------------------------------------------------ spill streams
def spill_error(what: str, path: str, exc: BaseException) -> SpillError:
    """A SpillError naming the operation, the path and ``io.tmp-dirs``, chained to ``exc`` by the caller."""
    msg = (f"cannot {what} spill file {path}: {exc}; point {SPILL_DIR_KEY} at a writable directory "
           f"with free space")
    err = SpillError(msg)
    err.path = path  # type: ignore[attr-defined]
    err.errno = getattr(exc, "errno", None)
    return err


@dataclass
class SpillCounters:
    """Counters shared by the structures of one operator (aggregator levels, sorter runs)."""

    spilled_bytes: int = 0
    spill_files: int = 0
    spill_passes: int = 0
    blocks_written: int = 0
    blocks_read: int = 0


class SpillStream:
    """A byte stream in one spill file: :meth:`write` appends, :meth:`read_blocks` reads it back.

    ``write`` copies its bytes into the staging page ``stage`` and writes one
    block per page-full, synchronously; nothing stays pending between calls,
    so several streams may share one staging page. ``read_blocks`` reads each
    block into ``stage`` and yields a copy of its bytes.

    Ownership: the stream owns its spill file and deletes it in :meth:`delete`
    (the IOManager removes it on close otherwise). ``stage`` belongs to the
    caller (a page of its share); the stream writes it, and the IOManager
    holds it, only inside ``write`` / while advancing ``read_blocks``.
    Process: the IOManager's process.

    Raises:
        SpillError: the file cannot be created, written or read; the message
            names the path and ``io.tmp-dirs``.
    """

    def __init__(self, io: IOManager, hint: str, counters: SpillCounters) -> None:
        try:
            self._file: SpillFile | None = io.create_spill_file(hint)
        except SpillError as exc:
            err = spill_error("create a", getattr(exc, "path", io.directory), exc)
            raise err from exc
        self.path = self._file.path
        self.blocks: list[BlockRef] = []
        self.nbytes = 0
        self._counters = counters
        counters.spill_files += 1

    def write(self, data: Buffer, stage: MemorySegment) -> None:
        """Append ``data`` as one block per staging page-full."""
        f = self._file
        if f is None:
            err = spill_error("write to a deleted", self.path, RuntimeError("the stream was deleted"))
            raise err
        mv = (data.data if isinstance(data, np.ndarray) else memoryview(data)).cast("B")
        size = stage.size
        pos, n = 0, len(mv)
        while pos < n:
            take = min(size, n - pos)
            stage.put_bytes(0, mv[pos:pos + take])
            try:
                self.blocks.append(f.write(stage, take))
            except SpillError as exc:
                err = spill_error("write to", self.path, exc)
                raise err from exc
            pos += take
        self.nbytes += n
        self._counters.spilled_bytes += n
        self._counters.blocks_written += -(-n // size)

    def read_blocks(self, stage: MemorySegment) -> Iterator[bytes]:
        """Each block, in write order, as bytes (read into ``stage``, then copied out)."""
        f = self._file
        if f is None:
            err = spill_error("read a deleted", self.path, RuntimeError("the stream was deleted"))
            raise err
        for ref in self.blocks:
            try:
                f.read(ref, stage)
            except SpillError as exc:
                err = spill_error("read", self.path, exc)
                raise err from exc
            self._counters.blocks_read += 1
            yield stage.get_bytes(0, ref.nbytes)

    def delete(self) -> None:
        """Remove the file. Idempotent; never raises for a file that is already gone."""
        f, self._file = self._file, None
        if f is not None:
            f.delete()
