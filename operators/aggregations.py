"""Aggregations: what ``key_by(...).count() / sum / min / max / reduce`` compute, per key.

Role: an :class:`Aggregation` owns the shape of a key's state and how
records fold into it: a plain dict ``{key: acc}`` (insertion ordered:
results come out in the order keys were first seen), folded with tight loops
and no per-record method call; ``count`` uses ``Counter.update`` (a C loop).
The operators that hold the state are in :mod:`operators.keyed` (and
:mod:`operators.window`); its numpy fast path in :mod:`operators.keyed_vectorized`.

Imports: stdlib only.

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
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "Aggregation", "Count", "Sum", "Min", "Max", "Reduce",
    "count", "sum", "min", "max", "reduce", "combinable", "partial_key",
]

_MISSING = object()
_builtin_min = builtins.min
_builtin_max = builtins.max


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

    def new_state(self) -> dict[Any, Any]:
        """An empty ``{key: acc}`` state."""
        return {}

    def fold(self, state: dict[Any, Any], keys: Iterable[Any], records: list[Any]) -> None:
        """Fold ``records`` (with their parallel ``keys``) into ``state`` in place."""
        create, add, get = self.create, self.add, state.get
        for key, record in zip(keys, records):
            acc = get(key, _MISSING)
            state[key] = create(record) if acc is _MISSING else add(acc, record)

    def updates(self, state: dict[Any, Any], keys: Iterable[Any], records: list[Any]) -> list[Any]:
        """Fold like :meth:`fold` and return the updated result after every record (streaming)."""
        create, add, result, get = self.create, self.add, self.result, state.get
        out: list[Any] = []
        append = out.append
        for key, record in zip(keys, records):
            acc = get(key, _MISSING)
            acc = state[key] = create(record) if acc is _MISSING else add(acc, record)
            append(result(key, acc))
        return out

    def merge_partials(self, state: dict[Any, Any], pairs: Iterable[Any]) -> None:
        """Merge ``(key, acc)`` partials (from a combiner) into ``state``."""
        merge, get = self.merge, state.get
        for key, acc in pairs:
            cur = get(key, _MISSING)
            state[key] = acc if cur is _MISSING else merge(cur, acc)

    def merge_updates(self, state: dict[Any, Any], pairs: Iterable[Any]) -> list[Any]:
        """Merge partials like :meth:`merge_partials`; return the updated result after each."""
        merge, result, get = self.merge, self.result, state.get
        out: list[Any] = []
        append = out.append
        for key, acc in pairs:
            cur = get(key, _MISSING)
            acc = state[key] = acc if cur is _MISSING else merge(cur, acc)
            append(result(key, acc))
        return out

    def results(self, state: dict[Any, Any]) -> list[Any]:
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
            msg = (f"{name}() without a field needs plain values (numbers); got {type(record).__name__} {record!r}; "
                   f"pass {name}(field=...)")
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

    def new_state(self) -> dict[Any, Any]:
        return Counter()

    def fold(self, state: dict[Any, Any], keys: Iterable[Any], records: list[Any]) -> None:
        if isinstance(state, Counter):
            state.update(keys)  # C loop (_count_elements)
        else:
            super().fold(state, keys, records)

    def updates(self, state: dict[Any, Any], keys: Iterable[Any], records: list[Any]) -> list[Any]:
        get = state.get
        out: list[Any] = []
        append = out.append
        for key in keys:
            c = state[key] = get(key, 0) + 1
            append((key, c))
        return out

    def merge_partials(self, state: dict[Any, Any], pairs: Iterable[Any]) -> None:
        get = state.get
        for key, c in pairs:
            state[key] = get(key, 0) + c

    def results(self, state: dict[Any, Any]) -> list[Any]:
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

    def fold(self, state: dict[Any, Any], keys: Iterable[Any], records: list[Any]) -> None:
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
                    state[key] = acc  # a state backend other than a dict keeps copies


class Min(_FieldAggregation):
    """Minimum per key: ``(key, min)`` on numbers, or the first record with ``field`` := the minimum.

    >>> min(1).updates({}, ["k", "k", "k"], [("k", 5, "x"), ("k", 3, "y"), ("k", 4, "z")])
    [('k', 5, 'x'), ('k', 3, 'x'), ('k', 3, 'x')]
    """

    name = "min"

    def _combine(self, a: Any, b: Any) -> Any:
        return b if b < a else a

    def fold(self, state: dict[Any, Any], keys: Iterable[Any], records: list[Any]) -> None:
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
                    state[key] = acc  # a state backend other than a dict keeps copies


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

    def fold(self, state: dict[Any, Any], keys: Iterable[Any], records: list[Any]) -> None:
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
                    state[key] = acc  # a state backend other than a dict keeps copies


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

    def fold(self, state: dict[Any, Any], keys: Iterable[Any], records: list[Any]) -> None:
        fn, get = self.fn, state.get
        for key, record in zip(keys, records):
            acc = get(key, _MISSING)
            state[key] = record if acc is _MISSING else fn(acc, record)

    def results(self, state: dict[Any, Any]) -> list[Any]:
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
