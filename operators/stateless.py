"""Stateless operators: Map, Filter, FlatMap, MapBatches and WithTimestamps.

Role: thin shims that apply a user function to a whole batch with a C-level
loop (``map``, ``filter``, ``itertools``), never a Python method call per record
per operator (DESIGN.md, "Operators"). Also home of the small batch helpers
the other operator modules share (:func:`to_records`).

Imports: runtime.execution.task (the protocol), stdlib, numpy.

Batches (runtime.network.batch): a ``list`` of records, a ``TimestampedBatch`` (records
plus one event timestamp per record, float seconds), or a ``dict`` of
equal-length numpy arrays (columnar). Record-at-a-time operators see a
columnar batch as rows, one ``dict`` ``{column: Python scalar}`` per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain, compress, repeat
from typing import Any

import numpy as np

from runtime.errors import InvalidArgumentError
from runtime.execution.task import (
    MAX_WATERMARK,
    Batch,
    Emit,
    Operator,
    Stateless,
    TimestampedBatch,
    batch_len,
    to_records,
)

__all__ = ["Map", "Filter", "FlatMap", "MapBatches", "WithTimestamps", "to_records"]


class Map(Stateless, Operator):
    """Apply ``fn`` to every record: one output record per input record.

    Event timestamps stay aligned: a TimestampedBatch in gives a
    TimestampedBatch out with the same timestamps. A columnar batch is mapped
    row by row (rows are dicts); use :class:`MapBatches` to stay columnar.

    >>> out = []
    >>> Map(str.upper).process_batch(["a", "b"], out.extend)
    >>> out
    ['A', 'B']
    >>> from runtime.execution.task import TimestampedBatch
    >>> got = []
    >>> Map(lambda x: x * 10).process_batch(TimestampedBatch([1, 2], [5.0, 6.0]), got.append)
    >>> got[0], got[0].timestamps
    ([10, 20], [5.0, 6.0])
    """

    name = "map"

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        if not callable(fn):
            msg = f"Map needs a callable; got {type(fn).__name__}"
            raise TypeError(msg)
        self.fn = fn

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        if isinstance(batch, TimestampedBatch):
            emit(TimestampedBatch(map(self.fn, batch), batch.timestamps))
        else:
            emit(list(map(self.fn, to_records(batch))))


class Filter(Stateless, Operator):
    """Keep the records for which ``fn(record)`` is truthy.

    A TimestampedBatch keeps the timestamps of the kept records; a columnar
    batch stays columnar (``fn`` sees each row as a dict, the columns are
    masked with numpy).

    >>> out = []
    >>> Filter(lambda x: x % 2 == 0).process_batch([1, 2, 3, 4], out.extend)
    >>> out
    [2, 4]
    >>> from runtime.execution.task import TimestampedBatch
    >>> got = []
    >>> Filter(bool).process_batch(TimestampedBatch(["a", "", "c"], [1.0, 2.0, 3.0]), got.append)
    >>> got[0], got[0].timestamps
    (['a', 'c'], [1.0, 3.0])
    """

    name = "filter"

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        if not callable(fn):
            msg = f"Filter needs a callable; got {type(fn).__name__}"
            raise TypeError(msg)
        self.fn = fn

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        if isinstance(batch, TimestampedBatch):
            mask = list(map(self.fn, batch))
            emit(TimestampedBatch(compress(batch, mask), compress(batch.timestamps, mask)))
        elif isinstance(batch, dict):
            n = batch_len(batch)
            keep = np.fromiter(map(bool, map(self.fn, to_records(batch))), dtype=bool, count=n)
            emit({name: np.asarray(col)[keep] for name, col in batch.items()})
        else:
            emit(list(filter(self.fn, batch)))


class FlatMap(Stateless, Operator):
    """Apply ``fn`` to every record and emit every item of the iterable it returns.

    ``str.split`` works as ``fn``. With a TimestampedBatch, every output
    record carries the timestamp of the input record it came from.

    >>> out = []
    >>> FlatMap(str.split).process_batch(["to be", "or not"], out.extend)
    >>> out
    ['to', 'be', 'or', 'not']
    >>> from runtime.execution.task import TimestampedBatch
    >>> got = []
    >>> FlatMap(range).process_batch(TimestampedBatch([2, 0, 1], [7.0, 8.0, 9.0]), got.append)
    >>> got[0], got[0].timestamps
    ([0, 1, 0], [7.0, 7.0, 9.0])
    """

    name = "flat_map"

    def __init__(self, fn: Callable[[Any], Iterable[Any]]) -> None:
        if not callable(fn):
            msg = f"FlatMap needs a callable; got {type(fn).__name__}"
            raise TypeError(msg)
        self.fn = fn

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        if isinstance(batch, TimestampedBatch):
            parts = list(map(list, map(self.fn, batch)))
            timestamps = chain.from_iterable(map(repeat, batch.timestamps, map(len, parts)))
            emit(TimestampedBatch(chain.from_iterable(parts), timestamps))
        else:
            emit(list(chain.from_iterable(map(self.fn, to_records(batch)))))


class MapBatches(Stateless, Operator):
    """Apply ``fn`` to a whole batch: ``fn(batch) -> batch``. The columnar fast path.

    ``fn`` receives the batch as it is: a dict of numpy arrays for columnar
    streams, a list for record streams. It may return either kind (any
    length). If the input is a TimestampedBatch and ``fn`` returns a plain
    list of the same length, the timestamps are carried over; return a
    TimestampedBatch yourself to change them.

    >>> import numpy as np
    >>> out = []
    >>> double = MapBatches(lambda b: {"v": b["v"] * 2})
    >>> double.process_batch({"v": np.array([1, 2, 3])}, out.append)
    >>> out[0]["v"].tolist()
    [2, 4, 6]
    >>> got = []
    >>> MapBatches(sorted).process_batch([3, 1, 2], got.extend)
    >>> got
    [1, 2, 3]
    """

    name = "map_batches"

    def __init__(self, fn: Callable[[Batch], Batch]) -> None:
        if not callable(fn):
            msg = f"MapBatches needs a callable; got {type(fn).__name__}"
            raise TypeError(msg)
        self.fn = fn

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        out = self.fn(batch)
        if out is None:
            msg = f"MapBatches: fn must return a batch (list or dict of arrays); got None from {self.fn!r}"
            raise TypeError(msg)
        if isinstance(batch, TimestampedBatch) and not isinstance(out, (TimestampedBatch, dict)):
            if len(out) != len(batch):
                msg = (f"MapBatches on a timestamped batch: fn must return a TimestampedBatch or a list of the "
                       f"same length; got {len(out)} records for {len(batch)}")
                raise InvalidArgumentError(msg)
            out = TimestampedBatch(out, batch.timestamps)
        emit(out)


class WithTimestamps(Stateless, Operator):
    """Assign event timestamps and generate bounded-out-of-orderness watermarks.

    ``ts_fn(record)`` returns the record's event time in **seconds** (float;
    an int is converted). Output batches are TimestampedBatch. The operator
    tracks the largest timestamp seen; the watermark is
    ``max_ts - out_of_orderness`` and asserts that no record with a
    timestamp *below* it follows (records below it are late). Watermarks from
    upstream are replaced by this operator's own (only the end-of-input
    ``MAX_WATERMARK`` passes through).

    The runtime polls :meth:`pending_watermark` after each ``process_batch``
    and forwards a non-None result with ``process_watermark`` downstream.
    ``MAX_WATERMARK`` at end of input is forwarded by the runtime.

    >>> op = WithTimestamps(lambda r: r[0], out_of_orderness=1.0)
    >>> out = []
    >>> op.process_batch([(3.0, "a"), (5.0, "b"), (4.0, "c")], out.append)
    >>> out[0].timestamps, op.pending_watermark(), op.pending_watermark()
    ([3.0, 5.0, 4.0], 4.0, None)
    """

    name = "with_timestamps"

    def __init__(self, ts_fn: Callable[[Any], float], out_of_orderness: float = 0.0) -> None:
        if not callable(ts_fn):
            msg = f"WithTimestamps needs a callable ts_fn; got {type(ts_fn).__name__}"
            raise TypeError(msg)
        if not out_of_orderness >= 0:
            msg = f"out_of_orderness must be >= 0 seconds; got {out_of_orderness!r}"
            raise InvalidArgumentError(msg)
        self.ts_fn = ts_fn
        self.out_of_orderness = float(out_of_orderness)
        self._max_ts = float("-inf")
        self._emitted_watermark = float("-inf")

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        records = to_records(batch)
        timestamps = list(map(float, map(self.ts_fn, records)))
        if timestamps:
            top = max(timestamps)
            if top > self._max_ts:
                self._max_ts = top
        emit(TimestampedBatch(records, timestamps))

    def pending_watermark(self) -> float | None:
        """The new watermark once after it advanced, else None."""
        watermark = self._max_ts - self.out_of_orderness
        if watermark > self._emitted_watermark:
            self._emitted_watermark = watermark
            return watermark
        return None

    def process_watermark(self, watermark: float, emit: Emit) -> float | None:
        # This operator is the stream's watermark generator: upstream watermarks
        # are replaced, except the end of input.
        return watermark if watermark == MAX_WATERMARK else None
