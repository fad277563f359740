"""What a batch is: the unit that flows through operator chains, over channels and to the client.

Imports: runtime.network.serializer (packing), numpy, msgpack.

A batch is one of:

* a ``list`` of records (any msgpack-able values; tuples stay tuples);
* a :class:`TimestampedBatch`: a list of records with one event timestamp each;
* a columnar batch: a ``dict`` of equal-length numpy arrays (one per column).

Operators receive and emit batches; user functions see single records
(:func:`to_records`) unless they ask for batches (``map_batches``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack
import numpy as np

from runtime.network.serializer import iter_records, pack_to_buffers


class TimestampedBatch(list[Any]):
    """A list of records with a parallel list of event timestamps (seconds, float)."""

    __slots__ = ("timestamps",)

    def __init__(self, records: Iterable[Any] = (), timestamps: Iterable[float] = ()) -> None:
        super().__init__(records)
        self.timestamps: list[float] = list(timestamps)
        if len(self.timestamps) != len(self):
            msg = (f"a timestamped batch needs one timestamp per record; got {len(self)} records, "
                   f"{len(self.timestamps)} timestamps")
            raise ValueError(msg)


#: A list of records, a TimestampedBatch, or a dict of equal-length numpy arrays.
Batch = list[Any] | TimestampedBatch | dict[str, np.ndarray]


def batch_len(batch: Batch) -> int:
    """Number of records in a batch of any kind."""
    if isinstance(batch, dict):
        return len(next(iter(batch.values()))) if batch else 0
    return len(batch)


def to_records(batch: Batch) -> list[Any]:
    """The records of a batch as a list (a TimestampedBatch is returned as is).

    A columnar batch (dict of equal-length numpy arrays) becomes one dict per
    row with Python scalars, in column order. This is the slow path: columnar
    streams should stay columnar with :class:`MapBatches`.

    >>> import numpy as np
    >>> to_records({"k": np.array([1, 2]), "v": np.array([0.5, 1.5])})
    [{'k': 1, 'v': 0.5}, {'k': 2, 'v': 1.5}]
    """
    if isinstance(batch, dict):
        names = list(batch)
        columns = [np.asarray(batch[name]).tolist() for name in names]
        return [dict(zip(names, row)) for row in zip(*columns)]
    if isinstance(batch, list):
        return batch
    msg = f"a batch must be a list, a TimestampedBatch or a dict of numpy arrays; got {type(batch).__name__}"
    raise TypeError(msg)


def pack_batch(batch: Batch | np.ndarray | Iterable[Any], *, chunk: int = 1 << 20) -> bytes:
    """A batch (or a structured array, or any iterable of records) as bytes for the control plane
    (collect sinks); tuples stay tuples."""
    records = batch if isinstance(batch, (dict, np.ndarray)) else list(batch)
    parts = pack_to_buffers([records], buffer_size=chunk)
    packed: bytes = msgpack.packb([bytes(buf[:n]) for buf, n in parts], use_bin_type=True)
    return packed


def unpack_batch(payload: bytes) -> list[Any]:
    """The records packed by :func:`pack_batch` (a columnar batch comes back as one item)."""
    chunks = msgpack.unpackb(payload, raw=False)
    return list(iter_records(chunks, channel="collect"))


__all__ = ["Batch", "TimestampedBatch", "batch_len", "pack_batch", "to_records", "unpack_batch"]
