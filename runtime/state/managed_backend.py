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
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

import msgpack

from runtime.errors import ConfigError
from runtime.io import IOManager
from runtime.memory.manager import MemoryManager
from runtime.state import codec
from runtime.state.backend import MISSING, BackendStats, KeyedStateBackend
from runtime.state.descriptors import StateDescriptor
from runtime.state.store import ManagedKeyValueStore

__all__ = ["ManagedKeyedStateBackend"]


class ManagedKeyedStateBackend(KeyedStateBackend):
    """Keyed state in managed memory (see the module docstring).

    Ownership: the backend owns its store (pages of the operator's share,
    spill files in the IOManager's directory) and releases both in
    :meth:`close`. Values returned by :meth:`get` are decoded copies.
    Process: the worker running the operator. Not thread-safe.
    """

    name = "managed"

    def __init__(self, memory: MemoryManager, owner: Hashable, share_bytes: int, io: IOManager | None, *,
                 key_groups: int = 128) -> None:
        self.store = ManagedKeyValueStore(memory, owner, share_bytes, io, name=f"state-{owner}",
                                          key_groups=key_groups)
        self._prefixes: dict[str, bytes] = {}

    @classmethod
    def for_operator(cls, ctx: Any) -> ManagedKeyedStateBackend:
        """The backend of the operator whose context is ``ctx`` (an OperatorContext with its managed share).

        Raises:
            ConfigError: the worker has no managed memory for this operator (names the keys to set).
        """
        managed = ctx.managed
        if managed is None:
            msg = (f"operator {ctx.operator_name!r}: state.backend is 'managed' but the operator got no managed "
                   f"memory; raise memory.managed.size (or memory.managed.fraction)")
            raise ConfigError(msg)
        return cls(managed.memory, managed.owner, managed.share_bytes, managed.io(), key_groups=ctx.max_parallelism)

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
        s = self.store.stats()
        bins = tuple((b.size_class, b.objects, b.bytes_used, b.slots) for b in s.bins if b.objects)
        return BackendStats("managed", s.entries, s.memory_bytes, s.disk_bytes, cache_hits=s.memory_hits,
                            cache_misses=s.gets - s.memory_hits, bins=bins)

    def close(self) -> None:
        self.store.release()

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

