"""Hybrid-hash aggregation over managed hash tables: spill partitions to disk (final) or emit (combine).

Imports: runtime.managed, runtime.memory, runtime.io, runtime.errors (numpy, msgpack and stdlib otherwise).

:class:`HashAggregator` splits keys into 16 partitions by 4 bits of their
64-bit hash (the top bits first) and keeps one table per partition, all in one
:class:`~runtime.managed.share.ManagedShare`.

- ``mode="final"``: when a table needs room the share does not have, the
  largest in-memory partition is spilled through the IOManager (its table's
  rows, through a staging page) and its memory goes back to the share; later
  rows of a spilled partition are appended to its stream as pre-aggregated
  partials. When the input ends, the in-memory partitions are emitted first,
  then each spilled partition is read back and aggregated alone, with the
  whole share, by a next *level* that partitions by the next 4 hash bits and
  spills again if it still does not fit (recursive hybrid hash).
- Spill files: one per recursion depth (:class:`~runtime.managed.share.PartitionedSpill`),
  not one per partition: the partitions' streams interleave in it, each block
  tagged by its partition. Levels of one depth run one after the other, so
  when a level has read back all its partitions its depth's file holds no
  live byte, and the next level of that depth appends to it; once it holds
  ``SPILL_FILE_REUSE_BYTES`` it is deleted instead and the next level starts
  a new one. Tiny shares recurse deep and spill thousands of partitions (one
  file each, before): the file count is now about the depth, and the dead
  bytes on disk stay below that bound per depth.
- ``mode="combine"``: when full, every partial is emitted and the tables start
  again empty; nothing goes to disk. The output of :meth:`HashAggregator.add_batch`
  is then the partials to send on (a combiner before the shuffle).

Two staging pages serve every level: levels write spill files through one and
read them back through the other (a level reads only after its parent has
finished feeding it, so the two never collide).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeAlias, TypeVar

import numpy as np

from runtime.errors import OutOfMemoryError
from runtime.io import IOManager
from runtime.managed.hash_table import (
    MIN_CAPACITY,
    AggLike,
    Columns,
    FixedHashTable,
    bytes_key_dtype,
    check_share,
    parse_aggs,
)
from runtime.managed.serialized_table import SerializedBatch, SerializedHashTable, unpacker
from runtime.managed.share import ManagedShare, NumArray, PartitionedSpill, SpillCounters, U64Array
from runtime.memory.manager import MemoryManager
from runtime.memory.segment import MemorySegment
from runtime.memory.snapshot import Snapshot

__all__ = ["MAX_LEVEL", "PARTITIONS", "PARTITION_BITS", "SPILL_FILE_REUSE_BYTES", "HashAggregator",
           "HashAggregatorStats", "Pairs", "Result"]

PARTITION_BITS = 4
PARTITIONS = 1 << PARTITION_BITS
MAX_LEVEL = 64 // PARTITION_BITS - 1
# A depth's spill file is reused by the next level of that depth until it holds this many bytes (all of
# them dead once a level is done), then deleted: bounds the dead bytes on disk per depth.
SPILL_FILE_REUSE_BYTES = 64 << 20
Pairs: TypeAlias = list[tuple[object, object]]  # (key, value) results of the serialized form
Result: TypeAlias = Columns | Pairs
Keys: TypeAlias = Sequence[object] | NumArray
Partials: TypeAlias = Columns | Sequence[tuple[object, object]]
B = TypeVar("B", U64Array, SerializedBatch)  # a form's batch: fixed-width rows or a serialized batch


@dataclass(frozen=True)
class HashAggregatorStats(Snapshot):
    """Counters of a HashAggregator. ``spill_passes`` counts spilled partitions read back and aggregated."""

    mode: str
    spilled_bytes: int
    spill_files: int
    spill_passes: int
    blocks_written: int
    blocks_read: int
    max_level: int  # deepest recursion level that ran (0: nothing was re-partitioned)
    emits: int  # times the combiner emitted everything because it was full
    managed_peak_bytes: int
    managed_bytes: int
    share_bytes: int


class _Table(Protocol[B]):
    """What a level needs from a table (FixedHashTable and SerializedHashTable both are one)."""

    @property
    def nbytes(self) -> int: ...

    def __len__(self) -> int: ...

    def upsert(self, batch: B) -> B | None: ...

    def spill_chunks(self) -> Iterator[bytes]: ...

    def drain(self) -> Iterator[Result]: ...

    def release(self) -> None: ...


class _Form(Generic[B]):
    """What the aggregator needs from a table form; the two forms below fill it in."""

    def make(self) -> _Table[B]:
        raise NotImplementedError

    def prepare(self, keys: Keys, values: Keys | None) -> B:
        """Raw records -> a batch unique by key."""
        raise NotImplementedError

    def prepare_partials(self, partials: Partials) -> B:
        """A combiner's output -> a batch unique by key."""
        raise NotImplementedError

    def partition(self, batch: B, level: int) -> Iterator[tuple[int, B]]:
        raise NotImplementedError

    def encode(self, batch: B) -> bytes:
        raise NotImplementedError

    def read(self, blocks: Iterator[bytes]) -> Iterator[B]:
        """Batches back from the blocks of one spilled partition (chunks may span blocks)."""
        raise NotImplementedError


def _is_bytes_key(key_type: str) -> bool:
    """Whether ``key_type`` names byte-string keys (``"S16"``) a fixed-width table can take."""
    try:
        return bytes_key_dtype(key_type) is not None
    except (TypeError, ValueError):
        return False


def _shift(level: int) -> np.uint64:
    return np.uint64(64 - PARTITION_BITS * (level + 1))


class _FixedForm(_Form[U64Array]):
    def __init__(self, make: Callable[[], FixedHashTable]) -> None:
        self._make = make
        self.proto = make()  # a table that never allocates: prepares batches

    def make(self) -> FixedHashTable:
        return self._make()

    def prepare(self, keys: Keys, values: Keys | None) -> U64Array:
        return self.proto.prepare(np.asarray(keys), None if values is None else np.asarray(values))

    def prepare_partials(self, partials: Partials) -> U64Array:
        if not isinstance(partials, dict):
            msg = (f"partials of a fixed-width aggregation must be {{'key': ..., name: ...}} columns; "
                   f"got {type(partials).__name__}")
            raise TypeError(msg)
        return self.proto.prepare_partials(partials)

    def partition(self, batch: U64Array, level: int) -> Iterator[tuple[int, U64Array]]:
        # Rows share the hash bits above this level's. Sorted by hash (the numpy probe loop's), the
        # partitions are runs already; else a stable radix sort of the 4 bits makes them runs.
        part = ((batch[:, 0] >> _shift(level)) & np.uint64(PARTITIONS - 1)).astype(np.uint8)
        if len(part) > 1 and (part[1:] < part[:-1]).any():
            order = np.argsort(part, kind="stable")
            batch, part = batch[order], part[order]
        bounds = np.searchsorted(part, np.arange(PARTITIONS + 1, dtype=np.uint8)).tolist()
        for p in range(PARTITIONS):
            if bounds[p + 1] > bounds[p]:
                yield p, batch[bounds[p]:bounds[p + 1]]

    def encode(self, batch: U64Array) -> bytes:
        return np.ascontiguousarray(batch).tobytes()

    def read(self, blocks: Iterator[bytes]) -> Iterator[U64Array]:
        proto = self.proto
        row_bytes, width = proto.row_bytes, proto.width
        pending = b""
        for block in blocks:
            data = pending + block if pending else block
            whole = len(data) - len(data) % row_bytes
            pending = data[whole:]
            if whole:
                rows = np.frombuffer(data, np.uint64, whole // 8).reshape(-1, width)
                yield proto.preaggregate(rows)
        assert not pending, "a spilled partition of rows ends on a row boundary"


class _SerializedForm(_Form[SerializedBatch]):
    def __init__(self, make: Callable[[], SerializedHashTable]) -> None:
        self._make = make
        self.proto = make()  # a table that never allocates: prepares batches

    def make(self) -> SerializedHashTable:
        return self._make()

    def prepare(self, keys: Keys, values: Keys | None) -> SerializedBatch:
        # msgpack packs Python ints and floats, not numpy scalars
        ks: Sequence[object] = keys.tolist() if isinstance(keys, np.ndarray) else keys
        if isinstance(values, np.ndarray) and self.proto.reduce_fn is not None:
            values = values.tolist()
        return self.proto.prepare(ks, values)

    def prepare_partials(self, partials: Partials) -> SerializedBatch:
        if isinstance(partials, dict):
            msg = "partials of an object-key aggregation must be (key, value) pairs; got a dict of columns"
            raise TypeError(msg)
        return self.proto.prepare_partials(partials)

    def partition(self, batch: SerializedBatch, level: int) -> Iterator[tuple[int, SerializedBatch]]:
        part = (batch.fps >> _shift(level)) & np.uint64(PARTITIONS - 1)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(PARTITIONS + 1, dtype=np.uint64)).tolist()
        n = len(part)
        for p in range(PARTITIONS):
            lo, hi = bounds[p], bounds[p + 1]
            if hi > lo:
                yield p, (batch if hi - lo == n else batch.take(order[lo:hi]))

    def encode(self, batch: SerializedBatch) -> bytes:
        return self.proto.encode_batch(batch)

    def read(self, blocks: Iterator[bytes]) -> Iterator[SerializedBatch]:
        up = unpacker()
        decode = self.proto.decode_chunk
        for block in blocks:
            up.feed(block)
            for chunk in up:
                yield decode(chunk)


class _Level(Generic[B]):
    """The tables and the spill file of one recursion level (level 0 takes the input).

    Ownership: the level's tables take their memory from the aggregator's
    share. Its spill file belongs to the aggregator (one per depth, see
    :meth:`HashAggregator.spill_file`); the level writes and reads only its own
    partitions there and hands the file back in :meth:`release` (also at the
    end of :meth:`finish`).
    """

    def __init__(self, agg: HashAggregator, form: _Form[B], level: int) -> None:
        if level > MAX_LEVEL:
            msg = (f"hash aggregation of {agg.share.owner!r} has re-partitioned {level} times and a partition "
                   f"still does not fit its share of {agg.share.share_bytes} bytes (a record larger than "
                   f"the share?); raise memory.managed.fraction")
            raise OutOfMemoryError(msg)
        self.agg = agg
        self.form: _Form[B] = form
        self.level = level
        self.tables: list[_Table[B] | None] = [None] * PARTITIONS
        self.spill: PartitionedSpill | None = None  # this depth's file, taken at the first spill (final mode)
        agg.max_level = max(agg.max_level, level)

    def add_records(self, keys: Keys, values: Keys | None) -> list[Result]:
        return self.add(self.form.prepare(keys, values))

    def add_partials(self, partials: Partials) -> list[Result]:
        return self.add(self.form.prepare_partials(partials))

    def add(self, batch: B) -> list[Result]:
        agg, form = self.agg, self.form
        emitted: list[Result] = []
        for p, sub in form.partition(batch, self.level):
            if self.spill is not None and p in self.spill:
                self.spill.write(p, form.encode(sub), agg.staging()[0])
                continue
            table = self.tables[p]
            if table is None:
                table = self.tables[p] = form.make()
            rest = table.upsert(sub)
            while rest is not None:
                if agg.mode == "combine":
                    if not any(t is not None and len(t) for t in self.tables):
                        msg = "an empty combiner table took no rows"
                        raise AssertionError(msg)
                    emitted.extend(self.emit_all())
                    table = self.tables[p] = form.make()
                    rest = table.upsert(rest)
                    continue
                victim = max(range(PARTITIONS), key=self._held_bytes)
                spill = self.spill_partition(victim)
                if victim == p:
                    spill.write(p, form.encode(rest), agg.staging()[0])
                    rest = None
                else:
                    rest = table.upsert(rest)
        return emitted

    def _held_bytes(self, p: int) -> int:
        table = self.tables[p]
        return -1 if table is None else table.nbytes

    def spill_partition(self, p: int) -> PartitionedSpill:
        """Write partition ``p``'s table to this level's spill file and give its memory back."""
        agg = self.agg
        spill = self.spill
        if spill is None:
            spill = self.spill = agg.spill_file(self.level)
        spill.open_part(p)
        table, self.tables[p] = self.tables[p], None
        if table is not None:
            try:
                stage = agg.staging()[0]
                for chunk in table.spill_chunks():
                    spill.write(p, chunk, stage)
            finally:
                table.release()
        return spill

    def emit_all(self) -> list[Result]:
        """Every table's rows as results (copies); the tables are released."""
        out: list[Result] = []
        for p, table in enumerate(self.tables):
            if table is not None:
                self.tables[p] = None
                out.extend(table.drain())
        self.agg.emits += 1
        return out

    def finish(self) -> Iterator[Result]:
        """Results of the in-memory partitions, then of each spilled one (recursively). Releases as it goes."""
        try:
            for p, table in enumerate(self.tables):
                if table is not None:
                    self.tables[p] = None
                    yield from table.drain()
            spill = self.spill
            if spill is None:
                return
            agg = self.agg
            for p in spill.parts():
                agg.counters.spill_passes += 1
                sub = _Level(agg, self.form, self.level + 1)
                try:
                    for batch in self.form.read(spill.read_blocks(p, agg.staging()[1])):
                        sub.add(batch)
                    spill.drop(p)
                    yield from sub.finish()
                finally:
                    sub.release()
        finally:
            self.release()

    def release(self) -> None:
        """Release every table and hand this depth's spill file back (its partitions forgotten). Idempotent."""
        for p in range(PARTITIONS):
            table, self.tables[p] = self.tables[p], None
            if table is not None:
                table.release()
        spill, self.spill = self.spill, None
        if spill is not None:
            self.agg.spill_file_done(self.level)


class HashAggregator:
    """Hash aggregation in a share of managed memory that spills (final) or emits (combine) when full.

    Keys are ``key_type`` ``"int64"``/``"float64"`` or ``"S<n>"`` (numpy columns,
    the fixed-width table; byte strings of at most n bytes, n a multiple of 8) or
    ``"object"`` (any msgpack-able key, the serialized table). ``aggs`` are
    count/sum/min/max accumulators; with ``key_type="object"``
    ``reduce_fn`` may replace them. Feed :meth:`add_batch` (records) or
    :meth:`add_partials` (a combiner's output), then read :meth:`results`.
    Result batches are ``{"key": ..., name: ...}`` numpy columns (fixed) or
    lists of ``(key, value)`` (serialized).

    Ownership: everything lives in a :class:`ManagedShare` of ``share_bytes``
    taken from ``memory`` for ``owner``: the tables' blocks and pages, and in
    final mode two staging pages for spill I/O (taken at construction with
    :meth:`ManagedShare.allocate_pages`). Spill files (about one per
    recursion depth, see the module docstring) are created in ``io``'s
    directory and deleted in :meth:`release`, which runs when :meth:`results`
    ends or fails. :meth:`release` (or leaving a ``with``
    block) gives every page back, also after an exception. Results are copies
    that outlive the aggregator.
    Process: the worker owning ``memory`` and ``io``. Not thread-safe.

    Raises:
        InvalidSizeError: ``share_bytes`` below what one level needs to make progress.
        OutOfMemoryError: the manager cannot give the two staging pages.
        SpillError: a spill file cannot be written or read (names ``io.tmp-dirs`` and the path).
    """

    def __init__(self, memory: MemoryManager, owner: Hashable, share_bytes: int, io: IOManager | None = None, *,
                 aggs: Sequence[AggLike] = ("count",), key_type: str = "int64",
                 reduce_fn: Callable[[object, object], object] | None = None, mode: str = "final",
                 max_load: float = 0.7, name: str = "hashagg") -> None:
        if mode not in ("final", "combine"):
            msg = f"mode must be 'final' or 'combine'; got {mode!r}"
            raise ValueError(msg)
        if mode == "final" and io is None:
            msg = "mode='final' spills and needs an IOManager; got io=None"
            raise ValueError(msg)
        if key_type not in ("int64", "float64", "object") and not _is_bytes_key(key_type):
            msg = f"key_type must be 'int64', 'float64', 'S<n>' (n a multiple of 8) or 'object'; got {key_type!r}"
            raise ValueError(msg)
        if reduce_fn is not None and key_type != "object":
            msg = f"reduce_fn needs key_type='object' (the serialized table); got {key_type!r}"
            raise ValueError(msg)
        self.share = share = ManagedShare(memory, owner, share_bytes)
        self.io = io
        self.mode = mode
        self.name = name
        self.key_type = key_type
        self.counters = SpillCounters()
        self.max_level = 0
        self.emits = 0
        page = share.page_size
        root: _Level[U64Array] | _Level[SerializedBatch]
        if key_type == "object":
            aggs_t = None if reduce_fn is not None else parse_aggs(aggs)
            width = 5 if aggs_t is None else 3 + len(aggs_t)
            least = share.block_size(MIN_CAPACITY * 8 * width) + page
            root = _Level(self, _SerializedForm(lambda: SerializedHashTable(
                share, aggs_t, reduce_fn=reduce_fn, max_load=max_load)), 0)
        else:
            key_dtype = bytes_key_dtype(key_type)
            width = 1 + (0 if key_dtype is None else key_dtype.itemsize // 8) + len(parse_aggs(aggs))
            least = share.block_size(MIN_CAPACITY * 8 * width)
            root = _Level(self, _FixedForm(lambda: FixedHashTable(
                share, aggs, key_dtype=key_type, max_load=max_load)), 0)
        if mode == "final":
            least += 2 * page
        check_share(share, least, f"{mode} hash aggregation ({key_type} keys)")
        # Staging pages for spill I/O (final mode): [0] writes, [1] reads. Owner: this aggregator.
        self._stages: list[MemorySegment] = share.allocate_pages(2) if mode == "final" else []
        self._spills: dict[int, PartitionedSpill] = {}  # depth -> its spill file. Owner: this aggregator.
        self._root: _Level[U64Array] | _Level[SerializedBatch] | None = root
        self._closed = False

    def staging(self) -> list[MemorySegment]:
        """The two staging pages of spill I/O: ``[0]`` for writes, ``[1]`` for reads (final mode only).

        Ownership: the aggregator's; a level uses them only inside one write or while advancing one read.
        """
        if not self._stages:
            msg = f"hash aggregator {self.name!r} in {self.mode} mode has no staging pages (released, or combine mode)"
            raise AssertionError(msg)
        return self._stages

    def spill_file(self, level: int) -> PartitionedSpill:
        """The spill file of depth ``level`` (created on its first write); one level of that depth uses it at a time.

        Ownership: the aggregator's; the level hands it back with :meth:`spill_file_done`.
        """
        spill = self._spills.get(level)
        if spill is None:
            if self.io is None:
                msg = f"hash aggregator {self.name!r} in {self.mode} mode has no IOManager to spill to"
                raise AssertionError(msg)
            spill = self._spills[level] = PartitionedSpill(self.io, f"{self.name}-L{level}", self.counters)
        return spill

    def spill_file_done(self, level: int) -> None:
        """A level of depth ``level`` is done: forget its partitions; delete the file once it is large.

        See ``SPILL_FILE_REUSE_BYTES``; :meth:`release` deletes whatever is left.
        """
        spill = self._spills.get(level)
        if spill is None:
            return
        spill.clear()
        if spill.nbytes >= SPILL_FILE_REUSE_BYTES:
            del self._spills[level]
            spill.delete()

    # ------------------------------------------------------------------ input
    def add_batch(self, keys: Keys, values: Keys | None = None) -> list[Result]:
        """Aggregate records. Returns the partials emitted (combine mode, when full); ``[]`` otherwise."""
        root = self._check_open()
        out: list[Result] = []
        step = 1 << 16
        for i in range(0, len(keys), step):
            vals = None if values is None else values[i:i + step]
            out.extend(root.add_records(keys[i:i + step], vals))
        return out

    def add_partials(self, partials: Partials) -> list[Result]:
        """Merge a combiner's partials (``{"key":..., name:...}`` columns, or ``(key, acc)`` pairs)."""
        return self._check_open().add_partials(partials)

    def _check_open(self) -> _Level[U64Array] | _Level[SerializedBatch]:
        if self._root is None:
            msg = f"hash aggregator {self.name!r} of {self.share.owner!r} was released or finished"
            raise ValueError(msg)
        return self._root

    # ----------------------------------------------------------------- output
    def results(self) -> Iterator[Result]:
        """Final mode: every key's result, in batches. Combine mode: the partials still held.

        Spilled partitions are aggregated one at a time after the in-memory ones.
        The aggregator is released when the iterator ends, fails or is closed.
        """
        root = self._check_open()
        self._root = None
        try:
            if self.mode == "combine":
                yield from root.emit_all()
            else:
                yield from root.finish()
        finally:
            root.release()
            self.release()

    # --------------------------------------------------------------- lifetime
    def release(self) -> None:
        """Delete every spill file and give every page back to the manager. Idempotent."""
        root, self._root = self._root, None
        try:
            if root is not None:
                root.release()
        finally:
            spills, self._spills = list(self._spills.values()), {}
            try:
                for spill in spills:
                    spill.delete()
            finally:
                self._stages = []
                self.share.release_all()

    def __enter__(self) -> HashAggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def statistics(self) -> HashAggregatorStats:
        c = self.counters
        return HashAggregatorStats(
            mode=self.mode, spilled_bytes=c.spilled_bytes, spill_files=c.spill_files,
            spill_passes=c.spill_passes, blocks_written=c.blocks_written, blocks_read=c.blocks_read,
            max_level=self.max_level, emits=self.emits, managed_peak_bytes=self.share.peak_bytes,
            managed_bytes=self.share.used_bytes, share_bytes=self.share.share_bytes)

    stats = statistics

    def __repr__(self) -> str:
        return f"<HashAggregator {self.name!r} {self.mode} {self.key_type} {self.share!r}>"
