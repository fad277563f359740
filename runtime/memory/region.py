"""SharedRegion: create, attach, close and unlink the one shared-memory block; the start-up sweep.

Imports: runtime.errors, runtime.memory.segment (stdlib and numpy otherwise).

Layout of the block (all integers little-endian)::

    [ header (HEADER_FIXED bytes) | generation table (uint32 per granule) | stats area | pad | usable area ]
                                                                                         ^ offset 0 of every segment

The stats area (``stats_bytes`` at creation, 0: none) lies outside the usable area: the
allocator never carves it. Its layout and its writers are ``runtime.web.stats_block``'s.

The header names the creator (pid and the kernel's start time of that pid), so a
block whose creator is gone can be recognised and removed by :func:`sweep`, even
if the pid has since been reused. The generation table holds one counter per
``granule`` bytes of the usable area; freeing a block bumps the counter of its
first granule, which makes every handle taken before the free stale, in any
process.

Ownership: only the creating process unlinks the block (on ``close()``, at
normal interpreter exit, on an uncaught exception, on SIGINT and SIGTERM).
Attaching processes never register the block with Python's resource tracker, so
the tracker neither unlinks it nor warns about it when they exit.
"""

from __future__ import annotations

import atexit
import mmap
import os
import re
import secrets
import signal
import struct
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker, shared_memory
from types import FrameType
from typing import Any, Protocol, cast

import numpy as np

from runtime.errors import InvalidHandleError, InvalidSizeError, OutOfMemoryError, RegionError
from runtime.memory.segment import MemorySegment, SegmentHandleLike
from runtime.memory.units import format_bytes, free_bytes

try:  # POSIX only; shmflow needs /dev/shm.
    import _posixshmem
except ImportError:  # pragma: no cover
    _posixshmem = None

MAGIC = b"SHMFLOW1"
VERSION = 1
SHM_DIR = "/dev/shm"
DEFAULT_PREFIX = "shmflow-"
PREFIX_ENV = "SHMFLOW_SHM_PREFIX"
DEFAULT_GRANULE = 256

# magic, version, header_bytes, usable_bytes, granule, creator_pid, creator_start_ticks, stats_offset, stats_bytes
_HEADER = struct.Struct("<8sIIQQQQQQ")
HEADER_FIXED = 64
_USABLE_ALIGN = 4096
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after ``comm`` (field 3, the state, first), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # FileNotFoundError, ProcessLookupError (a pid that exited while we read)
        return None
    # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
    return stat[stat.rfind(b")") + 2:].split()


def _process_start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if no such process."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None  # field 22 overall


def process_start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): with the pid, it names one process."""
    return _process_start_ticks(pid)


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True if process ``pid`` runs: it exists, is not a zombie (state Z, or X: dead, not yet reaped
    by its parent: a SIGKILLed creator whose parent has not waited for it) and, when ``start_ticks``
    is given, is the process that started then (not a later one that reused the pid).

    Where /proc is unreadable, existence (``kill(pid, 0)``) is all it can tell.
    """
    fields = _proc_stat(pid)
    if fields is None:
        if os.path.isdir("/proc/self"):  # Linux: no /proc entry, no process
            return False
        return _pid_alive(pid)
    if fields[0] in (b"Z", b"X"):
        return False
    return start_ticks is None or int(fields[19]) == start_ticks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _SharedMemoryFields(Protocol):
    """The private fields of CPython's ``SharedMemory`` that :class:`_Untracked` takes over
    (typeshed declares only the public API). Checked against CPython 3.11 to 3.13."""

    _mmap: mmap.mmap | None
    _buf: memoryview | None
    _fd: int

    @property
    def name(self) -> str: ...


#: What ``signal.getsignal`` returns and ``signal.signal`` takes: a handler, SIG_DFL / SIG_IGN, or None.
_SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class _Untracked:
    """Open a block through SharedMemory without the resource tracker claiming its name (gh-82300).

    Returns the block's name and its mmap; the SharedMemory object is
    disarmed, so its ``__del__`` never tries to close a mapping that numpy views
    still export. An mmap with live exports is unmapped when the last goes.
    """

    _lock = threading.Lock()

    @classmethod
    def open(cls, name: str, *, create: bool, size: int = 0) -> tuple[str, mmap.mmap]:
        if sys.version_info >= (3, 13):
            shm = shared_memory.SharedMemory(name, create=create, size=size, track=False)
        else:
            with cls._lock:
                original = resource_tracker.register
                resource_tracker.register = lambda *args, **kwargs: None
                try:
                    shm = shared_memory.SharedMemory(name, create=create, size=size)
                finally:
                    resource_tracker.register = original
        raw = cast(_SharedMemoryFields, shm)
        mapping = cast(mmap.mmap, raw._mmap)  # set by the constructor; None only after close()
        cast(memoryview, raw._buf).release()
        raw._buf = None
        raw._mmap = None
        os.close(raw._fd)
        raw._fd = -1
        return raw.name.lstrip("/"), mapping


def _unlink_name(name: str) -> bool:
    """Remove ``name`` from /dev/shm without telling the resource tracker. True if it existed."""
    try:
        _posixshmem.shm_unlink("/" + name.lstrip("/"))
    except FileNotFoundError:
        return False
    return True


class _CleanupRegistry:
    """Unlinks the blocks this process created when it exits, normally or by SIGINT/SIGTERM.

    Process: the creating process. The signal handler only unlinks names (no
    allocation, no locks held across user code) and then chains to the handler
    that was installed before it.
    """

    def __init__(self) -> None:
        self._names: dict[str, int] = {}  # name -> creator pid (a forked child must not unlink)
        self._lock = threading.Lock()
        self._installed = False
        self._previous: dict[int, _SignalHandler] = {}

    def add(self, name: str) -> None:
        with self._lock:
            self._names[name] = os.getpid()
            if not self._installed:
                self._install()

    def discard(self, name: str) -> None:
        with self._lock:
            self._names.pop(name, None)

    def unlink_all(self) -> None:
        me = os.getpid()
        for name, pid in list(self._names.items()):
            if pid == me:
                _unlink_name(name)
            self._names.pop(name, None)

    def _install(self) -> None:
        self._installed = True
        atexit.register(self.unlink_all)
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if signum == signal.SIGINT and previous is signal.default_int_handler:
                # KeyboardInterrupt unwinds the stack and runs atexit: nothing to add.
                continue
            if previous not in (signal.SIG_DFL, None) and not callable(previous):
                continue  # SIG_IGN: the user wants the signal ignored.
            self._previous[signum] = previous
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.unlink_all()
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


_CLEANUP = _CleanupRegistry()


def default_prefix() -> str:
    """The name prefix for new regions: ``$SHMFLOW_SHM_PREFIX`` or ``shmflow-``."""
    prefix = os.environ.get(PREFIX_ENV, DEFAULT_PREFIX)
    if not prefix.startswith(DEFAULT_PREFIX) or not _NAME_RE.match(prefix):
        msg = f"{PREFIX_ENV} must start with {DEFAULT_PREFIX!r} and use [A-Za-z0-9._-]; got {prefix!r}"
        raise RegionError(msg)
    return prefix


def shm_free_bytes() -> int:
    """Bytes still free in /dev/shm (tmpfs), as the kernel reports them."""
    free = free_bytes(SHM_DIR)
    if free is None:
        msg = f"cannot read the free space of {SHM_DIR}: shared memory needs a tmpfs at {SHM_DIR}"
        raise RegionError(msg)
    return free


def _layout(size: int, granule: int, stats_bytes: int = 0) -> tuple[int, int]:
    """(stats area offset, header bytes) for ``size`` usable bytes and a stats area of ``stats_bytes``."""
    table_bytes = 4 * ((size + granule - 1) // granule)
    stats_offset = (HEADER_FIXED + table_bytes + 63) // 64 * 64  # a cache line of its own: slots are written hot
    header = stats_offset + stats_bytes
    header = (header + _USABLE_ALIGN - 1) // _USABLE_ALIGN * _USABLE_ALIGN
    return table_bytes, header


class SharedRegion:
    """One named shared-memory block: a header with a generation table, then ``size`` usable bytes.

    Create it in the coordinator with :meth:`create` (or as a context manager,
    which unlinks on exit) and attach in other processes with :meth:`attach`.

    Ownership: the creator owns the name and alone unlinks it. Every process
    maps the block; a mapping outlives its name, so attached processes keep
    working after an early unlink. Segments are carved by a
    :class:`~runtime.memory.buddy.BuddyAllocator`; the region itself hands out
    nothing.
    Process: any. Not thread-safe for create/close; segment access is.
    """

    def __init__(self, name: str, mapping: mmap.mmap, *, creator: bool) -> None:
        self._mmap: mmap.mmap | None = mapping
        self._creator = creator
        self._unlinked = False
        self.name: str = name
        if len(mapping) < HEADER_FIXED:
            msg = f"shared block {name!r} is {len(mapping)} bytes, smaller than a shmflow header"
            raise RegionError(msg)
        magic, version, header_bytes, usable, granule, pid, ticks, stats_offset, stats_bytes = \
            _HEADER.unpack_from(mapping, 0)
        if magic != MAGIC or version != VERSION:
            msg = f"shared block {name!r} is not a shmflow region (magic {magic!r}, version {version})"
            raise RegionError(msg)
        if header_bytes + usable > len(mapping):
            msg = (f"shared block {name!r} is truncated: header says {header_bytes + usable} bytes, "
                   f"block has {len(mapping)}")
            raise RegionError(msg)
        self.size: int = usable
        self.granule: int = granule
        self.header_bytes: int = header_bytes
        self.creator_pid: int = pid
        self.creator_start_ticks: int | None = ticks or None  # see process_alive(); 0: not recorded
        # The views every segment slices; they pin the mapping until released.
        whole = memoryview(mapping)
        self.buf: memoryview = whole[header_bytes: header_bytes + usable]
        self.array: np.ndarray = np.frombuffer(self.buf, dtype=np.uint8)
        table_len = (usable + granule - 1) // granule
        self._generations = whole[HEADER_FIXED: HEADER_FIXED + 4 * table_len].cast("I")
        #: The stats area (see the module docstring): every process may map it; who writes which part of it
        #: is runtime.web.stats_block's rule (one writer per slot).
        self.stats_area: memoryview = whole[stats_offset: stats_offset + stats_bytes]
        whole.release()
        weakref.finalize(self, SharedRegion._finalize, self.name if creator else None)

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(cls, size: int, *, granule: int = DEFAULT_GRANULE, prefix: str | None = None,
               sweep_dead: bool = True, stats_bytes: int = 0) -> SharedRegion:
        """Create a new region with ``size`` usable bytes (the header comes on top).

        ``granule`` is the resolution of the generation table: allocators on this
        region need ``min_block >= granule``. The name is
        ``<prefix><creator pid>-<random>``; ``prefix`` defaults to
        ``$SHMFLOW_SHM_PREFIX`` or ``shmflow-``. With ``sweep_dead`` (default),
        blocks of dead creators are removed first (see :func:`sweep`). ``stats_bytes``:
        the size of the stats area in the header (``stats_area``), zeroed.

        Raises:
            InvalidSizeError: size or granule not positive, granule not a power of two.
            OutOfMemoryError: /dev/shm has less free space than the block needs.
        """
        if not isinstance(size, int) or isinstance(size, bool):
            msg = f"size must be an int; got {type(size).__name__}"
            raise TypeError(msg)
        if size <= 0:
            msg = f"region size must be > 0 bytes; got {size}"
            raise InvalidSizeError(msg)
        if granule < 8 or granule & (granule - 1):
            msg = f"granule must be a power of two >= 8; got {granule}"
            raise InvalidSizeError(msg)
        prefix = default_prefix() if prefix is None else prefix
        if not prefix.startswith(DEFAULT_PREFIX) or not _NAME_RE.match(prefix):
            msg = f"prefix must start with {DEFAULT_PREFIX!r} and use [A-Za-z0-9._-]; got {prefix!r}"
            raise RegionError(msg)
        if sweep_dead:
            sweep()
        if stats_bytes < 0 or stats_bytes % 8:
            msg = f"stats_bytes must be a multiple of 8 >= 0; got {stats_bytes}"
            raise InvalidSizeError(msg)
        stats_offset, header_bytes = _layout(size, granule, stats_bytes)
        total = header_bytes + size
        free = shm_free_bytes()
        if total > free:
            msg = (f"cannot create a shared region of {format_bytes(total)} ({format_bytes(size)} usable): "
                   f"{SHM_DIR} has {format_bytes(free)} free (containers often give 64 MB); "
                   f"lower memory.region.size or enlarge {SHM_DIR}")
            raise OutOfMemoryError(msg)
        pid = os.getpid()
        while True:
            name = f"{prefix}{pid}-{secrets.token_hex(4)}"
            try:
                name, mapping = _Untracked.open(name, create=True, size=total)
            except FileExistsError:
                continue
            break
        _CLEANUP.add(name)
        try:
            ticks = _process_start_ticks(pid) or 0
            _HEADER.pack_into(mapping, 0, MAGIC, VERSION, header_bytes, size, granule, pid, ticks,
                              stats_offset, stats_bytes)
            return cls(name, mapping, creator=True)
        except BaseException:
            _unlink_name(name)
            _CLEANUP.discard(name)
            mapping.close()
            raise

    @classmethod
    def attach(cls, name: str) -> SharedRegion:
        """Map an existing region by name. The caller never unlinks it.

        Raises:
            RegionError: no such block, or it is not a shmflow region.
        """
        name = name.lstrip("/")
        try:
            name, mapping = _Untracked.open(name, create=False)
        except FileNotFoundError:
            msg = f"no shared region named {name!r} in {SHM_DIR}; was its creator stopped?"
            raise RegionError(msg) from None
        try:
            return cls(name, mapping, creator=False)
        except BaseException:
            mapping.close()
            raise

    def open_fd(self) -> int:
        """A new file descriptor of the block (the creator's, while its name exists), for a process started
        later to map it by (:meth:`attach_fd`) after the name is gone. The caller closes it.

        Raises:
            RegionError: the name was unlinked already.
        """
        try:
            return os.open(os.path.join(SHM_DIR, self.name), os.O_RDWR)
        except OSError as exc:
            msg = f"cannot open shared region {self.name!r} by name: {exc}"
            raise RegionError(msg) from exc

    @classmethod
    def attach_fd(cls, fd: int, name: str) -> SharedRegion:
        """Map the region behind ``fd`` (inherited from its creator, see :meth:`open_fd`); closes ``fd``.

        Raises:
            RegionError: ``fd`` is not a shmflow region.
        """
        try:
            size = os.fstat(fd).st_size
            mapping = mmap.mmap(fd, size)
        except OSError as exc:
            msg = f"cannot map shared region {name!r} from file descriptor {fd}: {exc}"
            raise RegionError(msg) from exc
        finally:
            os.close(fd)
        try:
            return cls(name.lstrip("/"), mapping, creator=False)
        except BaseException:
            mapping.close()
            raise

    # ----------------------------------------------------------------- segments
    @property
    def is_creator(self) -> bool:
        return self._creator

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def generation(self, offset: int) -> int:
        """The current generation of the block starting at usable ``offset``."""
        return self._generations[offset // self.granule]

    @property
    def generation_table(self) -> memoryview:
        """The generation table itself (uint32 per granule), for compiled code that checks a block's
        generation on every access (runtime.network.ring). Read-only by convention: only allocators bump it."""
        self._check_open()
        return self._generations

    def bump_generation(self, offset: int) -> int:
        """Advance the generation of the block at ``offset`` (called by its allocator on free)."""
        i = offset // self.granule
        g = (self._generations[i] + 1) & 0xFFFFFFFF
        self._generations[i] = g
        return g

    def segment(self, handle: SegmentHandleLike, *, readonly: bool = False) -> MemorySegment:
        """A view of the bytes a handle names, checked against the generation table.

        Ownership: the view borrows the bytes; whoever allocated them still owns
        them and may free them, after which every access through this view
        raises :class:`SegmentFreedError`.

        Raises:
            InvalidHandleError: malformed, out of the region, or stale.
        """
        self._check_open()
        try:
            offset, size, generation = (int(x) for x in handle)
        except (TypeError, ValueError):
            msg = f"a segment handle is (offset, size, generation); got {handle!r}"
            raise InvalidHandleError(msg) from None
        if offset < 0 or size <= 0 or offset + size > self.size or offset % self.granule:
            msg = (f"handle (offset={offset}, size={size}) does not lie in region {self.name!r} "
                   f"of {self.size} bytes on a {self.granule}-byte granule")
            raise InvalidHandleError(msg)
        current = self.generation(offset)
        if current != generation:
            msg = (f"stale handle for offset {offset}: generation {generation}, region has {current}; "
                   f"the block was freed since the handle was taken")
            raise InvalidHandleError(msg)
        return MemorySegment(self, offset, size, generation, readonly=readonly, checked=True)

    # ----------------------------------------------------------------- lifetime
    def creator_alive(self) -> bool:
        """True while the process that created this region runs (pid, not a zombie, same start time)."""
        return process_alive(self.creator_pid, self.creator_start_ticks)

    def unlink_if_orphaned(self) -> bool:
        """Remove this region's name if its creator is dead, as :func:`sweep` would; True if this call did.

        Process: any that attached (a worker whose coordinator was SIGKILLed): the creator can no longer.
        """
        return not self.creator_alive() and _unlink_name(self.name)

    def unlink(self) -> None:
        """Remove the name from /dev/shm (creator only). Mappings stay valid until closed."""
        if not self._creator:
            msg = f"only the creator (pid {self.creator_pid}) unlinks region {self.name!r}"
            raise RegionError(msg)
        if not self._unlinked:
            _unlink_name(self.name)
            _CLEANUP.discard(self.name)
            self._unlinked = True

    def close(self) -> None:
        """Unmap (and, for the creator, unlink). Idempotent.

        Views still held by user code (numpy arrays from ``as_array``) keep the
        mapping alive until they are dropped; the name is gone at once.
        """
        if self._mmap is None:
            return
        if self._creator:
            self.unlink()
        mapping, self._mmap = self._mmap, None
        self.array = None  # type: ignore[assignment]  # drops the numpy export; closed regions are never read
        for view in (self._generations, self.stats_area, self.buf):
            try:
                view.release()
            except BufferError:
                pass  # still exported to a numpy view; released with it.
        try:
            mapping.close()
        except BufferError:
            pass  # views held by user code pin the mapping; it is unmapped when the last goes.

    @staticmethod
    def _finalize(name: str | None) -> None:
        if name is not None:
            _unlink_name(name)
            _CLEANUP.discard(name)

    def _check_open(self) -> None:
        if self._mmap is None:
            msg = f"region {self.name!r} is closed"
            raise RegionError(msg)

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._mmap is None else ("creator" if self._creator else "attached")
        return f"<SharedRegion {self.name!r} {format_bytes(self.size)} {state}>"


# --------------------------------------------------------------------- the sweep
def _region_names(prefix: str) -> Iterator[str]:
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.startswith(prefix):
            yield entry


def creator_of(name: str) -> tuple[int | None, int | None]:
    """(pid, start ticks) of the process that created block ``name``, from its header.

    Falls back to the pid embedded in the name (``<prefix><pid>-<random>``)
    when the header cannot be read (a creator killed mid-create).
    """
    path = os.path.join(SHM_DIR, name)
    try:
        with open(path, "rb") as f:
            raw = f.read(_HEADER.size)
    except OSError:
        raw = b""
    if len(raw) == _HEADER.size:
        magic, _, _, _, _, pid, ticks, _, _ = _HEADER.unpack(raw)
        if magic == MAGIC:
            return pid, ticks or None
    m = re.search(r"(\d+)-[0-9a-f]+$", name)
    return (int(m.group(1)), None) if m else (None, None)


def is_orphaned(name: str) -> bool:
    """True if block ``name``'s creator is dead: gone, a zombie, or its pid reused (by start time, where recorded)."""
    pid, ticks = creator_of(name)
    if pid is None:
        return False  # not ours to judge
    return not process_alive(pid, ticks)


def sweep(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove ``prefix*`` blocks in /dev/shm whose creating process is dead. Returns their names.

    A block's owner is recognised by the creator pid and the kernel start time
    of that pid, both written into the block's header at creation; a pid that
    is gone, or now belongs to a process started at another time, marks the
    block as orphaned. Blocks of live creators are never touched.
    """
    removed = []
    for name in _region_names(prefix):
        if is_orphaned(name) and _unlink_name(name):
            removed.append(name)
    return removed


def list_regions(prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """The ``prefix*`` blocks in /dev/shm with their creator and whether it is alive."""
    out = []
    for name in sorted(_region_names(prefix)):
        pid, _ = creator_of(name)
        try:
            size = os.stat(os.path.join(SHM_DIR, name)).st_size
        except OSError:
            continue
        out.append({"name": name, "bytes": size, "creator_pid": pid, "orphaned": is_orphaned(name)})
    return out


__all__ = ["SharedRegion", "sweep", "list_regions", "is_orphaned", "creator_of", "process_alive", "shm_free_bytes",
           "default_prefix"]
