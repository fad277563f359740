"""Spill files: blocks of memory segments appended to a file and read back, checked by CRC-32.

Imports: runtime.errors, runtime.memory (stdlib otherwise). Never runtime.network/config/worker.

A :class:`SpillFile` belongs to an :class:`~runtime.io.manager.IOManager`,
whose threads do the I/O. Each write reserves the next ``nbytes`` of the file
when it is submitted, so concurrent writes of one file never overlap and a
:class:`BlockRef` (path, offset, nbytes, crc32) names its block for good.
Bytes go straight between the segments' memoryviews and the file
(``os.pwritev`` / ``os.preadv``): no intermediate copy. A block is one
segment, or a run of segments gathered on write and scattered on read.

Failure is never silent: a full disk, a file size limit or an I/O error on
write, and a missing, truncated or corrupt block on read raise
:class:`~runtime.errors.SpillError` naming the file and the offset (and, for
writes, the bytes and the free space), through the future and the sync
wrappers alike.
"""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, NamedTuple

from runtime.errors import (
    InvalidHandleError,
    InvalidSizeError,
    ReadOnlySegmentError,
    SegmentBusyError,
    SegmentFreedError,
    SpillError,
)
from runtime.memory.segment import MemorySegment
from runtime.memory.units import format_bytes, free_bytes

if TYPE_CHECKING:  # pragma: no cover
    from runtime.io.manager import IOManager, _IOCore


try:
    _IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
except (AttributeError, ValueError, OSError):  # pragma: no cover
    _IOV_MAX = 1024

Segments = MemorySegment | Sequence[MemorySegment]



class BlockRef(NamedTuple):
    """Where a spilled block lives: spill file path, byte offset, length and CRC-32 of its bytes.

    A plain tuple (msgpack-able). Valid until its spill file is deleted.
    """

    path: str
    offset: int
    nbytes: int
    crc32: int


class _FileState:
    """The open file behind a SpillFile. Fields are guarded by the IOManager core's lock."""

    __slots__ = ("path", "fd", "size", "blocks", "deleted", "futures")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.size = 0  # bytes reserved by submitted writes (the file's logical end)
        self.blocks = 0
        self.deleted = False
        self.futures: set[Future[Any]] = set()  # pending requests on this file: Future[BlockRef] or Future[int]


def free_space(path: str) -> int:
    """Bytes available to unprivileged users on the file system holding ``path`` (-1 if unknown)."""
    free = free_bytes(path)
    return -1 if free is None else free


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "?")
    return f"{exc.strerror or exc} ({name})"


def _spill_error(msg: str, exc: OSError | None, path: str) -> SpillError:
    """A SpillError with ``.path`` and, from ``exc``, ``.errno`` (str() stays ``msg``)."""
    err = SpillError(msg)
    err.path = path  # type: ignore[attr-defined]  # runtime.errors.SpillError declares no .path attribute
    if exc is not None:
        err.errno = exc.errno  # strerror stays None, so str(err) is msg alone
    return err


class SpillFile:
    """One spill file in an IOManager's directory: append blocks of segments, read them back by BlockRef.

    Create it with :meth:`IOManager.create_spill_file`; it is removed by
    :meth:`delete` (or leaving a ``with`` block), or with its IOManager.

    Ownership: while a write or read of a segment is pending, the segment
    belongs to the IOManager: the caller must not read, write or release it
    until the request's future completes (successfully or not). Submitting a
    segment that is still pending raises :class:`SegmentBusyError`.
    Process: the process that created the IOManager (fds do not survive a
    spawn; a forked child must not use it). Thread-safe.
    """

    def __init__(self, manager: IOManager, state: _FileState) -> None:
        self.manager = manager  # keeps the IOManager (and its directory) alive while the file is used
        self._core: _IOCore = manager._core
        self._state = state

    @property
    def path(self) -> str:
        return self._state.path

    @property
    def name(self) -> str:
        return os.path.basename(self._state.path)

    @property
    def size(self) -> int:
        """Bytes written or reserved by submitted writes."""
        return self._state.size

    @property
    def blocks(self) -> int:
        """Blocks submitted for writing."""
        return self._state.blocks

    @property
    def deleted(self) -> bool:
        return self._state.deleted

    # ------------------------------------------------------------------ write
    def write_async(self, segments: Segments, nbytes: int | None = None) -> Future[BlockRef]:
        """Append one block, in the background: the first ``nbytes`` (default: all) of ``segments``.

        ``segments`` is one segment or a sequence of them (a gather write,
        ``os.pwritev``: the block holds their bytes back to back). One block
        of many pages costs one request instead of many.

        Ownership: from this call until the future completes, the segments
        belong to the IOManager; the caller must not write or release them.
        Afterwards they are the caller's again, unchanged.
        Process: the IOManager's process. Thread-safe.

        Raises (at once):
            TypeError: not a MemorySegment (or a non-empty sequence of them).
            InvalidSizeError: nbytes <= 0 or more than the segments hold.
            SegmentFreedError: a segment was freed.
            SegmentBusyError: a request on one of the segments is still pending.
            SpillError: the file was deleted or the IOManager closed.

        The future raises :class:`SpillError` on a full disk, a file size
        limit or an I/O error (naming the file, the bytes and the free space),
        and resolves to the block's :class:`BlockRef` otherwise. A failed
        write leaves its range of the file unused; other blocks stay valid.
        """
        segs = _as_segments(segments, "write")
        nbytes = _check_nbytes(segs, nbytes, "write")
        state = self._state
        core = self._core
        with core.lock:
            self._check_usable("write to")
            offset = state.size
            future = core.submit_locked(state, segs, f"write to {state.path}", _write_block,
                                        core, state, segs, nbytes, offset)
            state.size += nbytes
            state.blocks += 1
        return future

    def write(self, segments: Segments, nbytes: int | None = None, *,
              timeout: float | None = None) -> BlockRef:
        """Blocking :meth:`write_async`: returns the block's BlockRef.

        Ownership: the segments are the caller's again when this returns or
        raises (except ``TimeoutError``: then the request is still pending and
        the IOManager still holds them).
        Process: the IOManager's process. Thread-safe.
        """
        return self.write_async(segments, nbytes).result(timeout)

    # ------------------------------------------------------------------- read
    def read_async(self, ref: BlockRef, segments: Segments) -> Future[int]:
        """Read the block ``ref`` names into ``segments``, in the background.

        With one segment the block lands at its start; with a sequence it is
        scattered over them in order (``os.preadv``), each filled before the
        next, as a gather write laid it out.

        Ownership: from this call until the future completes, the segments
        belong to the IOManager; the caller must not touch or release them.
        If the future raises, their bytes are undefined.
        Process: the IOManager's process. Thread-safe.

        Raises (at once):
            TypeError: not a MemorySegment (or a non-empty sequence of them).
            InvalidSizeError: the segments are too small for the block.
            InvalidHandleError: ``ref`` names another file or bytes never written here.
            ReadOnlySegmentError, SegmentFreedError, SegmentBusyError: as the names say.
            SpillError: the file was deleted or the IOManager closed.

        The future raises :class:`SpillError` when the file went missing, is
        truncated, or the block's CRC-32 does not match (naming file and
        offset); it resolves to the number of bytes read otherwise.
        """
        state = self._state
        ref = _check_ref(ref, state)
        segs = _as_segments(segments, "read into")
        capacity = sum(seg.size for seg in segs)
        if capacity < ref.nbytes:
            what = f"segment of {format_bytes(capacity)}" if len(segs) == 1 else \
                f"{len(segs)} segments of {format_bytes(capacity)} together"
            msg = (f"{what} ({capacity} bytes) is too small for the block of {ref.nbytes} bytes at "
                   f"offset {ref.offset} of spill file {state.path}; read into at least {ref.nbytes} bytes")
            raise InvalidSizeError(msg)
        _check_nbytes(segs, ref.nbytes, "read into")
        if any(seg.readonly for seg in segs):
            text = f"cannot read spill file {state.path} into a read-only segment"
            raise ReadOnlySegmentError(text)
        core = self._core
        with core.lock:
            self._check_usable("read from", ref)
            if ref.offset + ref.nbytes > state.size:
                msg = (f"block ref (offset={ref.offset}, nbytes={ref.nbytes}) lies beyond the "
                       f"{state.size} bytes written to spill file {state.path}")
                raise InvalidHandleError(msg)
            return core.submit_locked(state, segs, f"read from {state.path}", _read_block,
                                      core, state, ref, segs)

    def read(self, ref: BlockRef, segments: Segments, *, timeout: float | None = None) -> int:
        """Blocking :meth:`read_async`: returns the bytes read.

        Ownership: the segments are the caller's again when this returns or
        raises (except ``TimeoutError``: then the read is still pending).
        Process: the IOManager's process. Thread-safe.
        """
        return self.read_async(ref, segments).result(timeout)

    def read_copy(self, ref: BlockRef) -> bytes:
        """The bytes of block ``ref``, read in the calling thread into a new ``bytes`` object (see
        :meth:`read_into`)."""
        out = bytearray(_check_ref(ref, self._state).nbytes)
        self.read_into(ref, memoryview(out))
        return bytes(out)

    def read_into(self, ref: BlockRef, target: memoryview) -> None:
        """Read block ``ref`` in the calling thread into ``target`` (exactly its size), checked: for a reader
        that must not take a segment for it (a checkpoint copying spilled state where its snapshot goes,
        without loading it back, and without a heap copy: many large ``bytes`` fragmented the heap).

        Ownership: ``target`` is the caller's.
        Process: the IOManager's process. Thread-safe (it reads holding the IOManager's lock).

        Raises:
            InvalidHandleError: ``ref`` names another file or bytes never written here.
            ValueError: ``target`` is not the block's size.
            SpillError: the file was deleted, is truncated or corrupt (CRC-32), or the read failed.
        """
        state = self._state
        ref = _check_ref(ref, state)
        view = target.cast("B") if target.format != "B" or target.ndim != 1 else target
        if view.nbytes != ref.nbytes:
            msg = f"read_into needs a target of the block's {ref.nbytes} bytes; got {view.nbytes}"
            raise ValueError(msg)
        where = f"block at offset {ref.offset} ({ref.nbytes} bytes)"
        with self._core.lock:  # pairs with _read_block, which reads on an IOManager thread
            self._check_usable("read from", ref)
            if ref.offset + ref.nbytes > state.size:
                msg = (f"block ref (offset={ref.offset}, nbytes={ref.nbytes}) lies beyond the "
                       f"{state.size} bytes written to spill file {state.path}")
                raise InvalidHandleError(msg)
            progress = [0]
            try:
                _transfer(os.preadv, state.fd, [view], ref.offset, progress)
                size = os.fstat(state.fd).st_size
            except OSError as exc:
                msg = f"cannot read {where} of spill file {state.path}: {_describe(exc)}"
                raise _spill_error(msg, exc, state.path) from exc
        if progress[0] < ref.nbytes:
            msg = (f"spill file {state.path} is truncated: {where} needs {ref.nbytes} bytes, only "
                   f"{progress[0]} could be read (the file has {size} bytes)")
            raise _spill_error(msg, None, state.path)
        crc = zlib.crc32(view)
        if crc != ref.crc32:
            msg = f"spill file {state.path} is corrupt: {where} has crc32 {crc:#010x}, expected {ref.crc32:#010x}"
            raise _spill_error(msg, None, state.path)
        self._core.count("read", ref.nbytes)

    # --------------------------------------------------------------- lifetime
    def _check_usable(self, what: str, ref: BlockRef | None = None) -> None:
        """Caller holds the core lock."""
        self._core.check_open(f"{what} spill file {self._state.path}")
        if self._state.deleted:
            at = f"; block at offset {ref.offset} ({ref.nbytes} bytes) is gone" if ref is not None else ""
            msg = f"cannot {what} spill file {self._state.path}: it was deleted{at}"
            raise _spill_error(msg,
                               None, self._state.path)

    def delete(self, *, timeout: float | None = None) -> None:
        """Wait for this file's pending requests, close it and remove it. Idempotent.

        Every BlockRef of the file becomes invalid; later requests raise SpillError.
        Raises ``TimeoutError`` if requests are still pending after ``timeout``.
        Not from a done-callback of this file's own request (it would wait for itself).
        Process: the IOManager's process. Thread-safe.
        """
        self._core.delete_file(self._state, timeout=timeout)

    def __enter__(self) -> SpillFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def __repr__(self) -> str:
        state = " deleted" if self._state.deleted else ""
        return f"<SpillFile {self.path!r} {self._state.blocks} blocks, {format_bytes(self.size)}{state}>"


# ----------------------------------------------------------------- validation
def _as_segments(segments: Segments, what: str) -> list[MemorySegment]:
    if isinstance(segments, MemorySegment):
        return [segments]
    if isinstance(segments, (list, tuple)) and segments \
            and all(isinstance(seg, MemorySegment) for seg in segments):
        return list(segments)
    msg = f"expected a MemorySegment or a non-empty sequence of them to {what}; got {type(segments).__name__}"
    raise TypeError(msg)


def _check_nbytes(segs: list[MemorySegment], nbytes: int | None, what: str) -> int:
    for seg in segs:
        if seg.freed:
            msg = f"cannot {what} a freed segment (offset {seg.offset}, {seg.size} bytes)"
            raise SegmentFreedError(msg)
    total = sum(seg.size for seg in segs)
    if nbytes is None:
        return total
    if not isinstance(nbytes, int) or isinstance(nbytes, bool):
        text = f"nbytes must be an int; got {type(nbytes).__name__}"
        raise TypeError(text)
    if not 0 < nbytes <= total:
        msg = f"nbytes to {what} must be in [1, {total}] (what the segments hold); got {nbytes}"
        raise InvalidSizeError(msg)
    return nbytes


def _check_ref(ref: BlockRef | Sequence[Any], state: _FileState) -> BlockRef:
    """``ref`` as a BlockRef (a msgpack round trip turns it into a list) naming a block of ``state``'s file."""
    try:
        ref = BlockRef(*ref)
    except TypeError:
        msg = f"expected a BlockRef (path, offset, nbytes, crc32); got {ref!r}"
        raise InvalidHandleError(msg) from None
    if ref.path != state.path:
        msg = f"block ref names spill file {ref.path}, not {state.path}"
        raise InvalidHandleError(msg)
    if ref.offset < 0 or ref.nbytes <= 0:
        msg = f"block ref needs offset >= 0 and nbytes > 0; got {ref!r}"
        raise InvalidHandleError(msg)
    return ref


# --------------------------------------------------- the I/O (IOManager threads)
def _views(segs: list[MemorySegment], nbytes: int) -> list[memoryview]:
    """Zero-copy views of the first ``nbytes`` of the segments, in order (raises if one was freed)."""
    views = []
    for seg in segs:
        if nbytes <= 0:
            break
        take = min(seg.size, nbytes)
        views.append(seg.view(0, take))
        nbytes -= take
    return views


def _transfer(op: Callable[[int, list[memoryview], int], int], fd: int, views: list[memoryview], offset: int,
              progress: list[int]) -> None:
    """Move all of ``views`` with ``os.pwritev``/``os.preadv`` at ``offset``, resuming short transfers.

    ``progress[0]`` counts the bytes moved (also when an OSError escapes).
    Stops early only at end of file (a read returning 0).
    """
    i = 0
    while i < len(views):
        n = op(fd, views[i:i + _IOV_MAX], offset + progress[0])
        if n == 0:
            return
        progress[0] += n
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


def _write_block(core: _IOCore, state: _FileState, segs: list[MemorySegment], nbytes: int,
                 offset: int) -> BlockRef:
    """Runs on an IOManager thread. Pairs with :func:`_read_block` (same CRC, same layout)."""
    views = _views(segs, nbytes)
    crc = 0
    for view in views:
        crc = zlib.crc32(view, crc)
    progress = [0]
    try:
        _transfer(os.pwritev, state.fd, list(views), offset, progress)
        if progress[0] < nbytes:  # pragma: no cover - POSIX reports an errno instead
            raise OSError(errno.EIO, "write returned 0 bytes")
    except OSError as exc:
        directory = os.path.dirname(state.path)
        msg = (f"cannot write {format_bytes(nbytes)} ({nbytes} bytes) to spill file {state.path} at "
               f"offset {offset}: {_describe(exc)} after {progress[0]} bytes; "
               f"{format_bytes(max(free_space(directory), 0))} free in {directory}; free disk space, "
               f"raise the file size limit, or pass IOManager(spill_dir=...) on a larger disk")
        raise _spill_error(msg, exc, state.path) from exc
    finally:
        for view in views:
            view.release()
    core.count("written", nbytes)
    return BlockRef(state.path, offset, nbytes, crc)


def _read_block(core: _IOCore, state: _FileState, ref: BlockRef, segs: list[MemorySegment]) -> int:
    """Runs on an IOManager thread. Pairs with :func:`_write_block`."""
    where = f"block at offset {ref.offset} ({ref.nbytes} bytes)"
    try:
        st = os.fstat(state.fd)
    except OSError as exc:
        msg = f"cannot read {where} of spill file {state.path}: {_describe(exc)}"
        raise _spill_error(msg,
                           exc, state.path) from exc
    if st.st_nlink == 0:
        msg = (f"spill file {state.path} is missing (removed from its directory by someone else); "
               f"refusing to read {where} of a file that no longer exists; keep the spill directory "
               f"out of temp cleaners")
        raise _spill_error(msg, None, state.path)
    views = _views(segs, ref.nbytes)
    progress = [0]
    try:
        try:
            _transfer(os.preadv, state.fd, list(views), ref.offset, progress)
        except OSError as exc:
            msg = (f"cannot read {where} of spill file {state.path}: {_describe(exc)} "
                   f"after {progress[0]} bytes")
            raise _spill_error(msg, exc, state.path) from exc
        if progress[0] < ref.nbytes:
            msg = (f"spill file {state.path} is truncated: {where} needs {ref.nbytes} bytes, only "
                   f"{progress[0]} could be read (the file has {os.fstat(state.fd).st_size} bytes)")
            raise _spill_error(msg, None, state.path)
        crc = 0
        for view in views:
            crc = zlib.crc32(view, crc)
    finally:
        for view in views:
            view.release()
    if crc != ref.crc32:
        msg = (f"spill file {state.path} is corrupt: {where} has crc32 {crc:#010x}, "
               f"expected {ref.crc32:#010x}")
        raise _spill_error(msg, None, state.path)
    core.count("read", ref.nbytes)
    return ref.nbytes


__all__ = ["BlockRef", "SegmentBusyError", "SpillFile", "free_space"]
