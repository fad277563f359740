"""PageHashIndex: byte keys -> entry handles, an open-addressing hash table in the pages of a managed share.

Imports: runtime.errors, runtime.managed (share), runtime.memory (segment), runtime.state.bins
(numpy and stdlib otherwise).

The index of :class:`~runtime.state.store.ManagedKeyValueStore`: it maps a
key to the handle of its entry, an object of a
:class:`~runtime.state.bins.SmallObjectAllocator` that begins with the key
itself (:data:`ENTRY_HEADER`: a u32 whose low 31 bits are the key's length,
then the key, then whatever the caller keeps there). The index keeps no key:

- A *slot* is 16 bytes, two little-endian u64 words: the key's fingerprint
  (a 64-bit hash, never 0; 0 marks an empty slot) and the entry's handle.
  The default fingerprint is Python's ``hash`` of the bytes: salted per
  process, so the index is never persisted or shared between processes; a
  bytes object caches its hash, so a key hashed once costs nothing more.
- **Probe**: linear from slot ``fingerprint & (capacity - 1)``; a slot whose
  fingerprint matches has its entry's key compared byte for byte (read from
  the entry's header and key in the arena), so fingerprints that collide cost
  a comparison, never a wrong answer.
- **Delete** by backward shift (Knuth's algorithm R): the entries after the
  hole that may move into it do, so there are no tombstones and a probe
  stops at the first empty slot.
- **Pages**: the slots of a table that fills less than a page are one block
  of the share; a larger table is ``capacity * 16 / page_size`` pages, each
  taken on its own (no contiguous run of pages is needed). Slot ``i`` is
  word ``2 * (i & low)`` of page ``i >> shift``, read through a memoryview
  cast to ``'Q'`` (a Python int per read; numpy scalar indexing costs ten
  times more).
- **Growth**: at more than ``max_load`` of its slots filled the table
  doubles. The new table is built in numpy passes over a copy of the old
  one (sorted by home slot, each key placed at ``max(home, previous + 1)``;
  the few that run past the last slot wrap around by the one-at-a-time
  probe), then copied into its pages. A table of whole pages keeps them and
  takes as many again, so doubling needs only the new half; a table smaller
  than a page moves to a new block. A table that cannot double (the share
  has no room) goes on filling up to ``FULL_LOAD`` (longer probes, for a few
  more entries in memory before they are spilled); past that
  :meth:`PageHashIndex.add` refuses the key (False) and changes nothing.
  The store then spills, which :meth:`~PageHashIndex.clear` s the index and
  gives its pages back.

At ``max_load`` 0.7 a table holds 23-46 bytes a key. Measured with 100 k
keys (a table of 256 k slots): a hit costs 1.2 us from Python, 0.7 us of it
reading and comparing the key through the bins; a miss 0.35 us; 2 us a hit
in random key order (the slot and the entry are cache misses).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

from runtime.errors import InvalidSizeError
from runtime.managed.share import ManagedShare
from runtime.memory.segment import MemorySegment
from runtime.state.bins import SmallObjectAllocator

__all__ = ["DEFAULT_MAX_LOAD", "ENTRY_HEADER", "FULL_LOAD", "KEY_LENGTH_MASK", "SLOT_BYTES", "PageHashIndex"]

ENTRY_HEADER = struct.Struct("<I")  # the first bytes of every entry: the key's length in the low 31 bits
KEY_LENGTH_MASK = (1 << 31) - 1  # the bit above it is the caller's (the store's tombstone bit)
SLOT_BYTES = 16  # a u64 fingerprint, then a u64 handle
DEFAULT_MAX_LOAD = 0.7
FULL_LOAD = 0.9  # a table that cannot double fills up to this before it refuses a key
_MIN_SLOTS = 16
_U64 = (1 << 64) - 1


def _fingerprint(key: bytes) -> int:
    return hash(key) & _U64 or 1


class PageHashIndex:
    """Keys -> handles of the entries of ``bins`` that hold them, in slots in pages of ``share``.

    ``fingerprint`` maps a key to a 64-bit int, never 0 (tests pass one that
    collides). A key is found only while its entry (the handle given to
    :meth:`put`) starts with :data:`ENTRY_HEADER` and the key.

    Ownership: the index allocates its table's pages (or its one block) from
    ``share`` and gives them back when it grows and in :meth:`clear`. It reads
    entries of ``bins`` but never writes or frees them: the caller owns the
    entries, and must :meth:`remove` (or :meth:`clear`) a key before it frees
    or rewrites its entry's key.
    Process: the worker owning the share's arena. Not thread-safe (one task's thread).
    """

    def __init__(self, share: ManagedShare, bins: SmallObjectAllocator, *, max_load: float = DEFAULT_MAX_LOAD,
                 fingerprint: Callable[[bytes], int] = _fingerprint) -> None:
        if not 0.0 < max_load < 1.0:
            msg = f"max_load of a page hash index must be in (0, 1); got {max_load}"
            raise InvalidSizeError(msg)
        self.share = share
        self.max_load = max_load
        self._bins = bins
        self._arena = share.arena_view  # read only here: the entries' headers and keys
        self._hash = fingerprint
        self._page_slots = share.page_size // SLOT_BYTES
        self._min_slots = max(_MIN_SLOTS, share.min_block // SLOT_BYTES)
        # Owner of this index only. Empty until the first put; cleared pages go back at once.
        self._segments: list[MemorySegment] = []
        self._words: list[memoryview] = []  # per page (or the one block): its slots as u64 words
        self._capacity = 0  # slots, a power of two (0: no table)
        self._mask = 0  # capacity - 1
        self._shift = 0  # slot i lives in self._words[i >> shift] ...
        self._low = 0  # ... at words 2 * (i & low) and 2 * (i & low) + 1
        self._fill = 0  # keys held
        self._limit = 0  # keys held before the table doubles

    # ------------------------------------------------------------------ reads
    def _matches(self, handle: int, key: bytes) -> bool:
        """Whether the entry ``handle`` holds ``key`` (its header's key length, then its bytes)."""
        at, _ = self._bins.address(handle)
        arena = self._arena
        klen = ENTRY_HEADER.unpack_from(arena, at)[0] & KEY_LENGTH_MASK
        return klen == len(key) and arena[at + 4:at + 4 + klen] == key

    def _slot(self, key: bytes) -> int:
        """The slot that holds ``key``, or -1: its probe compares fingerprints, then the key in the entry."""
        if not self._fill:
            return -1
        fp = self._hash(key)
        words, mask, shift, low = self._words, self._mask, self._shift, self._low
        i = fp & mask
        while True:
            w = words[i >> shift]
            j = (i & low) << 1
            f = w[j]
            if f == fp:
                if self._matches(w[j + 1], key):
                    return i
            elif not f:
                return -1
            i = (i + 1) & mask

    def get(self, key: bytes) -> int | None:
        """The handle of ``key``'s entry, or None."""
        i = self._slot(key)
        if i < 0:
            return None
        return self._words[i >> self._shift][((i & self._low) << 1) + 1]

    def __len__(self) -> int:
        return self._fill

    def __contains__(self, key: bytes) -> bool:
        return self.get(key) is not None

    @property
    def capacity(self) -> int:
        """Slots of the table (0 before the first put and after :meth:`clear`)."""
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Bytes of the share the table holds (its rounded blocks)."""
        return sum(seg.size for seg in self._segments)

    def _table(self) -> npt.NDArray[np.uint64]:
        """The slots as a (capacity, 2) uint64 array: a copy (fingerprint, handle per row)."""
        if not self._capacity:
            return np.zeros((0, 2), np.uint64)
        return np.concatenate([np.frombuffer(w, np.uint64) for w in self._words]).reshape(-1, 2)

    def handles(self) -> list[int]:
        """The handle of every key held, in slot order (one numpy pass over the table)."""
        handles: list[int] = []
        for w in self._words:  # a page at a time: no copy of the whole table
            t = np.frombuffer(w, np.uint64).reshape(-1, 2)
            handles += t[t[:, 0] != 0, 1].tolist()
        return handles

    def items(self) -> Iterator[tuple[bytes, int]]:
        """``(key, handle)`` of every key held, in slot order; each key a copy read from its entry.

        Do not :meth:`put` or :meth:`remove` while iterating.
        """
        arena, address = self._arena, self._bins.address
        for h in self.handles():
            at, _ = address(h)
            klen = ENTRY_HEADER.unpack_from(arena, at)[0] & KEY_LENGTH_MASK
            yield bytes(arena[at + 4:at + 4 + klen]), h

    # ----------------------------------------------------------------- writes
    def put(self, key: bytes, handle: int) -> bool:
        """Map ``key`` to ``handle``; False (nothing changed) if a new key needs a larger table the share cannot give.

        For a key already held only the handle changes (no growth); its old
        entry must still hold the key during the call. ``handle``'s entry need
        not hold it yet, but must before the next call that probes.
        """
        old = self.get(key)
        if old is not None:
            self.replace(key, old, handle)
            return True
        return self.add(key, handle)

    def add(self, key: bytes, handle: int) -> bool:
        """Map ``key``, known to be absent, to ``handle``; False (nothing changed) if the table is full and cannot grow.

        Skips the probe for ``key`` itself: adding a key held already makes a second slot that shadows nothing.
        """
        if self._fill >= self._limit and not self._grow() and self._fill >= self._capacity * FULL_LOAD:
            return False
        self._insert(self._hash(key), handle)
        self._fill += 1
        return True

    def replace(self, key: bytes, old: int, new: int) -> None:
        """Make ``key``, held with handle ``old``, map to ``new``: found by its fingerprint and ``old``, no entry read.

        Raises:
            KeyError: ``key`` is not held with handle ``old``.
        """
        if self._fill:
            fp = self._hash(key)
            words, mask, shift, low = self._words, self._mask, self._shift, self._low
            i = fp & mask
            while True:
                w = words[i >> shift]
                j = (i & low) << 1
                f = w[j]
                if f == fp and w[j + 1] == old:
                    w[j + 1] = new
                    return
                if not f:
                    break
                i = (i + 1) & mask
        msg = f"key {key!r} is not in the index with handle {old:#x}"
        raise KeyError(msg)

    def _insert(self, fp: int, handle: int) -> None:
        """Put a key known to be absent in the first empty slot of its probe (room is known to be there)."""
        words, mask, shift, low = self._words, self._mask, self._shift, self._low
        i = fp & mask
        while True:
            w = words[i >> shift]
            j = (i & low) << 1
            if not w[j]:
                w[j] = fp
                w[j + 1] = handle
                return
            i = (i + 1) & mask

    def remove(self, key: bytes) -> int | None:
        """Forget ``key``; the handle it had, or None. Backward shift: the entries after the hole move up."""
        i = self._slot(key)
        if i < 0:
            return None
        words, mask, shift, low = self._words, self._mask, self._shift, self._low
        h = words[i >> shift][((i & low) << 1) + 1]
        # i is the hole. Move the next entry that may live there (its home is not in (hole, its slot]) into it.
        k = i
        while True:
            k = (k + 1) & mask
            wk = words[k >> shift]
            jk = (k & low) << 1
            f = wk[jk]
            if not f:
                break
            home = f & mask
            if (home <= i or home > k) if i <= k else (home <= i and home > k):
                w = words[i >> shift]
                j = (i & low) << 1
                w[j] = f
                w[j + 1] = wk[jk + 1]
                i = k
        w = words[i >> shift]
        j = (i & low) << 1
        w[j] = 0
        w[j + 1] = 0
        self._fill -= 1
        return h

    # ----------------------------------------------------------------- growth
    def _grow(self) -> bool:
        """Double the table (or make the first one); False (the table unchanged) if the share has no room."""
        old_capacity = self._capacity
        capacity = old_capacity * 2 if old_capacity else self._min_slots
        page_slots = self._page_slots
        # A table of whole pages keeps them and adds as many: growing needs the new pages only.
        keep = old_capacity >= page_slots
        got = self._allocate(capacity - old_capacity if keep else capacity)
        if got is None:
            return False
        table = self._table()
        if keep:
            segments, words = self._segments + got[0], self._words + got[1]
            for w in self._words:
                np.frombuffer(w, np.uint64)[:] = 0
        else:
            self._release_table()
            segments, words = got
        self._segments, self._words = segments, words
        self._capacity, self._mask = capacity, capacity - 1
        if capacity > page_slots:  # pages of page_slots slots each
            self._shift, self._low = page_slots.bit_length() - 1, page_slots - 1
        else:  # one block: i >> shift is 0 for every slot
            self._shift, self._low = capacity.bit_length(), capacity - 1
        self._limit = int(capacity * self.max_load)
        self._rehash(table)
        return True

    def _allocate(self, capacity: int) -> tuple[list[MemorySegment], list[memoryview]] | None:
        """Zeroed blocks for ``capacity`` slots: one block, or whole pages; None (nothing held) if they do not fit.

        A block of exactly ``page_size`` bytes is a page: a table of one page grows into two by keeping it.
        """
        share = self.share
        nbytes = capacity * SLOT_BYTES
        if share.available_bytes < nbytes:  # the common refusal, without taking and giving back pages
            return None
        segments: list[MemorySegment] = []
        if capacity <= self._page_slots:
            seg = share.try_allocate(nbytes)
            if seg is None:
                return None
            segments.append(seg)
        else:
            for _ in range(nbytes // share.page_size):
                seg = share.try_allocate_page()
                if seg is None:
                    for s in segments:
                        share.release(s)
                    return None
                segments.append(seg)
        size = min(nbytes, share.page_size)
        words = []
        for seg in segments:
            w = self._arena[seg.offset:seg.offset + size].cast("Q")
            np.frombuffer(w, np.uint64)[:] = 0
            words.append(w)
        return segments, words

    def _rehash(self, old: npt.NDArray[np.uint64]) -> None:
        """Place the rows of ``old`` (a copy of the previous table) in the new, empty table."""
        live = old[old[:, 0] != 0]
        if not len(live):
            return
        capacity, mask = self._capacity, np.uint64(self._mask)
        home = (live[:, 0] & mask).astype(np.int64)
        order = np.argsort(home, kind="stable")
        live, home = live[order], home[order]
        n = len(home)
        step = np.arange(n, dtype=np.int64)
        pos = np.maximum.accumulate(home - step) + step  # linear probing without wrapping: max(home, previous + 1)
        inside = pos < capacity
        table = np.zeros((capacity, 2), np.uint64)
        table[pos[inside]] = live[inside]
        per = capacity // len(self._words)
        for i, w in enumerate(self._words):
            np.frombuffer(w, np.uint64)[:] = table[i * per:(i + 1) * per].reshape(-1)
        for fp, h in live[~inside].tolist():  # ran past the last slot: they wrap around to the first ones
            self._insert(fp, h)

    # --------------------------------------------------------------- lifetime
    def _release_table(self) -> None:
        segments, self._segments = self._segments, []
        for w in self._words:
            w.release()
        self._words = []
        for seg in segments:
            self.share.release(seg)

    def clear(self) -> None:
        """Forget every key and give the table's pages back to the share (the next put makes a new one). Idempotent."""
        self._release_table()
        self._capacity = self._mask = self._shift = self._low = self._fill = self._limit = 0

    def __repr__(self) -> str:
        return f"<PageHashIndex {self._fill} keys in {self._capacity} slots, {self.nbytes} bytes held>"
