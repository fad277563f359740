"""Hybrid-hash aggregation over managed hash tables: spill partitions to disk (final) or emit (combine).

Imports: runtime.managed, runtime.memory, runtime.io, runtime.errors (numpy, msgpack and stdlib otherwise).

:class:`HashAggregator` splits keys into 16 partitions by 4 bits of their
64-bit hash (the top bits first) and keeps one table per partition, all in one
:class:`~runtime.managed.share.ManagedShare`.

- ``mode="final"``: when a table needs room the share does not have, the
  largest in-memory partition is written to a spill file through the
  IOManager (its table's rows, through a staging page) and its memory goes back
  to the share; later rows of a spilled partition are appended to its file as
  pre-aggregated partials. When the input ends, the in-memory partitions are
  emitted first, then each spilled partition is read back and aggregated alone,
  with the whole share, by a next *level* that partitions by the next 4 hash
  bits and spills again if it still does not fit (recursive hybrid hash).
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
from typing import TypeAlias

import numpy as np

from runtime.errors import OutOfMemoryError
from runtime.io import IOManager
from runtime.managed.hash_table import (
    MIN_CAPACITY,
    AggLike,
    Columns,
    FixedHashTable,
    check_share,
    parse_aggs,
    preaggregate_rows,
)
from runtime.managed.serialized_table import SerializedBatch, SerializedHashTable, unpacker
from runtime.managed.share import ManagedShare, SpillCounters, SpillStream
from runtime.memory.manager import MemoryManager
from runtime.memory.segment import MemorySegment
from runtime.memory.snapshot import Snapshot

__all__ = ["HashAggregator", "HashAggregatorStats", "PARTITION_BITS"]

PARTITION_BITS = 4
PARTITIONS = 1 << PARTITION_BITS
MAX_LEVEL = 64 // PARTITION_BITS - 1
Table: TypeAlias = FixedHashTable | SerializedHashTable
Batch: TypeAlias = np.ndarray | SerializedBatch
Result: TypeAlias = Columns | list


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


class _Form:
    """What the aggregator needs from a table form; the two forms below fill it in."""

    def __init__(self, make: Callable[[], Table]) -> None:
        self.make = make
        self.proto = make()  # a table that never allocates: prepares batches

    def partition(self, batch: Batch, level: int) -> Iterator[tuple[int, Batch]]:
        raise NotImplementedError

    def encode(self, batch: Batch) -> bytes:
        raise NotImplementedError

    def table_chunks(self, table: Table) -> Iterator[bytes]:
        raise NotImplementedError

    def read(self, stream: SpillStream, stage: MemorySegment) -> Iterator[Batch]:
        raise NotImplementedError


def _shift(level: int) -> np.uint64:
    return np.uint64(64 - PARTITION_BITS * (level + 1))


class _FixedForm(_Form):
    def partition(self, batch: np.ndarray, level: int) -> Iterator[tuple[int, np.ndarray]]:
        # Rows are sorted by hash and share the bits above this level's: partitions are runs.
        part = (batch[:, 0] >> _shift(level)) & np.uint64(PARTITIONS - 1)
        bounds = np.searchsorted(part, np.arange(PARTITIONS + 1, dtype=np.uint64)).tolist()
        for p in range(PARTITIONS):
            if bounds[p + 1] > bounds[p]:
                yield p, batch[bounds[p]:bounds[p + 1]]

    def encode(self, batch: np.ndarray) -> bytes:
        return np.ascontiguousarray(batch).tobytes()

    def table_chunks(self, table: Table) -> Iterator[bytes]:
        for rows in table.rows():  # type: ignore[union-attr]
            yield rows.tobytes()

    def read(self, stream: SpillStream, stage: MemorySegment) -> Iterator[np.ndarray]:
        proto = self.proto
        row_bytes, width = proto.row_bytes, proto.width
        pending = b""
        for block in stream.read_blocks(stage):
            data = pending + block if pending else block
            whole = len(data) - len(data) % row_bytes
            pending = data[whole:]
            if whole:
                rows = np.frombuffer(data, np.uint64, whole // 8).reshape(-1, width)
                yield preaggregate_rows(rows, proto.aggs)
        assert not pending, "a spill stream of rows ends on a row boundary"


class _SerializedForm(_Form):
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
        return self.proto.encode_batch(batch)  # type: ignore[union-attr]

    def table_chunks(self, table: Table) -> Iterator[bytes]:
        return table.spill_chunks()  # type: ignore[union-attr]

    def read(self, stream: SpillStream, stage: MemorySegment) -> Iterator[SerializedBatch]:
        up = unpacker()
        decode = self.proto.decode_chunk  # type: ignore[union-attr]
        for block in stream.read_blocks(stage):
            up.feed(block)
            for chunk in up:
                yield decode(chunk)


class _Level:
    """The tables and spill streams of one recursion level (level 0 takes the input)."""

    def __init__(self, agg: HashAggregator, level: int) -> None:
        if level > MAX_LEVEL:
            msg = (f"hash aggregation of {agg.share.owner!r} has re-partitioned {level} times and a partition "
                   f"still does not fit its share of {agg.share.share_bytes} bytes (a record larger than "
                   f"the share?); raise memory.managed.fraction")
            raise OutOfMemoryError(msg)
        self.agg = agg
        self.level = level
        self.tables: list[Table | None] = [None] * PARTITIONS
        self.streams: list[SpillStream | None] = [None] * PARTITIONS
        agg.max_level = max(agg.max_level, level)

    def add(self, batch: Batch) -> list[Result]:
        agg, form = self.agg, self.agg.form
        emitted: list[Result] = []
        for p, sub in form.partition(batch, self.level):
            if self.streams[p] is not None:
                self.streams[p].write(form.encode(sub), agg.stage_out)  # type: ignore[union-attr]
                continue
            table = self.tables[p]
            if table is None:
                table = self.tables[p] = form.make()
            rest = table.upsert(sub)  # type: ignore[arg-type]
            while rest is not None:
                if agg.mode == "combine":
                    if not any(t is not None and len(t) for t in self.tables):
                        msg = "an empty combiner table took no rows"
                        raise AssertionError(msg)
                    emitted.extend(self.emit_all())
                    table = self.tables[p] = form.make()
                    rest = table.upsert(rest)  # type: ignore[arg-type]
                    continue
                victim = max(range(PARTITIONS), key=lambda q: -1 if self.tables[q] is None
                             else self.tables[q].nbytes)  # type: ignore[union-attr]
                self.spill(victim)
                if victim == p:
                    self.streams[p].write(form.encode(rest), agg.stage_out)  # type: ignore[union-attr]
                    rest = None
                else:
                    rest = table.upsert(rest)  # type: ignore[arg-type]
        return emitted

    def spill(self, p: int) -> None:
        """Write partition ``p``'s table to a new spill file and give its memory back."""
        agg = self.agg
        stream = SpillStream(agg.io, f"{agg.name}-L{self.level}-p{p}", agg.counters)  # type: ignore[arg-type]
        self.streams[p] = stream
        table = self.tables[p]
        self.tables[p] = None
        if table is not None:
            try:
                for chunk in agg.form.table_chunks(table):
                    stream.write(chunk, agg.stage_out)
            finally:
                table.release()

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
            for p, stream in enumerate(self.streams):
                if stream is None:
                    continue
                agg = self.agg
                agg.counters.spill_passes += 1
                sub = _Level(agg, self.level + 1)
                try:
                    for batch in agg.form.read(stream, agg.stage_in):
                        sub.add(batch)
                    stream.delete()
                    self.streams[p] = None
                    yield from sub.finish()
                finally:
                    sub.release()
        finally:
            self.release()

    def release(self) -> None:
        """Release every table and delete every spill file of this level. Idempotent."""
        for p in range(PARTITIONS):
            table, self.tables[p] = self.tables[p], None
            if table is not None:
                table.release()
            stream, self.streams[p] = self.streams[p], None
            if stream is not None:
                stream.delete()


class HashAggregator:
    """Hash aggregation in a share of managed memory that spills (final) or emits (combine) when full.

    Keys are ``key_type`` ``"int64"``/``"float64"`` (numpy columns, the
    fixed-width table) or ``"object"`` (any msgpack-able key, the serialized
    table). ``aggs`` are count/sum/min/max accumulators; with ``key_type="object"``
    ``reduce_fn`` may replace them. Feed :meth:`add_batch` (records) or
    :meth:`add_partials` (a combiner's output), then read :meth:`results`.
    Result batches are ``{"key": ..., name: ...}`` numpy columns (fixed) or
    lists of ``(key, value)`` (serialized).

    Ownership: everything lives in a :class:`ManagedShare` of ``share_bytes``
    taken from ``memory`` for ``owner``: the tables' blocks and pages, and in
    final mode two staging pages for spill I/O (taken at construction). Spill
    files are created in ``io``'s directory and deleted as soon as they are
    read back, in :meth:`release` and when :meth:`results` ends or fails.
    :meth:`release` (or leaving a ``with`` block) gives every page back,
    also after an exception. Results are copies that outlive the aggregator.
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
        if key_type not in ("int64", "float64", "object"):
            msg = f"key_type must be 'int64', 'float64' or 'object'; got {key_type!r}"
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
        if key_type == "object":
            aggs_t = None if reduce_fn is not None else parse_aggs(aggs)
            width = 5 if reduce_fn is not None else 3 + len(aggs_t)  # type: ignore[arg-type]
            least = share.block_size(MIN_CAPACITY * 8 * width) + page
            self.form: _Form = _SerializedForm(lambda: SerializedHashTable(
                share, aggs_t, reduce_fn=reduce_fn, max_load=max_load))
        else:
            width = 1 + len(parse_aggs(aggs))
            least = share.block_size(MIN_CAPACITY * 8 * width)
            self.form = _FixedForm(lambda: FixedHashTable(share, aggs, key_dtype=key_type, max_load=max_load))
        if mode == "final":
            least += 2 * page
        check_share(share, least, f"{mode} hash aggregation ({key_type} keys)")
        self.stage_out: MemorySegment | None = None
        self.stage_in: MemorySegment | None = None
        if mode == "final":
            self.stage_out, self.stage_in = memory.allocate_pages(owner, 2)
            for seg in (self.stage_out, self.stage_in):
                share._take(seg)
        self._root: _Level | None = _Level(self, 0)
        self._closed = False

    # ------------------------------------------------------------------ input
    def add_batch(self, keys: Sequence[object] | np.ndarray, values: Sequence[object] | np.ndarray | None = None
                  ) -> list[Result]:
        """Aggregate records. Returns the partials emitted (combine mode, when full); ``[]`` otherwise."""
        root = self._check_open()
        out: list[Result] = []
        step = 1 << 16
        for i in range(0, len(keys), step):
            vals = None if values is None else values[i:i + step]
            out.extend(root.add(self.form.proto.prepare(keys[i:i + step], vals)))  # type: ignore[arg-type]
        return out

    def add_partials(self, partials: Columns | Sequence[tuple[object, object]]) -> list[Result]:
        """Merge a combiner's partials (``{"key":..., name:...}`` columns, or ``(key, acc)`` pairs)."""
        root = self._check_open()
        return root.add(self.form.proto.prepare_partials(partials))  # type: ignore[arg-type]

    def _check_open(self) -> _Level:
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
            self.stage_out = self.stage_in = None
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
