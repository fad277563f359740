"""The numeric fast path of keyed count/sum/min/max: state in numpy arrays instead of a dict.

Batch mode with int keys and int/float values (the W2 shape) is folded with numpy instead of a dict
loop. Per batch: keys and values are pulled out with C-level ``map`` calls, type-checked with
``set(map(type, ...))`` (exact ``int`` / ``float``: no bool, no numpy scalars) and converted with
``np.fromiter``; every key has a *slot*, numbered in order of first appearance, so the slot order is
the dict's insertion order and output order matches the generic path. A slot is found through a
numpy table for small non-negative keys and through a dict otherwise. Accumulation is one
``ufunc.at`` call, which adds in input order: float sums start from -0.0 (the exact additive
identity) and come out bit-identical to the generic left-to-right loop. Anything the fast path
cannot reproduce exactly (other key or value types, a change of value type, possible int64
overflow, NaN or -0.0 in a float min/max) makes it hand its state over as a generic dict; the
operator then processes that batch, and all later ones, generically.

Imports: operators.aggregations, numpy, stdlib.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import numpy as np

from operators.aggregations import Aggregation, Count, Max, Min, Sum, _with_field

__all__ = ["Vectorized", "gc_paused", "vectorizable"]

_VECTOR_KINDS = {Count: "count", Sum: "sum", Min: "min", Max: "max"}
_INT_TYPES = {int}
_FLOAT_TYPES = {float}
_INT_LIMIT = 1 << 62      # int sums fall back before any accumulator could pass this
_TABLE_LIMIT = 1 << 22    # keys in [0, _TABLE_LIMIT) find their slot through a numpy table (int32, <= 16 MiB)
_item0 = operator.itemgetter(0)
_item1 = operator.itemgetter(1)
_INF = float("inf")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
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


def vectorizable(aggregation: Aggregation) -> bool:
    """The built-in count/sum/min/max (not subclasses, which may override the record methods)."""
    return type(aggregation) in _VECTOR_KINDS


class Vectorized:
    """Keyed state of count/sum/min/max over int keys and int or float values, held in numpy arrays.

    ``fold(records, key_fn)`` (raw records) and ``merge(pairs)`` (``(key, acc)``
    partials) return False, with the state untouched, when a batch does not fit;
    the caller then takes :meth:`to_state` and goes on generically. ``partials``,
    ``results`` and ``to_state`` have exactly the generic shapes and order.

    >>> vec = Vectorized(Sum(1))
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
        self._index: dict[int, int] = {}  # key -> slot once keys leave the table (then self._table is None)
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
        self._keys: np.ndarray = np.empty(0, np.int64)
        self._acc: np.ndarray | None = None
        self._first: list[Any] = []  # the key's first record (``field`` aggregations), by slot
        self._vkind = "i" if self.kind == "count" else None  # value type: "i" int64, "f" float64
        self._bound = 0  # int sums/counts: an upper bound on every |accumulator|

    # -- input -----------------------------------------------------------------------------------

    def fold(self, records: list[Any], key_fn: Callable[[Any], Any] | None) -> bool:
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

    def merge(self, pairs: list[Any]) -> bool:
        """Merge ``(key, acc)`` partials; False (state unchanged) when they need the generic path."""
        try:
            keys = list(map(_item0, pairs))
            accs = list(map(_item1, pairs))
            values = accs if self.field is None else list(map(_item0, accs))
        except Exception:  # noqa: BLE001
            return False
        return self._add(keys, values, accs, partial=True)

    def _add(self, key_list: list[Any], value_list: list[Any] | None, sources: list[Any], *, partial: bool) -> bool:
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
            step = n if values is None else max(int(values.max()), -int(values.min())) * n
            bound += step
            if bound > _INT_LIMIT:  # re-measure before giving up
                acc_so_far = cast(np.ndarray, self._acc)  # not None once a key has a slot (self.n > 0)
                bound = (int(np.abs(acc_so_far[:self.n]).max()) if self.n else 0) + step
                if bound > _INT_LIMIT:
                    return False
        slots = self._lookup(keys, key_list)
        new = slots < 0
        if new.any():
            pos = np.flatnonzero(new)
            new_slots, first_at = self._assign(keys[pos])  # first_at indexes pos
            firsts: list[Any] = []
            if self.field is not None:
                at = pos if len(first_at) == len(pos) else pos[first_at]
                firsts = list(sources) if len(at) == n else list(map(sources.__getitem__, at.tolist()))
                try:
                    if partial:
                        firsts = list(map(_item1, firsts))
                    elif not all(issubclass(t, (tuple, list, dict)) for t in set(map(type, firsts))):
                        raise TypeError  # the generic create() raises the clear error
                except Exception:  # noqa: BLE001
                    self._unassign(keys[pos])
                    return False
            self._vkind = vkind
            slots[pos] = new_slots
            self._append(keys[pos[first_at]], firsts)
        self._vkind, self._bound = vkind, bound
        acc = cast(np.ndarray, self._acc)  # _append allocated it: every key has a slot now
        with np.errstate(all="ignore"):  # inf + -inf is nan, as in Python's own float sum: no warning
            if values is None:  # count over raw records (fold passes no values only for count)
                np.add.at(acc, slots, np.ones(n, np.int64))
            elif kind in ("sum", "count"):
                np.add.at(acc, slots, values)
            elif kind == "min":
                np.minimum.at(acc, slots, values)
            else:
                np.maximum.at(acc, slots, values)
        return True

    def _lookup(self, keys: np.ndarray, key_list: list[Any]) -> np.ndarray:
        """The slot of every key (int64, -1 = unseen); moves from the table to a dict for large keys."""
        table = self._table
        if table is not None:
            low, high = int(keys.min()), int(keys.max())
            if low >= 0 and high < _TABLE_LIMIT:
                if high >= len(table):
                    grown = np.full(min(_TABLE_LIMIT, max(high + 1, 2 * len(table))), -1, np.int32)
                    grown[:len(table)] = table
                    table = self._table = grown
                slots: np.ndarray = table[keys].astype(np.int64)
                return slots
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

    def _append(self, keys: np.ndarray, firsts: list[Any]) -> None:
        start, stop = self.n, self.n + len(keys)
        if self._acc is None or stop > len(self._keys):
            capacity = max(stop, 2 * len(self._keys), 1024)
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

    def _columns(self) -> tuple[list[Any], list[Any]]:
        if not self.n:
            return [], []
        acc = cast(np.ndarray, self._acc)  # not None: self.n > 0
        return self._keys[:self.n].tolist(), acc[:self.n].tolist()

    def partials(self) -> list[Any]:
        """``(key, acc)`` partials, as ``list(state.items())`` of the generic state."""
        keys, accs = self._columns()
        with gc_paused():
            if self.field is None:
                return list(zip(keys, accs))
            return list(zip(keys, zip(accs, self._first)))  # (k, (v, first)) built in C: all tuples

    def results(self) -> list[Any]:
        """The result records, as ``aggregation.results(state)``."""
        with gc_paused():
            return self._results()

    def _results(self) -> list[Any]:
        keys, accs = self._columns()
        if self.field is None:
            return list(zip(keys, accs))
        field, firsts = self.field, self._first
        if isinstance(field, int) and set(map(type, firsts)) == {tuple}:
            lengths = set(map(len, firsts))
            if len(lengths) == 1:  # plain tuples of one length: rebuild column-wise, in C
                width = lengths.pop()
                if -width <= field < width:
                    columns: list[Iterable[Any]] = [map(operator.itemgetter(j), firsts) for j in range(width)]
                    columns[field] = accs
                    return list(zip(*columns))
        return [_with_field(r, field, v) for r, v in zip(firsts, accs)]

    def to_state(self) -> dict[Any, Any]:
        """The same state as the generic ``{key: acc}`` dict (a Counter for count)."""
        with gc_paused():
            return self._to_state()

    def _to_state(self) -> dict[Any, Any]:
        keys, accs = self._columns()
        if self.kind == "count":
            state: dict[Any, Any] = Counter()
            state.update(dict(zip(keys, accs)))
            return state
        if self.field is None:
            return dict(zip(keys, accs))
        return {k: [v, r] for k, v, r in zip(keys, accs, self._first)}
