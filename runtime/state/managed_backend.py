"""The ``managed`` keyed state backend: entries serialized into the operator's share of managed memory.

Imports: runtime.state (backend, codec, descriptors, store), runtime.memory, runtime.io, runtime.errors
(msgpack). The operator passes its managed share in (runtime.execution is a layer above).

Each ``(state, key)`` entry is one record of a :class:`~runtime.state.store.ManagedKeyValueStore`
in the operator's share (``state.backend: managed``): the record's key is the
state's name and the key, encoded (:mod:`runtime.state.codec`, each
self-delimiting, so a state's records share a prefix); its value is the entry
encoded. A list state without time-to-live is a concatenation of its encoded
items, so ``add`` appends bytes instead of rewriting the list. When the share
is full, the store spills to sorted runs in ``io.tmp-dirs`` and reads them
back on access (RocksDB's shape in managed memory, as Flink's ``rocksdb``
backend); nothing here is an error for being large.

Timers (for an operator that registers them, ``timers=True``) are records of
a second store of one key group, so that its order is the records' keys'
(:class:`~runtime.state.timers.ManagedTimerQueue`): bytes in managed memory,
spilled like state, whatever their number. The two stores split the
operator's share (:meth:`ManagedKeyedStateBackend.split_share`): a quarter,
whole pages, for timers (a timer is a 20-40-byte record, a state entry is
usually larger and read far more often), the rest for state. A store takes
its pages lazily, so a share a store does not fill is memory nobody holds,
not memory the other store could use.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any

import msgpack

from runtime.errors import ConfigError, InvalidSizeError
from runtime.io import IOManager
from runtime.memory.manager import MemoryManager
from runtime.state import codec
from runtime.state.backend import MISSING, BackendStats, KeyedStateBackend
from runtime.state.descriptors import StateDescriptor
from runtime.state.store import MANAGED_SIZE_KEY, ManagedKeyValueStore, min_share_pages
from runtime.state.timers import EVENT_TIME, HEAD_TIMERS, PROCESSING_TIME, ManagedTimerQueue

__all__ = ["ManagedKeyedStateBackend"]


class ManagedKeyedStateBackend(KeyedStateBackend):
    """Keyed state in managed memory (see the module docstring).

    With ``timers`` the share is split between the state store and the
    timer store (:meth:`split_share`); without, timer calls raise
    :class:`~runtime.errors.StateAccessError`. ``head_timers``: the earliest
    timers of each domain kept on the Python heap (tests make it small).

    Ownership: the backend owns its stores (pages of the operator's share,
    spill files in the IOManager's directory) and releases them in
    :meth:`close`. Values returned by :meth:`get` are decoded copies. One
    made by :meth:`for_operator` is attached to the operator's
    ``ManagedMemory`` (``attach_state``: the worker reports its stats while
    the job runs) until :meth:`close`.
    Process: the worker running the operator. Not thread-safe.
    """

    name = "managed"

    def __init__(self, memory: MemoryManager, owner: Hashable, share_bytes: int, io: IOManager | None, *,
                 key_groups: int = 128, timers: bool = False, head_timers: int = HEAD_TIMERS) -> None:
        state_bytes, timer_bytes = self.split_share(share_bytes, memory.page_size, io is not None, owner=owner,
                                                    timers=timers)
        self.store = ManagedKeyValueStore(memory, owner, state_bytes, io, name=f"state-{owner}",
                                          key_groups=key_groups)
        self.timer_store: ManagedKeyValueStore | None = None
        if timers:
            try:
                self.timer_store = ManagedKeyValueStore(memory, owner, timer_bytes, io, name=f"timers-{owner}",
                                                        key_groups=1)
            except BaseException:
                self.store.release()
                raise
            self._timer_queues = (ManagedTimerQueue(self.timer_store, EVENT_TIME, head_timers=head_timers),
                                  ManagedTimerQueue(self.timer_store, PROCESSING_TIME, head_timers=head_timers))
        self._prefixes: dict[str, bytes] = {}
        self._detach: Callable[[], None] | None = None  # set by for_operator: leave the operator's share's report

    @staticmethod
    def split_share(share_bytes: int, page_size: int, spills: bool, *, owner: Hashable = "operator",
                    timers: bool = True) -> tuple[int, int]:
        """``(state bytes, timer bytes)`` of an operator's share: with ``timers``, a quarter of its pages for
        timers (at least the pages a store needs: :func:`~runtime.state.store.min_share_pages`), the rest for
        state.

        Raises:
            InvalidSizeError: the share holds fewer pages than the two stores need (names ``memory.managed.size``).
        """
        if not timers:
            return share_bytes, 0
        least = min_share_pages(spills=spills)
        pages = share_bytes // page_size
        timer_pages = max(least, pages // 4)
        if pages - timer_pages < least:
            msg = (f"the managed share of {owner!r} must hold at least {2 * least} pages ({2 * least * page_size} "
                   f"bytes: {least} for its state and {least} for its timers); got {share_bytes}; "
                   f"raise {MANAGED_SIZE_KEY}")
            raise InvalidSizeError(msg)
        return share_bytes - timer_pages * page_size, timer_pages * page_size

    @classmethod
    def for_operator(cls, ctx: Any, *, timers: bool = False) -> ManagedKeyedStateBackend:
        """The backend of the operator whose context is ``ctx`` (an OperatorContext with its managed share).

        Raises:
            ConfigError: the worker has no managed memory for this operator (names the keys to set).
            InvalidSizeError: with ``timers``, a share too small for two stores (:meth:`split_share`).
        """
        managed = ctx.managed
        if managed is None:
            msg = (f"operator {ctx.operator_name!r}: state.backend is 'managed' but the operator got no managed "
                   f"memory; raise memory.managed.size (or memory.managed.fraction)")
            raise ConfigError(msg)
        backend = cls(managed.memory, managed.owner, managed.share_bytes, managed.io(),
                      key_groups=ctx.max_parallelism, timers=timers)
        managed.attach_state(backend)  # the worker reports its stats while the job runs; close() detaches
        backend._detach = lambda: managed.detach_state(backend)
        return backend

    # ------------------------------------------------------------------ keys
    def _key(self, desc: StateDescriptor, key: Any) -> bytes:
        prefix = self._prefixes.get(desc.name)
        if prefix is None:
            prefix = self._prefixes[desc.name] = codec.encode(desc.name)
        return prefix + codec.encode_key(key)

    @staticmethod
    def _is_stream(desc: StateDescriptor) -> bool:
        """A list state without TTL keeps its items as concatenated encodings (append is a byte append)."""
        return desc.kind == "list" and desc.ttl_config is None

    # ---------------------------------------------------------------- entries
    def get(self, desc: StateDescriptor, key: Any) -> Any:
        data = self.store.get(self._key(desc, key))
        if data is None:
            return MISSING
        if self._is_stream(desc):
            return _decode_stream(data)
        return codec.decode(data)

    def put(self, desc: StateDescriptor, key: Any, entry: Any) -> None:
        if self._is_stream(desc):
            data = b"".join(codec.encode(item, state=desc.name) for item in entry)
        else:
            data = codec.encode(entry, state=desc.name)
        self.store.put(self._key(desc, key), data)

    def append(self, desc: StateDescriptor, key: Any, items: list[Any]) -> None:
        if not self._is_stream(desc):
            super().append(desc, key, items)
            return
        self.store.append(self._key(desc, key), b"".join(codec.encode(item, state=desc.name) for item in items))

    def remove(self, desc: StateDescriptor, key: Any) -> None:
        self.store.delete(self._key(desc, key))

    def keys(self, desc: StateDescriptor) -> Iterator[Any]:
        prefix = codec.encode(desc.name)
        for k, _ in self.store.items():
            if k.startswith(prefix):
                yield codec.decode(k[len(prefix):])

    def stats(self) -> BackendStats:
        """The state store's figures; bytes in memory and on disk count the timer store's too."""
        s = self.store.stats()
        bins = tuple((b.size_class, b.objects, b.bytes_used, b.slots) for b in s.bins if b.objects)
        # A read is a miss when it went to disk: a key absent from memory and from every run's range and bloom
        # filter (or with nothing spilled) was answered from memory. The store counts blocks read, not reads
        # that read: a read of blocks in two runs counts twice, never more than the reads not found in memory.
        misses = min(s.gets - s.memory_hits, s.disk_reads)
        memory_bytes, disk_bytes = s.memory_bytes, s.disk_bytes
        if self.timer_store is not None:  # not its stats(): they count entries, which may read every run
            memory_bytes += self.timer_store.share.used_bytes
            disk_bytes += self.timer_store.disk_bytes()
        return BackendStats("managed", s.entries, memory_bytes, disk_bytes, cache_hits=s.gets - misses,
                            cache_misses=misses, bins=bins)

    def close(self) -> None:
        detach, self._detach = self._detach, None
        if detach is not None:
            detach()
        try:
            self.store.release()
        finally:
            if self.timer_store is not None:
                self.timer_store.release()

    def snapshot(self) -> tuple[str, list[bytes]]:
        """``("managed", chunks)``: the store's records as they are stored (state name and key encoded, entry
        encoded), each chunk about SNAPSHOT_CHUNK_BYTES of msgpack ``bin`` pairs: no Python object per entry
        outlives its record. Spilled runs are read through the store's staging page."""
        chunks: list[bytes] = []
        parts: list[bytes] = []
        size = 0
        pack = _pack_bin
        for key, value in self.store.items():
            parts.append(pack(key))
            parts.append(pack(value))
            size += len(key) + len(value)
            if size >= SNAPSHOT_CHUNK_BYTES:
                chunks.append(b"".join(parts))
                parts, size = [], 0
        if parts:
            chunks.append(b"".join(parts))
        return (self.name, chunks)

    def restore(self, snapshot: Any) -> None:
        for chunk in self._check_snapshot(snapshot):
            unpacker = msgpack.Unpacker(raw=False)
            unpacker.feed(chunk)
            put = self.store.put
            for key in unpacker:
                put(key, next(unpacker))


#: A managed backend's snapshot chunk: about this many bytes of records (1 MiB: a few thousand records, small
#: next to the store's pages).
SNAPSHOT_CHUNK_BYTES = 1 << 20

_pack_bin = msgpack.Packer(use_bin_type=True).pack


def _decode_stream(data: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(ext_hook=codec.ext_hook, raw=False, strict_map_key=False)
    unpacker.feed(data)
    return list(unpacker)

