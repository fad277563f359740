"""Sources: CollectionSource, GeneratorSource and TextFileSource.

Role: ``env.from_collection / from_generator / read_text``. Every source can be
``split(parallelism)`` into one source per subtask, so subtask ``i`` is
shipped only its share. A source that was not split and is opened as subtask
``i`` of ``p > 1`` (``ctx.subtask_index`` / ``ctx.parallelism``) takes share
``i`` by itself, so both ways cover the input exactly once.

``poll_batch(max_records)`` never blocks or sleeps: it returns a batch, ``[]``
when nothing is ready yet (rate limiting), or ``None`` once exhausted.

Imports: runtime.execution.task, stdlib, numpy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from runtime.errors import InvalidArgumentError
from runtime.execution.task import Batch, OperatorContext, SourceOperator

__all__ = ["CollectionSource", "GeneratorSource", "TextFileSource"]


def _check_parallelism(parallelism: Any) -> int:
    if isinstance(parallelism, bool) or not isinstance(parallelism, int) or parallelism < 1:
        msg = f"parallelism must be an int >= 1; got {parallelism!r}"
        raise InvalidArgumentError(msg)
    return parallelism


class _SplittableSource(SourceOperator):
    """Shared split bookkeeping: ``_split`` is ``(index, parallelism)`` once split, else None."""

    _split: tuple[int, int] | None = None

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        if self._split is None:
            if ctx.parallelism > 1:
                self._select(ctx.subtask_index, ctx.parallelism)
                self._split = (ctx.subtask_index, ctx.parallelism)
        elif self._split != (ctx.subtask_index, ctx.parallelism):
            index, parallelism = self._split
            msg = (f"{type(self).__name__} split as part {index} of {parallelism} was opened as subtask "
                   f"{ctx.subtask_index} of {ctx.parallelism}; give subtask i the i-th element of split(parallelism)")
            raise InvalidArgumentError(msg)

    def _select(self, index: int, parallelism: int) -> None:
        """Restrict this (unsplit) source to share ``index`` of ``parallelism``."""
        raise NotImplementedError


class CollectionSource(_SplittableSource):
    """A bounded source over an in-memory collection (``env.from_collection``).

    ``items`` is any iterable of records, or a dict of equal-length numpy
    arrays (a columnar source: batches are dicts of array slices).
    ``split(p)`` gives subtask ``i`` the ``i``-th contiguous chunk.

    >>> src = CollectionSource(range(5))
    >>> [s.items for s in src.split(2)]
    [[0, 1], [2, 3, 4]]
    >>> src.poll_batch(3), src.poll_batch(3), src.poll_batch(3)
    ([0, 1, 2], [3, 4], None)
    """

    name = "collection_source"
    bounded = True

    def __init__(self, items: Any) -> None:
        if isinstance(items, dict):
            columns = {name: np.asarray(col) for name, col in items.items()}
            lengths = {len(col) for col in columns.values()}
            if len(lengths) > 1:
                msg = f"a columnar collection needs equal-length columns; got lengths {sorted(lengths)}"
                raise InvalidArgumentError(msg)
            self.items: list[Any] | dict[Any, np.ndarray] = columns
            self._len = lengths.pop() if lengths else 0
            #: Bytes per row across the columns: the subtask polls columnar sources by bytes, not rows.
            self.row_bytes = max(1, sum(col.itemsize * (col[:1].size or 1) for col in columns.values()))
        else:
            self.items = list(items)
            self._len = len(self.items)
        self._pos = 0

    def split(self, parallelism: int) -> list[CollectionSource]:
        p = _check_parallelism(parallelism)
        parts = []
        for i in range(p):
            part = CollectionSource(self._slice(i * self._len // p, (i + 1) * self._len // p))
            part._split = (i, p)
            parts.append(part)
        return parts

    def _select(self, index: int, parallelism: int) -> None:
        self.items = self._slice(index * self._len // parallelism, (index + 1) * self._len // parallelism)
        items = self.items
        self._len = len(next(iter(items.values()))) if isinstance(items, dict) and items else len(items)
        self._pos = 0

    def _slice(self, start: int, stop: int) -> list[Any] | dict[Any, np.ndarray]:
        if isinstance(self.items, dict):
            return {name: col[start:stop] for name, col in self.items.items()}
        return self.items[start:stop]

    def poll_batch(self, max_records: int) -> Batch | None:
        if self._pos >= self._len:
            return None
        start = self._pos
        self._pos = min(self._len, start + max(1, max_records))
        return self._slice(start, self._pos)

    def snapshot_state(self) -> int:
        """The position: how many records of this subtask's slice were emitted."""
        return self._pos

    def restore_state(self, state: Any) -> None:
        """Resume after the first ``state`` records of the slice (the slice is this subtask's, as at open)."""
        if isinstance(state, bool) or not isinstance(state, int) or not 0 <= state <= self._len:
            msg = (f"CollectionSource: a restored position must be an int in [0, {self._len}] (the records of "
                   f"this subtask's slice); got {state!r}")
            raise InvalidArgumentError(msg)
        self._pos = state


class GeneratorSource(_SplittableSource):
    """Records ``fn(0), fn(1), ...`` (Flink's DataGeneratorSource); unbounded unless ``count`` is given.

    ``GeneratorSource(fn, rate=None, count=None)``. ``split(p)`` gives
    subtask ``i`` the indices ``i, i+p, i+2p, ...`` (below ``count``).
    ``rate`` is records per second in total; each subtask emits at most
    ``floor(elapsed * rate / p)`` records by ``elapsed`` seconds after
    ``open`` (``ctx.processing_time()``) and returns ``[]`` until the next
    is due; :meth:`next_timer` tells when that is.

    >>> a, b = GeneratorSource(lambda i: i * i, count=5).split(2)
    >>> a.poll_batch(10), b.poll_batch(10), a.poll_batch(10)
    ([0, 4, 16], [1, 9], None)
    """

    name = "generator_source"

    def __init__(self, fn: Callable[[int], Any], rate: float | None = None, count: int | None = None) -> None:
        if not callable(fn):
            msg = f"GeneratorSource needs a callable fn(index); got {type(fn).__name__}"
            raise TypeError(msg)
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
            msg = f"GeneratorSource rate must be > 0 records/s or None; got {rate!r}"
            raise InvalidArgumentError(msg)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            msg = f"GeneratorSource count must be an int >= 0 or None; got {count!r}"
            raise InvalidArgumentError(msg)
        self.fn = fn
        self.rate = rate
        self.count = count
        self.bounded = count is not None
        self._next = 0  # next index to produce
        self._step = 1
        self._parallelism = 1
        self._emitted = 0
        self._t0: float | None = None

    def split(self, parallelism: int) -> list[GeneratorSource]:
        p = _check_parallelism(parallelism)
        parts = []
        for i in range(p):
            part = GeneratorSource(self.fn, self.rate, self.count)
            part._select(i, p)
            part._split = (i, p)
            parts.append(part)
        return parts

    def _select(self, index: int, parallelism: int) -> None:
        self._next = index
        self._step = parallelism
        self._parallelism = parallelism

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        self._t0 = ctx.processing_time()

    def _allowed(self) -> int | None:
        """How many more records may be emitted now (None: no rate limit)."""
        if self.rate is None:
            return None
        clock = self.ctx.processing_time if hasattr(self, "ctx") else None
        if clock is None:
            msg = "a rate-limited GeneratorSource must be opened (open(ctx)) before poll_batch"
            raise RuntimeError(msg)
        now = clock()
        if self._t0 is None:
            self._t0 = now
        due = int((now - self._t0) * self.rate / self._parallelism + 1e-9)
        return due - self._emitted

    def poll_batch(self, max_records: int) -> Batch | None:
        if self.count is not None and self._next >= self.count:
            return None
        n = max(1, max_records)
        allowed = self._allowed()
        if allowed is not None:
            if allowed <= 0:
                return []
            n = min(n, allowed)
        stop = self._next + n * self._step
        if self.count is not None:
            stop = min(stop, self.count)
        indices = range(self._next, stop, self._step)
        out = list(map(self.fn, indices))
        self._next += len(indices) * self._step
        self._emitted += len(indices)
        return out

    def next_timer(self) -> float | None:
        """Processing time at which the next record is due (rate-limited sources), else None."""
        if self.rate is None or self._t0 is None or (self.count is not None and self._next >= self.count):
            return None
        return self._t0 + (self._emitted + 1) * self._parallelism / self.rate

    def snapshot_state(self) -> tuple[int, int]:
        """The position: ``(next index, records emitted)``."""
        return (self._next, self._emitted)

    def restore_state(self, state: Any) -> None:
        """Resume at the snapshotted index. A rate-limited source keeps its rate from the restored count: its
        start time moves back so that exactly ``emitted`` records are due now (no burst to catch up)."""
        ok = (isinstance(state, (tuple, list)) and len(state) == 2
              and all(type(v) is int and v >= 0 for v in state)
              and (state[0] - self._next) % self._step == 0 and state[0] >= self._next)
        if not ok:
            msg = (f"GeneratorSource: a restored position must be (next index, emitted) with the index in this "
                   f"subtask's sequence {self._next}, {self._next + self._step}, ...; got {state!r}")
            raise InvalidArgumentError(msg)
        self._next, self._emitted = int(state[0]), int(state[1])
        if self.rate is not None and hasattr(self, "ctx"):
            self._t0 = self.ctx.processing_time() - self._emitted * self._parallelism / self.rate


class TextFileSource(_SplittableSource):
    """Lines of a text file, without the trailing newline (``env.read_text``).

    ``TextFileSource(path, *, encoding="utf-8")``. ``split(p)`` cuts the file
    into ``p`` byte ranges at line boundaries (range ``i`` ends after the
    first newline at or after byte ``size * (i+1) // p``), so each line is read
    by exactly one subtask. A missing file raises FileNotFoundError naming
    the path (at ``split`` or ``open``).

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "t.txt")
    >>> with open(path, "w") as f:
    ...     _ = f.write("to be\\nor not\\nto be\\n")
    >>> parts = TextFileSource(path).split(2)
    >>> for i, part in enumerate(parts):
    ...     part.open(OperatorContext(subtask_index=i, parallelism=2))
    >>> [part.poll_batch(10) for part in parts], parts[0].poll_batch(10)
    ([['to be', 'or not'], ['to be']], None)
    >>> for part in parts:
    ...     part.close()
    >>> os.remove(path); os.rmdir(os.path.dirname(path))
    """

    name = "text_file_source"
    bounded = True
    CHUNK_BYTES = 1 << 20

    def __init__(self, path: str | os.PathLike[str], *, encoding: str = "utf-8") -> None:
        self.path = os.fspath(path)
        self.encoding = encoding
        self._range: tuple[int, int | None] = (0, None)  # byte range [start, end); None: end of file
        self._file: Any = None
        self._pos = 0
        self._end = 0
        self._tail = b""
        self._pending: list[str] = []
        self._offset = 0  # first unread line in _pending
        self._eof = False
        # Where the lines of _pending come from, for a checkpoint's position: one [index in _pending of its
        # first line held, byte offset of the block's first line, lines of the block before that one] per
        # block _fill parsed. A block starts at a line start, so (offset, lines to skip) finds any line again.
        self._blocks: list[list[int]] = []
        self._skip = 0  # lines to drop from the next blocks parsed (after restore_state)

    def _missing(self) -> FileNotFoundError:
        msg = f"text file source: no such file {self.path!r}"
        return FileNotFoundError(msg)

    def _bounds(self, parallelism: int) -> list[int]:
        """Byte offsets of the ``parallelism + 1`` range bounds, cut after a newline."""
        try:
            size = os.path.getsize(self.path)
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise self._missing() from None
        bounds = [0]
        with f:
            for i in range(1, parallelism):
                cut = _find_newline(f, size * i // parallelism)
                bounds.append(size if cut < 0 else cut + 1)
        bounds.append(size)
        for i in range(1, len(bounds)):  # keep bounds monotonic when lines are longer than a share
            bounds[i] = max(bounds[i], bounds[i - 1])
        return bounds

    def split(self, parallelism: int) -> list[TextFileSource]:
        p = _check_parallelism(parallelism)
        bounds = self._bounds(p)
        parts = []
        for i in range(p):
            part = TextFileSource(self.path, encoding=self.encoding)
            part._range = (bounds[i], bounds[i + 1])
            part._split = (i, p)
            parts.append(part)
        return parts

    def _select(self, index: int, parallelism: int) -> None:
        bounds = self._bounds(parallelism)
        self._range = (bounds[index], bounds[index + 1])

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except FileNotFoundError:
            raise self._missing() from None
        start, end = self._range
        self._file.seek(start)
        self._pos = start
        self._end = os.fstat(self._file.fileno()).st_size if end is None else end
        self._tail = b""
        self._pending = []
        self._offset = 0
        self._eof = self._pos >= self._end
        self._blocks = []
        self._skip = 0

    def _fill(self) -> None:
        """Read the next chunk of the range into ``_pending`` lines."""
        block_start = self._pos - len(self._tail)  # a line start: the tail is the start of an unfinished line
        data = self._file.read(min(self.CHUNK_BYTES, self._end - self._pos))
        self._pos += len(data)
        if not data or self._pos >= self._end:
            self._eof = True
        data = self._tail + data
        if self._eof:
            self._tail = b""
            if data.endswith(b"\n"):
                data = data[:-1]
            elif not data:
                return
        else:
            cut = data.rfind(b"\n")
            if cut < 0:
                self._tail = data
                return
            self._tail = data[cut + 1:]
            data = data[:cut]
        text = data.decode(self.encoding)
        lines = text.split("\n")
        if "\r" in text:  # CRLF files: drop the \r of each line ending
            lines = [line[:-1] if line.endswith("\r") else line for line in lines]
        skipped = 0
        if self._skip:
            skipped = min(self._skip, len(lines))
            del lines[:skipped]
            self._skip -= skipped
        if self._offset:
            self._drop_read()
        self._blocks.append([len(self._pending), block_start, skipped])
        self._pending.extend(lines)

    def _drop_read(self) -> None:
        """Forget the lines already returned (and the blocks that hold none of the others)."""
        offset = self._offset
        del self._pending[:offset]
        self._offset = 0
        blocks = self._blocks
        for block in blocks:
            block[0] -= offset
            if block[0] < 0:  # the block's read lines are gone: they count as skipped
                block[2] -= block[0]
                block[0] = 0
        first = 0
        while first + 1 < len(blocks) and blocks[first + 1][0] == 0:
            first += 1
        del blocks[:first]

    def poll_batch(self, max_records: int) -> Batch | None:
        if self._file is None:
            msg = f"text file source {self.path!r} must be opened (open(ctx)) before poll_batch"
            raise RuntimeError(msg)
        n = max(1, max_records)
        while len(self._pending) - self._offset < n and not self._eof:
            self._fill()
        if self._offset >= len(self._pending):
            return None
        start = self._offset
        self._offset = min(len(self._pending), start + n)
        return self._pending[start:self._offset]

    def snapshot_state(self) -> tuple[int, int]:
        """The position of the next unread line: ``(byte offset of a line start, lines to skip from there)``,
        the start of the block that holds it and how many of the block's lines come before it."""
        if self._offset < len(self._pending):
            for first, start, skipped in reversed(self._blocks):
                if first <= self._offset:
                    return (start, skipped + self._offset - first)
        return (self._pos - len(self._tail), self._skip)  # every held line was read: the next block's start

    def restore_state(self, state: Any) -> None:
        """Resume at a snapshotted position: seek to its line start and drop the lines before the next unread one."""
        start, end = self._range
        stop = self._end if self._file is not None else end
        ok = (isinstance(state, (tuple, list)) and len(state) == 2 and all(type(v) is int and v >= 0 for v in state)
              and start <= state[0] and (stop is None or state[0] <= stop))
        if not ok:
            msg = (f"text file source {self.path!r}: a restored position must be (byte offset in [{start}, {stop}], "
                   f"lines to skip >= 0); got {state!r}")
            raise InvalidArgumentError(msg)
        if self._file is None:
            msg = f"text file source {self.path!r} must be opened (open(ctx)) before restore_state"
            raise RuntimeError(msg)
        self._file.seek(state[0])
        self._pos = state[0]
        self._tail = b""
        self._pending = []
        self._offset = 0
        self._blocks = []
        self._skip = state[1]
        self._eof = self._pos >= self._end

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _find_newline(f: BinaryIO, start: int) -> int:
    """Offset of the first ``\\n`` at or after ``start`` in binary file ``f``, or -1."""
    f.seek(start)
    pos = start
    while True:
        block = f.read(1 << 16)
        if not block:
            return -1
        at = block.find(b"\n")
        if at >= 0:
            return pos + at
        pos += len(block)
