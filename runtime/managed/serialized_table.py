"""The serialized form of the managed hash table: any msgpack-able key, numeric or reduced values.

Imports: runtime.managed.share, runtime.managed.hash_table, runtime.memory (numpy, msgpack and
stdlib otherwise).

Keys are msgpack-serialized (one ``Packer.pack`` per record, a C call) and
identified by their bytes: two keys are equal when their serialized forms are
(so ``1`` and ``1.0`` are different keys, unlike in a dict; ``"a"`` and
``b"a"`` differ too). Lookups go through a 64-bit fingerprint of the bytes
(:func:`~runtime.managed.share.fingerprints`) in a page-backed index; a
fingerprint match is confirmed by comparing the stored key bytes, gathered
in bulk from the arena with numpy.

Round trip rule: msgpack arrays are decoded as **tuples** (``use_list=False``),
so tuple keys and values come back as tuples and lists come back as tuples too.
Maps come back as dicts, ``bytes`` as bytes and ``str`` as str.

Layout. The index is one block of ``capacity`` rows of uint64 words: for
numeric aggregations ``[fp, kaddr, klen, acc0, acc1, ...]`` (accumulators as
in :class:`~runtime.managed.hash_table.FixedHashTable`, updated in bulk), for
``reduce(fn)`` ``[fp, kaddr, klen, vaddr, vlen]``. ``fp == 0`` marks an empty
slot. ``kaddr``/``vaddr`` are offsets in the region's usable area (the
arena), inside pages of the record area: an append-only sequence of pages
where keys (and values) are written back to back; a record longer than a page
gets a block of its own. An updated value is written in place when it is no
longer than the old one, else appended, and the old bytes are counted as
waste; when the area cannot grow and a quarter of it is waste it is compacted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple, TypeAlias

import msgpack
import numpy as np
import numpy.typing as npt

from runtime.managed.hash_table import BATCH_ROWS, MIN_CAPACITY, Agg, AggLike, parse_aggs
from runtime.managed.share import BoolArray, IndexArray, ManagedShare, NumArray, U64Array, fingerprints
from runtime.memory.segment import MemorySegment

__all__ = [
    "Packed",
    "RecordArea",
    "SerializedBatch",
    "SerializedHashTable",
    "concat",
    "decode_stream",
    "gather",
    "split",
    "unpacker",
]

FP, KADDR, KLEN, VADDR, VLEN = 0, 1, 2, 3, 4
_MISSING = object()
Packed: TypeAlias = bytes | bytearray | memoryview
I64Array: TypeAlias = npt.NDArray[np.int64]  # arena addresses and lengths


def unpacker() -> msgpack.Unpacker:
    """The one decoding rule of this package: arrays -> tuples, str -> str, any map key."""
    return msgpack.Unpacker(use_list=False, raw=False, strict_map_key=False, max_buffer_size=0)


def decode_stream(data: Packed) -> list[object]:
    """Every msgpack object in ``data``, back to back (one C loop)."""
    up = unpacker()
    up.feed(data)
    return list(up)


class SerializedBatch(NamedTuple):
    """Pre-aggregated rows of a serialized table, unique by key bytes.

    ``fps`` are the keys' fingerprints and ``kbs`` their msgpack bytes.
    Numeric aggregations keep their accumulators in ``accs``, an ``(m, n_aggs)``
    uint64 array (each column holds its dtype's bits), and ``values`` is empty;
    ``reduce`` keeps the values as objects in ``values`` and ``accs`` has no column.
    """

    fps: U64Array
    kbs: list[bytes]
    accs: U64Array
    values: list[object]

    def take(self, idx: IndexArray) -> SerializedBatch:
        kbs, values = self.kbs, self.values
        pick = idx.tolist()
        return SerializedBatch(self.fps[idx], [kbs[i] for i in pick], self.accs[idx],
                               [values[i] for i in pick] if values else [])

    def __len__(self) -> int:
        return len(self.kbs)


def gather(arena: npt.NDArray[np.uint8], addrs: npt.NDArray[np.integer], lens: npt.NDArray[np.integer]) -> bytes:
    """The bytes at ``addrs[i]`` of length ``lens[i]``, back to back: one numpy gather."""
    lens = lens.astype(np.int64)
    total = int(lens.sum())
    if not total:
        return b""
    ends = np.cumsum(lens)
    idx = np.repeat(addrs.astype(np.int64) - (ends - lens), lens) + np.arange(total)
    return arena[idx].tobytes()


def split(data: bytes, lens: npt.NDArray[np.integer]) -> list[bytes]:
    """``data`` cut into pieces of ``lens``."""
    ends = np.cumsum(lens).tolist()
    return [data[a:b] for a, b in zip([0, *ends[:-1]], ends)]


class RecordArea:
    """Append-only bytes in pages of a share (plus one block per record longer than a page).

    Ownership: pages and blocks come from ``share`` and go back in :meth:`release`;
    only the owning table writes them.
    """

    def __init__(self, share: ManagedShare) -> None:
        self.share = share
        self.segments: list[MemorySegment] = []
        self._cur: MemorySegment | None = None
        self._pos = 0
        self.filled: list[int] = []  # bytes written in each segment, in segment order
        self.used = 0  # bytes written, live or not
        self.waste = 0  # bytes no slot points at any more

    @property
    def nbytes(self) -> int:
        return sum(seg.size for seg in self.segments)

    def append(self, blobs: list[bytes]) -> I64Array:
        """Write blobs back to back; returns the arena address of each one written (a prefix of them)."""
        n = len(blobs)
        out = np.empty(n, np.int64)
        if not n:
            return out
        lens = np.fromiter(map(len, blobs), np.int64, n)
        ends = np.cumsum(lens)
        data = memoryview(b"".join(blobs))
        arena = self.share.arena_view
        i = 0
        while i < n:
            done = int(ends[i - 1]) if i else 0
            seg = self._cur
            room = 0 if seg is None else seg.size - self._pos
            k = int(np.searchsorted(ends, done + room, "right")) - i
            if k > 0 and seg is not None:
                nb = int(ends[i + k - 1]) - done
                start = seg.offset + self._pos
                arena[start:start + nb] = data[done:done + nb]
                out[i:i + k] = start + (ends[i:i + k] - lens[i:i + k] - done)
                self._pos += nb
                self.filled[-1] = self._pos
                self.used += nb
                i += k
                continue
            size = int(lens[i])
            if size > self.share.page_size:  # a block of its own; later records go to a new page
                big = self.share.try_allocate(size)
                if big is None:
                    break
                self.segments.append(big)
                self.filled.append(size)
                self._cur, self._pos = None, 0
                arena[big.offset:big.offset + size] = data[done:done + size]
                out[i] = big.offset
                self.used += size
                i += 1
                continue
            page = self.share.try_allocate_page()
            if page is None:
                break
            self.segments.append(page)
            self.filled.append(0)
            self._cur, self._pos = page, 0
        return out[:i]

    def release(self) -> None:
        segs, self.segments, self.filled = self.segments, [], []
        self._cur, self._pos, self.used, self.waste = None, 0, 0, 0
        for seg in segs:
            self.share.release(seg)


class SerializedHashTable:
    """Hash aggregation of msgpack-able keys: numeric accumulators or ``reduce(fn)`` values, in pages.

    Pass ``aggs`` (count/sum/min/max, see :func:`~runtime.managed.hash_table.parse_aggs`)
    for numeric accumulators, or ``reduce_fn`` (associative and commutative,
    ``fn(acc, value) -> acc``) for values of any msgpack-able type. Results are
    ``(key, value)`` pairs: ``value`` is the accumulator (a tuple of them for
    several aggregations) or the reduced value.

    Ownership: the index block and the record pages come from ``share``
    lazily and go back in :meth:`release` (and at the end of :meth:`drain`);
    only this table writes them. Returned keys and values are new objects.
    Process: the worker owning the share. Not thread-safe.
    """

    def __init__(self, share: ManagedShare, aggs: Sequence[AggLike] | None = ("count",), *,
                 reduce_fn: Callable[[object, object], object] | None = None, max_load: float = 0.7) -> None:
        self.share = share
        self.reduce_fn = reduce_fn
        if reduce_fn is not None:
            if not callable(reduce_fn):
                msg = f"reduce_fn must be callable fn(acc, value); got {type(reduce_fn).__name__}"
                raise TypeError(msg)
            self.aggs: tuple[Agg, ...] = ()
            self.width = 5
        else:
            self.aggs = parse_aggs(aggs or ())
            self.width = 3 + len(self.aggs)
        if not 0.1 <= max_load <= 0.9:
            msg = f"max_load must be in [0.1, 0.9]; got {max_load}"
            raise ValueError(msg)
        self.max_load = max_load
        self.row_bytes = 8 * self.width
        self._pack: Callable[[object], bytes] = msgpack.Packer(use_bin_type=True, autoreset=True).pack
        self._area = RecordArea(share)
        self._seg: MemorySegment | None = None  # the index block; owner: this table
        self._T: U64Array = np.empty((0, self.width), np.uint64)  # (capacity, width) view of _seg
        self._F: U64Array = self._T[:, FP]
        self._cap = 0
        self._mask = np.uint64(0)
        self._fill = 0
        self._limit = 0
        self.full = False

    # ------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return self._fill

    @property
    def nbytes(self) -> int:
        """Bytes of the share this table holds (index and record area)."""
        return (0 if self._seg is None else self._seg.size) + self._area.nbytes

    @property
    def capacity(self) -> int:
        return self._cap

    # ------------------------------------------------------------------ input
    def prepare(self, keys: Sequence[object], values: Sequence[object] | NumArray | None = None
                ) -> SerializedBatch:
        """Raw records -> a batch unique by key (pre-aggregated in dicts keyed by the key bytes)."""
        kbs = list(map(self._pack, keys))
        if self.reduce_fn is not None:
            if values is None:
                msg = "reduce needs a values sequence; got values=None"
                raise ValueError(msg)
            return self._reduce_batch(kbs, values)
        cols: list[NumArray] = []
        for agg in self.aggs:
            if agg.kind == "count":
                cols.append(np.ones(len(kbs), np.int64))
            elif values is None:
                msg = f"{agg.kind} needs a values column; got values=None"
                raise ValueError(msg)
            else:
                cols.append(np.asarray(values, agg.dtype))
        return self._numeric_batch(kbs, cols)

    def prepare_partials(self, pairs: Sequence[tuple[object, object]]) -> SerializedBatch:
        """``(key, acc)`` partials (as :meth:`iterate` yields them) -> a batch unique by key."""
        kbs = [self._pack(k) for k, _ in pairs]
        accs = [a for _, a in pairs]
        if self.reduce_fn is not None:
            return self._reduce_batch(kbs, accs)
        if len(self.aggs) == 1:
            cols = [np.asarray(accs, self.aggs[0].dtype)]
        else:
            cols = [np.asarray([a[j] for a in accs], agg.dtype)  # type: ignore[index]  # (key, tuple) partials
                    for j, agg in enumerate(self.aggs)]
        return self._numeric_batch(kbs, cols)

    def _reduce_batch(self, kbs: list[bytes], values: Iterable[object]) -> SerializedBatch:
        fn = self.reduce_fn
        if fn is None:
            msg = "reduce batches need reduce_fn; this table has numeric aggregations"
            raise TypeError(msg)
        state: dict[bytes, object] = {}
        get = state.get
        for kb, v in zip(kbs, values):
            acc = get(kb, _MISSING)
            state[kb] = v if acc is _MISSING else fn(acc, v)
        uniq = list(state)
        return SerializedBatch(fingerprints(uniq), uniq, np.empty((len(uniq), 0), np.uint64), list(state.values()))

    def _numeric_batch(self, kbs: list[bytes], cols: list[NumArray]) -> SerializedBatch:
        n = len(kbs)
        first: dict[bytes, int] = {}
        inv = np.fromiter(map(first.setdefault, kbs, itertools.count()), np.intp, n)
        uniq = list(first)
        u = len(uniq)
        accs = np.empty((u, len(self.aggs)), np.uint64)
        if u == n:
            for j, col in enumerate(cols):
                accs[:, j] = col.view(np.uint64)
        else:
            firsts = np.fromiter(first.values(), np.intp, u)
            rank = np.empty(n, np.intp)
            rank[firsts] = np.arange(u)
            dense = rank[inv]
            for j, (agg, col) in enumerate(zip(self.aggs, cols)):
                acc = np.zeros(u, agg.dtype) if agg.merge is np.add else col[firsts].copy()
                agg.merge.at(acc, dense, col)
                accs[:, j] = acc.view(np.uint64)
        return SerializedBatch(fingerprints(uniq), uniq, accs, [])

    def insert_batch(self, keys: Sequence[object], values: Sequence[object] | NumArray | None = None
                     ) -> SerializedBatch | None:
        """Aggregate records; returns None, or the pre-aggregated rows that did not fit (``self.full``)."""
        left: list[SerializedBatch] = []
        for i in range(0, len(keys), BATCH_ROWS):
            vals = None if values is None else values[i:i + BATCH_ROWS]
            rest = self.upsert(self.prepare(keys[i:i + BATCH_ROWS], vals))
            if rest is not None:
                left.append(rest)
        return self.dedupe(concat(left)) if left else None

    def dedupe(self, batch: SerializedBatch) -> SerializedBatch:
        """Merge rows of equal keys (leftovers of several slices may repeat a key)."""
        if len(set(batch.kbs)) == len(batch.kbs):
            return batch
        if self.reduce_fn is not None:
            return self._reduce_batch(batch.kbs, batch.values)
        cols = [np.ascontiguousarray(batch.accs[:, j]).view(a.dtype) for j, a in enumerate(self.aggs)]
        return self._numeric_batch(batch.kbs, cols)

    def merge_batch(self, pairs: Sequence[tuple[object, object]]) -> SerializedBatch | None:
        """Merge ``(key, acc)`` partials; returns the rows that did not fit, or None."""
        return self.upsert(self.prepare_partials(pairs))

    def upsert(self, batch: SerializedBatch) -> SerializedBatch | None:
        """Merge a batch unique by key; returns the rows that did not fit, or None."""
        n = len(batch)
        self.full = False
        if not n:
            return None
        if self._seg is None and not self._grow(n):
            self.full = True
            return batch
        fps, kbs, accs, values = batch
        found_slot, found = self._find(fps, kbs)
        slot: IndexArray | None = found_slot
        left: list[IndexArray] = []
        if found.any():
            fi = np.flatnonzero(found)
            if self.reduce_fn is None:
                self._merge_at(found_slot[fi], accs[fi])
            else:
                failed = self._reduce_at(found_slot[fi], fi, batch)
                if failed.size:
                    left.append(failed)
        ni = np.flatnonzero(~found)
        m = len(ni)
        if m:
            if self._fill + m > self._limit and self._grow(self._fill + m):
                slot = None
            room = min(m, self._limit - self._fill)
            if self.reduce_fn is None:
                blobs = [kbs[i] for i in ni[:room].tolist()]
            else:
                pack = self._pack
                blobs = [kbs[i] + pack(values[i]) for i in ni[:room].tolist()]
            addrs = self._append(blobs)
            k = len(addrs)
            if k:
                self._insert(ni[:k], None if slot is None else slot[ni[:k]], addrs, blobs, batch)
            if k < m:
                left.append(ni[k:])
        if not left:
            return None
        self.full = True
        return batch.take(np.sort(np.concatenate(left)))

    # ---------------------------------------------------------------- kernels
    def _keys_equal(self, slots: IndexArray, idx: IndexArray, kbs: list[bytes]) -> BoolArray:
        """Whether the key stored at each slot has the bytes ``kbs[idx[i]]``."""
        T = self._T
        want = [kbs[i] for i in idx.tolist()]
        lens = np.fromiter(map(len, want), np.int64, len(want))
        eq: BoolArray = T[slots, KLEN].astype(np.int64) == lens
        if not eq.any():
            return eq
        sel = np.flatnonzero(eq)
        lens_s = lens[sel]
        stored = gather(self.share.arena, T[slots[sel], KADDR], lens_s)
        wanted = b"".join([want[i] for i in sel.tolist()])
        same = np.frombuffer(stored, np.uint8) == np.frombuffer(wanted, np.uint8)
        starts = np.concatenate(([0], np.cumsum(lens_s)[:-1]))
        eq[sel] = np.logical_and.reduceat(same, starts)
        return eq

    def _find(self, fps: U64Array, kbs: list[bytes]) -> tuple[IndexArray, BoolArray]:
        """Slot of each key (``found``) or the first empty slot on its probe path."""
        F, imask = self._F, int(self._mask)
        n = len(fps)
        pos = (fps & self._mask).view(np.intp).copy()
        found = np.zeros(n, bool)
        idx = np.arange(n)
        p, ff = pos, fps
        while idx.size:
            cur = F[p]
            empty = cur == 0
            cand = np.flatnonzero(cur == ff)
            hit = np.zeros(len(idx), bool)
            if cand.size:
                hit[cand] = self._keys_equal(p[cand], idx[cand], kbs)
            stop = hit | empty
            if stop.any():
                pos[idx[stop]] = p[stop]
                found[idx[hit]] = True
                keep = ~stop
                idx, p, ff = idx[keep], p[keep], ff[keep]
            p = (p + 1) & imask
        return pos, found

    def _insert(self, rows: IndexArray, slot: IndexArray | None, addrs: I64Array, blobs: list[bytes],
                batch: SerializedBatch) -> None:
        """Index new keys ``batch[rows]`` whose records were written at ``addrs``."""
        T, F, imask = self._T, self._F, int(self._mask)
        fps = batch.fps[rows]
        kbs = batch.kbs
        klens = np.fromiter(map(len, map(kbs.__getitem__, rows.tolist())), np.int64, len(rows))
        p = (fps & self._mask).view(np.intp).copy() if slot is None else slot.copy()
        sel = np.arange(len(rows))
        while sel.size:
            empty = np.flatnonzero(F[p] == 0)
            if empty.size:
                pe, ae = p[empty], addrs[sel[empty]]
                T[pe, KADDR] = ae  # claim by the record's address: unique, so one claimant wins a slot
                won = empty[T[pe, KADDR] == ae]
                pw, sw = p[won], sel[won]
                T[pw, FP] = fps[sw]
                T[pw, KLEN] = klens[sw]
                if self.reduce_fn is None:
                    T[pw, 3:] = batch.accs[rows[sw]]
                else:
                    blens = np.fromiter(map(len, map(blobs.__getitem__, sw.tolist())), np.int64, len(sw))
                    T[pw, VADDR] = addrs[sw] + klens[sw]
                    T[pw, VLEN] = blens - klens[sw]
                keep = np.ones(len(sel), bool)
                keep[won] = False
                sel, p = sel[keep], p[keep]
            p = (p + 1) & imask
        self._fill += len(rows)

    def _merge_at(self, slot: IndexArray, accs: U64Array) -> None:
        T = self._T
        for j, agg in enumerate(self.aggs):
            col = T[:, 3 + j].view(agg.dtype)
            col[slot] = agg.merge(col[slot], np.ascontiguousarray(accs[:, j]).view(agg.dtype))

    def _reduce_at(self, slots: IndexArray, idx: IndexArray, batch: SerializedBatch) -> IndexArray:
        """``fn(stored, incoming)`` for keys present; returns the batch rows whose new value found no room."""
        T, mv, fn, pack = self._T, self.share.arena_view, self.reduce_fn, self._pack
        if fn is None:
            msg = "_reduce_at needs reduce_fn; this table has numeric aggregations"
            raise TypeError(msg)
        vaddr = T[slots, VADDR].tolist()
        vlen = T[slots, VLEN].tolist()
        unpackb = msgpack.unpackb
        olds = [unpackb(mv[a:a + n], use_list=False, raw=False, strict_map_key=False)
                for a, n in zip(vaddr, vlen)]
        incoming = [batch.values[i] for i in idx.tolist()]
        vbs = list(map(pack, map(fn, olds, incoming)))
        bigger = []
        for i, (a, n, vb) in enumerate(zip(vaddr, vlen, vbs)):
            size = len(vb)
            if size <= n:  # in place
                mv[a:a + size] = vb
                self._area.waste += n - size
            else:
                bigger.append(i)
        T[slots, VLEN] = np.fromiter(map(len, vbs), np.int64, len(vbs))
        if not bigger:
            return idx[:0]
        big: IndexArray = np.asarray(bigger, np.intp)
        for i in bigger:  # until a new value is written, the slot keeps its old one
            T[slots[i], VLEN] = vlen[i]
        addrs = self._append([vbs[i] for i in bigger])
        k = len(addrs)
        done = big[:k]
        self._area.waste += int(T[slots[done], VLEN].sum())
        T[slots[done], VADDR] = addrs
        T[slots[done], VLEN] = np.fromiter((len(vbs[i]) for i in bigger[:k]), np.int64, k)
        return idx[big[k:]]

    def _append(self, blobs: list[bytes]) -> I64Array:
        """Append to the record area, compacting it once if it is full and a quarter of it is waste."""
        addrs = self._area.append(blobs)
        area = self._area
        if len(addrs) < len(blobs) and area.waste * 4 >= area.used and area.waste:
            self._compact()
            rest = self._area.append(blobs[len(addrs):])
            addrs = np.concatenate((addrs, rest))
        return addrs

    def _compact(self) -> None:
        """Rewrite the live records into fresh pages (through the heap) and repoint the index."""
        occ = np.flatnonzero(self._F != 0)
        T = self._T
        keys = split(gather(self.share.arena, T[occ, KADDR], T[occ, KLEN]), T[occ, KLEN])
        vals = split(gather(self.share.arena, T[occ, VADDR], T[occ, VLEN]), T[occ, VLEN])
        self._area.release()
        blobs = [k + v for k, v in zip(keys, vals)]
        addrs = self._area.append(blobs)
        assert len(addrs) == len(blobs), "compaction needs no more room than the records it rewrites"
        T[occ, KADDR] = addrs
        T[occ, VADDR] = addrs + T[occ, KLEN].astype(np.int64)

    def _grow(self, need: int) -> bool:
        """Rehash the index into a block for ``need`` keys (or as many as the share allows); False if none."""
        smallest = max(MIN_CAPACITY, 2 * self._cap)
        cap = smallest
        while cap * self.max_load < need:
            cap *= 2
        seg = None
        while cap >= smallest:
            seg = self.share.try_allocate(cap * self.row_bytes)
            if seg is not None:
                break
            cap //= 2
        if seg is None:
            return False
        cap = 1 << ((seg.size // self.row_bytes).bit_length() - 1)
        seg.fill(0)
        old = None if self._seg is None else self._T[self._F != 0]
        old_seg = self._seg
        self._seg = seg
        self._T = seg.as_array(np.uint64, cap * self.width).reshape(cap, self.width)
        self._F = self._T[:, FP]
        self._cap, self._mask = cap, np.uint64(cap - 1)
        self._limit = int(cap * self.max_load)
        if old is not None:
            self._rehash(old)
        if old_seg is not None:
            self.share.release(old_seg)
        return True

    def _rehash(self, rows: U64Array) -> None:
        """Place index rows of distinct keys (claims by fingerprint are safe: rows are placed whole)."""
        T, F, imask = self._T, self._F, int(self._mask)
        p = (rows[:, FP] & self._mask).view(np.intp).copy()
        sel = np.arange(len(rows))
        addr = rows[:, KADDR]
        while sel.size:
            empty = np.flatnonzero(F[p] == 0)
            if empty.size:
                pe, ae = p[empty], addr[sel[empty]]
                T[pe, KADDR] = ae
                won = empty[T[pe, KADDR] == ae]
                T[p[won]] = rows[sel[won]]
                keep = np.ones(len(sel), bool)
                keep[won] = False
                sel, p = sel[keep], p[keep]
            p = (p + 1) & imask
        self._fill = len(rows)

    # ----------------------------------------------------------------- output
    def _occupied(self) -> IndexArray:
        """Occupied slots in record order (insertion order, until values move or the area is compacted)."""
        if self._seg is None:
            return np.empty(0, np.intp)
        occ = np.flatnonzero(self._F != 0)
        return occ[np.argsort(self._T[occ, KADDR], kind="stable")]

    def iterate(self, batch_rows: int = BATCH_ROWS) -> Iterator[list[tuple[object, object]]]:
        """Every ``(key, value)``, in lists of up to ``batch_rows``; the table is unchanged."""
        occ = self._occupied()
        T, arena = self._T, self.share.arena
        for i in range(0, len(occ), batch_rows):
            s = occ[i:i + batch_rows]
            keys = decode_stream(gather(arena, T[s, KADDR], T[s, KLEN]))
            values: list[object]
            if self.reduce_fn is not None:
                values = decode_stream(gather(arena, T[s, VADDR], T[s, VLEN]))
            elif len(self.aggs) == 1:
                values = np.ascontiguousarray(T[s, 3]).view(self.aggs[0].dtype).tolist()
            else:
                cols = [np.ascontiguousarray(T[s, 3 + j]).view(a.dtype).tolist() for j, a in enumerate(self.aggs)]
                values = list(zip(*cols))
            yield list(zip(keys, values))

    def drain(self, batch_rows: int = BATCH_ROWS) -> Iterator[list[tuple[object, object]]]:
        """:meth:`iterate`, then :meth:`release` (also if the consumer stops early)."""
        try:
            yield from self.iterate(batch_rows)
        finally:
            self.release()

    def spill_chunks(self, batch_rows: int = BATCH_ROWS) -> Iterator[bytes]:
        """The table's rows as encoded chunks for a spill file (see :func:`encode_chunk`)."""
        occ = self._occupied()
        T, arena = self._T, self.share.arena
        for i in range(0, len(occ), batch_rows):
            s = occ[i:i + batch_rows]
            klens = T[s, KLEN].astype(np.int32)
            kjoined = gather(arena, T[s, KADDR], klens)
            if self.reduce_fn is None:
                payload = [np.ascontiguousarray(T[s, 3:]).tobytes()]
            else:
                vlens = T[s, VLEN].astype(np.int32)
                payload = [gather(arena, T[s, VADDR], vlens), vlens.tobytes()]
            yield self._pack([kjoined, klens.tobytes(), *payload])

    def encode_batch(self, batch: SerializedBatch) -> bytes:
        """A batch as one chunk for a spill file; :meth:`decode_chunk` reads it back."""
        klens = np.fromiter(map(len, batch.kbs), np.int32, len(batch.kbs))
        if self.reduce_fn is None:
            payload = [np.ascontiguousarray(batch.accs).tobytes()]
        else:
            vbs = list(map(self._pack, batch.values))
            payload = [b"".join(vbs), np.fromiter(map(len, vbs), np.int32, len(vbs)).tobytes()]
        return self._pack([b"".join(batch.kbs), klens.tobytes(), *payload])

    def decode_chunk(self, chunk: tuple[bytes, ...]) -> SerializedBatch:
        """A decoded chunk (the tuple an unpacker yields) -> a batch, unique by key as written."""
        kbs = split(chunk[0], np.frombuffer(chunk[1], np.int32))
        if self.reduce_fn is None:
            accs = np.frombuffer(chunk[2], np.uint64).reshape(len(kbs), len(self.aggs)).copy()
            return SerializedBatch(fingerprints(kbs), kbs, accs, [])
        return SerializedBatch(fingerprints(kbs), kbs, np.empty((len(kbs), 0), np.uint64), decode_stream(chunk[2]))

    def clear(self) -> None:
        """Forget every key; keep the index block, give the record pages back."""
        if self._seg is not None:
            self._seg.fill(0)
        self._area.release()
        self._fill = 0
        self.full = False

    def release(self) -> None:
        """Forget every key and give the index and the record pages back to the share. Idempotent."""
        seg, self._seg = self._seg, None
        self._T = np.empty((0, self.width), np.uint64)
        self._F = self._T[:, FP]
        self._cap = self._fill = self._limit = 0
        self._area.release()
        if seg is not None:
            self.share.release(seg)

    def __repr__(self) -> str:
        what = "reduce" if self.reduce_fn is not None else ", ".join(a.name for a in self.aggs)
        return f"<SerializedHashTable {self._fill} keys, capacity {self._cap}, {what}>"


def concat(batches: list[SerializedBatch]) -> SerializedBatch:
    """Batches of distinct keys -> one batch (the caller guarantees keys stay distinct)."""
    if len(batches) == 1:
        return batches[0]
    fps = np.concatenate([b.fps for b in batches])
    kbs = [kb for b in batches for kb in b.kbs]
    accs = np.concatenate([b.accs for b in batches])
    values = [v for b in batches for v in b.values]
    return SerializedBatch(fps, kbs, accs, values)
