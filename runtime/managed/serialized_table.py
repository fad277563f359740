"""The serialized form of the managed hash table: any msgpack-able key, numeric or reduced values.

Imports: runtime.managed.share, runtime.managed.hash_table, runtime.memory (numpy, msgpack and
stdlib otherwise).

Keys are msgpack-serialized (ASCII ``str`` keys in one ``Packer.pack`` call
per batch, others one C call per record) and identified by their bytes: two
keys are equal when their serialized forms are (so ``1`` and ``1.0`` are
different keys, unlike in a dict; ``"a"`` and ``b"a"`` differ too). A batch
keeps its keys back to back in one numpy buffer (:class:`KeyBytes`), so
grouping, fingerprinting and comparing them are numpy passes, not a Python
call per key. Lookups go through a 64-bit fingerprint of the bytes
(:func:`~runtime.managed.share.fingerprints`) in a page-backed index; a
fingerprint match is confirmed by comparing the stored key bytes with the
batch's, 8 bytes at a time.

Round trip rule: msgpack arrays are decoded as **tuples** (``use_list=False``),
so tuple keys and values come back as tuples and lists come back as tuples too.
Maps come back as dicts, ``bytes`` as bytes and ``str`` as str.

Layout. The index is one block of ``capacity`` rows of uint64 words: for
numeric aggregations ``[fp, kaddr, klen, acc0, acc1, ...]`` (accumulators as
in :class:`~runtime.managed.hash_table.FixedHashTable`, updated in bulk), for
``reduce(fn)`` ``[fp, kaddr, klen, vaddr, vlen]``. ``fp == 0`` marks an empty
slot. ``kaddr``/``vaddr`` are offsets in the region's usable area (the
arena), inside pages of the record area: an append-only sequence of pages
where keys (and values) are written back to back, leaving the last 7 bytes of
each page free for 8-byte reads; a record longer than a page gets a block of
its own. An updated value is written in place when it is no
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
from runtime.managed.share import (
    WORD_PAD,
    BoolArray,
    IndexArray,
    ManagedShare,
    NumArray,
    U64Array,
    equal_strings,
    fingerprints,
    word_view,
)
from runtime.memory.segment import MemorySegment

__all__ = [
    "SCALAR_TAIL",
    "Packed",
    "RecordArea",
    "SerializedBatch",
    "SerializedHashTable",
    "concat",
    "decode_stream",
    "KeyBytes",
    "concat_keys",
    "gather",
    "gather_array",
    "split",
    "unpacker",
]

FP, KADDR, KLEN, VADDR, VLEN = 0, 1, 2, 3, 4
# _find probes the last keys still looking one at a time once this few are left: a numpy round costs
# about 40 calls whatever its size, and on a 1 M-key index the last 32 keys of a batch took ~15 rounds.
SCALAR_TAIL = 32
_MISSING = object()
_PAD = bytes(WORD_PAD)
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

    ``fps`` are the keys' fingerprints and ``keys`` their msgpack bytes, back
    to back in one buffer. Numeric aggregations keep their accumulators in
    ``accs``, an ``(m, n_aggs)`` uint64 array (each column holds its dtype's
    bits), and ``values`` is empty; ``reduce`` keeps the values as objects in
    ``values`` and ``accs`` has no column.
    """

    fps: U64Array
    keys: KeyBytes
    accs: U64Array
    values: list[object]

    def take(self, idx: IndexArray) -> SerializedBatch:
        values = self.values
        return SerializedBatch(self.fps[idx], self.keys.take(idx), self.accs[idx],
                               [values[i] for i in idx.tolist()] if values else [])

    def __len__(self) -> int:
        return len(self.keys)


def gather_array(buf: npt.NDArray[np.uint8], addrs: npt.NDArray[np.integer],
                 lens: npt.NDArray[np.integer], *, pad: int = 0) -> npt.NDArray[np.uint8]:
    """The bytes of ``buf`` at ``addrs[i]`` of ``lens[i]`` bytes, back to back, then ``pad`` zero bytes."""
    lens = lens.astype(np.int64)
    total = int(lens.sum())
    out: npt.NDArray[np.uint8] = np.zeros(total + pad, np.uint8)
    if total:
        ends = np.cumsum(lens)
        idx = np.repeat(addrs.astype(np.int64) - (ends - lens), lens) + np.arange(total)
        out[:total] = buf[idx]
    return out


def gather(arena: npt.NDArray[np.uint8], addrs: npt.NDArray[np.integer], lens: npt.NDArray[np.integer]) -> bytes:
    """:func:`gather_array` as bytes."""
    return gather_array(arena, addrs, lens).tobytes()


class KeyBytes:
    """Serialized keys in one numpy buffer: gathers, fingerprints and spills without a call per key.

    Key ``i`` is ``buf[offs[i]:offs[i] + lens[i]]``. Built from bytes, the
    keys lie back to back from offset 0 (``compact``); :meth:`take` shares the
    buffer and picks offsets. ``buf`` runs on for at least ``WORD_PAD`` bytes
    past every key, so ``words`` can read each one 8 bytes at a time.
    """

    __slots__ = ("buf", "compact", "lens", "offs", "words")

    def __init__(self, buf: npt.NDArray[np.uint8], lens: I64Array, offs: I64Array | None = None) -> None:
        self.buf = buf
        self.lens = lens
        self.compact = offs is None
        self.offs: I64Array = np.cumsum(lens) - lens if offs is None else offs
        self.words = word_view(buf)
        if offs is None and len(lens) and len(buf) < int(self.offs[-1] + lens[-1]) + WORD_PAD:
            msg = f"a KeyBytes buffer must run {WORD_PAD} bytes past its last key; got {len(buf)} bytes"
            raise ValueError(msg)

    @classmethod
    def from_list(cls, kbs: list[bytes]) -> KeyBytes:
        buf = np.frombuffer(b"".join(kbs) + _PAD, np.uint8)  # _PAD: room for the last word read
        return cls(buf, np.fromiter(map(len, kbs), np.int64, len(kbs)))

    def __len__(self) -> int:
        return len(self.lens)

    def gather(self, idx: IndexArray) -> npt.NDArray[np.uint8]:
        """The bytes of keys ``idx``, back to back (a new array)."""
        return gather_array(self.buf, self.offs[idx], self.lens[idx])

    def take(self, idx: IndexArray) -> KeyBytes:
        """Keys ``idx``, sharing this buffer."""
        return KeyBytes(self.buf, self.lens[idx], self.offs[idx])

    def joined(self) -> bytes:
        """Every key, back to back."""
        if self.compact:
            return self.buf[:int(self.lens.sum())].tobytes()
        return gather(self.buf, self.offs, self.lens)

    def tolist(self) -> list[bytes]:
        return split(self.joined(), self.lens)

    def fingerprints(self) -> U64Array:
        return fingerprints(self.buf, self.offs, self.lens)


def concat_keys(parts: list[KeyBytes]) -> KeyBytes:
    bufs = [np.frombuffer(k.joined(), np.uint8) for k in parts]
    return KeyBytes(np.concatenate([*bufs, np.zeros(WORD_PAD, np.uint8)]), np.concatenate([k.lens for k in parts]))


def split(data: bytes, lens: npt.NDArray[np.integer]) -> list[bytes]:
    """``data`` cut into pieces of ``lens``."""
    ends = np.cumsum(lens).tolist()
    return [data[a:b] for a, b in zip([0, *ends[:-1]], ends)]


class RecordArea:
    """Append-only bytes in pages of a share (plus one block per record longer than a page).

    The last ``WORD_PAD`` bytes of every page and block stay unwritten, so a
    record can be read 8 bytes at a time through :func:`~runtime.managed.share.word_view`.

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
        return self.append_packed(b"".join(blobs), np.fromiter(map(len, blobs), np.int64, len(blobs)))

    def append_packed(self, packed: bytes | npt.NDArray[np.uint8], lens: I64Array) -> I64Array:
        """:meth:`append` of records given back to back in ``packed``, of lengths ``lens``."""
        n = len(lens)
        out = np.empty(n, np.int64)
        if not n:
            return out
        ends = np.cumsum(lens)
        data = packed.data if isinstance(packed, np.ndarray) else memoryview(packed)
        arena = self.share.arena_view
        i = 0
        while i < n:
            done = int(ends[i - 1]) if i else 0
            seg = self._cur
            room = 0 if seg is None else seg.size - WORD_PAD - self._pos
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
            if size > self.share.page_size - WORD_PAD:  # a block of its own; later records go to a new page
                big = self.share.try_allocate(size + WORD_PAD)
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
        self._words = word_view(share.arena)  # the arena 8 bytes at a time, for key comparisons
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
        """Raw records -> a batch unique by key bytes.

        Numeric aggregations pack every key (ASCII ``str`` keys in one msgpack
        call, see :meth:`_pack_str_keys`) and group them in numpy, see
        :meth:`_numeric_batch`; ``reduce`` groups the bytes in a dict.
        """
        n = len(keys)
        if self.reduce_fn is not None:
            if values is None:
                msg = "reduce needs a values sequence; got values=None"
                raise ValueError(msg)
            return self._reduce_batch(list(map(self._pack, keys)), values)
        cols: list[NumArray] = []
        for agg in self.aggs:
            if agg.kind == "count":
                cols.append(np.ones(n, np.int64))
            elif values is None:
                msg = f"{agg.kind} needs a values column; got values=None"
                raise ValueError(msg)
            else:
                cols.append(np.asarray(values, agg.dtype))
        kb = self._pack_str_keys(keys)
        if kb is None:
            kb = KeyBytes.from_list(list(map(self._pack, keys)))
        return self._numeric_batch(kb, cols)

    def _pack_str_keys(self, keys: Sequence[object]) -> KeyBytes | None:
        """ASCII ``str`` keys packed in one msgpack call (an array, its header cut off), or None.

        An ASCII str of length ``L`` packs to ``L`` bytes after a header of 1
        (fixstr, L < 32), 2 (str8), 3 (str16) or 5 (str32) bytes, so the
        lengths come from ``len`` alone; the array header is what is left over.
        (``str`` subclasses pack as their text, as they do one by one.)
        """
        n = len(keys)
        if not n or type(keys[0]) is not str:
            return None
        try:
            text = "".join(keys)  # type: ignore[arg-type]  # a TypeError is the answer "not all str"
        except TypeError:
            return None
        if not text.isascii():
            return None
        lens = np.fromiter(map(len, keys), np.int64, n)  # type: ignore[arg-type]  # str keys, checked above
        lens += 1 + (lens > 31) + (lens > 255) + 2 * (lens > 65535)  # headers of 1, 2, 3 or 5 bytes
        packed = self._pack(keys)
        head = len(packed) - int(lens.sum())
        if head != (1 if n < 16 else 3 if n < 65536 else 5):
            return None  # pragma: no cover - a packer that encodes differently: pack key by key
        return KeyBytes(np.frombuffer(packed + _PAD, np.uint8)[head:], lens)

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
        return self._numeric_batch(KeyBytes.from_list(kbs), cols)

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
        uniq = KeyBytes.from_list(list(state))
        return SerializedBatch(uniq.fingerprints(), uniq, np.empty((len(uniq), 0), np.uint64), list(state.values()))

    def _numeric_batch(self, keys: KeyBytes, cols: list[NumArray]) -> SerializedBatch:
        """Rows (``keys`` and one column per aggregation) -> a batch unique by key bytes, in probing order.

        Sort by fingerprint, confirm that neighbours with equal fingerprints
        have equal bytes, and reduce the runs with the aggregations' ufuncs:
        numpy passes, no Python call per row. The sort key is the fingerprint
        rotated so that its home-slot bits in this table come first: the batch
        leaves sorted by home slot, the order :meth:`_find` probes in. A
        fingerprint shared by two different keys of the batch (1 in 2**64 per
        pair, or forced in a test) sends the batch to :meth:`_group`, a dict
        keyed by the bytes. (Before: a dict of key bytes filled through
        ``np.fromiter``, the top entry of a 2 M-key string count.)
        """
        fps = keys.fingerprints()
        k = np.uint64(max(self._cap, 1 << 16).bit_length() - 1)
        order = np.argsort((fps << (np.uint64(64) - k)) | (fps >> k))
        sfp = fps[order]
        dup = sfp[1:] == sfp[:-1]
        if not dup.any():
            accs = np.empty((len(keys), len(self.aggs)), np.uint64)
            for j, col in enumerate(cols):
                accs[:, j] = col[order].view(np.uint64)
            return SerializedBatch(sfp, keys.take(order), accs, [])
        at = np.flatnonzero(dup)
        a, b = order[at], order[at + 1]
        same = keys.lens[a] == keys.lens[b]
        if same.all():
            same = equal_strings(keys.words, keys.offs[a], keys.words, keys.offs[b], keys.lens[a])
        if not same.all():
            uniq, accs = self._group(keys.tolist(), cols)
            kb = KeyBytes.from_list(uniq)
            return SerializedBatch(kb.fingerprints(), kb, accs, [])
        starts = np.flatnonzero(np.concatenate(([True], ~dup)))
        accs = np.empty((len(starts), len(self.aggs)), np.uint64)
        for j, (agg, col) in enumerate(zip(self.aggs, cols)):
            accs[:, j] = agg.merge.reduceat(col[order], starts).view(np.uint64)
        idx = order[starts]
        return SerializedBatch(sfp[starts], keys.take(idx), accs, [])

    def _group(self, kbs: list[bytes], cols: list[NumArray]) -> tuple[list[bytes], U64Array]:
        """Distinct ``kbs`` in first-seen order and their accumulators merged from ``cols`` (one per agg)."""
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
        return uniq, accs

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
        if self.reduce_fn is not None:
            kbs = batch.keys.tolist()
            return batch if len(set(kbs)) == len(kbs) else self._reduce_batch(kbs, batch.values)
        cols = [np.ascontiguousarray(batch.accs[:, j]).view(a.dtype) for j, a in enumerate(self.aggs)]
        return self._numeric_batch(batch.keys, cols)

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
        fps, keys, accs, values = batch
        found_slot, found = self._find(fps, keys)
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
            new = ni[:room]
            if self.reduce_fn is None:
                packed, lens = keys.gather(new), keys.lens[new]
            else:
                pack = self._pack
                blobs = [kb + pack(values[i]) for kb, i in zip(keys.take(new).tolist(), new.tolist())]
                packed, lens = np.frombuffer(b"".join(blobs), np.uint8), np.fromiter(map(len, blobs), np.int64, room)
            addrs = self._append(packed, lens)
            k = len(addrs)
            if k:
                self._insert(ni[:k], None if slot is None else slot[ni[:k]], addrs, lens[:k], keys, batch)
            if k < m:
                left.append(ni[k:])
        if not left:
            return None
        self.full = True
        return batch.take(np.sort(np.concatenate(left)))

    # ---------------------------------------------------------------- kernels
    def _keys_equal(self, slots: IndexArray, idx: IndexArray, keys: KeyBytes) -> BoolArray:
        """Whether the key stored at each slot has the bytes of key ``idx[i]`` of the batch (8 bytes a pass)."""
        stored = self._rows_at(slots)  # one gather of whole rows: each is one cache line
        lens = keys.lens[idx]
        eq: BoolArray = stored[:, KLEN].astype(np.int64) == lens
        if not eq.any():
            return eq
        sel = np.flatnonzero(eq)
        eq[sel] = equal_strings(self._words, stored[sel, KADDR].astype(np.int64), keys.words,
                                keys.offs[idx[sel]], lens[sel])
        return eq

    def _find(self, fps: U64Array, keys: KeyBytes) -> tuple[IndexArray, BoolArray]:
        """Slot of each key (``found``) or the first empty slot on its probe path.

        Keys probe in the order of their home slots, so each round reads the
        index front to back instead of at random (fewer cache and TLB misses
        on a large index); batches from :meth:`prepare` come in that order.
        """
        F, imask = self._F, int(self._mask)
        n = len(fps)
        pos = (fps & self._mask).view(np.intp).copy()
        found = np.zeros(n, bool)
        idx = np.arange(n) if n < 2 or (pos[1:] >= pos[:-1]).all() else np.argsort(pos)
        p, ff = pos[idx], fps[idx]
        while idx.size:
            if idx.size <= SCALAR_TAIL:
                self._find_tail(idx, p, ff, keys, pos, found)
                break
            cur = F[p]
            empty = cur == 0
            cand = np.flatnonzero(cur == ff)
            hit = np.zeros(len(idx), bool)
            if cand.size:
                hit[cand] = self._keys_equal(p[cand], idx[cand], keys)
            stop = hit | empty
            if stop.any():
                pos[idx[stop]] = p[stop]
                found[idx[hit]] = True
                keep = ~stop
                idx, p, ff = idx[keep], p[keep], ff[keep]
            p = (p + 1) & imask
        return pos, found

    def _find_tail(self, idx: IndexArray, p: IndexArray, ff: U64Array, keys: KeyBytes, pos: IndexArray,
                   found: BoolArray) -> None:
        """:meth:`_find` for the last few keys still probing, one at a time (cheaper than numpy rounds)."""
        F, T, arena, imask = self._F, self._T, self.share.arena_view, int(self._mask)
        buf, offs, lens = keys.buf.data, keys.offs, keys.lens
        for i, q, f in zip(idx.tolist(), p.tolist(), ff.tolist()):
            o, n = int(offs[i]), int(lens[i])
            while True:
                cur = int(F[q])
                if cur == 0:
                    break
                if cur == f and int(T[q, KLEN]) == n:
                    a = int(T[q, KADDR])
                    if arena[a:a + n] == buf[o:o + n]:
                        found[i] = True
                        break
                q = (q + 1) & imask
            pos[i] = q

    def _insert(self, rows: IndexArray, slot: IndexArray | None, addrs: I64Array, rec_lens: I64Array,
                keys: KeyBytes, batch: SerializedBatch) -> None:
        """Index new keys ``batch[rows]`` whose records (``rec_lens`` bytes each) were written at ``addrs``."""
        T, F, imask = self._T, self._F, int(self._mask)
        fps = batch.fps[rows]
        klens = keys.lens[rows]
        if slot is None:  # the index grew: probe in home-slot order, as in _find
            p = (fps & self._mask).view(np.intp)
            sel = np.argsort(p)
            p = p[sel]
        else:  # _find's slots: in (nearly) that order already
            p, sel = slot.copy(), np.arange(len(rows))
        new = np.empty((len(rows), self.width), np.uint64)  # the rows to place, whole
        new[:, FP], new[:, KADDR], new[:, KLEN] = fps, addrs, klens
        if self.reduce_fn is None:
            new[:, 3:] = batch.accs[rows]
        else:
            new[:, VADDR] = addrs + klens
            new[:, VLEN] = rec_lens - klens
        row = np.dtype((np.void, self.row_bytes))
        tv, nv, K = T.view(row).reshape(-1), new.view(row).reshape(-1), T[:, KADDR]
        while sel.size:
            empty = np.flatnonzero(F[p] == 0)
            if empty.size:
                pe, ae = p[empty], addrs[sel[empty]]
                K[pe] = ae  # claim by the record's address: unique, so one claimant wins a slot
                won = empty[K[pe] == ae]
                tv[p[won]] = nv[sel[won]]
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
        moved = [vbs[i] for i in bigger]
        addrs = self._append(b"".join(moved), np.fromiter(map(len, moved), np.int64, len(moved)))
        k = len(addrs)
        done = big[:k]
        self._area.waste += int(T[slots[done], VLEN].sum())
        T[slots[done], VADDR] = addrs
        T[slots[done], VLEN] = np.fromiter((len(vbs[i]) for i in bigger[:k]), np.int64, k)
        return idx[big[k:]]

    def _append(self, packed: bytes | npt.NDArray[np.uint8], lens: I64Array) -> I64Array:
        """Append records to the area, compacting it once if it is full and a quarter of it is waste."""
        area = self._area
        addrs = area.append_packed(packed, lens)
        k = len(addrs)
        if k < len(lens) and area.waste * 4 >= area.used and area.waste:
            self._compact()
            done = int(lens[:k].sum())
            rest = self._area.append_packed(packed[done:], lens[k:])
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
        got = self.share.try_allocate_table(max(MIN_CAPACITY, 2 * self._cap), need, self.row_bytes, self.max_load)
        if got is None:
            return False
        seg, cap = got
        old = None if self._seg is None else self._rows_at(np.flatnonzero(self._F))
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

    def _rows_at(self, slots: IndexArray) -> U64Array:
        """Copies of the index rows at ``slots``: a 1-d gather of one void element per row (4x numpy's row gather)."""
        row = np.dtype((np.void, self.row_bytes))
        out: U64Array = self._T.view(row).reshape(-1)[slots].view(np.uint64).reshape(-1, self.width)
        return out

    def _rehash(self, rows: U64Array) -> None:
        """Place index rows of distinct keys into the empty index, without probing.

        Linear probing that inserts keys in order of their home slot puts key
        ``i`` (in that order) at ``max(home_i, slot_{i-1} + 1)``, that is
        ``i + max(home_k - k for k <= i)``: one sort and one running maximum.
        Keys that run past the last slot take the first empty slots from slot 0
        on, in order, which is where probing wraps around to find them.
        (Replaced a claim-and-probe loop: 0.25 s of 2.5 s on a 1 M-key rehash.)
        """
        T, F = self._T, self._F
        n, cap = len(rows), self._cap
        home = (rows[:, FP] & self._mask).astype(np.int64)
        order = np.argsort(home, kind="stable")
        i = np.arange(n)
        slot = i + np.maximum.accumulate(home[order] - i)
        wrapped = int(np.searchsorted(slot, cap))  # slot is ascending: the keys past the end are a suffix
        # rows as one void element each: a 1-d scatter, faster than numpy's row scatter
        row = np.dtype((np.void, self.row_bytes))
        tv, rv = T.view(row).reshape(-1), rows.view(row).reshape(-1)
        tv[slot[:wrapped]] = rv[order[:wrapped]]
        if wrapped < n:
            tv[np.flatnonzero(F == 0)[:n - wrapped]] = rv[order[wrapped:]]
        self._fill = n

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
        klens = batch.keys.lens.astype(np.int32)
        if self.reduce_fn is None:
            payload = [np.ascontiguousarray(batch.accs).tobytes()]
        else:
            vbs = list(map(self._pack, batch.values))
            payload = [b"".join(vbs), np.fromiter(map(len, vbs), np.int32, len(vbs)).tobytes()]
        return self._pack([batch.keys.joined(), klens.tobytes(), *payload])

    def decode_chunk(self, chunk: tuple[bytes, ...]) -> SerializedBatch:
        """A decoded chunk (the tuple an unpacker yields) -> a batch, unique by key as written."""
        kb = KeyBytes(np.frombuffer(chunk[0] + _PAD, np.uint8), np.frombuffer(chunk[1], np.int32).astype(np.int64))
        if self.reduce_fn is None:
            accs = np.frombuffer(chunk[2], np.uint64).reshape(len(kb), len(self.aggs)).copy()
            return SerializedBatch(kb.fingerprints(), kb, accs, [])
        return SerializedBatch(kb.fingerprints(), kb, np.empty((len(kb), 0), np.uint64), decode_stream(chunk[2]))

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
    keys = concat_keys([b.keys for b in batches])
    accs = np.concatenate([b.accs for b in batches])
    values = [v for b in batches for v in b.values]
    return SerializedBatch(fps, keys, accs, values)
