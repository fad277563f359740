"""Snapshots out of the job's way: laid out once as blobs (in the checkpoint area when they fit), written to
their checkpoint's files by a thread of their own.

Imports: runtime.checkpoint, runtime.execution (checkpointing, checkpoint_area) (stdlib otherwise).

A subtask's snapshot costs the job thread one copy: :meth:`SnapshotWriter.submit`
encodes the operator states (a header and views of their large buffers, such as
a partition's table in managed memory), and copies them into one blob, in the
worker's :class:`~runtime.execution.checkpoint_area.CheckpointArea` of the shared
region when it fits, else in a bytearray. The operators may change their state
as soon as it returns. A writer thread then writes the blob to the checkpoint's
directory (temporary file, CRC-32, fsync, rename: ``write_state_file``); the
job thread, on its next round (:meth:`SnapshotWriter.poll`), acknowledges the
snapshot with the file's handle and the blob's place in the region, in the order
the snapshots were taken. The checkpoint completes only once every file is
durable, as before; what moved off the job thread is the file's write, its
checksum and its fsync (Flink's asynchronous snapshot phase).

Ownership: the job thread allocates blobs and runs callbacks; the writer thread
only reads a blob, which nothing changes until its checkpoint is subsumed (an
area blob) or the write finished (a heap blob). Process: the worker.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from runtime.checkpoint import checkpoint_path, write_state_file
from runtime.checkpoint.blob import blob_size, write_blob
from runtime.errors import CheckpointError
from runtime.execution.checkpoint_area import CheckpointArea
from runtime.execution.checkpointing import depends_on, encode_states

__all__ = ["SnapshotWriter", "WrittenSnapshot"]


@dataclass(frozen=True)
class WrittenSnapshot:
    """A snapshot whose file is durable: what its acknowledgement carries."""

    checkpoint_id: int
    key: str
    handle: list[Any]  # StateHandle.to_wire()
    shared_memory: list[int]  # [region offset, bytes] of its blob; []: the blob was on the heap
    depends_on: int  # the oldest checkpoint whose files this snapshot needs (itself, unless incremental)
    copy_seconds: float  # the job thread's part: encoding and copying
    write_seconds: float  # the writer thread's part: the file


class SnapshotWriter:
    """Blobs of one job's snapshots, and the thread that writes them (see the module docstring).

    ``directory`` is the job's checkpoint directory; ``area`` the worker's checkpoint area (None: none);
    ``region_view(offset, nbytes)`` a writable view of the region there.
    """

    def __init__(self, directory: str, area: CheckpointArea | None,
                 region_view: Callable[[int, int], memoryview] | None) -> None:
        self.directory = directory
        self.area = area if region_view is not None else None
        self._view = region_view
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future[WrittenSnapshot], Callable[[WrittenSnapshot], None], str]] = deque()
        self.blobs_in_memory = 0
        self.blobs_on_heap = 0
        self._needs: dict[int, int] = {}  # checkpoint id -> the oldest checkpoint its snapshots here build on

    def submit(self, checkpoint_id: int, key: str, states: list[Any], subtask: str,
               on_written: Callable[[WrittenSnapshot], None]) -> None:
        """Copy ``states`` into a blob now; write it to ``chk-<id>/<key>`` on the writer thread; call
        ``on_written`` from :meth:`poll` once the file is durable.

        Raises:
            StateSerializationError: a state cannot be encoded (names ``subtask``).
        """
        started = time.monotonic()
        needs = depends_on(states, checkpoint_id)
        self._needs[checkpoint_id] = min(needs, self._needs.get(checkpoint_id, needs))
        header, buffers = encode_states(states, subtask)
        nbytes = blob_size(header, buffers)
        offset = self.area.allocate(checkpoint_id, nbytes) if self.area is not None else None
        if offset is not None and self._view is not None:
            blob: memoryview = self._view(offset, nbytes)
            self.blobs_in_memory += 1
            shared = [offset, nbytes]
        else:
            blob = memoryview(bytearray(nbytes))
            self.blobs_on_heap += 1
            shared = []
        write_blob(blob, header, buffers)
        del header, buffers
        copy_seconds = time.monotonic() - started
        directory = checkpoint_path(self.directory, checkpoint_id)

        def write() -> WrittenSnapshot:
            begun = time.monotonic()
            try:
                handle = write_state_file(directory, key, blob).to_wire()
            finally:
                blob.release()
            return WrittenSnapshot(checkpoint_id, key, handle, shared, needs, copy_seconds,
                                   time.monotonic() - begun)

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-writer")
        self._pending.append((self._pool.submit(write), on_written, str(directory)))

    def poll(self, *, wait: bool = False) -> None:
        """Call ``on_written`` for each snapshot written, oldest first (all of them, with ``wait``).

        A file that could not be written because its checkpoint's directory is gone (the coordinator aborted
        that checkpoint meanwhile: its timeout) is not acknowledged; the checkpoint is over anyway.

        Raises:
            CheckpointError: a file could not be written (the job fails, and restarts by its strategy).
        """
        while self._pending and (wait or self._pending[0][0].done()):
            future, on_written, directory = self._pending.popleft()
            try:
                written = future.result()
            except CheckpointError:
                if not os.path.isdir(directory):
                    continue
                raise
            on_written(written)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def completed(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` completed: the area may reuse the blobs of every earlier one that its
        snapshots here do not build on (incremental ones read their parents' blobs at a restore)."""
        keep_from = self._needs.get(checkpoint_id, checkpoint_id)
        for old in [c for c in self._needs if c <= checkpoint_id]:
            del self._needs[old]
        if self.area is not None:
            self.area.release_before(keep_from)

    def close(self) -> None:
        """Wait for the writes in progress (their files are then complete or removed); no callback runs."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._pending.clear()
