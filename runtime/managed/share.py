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
- :class:`PartitionedSpill` appends the byte streams of several partitions to
  one spill file through a staging page (blocks tagged by their partition) and
  reads one partition back block by block; :class:`SpillStream` is its
  one-stream form (a sorted run). Every ``SpillError`` crossing this boundary
  is re-raised naming ``io.tmp-dirs`` and the path.
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
    "PartitionedSpill",
    "SpillCounters",
    "SpillStream",
    "U64Array",
    "WORD_PAD",
    "bits_key",
    "equal_strings",
    "fingerprints",
    "key_bits",
    "mix64",
    "spill_error",
    "unmix64",
    "word_view",
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


_FP_SEED = np.uint64(0x2545F4914F6CDD1D)
# _LOW_BYTES[k]: the mask that keeps the k lowest bytes of a little-endian uint64 word (k in 0..8).
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)
WORD_PAD = 7  # bytes a word read may run past the end of a string


def word_view(buf: npt.NDArray[np.uint8]) -> U64Array:
    """``w[i]`` = the 8 bytes at ``buf[i]`` as a little-endian uint64, unaligned: a strided view, no copy.

    Reading a string's last word reads up to 7 bytes past its end, so the
    strings read through it must end at least ``WORD_PAD`` bytes before the
    end of ``buf`` (KeyBytes pads; RecordArea leaves that much free at the end
    of every page).
    """
    return np.ndarray((max(len(buf) - WORD_PAD, 0),), np.dtype("<u8"), buffer=buf.data, strides=(1,))


def equal_strings(a: U64Array, a_at: npt.NDArray[np.int64], b: U64Array, b_at: npt.NDArray[np.int64],
                  lens: npt.NDArray[np.int64]) -> BoolArray:
    """Whether the strings at ``a_at[i]`` and ``b_at[i]`` (both ``lens[i]`` bytes) are equal, 8 bytes a pass.

    ``a`` and ``b`` are :func:`word_view` s. One pass over the pairs still
    running per word of the longest string.
    """
    eq: BoolArray = np.ones(len(lens), bool)
    sel = np.arange(len(lens))
    rest = lens
    while sel.size:
        diff = (a[a_at] ^ b[b_at]) & _LOW_BYTES[np.minimum(rest, 8)]
        eq[sel[diff != 0]] = False
        more = np.flatnonzero((rest > 8) & (diff == 0))
        sel, rest, a_at, b_at = sel[more], rest[more] - 8, a_at[more] + 8, b_at[more] + 8
    return eq


def fingerprints(buf: npt.NDArray[np.uint8], offs: npt.NDArray[np.int64], lens: npt.NDArray[np.int64]) -> U64Array:
    """64-bit fingerprints of the byte strings ``buf[offs[i]:offs[i] + lens[i]]``, never 0, in numpy passes.

    ``h = mix64(len ^ seed)``, then ``h = mix64(h ^ w)`` for each 8-byte
    little-endian word ``w`` of the string (the last one zero-padded): a
    function of the bytes alone, not of the batch, its order or the buffer
    layout, so a key gets the same fingerprint packed from input, read back
    from a spill file or merged as a partial. Not salted: inputs chosen to
    collide cost probing time, never correctness (keys are compared by bytes).
    One pass over the strings still running per word of the longest one: 13-byte
    keys take two. (Before: ``mix64(hash(bytes))`` per key through
    ``np.fromiter``, the top entry of a 2 M-key string count.)
    """
    n = len(lens)
    h = mix64(lens.astype(np.uint64) ^ _FP_SEED)
    if n:
        end = int((offs + lens).max())
        if len(buf) < end + WORD_PAD:
            buf = np.concatenate((buf[:end], np.zeros(WORD_PAD, np.uint8)))
        words = word_view(buf)
        at = offs.copy()
        rest = lens.copy()
        sel: npt.NDArray[np.intp] | None = None  # None: every string
        while True:
            w = words[at] & _LOW_BYTES[np.minimum(rest, 8)]
            if sel is None:
                h = mix64(h ^ w)
            else:
                h[sel] = mix64(h[sel] ^ w)
            more = rest > 8
            if not more.any():
                break
            keep = np.flatnonzero(more)
            sel = keep if sel is None else sel[keep]
            at, rest = at[keep] + 8, rest[keep] - 8
    h[h == 0] = 1  # 0 marks an empty slot
    return h


# ------------------------------------------------------------------- share
class ManagedShare:
    """One operator's share of a worker's managed memory: at most ``share_bytes`` for ``owner``.

    Blocks (``try_allocate``, a power of two from the buddy allocator, counted
    at their rounded size) and pages (``try_allocate_page``) are taken lazily;
    both return ``None`` when the share, the budget or the arena has no room:
    the caller spills, it never fails for lack of memory. The few pages a
    structure cannot work without (staging pages for spill I/O) come from
    :meth:`allocate_pages`, which raises instead.

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
        return self._hold(seg)

    def try_allocate_table(self, smallest: int, need: int, row_bytes: int, max_load: float
                           ) -> tuple[MemorySegment, int] | None:
        """A zeroed block for an open-addressing table, and the power-of-two rows it holds; None if none fits.

        Asks for room for ``need`` rows at ``max_load`` (never fewer than ``smallest`` rows), 4x that while
        the table is small against the share (half the rehashing), and halves down to ``smallest`` until
        a block fits. Ownership: as :meth:`try_allocate`.
        """
        cap = smallest
        while cap * max_load < need:
            cap *= 2
        if cap * row_bytes * 4 <= self.share_bytes // 8:
            cap *= 2
        while cap >= smallest:
            seg = self.try_allocate(cap * row_bytes)
            if seg is not None:
                seg.fill(0)
                return seg, 1 << ((seg.size // row_bytes).bit_length() - 1)  # what the rounded block holds
            cap //= 2
        return None

    def try_allocate_page(self) -> MemorySegment | None:
        """One page of ``page_size`` bytes, or None (see :meth:`try_allocate`)."""
        if self._used + self.page_size > self.share_bytes:
            return None
        try:
            (seg,) = self.memory.allocate_pages(self.owner, 1)
        except OutOfMemoryError:
            return None
        return self._hold(seg)

    def allocate_pages(self, n: int) -> list[MemorySegment]:
        """Take ``n`` pages of ``page_size`` bytes now, all of them or none: pages the caller cannot work without.

        Unlike :meth:`try_allocate_page`, running out is an error: use it for
        what a structure needs before it can make progress at all (the
        staging pages of spill I/O), not for what it could spill instead.
        Ownership: the caller holds each page until it passes it to
        :meth:`release`; :meth:`release_all` takes them back in any case.
        Process: the worker owning the arena. Not thread-safe.

        Raises:
            TypeError: ``n`` is not an int.
            InvalidSizeError: ``n`` < 0.
            OutOfMemoryError: the share (or the manager's budget or arena) has
                no room for ``n`` more pages; names the owner, the request, what
                is left and ``memory.managed.fraction``. Nothing stays allocated.
        """
        if not isinstance(n, int) or isinstance(n, bool):
            msg = f"n must be an int; got {type(n).__name__}"
            raise TypeError(msg)
        if n < 0:
            msg = f"number of pages must be >= 0; got {n}"
            raise InvalidSizeError(msg)
        nbytes = n * self.page_size
        if self._used + nbytes > self.share_bytes:
            msg = (f"cannot allocate {n} page{'s' if n != 1 else ''} ({format_bytes(nbytes)}) for {self.owner!r}: "
                   f"{format_bytes(self.available_bytes)} of its share of {format_bytes(self.share_bytes)} left; "
                   f"raise {SHARE_KEY}")
            raise OutOfMemoryError(msg)
        return [self._hold(seg) for seg in self.memory.allocate_pages(self.owner, n)]

    def _hold(self, seg: MemorySegment) -> MemorySegment:
        """Count a segment just allocated for this share as held (the one place ``_used`` grows)."""
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


class PartitionedSpill:
    """One spill file holding the byte streams of several partitions; every block is tagged by its partition.

    :meth:`write` appends bytes to partition ``part``'s stream, one block per
    staging page-full, synchronously; nothing stays pending between calls,
    so several writers may share one staging page. Blocks of different
    partitions interleave in the file; the per-partition lists of
    :class:`BlockRef` keep them apart, and :meth:`read_blocks` reads one
    partition back in write order (each block into ``stage``, then copied out).
    The file is created by the first write: a level that never spills makes
    none. Bytes of a partition that was read back (:meth:`drop`) stay in the
    file until :meth:`delete` (spill files are append-only); after
    :meth:`clear` the file may take the partitions of a next user.

    Ownership: the object owns its spill file and deletes it in :meth:`delete`
    (the IOManager removes it on close otherwise). ``stage`` belongs to the
    caller (a page of its share); the IOManager holds it only inside
    ``write`` / while advancing ``read_blocks``.
    Process: the IOManager's process. Not thread-safe.

    Raises:
        SpillError: the file cannot be created, written or read; the message
            names the path and ``io.tmp-dirs``.
    """

    def __init__(self, io: IOManager, hint: str, counters: SpillCounters) -> None:
        self._io = io
        self._hint = hint
        self._counters = counters
        self._file: SpillFile | None = None
        self._deleted = False
        self.path = ""  # set when the file is created
        self.blocks: dict[int, list[BlockRef]] = {}  # partition -> its blocks, in write order
        self.nbytes = 0  # bytes written to the file, live or not

    def create(self) -> SpillFile:
        """The spill file, created on the first call."""
        if self._file is not None:
            return self._file
        if self._deleted:
            err = spill_error("write to a deleted", self.path or self._hint,
                              RuntimeError("the spill was deleted"))
            raise err
        io = self._io
        try:
            self._file = f = io.create_spill_file(self._hint)
        except SpillError as exc:
            err = spill_error("create a", getattr(exc, "path", io.directory), exc)
            raise err from exc
        self.path = f.path
        self._counters.spill_files += 1
        return f

    def __contains__(self, part: int) -> bool:
        return part in self.blocks

    def parts(self) -> list[int]:
        """Partitions with a stream here (possibly empty), ascending."""
        return sorted(self.blocks)

    def open_part(self, part: int) -> None:
        """Start partition ``part``'s stream (empty) if it has none."""
        self.blocks.setdefault(part, [])

    def write(self, part: int, data: Buffer, stage: MemorySegment) -> None:
        """Append ``data`` to partition ``part``'s stream as one block per staging page-full."""
        mv = (data.data if isinstance(data, np.ndarray) else memoryview(data)).cast("B")
        n = len(mv)
        refs = self.blocks.setdefault(part, [])
        if not n:
            return
        f = self.create()
        size = stage.size
        pos = 0
        while pos < n:
            take = min(size, n - pos)
            stage.put_bytes(0, mv[pos:pos + take])
            try:
                refs.append(f.write(stage, take))
            except SpillError as exc:
                err = spill_error("write to", self.path, exc)
                raise err from exc
            pos += take
        self.nbytes += n
        self._counters.spilled_bytes += n
        self._counters.blocks_written += -(-n // size)

    def read_blocks(self, part: int, stage: MemorySegment) -> Iterator[bytes]:
        """Each block of partition ``part``, in write order, as bytes (read into ``stage``, then copied out)."""
        if self._deleted:
            err = spill_error("read a deleted", self.path or self._hint, RuntimeError("the spill was deleted"))
            raise err
        refs = self.blocks.get(part, [])
        f = self._file
        if not refs or f is None:
            return
        for ref in refs:
            try:
                f.read(ref, stage)
            except SpillError as exc:
                err = spill_error("read", self.path, exc)
                raise err from exc
            self._counters.blocks_read += 1
            yield stage.get_bytes(0, ref.nbytes)

    def drop(self, part: int) -> None:
        """Forget partition ``part`` (after reading it back); its bytes stay in the file until :meth:`delete`."""
        self.blocks.pop(part, None)

    def clear(self) -> None:
        """Forget every partition: the file stays, and later writes append to it (its old bytes are dead)."""
        self.blocks.clear()

    def delete(self) -> None:
        """Remove the file. Idempotent; never raises for a file that is already gone."""
        f, self._file = self._file, None
        self._deleted = True
        self.blocks.clear()
        if f is not None:
            f.delete()


class SpillStream:
    """A byte stream in a spill file of its own: :meth:`write` appends, :meth:`read_blocks` reads it back.

    A :class:`PartitionedSpill` with a single partition, created at once (a
    sorted run always has bytes to write).

    Ownership: the stream owns its spill file and deletes it in :meth:`delete`
    (the IOManager removes it on close otherwise). ``stage`` belongs to the
    caller (see :class:`PartitionedSpill`).
    Process: the IOManager's process. Not thread-safe.

    Raises:
        SpillError: the file cannot be created, written or read; the message
            names the path and ``io.tmp-dirs``.
    """

    def __init__(self, io: IOManager, hint: str, counters: SpillCounters) -> None:
        self._spill = PartitionedSpill(io, hint, counters)
        self.path = self._spill.create().path
        self._spill.open_part(0)

    @property
    def nbytes(self) -> int:
        return self._spill.nbytes

    def write(self, data: Buffer, stage: MemorySegment) -> None:
        """Append ``data`` as one block per staging page-full."""
        self._spill.write(0, data, stage)

    def read_blocks(self, stage: MemorySegment) -> Iterator[bytes]:
        """Each block, in write order, as bytes (read into ``stage``, then copied out)."""
        return self._spill.read_blocks(0, stage)

    def delete(self) -> None:
        """Remove the file. Idempotent; never raises for a file that is already gone."""
        self._spill.delete()
