"""ManagedKeyValueStore: bytes -> bytes keyed state in managed memory, cold entries in sorted runs on disk.

Imports: runtime.errors, runtime.managed (share, spill streams), runtime.memory, runtime.io, runtime.state.bins,
runtime.state.page_index (numpy and stdlib otherwise).

An LSM tree in miniature, RocksDB's shape in a streaming worker's managed memory:

- **Memory.** Every entry is one object of a
  :class:`~runtime.state.bins.SmallObjectAllocator` in the store's own
  :class:`~runtime.managed.share.ManagedShare`: a 4-byte header (the key's
  length, and a tombstone bit), the key, the value. The index from key to
  entry is a :class:`~runtime.state.page_index.PageHashIndex` in pages of the
  same share: 16-byte slots (the key's fingerprint, the entry's handle) at
  most 0.7 full, keys compared in the entries themselves. So the store holds
  no Python object per key, and its index counts against the share as its
  entries do. Measured, 500 k entries of 20-60-byte values: the dict index it
  replaced held 60 MiB of Python heap (126 bytes a key) that nothing counted;
  now the heap grows by 4.7 MiB (the bins' slot lengths, 8 bytes a slot) and
  the share holds 16 MiB more. The probe runs in Python and reads the key
  through the bins: 100 k keys in memory, random order, a get takes 3.5 us
  (2.5 us with the dict), a put of a new key 5.5 us (4.3), an overwrite
  5.5 us (5.1) (best of runs on a shared 2-core machine).
- **Spilling.** When an allocation fails (an entry's, or the index's when it
  must grow), *every* in-memory entry is written, sorted by
  ``(key_group, key)``, as one new sorted run, and the pages go back to the
  share. Spilling everything rather than the largest key groups
  leaves the memory empty at once (no fragmentation across bins) and makes
  the fewest and largest runs; the cost is that hot keys go to disk too.
  Measured (100 k puts of 20-60-byte values in random order into a 256 KiB
  share of 4 KiB pages): 35 spills, 8 compactions, 32 MB written for 6 MB
  live on disk (full compactions rewrite everything: the price of keeping at
  most ``max_runs`` runs), 55 us a put amortized. (With the dict index, whose
  bytes were not in the share: 25 spills, 6 compactions, 27 MB.) A single
  entry larger than the share holds is a run of its own.
- **Runs.** A run is one spill file (:class:`~runtime.managed.share.PartitionedSpill`,
  one stream) of blocks of at most a page, each written through the store's
  staging page. A block is ``n`` (u32), then the int32 columns key group,
  key length and value length (-1: tombstone) of its ``n`` records, then the
  keys and the values back to back: decoding a block is a few numpy calls and
  one slice per record. A record larger than a page makes a block of several
  pages. The run's sparse index (first ``(key_group, key)`` of every block) stays
  in memory, with a bloom filter of its keys (10 bits a key, on the Python
  heap), so a ``get`` that misses memory reads at most one block per run,
  newest run first, and none for a key outside a run's range or filter.
  Measured (100 k keys, 40-byte values, 256 KiB share, 4 runs): random gets
  read 3.65 blocks and took 704 us each without the filters, 1.25 blocks and
  181 us with them; a get from memory takes 3-4 us, a put 4-6 us.
- **Deletes** of a key that may be on disk leave a tombstone in memory; it
  spills like any entry. **Compaction**: when more than ``max_runs`` runs
  exist, all of them are merged (newest version wins) into one; the result is
  the oldest run, so tombstones are dropped.
- A value read from disk is not brought back into memory: memory holds the
  entries written since the last spill, and only they are spilled next.

``__len__`` is exact: the count of live memory entries while nothing was
spilled, else one merge over memory and runs, cached until the next write.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from runtime.errors import InvalidSizeError, OutOfMemoryError, SpillError
from runtime.io import IOManager
from runtime.managed.share import ManagedShare, PartitionedSpill, SpillCounters, spill_error
from runtime.memory.manager import MemoryManager
from runtime.memory.segment import MemorySegment
from runtime.memory.snapshot import Snapshot
from runtime.memory.units import format_bytes
from runtime.state.bins import BinStats, SmallObjectAllocator
from runtime.state.page_index import ENTRY_HEADER, KEY_LENGTH_MASK, PageHashIndex

__all__ = ["MANAGED_SIZE_KEY", "ManagedKeyValueStore", "StoreStats", "key_group_of", "key_hash", "min_share_pages"]

MANAGED_SIZE_KEY = "memory.managed.size"
DEFAULT_MAX_RUNS = 4
_HEADER = ENTRY_HEADER  # of an in-memory entry: key length | _TOMBSTONE (the layout the page index reads)
_KEY_MASK = KEY_LENGTH_MASK
_TOMBSTONE = _KEY_MASK + 1
_COUNT = struct.Struct("<I")  # of a run block: its record count
_META_BYTES = 12  # per record of a run block: int32 key group, key length, value length
_PROBES = 4  # bloom filter probes a key


def min_share_pages(*, spills: bool) -> int:
    """The fewest pages a store's share may hold: entries, their index, and (when it ``spills``) spill staging."""
    return 3 if spills else 2


def key_hash(key: bytes) -> tuple[int, int]:
    """Two 64-bit words of the 16-byte blake2b of ``key``: (key group word, filter word); the same in every process."""
    digest = hashlib.blake2b(key, digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def key_group_of(key: bytes, key_groups: int) -> int:
    """The key group of ``key``: the first 8 bytes of its blake2b (16-byte digest), mod ``key_groups``."""
    return key_hash(key)[0] % key_groups


@dataclass(frozen=True)
class StoreStats(Snapshot):
    """A snapshot of a :class:`ManagedKeyValueStore`: plain numbers, and the bins' rows."""

    entries: int  # live entries, memory and disk
    memory_entries: int  # entries in memory, tombstones included
    memory_bytes: int  # bytes of managed memory held: the bins' pages and the staging page
    disk_bytes: int  # bytes of the live run files
    runs: int
    spills: int  # times memory was written out as a run
    spill_files: int  # run files written, by spills and compactions
    spilled_bytes: int  # bytes written to run files
    gets: int
    memory_hits: int  # gets answered from memory
    disk_reads: int  # blocks read from disk by gets
    compactions: int
    bins: tuple[BinStats, ...]


Record = tuple[int, bytes, bytes | None]  # (key group, key, value or None for a tombstone)


def _split(data: bytes, lens: np.ndarray) -> list[bytes]:
    ends = np.cumsum(lens).tolist()
    return [data[a:b] for a, b in zip([0, *ends[:-1]], ends)]


def _encode_block(records: list[Record]) -> bytes:
    n = len(records)
    meta = np.empty((3, n), np.int32)
    meta[0] = [r[0] for r in records]
    meta[1] = [len(r[1]) for r in records]
    meta[2] = [-1 if r[2] is None else len(r[2]) for r in records]
    return b"".join((_COUNT.pack(n), meta.tobytes(), *[r[1] for r in records],
                     *[r[2] for r in records if r[2] is not None]))


def _aged(records: Iterator[Record], age: int) -> Iterator[tuple[int, bytes, int, bytes | None]]:
    """Records tagged with the age of their source (0: newest), so that a merge puts the newest version first."""
    for g, k, v in records:
        yield g, k, age, v


class _Block:
    """A run block, its keys decoded: parallel columns sorted by (key group, key); values cut out on demand."""

    __slots__ = ("data", "groups", "keys", "vlens", "vstart")

    def __init__(self, data: bytes) -> None:
        (n,) = _COUNT.unpack_from(data)
        meta = np.frombuffer(data, np.int32, 3 * n, _COUNT.size).reshape(3, n)
        klens = meta[1]
        start = _COUNT.size + _META_BYTES * n
        kend = start + int(klens.sum())
        self.data = data
        self.groups = meta[0].tolist()
        self.keys = _split(data[start:kend], klens)
        self.vlens = meta[2]
        self.vstart = kend

    def find(self, group: int, key: bytes) -> tuple[bool, bytes | None]:
        """(found, value): a tombstone is found with value None."""
        lo = bisect_left(self.groups, group)
        hi = bisect_right(self.groups, group, lo)
        i = bisect_left(self.keys, key, lo, hi)
        if i < hi and self.keys[i] == key:
            vlen = int(self.vlens[i])
            if vlen < 0:
                return True, None
            at = self.vstart + int(np.maximum(self.vlens[:i], 0).sum())
            return True, self.data[at:at + vlen]
        return False, None

    def records(self) -> Iterator[Record]:
        vlens = self.vlens
        values: list[bytes | None] = list(_split(self.data[self.vstart:], np.maximum(vlens, 0)))
        for i in np.flatnonzero(vlens < 0).tolist():
            values[i] = None
        return zip(self.groups, self.keys, values)


class _BloomFilter:
    """Which keys a run may hold: 10 bits and 4 probes a key (about 1% false positives), on the Python heap.

    Probes are ``h1 + i * h2`` (Kirsch-Mitzenmacher) of the two 32-bit halves of :func:`key_hash`'s filter word.
    """

    __slots__ = ("bits", "mask")

    def __init__(self, hashes: list[int]) -> None:
        m = 1 << max(6, (10 * len(hashes)).bit_length())
        self.mask = m - 1
        h: npt.NDArray[np.uint64] = np.array(hashes, np.uint64)
        h1, h2 = h & np.uint64(0xFFFFFFFF), h >> np.uint64(32)
        bits = np.zeros(m, bool)
        for i in range(_PROBES):
            bits[((h1 + h2 * np.uint64(i)) & np.uint64(m - 1)).astype(np.intp)] = True
        self.bits = np.packbits(bits, bitorder="little").tobytes()

    def may_contain(self, h: int) -> bool:
        h1, h2, mask, bits = h & 0xFFFFFFFF, h >> 32, self.mask, self.bits
        for i in range(_PROBES):
            p = (h1 + i * h2) & mask
            if not bits[p >> 3] >> (p & 7) & 1:
                return False
        return True


class _Run:
    """One sorted run: its spill file and the sparse index of its blocks.

    Ownership: the store owns the run and deletes its file in :meth:`delete`.
    """

    __slots__ = ("bloom", "entries", "first", "last", "slices", "spill")

    def __init__(self, spill: PartitionedSpill) -> None:
        self.spill = spill
        self.first: list[tuple[int, bytes]] = []  # (key group, key) of each block's first record
        self.slices: list[tuple[int, int]] = []  # each block's (first BlockRef, BlockRef count) in the stream
        self.last: tuple[int, bytes] = (-1, b"")  # the run's last (key group, key)
        self.entries = 0  # records, tombstones included
        self.bloom: _BloomFilter | None = None  # set when the run is complete

    @property
    def nbytes(self) -> int:
        return self.spill.nbytes

    def read_block(self, i: int, stage: MemorySegment) -> _Block:
        """Block ``i``, read through ``stage`` (a block of several pages, one page a read)."""
        start, count = self.slices[i]
        refs = self.spill.blocks[0][start:start + count]
        f = self.spill.create()
        parts = []
        for ref in refs:
            try:
                f.read(ref, stage)
            except SpillError as exc:
                err = spill_error("read", self.spill.path, exc)
                raise err from exc
            parts.append(stage.get_bytes(0, ref.nbytes))
        return _Block(parts[0] if count == 1 else b"".join(parts))

    def find(self, group: int, key: bytes, word: int, stage: MemorySegment) -> tuple[bool, bytes | None, int]:
        """(found, value, blocks read): at most one block; none for a key outside the run's range or its filter.

        ``word`` is the key's filter word (:func:`key_hash`).
        """
        at = (group, key)
        i = bisect_right(self.first, at) - 1
        if i < 0 or at > self.last or (self.bloom is not None and not self.bloom.may_contain(word)):
            return False, None, 0
        found, value = self.read_block(i, stage).find(group, key)
        return found, value, 1

    def records(self, stage: MemorySegment) -> Iterator[Record]:
        """Every record in order, one block in memory at a time."""
        for i in range(len(self.slices)):
            yield from self.read_block(i, stage).records()

    def records_from(self, at: tuple[int, bytes], stage: MemorySegment) -> Iterator[Record]:
        """The records from ``at`` (a ``(key group, key)``) on, in order: from the block that may hold it."""
        for i in range(max(bisect_right(self.first, at) - 1, 0), len(self.slices)):
            for record in self.read_block(i, stage).records():
                if (record[0], record[1]) >= at:
                    yield record

    def delete(self) -> None:
        self.spill.delete()


class _RunWriter:
    """Cuts sorted records into blocks of at most a page and writes them through the staging page."""

    def __init__(self, io: IOManager, hint: str, counters: SpillCounters, stage: MemorySegment) -> None:
        spill = PartitionedSpill(io, hint, counters)
        spill.open_part(0)
        self.run = _Run(spill)
        self._stage = stage
        self._limit = stage.size - _COUNT.size
        self._records: list[Record] = []
        self._bytes = 0
        self._words: list[int] = []  # filter words of every record written

    def add(self, record: Record) -> None:
        value = record[2]
        size = _META_BYTES + len(record[1]) + (0 if value is None else len(value))
        if self._records and self._bytes + size > self._limit:
            self._flush()
        self._records.append(record)
        self._bytes += size

    def _flush(self) -> None:
        records, self._records, self._bytes = self._records, [], 0
        run = self.run
        refs = run.spill.blocks[0]
        start = len(refs)
        run.spill.write(0, _encode_block(records), self._stage)
        run.first.append((records[0][0], records[0][1]))
        run.slices.append((start, len(refs) - start))
        run.last = (records[-1][0], records[-1][1])
        run.entries += len(records)
        self._words += [key_hash(r[1])[1] for r in records]

    def finish(self) -> _Run:
        if self._records:
            self._flush()
        self.run.bloom = _BloomFilter(self._words)
        return self.run


class ManagedKeyValueStore:
    """Keyed state as bytes -> bytes: entries in managed memory, spilled to sorted runs when it is full.

    Makes its own ``ManagedShare(memory, owner, share_bytes)``. With ``io``
    one page of it is the staging page of every spill-file read and write
    (so the share must hold three pages at least: with one for the entries and
    one for their index; two without ``io``); without ``io`` a full share
    raises :class:`OutOfMemoryError` naming ``memory.managed.size``.

    Ownership: the store allocates every page of its share and frees them in
    :meth:`release`; it owns its run files and deletes them there too. Bytes
    returned by :meth:`get` and :meth:`items` are copies the caller owns; the
    store alone writes its pages and files. Do not write to the store while
    iterating over :meth:`items`.
    Process: the worker owning the arena and the IOManager. Not thread-safe (one task's thread).

    Raises (from any write or read):
        SpillError: a run cannot be written or read; the message names the path and ``io.tmp-dirs``.
    """

    def __init__(self, memory: MemoryManager, owner: Hashable, share_bytes: int, io: IOManager | None, *,
                 name: str = "state", key_groups: int = 128, max_runs: int = DEFAULT_MAX_RUNS) -> None:
        if not 0 < key_groups < 1 << 31:
            msg = f"key_groups must be in [1, 2**31); got {key_groups}"
            raise InvalidSizeError(msg)
        if max_runs < 1:
            msg = f"max_runs must be >= 1; got {max_runs}"
            raise InvalidSizeError(msg)
        pages = min_share_pages(spills=io is not None)
        if share_bytes < pages * memory.page_size:
            what = "one for entries, one for their index" + ("" if io is None else ", one to stage spill I/O")
            msg = (f"share of state {name!r} of {owner!r} must hold at least {pages} pages "
                   f"({pages * memory.page_size} bytes: {what}); got {share_bytes}; raise {MANAGED_SIZE_KEY}")
            raise InvalidSizeError(msg)
        self.name = name
        self.key_groups = key_groups
        self.max_runs = max_runs
        self.io = io
        self.share = ManagedShare(memory, owner, share_bytes)
        self._stage: MemorySegment | None = self.share.allocate_pages(1)[0] if io is not None else None
        self._bins = SmallObjectAllocator(self.share)
        self._index = PageHashIndex(self.share, self._bins)  # owner of this store only: key -> handle of its entry
        self._runs: list[_Run] = []  # oldest first
        self._counters = SpillCounters()
        self._len: int | None = 0  # live entries; None: unknown until the next merge
        self._spills = self._gets = self._memory_hits = self._disk_reads = self._compactions = 0

    # ------------------------------------------------------------------ reads
    def key_group(self, key: bytes) -> int:
        """The key group of ``key`` (stable across processes and runs)."""
        return key_group_of(key, self.key_groups)

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key`` (a copy), or None."""
        self._gets += 1
        h = self._index.get(key)
        if h is not None:
            self._memory_hits += 1
            return self._value(h)
        return self._disk_value(key)

    def contains(self, key: bytes) -> bool:
        return self.get(key) is not None

    __contains__ = contains

    def _value(self, h: int) -> bytes | None:
        obj = self._bins.view(h)
        (head,) = _HEADER.unpack_from(obj)
        return None if head & _TOMBSTONE else bytes(obj[_HEADER.size + (head & _KEY_MASK):])

    def _disk_value(self, key: bytes) -> bytes | None:
        """The newest version of ``key`` in the runs (None: deleted or never written)."""
        if not self._runs:
            return None
        group_word, word = key_hash(key)
        group = group_word % self.key_groups
        stage = self._staging()
        for run in reversed(self._runs):
            found, value, reads = run.find(group, key, word, stage)
            self._disk_reads += reads
            if found:
                return value
        return None

    def __len__(self) -> int:
        if not self._runs:
            return len(self._index)  # no tombstone is kept while nothing is on disk
        if self._len is None:
            self._len = sum(1 for _ in self.items())
        return self._len

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every live entry once, its newest version, ordered by (key group, key). Copies."""
        memory = sorted((self.key_group(k), k, h) for k, h in self._index.items())
        sources = [_aged(((g, k, self._value(h)) for g, k, h in memory), 0)]
        if self._runs:
            stage = self._staging()
            sources += [_aged(run.records(stage), age) for age, run in enumerate(reversed(self._runs), 1)]
        previous: tuple[int, bytes] | None = None
        for g, k, _, v in heapq.merge(*sources):
            if (g, k) == previous:
                continue  # an older version
            previous = (g, k)
            if v is not None:
                yield k, v

    def scan_keys(self, start: bytes, stop: bytes, limit: int) -> tuple[list[bytes], bytes | None]:
        """The first live keys in ``[start, stop)``, in order, and where to resume: ``(keys, resume)``. Only for
        a store of one key group (``key_groups=1``), whose order is the keys' order.

        ``keys`` holds at most ``limit`` keys: every live key in ``[start, resume)``, or in ``[start, stop)``
        when ``resume`` is None. Unlike :meth:`items` it hashes nothing, reads no value and sorts at most
        ``limit + 1`` keys: one pass over the memory index (keep it in step with :meth:`items`), the
        ``limit + 1`` least keys in range, and the runs merged from the block that may hold ``start``.

        Raises:
            InvalidSizeError: ``limit`` < 1, or the store has more than one key group.
        """
        if limit < 1:
            msg = f"scan_keys: limit must be >= 1; got {limit}"
            raise InvalidSizeError(msg)
        if self.key_groups != 1:
            msg = (f"scan_keys needs a store ordered by key (key_groups=1); state {self.name!r} has "
                   f"{self.key_groups} key groups")
            raise InvalidSizeError(msg)
        handles = {k: h for k, h in self._index.items() if start <= k < stop}
        memory = list(handles)
        cut: bytes | None = None  # memory holds keys at and past it that were not taken: merge below it only
        if len(memory) > limit:
            memory = heapq.nsmallest(limit + 1, memory)
            cut = memory.pop()
        else:
            memory.sort()
        # A tombstone may stay in memory with no run below it (written just after a spill whose compaction
        # left no run), so memory entries are checked here even then.
        view = self._bins.view
        if not self._runs:
            return [k for k in memory if not _HEADER.unpack_from(view(handles[k]))[0] & _TOMBSTONE], cut
        live = b""  # any non-None value: the merge below needs only whether a version is a tombstone
        sources = [_aged(((0, k, None if _HEADER.unpack_from(view(handles[k]))[0] & _TOMBSTONE else live)
                          for k in memory), 0)]
        stage = self._staging()
        sources += [_aged(run.records_from((0, start), stage), age) for age, run in enumerate(reversed(self._runs), 1)]
        end = stop if cut is None else cut
        out: list[bytes] = []
        previous: bytes | None = None
        for _, k, _, v in heapq.merge(*sources):
            if k >= end:
                break
            if k == previous:
                continue  # an older version
            previous = k
            if v is not None:
                out.append(k)
                if len(out) == limit:
                    return out, k + b"\x00"  # the least key above k
        return out, cut

    # ----------------------------------------------------------------- writes
    def put(self, key: bytes, value: bytes) -> None:
        """Set ``key`` to ``value`` (both bytes-like; stored as copies)."""
        self._write(bytes(key), value)

    def append(self, key: bytes, value: bytes) -> None:
        """Concatenate ``value`` to the value of ``key``, or set it if there is none (list state)."""
        key = bytes(key)
        h = self._index.get(key)
        if h is not None:
            old = self._bins.size(h)
            obj = self._bins.view(h)
            if not _HEADER.unpack_from(obj)[0] & _TOMBSTONE and self._bins.resize_in_place(h, old + len(value)):
                self._bins.write(h, value, old)
                return
            current = self._value(h)
        else:
            current = self._disk_value(key)
        self._write(key, value if current is None else current + bytes(value))

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; whether it was there. A key that may be on disk leaves a tombstone in memory."""
        key = bytes(key)
        h = self._index.get(key)
        if h is not None:
            live = not _HEADER.unpack_from(self._bins.view(h))[0] & _TOMBSTONE
        else:
            live = self._disk_value(key) is not None
        if live:
            self._write(key, None)
        return live

    def discard(self, key: bytes) -> None:
        """Remove ``key`` without reading whether it was there (:meth:`delete` reads the runs to answer that).

        While runs exist it always leaves a tombstone in memory, for a key that was never written too.
        """
        self._write(bytes(key), None)

    def _write(self, key: bytes, value: bytes | bytearray | memoryview | None) -> None:
        """Make ``value`` (None: a tombstone) the newest version of ``key``. The one place entries are stored."""
        if len(key) > _KEY_MASK:
            msg = f"a key of state {self.name!r} must be shorter than {_KEY_MASK} bytes; got {len(key)}"
            raise InvalidSizeError(msg)
        self._len = None
        bins, index = self._bins, self._index
        old = index.get(key)
        if value is None and not self._runs:  # nothing on disk to shadow
            if old is not None:
                index.remove(key)
                bins.free(old)
            return
        klen = len(key)
        nbytes = _HEADER.size + klen + (0 if value is None else len(value))
        if old is not None and bins.resize_in_place(old, nbytes):
            h = old
        else:
            # The new entry is written below, before the index next reads it. An index that cannot grow
            # is as full as bins that cannot allocate.
            new = bins.alloc(nbytes)
            if new is not None and old is not None:
                index.replace(key, old, new)
            elif new is not None and not index.add(key, new):
                bins.free(new)
                new = None
            if new is None:
                self._spill_memory(nbytes)
                old = None  # it went to disk with the rest; the new version shadows it
                if value is None and not self._runs:  # the spill's compaction left nothing to shadow
                    return
                new = bins.alloc(nbytes)
                if new is not None and not index.add(key, new):
                    bins.free(new)
                    new = None
                if new is None:  # larger than the share can hold: a run of its own
                    self._add_run([(self.key_group(key), key, None if value is None else bytes(value))])
                    return
            if old is not None:
                bins.free(old)
            h = new
        obj = bins.view(h)
        _HEADER.pack_into(obj, 0, klen | (_TOMBSTONE if value is None else 0))
        obj[_HEADER.size:_HEADER.size + klen] = key
        if value is not None and len(value):
            obj[_HEADER.size + klen:] = value if isinstance(value, (bytes, bytearray)) else memoryview(value).cast("B")

    # --------------------------------------------------------------- spilling
    def _staging(self) -> MemorySegment:
        stage = self._stage
        if stage is None:
            msg = f"state {self.name!r} has no staging page (no IOManager, or released)"
            raise AssertionError(msg)
        return stage

    def _spill_memory(self, nbytes: int) -> None:
        """Write every in-memory entry as a new sorted run and give the bins' pages back to the share."""
        if self.io is None:
            share = self.share
            msg = (f"state {self.name!r} of {share.owner!r} cannot store an entry of {nbytes} bytes: its share of "
                   f"{format_bytes(share.share_bytes)} ({share.share_bytes} bytes) is full and it has no "
                   f"IOManager to spill to; raise {MANAGED_SIZE_KEY}")
            raise OutOfMemoryError(msg)
        if not self._index:
            self._index.clear()  # an empty index may still hold the table it grew to
            return
        bins = self._bins
        records: list[Record] = []
        for key, h in self._index.items():
            obj = bins.view(h)
            (head,) = _HEADER.unpack_from(obj)
            value = None if head & _TOMBSTONE else bytes(obj[_HEADER.size + (head & _KEY_MASK):])
            if value is not None or self._runs:  # a tombstone with nothing below it is dropped
                records.append((self.key_group(key), key, value))
        del obj
        records.sort(key=lambda r: (r[0], r[1]))
        if records:
            self._add_run(records)
        self._index.clear()
        bins.release()
        self._spills += 1

    def _add_run(self, records: list[Record]) -> None:
        """Write sorted ``records`` as the newest run; compact when there are more than ``max_runs``."""
        self._runs.append(self._write_run(records, f"{self.name}-run"))
        if len(self._runs) > self.max_runs:
            self._compact()

    def _write_run(self, records: Iterator[Record] | list[Record], hint: str) -> _Run:
        assert self.io is not None
        writer = _RunWriter(self.io, hint, self._counters, self._staging())
        try:
            for record in records:
                writer.add(record)
            run = writer.finish()
        except BaseException:
            writer.run.delete()
            raise
        return run

    def _compact(self) -> None:
        """Merge every run into one (newest version wins); the result is the oldest run, so tombstones go."""
        stage = self._staging()
        runs = self._runs
        sources = [_aged(run.records(stage), age) for age, run in enumerate(reversed(runs))]

        def merged() -> Iterator[Record]:
            previous: tuple[int, bytes] | None = None
            for g, k, _, v in heapq.merge(*sources):
                if (g, k) != previous:
                    previous = (g, k)
                    if v is not None:
                        yield g, k, v

        new = self._write_run(merged(), f"{self.name}-compacted")
        for run in runs:
            run.delete()
        self._runs = [new] if new.entries else []
        if not new.entries:
            new.delete()
        self._compactions += 1

    # ------------------------------------------------------------- statistics
    def memory_entries(self) -> int:
        """Entries in memory, tombstones included (as :meth:`stats`, without counting every entry)."""
        return len(self._index)

    def disk_bytes(self) -> int:
        """Bytes of the live run files (as :meth:`stats`, without counting the entries, which may read every run)."""
        return sum(run.nbytes for run in self._runs)

    def stats(self) -> StoreStats:
        c = self._counters
        return StoreStats(
            entries=len(self), memory_entries=len(self._index), memory_bytes=self.share.used_bytes,
            disk_bytes=sum(run.nbytes for run in self._runs), runs=len(self._runs), spills=self._spills,
            spill_files=c.spill_files, spilled_bytes=c.spilled_bytes, gets=self._gets,
            memory_hits=self._memory_hits, disk_reads=self._disk_reads, compactions=self._compactions,
            bins=tuple(self._bins.stats()))

    # --------------------------------------------------------------- lifetime
    def release(self) -> None:
        """Give every page back and delete every run file. Idempotent; the store is empty afterwards."""
        self._index.clear()
        self._bins.release()
        runs, self._runs = self._runs, []
        for run in runs:
            run.delete()
        self._stage = None
        self.share.release_all()
        self._len = 0

    def __enter__(self) -> ManagedKeyValueStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (f"<ManagedKeyValueStore {self.name!r} {len(self._index)} in memory, {len(self._runs)} runs, "
                f"{format_bytes(self.share.used_bytes)} of {format_bytes(self.share.share_bytes)}>")
