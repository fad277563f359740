"""Batch-mode keyed state in managed memory: what KeyedAggregate and KeyedCombine hold when the runtime lends pages.

Role: :class:`ManagedKeyedState` keeps one operator's ``{key: accumulator}``
in a :class:`~runtime.managed.HashAggregator` inside the operator's share of
the worker's managed memory (``ctx.managed``), not in a Python dict. A final
aggregation spills partitions to ``io.tmp-dirs`` when its share is full and
aggregates them after the input ends; a combiner emits its partials and
starts again. Results do not come out in key insertion order (as in Flink).
A columnar stream's aggregation emits columnar batches: ``{key: keys, value: totals}``
(``{key: keys, "count": counts}`` for a count), the same rows as the record path's
dicts, without making a Python object per key.

Two forms, chosen at the first batch; a batch that does not fit the fixed
form hands the state over (as partials) to the object form for good:

=========  ===================================================  ==================================
form       when                                                 table
=========  ===================================================  ==================================
fixed      count, or sum/min/max of plain numbers (rows), or    int64 keys and int64/float64
           of the value column of a two-column columnar         accumulators as numpy columns on
           stream keyed by the other column; int keys, all-int  pages: a columnar batch never
           or all-float values                                  becomes Python objects
fixed,     sum/min/max(1) of ``(key, number)`` tuples keyed     the keys' ASCII bytes, zero-padded
str keys   by their first item, when every key is an ASCII      to a multiple of 8 bytes (the
           ``str`` without NUL and the values are as above      first batch's longest), as key
                                                                words in the rows of the table
object     any other combinable aggregation or key              msgpack keys and accumulators
=========  ===================================================  ==================================

The fixed form's str keys travel between a combiner and its final aggregation
as a numpy ``S`` column (an ASCII ``str`` hashes as its bytes do, so both
forms of a key go to the same subtask) and come out as ``str`` again. A key
longer than the table's width, or not ASCII, hands the state to the object form.

Keys of the object form compare by their msgpack bytes: ``1`` and ``1.0``
are different keys there, and list keys come back as tuples. A float sum of
the fixed form adds in hash-table order, not input order, so its last bits
may differ from a left-to-right sum. Partials between a combiner and its
final aggregation are ``(key, acc)`` pairs, or columnar ``{"key", "acc"}``
batches from a fixed-form combiner (``{"key", "column_acc"}`` when its input was
columnar, so that the final aggregation's results are columnar too).

Imports: runtime.execution.task (ManagedMemory), runtime.managed, operators.aggregations,
operators.stateless (to_records), operators.fixed_rows, operators.keyed_vectorized (gc_paused), numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np

from operators.aggregations import Aggregation, Count, Max, Min, Sum
from operators.fixed_rows import ascii_keys, key_width, min_max_unordered, numeric_values, pair_values
from operators.keyed_vectorized import gc_paused
from operators.stateless import to_records
from runtime.errors import OutOfMemoryError
from runtime.execution.task import Batch, ManagedMemory
from runtime.managed import HashAggregator

__all__ = ["ManagedKeyedState", "fits_managed_memory"]

_KINDS = {Count: "count", Sum: "sum", Min: "min", Max: "max"}
_INT_LIMIT = 1 << 62  # int sums leave the fixed form before any accumulator could pass this
#: The accumulator column of a fixed-form combiner's partials when its input was columnar (else "acc"):
#: the final aggregation then emits columnar results too.
COLUMNAR_ACC = "column_acc"
#: The object form merges repeats in a staging dict before they reach the managed table: one table insert
#: serves every repeat of a hot key in the window. It holds at most STAGING_KEYS keys, and at most one key per
#: STAGING_BYTES_PER_KEY bytes of the operator's share (a dict entry with its key and accumulator costs about
#: that much heap), so a small share stages little.
STAGING_KEYS = 1 << 16
STAGING_BYTES_PER_KEY = 128
#: Fixed-form rows are handed to the table this many at a time (two columns of 8 bytes: 4 MiB of heap).
FIXED_BATCH_ROWS = 1 << 18
#: A combiner whose emit holds more than this share of the records it took in stops combining (see add).
PASSTHROUGH_RATIO = 0.8


def fits_managed_memory(aggregation: Aggregation) -> bool:
    """Whether ``aggregation`` can keep its state in managed memory: it must merge partials."""
    return aggregation.combinable


def _gc_paused_method(fn: Callable[..., list[Batch]]) -> Callable[..., list[Batch]]:
    """Run a batch step with the cyclic GC paused: it builds many acyclic tuples and lists (keys,
    accumulators, partials), and each 700 allocations would otherwise walk every live object."""
    def paused(*args: Any, **kwargs: Any) -> list[Batch]:
        with gc_paused():
            return fn(*args, **kwargs)
    return paused


class _Unfit(Exception):
    """This batch does not fit the fixed form: hand the state over to the object form."""


class ManagedKeyedState:
    """One batch-mode keyed operator's state in its share of managed memory.

    ``combine=True``: a combiner; :meth:`add` returns the partials it emitted
    because its share was full, :meth:`results` the rest. Otherwise a final
    aggregation: :meth:`add` returns nothing and :meth:`results` yields the
    result records (``aggregation.result(key, acc)``), or columnar batches
    ``{key_column: keys, value_column: accs}`` for a columnar stream.

    Ownership: every page belongs to ``managed.owner``, within
    ``managed.share_bytes``; :meth:`release` (also after a failure) gives them
    back and deletes every spill file. Results are copies.
    Process: the worker running the operator. Not thread-safe.
    """

    def __init__(self, aggregation: Aggregation, managed: ManagedMemory, *, combine: bool,
                 key_fn: Callable[[Any], Any] | None, key_column: str | None = None) -> None:
        if not fits_managed_memory(aggregation):
            msg = f"aggregation {aggregation.name!r} cannot merge partials, so it cannot use managed memory"
            raise ValueError(msg)
        self.aggregation = aggregation
        self.managed = managed
        self.combine = combine
        self.key_fn = key_fn
        self.key_column = key_column
        self.kind = _KINDS.get(type(aggregation), "")  # "" for aggregations the fixed form cannot take
        self.field = getattr(aggregation, "field", None)
        # sum/min/max(1) of (key, value) tuples keyed by their key: the result (key, acc) needs no first record
        self.pairs = self.kind in ("sum", "min", "max") and self.field == 1
        self.form = "fixed" if self.kind and (self.kind == "count" or self.field is None or self.pairs
                                              or isinstance(self.field, str)) else "object"
        self.value_column: str | None = None  # fixed form over columnar batches
        self.columnar = False  # the input is columnar (results are too)
        self._agg: HashAggregator | None = None
        self._dtype: str | None = None  # fixed form: "int64" | "float64", fixed at the first values
        self._bound = 0  # int sums: an upper bound on every |accumulator|
        self._counted: dict[int, tuple[int, int, int]] = {}
        # A combiner that keeps almost every key apart (keys repeat less often than its share holds)
        # only costs: once an emit shows that, it forwards records as partials without a table.
        self._records_in = 0
        self._passthrough = False
        self._staging: dict[Any, Any] = aggregation.new_state()  # the object form's staging dict (_add_object)
        self.staging_keys = max(1024, min(STAGING_KEYS, managed.share_bytes // STAGING_BYTES_PER_KEY))
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []  # fixed-form rows not yet in the table
        self._pending_rows = 0
        self._pending_partials = False
        self._dense: _Dense | None = None  # the fixed form's array indexed by key (small int keys)
        self._dense_tried = False
        self._str_keys = False  # the fixed form's keys are str (the table's are bytes; see _str_key_array)
        self._key_bytes = 0  # str keys: the table's key width in bytes, fixed at the first batch
        self._emitted_later: list[Batch] = []  # partials a hand-over from the dense array made a combiner emit
        self.metrics: dict[str, int] = {"spilled_bytes": 0, "spill_files": 0, "spill_passes": 0,
                                        "managed_peak_bytes": 0}

    # ------------------------------------------------------------------ input
    def add(self, batch: Batch, *, partials: bool) -> list[Batch]:
        """Fold a batch of records (or, with ``partials``, a combiner's partials); returns partials emitted."""
        if self._passthrough:
            return [self._raw_partials(batch)]
        if self._agg is None and self._dtype is None and self.form == "fixed":
            self._first_batch(batch, partials)
        if self.combine:
            self._records_in += _rows_in(batch)
        if self.form == "fixed":
            try:
                return self._add_fixed(batch, partials)
            except _Unfit:
                emitted = self._to_object_form()
                return emitted + self._add_object(batch, partials)
        return self._add_object(batch, partials)

    def _first_batch(self, batch: Batch, partials: bool) -> None:
        if partials:  # a fixed-form combiner's partials say whether its input was columnar
            self.columnar = isinstance(batch, dict) and COLUMNAR_ACC in batch
            if isinstance(batch, dict):
                self.value_column = self.field if isinstance(self.field, str) else None
                key = batch.get("key")
                self._str_keys = not self.columnar and isinstance(key, np.ndarray) and key.dtype.kind == "S"
                return
            self.form = "object"  # pairs come from a combiner in the object form
            return
        self.columnar = isinstance(batch, dict)
        if not self.columnar and batch and self.key_fn is not None:
            key_type = type(self.key_fn(batch[0]))  # type: ignore[index]
            if key_type is str and self.pairs:
                self._str_keys = True
            elif key_type is not int:
                self.form = "object"  # a key the fixed form cannot take: do not build this batch's keys twice
                return
        if not self.columnar:
            if isinstance(self.field, str) and self.kind != "count":
                self.form = "object"  # a dict record's field: results are whole records
            return
        if self.kind != "count":
            if (self.key_column is None or not isinstance(self.field, str)
                    or set(batch) != {self.key_column, self.field}):
                self.form = "object"
            else:
                self.value_column = self.field
        elif self.key_column is None:
            self.form = "object"

    def _add_fixed(self, batch: Batch, partials: bool) -> list[Batch]:
        if partials:
            if not isinstance(batch, dict):
                raise _Unfit  # pairs from a combiner that left the fixed form
            keys = self._partial_keys(batch["key"])
            values = self._values(batch[COLUMNAR_ACC if COLUMNAR_ACC in batch else "acc"])
            return self._pend(keys, values, partials=True)
        if isinstance(batch, dict):
            if self.key_column not in batch or (self.kind != "count"
                                                and set(batch) != {self.key_column, self.value_column}):
                raise _Unfit
            keys = _int_column(batch[self.key_column])
            raw: Any = None if self.kind == "count" else batch[self.value_column]  # type: ignore[index]
        else:
            if not isinstance(batch, list):
                raise _Unfit
            raw_keys = batch if self.key_fn is None else list(map(self.key_fn, batch))
            keys = self._row_keys(raw_keys)
            raw = None if self.kind == "count" else self._row_values(batch, raw_keys)
        if raw is None:
            if self._dtype is None:
                self._dtype = "int64"
            return self._pend(keys, None, partials=False)
        values = self._values(raw)  # first: it fixes the value type the table is made for
        return self._pend(keys, values, partials=False)

    def _row_keys(self, raw_keys: list[Any]) -> np.ndarray:
        """The fixed form's keys of a batch of rows: int64, or (str keys) a numpy ``S`` array."""
        types = set(map(type, raw_keys))
        if self._str_keys:
            if types - {str}:
                raise _Unfit
            return self._str_key_array(raw_keys)
        if types - {int}:
            raise _Unfit
        try:
            return _int_keys(np.fromiter(raw_keys, np.int64, len(raw_keys)))
        except OverflowError:
            raise _Unfit from None

    def _str_key_array(self, keys: list[str]) -> np.ndarray:
        """str keys as their ASCII bytes (numpy ``S``), within the table's key width (fixed here at first).

        NUL is refused: numpy's ``S`` pads with NUL, so a key ending in one would lose it.
        """
        arr = ascii_keys(keys)
        if arr is None:
            raise _Unfit
        return self._fit_key_width(arr)

    def _fit_key_width(self, arr: np.ndarray) -> np.ndarray:
        if not self._key_bytes:
            self._key_bytes = key_width(arr)
        if arr.dtype.itemsize > self._key_bytes:
            raise _Unfit
        return arr

    def _partial_keys(self, column: Any) -> np.ndarray:
        """A fixed-form combiner's key column: int64, or (str keys) its ``S`` column within the key width."""
        if self._str_keys:
            if not isinstance(column, np.ndarray) or column.dtype.kind != "S":
                raise _Unfit
            return self._fit_key_width(column)
        return _int_column(column)

    def _pend(self, keys: np.ndarray, values: np.ndarray | None, *, partials: bool) -> list[Batch]:
        """Gather fixed-form rows into batches of FIXED_BATCH_ROWS: the table's cost is mostly per call."""
        if partials != self._pending_partials and self._pending:
            emitted = self._flush_pending()
        else:
            emitted = []
        self._pending_partials = partials
        self._pending.append((keys, values))
        self._pending_rows += len(keys)
        if self._pending_rows >= FIXED_BATCH_ROWS:
            emitted += self._flush_pending()
        return emitted

    def _flush_pending(self) -> list[Batch]:
        pending, self._pending, self._pending_rows = self._pending, [], 0
        if not pending:
            return []
        keys = np.concatenate([k for k, _ in pending]) if len(pending) > 1 else pending[0][0]
        values = None if pending[0][1] is None else (
            np.concatenate([v for _, v in pending]) if len(pending) > 1 else pending[0][1])
        dense_first = self._agg is None and not self._dense_tried and not self._str_keys
        if (self._dense is not None or dense_first) and self._dense_add(keys, values):
            return []
        if values is None:
            return self._emitted(self._table().add_batch(keys))
        if self._pending_partials:
            return self._emitted(self._table().add_partials({"key": keys, self.kind: values}))
        return self._emitted(self._table().add_batch(keys, values))

    def _dense_add(self, keys: np.ndarray, values: np.ndarray | None) -> bool:
        """Small non-negative int keys: accumulate in an array indexed by key (no hashing); False if they do not fit.

        Tried at the first gathered batch; a later key outside the array hands its contents to the hash table.
        """
        dense = self._dense
        if dense is None:
            self._dense_tried = True
            if not len(keys) or keys.min() < 0:
                return False
            capacity = int(keys.max()) + 1
            limit = self.managed.share_bytes // _Dense.BYTES_PER_SLOT
            if capacity > limit:
                return False
            try:
                dense = self._dense = _Dense(self.managed, self.kind, self._dtype or "int64", limit)
            except OutOfMemoryError:
                return False
        elif len(keys) and (keys.min() < 0 or keys.max() >= dense.capacity):
            self._dense = None
            try:
                k, a = dense.results()
                self._emitted_later += self._emitted(self._table().add_partials({"key": k, self.kind: a}))
            finally:
                dense.release()
            return False
        dense.add(keys, values, partials=self._pending_partials)
        return True

    def _row_values(self, records: list[Any], keys: list[Any]) -> list[Any]:
        """What a fixed-form aggregation of rows adds up: the records themselves (plain numbers), or the
        values of ``(key, value)`` tuples keyed by their first item (``key_by(lambda r: r[0]).sum(1)``)."""
        if not self.pairs:
            return records
        values = pair_values(records, keys)
        if values is None:
            raise _Unfit
        return values

    def _object_acc(self, key: Any, acc: Any) -> Any:
        """A fixed-form accumulator as the object form's (a field aggregation's ``[value, first record]``)."""
        return [acc, (key, acc)] if self.pairs else acc

    def _values(self, raw: Any) -> np.ndarray:
        """The fixed form's values: all int or all float, the same type in every batch."""
        if isinstance(raw, np.ndarray):
            if raw.dtype.kind in "iu" and raw.dtype != np.uint64:
                kind, values = "int64", raw.astype(np.int64, copy=False)
            elif raw.dtype == np.float64:
                kind, values = "float64", raw
            else:
                raise _Unfit
        else:
            column = numeric_values(raw)
            if column is None:
                raise _Unfit
            kind, values = column
        if self._dtype is None and self.kind != "count":
            self._dtype = kind
        elif kind != self._dtype:
            raise _Unfit
        if self.kind in ("min", "max") and min_max_unordered(values):
            raise _Unfit  # Python's min/max of NaN and -0.0 depend on order: keep its semantics exactly
        if len(values) and kind == "int64" and self.kind in ("sum", "count"):
            self._bound += int(np.abs(values).max()) * len(values)
            if self._bound > _INT_LIMIT:
                raise _Unfit
        return values

    @_gc_paused_method
    def _add_object(self, batch: Batch, partials: bool) -> list[Batch]:
        """The object form: a bounded staging dict (the aggregation's own heap loops) in front of the table.

        Repeats of a key within the staging window merge in the dict (``Counter``'s C loop for a count);
        once it holds ``staging_keys`` keys it moves, whole, into the managed table. A state that never
        outgrows the staging dict never touches the table (W3's 50,000 words).
        """
        staging, agg = self._staging, self.aggregation
        if partials:
            agg.merge_partials(staging, self._pairs(batch))
        else:
            records = to_records(batch)
            keys = iter(records) if self.key_fn is None else map(self.key_fn, records)  # no list: C loops
            agg.fold(staging, keys, records)
        return self._flush_staging() if len(staging) >= self.staging_keys else []

    def _table(self) -> HashAggregator:
        if self._agg is None:
            m = self.managed
            mode = "combine" if self.combine else "final"
            io = None if self.combine else m.io()
            if self.form == "fixed":
                aggs: list[Any] = ["count"] if self.kind == "count" else [(self.kind, self._dtype)]
                key_type = f"S{self._key_bytes}" if self._str_keys else "int64"
                self._agg = HashAggregator(m.memory, m.owner, m.share_bytes, io, aggs=aggs, key_type=key_type,
                                           mode=mode, name=m.owner)
            elif self.kind == "count":
                self._agg = HashAggregator(m.memory, m.owner, m.share_bytes, io, aggs=["count"],
                                           key_type="object", mode=mode, name=m.owner)
            else:
                self._agg = HashAggregator(m.memory, m.owner, m.share_bytes, io, key_type="object",
                                           reduce_fn=self.aggregation.merge, mode=mode, name=m.owner)
        return self._agg

    def _to_object_form(self) -> list[Batch]:
        """Leave the fixed form for good: its state moves to the object form as partials."""
        pairs: list[tuple[Any, Any]] = []
        emitted = self._flush_pending()  # rows gathered for the fixed table go in first (a combiner may emit)
        emitted += self._emitted_later
        self._emitted_later = []
        dense, self._dense = self._dense, None
        if dense is not None:
            try:
                keys, accs = dense.results()
                pairs.extend((k, self._object_acc(k, a)) for k, a in zip(keys.tolist(), accs.tolist()))
            finally:
                dense.release()
        old, self._agg = self._agg, None
        if old is not None:
            try:
                for part in old.results():
                    cols = _columns(part)
                    pairs.extend((k, self._object_acc(k, a)) for k, a in zip(_key_list(cols["key"]),
                                                                            cols[self.kind].tolist()))
            finally:
                self._count(old)
                old.release()
        self.form = "object"
        self.value_column = None
        return emitted + (self._emitted(self._table().add_partials(pairs)) if pairs else [])

    # ----------------------------------------------------------------- output
    def _emitted(self, parts: list[Any]) -> list[Batch]:
        """Partials a combiner emitted because its share was full, as the shuffle carries them."""
        if not parts:
            return []
        out = [self._partials(part) for part in parts]
        if self.combine and self._records_in:
            emitted = sum(_rows_in(b) for b in out)
            if emitted > PASSTHROUGH_RATIO * self._records_in:
                self._passthrough = True
                self.metrics["combiner_passthrough"] = 1
            self._records_in = 0
        return out

    def _raw_partials(self, batch: Batch) -> Batch:
        """A combiner that passes through: every record becomes its own partial, in the current form."""
        if self.form == "fixed":
            try:
                if isinstance(batch, dict):
                    keys = _int_column(batch[self.key_column]) if self.key_column in batch else None
                    raw: Any = None if self.kind == "count" else batch.get(self.value_column or "")
                else:
                    raw_keys = batch if self.key_fn is None else list(map(self.key_fn, batch))
                    keys = self._row_keys(raw_keys)
                    raw = None if self.kind == "count" else self._row_values(batch, raw_keys)
                if keys is None or (raw is None and self.kind != "count"):
                    raise _Unfit
                values = np.ones(len(keys), np.int64) if raw is None else self._values(raw)
                return {"key": keys, COLUMNAR_ACC if self.columnar else "acc": values}
            except (_Unfit, OverflowError):
                self.form = "object"  # later partials are pairs; the final aggregation takes both
        records = to_records(batch)
        keys_list = records if self.key_fn is None else list(map(self.key_fn, records))
        if self.kind == "count":
            return [(k, 1) for k in keys_list]
        create = self.aggregation.create
        return list(zip(keys_list, map(create, records)))

    def _pairs(self, batch: Batch) -> list[Any]:
        """Partials as ``(key, acc)`` pairs of the object form (a fixed-form combiner's are columns)."""
        if isinstance(batch, dict):
            columnar = COLUMNAR_ACC in batch
            accs = batch[COLUMNAR_ACC if columnar else "acc"].tolist()
            keys = batch["key"].tolist() if columnar else _key_list(batch["key"])
            return [(k, self._object_acc(k, a)) for k, a in zip(keys, accs)]
        return batch

    def _partials(self, part: Any) -> Batch:
        if self.form == "object":
            return part if isinstance(part, list) else list(part)
        cols = _columns(part)
        return {"key": cols["key"], COLUMNAR_ACC if self.columnar else "acc": cols[self.kind]}

    def _flush_staging(self) -> list[Batch]:
        """Move the staging dict into the managed table (a combiner emits what no longer fits there)."""
        pairs = _as_partials(self._staging)
        self._staging = self.aggregation.new_state()
        return self._emitted(self._table().add_partials(pairs)) if pairs else []

    def results(self) -> Iterator[Batch]:
        """The final records (or a combiner's remaining partials), in batches; releases the state."""
        yield from self._flush_pending()
        yield from self._emitted_later
        self._emitted_later = []
        dense, self._dense = self._dense, None
        if dense is not None:
            try:
                keys, accs = dense.results()
                self.metrics["managed_peak_bytes"] = max(self.metrics["managed_peak_bytes"], dense.nbytes)
                for i in range(0, len(keys), 1 << 16):
                    yield from self._fixed_out({"key": keys[i:i + (1 << 16)], self.kind: accs[i:i + (1 << 16)]})
            finally:
                dense.release()
        if self._staging:
            if self._agg is None or self.combine:  # the table holds nothing of these keys: skip the round trip
                staging, self._staging = self._staging, self.aggregation.new_state()
                out = _as_partials(staging) if self.combine else self.aggregation.results(staging)
                for i in range(0, len(out), STAGING_KEYS):
                    yield out[i:i + STAGING_KEYS]
            else:
                self._flush_staging()  # a final aggregation's table may hold the same keys: merge there
        agg, self._agg = self._agg, None
        if agg is None:
            return
        try:
            for part in agg.results():
                if self.form == "object" and not self.combine:
                    result = self.aggregation.result
                    yield [result(k, a) for k, a in cast(list[tuple[Any, Any]], part)]
                else:
                    yield from self._fixed_out(part)
        finally:
            self._count(agg)
            agg.release()

    def _fixed_out(self, part: Any) -> Iterator[Batch]:
        """A fixed-form (or a combiner's) result batch as the operator emits it."""
        if self.combine:
            yield self._partials(part)
        elif self.columnar:
            cols = _columns(part)
            yield {self.key_column or "key": cols["key"], (self.value_column or "count"): cols[self.kind]}
        else:
            cols = _columns(part)
            with gc_paused():  # a batch of acyclic (key, value) tuples
                out = list(zip(_key_list(cols["key"]), cols[self.kind].tolist()))
            yield out

    # ---------------------------------------------------------------- metrics
    def _count(self, agg: HashAggregator) -> None:
        """Add what ``agg`` spilled since it was last counted to :attr:`metrics`."""
        s = agg.statistics()
        before = self._counted.get(id(agg), (0, 0, 0))
        self.metrics["spilled_bytes"] += s.spilled_bytes - before[0]
        self.metrics["spill_files"] += s.spill_files - before[1]
        self.metrics["spill_passes"] += s.spill_passes - before[2]
        self._counted[id(agg)] = (s.spilled_bytes, s.spill_files, s.spill_passes)
        self.metrics["managed_peak_bytes"] = max(self.metrics["managed_peak_bytes"], s.managed_peak_bytes)

    def release(self) -> None:
        """Give every page back and delete every spill file (idempotent)."""
        dense, self._dense = self._dense, None
        if dense is not None:
            dense.release()
        self._staging = self.aggregation.new_state()
        self._pending, self._pending_rows = [], 0
        agg, self._agg = self._agg, None
        if agg is not None:
            self._count(agg)
            agg.release()


#: Python's hash(k) differs from k for k == -1 and |k| >= 2**61 - 1; a columnar partial is partitioned by
#: k itself and a row partial by hash(k), so the fixed form keeps only keys for which the two agree.
_HASH_MODULUS = (1 << 61) - 1


class _Dense:
    """Accumulators in an array indexed by key, for int keys in [0, capacity): one block of managed memory.

    Ownership: one block taken from the operator's managed memory for its owner, released by
    :meth:`release`; within the operator's share (capacity is share // BYTES_PER_SLOT).
    """

    BYTES_PER_SLOT = 9  # an 8-byte accumulator and a seen flag

    def __init__(self, managed: ManagedMemory, kind: str, dtype: str, capacity: int) -> None:
        self.managed = managed
        self.kind = kind
        self.capacity = capacity
        self.nbytes = capacity * self.BYTES_PER_SLOT
        self.segment = managed.memory.allocate(managed.owner, self.nbytes)
        raw = self.segment.as_array(np.uint8)
        self.acc = raw[:capacity * 8].view(np.dtype(dtype))
        self.seen = raw[capacity * 8:capacity * 9].view(np.bool_)
        if kind == "min":
            self.acc[:] = np.inf if dtype == "float64" else np.iinfo(np.int64).max
        elif kind == "max":
            self.acc[:] = -np.inf if dtype == "float64" else np.iinfo(np.int64).min
        else:
            self.acc[:] = 0
        self.seen[:] = False

    def add(self, keys: np.ndarray, values: np.ndarray | None, *, partials: bool) -> None:
        if values is None:  # a count of records
            counts = np.bincount(keys)
            self.acc[:len(counts)] += counts
        elif self.kind in ("sum", "count"):
            if self.acc.dtype == np.float64:
                sums = np.bincount(keys, weights=values)
                self.acc[:len(sums)] += sums
            else:
                np.add.at(self.acc, keys, values)
        elif self.kind == "min":
            np.minimum.at(self.acc, keys, values)
        else:
            np.maximum.at(self.acc, keys, values)
        self.seen[keys] = True

    def results(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.flatnonzero(self.seen).astype(np.int64)
        return keys, self.acc[keys].copy()

    def release(self) -> None:
        if not self.segment.freed:
            self.managed.memory.release(self.segment)


def _columns(part: Any) -> dict[str, np.ndarray]:
    """A fixed-form result batch: ``{"key": ..., <aggregation kind>: ...}`` numpy columns."""
    return cast(dict[str, np.ndarray], part)


def _rows_in(batch: Any) -> int:
    if isinstance(batch, dict):
        return len(next(iter(batch.values()))) if batch else 0
    return len(batch)


def _key_list(keys: np.ndarray) -> list[Any]:
    """A fixed-form key column as Python keys: ``S`` columns (str keys of rows) decode to str."""
    if keys.dtype.kind == "S":
        return cast(list[Any], keys.astype(f"U{keys.dtype.itemsize}").tolist())
    return cast(list[Any], keys.tolist())


def _int_keys(keys: np.ndarray) -> np.ndarray:
    if len(keys) and ((keys == -1).any() or (keys >= _HASH_MODULUS).any() or (keys <= -_HASH_MODULUS).any()):
        raise _Unfit
    return keys


def _int_column(column: Any) -> np.ndarray:
    if not isinstance(column, np.ndarray) or column.dtype.kind not in "iu" or column.dtype == np.uint64:
        raise _Unfit
    return _int_keys(column.astype(np.int64, copy=False))


def _as_partials(state: dict[Any, Any]) -> list[tuple[Any, Any]]:
    """A staging dict as ``(key, acc)`` partials; accumulators as tuples (msgpack keeps them on its C path)."""
    return [(k, tuple(a)) if type(a) is list else (k, a) for k, a in state.items()]
