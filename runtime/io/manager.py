"""IOManager: spill files in a private temp directory, written and read back by background threads.

Imports: runtime.errors, runtime.memory, runtime.io (stdlib otherwise). Never runtime.network/config/worker.

The model is Flink's ``IOManagerAsync``: operators that run out of managed
memory (sort, hash join, large window state) write segments to spill files
and read them back later, while the task keeps computing. Requests go to a
pool of ``threads`` non-daemon threads; ``os.pwritev``/``os.preadv`` and
``zlib.crc32`` release the GIL, so the I/O overlaps with Python work. A
request moves one segment or, gathered/scattered, a run of them.

The directory is ``shmflow-spill-<pid>-<start ticks>-<random>`` under
``spill_dir`` (default: the system temp directory); making one first removes
those of processes that are gone (:func:`sweep_spill_dirs`). It is removed, with every
spill file in it, on :meth:`IOManager.close`, on leaving a ``with`` block,
when the manager is garbage-collected, and at interpreter exit (a
``weakref.finalize``, which runs from ``atexit``). No thread outlives
``close()``: the pool's threads are non-daemon and joined.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, TypeVar

from runtime.errors import InvalidHandleError
from runtime.io.spill import BlockRef, SegmentBusyError, SpillFile, _FileState, _spill_error
from runtime.memory.region import process_alive, process_start_ticks
from runtime.memory.segment import MemorySegment
from runtime.memory.snapshot import Snapshot
from runtime.memory.units import format_bytes

SPILL_PREFIX = "shmflow-spill-"
#: A spill directory's name carries its creator's pid and start time: ``shmflow-spill-<pid>-<ticks>-<random>``.
_OWNED = re.compile(rf"^{re.escape(SPILL_PREFIX)}(\d+)-(\d+)-")


def sweep_spill_dirs(parent: str) -> list[str]:
    """Remove the spill directories in ``parent`` whose creating process is gone; returns their paths.

    A worker that is SIGKILLed cannot remove its spill directory; the next IOManager made in the same
    parent (the next job's, or ``shmflow sweep``) does. A directory of a live process is never touched.
    """
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _OWNED.match(name)
        if match is None:
            continue
        pid, ticks = int(match.group(1)), int(match.group(2))
        if process_alive(pid, ticks or None):
            continue
        path = os.path.join(parent, name)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
_HINT_RE = re.compile(r"[^A-Za-z0-9._-]+")
_IDS = itertools.count(1)
_T = TypeVar("_T")


@dataclass(frozen=True)
class IOManagerStats(Snapshot):
    """A snapshot of an IOManager. Also readable as a mapping: ``stats["bytes_written"]``."""

    directory: str
    threads: int
    files: int  # spill files open now
    files_created: int
    files_deleted: int
    bytes_on_disk: int  # bytes written or reserved in the open files
    blocks_written: int
    bytes_written: int
    blocks_read: int
    bytes_read: int
    pending_requests: int
    pending_segments: int  # segments the IOManager holds for pending requests
    failed_requests: int
    closed: bool


class _IOCore:
    """The state the IOManager's threads and its finalizer share; references no public object.

    Fields below ``lock`` are guarded by it. If you change the request
    bookkeeping here, update ``_write_block``/``_read_block`` in spill.py,
    which report back through :meth:`count`, and :meth:`_run`/:meth:`_done`,
    which hand the segments back.
    """

    def __init__(self, directory: str, threads: int) -> None:
        self.directory = directory
        self.threads = threads
        self.pid = os.getpid()
        self.thread_prefix = f"shmflow-io-{next(_IDS)}"
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=self.thread_prefix)
        self.lock = threading.RLock()  # reentrant: a done-callback may run inside submit_locked
        self.files: dict[str, _FileState] = {}
        self.pending: dict[tuple[int, int], str] = {}  # (id(region), segment offset) -> pending request
        self.inflight = 0  # requests submitted and not yet finished
        self.closed = False
        self.names = itertools.count()
        self.counters = {"files_created": 0, "files_deleted": 0, "blocks_written": 0, "bytes_written": 0,
                         "blocks_read": 0, "bytes_read": 0, "failed_requests": 0}

    def check_open(self, what: str) -> None:
        """Caller holds the lock."""
        if self.closed:
            msg = f"cannot {what}: the IOManager of {self.directory} is closed"
            raise _spill_error(msg, None,
                               self.directory)

    # --------------------------------------------------------------- requests
    def submit_locked(self, state: _FileState, segments: list[MemorySegment], what: str,
                      fn: Callable[..., _T], *args: Any) -> Future[_T]:
        """Hand ``segments`` to a thread running ``fn(*args)``. Caller holds the lock.

        Ownership: the segments are recorded as pending (the IOManager's) until
        ``fn`` returns or raises; that is cleared *before* the future
        completes, so a caller woken by the future may resubmit at once.
        """
        keys = [(id(seg.region), seg.offset) for seg in segments]
        seen: set[tuple[int, int]] = set()
        for seg, key in zip(segments, keys):
            busy = self.pending.get(key) or ("request (it appears twice in this one)" if key in seen else None)
            seen.add(key)
            if busy is not None:
                msg = (f"segment at offset {seg.offset} ({format_bytes(seg.size)}) belongs to the "
                       f"IOManager until its pending {busy} completes; wait for that future before "
                       f"submitting the segment again")
                raise SegmentBusyError(msg)
        for key in keys:
            self.pending[key] = what
        self.inflight += 1
        try:
            future = self.executor.submit(self._run, keys, fn, *args)
        except RuntimeError as exc:  # the pool shut down under us (interpreter exit)
            for key in keys:
                del self.pending[key]
            self.inflight -= 1
            text = f"cannot {what}: the IOManager's threads have stopped"
            raise _spill_error(text, None,
                               state.path) from exc
        state.futures.add(future)
        future.add_done_callback(lambda f: self._done(state, keys, f))
        return future

    def _run(self, keys: list[tuple[int, int]], fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return fn(*args)
        except BaseException:
            with self.lock:
                self.counters["failed_requests"] += 1
            raise
        finally:
            with self.lock:
                for key in keys:
                    self.pending.pop(key, None)
                self.inflight -= 1

    def _done(self, state: _FileState, keys: list[tuple[int, int]], future: Future[Any]) -> None:
        with self.lock:
            state.futures.discard(future)
            if future.cancelled():  # never ran: give the segments back
                for key in keys:
                    self.pending.pop(key, None)
                self.inflight -= 1

    def count(self, kind: str, nbytes: int) -> None:
        """Record a completed block; ``kind`` is "written" or "read"."""
        with self.lock:
            self.counters[f"blocks_{kind}"] += 1
            self.counters[f"bytes_{kind}"] += nbytes

    # ------------------------------------------------------------------ files
    def create_file(self, hint: str) -> _FileState:
        hint = _HINT_RE.sub("_", str(hint))[:64] or "spill"
        with self.lock:
            self.check_open(f"create a spill file in {self.directory}")
            path = os.path.join(self.directory, f"{hint}-{next(self.names):06d}.spill")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            except OSError as exc:
                msg = f"cannot create spill file {path}: {exc.strerror}; check the spill directory"
                raise _spill_error(msg, exc, path) from exc
            state = _FileState(path, fd)
            self.files[path] = state
            self.counters["files_created"] += 1
            return state

    def delete_file(self, state: _FileState, *, timeout: float | None) -> None:
        with self.lock:
            if state.deleted:
                return
            state.deleted = True  # refuse new requests from here on
            pending = list(state.futures)
        done, not_done = wait_futures(pending, timeout=timeout)
        if not_done:
            with self.lock:
                state.deleted = False
            msg = f"spill file {state.path} still has {len(not_done)} pending requests after {timeout} s"
            raise TimeoutError(msg)
        with self.lock:
            self.files.pop(state.path, None)
            self.counters["files_deleted"] += 1
            fd, state.fd = state.fd, -1  # whoever takes the fd under the lock closes it, once
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(state.path)
        except FileNotFoundError:
            pass  # removed by someone else already; reads would have reported it

    def file_for(self, ref: BlockRef) -> _FileState:
        path = str(ref[0]) if isinstance(ref, tuple) and ref else repr(ref)
        with self.lock:
            state = self.files.get(path)
        if state is not None:
            return state
        if os.path.dirname(path) == self.directory:
            msg = f"cannot read block ref of spill file {path}: the file was deleted"
            raise _spill_error(msg, None, path)
        msg = f"block ref names {path}, which is not a spill file of the IOManager of {self.directory}"
        raise InvalidHandleError(msg)

    # --------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Finish pending requests, join the threads, close every file, remove the directory. Idempotent.

        Called by ``IOManager.close()`` and by the finalizer (garbage
        collection, interpreter exit); it must not reference the IOManager.
        """
        with self.lock:
            self.closed = True
        if threading.current_thread().name.startswith(self.thread_prefix + "_"):  # the pool's own names
            # A pool thread (a done-callback) cannot join itself, and closing fds under requests
            # still running could let a reused fd number receive their bytes: finish elsewhere.
            # While the interpreter finalizes, a new thread never starts (its start() would
            # hang): then the process is ending anyway, so remove the files from here.
            if not sys.is_finalizing():
                threading.Thread(target=self.shutdown, name=f"shmflow-io-close-{self.thread_prefix}",
                                 daemon=True).start()
                return
            self.executor.shutdown(wait=False)
            self._remove_files()
            return
        self.executor.shutdown(wait=True)
        self._remove_files()

    def _remove_files(self) -> None:
        with self.lock:
            files, self.files = list(self.files.values()), {}
            fds = []
            for state in files:
                state.deleted = True
                fds.append(state.fd)
                state.fd = -1  # whoever takes the fd under the lock closes it, once (see delete_file)
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        if os.getpid() == self.pid:  # a forked child must not remove its parent's files
            shutil.rmtree(self.directory, ignore_errors=True)

    def stats(self) -> IOManagerStats:
        with self.lock:
            return IOManagerStats(
                directory=self.directory,
                threads=self.threads,
                files=len(self.files),
                bytes_on_disk=sum(s.size for s in self.files.values()),
                pending_requests=self.inflight,
                pending_segments=len(self.pending),
                closed=self.closed,
                **self.counters,
            )


class IOManager:
    """Spill files and background I/O for one worker.

    ``spill_dir`` is where the private directory is made (default
    ``tempfile.gettempdir()``); ``threads`` is the number of I/O threads.

    Ownership: the IOManager owns its directory and every spill file in it;
    everything is removed on :meth:`close`. A segment handed to a write or
    read request belongs to the IOManager until the request's future
    completes; the caller must not touch or release it before.
    Process: the creating process only (file descriptors and threads do not
    cross processes). Thread-safe.

    Example::

        with IOManager() as io, io.create_spill_file(hint="sort") as f:
            ref = f.write(segment)          # BlockRef(path, offset, nbytes, crc32)
            f.read(ref, other_segment)      # the same bytes, CRC-checked
    """

    def __init__(self, spill_dir: str | None = None, *, threads: int = 2) -> None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            msg = f"threads must be an int >= 1; got {threads!r}"
            raise ValueError(msg)
        parent = tempfile.gettempdir() if spill_dir is None else os.fspath(spill_dir)
        sweep_spill_dirs(parent)  # what killed workers left here
        pid = os.getpid()
        try:
            directory = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{pid}-{process_start_ticks(pid) or 0}-", dir=parent)
        except OSError as exc:
            msg = f"cannot create a spill directory in {parent}: {exc.strerror}; pass a writable spill_dir"
            raise _spill_error(msg, exc, parent) from exc
        self._core = _IOCore(directory, threads)
        self._finalizer = weakref.finalize(self, _IOCore.shutdown, self._core)

    @property
    def directory(self) -> str:
        """The private spill directory (removed on close)."""
        return self._core.directory

    @property
    def closed(self) -> bool:
        return self._core.closed

    def create_spill_file(self, hint: str = "spill") -> SpillFile:
        """A new, empty spill file named ``<hint>-<n>.spill`` in this manager's directory.

        Ownership: the caller uses it and deletes it with ``f.delete()`` (or a
        ``with`` block); files still open are removed with the IOManager.
        Process: the IOManager's process. Thread-safe.

        Raises:
            SpillError: the IOManager is closed or the file cannot be created.
        """
        return SpillFile(self, self._core.create_file(hint))

    def read_async(self, ref: BlockRef, segment: MemorySegment) -> Future[int]:
        """``SpillFile.read_async`` for the file ``ref`` names (see there).

        Ownership: ``segment`` belongs to the IOManager until the future completes.
        Process: the IOManager's process. Thread-safe.
        """
        return SpillFile(self, self._core.file_for(ref)).read_async(ref, segment)

    def read(self, ref: BlockRef, segment: MemorySegment, *, timeout: float | None = None) -> int:
        """Blocking :meth:`read_async`; returns the bytes read.

        Ownership: ``segment`` is the caller's again when this returns or raises.
        Process: the IOManager's process. Thread-safe.
        """
        return self.read_async(ref, segment).result(timeout)

    def stats(self) -> IOManagerStats:
        """Files, blocks and bytes written and read, pending and failed requests."""
        return self._core.stats()

    statistics = stats

    def close(self) -> None:
        """Finish pending requests, join the I/O threads, delete every spill file and the directory.

        Idempotent. Later requests raise SpillError. Called from one of the
        IOManager's own threads (a future's done-callback), it returns at once
        and a helper thread finishes the cleanup.
        Process: the IOManager's process. Thread-safe.
        """
        self._finalizer()

    def __enter__(self) -> IOManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None and finalizer.alive:
            msg = f"unclosed IOManager of {self._core.directory}; removing its spill files"
            warnings.warn(msg, ResourceWarning, stacklevel=2, source=self)

    def __repr__(self) -> str:
        state = " closed" if self._core.closed else ""
        return f"<IOManager {self._core.directory!r} threads={self._core.threads}{state}>"


__all__ = ["IOManager", "IOManagerStats", "sweep_spill_dirs"]
