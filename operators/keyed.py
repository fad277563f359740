"""Keyed aggregations: the Aggregation abstraction, KeyedAggregate and the KeyedCombine combiner.

Role: ``key_by(...).count() / sum / min / max / reduce``. State is a plain dict
``{key: acc}`` per operator (insertion ordered: results come out in the
order keys were first seen). Batches are folded into it with tight loops and
no per-record method call through the operator chain; ``count`` uses
``Counter.update`` (a C loop). Before a shuffle the graph builder may put a
:class:`KeyedCombine` (pre-aggregation, as Flink's batch mode does) and read
its ``(key, acc)`` partials with ``KeyedAggregate(..., partial_input=True)``.

Imports: runtime.task, operators.stateless (batch helpers), stdlib.

Result shapes (as in Flink):

==================  ==========================================  =======================
aggregation         keyed result (``KeyedAggregate``)           window value
==================  ==========================================  =======================
``count()``         ``(key, count)``                            ``count``
``sum()``           ``(key, total)`` (records are numbers)      ``total``
``sum(field)``      the key's first record, field := total      same record
``min()/max()``     ``(key, min)`` / ``(key, max)``             ``min`` / ``max``
``min/max(field)``  the key's first record, field := min/max    same record
``reduce(fn)``      the reduced record                          the reduced record
==================  ==========================================  =======================

``field`` is an int index for tuples/lists (tuples stay tuples, namedtuples
stay namedtuples) or a str key for dicts. Like Flink's ``min``/``max`` (not
``minBy``), only the field changes; the rest comes from the key's first
record. After a combiner, "first" means first in the first partial merged.
Functions given to ``reduce`` must be associative and commutative when a
combiner is used (Flink's assumption for ReduceFunction).
"""

from __future__ import annotations

import builtins
import contextlib
import gc
import itertools
import operator
from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np

from runtime.task import Batch, Emit, Operator, TimestampedBatch

from operators.stateless import to_records

__all__ = [
    "Aggregation", "Count", "Sum", "Min", "Max", "Reduce",
    "count", "sum", "min", "max", "reduce", "combinable",
    "KeyedAggregate", "KeyedCombine", "partial_key",
]

_MISSING = object()
_builtin_min = builtins.min
_builtin_max = builtins.max
EMIT_BATCH_SIZE = 10_000  # records per emitted batch when a keyed operator flushes its state


def partial_key(pair: tuple[Any, Any]) -> Any:
    """The key of a ``(key, acc)`` partial: what the shuffle after a KeyedCombine partitions by."""
    return pair[0]


class Aggregation:
    """How to aggregate the records of one key: ``create / add / merge / result``.

    ``create(record) -> acc`` starts an accumulator, ``add(acc, record) -> acc``
    adds a record, ``merge(a, b) -> acc`` combines two partial accumulators
    (needed for combiners), ``result(key, acc)`` is the keyed output record and
    ``value(acc)`` the value a window emits. Accumulators must be
    msgpack-able (they cross the shuffle as ``(key, acc)`` partials): after the
    network, a tuple may come back as a list, so ``merge`` must accept both
    and never mutate its arguments.

    The batch methods (``fold``, ``updates``, ``merge_partials``, ``results``)
    have generic loops here; built-in aggregations override them with faster
    ones. Override only the four record methods in your own subclass:

    >>> class Mean(Aggregation):
    ...     def create(self, r): return (r, 1)
    ...     def add(self, acc, r): return (acc[0] + r, acc[1] + 1)
    ...     def merge(self, a, b): return (a[0] + b[0], a[1] + b[1])
    ...     def result(self, key, acc): return (key, acc[0] / acc[1])
    >>> state = {}
    >>> Mean().fold(state, ["a", "b", "a"], [1, 5, 3])
    >>> Mean().results(state), combinable(Mean())
    ([('a', 2.0), ('b', 5.0)], True)
    """

    name = "aggregation"

    def create(self, record: Any) -> Any:
        raise NotImplementedError

    def add(self, acc: Any, record: Any) -> Any:
        raise NotImplementedError

    def merge(self, a: Any, b: Any) -> Any:
        msg = f"aggregation {self.name!r} cannot merge partial accumulators; do not combine it before the shuffle"
        raise NotImplementedError(msg)

    def result(self, key: Any, acc: Any) -> Any:
        return (key, acc)

    def value(self, acc: Any) -> Any:
        """What a window emits for this accumulator (``result`` without the key)."""
        return acc

    @property
    def combinable(self) -> bool:
        """True when partial accumulators can be merged (``merge`` is implemented)."""
        return type(self).merge is not Aggregation.merge

    # -- batch methods ---------------------------------------------------------------

    def new_state(self) -> dict:
        """An empty ``{key: acc}`` state."""
        return {}

    def fold(self, state: dict, keys: Iterable[Any], records: list) -> None:
        """Fold ``records`` (with their parallel ``keys``) into ``state`` in place."""
        create, add, get = self.create, self.add, state.get
        for key, record in zip(keys, records):
            acc = get(key, _MISSING)
            state[key] = create(record) if acc is _MISSING else add(acc, record)

    def updates(self, state: dict, keys: Iterable[Any], records: list) -> list:
        """Fold like :meth:`fold` and return the updated result after every record (streaming)."""
        create, add, result, get = self.create, self.add, self.result, state.get
        out = []
        append = out.append
        for key, record in zip(keys, records):
            acc = get(key, _MISSING)
            acc = state[key] = create(record) if acc is _MISSING else add(acc, record)
            append(result(key, acc))
        return out

    def merge_partials(self, state: dict, pairs: Iterable[Any]) -> None:
        """Merge ``(key, acc)`` partials (from a combiner) into ``state``."""
        merge, get = self.merge, state.get
        for key, acc in pairs:
            cur = get(key, _MISSING)
            state[key] = acc if cur is _MISSING else merge(cur, acc)

    def merge_updates(self, state: dict, pairs: Iterable[Any]) -> list:
        """Merge partials like :meth:`merge_partials`; return the updated result after each."""
        merge, result, get = self.merge, self.result, state.get
        out = []
        append = out.append
        for key, acc in pairs:
            cur = get(key, _MISSING)
            acc = state[key] = acc if cur is _MISSING else merge(cur, acc)
            append(result(key, acc))
        return out

    def results(self, state: dict) -> list:
        """The result record of every key, in key insertion order."""
        result = self.result
        return [result(key, acc) for key, acc in state.items()]


def combinable(aggregation: Aggregation) -> bool:
    """Whether ``aggregation`` can be pre-aggregated by a KeyedCombine before the shuffle.

    >>> combinable(count()), combinable(reduce(lambda a, b: a + b))
    (True, True)
    """
    return bool(getattr(aggregation, "combinable", False))


def _with_field(record: Any, field: Any, value: Any) -> Any:
    """A copy of ``record`` whose ``field`` is ``value``; keeps tuple, namedtuple, list or dict type."""
    if type(record) is tuple:  # the common case: slicing is a C-level copy
        if field < 0:
            field += len(record)
        return record[:field] + (value,) + record[field + 1:]
    if isinstance(record, dict):
        out = dict(record)
        out[field] = value
        return out
    items = list(record)
    items[field] = value
    if type(record) is tuple:
        return tuple(items)
    if isinstance(record, tuple) and hasattr(record, "_make"):
        return record._make(items)
    return items


def _check_field_record(name: str, record: Any, field: Any) -> None:
    """Clear errors for the common mistakes, checked once per key (at ``create``)."""
    if field is None:
        if isinstance(record, (tuple, list, dict)):
            msg = f"{name}() without a field needs plain values (numbers); got {type(record).__name__} {record!r}; pass {name}(field=...)"
            raise TypeError(msg)
        return
    if isinstance(record, dict):
        if field not in record:
            msg = f"{name}({field!r}): record has no key {field!r}; got {record!r}"
            raise KeyError(msg)
    elif isinstance(record, (tuple, list)):
        if not isinstance(field, int):
            msg = f"{name}(field): field must be an int index for tuple/list records; got {field!r}"
            raise TypeError(msg)
        if not -len(record) <= field < len(record):
            msg = f"{name}({field}): index out of range for a record of length {len(record)}; got {record!r}"
            raise IndexError(msg)
    else:
        msg = f"{name}({field!r}) needs tuple, list or dict records; got {type(record).__name__} {record!r}"
        raise TypeError(msg)


class Count(Aggregation):
    """Count records per key: ``(key, count)``; window value: the count.

    >>> state = count().new_state()
    >>> count().fold(state, ["a", "b", "a"], ["a", "b", "a"])
    >>> count().results(state)
    [('a', 2), ('b', 1)]
    """

    name = "count"

    def create(self, record: Any) -> int:
        return 1

    def add(self, acc: int, record: Any) -> int:
        return acc + 1

    def merge(self, a: int, b: int) -> int:
        return a + b

    def new_state(self) -> dict:
        return Counter()

    def fold(self, state: dict, keys: Iterable[Any], records: list) -> None:
        if isinstance(state, Counter):
            state.update(keys)  # C loop (_count_elements)
        else:
            super().fold(state, keys, records)

    def updates(self, state: dict, keys: Iterable[Any], records: list) -> list:
        get = state.get
        out = []
        append = out.append
        for key in keys:
            c = state[key] = get(key, 0) + 1
            append((key, c))
        return out

    def merge_partials(self, state: dict, pairs: Iterable[Any]) -> None:
        get = state.get
        for key, c in pairs:
            state[key] = get(key, 0) + c

    def results(self, state: dict) -> list:
        return list(state.items())


class _FieldAggregation(Aggregation):
    """Shared shape of sum/min/max: on plain numbers acc is the value; with a field, ``[value, first_record]``."""

    def __init__(self, field: Any = None) -> None:
        if isinstance(field, bool) or (field is not None and not isinstance(field, (int, str))):
            msg = f"{self.name}(field): field must be an int index, a str key or None; got {field!r}"
            raise TypeError(msg)
        self.field = field

    def _combine(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def create(self, record: Any) -> Any:
        _check_field_record(self.name, record, self.field)
        if self.field is None:
            return record
        return [record[self.field], record]

    def add(self, acc: Any, record: Any) -> Any:
        if self.field is None:
            return self._combine(acc, record)
        return [self._combine(acc[0], record[self.field]), acc[1]]

    def merge(self, a: Any, b: Any) -> Any:
        if self.field is None:
            return self._combine(a, b)
        return [self._combine(a[0], b[0]), a[1]]

    def result(self, key: Any, acc: Any) -> Any:
        if self.field is None:
            return (key, acc)
        return _with_field(acc[1], self.field, acc[0])

    def value(self, acc: Any) -> Any:
        if self.field is None:
            return acc
        return _with_field(acc[1], self.field, acc[0])

    def __repr__(self) -> str:
        return f"{self.name}({'' if self.field is None else repr(self.field)})"


class Sum(_FieldAggregation):
    """Sum per key: ``(key, total)`` on numbers, or the first record with ``field`` summed.

    >>> agg = sum(1)
    >>> state = {}
    >>> agg.fold(state, ["a", "b", "a"], [("a", 1), ("b", 2), ("a", 3)])
    >>> agg.results(state)
    [('a', 4), ('b', 2)]
    >>> sum().updates({}, ["x", "x"], [1.5, 2.0])
    [('x', 1.5), ('x', 3.5)]
    """

    name = "sum"

    def _combine(self, a: Any, b: Any) -> Any:
        return a + b

    def fold(self, state: dict, keys: Iterable[Any], records: list) -> None:
        get, field = state.get, self.field
        if field is None:
            for key, record in zip(keys, records):
                acc = get(key, _MISSING)
                state[key] = self.create(record) if acc is _MISSING else acc + record
        else:
            for key, record in zip(keys, records):
                acc = get(key)
                if acc is None:
                    state[key] = self.create(record)
                else:
                    acc[0] += record[field]


class Min(_FieldAggregation):
    """Minimum per key: ``(key, min)`` on numbers, or the first record with ``field`` := the minimum.

    >>> min(1).updates({}, ["k", "k", "k"], [("k", 5, "x"), ("k", 3, "y"), ("k", 4, "z")])
    [('k', 5, 'x'), ('k', 3, 'x'), ('k', 3, 'x')]
    """

    name = "min"

    def _combine(self, a: Any, b: Any) -> Any:
        return b if b < a else a

    def fold(self, state: dict, keys: Iterable[Any], records: list) -> None:
        get, field = state.get, self.field
        if field is None:
            for key, record in zip(keys, records):
                acc = get(key, _MISSING)
                if acc is _MISSING:
                    state[key] = self.create(record)
                elif record < acc:
                    state[key] = record
        else:
            for key, record in zip(keys, records):
                acc = get(key)
                if acc is None:
                    state[key] = self.create(record)
                elif record[field] < acc[0]:
                    acc[0] = record[field]


class Max(_FieldAggregation):
    """Maximum per key: ``(key, max)`` on numbers, or the first record with ``field`` := the maximum.

    >>> state = {}
    >>> max().fold(state, ["a", "a", "b"], [3, 7, 1])
    >>> max().results(state)
    [('a', 7), ('b', 1)]
    """

    name = "max"

    def _combine(self, a: Any, b: Any) -> Any:
        return b if b > a else a

    def fold(self, state: dict, keys: Iterable[Any], records: list) -> None:
        get, field = state.get, self.field
        if field is None:
            for key, record in zip(keys, records):
                acc = get(key, _MISSING)
                if acc is _MISSING:
                    state[key] = self.create(record)
                elif record > acc:
                    state[key] = record
        else:
            for key, record in zip(keys, records):
                acc = get(key)
                if acc is None:
                    state[key] = self.create(record)
                elif record[field] > acc[0]:
                    acc[0] = record[field]


class Reduce(Aggregation):
    """Combine the records of a key pairwise with ``fn(acc, record)``; emits the reduced record.

    >>> agg = reduce(lambda a, b: (a[0], a[1] + b[1]))
    >>> agg.updates({}, ["a", "a"], [("a", 1), ("a", 2)])
    [('a', 1), ('a', 3)]
    """

    name = "reduce"

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        if not callable(fn):
            msg = f"reduce needs a callable fn(acc, record); got {type(fn).__name__}"
            raise TypeError(msg)
        self.fn = fn

    def create(self, record: Any) -> Any:
        return record

    def add(self, acc: Any, record: Any) -> Any:
        return self.fn(acc, record)

    def merge(self, a: Any, b: Any) -> Any:
        return self.fn(a, b)

    def result(self, key: Any, acc: Any) -> Any:
        return acc

    def fold(self, state: dict, keys: Iterable[Any], records: list) -> None:
        fn, get = self.fn, state.get
        for key, record in zip(keys, records):
            acc = get(key, _MISSING)
            state[key] = record if acc is _MISSING else fn(acc, record)

    def results(self, state: dict) -> list:
        return list(state.values())


def count() -> Count:
    """``count()``: records per key."""
    return Count()


def sum(field: Any = None) -> Sum:  # noqa: A001 - Flink's name
    """``sum(field=None)``: total per key (see the module table for the result shape)."""
    return Sum(field)


def min(field: Any = None) -> Min:  # noqa: A001 - Flink's name
    """``min(field=None)``: minimum per key (Flink's ``min``, not ``minBy``)."""
    return Min(field)


def max(field: Any = None) -> Max:  # noqa: A001 - Flink's name
    """``max(field=None)``: maximum per key (Flink's ``max``, not ``maxBy``)."""
    return Max(field)


def reduce(fn: Callable[[Any, Any], Any]) -> Reduce:
    """``reduce(fn)``: fold the records of a key with ``fn(acc, record)``; emits the reduced record."""
    return Reduce(fn)


# -- numeric fast path ----------------------------------------------------------------------------------
#
# Batch mode with int keys and int/float values (the W2 shape) is folded with numpy instead of a dict
# loop. Per batch: keys and values are pulled out with C-level ``map`` calls, type-checked with
# ``set(map(type, ...))`` (exact ``int`` / ``float``: no bool, no numpy scalars) and converted with
# ``np.fromiter``; every key has a *slot*, numbered in order of first appearance, so the slot order is
# the dict's insertion order and output order matches the generic path. A slot is found through a
# numpy table for small non-negative keys and through a dict otherwise. Accumulation is one
# ``ufunc.at`` call, which adds in input order: float sums start from -0.0 (the exact additive
# identity) and come out bit-identical to the generic left-to-right loop. Anything the fast path
# cannot reproduce exactly (other key or value types, a change of value type, possible int64
# overflow, NaN or -0.0 in a float min/max) makes it hand its state over as a generic dict; the
# operator then processes that batch, and all later ones, generically.

_VECTOR_KINDS = {Count: "count", Sum: "sum", Min: "min", Max: "max"}
_INT_TYPES = {int}
_FLOAT_TYPES = {float}
_INT_LIMIT = 1 << 62      # int sums fall back before any accumulator could pass this
_TABLE_LIMIT = 1 << 22    # keys in [0, _TABLE_LIMIT) find their slot through a numpy table (int32, <= 16 MiB)
_item0 = operator.itemgetter(0)
_item1 = operator.itemgetter(1)
_INF = float("inf")


@contextlib.contextmanager
def _gc_paused() -> Iterable[None]:
    """Pause the cyclic GC while one call builds ~100k acyclic tuples/lists (partials, results).

    Each 700 allocations would start a collection, and the older generations
    walk every live object (the worker's input records too): measured 140 ms
    instead of 21 ms for 100k ``(key, [sum, record])`` partials beside 2.5 M
    live records. Nothing built here can form a cycle.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _vectorizable(aggregation: Aggregation) -> bool:
    """The built-in count/sum/min/max (not subclasses, which may override the record methods)."""
    return type(aggregation) in _VECTOR_KINDS


class _Vectorized:
    """Keyed state of count/sum/min/max over int keys and int or float values, held in numpy arrays.

    ``fold(records, key_fn)`` (raw records) and ``merge(pairs)`` (``(key, acc)``
    partials) return False, with the state untouched, when a batch does not fit;
    the caller then takes :meth:`to_state` and goes on generically. ``partials``,
    ``results`` and ``to_state`` have exactly the generic shapes and order.

    >>> vec = _Vectorized(sum(1))
    >>> vec.fold([(7, 1.5), (3, 2.0), (7, 0.25)], _item0), vec.results()
    (True, [(7, 1.75), (3, 2.0)])
    >>> vec.fold([("x", 1.0)], _item0), vec.to_state()
    (False, {7: [1.75, (7, 1.5)], 3: [2.0, (3, 2.0)]})
    """

    def __init__(self, aggregation: Aggregation) -> None:
        self.kind = _VECTOR_KINDS[type(aggregation)]
        self.name = aggregation.name
        self.field = getattr(aggregation, "field", None)
        self._getter = None if self.field is None else operator.itemgetter(self.field)
        self._table: np.ndarray | None = np.full(0, -1, np.int32)  # key -> slot, -1 = unseen
        self._index: dict | None = None                            # key -> slot once keys leave the table
        self.n = 0
        self.clear()

    def __len__(self) -> int:
        return self.n

    def clear(self) -> None:
        """Forget every key (after a flush); lookup structures are kept, emptied."""
        if self._table is not None:
            if self.n:
                self._table[self._keys[:self.n]] = -1
        else:
            self._index = {}
        self.n = 0
        self._keys = np.empty(0, np.int64)
        self._acc: np.ndarray | None = None
        self._first: list = []  # the key's first record (``field`` aggregations), by slot
        self._vkind = "i" if self.kind == "count" else None  # value type: "i" int64, "f" float64
        self._bound = 0  # int sums/counts: an upper bound on every |accumulator|

    # -- input -----------------------------------------------------------------------------------

    def fold(self, records: list, key_fn: Callable[[Any], Any] | None) -> bool:
        """Fold raw records; False (state unchanged) when the batch needs the generic path."""
        try:
            keys = records if key_fn is None else list(map(key_fn, records))
            if self.kind == "count":
                values = None
            else:
                values = records if self._getter is None else list(map(self._getter, records))
        except Exception:  # noqa: BLE001 - the generic path re-runs the batch and raises its own error
            return False
        return self._add(keys, values, records, partial=False)

    def merge(self, pairs: list) -> bool:
        """Merge ``(key, acc)`` partials; False (state unchanged) when they need the generic path."""
        try:
            keys = list(map(_item0, pairs))
            accs = list(map(_item1, pairs))
            values = accs if self.field is None else list(map(_item0, accs))
        except Exception:  # noqa: BLE001
            return False
        return self._add(keys, values, accs, partial=True)

    def _add(self, key_list: list, value_list: list | None, sources: list, *, partial: bool) -> bool:
        n = len(key_list)
        if not n:
            return True
        if set(map(type, key_list)) != _INT_TYPES:
            return False
        try:
            keys = np.fromiter(key_list, np.int64, n)
        except OverflowError:
            return False
        kind, vkind, bound = self.kind, self._vkind, self._bound
        values = None
        if value_list is not None:
            types = set(map(type, value_list))
            batch_kind = "f" if types == _FLOAT_TYPES else "i" if types == _INT_TYPES else None
            if batch_kind is None or (vkind is not None and batch_kind != vkind):
                return False
            vkind = batch_kind
            try:
                values = np.fromiter(value_list, np.float64 if vkind == "f" else np.int64, n)
            except OverflowError:
                return False
            if vkind == "f" and kind in ("min", "max") and (
                    np.isnan(values).any() or np.signbit(values[values == 0]).any()):
                return False  # NaN and -0.0 compare unlike Python's `<`; keep exact semantics
        if vkind == "i" and kind in ("sum", "count"):
            step = n if values is None else _builtin_max(int(values.max()), -int(values.min())) * n
            bound += step
            if bound > _INT_LIMIT:  # re-measure before giving up
                bound = (int(np.abs(self._acc[:self.n]).max()) if self.n else 0) + step
                if bound > _INT_LIMIT:
                    return False
        slots = self._lookup(keys, key_list)
        new = slots < 0
        if new.any():
            pos = np.flatnonzero(new)
            new_slots, first_at = self._assign(keys[pos])  # first_at indexes pos
            firsts: list = []
            if self.field is not None:
                at = pos if len(first_at) == len(pos) else pos[first_at]
                firsts = list(sources) if len(at) == n else list(map(sources.__getitem__, at.tolist()))
                try:
                    if partial:
                        firsts = list(map(_item1, firsts))
                    elif not builtins.all(issubclass(t, (tuple, list, dict)) for t in set(map(type, firsts))):
                        raise TypeError  # the generic create() raises the clear error
                except Exception:  # noqa: BLE001
                    self._unassign(keys[pos])
                    return False
            self._vkind = vkind
            slots[pos] = new_slots
            self._append(keys[pos[first_at]], firsts)
        self._vkind, self._bound = vkind, bound
        acc = self._acc
        with np.errstate(all="ignore"):  # inf + -inf is nan, as in Python's own float sum: no warning
            if kind == "count" and values is None:
                np.add.at(acc, slots, np.ones(n, np.int64))
            elif kind in ("sum", "count"):
                np.add.at(acc, slots, values)
            elif kind == "min":
                np.minimum.at(acc, slots, values)
            else:
                np.maximum.at(acc, slots, values)
        return True

    def _lookup(self, keys: np.ndarray, key_list: list) -> np.ndarray:
        """The slot of every key (int64, -1 = unseen); moves from the table to a dict for large keys."""
        table = self._table
        if table is not None:
            low, high = int(keys.min()), int(keys.max())
            if low >= 0 and high < _TABLE_LIMIT:
                if high >= len(table):
                    grown = np.full(_builtin_min(_TABLE_LIMIT, _builtin_max(high + 1, 2 * len(table))), -1, np.int32)
                    grown[:len(table)] = table
                    table = self._table = grown
                return table[keys].astype(np.int64)
            self._index = dict(zip(self._keys[:self.n].tolist(), range(self.n)))
            self._table = None
        return np.fromiter(map(self._index.get, key_list, itertools.repeat(-1)), np.int64, len(key_list))

    def _assign(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Number unseen ``keys`` (repeats allowed) from ``self.n`` in order of first appearance.

        Returns the slot of every element and the indices of the first
        appearances; in table mode the table already maps the new keys.
        """
        start, m = self.n, len(keys)
        table = self._table
        if table is not None:  # no sort: each key takes the smallest candidate slot (ufunc.at is exact on repeats)
            candidates = np.arange(start, start + m, dtype=np.int32)
            table[keys] = np.iinfo(np.int32).max
            np.minimum.at(table, keys, candidates)
            got = table[keys]
            is_first = got == candidates
            if is_first.all():
                return candidates, np.arange(m)
            first_at = np.flatnonzero(is_first)
            rank = np.cumsum(is_first) - 1  # candidates -> compact slots
            table[keys[first_at]] = np.arange(start, start + len(first_at), dtype=np.int32)
            return start + rank[got - start], first_at
        uniq, first_at, inverse = np.unique(keys, return_index=True, return_inverse=True)
        order = np.argsort(first_at, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return start + rank[inverse.reshape(-1)], first_at[order]

    def _unassign(self, keys: np.ndarray) -> None:
        """Undo :meth:`_assign` in the table (the batch was refused)."""
        if self._table is not None:
            self._table[keys] = -1

    def _append(self, keys: np.ndarray, firsts: list) -> None:
        start, stop = self.n, self.n + len(keys)
        if self._acc is None or stop > len(self._keys):
            capacity = _builtin_max(stop, 2 * len(self._keys), 1024)
            grown_keys = np.empty(capacity, np.int64)
            grown_acc = np.empty(capacity, np.float64 if self._vkind == "f" else np.int64)
            grown_keys[:start] = self._keys[:start]
            if self._acc is not None:
                grown_acc[:start] = self._acc[:start]
            self._keys, self._acc = grown_keys, grown_acc
        self._keys[start:stop] = keys
        # the identity of each ufunc, so that the first value lands unchanged (-0.0 + x == x, bit for bit)
        if self.kind in ("sum", "count"):
            self._acc[start:stop] = -0.0 if self._vkind == "f" else 0
        elif self._vkind == "f":
            self._acc[start:stop] = _INF if self.kind == "min" else -_INF
        else:
            info = np.iinfo(np.int64)
            self._acc[start:stop] = info.max if self.kind == "min" else info.min
        if self._table is not None:
            self._table[keys] = np.arange(start, stop, dtype=np.int32)
        else:
            self._index.update(zip(keys.tolist(), range(start, stop)))
        self._first.extend(firsts)
        self.n = stop

    # -- output (generic shapes, key insertion order) --------------------------------------------

    def _columns(self) -> tuple[list, list]:
        if not self.n:
            return [], []
        return self._keys[:self.n].tolist(), self._acc[:self.n].tolist()

    def partials(self) -> list:
        """``(key, acc)`` partials, as ``list(state.items())`` of the generic state."""
        keys, accs = self._columns()
        with _gc_paused():
            if self.field is None:
                return list(zip(keys, accs))
            return list(zip(keys, zip(accs, self._first)))  # (k, (v, first)) built in C: all tuples

    def results(self) -> list:
        """The result records, as ``aggregation.results(state)``."""
        with _gc_paused():
            return self._results()

    def _results(self) -> list:
        keys, accs = self._columns()
        if self.field is None:
            return list(zip(keys, accs))
        field, firsts = self.field, self._first
        if isinstance(field, int) and set(map(type, firsts)) == {tuple}:
            lengths = set(map(len, firsts))
            if len(lengths) == 1:  # plain tuples of one length: rebuild column-wise, in C
                width = lengths.pop()
                if -width <= field < width:
                    columns = [map(operator.itemgetter(j), firsts) for j in range(width)]
                    columns[field] = accs
                    return list(zip(*columns))
        return [_with_field(r, field, v) for r, v in zip(firsts, accs)]

    def to_state(self) -> dict:
        """The same state as the generic ``{key: acc}`` dict (a Counter for count)."""
        with _gc_paused():
            return self._to_state()

    def _to_state(self) -> dict:
        keys, accs = self._columns()
        if self.kind == "count":
            state: dict = Counter()
            state.update(dict(zip(keys, accs)))
            return state
        if self.field is None:
            return dict(zip(keys, accs))
        return {k: [v, r] for k, v, r in zip(keys, accs, self._first)}


def _chunks(records: list, size: int = EMIT_BATCH_SIZE) -> Iterable[list]:
    for start in range(0, len(records), size):
        yield records[start:start + size]


def _check_aggregation(owner: str, aggregation: Any) -> None:
    if not isinstance(aggregation, Aggregation):
        msg = f"{owner} needs an Aggregation (count(), sum(), min(), max(), reduce(fn)); got {type(aggregation).__name__}"
        raise TypeError(msg)


class KeyedAggregate(Operator):
    """Aggregate per key: ``KeyedAggregate(key_fn, aggregation, *, mode, partial_input=False)``.

    ``mode="streaming"`` emits the updated result for every input record, in
    input order (a TimestampedBatch keeps its timestamps). ``mode="batch"``
    emits one final result per key at ``finish`` (key insertion order).
    ``mode=None`` takes ``ctx.mode`` at open. ``key_fn=None`` means the record
    is its own key (word count). With ``partial_input=True`` the input
    records are the ``(key, acc)`` partials of a :class:`KeyedCombine` and
    ``key_fn`` is not used.

    In batch mode, count/sum/min/max over int keys and int or float values
    take a numpy fast path (see ``_Vectorized``) with the same results;
    ``vectorize=False`` forces the generic dict loop.

    >>> from runtime.task import run_chain
    >>> words = ["to", "be", "or", "not", "to", "be"]
    >>> op = KeyedAggregate(None, count(), mode="streaming")
    >>> out = []
    >>> run_chain([op], words, out.extend)
    >>> out
    [('to', 1), ('be', 1), ('or', 1), ('not', 1), ('to', 2), ('be', 2)]
    >>> op = KeyedAggregate(lambda r: r[0], sum(1), mode="batch")
    >>> out = []
    >>> op.process_batch([("a", 1), ("b", 2), ("a", 3)], out.extend); op.finish(out.extend)
    >>> out
    [('a', 4), ('b', 2)]
    """

    name = "keyed_aggregate"

    def __init__(self, key_fn: Callable[[Any], Any] | None, aggregation: Aggregation, *,
                 mode: str | None = None, partial_input: bool = False, vectorize: bool = True) -> None:
        if key_fn is not None and not callable(key_fn):
            msg = f"KeyedAggregate: key_fn must be callable or None; got {type(key_fn).__name__}"
            raise TypeError(msg)
        _check_aggregation("KeyedAggregate", aggregation)
        if mode not in (None, "streaming", "batch"):
            msg = f"KeyedAggregate: mode must be 'streaming', 'batch' or None; got {mode!r}"
            raise ValueError(msg)
        if partial_input and not combinable(aggregation):
            msg = f"KeyedAggregate: partial_input needs a combinable aggregation; {aggregation.name!r} cannot merge"
            raise ValueError(msg)
        self.key_fn = key_fn
        self.aggregation = aggregation
        self.mode = mode
        self.partial_input = partial_input
        self.vectorize = vectorize and _vectorizable(aggregation)
        self._state = aggregation.new_state()
        self._vec: _Vectorized | None = None  # made at the first batch-mode batch (after open and the graph)

    def open(self, ctx: Any) -> None:
        super().open(ctx)
        if self.mode is None:
            self.mode = ctx.mode
            if self.mode not in ("streaming", "batch"):
                msg = f"KeyedAggregate: ctx.mode must be 'streaming' or 'batch'; got {self.mode!r}"
                raise ValueError(msg)

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        records = to_records(batch)
        agg = self.aggregation
        streaming = self.mode != "batch"  # None (not opened) behaves as streaming
        if not streaming and self.vectorize:
            vec = self._vec
            if vec is None and not self._state:
                vec = self._vec = _Vectorized(agg)
            if vec is not None:
                if vec.merge(records) if self.partial_input else vec.fold(records, self.key_fn):
                    return
                self._state, self._vec = vec.to_state(), None  # hand over; generic from here on
            self.vectorize = False
        if self.partial_input:
            if streaming:
                emit(agg.merge_updates(self._state, records))
            else:
                agg.merge_partials(self._state, records)
            return
        keys = records if self.key_fn is None else map(self.key_fn, records)
        if streaming:
            out = agg.updates(self._state, keys, records)
            if isinstance(batch, TimestampedBatch):
                out = TimestampedBatch(out, batch.timestamps)
            emit(out)
        else:
            agg.fold(self._state, keys, records)

    def finish(self, emit: Emit) -> None:
        if self.mode == "batch":
            if self._vec is not None:
                results = self._vec.results()
                self._vec.clear()
            else:
                results = self.aggregation.results(self._state)
            for chunk in _chunks(results):
                emit(chunk)
            self._state = self.aggregation.new_state()

    def close(self) -> None:
        self._state = self.aggregation.new_state()
        self._vec = None


class KeyedCombine(Operator):
    """Pre-aggregate per key before the shuffle; emits ``(key, acc)`` partials.

    ``KeyedCombine(key_fn, aggregation, *, max_keys=100_000)`` accumulates
    across batches and emits its partials at ``finish``. When it holds more
    than ``max_keys`` keys it flushes early, so memory stays bounded. In
    streaming mode (``ctx.mode``) it flushes after every batch. Partition the
    partials by :func:`partial_key` and read them with
    ``KeyedAggregate(..., partial_input=True)``.

    count/sum/min/max over int keys and int or float values take a numpy fast
    path (see ``_Vectorized``): the same partials, in the same order, at a
    fraction of the cost per record. ``vectorize=False`` forces the generic
    dict loop; a batch the fast path cannot take exactly switches this
    operator to it for good, state included.

    >>> combine = KeyedCombine(None, count())
    >>> final = KeyedAggregate(None, count(), mode="batch", partial_input=True)
    >>> partials, out = [], []
    >>> combine.process_batch(["a", "b", "a"], partials.extend)
    >>> combine.process_batch(["b", "a"], partials.extend); combine.finish(partials.extend)
    >>> partials
    [('a', 3), ('b', 2)]
    >>> final.process_batch(partials, out.extend); final.finish(out.extend); out
    [('a', 3), ('b', 2)]
    """

    name = "keyed_combine"

    def __init__(self, key_fn: Callable[[Any], Any] | None, aggregation: Aggregation, *,
                 max_keys: int = 100_000, vectorize: bool = True) -> None:
        if key_fn is not None and not callable(key_fn):
            msg = f"KeyedCombine: key_fn must be callable or None; got {type(key_fn).__name__}"
            raise TypeError(msg)
        _check_aggregation("KeyedCombine", aggregation)
        if not combinable(aggregation):
            msg = f"KeyedCombine: aggregation {aggregation.name!r} is not combinable (no merge); check combinable() first"
            raise ValueError(msg)
        if not isinstance(max_keys, int) or max_keys < 1:
            msg = f"KeyedCombine: max_keys must be an int >= 1; got {max_keys!r}"
            raise ValueError(msg)
        self.key_fn = key_fn
        self.aggregation = aggregation
        self.max_keys = max_keys
        self.vectorize = vectorize and _vectorizable(aggregation)
        self._state = aggregation.new_state()
        self._vec: _Vectorized | None = None
        self._flush_every_batch = False

    def open(self, ctx: Any) -> None:
        super().open(ctx)
        self._flush_every_batch = ctx.mode == "streaming"

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        records = to_records(batch)
        if self.vectorize and not self._flush_every_batch:  # streaming flushes every batch: stays generic
            vec = self._vec
            if vec is None and not self._state:
                vec = self._vec = _Vectorized(self.aggregation)
            if vec is not None:
                if vec.fold(records, self.key_fn):
                    if len(vec) > self.max_keys:
                        self._flush(emit)
                    return
                self._state, self._vec = vec.to_state(), None  # hand over; generic from here on
            self.vectorize = False
        keys = records if self.key_fn is None else map(self.key_fn, records)
        self.aggregation.fold(self._state, keys, records)
        if self._flush_every_batch or len(self._state) > self.max_keys:
            self._flush(emit)

    def finish(self, emit: Emit) -> None:
        self._flush(emit)

    def close(self) -> None:
        self._state = self.aggregation.new_state()
        self._vec = None

    def _flush(self, emit: Emit) -> None:
        partials = None
        if self._vec is not None:
            if len(self._vec):
                partials = self._vec.partials()
                self._vec.clear()
        elif self._state:
            # Accumulators ship as tuples: a batch holding only tuples serializes in C, a mix of
            # tuples and lists needs a Python call per tuple (see runtime.network.serializer).
            partials = [(k, tuple(a)) if type(a) is list else (k, a) for k, a in self._state.items()]
            self._state = self.aggregation.new_state()
        if partials:
            for chunk in _chunks(partials):
                emit(chunk)
