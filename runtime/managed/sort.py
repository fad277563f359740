"""ExternalSorter: sort more records than fit in a share of managed memory, with sorted runs on disk.

Imports: runtime.managed, runtime.memory, runtime.io, runtime.errors (numpy, msgpack, stdlib otherwise).

Records are appended into pages of a :class:`~runtime.managed.share.ManagedShare`.
When the share is full the run is sorted and written to a spill file through
the IOManager (one staging page), and its pages are reused for the next run.
At the end the runs are merged, reading each back block by block; when there
are more runs than the share has pages (the merge fan-in), groups of runs are
first merged into longer runs on disk. Order is ascending, or descending with
``reverse=True``, and **stable** either way (equal keys keep their input order).

Two forms:

- serialized (``key_dtype=None``): any msgpack-able records, ordered by
  ``key(record)`` (default: the record). Records are decoded to sort a run;
  arrays come back as tuples (the rule of :mod:`runtime.managed.serialized_table`).
  The merge is ``heapq.merge`` over run readers (stable: ties go to the earlier run).
- fixed-width (``key_dtype`` int64/float64): numpy key columns with an optional
  int64/float64 value column; runs are sorted with a stable ``argsort`` and
  merged vectorized (each round emits everything below the smallest last key
  of the runs' current blocks). NaN keys are refused.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import numpy.typing as npt

from runtime.errors import OutOfMemoryError
from runtime.io import IOManager
from runtime.managed.hash_table import Columns, check_share
from runtime.managed.serialized_table import RecordArea, unpacker
from runtime.managed.share import IndexArray, ManagedShare, NumArray, SpillCounters, SpillStream, U64Array
from runtime.memory.manager import MemoryManager
from runtime.memory.segment import MemorySegment
from runtime.memory.snapshot import Snapshot

if TYPE_CHECKING:  # pragma: no cover
    from _typeshed import SupportsRichComparison

    SortKey = Callable[[Any], SupportsRichComparison]

__all__ = ["BATCH_ROWS", "ExternalSorter", "SorterStats", "stable_order"]

BATCH_ROWS = 1 << 16


@dataclass(frozen=True)
class SorterStats(Snapshot):
    """Counters of an ExternalSorter. ``spill_passes`` counts merge passes over runs on disk."""

    records: int
    runs: int  # runs written to disk
    spilled_bytes: int
    spill_files: int
    spill_passes: int
    blocks_written: int
    blocks_read: int
    managed_peak_bytes: int
    share_bytes: int


def stable_order(keys: NumArray, reverse: bool) -> IndexArray:
    """A stable argsort, ascending or descending (ties keep their order either way)."""
    order: IndexArray
    if not reverse:
        order = np.argsort(keys, kind="stable")
        return order
    n = len(keys)
    order = (n - 1 - np.argsort(keys[::-1], kind="stable"))[::-1]
    return order


class ExternalSorter:
    """A stable external sort in a share of managed memory, spilling sorted runs through an IOManager.

    Serialized form: :meth:`add` records, then iterate :meth:`sorted`.
    Fixed-width form (``key_dtype``): :meth:`add_batch` key (and value)
    columns, then :meth:`sorted` yields ``{"key": ..., "value": ...}`` batches.

    Ownership: the sorter takes pages from ``memory`` for ``owner`` lazily,
    up to ``share_bytes``, plus two staging pages for spill I/O at
    construction; it is their only writer. It creates and deletes its spill
    files in ``io``'s directory: a run file is deleted as soon as it has been
    merged, and everything (pages and files) in :meth:`release`, which runs
    when :meth:`sorted` ends, fails or is closed, and on leaving a ``with``
    block. Yielded records and arrays are copies.
    Process: the worker owning ``memory`` and ``io``. Not thread-safe.

    Raises:
        InvalidSizeError: ``share_bytes`` below four pages.
        OutOfMemoryError: a single record larger than the share.
        SpillError: a run cannot be written or read (names ``io.tmp-dirs`` and the path).
    """

    def __init__(self, memory: MemoryManager, owner: Hashable, share_bytes: int, io: IOManager, *,
                 key: SortKey | None = None, reverse: bool = False,
                 key_dtype: str | np.dtype | None = None, value_dtype: str | np.dtype | None = None,
                 name: str = "sort") -> None:
        self.share = share = ManagedShare(memory, owner, share_bytes)
        check_share(share, 4 * share.page_size, "an external sort (two staging pages and two run pages)")
        self.io = io
        self.key = key
        self.reverse = bool(reverse)
        self.name = name
        self.counters = SpillCounters()
        self.key_dtype = None if key_dtype is None else np.dtype(key_dtype)
        self.value_dtype = None if value_dtype is None else np.dtype(value_dtype)
        if self.key_dtype is not None:
            if key is not None:
                msg = "key= applies to the serialized form; the fixed-width form sorts by its key column"
                raise ValueError(msg)
            for what, dt in (("key_dtype", self.key_dtype), ("value_dtype", self.value_dtype)):
                if dt is not None and dt not in (np.dtype(np.int64), np.dtype(np.float64)):
                    msg = f"{what} must be int64 or float64; got {dt}"
                    raise ValueError(msg)
        elif value_dtype is not None:
            msg = "value_dtype applies to the fixed-width form; pass key_dtype too"
            raise ValueError(msg)
        self.width = 1 + (self.value_dtype is not None)
        self.fan_in = max(2, share_bytes // share.page_size - 2)
        self._pack: Callable[[object], bytes] = msgpack.Packer(use_bin_type=True, autoreset=True).pack
        self.stage_out, self.stage_in = share.allocate_pages(2)
        self._area = RecordArea(share)  # serialized run
        self._pages: list[MemorySegment] = []  # fixed-width run: pages of rows
        self._rows_in_page: list[int] = []
        self._runs: list[SpillStream] = []  # runs still to merge, in input order
        self._streams: list[SpillStream] = []  # every file made, for release()
        self._run_count = 0
        self._records = 0
        self._done = False

    # ------------------------------------------------------------------ input
    def add(self, records: Iterable[object]) -> None:
        """Append records (serialized form)."""
        if self.key_dtype is not None:
            msg = "this sorter has fixed-width keys; use add_batch(keys, values)"
            raise TypeError(msg)
        self._check_open()
        blobs = list(map(self._pack, records))
        self._records += len(blobs)
        while blobs:
            n = len(self._area.append(blobs))
            blobs = blobs[n:]
            if blobs:
                if not self._area.segments:
                    size = len(blobs[0])
                    msg = (f"record of {size} bytes does not fit the sort share of {self.share.owner!r} "
                           f"({self.share.share_bytes} bytes); raise memory.managed.fraction")
                    raise OutOfMemoryError(msg)
                self._spill_run()

    def add_batch(self, keys: npt.ArrayLike, values: npt.ArrayLike | None = None) -> None:
        """Append rows (fixed-width form): ``keys`` and, with ``value_dtype``, ``values``."""
        if self.key_dtype is None:
            msg = "this sorter sorts serialized records; use add(records)"
            raise TypeError(msg)
        self._check_open()
        keys = np.asarray(keys, self.key_dtype)
        if self.key_dtype.kind == "f" and np.isnan(keys).any():
            msg = "fixed-width sort keys must not be NaN; got NaN in the batch"
            raise ValueError(msg)
        if (values is None) != (self.value_dtype is None):
            msg = f"values must be given exactly when value_dtype is set ({self.value_dtype})"
            raise ValueError(msg)
        rows = np.empty((len(keys), self.width), np.uint64)
        rows[:, 0] = keys.view(np.uint64)
        if values is not None:
            rows[:, 1] = np.asarray(values, self.value_dtype).view(np.uint64)
        self._records += len(rows)
        per_page = self.share.page_size // (8 * self.width)
        i = 0
        while i < len(rows):
            if not self._pages or self._rows_in_page[-1] == per_page:
                page = self.share.try_allocate_page()
                if page is None:
                    if not self._pages:
                        msg = (f"sort of {self.share.owner!r} cannot get a page of managed memory; "
                               f"raise memory.managed.fraction")
                        raise OutOfMemoryError(msg)
                    self._spill_run()
                    continue
                self._pages.append(page)
                self._rows_in_page.append(0)
            used = self._rows_in_page[-1]
            take = min(per_page - used, len(rows) - i)
            view = self._pages[-1].as_array(np.uint64, per_page * self.width).reshape(per_page, self.width)
            view[used:used + take] = rows[i:i + take]
            self._rows_in_page[-1] = used + take
            i += take

    def _check_open(self) -> None:
        if self._done:
            msg = f"sorter {self.name!r} of {self.share.owner!r} was released or has been read"
            raise ValueError(msg)

    # ------------------------------------------------------------------- runs
    def _fixed_dtype(self) -> np.dtype[Any]:
        """The key dtype of the fixed-width form (the serialized form has none)."""
        if self.key_dtype is None:
            msg = f"sorter {self.name!r} sorts serialized records; it has no key dtype"
            raise TypeError(msg)
        return self.key_dtype

    def _run_rows(self) -> U64Array:
        """The in-memory fixed-width run, sorted (a heap copy); its pages go back to the share."""
        parts = [p.as_array(np.uint64, n * self.width).reshape(n, self.width)
                 for p, n in zip(self._pages, self._rows_in_page)]
        rows = np.concatenate(parts) if parts else np.empty((0, self.width), np.uint64)
        del parts
        for page in self._pages:
            self.share.release(page)
        self._pages, self._rows_in_page = [], []
        return rows[stable_order(rows[:, 0].view(self._fixed_dtype()), self.reverse)]

    def _run_records(self) -> list[Any]:
        """The in-memory serialized run, decoded and sorted; its pages go back to the share."""
        up = unpacker()
        arena = self.share.arena_view
        for seg, n in zip(self._area.segments, self._area.filled):
            up.feed(arena[seg.offset:seg.offset + n])
        records: list[Any] = list(up)
        self._area.release()
        if self.key is None:
            return sorted(records, reverse=self.reverse)
        return sorted(records, key=self.key, reverse=self.reverse)

    def _spill_run(self) -> None:
        stream = self._new_stream(f"{self.name}-run{self._run_count}")
        self._run_count += 1
        self._runs.append(stream)
        if self.key_dtype is not None:
            rows = self._run_rows()
            for i in range(0, len(rows), BATCH_ROWS):
                stream.write(rows[i:i + BATCH_ROWS], self.stage_out)
        else:
            records = self._run_records()
            pack = self._pack
            for i in range(0, len(records), BATCH_ROWS):
                stream.write(b"".join(map(pack, records[i:i + BATCH_ROWS])), self.stage_out)

    def _new_stream(self, hint: str) -> SpillStream:
        stream = SpillStream(self.io, hint, self.counters)
        self._streams.append(stream)
        return stream

    def _read_records(self, stream: SpillStream) -> Iterator[Any]:
        up = unpacker()
        for block in stream.read_blocks(self.stage_in):
            up.feed(block)
            yield from up
        stream.delete()

    def _read_rows(self, stream: SpillStream) -> Iterator[U64Array]:
        row_bytes = 8 * self.width
        pending = b""
        for block in stream.read_blocks(self.stage_in):
            data = pending + block if pending else block
            whole = len(data) - len(data) % row_bytes
            pending = data[whole:]
            if whole:
                yield np.frombuffer(data, np.uint64, whole // 8).reshape(-1, self.width)
        stream.delete()

    # ------------------------------------------------------------------ merge
    def _merge_records(self, sources: list[Iterator[Any]]) -> Iterator[Any]:
        if len(sources) == 1:
            return sources[0]
        if self.key is None:
            return heapq.merge(*sources, reverse=self.reverse)
        return heapq.merge(*sources, key=self.key, reverse=self.reverse)

    def _merge_rows(self, sources: list[Iterator[U64Array]]) -> Iterator[U64Array]:
        """Vectorized stable k-way merge of sorted row sources (earlier sources win ties)."""
        dt, reverse = self._fixed_dtype(), self.reverse
        bufs: list[U64Array | None] = [next(s, None) for s in sources]
        live = [b is not None for b in bufs]  # the source may have more after its buffer
        while any(b is not None and len(b) for b in bufs):
            lasts = [(b[-1, 0:1].view(dt)[0], i) for i, b in enumerate(bufs) if live[i] and b is not None]
            if lasts:
                bound, at = (max if reverse else min)(lasts, key=lambda t: t[0])
            pieces = []
            for i, b in enumerate(bufs):
                if b is None or not len(b):
                    continue
                if not lasts:
                    cut = len(b)
                else:
                    k = b[:, 0].view(dt) if b.flags.c_contiguous else np.ascontiguousarray(b[:, 0]).view(dt)
                    cut = int(np.count_nonzero(k > bound)) if reverse else int(np.searchsorted(k, bound, "left"))
                if cut:
                    pieces.append(b[:cut])
                    bufs[i] = b[cut:]
            if pieces:
                rows = np.concatenate(pieces)
                yield rows[stable_order(np.ascontiguousarray(rows[:, 0]).view(dt), reverse)]
            if lasts:  # refill the source that bounded this round (it may hold only keys == bound)
                nxt = next(sources[at], None)
                if nxt is None:
                    live[at] = False
                else:
                    rest = bufs[at]
                    bufs[at] = nxt if rest is None or not len(rest) else np.concatenate((rest, nxt))
            for i, b in enumerate(bufs):  # refill every emptied source
                if live[i] and (b is None or not len(b)):
                    nxt = next(sources[i], None)
                    if nxt is None:
                        live[i] = False
                        bufs[i] = None
                    else:
                        bufs[i] = nxt

    def _reduce_runs(self) -> None:
        """Merge consecutive groups of ``fan_in`` runs, pass after pass, until one merge reads them all.

        Consecutive groups keep the runs' input order, which keeps the sort stable;
        each pass divides the number of runs by ``fan_in``.
        """
        while len(self._runs) + 1 > self.fan_in:
            self.counters.spill_passes += 1
            runs, merged = self._runs, []
            for g in range(0, len(runs), self.fan_in):
                group = runs[g:g + self.fan_in]
                if len(group) == 1:
                    merged.append(group[0])
                    continue
                out = self._new_stream(f"{self.name}-merge")
                self._write_merged(group, out)
                merged.append(out)
            self._runs = merged

    def _write_merged(self, group: list[SpillStream], out: SpillStream) -> None:
        if self.key_dtype is not None:
            for rows in self._merge_rows([self._read_rows(s) for s in group]):
                out.write(np.ascontiguousarray(rows), self.stage_out)
            return
        pack = self._pack
        buf: list[bytes] = []
        for rec in self._merge_records([self._read_records(s) for s in group]):
            buf.append(pack(rec))
            if len(buf) == BATCH_ROWS:
                out.write(b"".join(buf), self.stage_out)
                buf = []
        if buf:
            out.write(b"".join(buf), self.stage_out)

    # ----------------------------------------------------------------- output
    def sorted(self) -> Iterator[Any] | Iterator[Columns]:
        """All records in order (serialized), or ``{"key", "value"}`` column batches (fixed-width).

        Reads the sorter once; it is released when the iterator ends, fails or is closed.
        """
        self._check_open()
        self._done = True
        return self._sorted_records() if self.key_dtype is None else self._sorted_rows()

    def _merge_runs_on_disk(self) -> None:
        if self._runs:
            self._reduce_runs()
            if self._runs:
                self.counters.spill_passes += 1

    def _sorted_rows(self) -> Iterator[Columns]:
        try:
            self._merge_runs_on_disk()
            dt = self._fixed_dtype()
            mem = self._run_rows()
            sources = [self._read_rows(s) for s in self._runs]
            if len(mem):
                sources.append(iter([mem[i:i + BATCH_ROWS] for i in range(0, len(mem), BATCH_ROWS)]))
            merged = sources[0] if len(sources) == 1 else self._merge_rows(sources) if sources else iter(())
            for rows in merged:
                cols: Columns = {"key": np.ascontiguousarray(rows[:, 0]).view(dt)}
                if self.value_dtype is not None:
                    cols["value"] = np.ascontiguousarray(rows[:, 1]).view(self.value_dtype)
                yield cols
        finally:
            self.release()

    def _sorted_records(self) -> Iterator[Any]:
        try:
            self._merge_runs_on_disk()
            mem_records = self._run_records()
            sources = [self._read_records(s) for s in self._runs]
            sources.append(iter(mem_records))
            yield from self._merge_records(sources)
        finally:
            self.release()

    # --------------------------------------------------------------- lifetime
    def release(self) -> None:
        """Delete every run file and give every page back. Idempotent."""
        self._done = True
        streams, self._streams, self._runs = self._streams, [], []
        try:
            for stream in streams:
                stream.delete()
        finally:
            self._pages, self._rows_in_page = [], []
            self._area.segments, self._area.filled = [], []
            self.share.release_all()

    def __enter__(self) -> ExternalSorter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def statistics(self) -> SorterStats:
        c = self.counters
        return SorterStats(records=self._records, runs=self._run_count, spilled_bytes=c.spilled_bytes,
                           spill_files=c.spill_files, spill_passes=c.spill_passes,
                           blocks_written=c.blocks_written, blocks_read=c.blocks_read,
                           managed_peak_bytes=self.share.peak_bytes, share_bytes=self.share.share_bytes)

    stats = statistics
