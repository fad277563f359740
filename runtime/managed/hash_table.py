"""Hash aggregation tables in managed memory: the fixed-width form (here) and the serialized form.

Imports: runtime.managed.share, runtime.memory, runtime.errors (numpy, msgpack and stdlib otherwise).

A table aggregates *rows*: a batch of records is hashed, pre-aggregated
within the batch (so its keys are unique), then probed and updated in bulk.
Running out of its share is never an error: :meth:`FixedHashTable.upsert`
returns the rows that did not fit, and the caller spills them (see
:mod:`runtime.managed.spilling`) or drains the table.

Fixed-width form (:class:`FixedHashTable`, int64 or float64 keys; count/sum/
min/max accumulators of int64 or float64). One block of the share holds
``capacity`` rows of ``1 + len(aggs)`` uint64 words: ``[h, acc0, acc1, ...]``
where ``h = mix64(key bits)`` (a bijection: the key is ``unmix64(h)``, so it is
not stored) and each accumulator keeps its own dtype's bits. ``h == 0`` marks an
empty slot; the one key whose hash is 0 lives in a side row. Open addressing
with linear probing from ``h & mask``. The probe loop is compiled
(``_kernels.c``: one row at a time to its slot, a few nanoseconds each); where
it was not built, a numpy version runs instead, vectorized: every probing
round is a handful of numpy calls over the rows still looking, and new keys
claim empty slots by writing their hash and reading it back (keys are unique
in a batch, so exactly one claimant wins). The table doubles (rehash into a new block)
while the share allows, at load ``max_load``.

Byte-string keys (``key_dtype="S16"``, any multiple of 8 bytes): numpy ``S``
arrays, zero-padded to the table's width and stored as ``w`` key words
after the hash: rows are ``[h, key0..key(w-1), acc...]``. The hash is no longer
a bijection, so rows match on ``h`` *and* every key word; two distinct keys
sharing a hash (about one pair in 2**64) are still kept apart, as slow paths
(a lexicographic sort, one claim per hash and round). ``h`` is never 0 (0
becomes 1), so no side row is needed. A key's trailing NUL bytes are padding:
callers keep keys that end in NUL out (see ``operators.managed_keyed``).

Semantics (kept from :mod:`operators.aggregations` where numpy allows):
count and sum add, min/max keep the extreme. Int sums wrap at 2**63 (int64);
float sums are added in a different order than a Python loop (equal for
integer-valued floats); NaN propagates through float min/max. Float keys
compare by value: -0.0 is 0.0, and every NaN is one key.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from runtime.errors import InvalidSizeError
from runtime.managed.share import (
    BoolArray,
    IndexArray,
    ManagedShare,
    NumArray,
    U64Array,
    bits_key,
    key_bits,
    mix64,
    unmix64,
)
from runtime.memory.segment import MemorySegment

try:  # the compiled probe loop (setup.py builds it where a C compiler is at hand)
    from runtime.managed import _kernels
except ImportError:  # pragma: no cover - an install without a compiler
    _kernels = None  # type: ignore[assignment]

__all__ = [
    "AGG_KINDS",
    "BATCH_ROWS",
    "MIN_CAPACITY",
    "Agg",
    "AggLike",
    "Columns",
    "FixedHashTable",
    "bytes_key_dtype",
    "check_share",
    "count_rows",
    "hash_words",
    "parse_aggs",
    "preaggregate_rows",
    "raw_rows",
]

AGG_KINDS = ("count", "sum", "min", "max")
MIN_CAPACITY = 64
# Inputs are processed in slices of this many records. 64 Ki keys: argsort of their hashes runs at
# 37 M/s here; 1 Mi keys fall out of the cache and sort at 13 M/s.
BATCH_ROWS = 1 << 16
_MERGE = {"count": np.add, "sum": np.add, "min": np.minimum, "max": np.maximum}
#: The compiled loop's code of each accumulator, by (kind, dtype kind): see _kernels.c.
_KERNEL_CODES = {("count", "i"): "i", ("sum", "i"): "i", ("sum", "f"): "f", ("min", "i"): "n", ("max", "i"): "x",
                 ("min", "f"): "N", ("max", "f"): "X"}

Columns: TypeAlias = dict[str, NumArray]  # "key" and one column per aggregation name


@dataclass(frozen=True)
class Agg:
    """One accumulator: ``kind`` in count/sum/min/max over values of ``dtype`` (int64 or float64).

    ``count`` is always int64; its partials merge by adding.
    """

    kind: str
    dtype: np.dtype = np.dtype(np.int64)

    @property
    def name(self) -> str:
        return self.kind

    @property
    def merge(self) -> np.ufunc:
        """The ufunc that merges two partial accumulators (and reduces within a batch)."""
        return _MERGE[self.kind]


AggLike: TypeAlias = Agg | str | tuple[str, str | np.dtype]


def parse_aggs(aggs: Sequence[AggLike]) -> tuple[Agg, ...]:
    """``("count", ("sum", "float64"), Agg("max"))`` -> Aggs; names must be distinct.

    Raises:
        ValueError: unknown kind, a dtype other than int64/float64, no aggregation, a name twice.
    """
    out: list[Agg] = []
    if isinstance(aggs, (str, Agg)):
        aggs = (aggs,)
    for spec in aggs:
        if isinstance(spec, Agg):
            agg = spec
        elif isinstance(spec, str):
            agg = Agg(spec)
        elif isinstance(spec, tuple) and len(spec) == 2:
            agg = Agg(spec[0], np.dtype(spec[1]))
        else:
            msg = f"aggregation must be a kind, (kind, dtype) or Agg; got {spec!r}"
            raise ValueError(msg)
        if agg.kind not in AGG_KINDS:
            msg = f"aggregation kind must be one of {', '.join(AGG_KINDS)}; got {agg.kind!r}"
            raise ValueError(msg)
        dtype = np.dtype(np.int64) if agg.kind == "count" else np.dtype(agg.dtype)
        if dtype not in (np.dtype(np.int64), np.dtype(np.float64)):
            msg = f"{agg.kind} accumulator dtype must be int64 or float64; got {dtype}"
            raise ValueError(msg)
        out.append(Agg(agg.kind, dtype))
    if not out:
        msg = "aggregations must name at least one of count/sum/min/max; got none"
        raise ValueError(msg)
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        msg = f"aggregation names must be distinct; got {names}"
        raise ValueError(msg)
    return tuple(out)


# ------------------------------------------------------------ row batches
def raw_rows(h: U64Array, values: npt.ArrayLike | None, aggs: tuple[Agg, ...],
             key_words: U64Array | None = None) -> U64Array:
    """Rows ``[h, key words..., acc...]`` for single records: count 1, sum/min/max the value."""
    w = 0 if key_words is None else key_words.shape[1]
    rows = np.empty((len(h), 1 + w + len(aggs)), np.uint64)
    rows[:, 0] = h
    if key_words is not None:
        rows[:, 1:1 + w] = key_words
    for j, agg in enumerate(aggs, 1 + w):
        if agg.kind == "count":
            rows[:, j] = 1
        else:
            if values is None:
                msg = f"{agg.kind} needs a values column; got values=None"
                raise ValueError(msg)
            rows[:, j] = np.asarray(values, agg.dtype).view(np.uint64)
    return rows


def preaggregate_rows(rows: U64Array, aggs: tuple[Agg, ...], key_words: int = 0) -> U64Array:
    """Sort rows by hash and merge equal keys: unique keys, ascending ``h``; a new array unless already so.

    ``key_words``: how many key words follow ``h`` (0: ``h`` is the key). Rows of one hash with
    different keys are ordered by their key words, so that equal keys are adjacent.
    """
    h = rows[:, 0]
    order = np.argsort(h)
    rows = rows[order]
    h = rows[:, 0]
    if len(h) < 2:
        return rows
    change = h[1:] != h[:-1]
    if key_words:
        same_h = ~change
        if same_h.any():
            key_change = np.zeros(len(change), bool)
            for j in range(1, 1 + key_words):
                col = rows[:, j]
                key_change |= col[1:] != col[:-1]
            if (key_change & same_h).any():  # a hash shared by different keys: order by key within it
                rows = rows[np.lexsort(tuple(rows[:, j] for j in range(key_words, -1, -1)))]
                h = rows[:, 0]
                change = h[1:] != h[:-1]
                for j in range(1, 1 + key_words):
                    col = rows[:, j]
                    change |= col[1:] != col[:-1]
            else:
                change |= key_change
    if change.all():
        return rows
    starts = np.flatnonzero(np.concatenate(([True], change)))
    out = np.empty((len(starts), rows.shape[1]), np.uint64)
    out[:, :1 + key_words] = rows[starts, :1 + key_words]
    for j, agg in enumerate(aggs, 1 + key_words):
        out[:, j] = agg.merge.reduceat(rows[:, j].view(agg.dtype), starts).view(np.uint64)
    return out


def hash_words(words: U64Array) -> U64Array:
    """A 64-bit hash of each row of key words (``(n, w)`` uint64), never 0 (0 marks an empty slot)."""
    h = mix64(np.ascontiguousarray(words[:, 0]))
    for j in range(1, words.shape[1]):
        h ^= words[:, j]
        h = mix64(h)
    h[h == 0] = 1
    return h


def bytes_key_dtype(dtype: npt.DTypeLike) -> np.dtype | None:
    """``S<n>`` with n a multiple of 8 -> that dtype; int64/float64 -> None; anything else raises ValueError."""
    dt = np.dtype(dtype)
    if dt in (np.dtype(np.int64), np.dtype(np.float64)):
        return None
    if dt.kind == "S" and dt.itemsize % 8 == 0 and dt.itemsize > 0:
        return dt
    msg = f"key_dtype must be int64, float64 or S<n> with n a multiple of 8; got {dt}"
    raise ValueError(msg)


def count_rows(h: U64Array) -> U64Array:
    """``preaggregate_rows`` for count-only tables without the row matrix: one sort, no argsort."""
    hs = np.sort(h)
    n = len(hs)
    if n and n > 1:
        starts = np.flatnonzero(np.concatenate(([True], hs[1:] != hs[:-1])))
    else:
        starts = np.arange(n)
    out = np.empty((len(starts), 2), np.uint64)
    out[:, 0] = hs[starts]
    out[:, 1] = np.diff(starts, append=n)
    return out


# ------------------------------------------------------------------ table
class FixedHashTable:
    """Open-addressing hash aggregation of int64/float64 or byte-string keys, in one block of a managed share.

    ``aggs`` are the accumulators (see :func:`parse_aggs`); ``key_dtype`` is
    int64, float64 or ``S<n>`` (n a multiple of 8: keys are numpy ``S``
    arrays of at most n bytes); the table grows at ``max_load``. Use
    :meth:`insert_batch` with raw records or :meth:`merge_batch` with partial
    aggregates; read with :meth:`iterate` (keeps the table) or :meth:`drain`
    (then releases it).

    Ownership: the table takes its block from ``share`` lazily (on the first
    insert) and gives it back when it grows, in :meth:`release` and
    :meth:`drain`; only the table writes it. Arrays returned by
    :meth:`iterate` are copies and outlive the table.
    Process: the worker owning the share. Not thread-safe.

    >>> # doctest: +SKIP
    >>> t = FixedHashTable(share, ["count", ("sum", "float64")])
    >>> t.insert_batch(np.array([7, 3, 7]), np.array([1.0, 2.0, 0.5])) is None
    True
    >>> next(t.iterate())   # {"key": [...], "count": [...], "sum": [...]}
    """

    def __init__(self, share: ManagedShare, aggs: Sequence[AggLike] = ("count",), *,
                 key_dtype: str | np.dtype = "int64", max_load: float = 0.7) -> None:
        self.share = share
        self.aggs = parse_aggs(aggs)
        self.key_dtype = np.dtype(key_dtype)
        bytes_dtype = bytes_key_dtype(self.key_dtype)
        # Key words after h in each row: 0 for int64/float64 keys (h is a bijection of the key).
        self.key_words = 0 if bytes_dtype is None else bytes_dtype.itemsize // 8
        if not 0.1 <= max_load <= 0.9:
            msg = f"max_load must be in [0.1, 0.9]; got {max_load}"
            raise ValueError(msg)
        self.max_load = max_load
        self.acc0 = 1 + self.key_words  # the first accumulator's column
        self.width = self.acc0 + len(self.aggs)
        self.row_bytes = 8 * self.width
        self._count_only = all(a.kind == "count" for a in self.aggs) and len(self.aggs) == 1 and not self.key_words
        self._codes = "".join(_KERNEL_CODES[a.kind, a.dtype.kind] for a in self.aggs).encode()
        self.compiled = _kernels is not None  # False: the numpy probe loop (tests run both)
        self._seg: MemorySegment | None = None  # the block; owner: this table
        self._T: U64Array = np.empty((0, self.width), np.uint64)  # (capacity, width) view of the block
        self._H: U64Array = self._T[:, 0]  # column 0 of _T
        self._cap = 0
        self._mask = np.uint64(0)
        self._fill = 0
        self._limit = 0
        self._zero: U64Array | None = None  # the row of the key whose hash is 0 (heap, one row)
        self.full = False  # the last upsert left rows out

    # ------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return self._fill + (self._zero is not None)

    @property
    def nbytes(self) -> int:
        """Bytes of the share this table holds."""
        return 0 if self._seg is None else self._seg.size

    @property
    def capacity(self) -> int:
        return self._cap

    # ------------------------------------------------------------------ input
    def key_words_of(self, keys: npt.ArrayLike) -> U64Array:
        """Byte-string keys as ``(n, key_words)`` uint64 words, zero-padded to the table's width.

        Raises:
            ValueError: a key longer than the table's width (``key_dtype``).
        """
        arr = np.asarray(keys)
        if arr.dtype.kind != "S":
            msg = f"keys of a {self.key_dtype} table must be a numpy S array; got dtype {arr.dtype}"
            raise ValueError(msg)
        if arr.dtype.itemsize > self.key_dtype.itemsize:
            msg = (f"keys of {arr.dtype.itemsize} bytes do not fit a table of {self.key_dtype} keys; "
                   f"make the table with a wider key_dtype")
            raise ValueError(msg)
        fixed = np.ascontiguousarray(arr, self.key_dtype)
        return fixed.view(np.uint64).reshape(len(fixed), self.key_words)

    def _hash(self, keys: npt.ArrayLike) -> tuple[U64Array, U64Array | None]:
        if self.key_words:
            words = self.key_words_of(keys)
            return hash_words(words), words
        return mix64(key_bits(keys, self.key_dtype)), None

    def preaggregate(self, rows: U64Array) -> U64Array:
        """Rows of this table's width, ready for :meth:`upsert`: with the compiled probe loop, as they are
        (the loop merges repeated keys itself); else unique keys sorted by hash (:func:`preaggregate_rows`)."""
        if self.compiled:
            return rows
        return preaggregate_rows(rows, self.aggs, self.key_words)

    def prepare(self, keys: npt.ArrayLike, values: npt.ArrayLike | None = None) -> U64Array:
        """Raw records -> rows for :meth:`upsert` (see :meth:`preaggregate`; no table access)."""
        h, words = self._hash(keys)
        if self._count_only and not self.compiled:
            return count_rows(h)
        return self.preaggregate(raw_rows(h, values, self.aggs, words))

    def prepare_partials(self, columns: Columns) -> U64Array:
        """Partial aggregates (``{"key": ..., name: ...}`` as :meth:`iterate` yields) -> rows."""
        keys = columns["key"]
        rows = np.empty((len(keys), self.width), np.uint64)
        rows[:, 0], words = self._hash(keys)
        if words is not None:
            rows[:, 1:self.acc0] = words
        for j, agg in enumerate(self.aggs, self.acc0):
            rows[:, j] = np.asarray(columns[agg.name], agg.dtype).view(np.uint64)
        return self.preaggregate(rows)

    def insert_batch(self, keys: NumArray, values: NumArray | None = None) -> U64Array | None:
        """Aggregate records ``keys`` (with ``values`` for sum/min/max): None, or the rows that did not fit.

        Rows left out are pre-aggregated partials ``[h, acc...]``; the table
        is full (``self.full``) and the caller spills them or drains the table
        and calls :meth:`upsert` with them again.
        """
        left: list[U64Array] = []
        for i in range(0, len(keys), BATCH_ROWS):
            vals = None if values is None else values[i:i + BATCH_ROWS]
            rest = self.upsert(self.prepare(keys[i:i + BATCH_ROWS], vals))
            if rest is not None:
                left.append(rest)
        return self.preaggregate(np.concatenate(left)) if left else None

    def merge_batch(self, columns: Columns) -> U64Array | None:
        """Merge partial aggregates; returns the rows that did not fit (see :meth:`insert_batch`)."""
        return self.upsert(self.prepare_partials(columns))

    def upsert(self, rows: U64Array) -> U64Array | None:
        """Merge rows (as :meth:`preaggregate` leaves them) into the table; returns those that did not fit, or None.

        Rows of keys already present always merge; new keys are inserted while
        the table (grown within the share) has room, in row order.
        """
        n = len(rows)
        self.full = False
        if n == 0:
            return None
        if self.compiled:
            return self._upsert_compiled(rows)
        if rows[0, 0] == 0:  # sorted: the key hashing to 0 comes first
            self._merge_zero(rows[0])
            rows = rows[1:]
            n -= 1
            if n == 0:
                return None
        if self._seg is None and not self._grow(n):
            self.full = True
            return rows
        h = np.ascontiguousarray(rows[:, 0])
        found_slot, found = self._find(h, rows)
        slot: IndexArray | None = found_slot
        if found.all():
            self._merge_at(found_slot, rows)
            return None
        if found.any():
            self._merge_at(found_slot[found], rows[found])
            new = ~found
            rows, slot = rows[new], found_slot[new]
        m = len(rows)
        if self._fill + m > self._limit:
            if self._grow(self._fill + m):
                slot = None  # rehashed: probe again from the hash
            room = self._limit - self._fill
            if room < m:
                self.full = True
                self._insert(rows[:room], None if slot is None else slot[:room])
                return rows[room:]
        self._insert(rows, slot)
        return None

    # ---------------------------------------------------------------- kernels
    def _upsert_compiled(self, rows: U64Array) -> U64Array | None:
        """:meth:`upsert` by the compiled loop: grow when a new key finds no room, then go on from it.

        Rows may repeat a key and come in any order; the key whose hash is 0 (int/float keys) goes to
        its side row first (0 marks an empty slot).
        """
        if not self.key_words:
            zero = rows[:, 0] == 0
            if zero.any():
                for row in rows[zero]:
                    self._merge_zero(row)
                rows = rows[~zero]
                if not len(rows):
                    return None
        if self._seg is None and not self._grow(len(rows)):
            self.full = True
            return rows
        rows = np.require(rows, np.uint64, ["C", "A"])
        n = len(rows)
        left = np.empty(n, np.int64)
        i = 0
        while True:
            i, inserted, _ = _kernels.upsert(self._T, self._cap, self.width, self.key_words, self._codes, rows, i,
                                             self._limit - self._fill, True, left)
            self._fill += inserted
            if i == n:
                return None
            if not self._grow(self._fill + n - i):
                break
        _, inserted, n_left = _kernels.upsert(self._T, self._cap, self.width, self.key_words, self._codes, rows, i,
                                              0, False, left)
        self.full = True
        return rows[left[:n_left]]

    def _same_keys(self, slots: IndexArray, rows: U64Array, which: IndexArray | None, hit: BoolArray) -> BoolArray:
        """``hit`` narrowed to the slots whose key words equal those of ``rows[which]`` (byte keys)."""
        cand = np.flatnonzero(hit)
        if not cand.size:
            return hit
        s = slots[cand]
        r = cand if which is None else which[cand]
        same = np.ones(len(cand), bool)
        T = self._T
        for j in range(1, self.acc0):
            same &= T[s, j] == rows[r, j]
        if same.all():
            return hit
        hit = hit.copy()
        hit[cand[~same]] = False
        return hit

    def _find(self, h: U64Array, rows: U64Array) -> tuple[IndexArray, BoolArray]:
        """Slot of each row's key (``found``) or the first empty slot on its probe path (not found)."""
        H, mask = self._H, self._mask
        pos = (h & mask).view(np.intp)
        cur = H[pos]
        found = cur == h
        if self.key_words:
            found = self._same_keys(pos, rows, None, found)
        done = found | (cur == 0)
        if done.all():
            return pos, found
        idx = np.flatnonzero(~done)
        p, hh = pos[idx], h[idx]
        imask = int(mask)
        while idx.size:
            p = (p + 1) & imask
            cur = H[p]
            hit = cur == hh
            if self.key_words:
                hit = self._same_keys(p, rows, idx, hit)
            stop = hit | (cur == 0)
            if stop.any():
                pos[idx[stop]] = p[stop]
                found[idx[hit]] = True
                keep = ~stop
                idx, p, hh = idx[keep], p[keep], hh[keep]
        return pos, found

    def _insert(self, rows: U64Array, slot: IndexArray | None) -> None:
        """Insert rows of new, distinct keys; ``slot``: where each one's probe found an empty slot."""
        m = len(rows)
        if not m:
            return
        T, H, imask, width = self._T, self._H, int(self._mask), self.width
        h = np.ascontiguousarray(rows[:, 0])
        if self.key_words:
            # Claims are made by hash: distinct keys of one hash would both win a slot. Insert the
            # first row of each hash now and the others after it, probing from their hash.
            hs = np.sort(h)
            if (hs[1:] == hs[:-1]).any():
                _, first = np.unique(h, return_index=True)
                rest = np.ones(m, bool)
                rest[first] = False
                self._insert(rows[first], None if slot is None else slot[first])
                self._insert(rows[rest], None)
                return
        p = (h & self._mask).view(np.intp) if slot is None else slot
        sel = np.arange(m)
        known_empty = slot is not None  # _find saw these slots empty: skip the first check
        while sel.size:
            hh = h[sel]
            empty = np.arange(len(sel)) if known_empty else np.flatnonzero(H[p] == 0)
            known_empty = False
            if empty.size:
                pe = p[empty]
                H[pe] = hh[empty]  # claim: the last writer of a slot wins it
                won = empty[H[pe] == hh[empty]]
                pw, sw = p[won], sel[won]
                for j in range(1, width):  # one column at a time: 3x faster than a row scatter
                    T[:, j][pw] = rows[sw, j]
                keep = np.ones(len(sel), bool)
                keep[won] = False
                sel, p = sel[keep], p[keep]
            p = (p + 1) & imask
        self._fill += m

    def _merge_at(self, slot: IndexArray, rows: U64Array) -> None:
        T = self._T
        for j, agg in enumerate(self.aggs, self.acc0):
            col = T[:, j].view(agg.dtype)
            col[slot] = agg.merge(col[slot], rows[:, j].view(agg.dtype))

    def _merge_zero(self, row: U64Array) -> None:
        if self._zero is None:
            self._zero = row.copy()
            return
        z = self._zero
        for j, agg in enumerate(self.aggs, 1):
            z[j:j + 1].view(agg.dtype)[0] = agg.merge(z[j:j + 1].view(agg.dtype)[0],
                                                      row[j:j + 1].view(agg.dtype)[0])

    def _grow(self, need: int) -> bool:
        """Rehash into a block holding ``need`` keys at ``max_load`` (or as many as the share allows).

        Returns False, with the table unchanged, when not even double the
        capacity (or the first block) fits in the share.
        """
        got = self.share.try_allocate_table(max(MIN_CAPACITY, 2 * self._cap), need, self.row_bytes, self.max_load)
        if got is None:
            return False
        seg, cap = got
        old_rows = None if self._seg is None else self._T[self._H != 0]
        old_seg = self._seg
        self._seg = seg
        self._T = seg.as_array(np.uint64, cap * self.width).reshape(cap, self.width)
        self._H = self._T[:, 0]
        self._cap, self._mask = cap, np.uint64(cap - 1)
        self._limit = int(cap * self.max_load)
        self._fill = 0
        if old_rows is not None and self.compiled:
            rows = np.require(old_rows, np.uint64, ["C", "A"])
            _, self._fill, _ = _kernels.upsert(self._T, cap, self.width, self.key_words, self._codes, rows, 0,
                                               len(rows), False, np.empty(len(rows), np.int64))
        elif old_rows is not None:
            self._insert(old_rows, None)
        if old_seg is not None:
            self.share.release(old_seg)
        return True

    # ----------------------------------------------------------------- output
    def rows(self, batch_rows: int = BATCH_ROWS) -> Iterator[U64Array]:
        """The table's rows ``[h, acc...]`` in batches (copies), the zero-hash row first."""
        if self._zero is not None:
            yield self._zero[None, :].copy()
        if self._seg is None:
            return
        occupied = np.flatnonzero(self._H != 0)
        for i in range(0, len(occupied), batch_rows):
            yield self._T[occupied[i:i + batch_rows]]

    def spill_chunks(self, batch_rows: int = BATCH_ROWS) -> Iterator[bytes]:
        """The table's rows ``[h, acc...]`` as bytes for a spill file, in batches; the table is unchanged."""
        for rows in self.rows(batch_rows):
            yield rows.tobytes()

    def rows_to_columns(self, rows: U64Array) -> Columns:
        """Rows ``[h, (key words), acc...]`` -> ``{"key": keys, name: accumulator}`` (new arrays)."""
        cols: Columns
        if self.key_words:
            words = np.ascontiguousarray(rows[:, 1:self.acc0])
            cols = {"key": words.view(self.key_dtype).reshape(len(words))}
        else:
            cols = {"key": bits_key(unmix64(np.ascontiguousarray(rows[:, 0])), self.key_dtype)}
        for j, agg in enumerate(self.aggs, self.acc0):
            cols[agg.name] = np.ascontiguousarray(rows[:, j]).view(agg.dtype)
        return cols

    def iterate(self, batch_rows: int = BATCH_ROWS) -> Iterator[Columns]:
        """Every key and its accumulators, as numpy columns in batches; the table is unchanged."""
        for rows in self.rows(batch_rows):
            yield self.rows_to_columns(rows)

    def drain(self, batch_rows: int = BATCH_ROWS) -> Iterator[Columns]:
        """:meth:`iterate`, then :meth:`release` (also if the consumer stops early)."""
        try:
            yield from self.iterate(batch_rows)
        finally:
            self.release()

    def clear(self) -> None:
        """Forget every key; keep the block."""
        if self._seg is not None:
            self._seg.fill(0)
        self._fill = 0
        self._zero = None
        self.full = False

    def release(self) -> None:
        """Forget every key and give the block back to the share. Idempotent."""
        seg, self._seg = self._seg, None
        self._T = np.empty((0, self.width), np.uint64)
        self._H = self._T[:, 0]
        self._cap = self._fill = self._limit = 0
        self._zero = None
        if seg is not None:
            self.share.release(seg)

    def __repr__(self) -> str:
        return (f"<FixedHashTable {len(self)} keys, capacity {self._cap}, "
                f"{', '.join(a.name for a in self.aggs)}>")


def check_share(share: ManagedShare, minimum: int, what: str) -> None:
    """Raise when the share cannot hold ``minimum`` bytes (the least ``what`` needs to make progress)."""
    if share.share_bytes < minimum:
        msg = (f"share of {share.owner!r} must hold at least {minimum} bytes for {what}; "
               f"got {share.share_bytes}; raise memory.managed.fraction")
        raise InvalidSizeError(msg)
