"""Streaming per-key accumulators in managed memory: every record's updated accumulator, in input order.

Imports: runtime.managed (hash_table, share), runtime.memory, runtime.io, runtime.errors (numpy and stdlib
otherwise).

:class:`StreamingFixedState` keeps one count, sum, min or max (int64 or
float64) per key (int64, or a byte string of at most ``S<n>`` bytes) for a
streaming keyed aggregation, which emits the updated result after every
record. Keys are split into ``partitions`` by the top bits of their 64-bit
hash; each partition is an open-addressing table in one block of the
operator's :class:`~runtime.managed.share.ManagedShare`, rows
``[h, key words..., acc]`` as :class:`~runtime.managed.hash_table.FixedHashTable`
lays them out (int keys store no key words: ``h = mix64(key)`` is a bijection).

:meth:`StreamingFixedState.update` groups a batch's rows by partition and
hands each touched partition its rows, in input order, to one call of the
compiled ``upsert_emit`` (``_kernels.c``), which merges them and writes each
row's accumulator after its merge; the outputs are scattered back to input
order. Partitions already in memory go first, so that when an evicted one
must be loaded, the partitions this batch no longer needs are the least
recently used.

When a partition needs a block the share does not have, the least recently
used other resident partition is evicted: its occupied rows are packed at the
start of its own block and written from there to a spill file of its own in
one request (no staging copy: a staging page cost one IOManager round trip
per page, most of an evicting job's time), and the block goes back to the
share. A batch that touches an evicted partition loads it back: the rows are
read into the partition's new block, then re-inserted there; its file is
deleted, so the dead bytes on disk are always zero. Running out of the share is never an error, except for one
partition that cannot fit even with every other partition evicted
(``OutOfMemoryError`` naming ``memory.managed.size``).

Semantics: as :mod:`runtime.managed.hash_table` (int sums wrap at 2**63:
callers keep sums far from that bound; NaN propagates through float min/max).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import OutOfMemoryError, SpillError
from runtime.io import BlockRef, IOManager, SpillFile
from runtime.managed.hash_table import AGG_KINDS, hash_words
from runtime.managed.share import ManagedShare, NumArray, U64Array, mix64, spill_error, unmix64
from runtime.memory.segment import MemorySegment
from runtime.memory.snapshot import Snapshot

try:  # the compiled probe loop (setup.py builds it where a C compiler is at hand)
    from runtime.managed import _kernels
except ImportError:  # pragma: no cover - an install without a compiler
    _kernels = None  # type: ignore[assignment]

__all__ = ["DEFAULT_PARTITIONS", "LoggedRows", "PackedRows", "SpilledRows", "StreamingFixedState",
           "StreamingStateStats", "image_entries"]

DEFAULT_PARTITIONS = 64
MIN_CAPACITY = 64
MEMORY_KEY = "memory.managed.size"
#: The accumulator code of upsert_emit (see _kernels.c), by (kind, dtype kind).
_CODES = {("count", "i"): b"i", ("sum", "i"): b"i", ("sum", "f"): b"f", ("min", "i"): b"n", ("max", "i"): b"x",
          ("min", "f"): b"N", ("max", "f"): b"X"}


def image_entries(data: Any, key_dtype: npt.DTypeLike, value_dtype: npt.DTypeLike) -> tuple[npt.NDArray[Any],
                                                                                            NumArray]:
    """The keys and accumulators in one partition's packed rows (``StreamingFixedState.images``, read back)."""
    kdt, vdt = np.dtype(key_dtype), np.dtype(value_dtype)
    key_words = kdt.itemsize // 8 if kdt.kind == "S" else 0
    rows = np.frombuffer(data, np.uint64).reshape(-1, 2 + key_words)
    if key_words:
        keys = np.ascontiguousarray(rows[:, 1:1 + key_words]).view(kdt).reshape(len(rows))
    else:
        keys = unmix64(np.ascontiguousarray(rows[:, 0])).view(np.int64)
    return keys, np.ascontiguousarray(rows[:, -1]).view(vdt)


class PackedRows:
    """A table's occupied rows as a buffer to be written (``runtime.checkpoint.blob``'s lazy buffer): ``nbytes``
    long, copied by :meth:`write_into` straight from the table, packed, to where the snapshot goes.
    Ownership: a view of the state's block, valid until the state changes."""

    __slots__ = ("_state", "_table", "nbytes")

    def __init__(self, state: StreamingFixedState, table: U64Array, rows: int) -> None:
        self._state, self._table = state, table
        self.nbytes = rows * state.row_bytes

    def write_into(self, target: memoryview) -> None:
        written = self._state._pack(self._table, target) * self._state.row_bytes
        if written != self.nbytes:
            msg = f"a partition holds {written} bytes of rows; its count said {self.nbytes}"
            raise RuntimeError(msg)


class LoggedRows:
    """Changelog segments (:meth:`StreamingFixedState.take_changes`) as one buffer to be written, each array
    copied in turn where the snapshot goes. Ownership: holds the arrays (the log gave them away)."""

    __slots__ = ("_arrays", "nbytes")

    def __init__(self, arrays: list[U64Array]) -> None:
        self._arrays = arrays
        self.nbytes = sum(a.nbytes for a in arrays)

    def write_into(self, target: memoryview) -> None:
        pos = 0
        out = np.frombuffer(target, np.uint8)
        for a in self._arrays:
            out[pos:pos + a.nbytes] = a.reshape(-1).view(np.uint8)
            pos += a.nbytes


class SpilledRows:
    """An evicted partition's rows as a buffer to be written (see :class:`PackedRows`): read from its spill
    file straight into the target, checked. Ownership: valid until the state changes."""

    __slots__ = ("_file", "_ref", "nbytes")

    def __init__(self, file: SpillFile, ref: BlockRef) -> None:
        self._file, self._ref = file, ref
        self.nbytes = ref.nbytes

    def write_into(self, target: memoryview) -> None:
        try:
            self._file.read_into(self._ref, target)
        except SpillError as exc:
            err = spill_error("read", self._file.path, exc)
            raise err from exc


@dataclass(frozen=True)
class StreamingStateStats(Snapshot):
    """What a StreamingFixedState holds and how often it moved partitions between memory and disk."""

    entries: int
    memory_bytes: int  # bytes of the share held (tables and the staging page)
    disk_bytes: int  # bytes of evicted partitions in spill files (all live)
    partition_loads: int
    partition_evictions: int
    spilled_bytes: int  # bytes ever written to spill files


class _Partition:
    """One partition: an open-addressing table in a block of the share, or its rows in a spill file.

    Ownership: the state owns the block (taken from its share) and the spill stream; only the state writes
    either. ``rows`` counts the keys wherever they are.
    """

    __slots__ = ("seg", "table", "capacity", "limit", "rows", "spill", "block", "last_used")

    def __init__(self) -> None:
        self.seg: MemorySegment | None = None
        self.table: U64Array | None = None
        self.capacity = 0
        self.limit = 0  # keys the table takes before it grows
        self.rows = 0
        self.spill: SpillFile | None = None  # an evicted partition's rows: one block of a file of its own
        self.block: BlockRef | None = None
        self.last_used = 0


class StreamingFixedState:
    """Per-key accumulators of a streaming count/sum/min/max, in partitions of a managed share.

    ``kind`` is count, sum, min or max; ``value_dtype`` int64 or float64 (a
    count is int64); ``key_dtype`` int64 or ``S<n>`` (n a multiple of 8: keys
    are numpy ``S`` arrays of at most n bytes, compared as zero-padded
    bytes). ``io`` is the IOManager evicted partitions are written through,
    or a function returning it (called at the first eviction), or None (then
    a share that runs out raises OutOfMemoryError).

    Ownership: every block is taken from ``share`` by this object, which is
    its only writer (the IOManager reads or writes it only during an eviction
    or a load, which wait for it) and gives it back in
    :meth:`release` (also deleting every spill file). Arrays returned by
    :meth:`update` and :meth:`items` are copies.
    Process: the worker running the operator. Not thread-safe.
    """

    def __init__(self, share: ManagedShare, io: IOManager | Callable[[], IOManager] | None, kind: str, *,
                 value_dtype: npt.DTypeLike = np.int64, key_dtype: npt.DTypeLike = np.int64,
                 partitions: int = DEFAULT_PARTITIONS, max_load: float = 0.75, name: str = "streaming-state") -> None:
        if kind not in AGG_KINDS:
            msg = f"kind must be one of {', '.join(AGG_KINDS)}; got {kind!r}"
            raise ValueError(msg)
        vdt = np.dtype(np.int64) if kind == "count" else np.dtype(value_dtype)
        if vdt not in (np.dtype(np.int64), np.dtype(np.float64)):
            msg = f"value_dtype must be int64 or float64; got {vdt}"
            raise ValueError(msg)
        kdt = np.dtype(key_dtype)
        if kdt != np.dtype(np.int64) and not (kdt.kind == "S" and kdt.itemsize % 8 == 0 and kdt.itemsize > 0):
            msg = f"key_dtype must be int64 or S<n> with n a multiple of 8; got {kdt}"
            raise ValueError(msg)
        if partitions < 1 or partitions & (partitions - 1) or partitions > 1 << 16:
            msg = f"partitions must be a power of two in [1, 65536]; got {partitions}"
            raise ValueError(msg)
        if not 0.1 <= max_load <= 0.95:
            msg = f"max_load must be in [0.1, 0.95]; got {max_load}"
            raise ValueError(msg)
        self.share = share
        self.kind = kind
        self.value_dtype = vdt
        self.key_dtype = kdt
        self.key_words = kdt.itemsize // 8 if kdt.kind == "S" else 0
        self.width = 2 + self.key_words
        self.row_bytes = 8 * self.width
        self.max_load = max_load
        self.name = name
        self._io_source = io
        self._io: IOManager | None = io if isinstance(io, IOManager) else None
        self._codes = _CODES[kind, vdt.kind]
        self._shift = np.uint64(64 - (partitions.bit_length() - 1)) if partitions > 1 else None
        self._parts = [_Partition() for _ in range(partitions)]
        self._zero: np.uint64 | None = None  # int keys: the accumulator of the one key whose hash is 0
        self._tick = 0
        self._loads = 0
        self._evictions = 0
        self._spilled_bytes = 0
        self.compiled = _kernels is not None
        # The changelog (see log_changes): each fold's rows with the accumulator after each record, in order.
        self._log: list[U64Array] | None = None
        self._log_bytes = 0
        self._log_limit = 0
        self._replacing = False  # replay(): rows hold accumulators that replace, not merge

    # ------------------------------------------------------------------ update
    def update(self, keys: npt.ArrayLike, values: npt.ArrayLike | None = None) -> NumArray:
        """Fold one record per key (``values`` for sum/min/max); returns the accumulator after each record.

        Records are taken in input order; a key may repeat. The result is a new
        array of ``value_dtype``, one entry per record.
        """
        if self.kind == "count":
            return self._fold(keys, None)
        if values is None:
            msg = f"{self.kind} needs values; got values=None"
            raise ValueError(msg)
        return self._fold(keys, values)

    def merge_entries(self, keys: npt.ArrayLike, accumulators: npt.ArrayLike) -> None:
        """Merge one accumulator per key into the state, as :meth:`items` returned them (a restore: into an
        empty state they are put as they are; a key already present merges as the kind does)."""
        self._fold(keys, accumulators)

    def _fold(self, keys: npt.ArrayLike, values: npt.ArrayLike | None) -> NumArray:
        """Merge one row per key: ``values`` (a count's 1 when None); the accumulator after each row."""
        h, words = self._hash(keys)
        n = len(h)
        rows = np.empty((n, self.width), np.uint64)
        rows[:, 0] = h
        if words is not None:
            rows[:, 1:1 + self.key_words] = words
        if values is None:
            rows[:, -1] = 1
        else:
            vals = np.asarray(values)
            if len(vals) != n:
                msg = f"values must have one entry per key; got {len(vals)} values for {n} keys"
                raise ValueError(msg)
            rows[:, -1] = vals.astype(self.value_dtype, copy=False).view(np.uint64)
        out = np.empty(n, np.uint64)
        if n == 0:
            return out.view(self.value_dtype)
        if not self.key_words:
            zero = h == 0
            if zero.any():  # 0 marks an empty slot: the one key hashing to it has a side accumulator
                for i in np.flatnonzero(zero).tolist():
                    self._zero = rows[i, -1] if self._zero is None else self._merge_one(self._zero, rows[i, -1])
                    out[i] = self._zero
                keep = np.flatnonzero(~zero)
                self._update_rows(rows[keep], out, keep)
                self._record(rows, out)
                return out.view(self.value_dtype)
        self._update_rows(rows, out, None)
        self._record(rows, out)
        return out.view(self.value_dtype)

    # --------------------------------------------------------------- changelog
    def log_changes(self, limit_bytes: int) -> None:
        """From now on, keep every fold's rows with the accumulator after each record (the changelog that
        :meth:`take_changes` hands out), up to ``limit_bytes`` of them: past that the log is dropped
        (:attr:`logging` turns False) and only a full snapshot (:meth:`images`) can follow.

        Ownership: the log is on the heap, bounded by ``limit_bytes``; this object owns it."""
        self._log, self._log_bytes, self._log_limit = [], 0, limit_bytes

    @property
    def logging(self) -> bool:
        """Whether every change since :meth:`log_changes` (or the last :meth:`take_changes`) is in the log."""
        return self._log is not None

    @property
    def log_bytes(self) -> int:
        return self._log_bytes

    def take_changes(self) -> list[U64Array]:
        """The changelog since the last call (rows of ``width`` words: hash, key words, the accumulator after
        the record), oldest first; the log starts again empty. :meth:`replay` applies it."""
        if self._log is None:
            msg = f"{self.name}: no changelog is kept (log_changes() was not called, or the log outgrew its limit)"
            raise RuntimeError(msg)
        log, self._log, self._log_bytes = self._log, [], 0
        return log

    def _record(self, rows: U64Array, out: U64Array) -> None:
        if self._log is None or self._replacing:
            return
        rows[:, -1] = out  # rows is this fold's own array: it becomes the log's
        self._log.append(rows)
        self._log_bytes += rows.nbytes
        if self._log_bytes > self._log_limit:
            self._log, self._log_bytes = None, 0

    def replay(self, data: Any) -> None:
        """Apply a changelog (:meth:`take_changes`'s rows, as a buffer): each key takes the accumulator of its
        last row. Not logged."""
        rows = np.frombuffer(data, np.uint64)
        if len(rows) % self.width:
            msg = f"{self.name}: a changelog of {len(rows)} words is not rows of {self.width}; another key type"
            raise ValueError(msg)
        rows = rows.reshape(-1, self.width)
        if not len(rows):
            return
        codes, self._codes = self._codes, b"r" * len(self._codes)
        self._replacing = True
        try:
            h = rows[:, 0]
            zero = np.flatnonzero(h == 0) if not self.key_words else np.empty(0, np.intp)
            if len(zero):
                self._zero = np.uint64(rows[zero[-1], -1])
                rows = rows[h != 0]
            self._update_rows(np.ascontiguousarray(rows), np.empty(len(rows), np.uint64), None)
        finally:
            self._codes = codes
            self._replacing = False

    def _update_rows(self, rows: U64Array, out: U64Array, at: npt.NDArray[np.intp] | None) -> None:
        """Merge rows (none with h == 0) partition by partition; each one's accumulator to ``out[at[i]]``."""
        if self._shift is None:
            part = np.zeros(len(rows), np.intp)
            order = np.arange(len(rows))
        else:
            part = (rows[:, 0] >> self._shift).astype(np.intp)
            order = np.argsort(part, kind="stable")  # stable: each partition's rows stay in input order
        sorted_rows = rows[order]
        bounds = np.searchsorted(part[order], np.arange(len(self._parts) + 1)).tolist()
        touched = [p for p in range(len(self._parts)) if bounds[p + 1] > bounds[p]]
        # Resident partitions first: loading an evicted one then evicts what this batch is done with.
        touched.sort(key=lambda p: self._parts[p].seg is None)
        sorted_out = np.empty(len(rows), np.uint64)
        for p in touched:
            lo, hi = bounds[p], bounds[p + 1]
            self._upsert_partition(p, sorted_rows[lo:hi], sorted_out[lo:hi])
        dest = order if at is None else at[order]
        out[dest] = sorted_out

    def _upsert_partition(self, p: int, rows: U64Array, out: U64Array) -> None:
        part = self._parts[p]
        self._tick += 1
        part.last_used = self._tick
        # New keys are at most the distinct hashes of these rows (not the rows: a key may repeat many times)
        distinct = len(np.unique(rows[:, 0])) if len(rows) > 1 else len(rows)
        if part.seg is None:
            self._load(p, extra=distinct)
        n = len(rows)
        i = 0
        while True:
            assert part.table is not None
            i, inserted = self._emit(part.table, part.capacity, rows, i, part.limit - part.rows, out)
            part.rows += inserted
            if i == n:
                return
            self._grow(p, part.rows + min(n - i, distinct))

    def _emit(self, table: U64Array, capacity: int, rows: U64Array, start: int, room: int,
              out: U64Array) -> tuple[int, int]:
        if self.compiled:
            return _kernels.upsert_emit(table, capacity, self.width, self.key_words, self._codes, rows, start,
                                        room, out)
        return self._emit_python(table, capacity, rows, start, room, out)

    def _emit_python(self, table: U64Array, capacity: int, rows: U64Array, start: int, room: int,
                     out: U64Array) -> tuple[int, int]:
        """upsert_emit one row at a time in Python (where the kernel was not built): correct, slow."""
        mask = capacity - 1
        kw = self.key_words
        inserted = 0
        for i in range(start, len(rows)):
            row = rows[i]
            h = int(row[0])
            pos = h & mask
            while True:
                slot = table[pos]
                cur = int(slot[0])
                if cur == h and (not kw or (slot[1:1 + kw] == row[1:1 + kw]).all()):
                    slot[-1] = self._merge_one(slot[-1], row[-1])
                    out[i] = slot[-1]
                    break
                if cur == 0:
                    if inserted >= room:
                        return i, inserted
                    slot[:] = row
                    out[i] = row[-1]
                    inserted += 1
                    break
                pos = (pos + 1) & mask
        return len(rows), inserted

    def _merge_one(self, acc: np.uint64, bits: np.uint64) -> np.uint64:
        """One accumulator merged with one record's bits (uint64 views of value_dtype)."""
        if self._replacing:
            return np.uint64(bits)
        a = np.array([acc], np.uint64)
        b = np.array([bits], np.uint64)
        av, bv = a.view(self.value_dtype), b.view(self.value_dtype)
        if self.kind in ("count", "sum"):
            with np.errstate(over="ignore"):
                av += bv
        elif self.kind == "min":
            av[:] = np.minimum(av, bv)
        else:
            av[:] = np.maximum(av, bv)
        return np.uint64(a[0])

    def _hash(self, keys: npt.ArrayLike) -> tuple[U64Array, U64Array | None]:
        arr = np.asarray(keys)
        if self.key_words:
            if arr.dtype.kind != "S":
                msg = f"keys of a {self.key_dtype} state must be a numpy S array; got dtype {arr.dtype}"
                raise ValueError(msg)
            if arr.dtype.itemsize > self.key_dtype.itemsize:
                msg = f"keys of {arr.dtype.itemsize} bytes do not fit a state of {self.key_dtype} keys"
                raise ValueError(msg)
            words = np.ascontiguousarray(arr, self.key_dtype).view(np.uint64).reshape(len(arr), self.key_words)
            return hash_words(words), words
        if arr.dtype.kind not in "iu" or arr.dtype == np.uint64:
            msg = f"keys of an int64 state must be an int array; got dtype {arr.dtype}"
            raise ValueError(msg)
        return mix64(np.ascontiguousarray(arr, np.int64).view(np.uint64)), None

    # ------------------------------------------------------------------ memory
    def _allocate(self, p: int, need: int) -> tuple[MemorySegment, int]:
        """A zeroed block for partition ``p`` holding ``need`` keys at max_load; evicts others to make room.

        Raises:
            OutOfMemoryError: the block does not fit even with every other partition evicted.
        """
        cap = MIN_CAPACITY
        while cap * self.max_load < need:
            cap *= 2
        nbytes = cap * self.row_bytes
        while True:
            seg = self.share.try_allocate(nbytes)
            if seg is not None:
                seg.fill(0)
                return seg, cap
            if not self._evict_one(keep=p):
                msg = (f"{self.name}: one partition of {need} keys needs {nbytes} bytes of managed memory and "
                       f"the share of {self.share.owner!r} has {self.share.available_bytes} of "
                       f"{self.share.share_bytes} left with every other partition on disk; raise {MEMORY_KEY}")
                raise OutOfMemoryError(msg)

    def _install(self, part: _Partition, seg: MemorySegment, cap: int) -> None:
        part.seg = seg
        part.table = seg.as_array(np.uint64, cap * self.width).reshape(cap, self.width)
        part.capacity = cap
        part.limit = max(1, int(cap * self.max_load))

    def _reinsert(self, part: _Partition, rows: U64Array) -> None:
        """Insert distinct keys' rows into the partition's (new, empty) table."""
        if not len(rows):
            return
        assert part.table is not None
        rows = np.require(rows, np.uint64, ["C", "A"])
        scratch = np.empty(len(rows), np.uint64)
        done, _ = self._emit(part.table, part.capacity, rows, 0, len(rows), scratch)
        assert done == len(rows), "a new table holds its keys at max_load"

    def _grow(self, p: int, need: int) -> None:
        """Move partition ``p`` into a block for ``need`` keys (rows are copied to the heap when both do not fit)."""
        part = self._parts[p]
        assert part.seg is not None and part.table is not None
        old_seg, old_table = part.seg, part.table
        cap = MIN_CAPACITY
        while cap * self.max_load < need:
            cap *= 2
        seg = self.share.try_allocate(cap * self.row_bytes)
        while seg is None and self._evict_one(keep=p):
            seg = self.share.try_allocate(cap * self.row_bytes)
        if seg is not None:  # old and new blocks side by side
            seg.fill(0)
            live = old_table[old_table[:, 0] != 0]
            part.table = None
            self.share.release(old_seg)
            self._install(part, seg, cap)
            self._reinsert(part, live)
            return
        live = old_table[old_table[:, 0] != 0].copy()  # only the new block fits: the rows wait on the heap
        part.seg = part.table = None
        self.share.release(old_seg)
        seg, cap = self._allocate(p, need)
        self._install(part, seg, cap)
        self._reinsert(part, live)

    def _evict_one(self, keep: int) -> bool:
        """Write the least recently used resident partition other than ``keep`` to disk; False if none."""
        victim = -1
        oldest = 0
        for q, part in enumerate(self._parts):
            if q != keep and part.seg is not None and (victim < 0 or part.last_used < oldest):
                victim, oldest = q, part.last_used
        if victim < 0:
            return False
        self._evict(victim)
        return True

    def _evict(self, p: int) -> None:
        """Write partition ``p``'s rows to a spill file of its own, from its block, and give the block back."""
        part = self._parts[p]
        assert part.seg is not None and part.table is not None
        table, seg = part.table, part.seg
        if part.rows:
            io = self._io_manager()
            nbytes = self._pack(table, table) * self.row_bytes  # in place, at the block's start
            f: SpillFile | None = None
            try:
                f = io.create_spill_file(f"{self.name}-{p}")
                part.block = f.write(seg, nbytes)
            except SpillError as exc:
                if f is not None:
                    f.delete()
                err = spill_error("write to", getattr(exc, "path", io.directory), exc)
                raise err from exc
            part.spill = f
            self._spilled_bytes += nbytes
        part.seg = part.table = None
        part.capacity = part.limit = 0
        self.share.release(seg)
        self._evictions += 1

    def _load(self, p: int, extra: int) -> None:
        """Bring partition ``p`` back into a block with room for ``extra`` more keys (its rows read into it)."""
        part = self._parts[p]
        seg, cap = self._allocate(p, part.rows + extra)
        self._install(part, seg, cap)
        f, ref = part.spill, part.block
        if f is None or ref is None:
            return
        try:
            f.read(ref, seg)
        except SpillError as exc:
            err = spill_error("read", f.path, exc)
            raise err from exc
        rows = seg.as_array(np.uint64, ref.nbytes // 8).reshape(-1, self.width).copy()
        seg.fill(0)
        self._reinsert(part, rows)
        part.spill = part.block = None
        f.delete()
        self._loads += 1

    def _pack(self, table: U64Array, out: Any) -> int:
        """Copy ``table``'s occupied rows to the start of ``out`` (which may be ``table``); returns how many."""
        if self.compiled:
            return _kernels.pack_rows(table, len(table), self.width, out)
        live = table[table[:, 0] != 0]
        np.frombuffer(out, np.uint64, live.size)[:] = live.reshape(-1)
        return len(live)

    def _io_manager(self) -> IOManager:
        if self._io is None:
            if self._io_source is None or isinstance(self._io_source, IOManager):
                msg = (f"{self.name}: the share of {self.share.owner!r} ({self.share.share_bytes} bytes) is full "
                       f"and there is no IOManager to evict partitions to; raise {MEMORY_KEY}")
                raise OutOfMemoryError(msg)
            self._io = self._io_source()
        return self._io

    # ------------------------------------------------------------------ output
    def _rows_to_keys(self, rows: U64Array) -> npt.NDArray[Any]:
        if self.key_words:
            words = np.ascontiguousarray(rows[:, 1:1 + self.key_words])
            return words.view(self.key_dtype).reshape(len(words))
        return unmix64(np.ascontiguousarray(rows[:, 0])).view(np.int64)

    def items(self) -> Iterator[tuple[npt.NDArray[Any], NumArray]]:
        """Every key and its accumulator, as ``(keys, accumulators)`` array pairs (copies), partition by partition.

        Evicted partitions are read from their spill files onto the heap one at a time, not loaded back: a
        checkpoint's snapshot evicts nothing (loading them evicted the partitions in use, which the job then
        loaded again: W5 with a checkpoint every second spent a fifth of its time in those loads and evictions).
        """
        if self._zero is not None:
            yield (np.array([unmix64(np.zeros(1, np.uint64))[0]], np.uint64).view(np.int64),
                   np.array([self._zero], np.uint64).view(self.value_dtype))
        for part in self._parts:
            if part.spill is not None and part.block is not None:
                rows = self._spilled_rows(part.spill, part.block)
            elif part.table is not None:
                rows = part.table[part.table[:, 0] != 0]
            else:
                continue
            if len(rows):
                yield self._rows_to_keys(rows), np.ascontiguousarray(rows[:, -1]).view(self.value_dtype)

    # ------------------------------------------------------------- checkpoints
    def images(self) -> tuple[np.uint64 | None, list[Any]]:
        """The state for a checkpoint: the side accumulator of the int key hashing to 0 (or None), and per
        partition its live rows, packed, as a lazy buffer that copies them where the snapshot goes (a
        :class:`PackedRows` of a table in memory, a :class:`SpilledRows` of an evicted partition's file), or
        None for an empty one. Nothing is evicted or loaded, nothing copied to the heap; the caller copies the
        rows before the state changes.

        Restored by :meth:`restore_images` (the rows inserted again, by the compiled kernel)."""
        out: list[Any] = []
        for part in self._parts:
            if part.table is not None and part.rows:
                out.append(PackedRows(self, part.table, part.rows))
            elif part.spill is not None and part.block is not None:
                out.append(SpilledRows(part.spill, part.block))
            else:
                out.append(None)
        return self._zero, out

    def restore_images(self, zero: int | None, images: list[Any]) -> None:
        """Take back :meth:`images` (each partition's rows as a buffer of uint64, or None) into this new, empty
        state: each partition's rows are inserted into a table of their own (evicting others as usual when
        the share is full); with another partition count, every row goes where its hash says.

        Raises:
            ValueError: the state is not empty, or the rows are not of this state's width.
            OutOfMemoryError: as :meth:`update`.
        """
        if len(self) or any(part.spill is not None for part in self._parts):
            msg = f"{self.name}: restore_images() needs a new, empty state; this one holds {len(self)} keys"
            raise ValueError(msg)
        if zero is not None:
            self._zero = np.uint64(zero)
        same_layout = len(images) == len(self._parts)
        for p, data in enumerate(images):
            if data is None:
                continue
            rows = np.frombuffer(data, np.uint64)
            if len(rows) % self.width:
                msg = (f"{self.name}: a snapshot's partition holds {len(rows)} words, not rows of {self.width}; "
                       f"it was taken of another key type")
                raise ValueError(msg)
            rows = np.require(rows.reshape(-1, self.width), np.uint64, ["C", "A"])
            if same_layout:
                part = self._parts[p]
                seg, cap = self._allocate(p, len(rows))
                self._install(part, seg, cap)
                self._reinsert(part, rows)
                part.rows = len(rows)
                self._tick += 1
                part.last_used = self._tick
            else:
                self._update_rows(rows, np.empty(len(rows), np.uint64), None)

    def _spilled_rows(self, f: SpillFile, ref: BlockRef) -> U64Array:
        """An evicted partition's rows (its live rows, as :meth:`_evict` wrote them), read onto the heap."""
        try:
            data = f.read_copy(ref)
        except SpillError as exc:
            err = spill_error("read", f.path, exc)
            raise err from exc
        return np.frombuffer(data, np.uint64).reshape(-1, self.width)

    def __len__(self) -> int:
        return sum(part.rows for part in self._parts) + (self._zero is not None)

    def stats(self) -> StreamingStateStats:
        disk = sum(part.block.nbytes for part in self._parts if part.block is not None)
        return StreamingStateStats(len(self), self.share.used_bytes, disk, self._loads, self._evictions,
                                   self._spilled_bytes)

    def release(self) -> None:
        """Forget every key: give every block and the staging page back, delete every spill file. Idempotent."""
        for part in self._parts:
            seg, part.seg, part.table = part.seg, None, None
            if seg is not None:
                self.share.release(seg)
            spill, part.spill, part.block = part.spill, None, None
            if spill is not None:
                spill.delete()
            part.rows = part.capacity = part.limit = 0
        self._zero = None

    def __repr__(self) -> str:
        resident = sum(part.seg is not None for part in self._parts)
        return (f"<StreamingFixedState {self.kind} {len(self)} keys, {resident}/{len(self._parts)} partitions "
                f"in memory>")
