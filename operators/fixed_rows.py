"""What a batch of rows looks like as fixed-width columns: the checks shared by the managed keyed states.

Role: a keyed aggregation in managed memory (batch: :mod:`operators.managed_keyed`; streaming:
:mod:`operators.managed_streaming`) takes a batch of Python rows into numpy columns only when the
columns mean exactly what the rows do. Each function here returns the columns, or None when the
batch does not fit (the caller then hands its state to the general form).

Imports: numpy, stdlib.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

__all__ = ["ascii_keys", "key_width", "min_max_unordered", "numeric_values", "pair_values"]

#: The narrowest key width of a fixed-form table of str keys, in bytes.
MIN_KEY_BYTES = 16

_first_item = operator.itemgetter(0)
_second_item = operator.itemgetter(1)


def ascii_keys(keys: list[str]) -> np.ndarray | None:
    """str keys as their ASCII bytes (numpy ``S``), or None for a key that is not ASCII or holds a NUL
    (numpy's ``S`` pads with NUL: a key ending in one would lose it). An ASCII str hashes as its bytes do."""
    if "\0" in "".join(keys):
        return None
    try:
        return np.array(keys, dtype="S") if keys else np.empty(0, "S8")
    except UnicodeEncodeError:
        return None


def key_width(keys: np.ndarray) -> int:
    """The key width (bytes, a multiple of 8, at least MIN_KEY_BYTES) a table made for the ``S`` array
    ``keys`` gets: its first batch's longest key; a later, longer key does not fit it."""
    return max(MIN_KEY_BYTES, -(-keys.dtype.itemsize // 8) * 8)


def pair_values(records: list[Any], keys: list[Any]) -> list[Any] | None:
    """The values of ``(key, value)`` tuples keyed by their first item (``key_by(lambda r: r[0]).sum(1)``),
    or None when a record is not such a pair."""
    if (set(map(type, records)) != {tuple} or set(map(len, records)) != {2}
            or list(map(_first_item, records)) != keys):
        return None
    return list(map(_second_item, records))


def numeric_values(raw: list[Any]) -> tuple[str, np.ndarray] | None:
    """``("int64" | "float64", values)`` when every value is an int (within 64 bits) or every one a float
    (exact types: no bool, no numpy scalars); None otherwise."""
    types = set(map(type, raw))
    if types == {int}:
        kind = "int64"
    elif types == {float}:
        kind = "float64"
    else:
        return None
    try:
        return kind, np.fromiter(raw, kind, len(raw))
    except OverflowError:
        return None


def min_max_unordered(values: np.ndarray) -> bool:
    """Whether float ``values`` hold NaN or -0.0, where Python's min/max depend on the order of comparison."""
    return bool(len(values)) and values.dtype.kind == "f" and bool(
        np.isnan(values).any() or (np.signbit(values) & (values == 0)).any())
