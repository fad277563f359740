"""Sort: ``sort_by(key, reverse=False)`` in batch mode, an external sort in managed memory.

Role: :class:`Sort` collects its subtask's records and emits them ordered by
``key(record)`` at end of input. With managed memory (``ctx.managed``, the
runtime's case) the records go into a :class:`~runtime.managed.ExternalSorter`:
sorted runs in the operator's share of managed memory, spilled to ``io.tmp-dirs``
when the share is full, merged at the end; memory stays bounded at any input
size. Without it (a test calling the operator directly) a Python list is sorted.
The sort is stable. Its output is ordered within each subtask; run it (and
what follows) with parallelism 1 for a global order:
``stream.sort_by(key).set_parallelism(1).collect()``.

Imports: runtime.execution.task, operators.stateless (to_records), stdlib.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from operators.stateless import to_records
from runtime.errors import InvalidArgumentError
from runtime.execution.task import Batch, Emit, Operator, OperatorContext
from runtime.managed import ExternalSorter

__all__ = ["Sort"]

CHUNK = 4096  # records per emitted batch


class Sort(Operator):
    """Emit every record at end of input, ordered by ``key_fn(record)`` (descending with ``reverse``).

    >>> from runtime.execution.task import run_chain
    >>> op, out = Sort(lambda r: r[1]), []
    >>> op.process_batch([("a", 3), ("b", 1), ("c", 2)], out.extend); op.finish(out.extend); out
    [('b', 1), ('c', 2), ('a', 3)]
    """

    name = "sort"
    managed_memory_weight = 1

    def __init__(self, key_fn: Callable[[Any], Any], *, reverse: bool = False) -> None:
        if not callable(key_fn):
            msg = f"sort_by needs a callable key or a column name; got {type(key_fn).__name__}"
            raise TypeError(msg)
        self.key_fn = key_fn
        self.reverse = bool(reverse)
        self._sorter: ExternalSorter | None = None
        self._records: list[Any] = []

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        if ctx.mode != "batch":
            msg = (f"sort_by needs batch mode (bounded input); got mode={ctx.mode!r}: use "
                   f"StreamEnvironment(mode='batch') or bounded sources")
            raise InvalidArgumentError(msg)
        managed = ctx.managed
        if managed is not None:
            self._sorter = ExternalSorter(managed.memory, managed.owner, managed.share_bytes, managed.io(),
                                          key=self.key_fn, reverse=self.reverse, name=f"{managed.owner} sort")

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        records = to_records(batch)
        if self._sorter is not None:
            self._sorter.add(records)
        else:
            self._records.extend(records)

    def finish(self, emit: Emit) -> None:
        if self._sorter is None:
            records, self._records = self._records, []
            records.sort(key=self.key_fn, reverse=self.reverse)
            for i in range(0, len(records), CHUNK):
                emit(records[i:i + CHUNK])
            return
        sorter = self._sorter
        keep_alive = getattr(self.ctx, "keep_alive", None)
        chunk: list[Any] = []
        try:
            for record in sorter.sorted():
                chunk.append(record)
                if len(chunk) == CHUNK:
                    emit(chunk)
                    chunk = []
                    if keep_alive is not None:
                        keep_alive()
            if chunk:
                emit(chunk)
        finally:
            stats = sorter.statistics()
            sorter.release()
            self._sorter = None
            m = self.ctx.metrics
            for key in ("spilled_bytes", "spill_files", "spill_passes"):
                m[key] = m.get(key, 0) + getattr(stats, key)
            m["managed_peak_bytes"] = max(m.get("managed_peak_bytes", 0), stats.managed_peak_bytes)

    def close(self) -> None:
        if self._sorter is not None:
            self._sorter.release()
            self._sorter = None
        self._records = []
