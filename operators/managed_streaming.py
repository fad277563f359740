"""Streaming keyed count/sum/min/max in managed memory: what KeyedAggregate holds with ``state.backend: managed``.

Role: :class:`StreamingManagedAggregate` keeps a streaming keyed aggregation's
accumulators in a :class:`~runtime.managed.streaming_table.StreamingFixedState`
inside the operator's share of managed memory, and returns the result after
every record, in input order, exactly as the heap path's
``aggregation.updates`` does: ``(key, count)``; ``(key, total)`` / ``(key, min)``
/ ``(key, max)`` for plain numbers, and the same 2-tuples for sum/min/max(1)
of ``(key, number)`` tuples keyed by their first item (the field aggregation's
first record with field 1 replaced).

It takes a batch when every key is an int within int64, or every key an ASCII
``str`` without NUL within the key width (fixed by the first batch: its longest
key rounded up to 8 bytes, at least 16), and every value is an int (all of
them) or a float (all of them; the type fixed by the first batch). An int sum
leaves before any accumulator could pass 2**62; a float min/max of NaN or
-0.0 leaves too (Python's result depends on the order). A batch that does not
fit makes :meth:`StreamingManagedAggregate.updates` return None: the caller
moves the state with :meth:`take_entries` to its generic path for good.

Imports: runtime.execution.task (ManagedMemory), runtime.managed, operators.aggregations,
operators.keyed_vectorized (gc_paused), operators.fixed_rows, numpy, stdlib.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, cast

import numpy as np

from operators.aggregations import Aggregation, Count, Max, Min, Sum
from operators.fixed_rows import ascii_keys, key_width, min_max_unordered, numeric_values, pair_values
from operators.keyed_vectorized import gc_paused
from runtime.execution.task import ManagedMemory
from runtime.managed.share import ManagedShare, unmix64
from runtime.managed.streaming_table import LoggedRows, StreamingFixedState, image_entries
from runtime.state.codec import Incremental, Raw

__all__ = ["PreparedBatch", "StreamingManagedAggregate", "fits_streaming_state", "fixed_entries"]

_KINDS = {Count: "count", Sum: "sum", Min: "min", Max: "max"}
_INT_LIMIT = 1 << 62  # int sums leave before any accumulator could pass this (int64 wraps at 2**63)


class PreparedBatch(NamedTuple):
    """One input batch as :meth:`StreamingManagedAggregate.apply` takes it (made by ``prepare``).

    ``raw_keys`` are the records' keys as the job gave them (they go out in the updates), ``keys`` the
    same as the state's key column (int64 or ``S<n>``), ``values`` the value column (None for count).
    """

    raw_keys: list[Any]
    keys: np.ndarray
    values: np.ndarray | None


def fits_streaming_state(aggregation: Aggregation) -> bool:
    """Whether ``aggregation`` can run on a StreamingFixedState: count, or sum/min/max of numbers or of field 1."""
    kind = _KINDS.get(type(aggregation))
    if kind is None:
        return False
    return kind == "count" or getattr(aggregation, "field", None) in (None, 1)


def fixed_entries(snapshot: Any, *, pairs: bool) -> Iterator[tuple[Any, Any]]:
    """The ``(key, accumulator)`` entries of a :meth:`StreamingManagedAggregate.snapshot` (decoded) as the heap
    path keeps them (a field aggregation's, ``pairs``, as ``[value, first record]``), partition by partition."""
    str_keys, _, key_bytes, dtype, _, images = snapshot
    if not images:
        return
    key_dtype = np.dtype(f"S{key_bytes}" if str_keys else "int64")
    value_dtype = np.dtype(dtype or "int64")
    zero, parts = images
    chunks: list[tuple[Any, Any]] = []
    if zero is not None:
        zero_key = unmix64(np.zeros(1, np.uint64)).view(np.int64)
        chunks.append((zero_key, np.array([zero], np.uint64).view(value_dtype)))
    chunks.extend(image_entries(data, key_dtype, value_dtype) for data in parts if data is not None)
    for keys, accs in chunks:
        key_list = keys.astype(f"U{key_dtype.itemsize}").tolist() if str_keys else keys.tolist()
        acc_list = accs.tolist()
        if pairs:
            yield from ((k, [a, (k, a)]) for k, a in zip(key_list, acc_list))
        else:
            yield from zip(key_list, acc_list)


class StreamingManagedAggregate:
    """One streaming keyed count/sum/min/max in the operator's share of managed memory.

    Ownership: the share's pages (taken for ``managed.owner``, within
    ``managed.share_bytes``) and spill files belong to this object until
    :meth:`release` (also at the end of :meth:`take_entries`). Results are new lists.
    Process: the worker running the operator. Not thread-safe.
    """

    def __init__(self, aggregation: Aggregation, managed: ManagedMemory, key_fn: Callable[[Any], Any] | None,
                 *, name: str = "streaming-state") -> None:
        if not fits_streaming_state(aggregation):
            msg = f"aggregation {aggregation!r} is not a count, or a sum/min/max of numbers or of field 1"
            raise ValueError(msg)
        self.aggregation = aggregation
        self.managed = managed
        self.key_fn = key_fn
        self.name = name
        self.kind = _KINDS[type(aggregation)]
        self.pairs = self.kind != "count" and getattr(aggregation, "field", None) == 1
        self._state: StreamingFixedState | None = None
        self._share: ManagedShare | None = None
        self._str_keys = False
        self._keys_fixed = False  # whether _str_keys (and, for str keys, _key_bytes) are fixed
        self._key_bytes = 0
        self._dtype: str | None = None  # the values' type, fixed by the first batch with values
        self._bound = 0  # int sums: an upper bound on every |accumulator|
        # Incremental checkpoints (see snapshot): the chain the last completed checkpoint's snapshot ends
        self._completed = 0  # the last checkpoint whose snapshot of this state completed (0: none known)
        self._base = 0  # the checkpoint of the full snapshot that chain starts from
        self._base_bytes = 0
        self._chain_bytes = 0  # bytes of the chain's deltas
        # snapshots taken and not known complete: checkpoint -> (full one's bytes or None, changelog it took)
        self._pending: dict[int, tuple[int | None, list[Any]]] = {}

    # ------------------------------------------------------------------ input
    def updates(self, records: list[Any]) -> list[Any] | None:
        """The result after every record, in input order; None (nothing changed) if the batch does not fit."""
        prepared = self.prepare(records)
        return None if prepared is None else self.apply([prepared])

    def prepare(self, records: list[Any]) -> PreparedBatch | None:
        """A batch's keys and values as the state takes them, or None (nothing changed) if it does not fit.

        A caller that holds input for a mini-batch holds these instead of the records: the raw keys (str or
        int, which the garbage collector does not track) and two arrays, not one tracked tuple per record.
        Every prepared batch must be applied, in order, before the state is handed over.
        """
        raw_keys = records if self.key_fn is None else list(map(self.key_fn, records))
        if not raw_keys:
            return PreparedBatch([], np.empty(0, np.int64), None)
        key_types = set(map(type, raw_keys))
        if not self._keys_fixed:  # the first batch fixes the key type (str or int) for good
            if key_types == {str}:
                self._str_keys = True
            elif key_types != {int}:
                return None
        keys = self._keys(raw_keys, key_types)
        if keys is None:
            return None
        self._keys_fixed = True
        values = None
        if self.kind != "count":
            values = self._values(records, raw_keys)
            if values is None:
                return None
        return PreparedBatch(raw_keys, keys, values)

    def apply(self, batches: list[PreparedBatch]) -> list[Any]:
        """Fold prepared batches (in input order) into the state: the result after every record, in order."""
        batches = [b for b in batches if b.raw_keys]
        if not batches:
            return []
        if len(batches) == 1:
            raw_keys, keys, values = batches[0].raw_keys, batches[0].keys, batches[0].values
        else:
            raw_keys = [k for b in batches for k in b.raw_keys]
            keys = np.concatenate([b.keys for b in batches])
            values = None if self.kind == "count" else np.concatenate([cast(np.ndarray, b.values) for b in batches])
        state = self._state if self._state is not None else self._make_state()
        accs = state.update(keys, values).tolist()
        with gc_paused():  # a batch of acyclic 2-tuples
            return list(zip(raw_keys, accs))

    def _keys(self, raw_keys: list[Any], key_types: set[type]) -> np.ndarray | None:
        if self._str_keys:
            if key_types != {str}:
                return None
            arr = ascii_keys(raw_keys)
            if arr is None:
                return None
            if not self._key_bytes:
                self._key_bytes = key_width(arr)
            return arr if arr.dtype.itemsize <= self._key_bytes else None
        if key_types != {int}:
            return None
        try:
            return np.fromiter(raw_keys, np.int64, len(raw_keys))
        except OverflowError:
            return None

    def _values(self, records: list[Any], raw_keys: list[Any]) -> np.ndarray | None:
        raw = pair_values(records, raw_keys) if self.pairs else records
        column = None if raw is None else numeric_values(raw)
        if column is None:
            return None
        kind, values = column
        if self._dtype is not None and kind != self._dtype:
            return None
        if self.kind in ("min", "max") and min_max_unordered(values):
            return None
        if kind == "int64" and self.kind == "sum":
            bound = self._bound + int(np.abs(values).max()) * len(values)
            if bound > _INT_LIMIT:
                return None
            self._bound = bound
        self._dtype = kind
        return values

    def _make_state(self) -> StreamingFixedState:
        m = self.managed
        self._share = ManagedShare(m.memory, m.owner, m.share_bytes)
        key_dtype = f"S{self._key_bytes}" if self._str_keys else "int64"
        self._state = StreamingFixedState(self._share, m.io, self.kind, value_dtype=self._dtype or "int64",
                                          key_dtype=key_dtype, name=self.name)
        return self._state

    # ----------------------------------------------------------------- output
    def take_entries(self) -> list[tuple[Any, Any]]:
        """Every ``(key, accumulator)`` as the heap path keeps them (a field aggregation's ``[value, first
        record]``), then :meth:`release`: the state moves to the generic path. The entries are read into the
        heap first, so that the generic path's store may take the share's memory."""
        entries: list[tuple[Any, Any]] = []
        if self._state is not None:
            for keys, accs in self._state.items():
                key_list = keys.astype(f"U{keys.dtype.itemsize}").tolist() if self._str_keys else keys.tolist()
                if self.pairs:
                    entries.extend((k, [a, (k, a)]) for k, a in zip(key_list, accs.tolist()))
                else:
                    entries.extend(zip(key_list, accs.tolist()))
        self.release()
        return entries

    # ------------------------------------------------------------- checkpoints
    def snapshot(self, checkpoint_id: int = 0) -> Any:
        """The state for checkpoint ``checkpoint_id``: full, or what changed since the last completed one.

        Full: ``[str keys, keys fixed, key bytes, value dtype, int-sum bound, images]`` where ``images`` is
        ``[zero, partitions]`` as ``StreamingFixedState.images`` gives them (None: no state), each
        partition's packed rows held out of band (:class:`~runtime.state.codec.Raw`): the checkpoint copies
        them once, from managed memory to the blob (no Python object per key); they are views of the state,
        which the caller copies before it changes (``Subtask.checkpoint`` does). From then on the state keeps
        a changelog (each record's key and accumulator after it), bounded by a quarter of the share.

        Incremental (an :class:`~runtime.state.codec.Incremental` on the last completed snapshot): the same
        header and the changelog since that one, as one out-of-band buffer of rows. Taken while the changelog
        is whole and the chain's deltas stay under half the full snapshot's size; else a full one again
        (Flink's changelog state backend materializes the same way). W5, 2.5 M keys a worker: 80 MB full,
        about 10 MB of changes a second."""
        header = [self._str_keys, self._keys_fixed, self._key_bytes, self._dtype, self._bound]
        state = self._state
        if state is None:
            self._pending[checkpoint_id] = (0, [])
            return [*header, None]
        since = [cid for cid in sorted(self._pending) if cid > self._completed]
        pending_bytes = sum(a.nbytes for cid in since for a in self._pending[cid][1])
        if (checkpoint_id and self._completed and state.logging
                and all(self._pending[cid][0] is None for cid in since)
                and self._chain_bytes + pending_bytes + state.log_bytes <= self._base_bytes // 2):
            new = state.take_changes()
            self._pending[checkpoint_id] = (None, new)
            segments = [a for cid in since for a in self._pending[cid][1]] + new
            return Incremental(self._completed, self._base, [*header, Raw(LoggedRows(segments))])
        zero, parts = state.images()
        images = [None if zero is None else int(zero), [None if part is None else Raw(part) for part in parts]]
        state.log_changes(self.managed.share_bytes // 4)
        self._pending[checkpoint_id] = (len(state) * state.row_bytes, [])
        return [*header, images]

    def checkpoint_complete(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` completed: its snapshot (if this state took one) ends the chain the next
        incremental snapshot builds on."""
        if checkpoint_id not in self._pending:
            return
        for cid in sorted(c for c in self._pending if c <= checkpoint_id):
            full_bytes, segments = self._pending.pop(cid)
            if full_bytes is not None:
                self._base, self._base_bytes, self._chain_bytes = cid, full_bytes, 0
            else:
                self._chain_bytes += sum(a.nbytes for a in segments)
        self._completed = checkpoint_id

    def restore(self, snapshot: Any) -> None:
        """Take back what :meth:`snapshot` returned (decoded; a full one) into this new, empty state: its key
        and value types, and every partition's rows. Then :meth:`replay` each delta of its chain."""
        str_keys, keys_fixed, key_bytes, dtype, bound, images = snapshot
        if self._state is not None or self._keys_fixed:
            msg = f"{self.name}: restore() needs a new, empty state; this one holds {len(self._state or ())} keys"
            raise RuntimeError(msg)
        self._str_keys, self._keys_fixed, self._key_bytes = bool(str_keys), bool(keys_fixed), int(key_bytes)
        self._dtype, self._bound = dtype, int(bound)
        if not images:
            return
        zero, parts = images
        self._make_state().restore_images(zero, parts)

    def replay(self, delta: Any) -> None:
        """Apply an incremental snapshot's changes (decoded) after :meth:`restore` of the full one."""
        str_keys, keys_fixed, key_bytes, dtype, bound, rows = delta
        self._keys_fixed, self._dtype, self._bound = bool(keys_fixed), dtype, int(bound)
        state = self._state if self._state is not None else self._make_state()
        state.replay(rows)

    def metrics(self) -> dict[str, int]:
        """What the state holds, as the job's state metrics (and how it moved partitions)."""
        if self._state is None:
            return {"state_entries": 0, "state_bytes_in_memory": 0, "state_bytes_on_disk": 0}
        s = self._state.stats()
        return {"state_entries": s.entries, "state_bytes_in_memory": s.memory_bytes,
                "state_bytes_on_disk": s.disk_bytes, "state_partition_loads": s.partition_loads,
                "state_partition_evictions": s.partition_evictions, "spilled_bytes": s.spilled_bytes}

    def release(self) -> None:
        """Give every page back and delete every spill file (idempotent)."""
        state, self._state = self._state, None
        if state is not None:
            state.release()
        share, self._share = self._share, None
        if share is not None:
            share.release_all()
