"""Sinks: CollectSink, PrintSink and FileSink.

Role: ``.collect()``, ``.print()``, ``.write_text(path)``. Each writes a whole
batch with one call (``str.join`` over ``map(str, batch)``), not one call per
record.

Imports: runtime.execution.task, runtime.errors, operators.stateless (batch helpers), stdlib.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from operators.stateless import to_records
from runtime.errors import ShmflowError
from runtime.execution.task import Batch, Emit, OperatorContext, SinkOperator, Stateless

__all__ = ["CollectSink", "PrintSink", "FileSink"]


def _lines(batch: Batch, prefix: str = "") -> str:
    """``prefix + str(record) + "\\n"`` for every record, as one string."""
    records = to_records(batch)
    if not records:
        return ""
    if prefix:
        return prefix + ("\n" + prefix).join(map(str, records)) + "\n"
    return "\n".join(map(str, records)) + "\n"


#: CollectSink ships record lists to the client once this many records are pending...
COLLECT_BATCH_RECORDS = 4096
#: ...or once the oldest pending record has waited this long (seconds of processing time).
COLLECT_LINGER = 0.02


class CollectSink(SinkOperator):
    """Ship batches to the client: ``ctx.send_to_client(sink_id, batch)`` (``.collect()``).

    ``CollectSink(sink_id)``; the runtime delivers the batches to the client
    that waits on ``sink_id``. Lists of records are gathered into one message
    of up to ``COLLECT_BATCH_RECORDS`` records, or whatever is pending after
    ``COLLECT_LINGER`` seconds (a timer) and at end of input: one message per
    small batch would load the control plane (and the client) with thousands
    of messages a second. Other batches (TimestampedBatch, columnar dicts)
    are passed on as they are, after what is pending, so the order holds.

    >>> got = []
    >>> sink = CollectSink("out")
    >>> sink.open(OperatorContext(send_to_client=lambda sink_id, batch: got.append((sink_id, batch))))
    >>> sink.process_batch([1, 2], None); sink.process_batch([3], None); got
    []
    >>> sink.finish(None); got
    [('out', [1, 2, 3])]
    """

    name = "collect_sink"

    def __init__(self, sink_id: str) -> None:
        if not isinstance(sink_id, str) or not sink_id:
            msg = f"CollectSink: sink_id must be a non-empty str; got {sink_id!r}"
            raise TypeError(msg)
        self.sink_id = sink_id
        self._send: Any = None
        self._pending: list[Any] = []
        self._since: float | None = None  # processing time of the oldest pending record

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        if ctx.send_to_client is None:
            msg = (f"CollectSink {self.sink_id!r} needs a runtime that ships results to the client; "
                   f"got OperatorContext.send_to_client=None")
            raise ShmflowError(msg)
        self._send = ctx.send_to_client

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        if type(batch) is list:
            if not batch:
                return
            if self._since is None:
                self._since = self.ctx.processing_time()
            self._pending.extend(batch)
            if len(self._pending) >= COLLECT_BATCH_RECORDS:
                self._flush()
            return
        self._flush()
        self._send(self.sink_id, batch)

    def next_timer(self) -> float | None:
        return None if self._since is None else self._since + COLLECT_LINGER

    def on_processing_time(self, now: float, emit: Emit) -> None:
        if self._since is not None and now >= self._since + COLLECT_LINGER:
            self._flush()

    def finish(self, emit: Emit) -> None:
        self._flush()

    def prepare_snapshot(self, emit: Emit) -> None:
        """Send what is pending: the records before a barrier go out before it."""
        self._flush()

    def snapshot_state(self) -> None:
        """None: after :meth:`prepare_snapshot` nothing is pending (the runtime tags what was sent with the
        checkpoint, so the client keeps exactly what a restored job does not send again)."""
        return None

    def restore_state(self, state: Any) -> None:
        pass

    def _flush(self) -> None:
        if self._pending:
            batch, self._pending, self._since = self._pending, [], None
            self._send(self.sink_id, batch)


class PrintSink(Stateless, SinkOperator):
    """Print every record on its own line to stdout (``.print()``).

    ``PrintSink(prefix=None)``. Like Flink: with parallelism > 1 each line
    starts with ``"{subtask_index + 1}> "``; with a prefix it is
    ``"{prefix}:{subtask_index + 1}> "`` (parallelism > 1) or ``"{prefix}> "``.

    >>> sink = PrintSink()
    >>> sink.open(OperatorContext(subtask_index=1, parallelism=2))
    >>> sink.process_batch(["a", ("b", 1)], None)
    2> a
    2> ('b', 1)
    >>> sink = PrintSink("words")
    >>> sink.open(OperatorContext())
    >>> sink.process_batch([3], None)
    words> 3
    """

    name = "print_sink"

    def __init__(self, prefix: str | None = None) -> None:
        if prefix is not None and not isinstance(prefix, str):
            msg = f"PrintSink: prefix must be a str or None; got {type(prefix).__name__}"
            raise TypeError(msg)
        self.prefix = prefix
        self._line_prefix = "" if prefix is None else f"{prefix}> "

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        if ctx.parallelism > 1:
            tag = f"{ctx.subtask_index + 1}> "
            self._line_prefix = tag if self.prefix is None else f"{self.prefix}:{tag}"
        else:
            self._line_prefix = "" if self.prefix is None else f"{self.prefix}> "

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        text = _lines(batch, self._line_prefix)
        if text:
            out = sys.stdout  # looked up per batch: tests and the worker may redirect it
            out.write(text)
            out.flush()


class FileSink(SinkOperator):
    """Write ``str(record)`` per line (``.write_text(path)``).

    ``FileSink(path, *, encoding="utf-8")``. Parallelism 1 writes the file
    ``path``; parallelism > 1 writes the directory ``path/`` with one
    ``part-{subtask_index}`` file per subtask. Parent directories are
    created. The file is opened (truncated) in ``open`` and closed in ``close``.

    In a job with checkpoints it commits its output in two phases, as
    Flink's FileSink: ``path`` is a directory, and each subtask writes an
    in-progress file (``.part-{subtask}-{n}.inprogress``); at every checkpoint
    it closes that file (pending) and starts the next; when the checkpoint
    completes it renames its pending files to ``part-{subtask}-{n}``. So a
    reader only ever sees committed files, and after a failure, the restart
    commits what the restored checkpoint covers and deletes what it does not:
    every record is in the committed files once. At the end of the input all
    is committed.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "out", "words.txt")
    >>> sink = FileSink(path)
    >>> sink.open(OperatorContext())
    >>> sink.process_batch(["to", ("be", 2)], None); sink.close()
    >>> with open(path) as f:
    ...     f.read()
    "to\\n('be', 2)\\n"
    >>> import shutil; shutil.rmtree(os.path.dirname(os.path.dirname(path)))
    """

    name = "file_sink"

    def __init__(self, path: str | os.PathLike[str], *, encoding: str = "utf-8") -> None:
        self.path = os.fspath(path)
        self.encoding = encoding
        self.target: str | None = None  # the file this subtask writes, known at open
        self._file: Any = None
        # Two-phase commit (checkpoints): the number of the next part file, the in-progress one's number,
        # the closed parts not committed yet as [checkpoint id, part number], and whether stale in-progress
        # files of an earlier attempt are still to be removed (a fresh start) or were dealt with (restore).
        self._transactional = False
        self._next_part = 0
        self._part = -1
        self._pending: list[list[int]] = []
        self._stale_checked = False

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        if ctx.checkpointing:
            self._transactional = True
            self._make_directory(ctx)
            return
        if ctx.parallelism > 1:
            self._make_directory(ctx)
            self.target = os.path.join(self.path, f"part-{ctx.subtask_index}")
        else:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self.target = self.path
        self._file = open(self.target, "w", encoding=self.encoding)  # noqa: SIM115 - closed in close()

    def _make_directory(self, ctx: OperatorContext) -> None:
        if os.path.isfile(self.path):
            why = "with checkpoints" if ctx.checkpointing else f"with parallelism {ctx.parallelism}"
            msg = (f"FileSink {why} writes a directory of part files, but {self.path!r} is a file; remove it "
                   f"or choose another path")
            raise FileExistsError(msg)
        os.makedirs(self.path, exist_ok=True)

    # ------------------------------------------------------- two-phase commit
    def _name(self, part: int, *, committed: bool) -> str:
        index = self.ctx.subtask_index
        name = f"part-{index}-{part}" if committed else f".part-{index}-{part}.inprogress"
        return os.path.join(self.path, name)

    def _remove_stale(self, keep: set[int]) -> None:
        """Delete this subtask's in-progress files that are not part ``keep`` (left by a failed attempt)."""
        prefix = f".part-{self.ctx.subtask_index}-"
        for entry in os.listdir(self.path):
            if entry.startswith(prefix) and entry.endswith(".inprogress"):
                number = entry[len(prefix):-len(".inprogress")]
                if not number.isdigit() or int(number) not in keep:
                    os.unlink(os.path.join(self.path, entry))
        self._stale_checked = True

    def _writable(self) -> Any:
        if not self._stale_checked:
            self._remove_stale(set())  # a fresh start: nothing in progress is ours
        if self._file is None:
            self._part, self._next_part = self._next_part, self._next_part + 1
            self.target = self._name(self._part, committed=False)
            self._file = open(self.target, "w", encoding=self.encoding)  # noqa: SIM115 - closed when rolled
        return self._file

    def _roll(self, checkpoint_id: int) -> None:
        """Close the in-progress part (fsynced) as pending for ``checkpoint_id``."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self._pending.append([checkpoint_id, self._part])

    def _commit(self, up_to: int) -> None:
        keep = []
        for checkpoint_id, part in self._pending:
            if checkpoint_id <= up_to:
                source, final = self._name(part, committed=False), self._name(part, committed=True)
                if os.path.exists(source):  # else committed already (a restore after the commit)
                    os.replace(source, final)
            else:
                keep.append([checkpoint_id, part])
        self._pending = keep

    def prepare_snapshot(self, emit: Emit) -> None:
        if self._transactional:
            self._roll(self.ctx.checkpoint_id)

    def snapshot_state(self) -> Any:
        if not self._transactional:
            return None
        return {"next_part": self._next_part, "pending": [list(p) for p in self._pending]}

    def restore_state(self, state: Any) -> None:
        """Commit the parts the restored checkpoint covers; delete the in-progress parts it does not."""
        self._next_part = int(state["next_part"])
        self._pending = [list(p) for p in state["pending"]]
        self._commit(1 << 62)  # every part it lists was closed for it (or an earlier one): all complete
        self._remove_stale(set())

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        if self._transactional:
            self._commit(checkpoint_id)

    # ------------------------------------------------------------------ data
    def process_batch(self, batch: Batch, emit: Emit) -> None:
        if self._transactional:
            self._writable().write(_lines(batch))
            return
        if self._file is None:
            msg = f"FileSink {self.path!r} must be opened (open(ctx)) before process_batch"
            raise RuntimeError(msg)
        self._file.write(_lines(batch))

    def finish(self, emit: Emit) -> None:
        if self._transactional:  # the end of the input: everything written is final
            self._roll(1 << 62)
            self._commit(1 << 62)
            return
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
