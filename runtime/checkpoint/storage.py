"""Checkpoint storage: where a job's checkpoints live on disk, written so that a torn or corrupt one is never used.

Imports: runtime.errors (stdlib and msgpack otherwise). Never zmq, cloudpickle, runtime.execution or
runtime.cluster.

Layout (Flink's, adapted)::

    <root>/                     the checkpoint directory (``state.checkpoints.dir``; default_checkpoints_dir())
      <job id>/
        chk-<n>/                one per checkpoint; n is the checkpoint id, increasing
          <state file> ...      one per subtask snapshot, written by the worker that ran the subtask
          _metadata             written last, by the coordinator: the checkpoint is complete once it exists

The steps of one checkpoint: the coordinator calls :meth:`CheckpointStorage.checkpoint_dir` and tells the
workers the directory; each worker writes its snapshot with :func:`write_state_file` and sends the
:class:`StateHandle` it returns in its acknowledgement; once every subtask has acknowledged, the coordinator
calls :meth:`CheckpointStorage.complete`, or :meth:`CheckpointStorage.abort` if the checkpoint failed.

Durability. Every file is written under a temporary name in its directory (``.<name>.<pid>.<random>.tmp``),
fsynced, and renamed over its final name (``os.replace``); a write that fails removes its temporary file.
``complete`` fsyncs the checkpoint's directory (the state files' names are then durable), writes ``_metadata``
the same way, and fsyncs the checkpoint's directory and the job's directory after the rename. A crash at any
point leaves either a complete checkpoint, or a ``chk-<n>`` without ``_metadata`` (with perhaps a temporary
file in it): that one is never used, and the next :class:`CheckpointStorage` of the job removes it.

Integrity. ``_metadata`` is a fixed header (magic, format version, body length, SHA-256 of the body) followed
by a msgpack body; each :class:`StateHandle` records its file's size and CRC-32 (:func:`state_checksum`: a
state file is rewritten every interval, and SHA-256 of W5's 80 MB per worker took a tenth of its time; a
CRC detects truncation and corruption as well, which is what it is for). :func:`load_checkpoint`
checks both, :meth:`CompletedCheckpoint.read_state` checks a file again as it reads it. Any mismatch raises
:class:`~runtime.errors.CheckpointError` naming the file and what is wrong.

Retention. ``complete`` keeps the ``retained`` newest complete checkpoints (Flink's
``state.checkpoints.num-retained``), and the older ones their state builds on (an incremental snapshot
reads its parents' files: ``extra[DEPENDS_ON_KEY]``), and removes the others, with every incomplete
checkpoint older than the new one (it can no longer complete: it is subsumed). When a job finishes, its
retained checkpoints stay on disk, so that a later run can resume from them (Flink, by contrast, keeps
nothing of a finished job unless its checkpoints are externalized); :meth:`CheckpointStorage.discard_all`
removes them for a job whose user does not want them kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import struct
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import msgpack

from runtime.errors import CheckpointError, InvalidArgumentError

_log = logging.getLogger(__name__)

#: The key of a checkpoint's metadata ``extra`` with the oldest checkpoint whose files its state needs
#: (incremental snapshots: retention keeps that one and those after it).
DEPENDS_ON_KEY = "depends_on"
#: The file that makes a checkpoint directory complete; written last.
METADATA_NAME = "_metadata"
#: The first bytes of every ``_metadata`` file.
MAGIC = b"SHMFCHK\x00"
#: The version of the ``_metadata`` layout this module writes and reads.
FORMAT_VERSION = 2
#: ``_metadata``'s header: magic, format version, flags (0), body length, SHA-256 of the body.
_HEADER = struct.Struct(">8sHHQ32s")
#: Written and hashed in pieces of this size: a state file of any size never needs a second copy in memory.
_CHUNK = 1 << 20
_CHK_RE = re.compile(r"^chk-(\d+)$")
#: State file names and job ids: one path component, no leading dot (temporary files and directories being
#: removed start with one) and no leading underscore (``_metadata``).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_TMP_SUFFIX = ".tmp"
#: A directory being removed is first renamed to this prefix (atomically), then deleted.
_DISCARD_PREFIX = ".discard-"

PathLike: TypeAlias = "str | os.PathLike[str]"
Buffer: TypeAlias = "bytes | bytearray | memoryview"


def default_checkpoints_dir() -> str:
    """The checkpoint directory when ``state.checkpoints.dir`` is not set: under the user's data directory.

    ``$XDG_DATA_HOME/shmflow/checkpoints``, or ``~/.local/share/shmflow/checkpoints`` when ``XDG_DATA_HOME``
    is unset or not absolute (the XDG base directory specification ignores a relative one).
    """
    base = os.environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "shmflow", "checkpoints")


# --------------------------------------------------------------------------------------------------- handles


@dataclass(frozen=True)
class StateHandle:
    """One state file of a checkpoint: its name in the checkpoint's directory, its size and its CRC-32.

    Ownership: a plain value. The worker that wrote the file sends it to the coordinator in its
    acknowledgement (as :meth:`to_wire`); the coordinator records it in the checkpoint's metadata. The file
    itself belongs to its checkpoint directory, and goes when :class:`CheckpointStorage` removes that.
    """

    name: str
    nbytes: int
    checksum: str  # state_checksum() of the file: CRC-32, 8 hex digits

    def to_wire(self) -> list[Any]:
        """msgpack-able: ``[name, nbytes, checksum]``."""
        return [self.name, self.nbytes, self.checksum]

    @classmethod
    def from_wire(cls, data: Any, *, source: str = "peer") -> StateHandle:
        """Inverse of :meth:`to_wire`.

        Raises:
            CheckpointError: ``data`` is not of that shape, or its name is not a plain file name (a path
                could reach outside the checkpoint); the message names ``source``.
        """
        ok = (isinstance(data, list) and len(data) == 3 and isinstance(data[0], str)
              and isinstance(data[1], int) and not isinstance(data[1], bool) and data[1] >= 0
              and isinstance(data[2], str) and re.fullmatch(r"[0-9a-f]{8}", data[2]) is not None)
        if not ok:
            msg = f"{source}: a state handle must be [file name, size >= 0, CRC-32 hex]; got {data!r:.200}"
            raise CheckpointError(msg)
        if _NAME_RE.match(data[0]) is None:
            msg = f"{source}: a state file name must be one plain path component; got {data[0]!r:.200}"
            raise CheckpointError(msg)
        return cls(data[0], data[1], data[2])


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str):
        msg = f"{what} must be a str; got {type(name).__name__}"
        raise TypeError(msg)
    if _NAME_RE.match(name) is None:
        msg = (f"{what} must be 1 to 200 characters of letters, digits, '.', '_' and '-', starting with a letter "
               f"or digit; got {name!r}")
        raise InvalidArgumentError(msg)


def _check_checkpoint_id(checkpoint_id: int) -> None:
    if not isinstance(checkpoint_id, int) or isinstance(checkpoint_id, bool):
        msg = f"checkpoint id must be an int; got {type(checkpoint_id).__name__}"
        raise TypeError(msg)
    if checkpoint_id < 0:
        msg = f"checkpoint id must be >= 0; got {checkpoint_id}"
        raise InvalidArgumentError(msg)


# --------------------------------------------------------------------------------------------- durable files


def _fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` (created, renamed, removed entries) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(directory: Path, name: str, data: Buffer) -> tuple[int, str]:
    """Write ``data`` to ``directory/name``: temporary file, fsync, ``os.replace``. Returns (bytes, checksum).

    The temporary file is removed on every failure (interrupts included). The directory is not fsynced:
    the caller does that once for all its files (see :meth:`CheckpointStorage.complete`).

    Raises:
        CheckpointError: the file cannot be created, written or renamed (full disk, directory removed).
    """
    view = memoryview(data).cast("B")
    final = directory / name
    tmp = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
    crc = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        msg = f"cannot create checkpoint file {final}: {exc}"
        raise CheckpointError(msg) from exc
    try:
        try:
            for start in range(0, len(view), _CHUNK):
                piece = view[start:start + _CHUNK]
                crc = zlib.crc32(piece, crc)
                done = 0
                while done < len(piece):
                    done += os.write(fd, piece[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError as exc:
        _unlink_quietly(tmp)
        msg = f"cannot write checkpoint file {final} ({len(view)} bytes): {exc}"
        raise CheckpointError(msg) from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return len(view), _crc_hex(crc)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


def checkpoint_path(job_dir: PathLike, checkpoint_id: int) -> Path:
    """Where checkpoint ``checkpoint_id`` of the job whose directory is ``job_dir`` lives: ``job_dir/chk-<n>``."""
    return Path(job_dir) / f"chk-{checkpoint_id}"


def write_state_file(directory: PathLike, name: str, data: Buffer) -> StateHandle:
    """Write one subtask's snapshot ``data`` to ``directory/name`` durably; returns its handle.

    ``directory`` is a checkpoint's directory (from :meth:`CheckpointStorage.checkpoint_dir`); it must exist
    (it is never created here: a checkpoint aborted meanwhile must not come back). An existing file of that
    name is replaced.

    Ownership: the caller keeps ``data``. The file belongs to the checkpoint directory; the handle goes to
    the coordinator, which records it with :meth:`CheckpointStorage.complete`.
    Process: a worker (the one that ran the subtask); any thread.

    Raises:
        InvalidArgumentError: ``name`` is not one plain path component.
        CheckpointError: the file cannot be written; names it and the OS error. No temporary file remains.
    """
    _check_name(name, "state file name")
    nbytes, checksum = _write_durably(Path(directory), name, data)
    return StateHandle(name, nbytes, checksum)


def _check_state_file(path: Path, handle: StateHandle, *, contents: bool) -> None:
    """Check that ``path`` has ``handle``'s size and (when ``contents``) its checksum, reading it in pieces."""
    try:
        with open(path, "rb") as f:
            found = os.fstat(f.fileno()).st_size
            _check_size(path, handle.nbytes, found)
            if not contents:
                return
            crc = 0
            while piece := f.read(_CHUNK):
                crc = zlib.crc32(piece, crc)
    except OSError as exc:
        raise _unreadable(path, handle, exc) from exc
    _check_digest(path, handle.checksum, _crc_hex(crc), "CRC-32")


def _unreadable(path: Path, handle: StateHandle, exc: OSError) -> CheckpointError:
    """The error for a state file that cannot be read: missing (with its recorded size), or the OS error."""
    if isinstance(exc, FileNotFoundError):
        return CheckpointError(f"checkpoint file {path} is missing; the checkpoint records it with "
                               f"{handle.nbytes} bytes")
    return CheckpointError(f"cannot read checkpoint file {path}: {exc}")


def _check_size(path: Path, expected: int, found: int) -> None:
    if found < expected:
        msg = f"checkpoint file {path} is truncated: expected {expected} bytes, found {found}"
        raise CheckpointError(msg)
    if found > expected:
        msg = f"checkpoint file {path} has the wrong size: expected {expected} bytes, found {found}"
        raise CheckpointError(msg)


def _check_digest(path: Path, expected: str, found: str, algorithm: str = "SHA-256") -> None:
    if found != expected:
        msg = (f"checkpoint file {path} fails its checksum: {algorithm} {found[:16]}..., recorded "
               f"{expected[:16]}...; the file is corrupt")
        raise CheckpointError(msg)


def _crc_hex(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"


def state_checksum(data: Buffer) -> str:
    """The checksum a :class:`StateHandle` records of a state file's bytes: CRC-32 (zlib's), 8 hex digits."""
    return _crc_hex(zlib.crc32(data))


# ------------------------------------------------------------------------------------------------ metadata


@dataclass(frozen=True)
class CheckpointMetadata:
    """What ``_metadata`` records of one complete checkpoint.

    Ownership: a plain value; the coordinator builds it from the acknowledgements and hands it to
    :meth:`CheckpointStorage.complete`.
    """

    checkpoint_id: int
    job_id: str
    job_name: str
    #: Wall-clock seconds since the epoch when the checkpoint was triggered.
    timestamp: float
    #: Seconds from the trigger to the last acknowledgement.
    duration: float
    #: Subtask key (the operator's uid and the subtask's index, as the coordinator spells them) -> its state file.
    subtasks: dict[str, StateHandle] = field(default_factory=dict)
    #: Operator uid -> a fingerprint of that operator (its kind, parallelism, state layout): restoring onto a
    #: graph whose fingerprint differs says which operator does not match (:meth:`graph_mismatches`).
    graph_fingerprint: dict[str, str] = field(default_factory=dict)
    #: Anything else msgpack can encode: source positions, watermarks, counters.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """msgpack-able; inverse of :meth:`from_wire`."""
        return {
            "checkpoint_id": self.checkpoint_id, "job_id": self.job_id, "job_name": self.job_name,
            "timestamp": self.timestamp, "duration": self.duration,
            "subtasks": {key: handle.to_wire() for key, handle in self.subtasks.items()},
            "graph_fingerprint": dict(self.graph_fingerprint), "extra": self.extra,
        }

    @classmethod
    def from_wire(cls, data: Any, *, source: str) -> CheckpointMetadata:
        """Inverse of :meth:`to_wire`.

        Raises:
            CheckpointError: a field is missing or of the wrong type; the message names ``source`` and it.
        """
        if not isinstance(data, dict):
            msg = f"{source}: the metadata body must be a map; got {type(data).__name__}"
            raise CheckpointError(msg)
        types: dict[str, type | tuple[type, ...]] = {
            "checkpoint_id": int, "job_id": str, "job_name": str, "timestamp": (int, float),
            "duration": (int, float), "subtasks": dict, "graph_fingerprint": dict, "extra": dict}
        for key, kind in types.items():
            if key not in data:
                msg = f"{source}: the metadata has no field {key!r}"
                raise CheckpointError(msg)
            if not isinstance(data[key], kind) or isinstance(data[key], bool):
                msg = f"{source}: metadata field {key!r} has the wrong type; got {type(data[key]).__name__}"
                raise CheckpointError(msg)
        subtasks = {}
        for key, wire in data["subtasks"].items():
            if not isinstance(key, str):
                msg = f"{source}: subtask keys must be str; got {key!r:.100}"
                raise CheckpointError(msg)
            subtasks[key] = StateHandle.from_wire(wire, source=f"{source}: subtask {key!r}")
        fingerprint = data["graph_fingerprint"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in fingerprint.items()):
            msg = f"{source}: graph_fingerprint must map operator uids (str) to fingerprints (str)"
            raise CheckpointError(msg)
        return cls(data["checkpoint_id"], data["job_id"], data["job_name"], float(data["timestamp"]),
                   float(data["duration"]), subtasks, fingerprint, data["extra"])

    def graph_mismatches(self, graph_fingerprint: Mapping[str, str]) -> list[str]:
        """How a job graph (its operators' uids -> fingerprints) differs from this checkpoint's; [] if not at all.

        One sentence per operator, sorted by uid: missing from the graph, new in the graph, or changed.
        """
        problems = []
        for uid in sorted(set(self.graph_fingerprint) | set(graph_fingerprint)):
            ours, theirs = self.graph_fingerprint.get(uid), graph_fingerprint.get(uid)
            if theirs is None:
                problems.append(f"operator {uid!r} has state in checkpoint {self.checkpoint_id} but is not in the job")
            elif ours is None:
                problems.append(f"operator {uid!r} is in the job but not in checkpoint {self.checkpoint_id}")
            elif ours != theirs:
                problems.append(f"operator {uid!r} changed: {ours!r} in checkpoint {self.checkpoint_id}, "
                                f"{theirs!r} in the job")
        return problems


def encode_metadata(metadata: CheckpointMetadata) -> bytes:
    """``_metadata``'s bytes: header (magic, version, body length, SHA-256 of the body), then msgpack.

    Raises:
        CheckpointError: ``extra`` (or another field) holds a value msgpack cannot encode.
    """
    try:
        body: bytes = msgpack.packb(metadata.to_wire(), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        msg = (f"metadata of checkpoint {metadata.checkpoint_id} cannot be encoded: every field (extra too) must "
               f"be msgpack-able; {exc}")
        raise CheckpointError(msg) from exc
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


def decode_metadata(raw: bytes, *, source: Path) -> CheckpointMetadata:
    """Inverse of :func:`encode_metadata`; ``source`` (the file) is named in every error.

    Raises:
        CheckpointError: not a shmflow checkpoint (wrong magic); an unsupported format version; truncated;
            checksum mismatch; a body that is not the metadata.
    """
    if raw[:len(MAGIC)] != MAGIC:
        msg = f"{source} is not a shmflow checkpoint: it must start with {MAGIC!r}; got {raw[:len(MAGIC)]!r}"
        raise CheckpointError(msg)
    if len(raw) >= len(MAGIC) + 2:
        (version,) = struct.unpack_from(">H", raw, len(MAGIC))
        if version != FORMAT_VERSION:
            msg = (f"{source} has unsupported format version {version}; this shmflow reads version "
                   f"{FORMAT_VERSION}")
            raise CheckpointError(msg)
    if len(raw) < _HEADER.size:
        _check_size(source, _HEADER.size, len(raw))
    _, _, _, body_len, recorded = _HEADER.unpack_from(raw)
    _check_size(source, _HEADER.size + body_len, len(raw))
    body = raw[_HEADER.size:]
    _check_digest(source, recorded.hex(), hashlib.sha256(body).hexdigest())
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        msg = f"{source}: the metadata body is not valid msgpack ({exc})"
        raise CheckpointError(msg) from exc
    return CheckpointMetadata.from_wire(data, source=str(source))


# -------------------------------------------------------------------------------------- complete checkpoints


@dataclass(frozen=True)
class CompletedCheckpoint:
    """A complete checkpoint: its directory and its metadata.

    Ownership: a view of a directory that the job's :class:`CheckpointStorage` owns: retention may remove it
    once newer checkpoints complete (then :meth:`read_state` raises CheckpointError, the file missing).
    """

    directory: Path
    metadata: CheckpointMetadata

    @property
    def checkpoint_id(self) -> int:
        return self.metadata.checkpoint_id

    @property
    def job_id(self) -> str:
        return self.metadata.job_id

    def read_state(self, subtask: str) -> bytes:
        """The state file of subtask key ``subtask`` (a key of ``metadata.subtasks``), checked as it is read.

        Raises:
            CheckpointError: the checkpoint has no state for ``subtask`` (the message lists the keys it has),
                or the file is missing, truncated or corrupt (names the file).
        """
        handle = self.metadata.subtasks.get(subtask)
        if handle is None:
            known = ", ".join(sorted(self.metadata.subtasks)[:10]) or "none"
            msg = f"checkpoint {self.checkpoint_id} in {self.directory} has no state for subtask {subtask!r}; " \
                  f"it has: {known}"
            raise CheckpointError(msg)
        path = self.directory / handle.name
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise _unreadable(path, handle, exc) from exc
        _check_size(path, handle.nbytes, len(data))
        _check_digest(path, handle.checksum, state_checksum(data), "CRC-32")
        return data


def load_checkpoint(path: PathLike, *, verify_state: bool = True) -> CompletedCheckpoint:
    """The complete checkpoint at ``path``: a ``chk-<n>`` directory or its ``_metadata`` file.

    Checks ``_metadata`` (magic, version, size, checksum, fields) and that every state file it names exists
    with the recorded size and, when ``verify_state`` (the default), the recorded checksum: this reads every
    state file once. ``verify_state=False`` checks sizes only (for listings).

    Raises:
        CheckpointError: the directory or ``_metadata`` is missing (a checkpoint that never completed), or a
            file is truncated, corrupt, of another format or version; names the file.
    """
    given = Path(path)
    directory = given.parent if given.name == METADATA_NAME else given
    meta_path = directory / METADATA_NAME
    try:
        raw = meta_path.read_bytes()
    except FileNotFoundError as exc:
        if not directory.is_dir():
            msg = f"checkpoint directory {directory} does not exist"
        else:
            msg = f"{directory} is not a complete checkpoint: it has no {METADATA_NAME} (it never completed)"
        raise CheckpointError(msg) from exc
    except OSError as exc:
        msg = f"cannot read checkpoint file {meta_path}: {exc}"
        raise CheckpointError(msg) from exc
    metadata = decode_metadata(raw, source=meta_path)
    match = _CHK_RE.match(directory.name)
    if match is not None and int(match.group(1)) != metadata.checkpoint_id:
        msg = f"{meta_path} records checkpoint {metadata.checkpoint_id}; expected {match.group(1)} (its directory)"
        raise CheckpointError(msg)
    for handle in metadata.subtasks.values():
        _check_state_file(directory / handle.name, handle, contents=verify_state)
    return CompletedCheckpoint(directory, metadata)


# ------------------------------------------------------------------------------------------ one job's storage


class CheckpointStorage:
    """The checkpoints of one job, in ``root/<job_id>/chk-<n>/``.

    Ownership: the job's coordinator owns the job directory, through exactly one CheckpointStorage at a time:
    it creates checkpoint directories, completes, aborts and removes them. Workers only write state files
    into a directory :meth:`checkpoint_dir` returned (:func:`write_state_file`). Creating a storage removes
    what a crash left behind (:meth:`cleanup`), so create it when no checkpoint of the job is in flight.
    Process: coordinator only. Not thread-safe.
    """

    def __init__(self, root: PathLike, job_id: str, *, retained: int = 1) -> None:
        _check_name(job_id, "job id")
        if _CHK_RE.match(job_id):
            msg = f"job id must not have the form of a checkpoint directory (chk-<n>); got {job_id!r}"
            raise InvalidArgumentError(msg)
        if not isinstance(retained, int) or isinstance(retained, bool) or retained < 1:
            msg = f"CheckpointStorage(retained=...) must be an int >= 1; got {retained!r}"
            raise InvalidArgumentError(msg)
        self.root = Path(root)
        self.job_id = job_id
        self.retained = retained
        self.job_dir = self.root / job_id
        try:
            self.job_dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.root)
        except OSError as exc:
            msg = f"cannot create the checkpoint directory {self.job_dir}: {exc}; set state.checkpoints.dir"
            raise CheckpointError(msg) from exc
        self.cleanup()

    # -- scanning

    def _checkpoint_dirs(self) -> dict[int, Path]:
        """Checkpoint id -> ``chk-<n>`` directory, complete or not."""
        found = {}
        try:
            entries = list(os.scandir(self.job_dir))
        except FileNotFoundError:
            return {}
        for entry in entries:
            match = _CHK_RE.match(entry.name)
            if match is not None and entry.is_dir(follow_symlinks=False):
                found[int(match.group(1))] = Path(entry.path)
        return found

    def completed_ids(self) -> list[int]:
        """Ids of the checkpoints whose ``_metadata`` exists (not verified), ascending."""
        return sorted(n for n, d in self._checkpoint_dirs().items() if (d / METADATA_NAME).exists())

    def _path(self, checkpoint_id: int) -> Path:
        return checkpoint_path(self.job_dir, checkpoint_id)

    # -- one checkpoint's steps

    def checkpoint_dir(self, checkpoint_id: int) -> Path:
        """The directory of checkpoint ``checkpoint_id``, created if need be: the workers write state files there.

        Raises:
            CheckpointError: ``checkpoint_id`` is not above every complete checkpoint's (ids increase), or the
                directory cannot be created.
        """
        _check_checkpoint_id(checkpoint_id)
        completed = self.completed_ids()
        if completed and checkpoint_id <= completed[-1]:
            msg = (f"checkpoint {checkpoint_id} of job {self.job_id} cannot begin: ids must increase, and "
                   f"checkpoint {completed[-1]} is complete; use {completed[-1] + 1} or above")
            raise CheckpointError(msg)
        path = self._path(checkpoint_id)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"cannot create checkpoint directory {path}: {exc}"
            raise CheckpointError(msg) from exc
        return path

    def complete(self, metadata: CheckpointMetadata) -> CompletedCheckpoint:
        """Make checkpoint ``metadata.checkpoint_id`` complete: write its ``_metadata``, then apply retention.

        Checks first that each state file in ``metadata.subtasks`` exists with its recorded size (its contents
        were checksummed by the worker that wrote it). Then: fsync the directory, write ``_metadata`` (temporary
        file, fsync, ``os.replace``), fsync the directory and the job directory. Then remove complete
        checkpoints beyond the ``retained`` newest and incomplete ones older than this one.

        Raises:
            InvalidArgumentError: ``metadata.job_id`` is not this storage's job.
            CheckpointError: the directory is gone (aborted, or subsumed by a newer complete checkpoint), the
                checkpoint is already complete or not newer than the newest complete one, a state file is
                missing or of the wrong size, or ``_metadata`` cannot be written. Nothing is then complete.
        """
        if metadata.job_id != self.job_id:
            msg = f"metadata of job {metadata.job_id!r} cannot complete a checkpoint of job {self.job_id!r}"
            raise InvalidArgumentError(msg)
        checkpoint_id = metadata.checkpoint_id
        _check_checkpoint_id(checkpoint_id)
        directory = self._path(checkpoint_id)
        completed = self.completed_ids()
        if checkpoint_id in completed:
            msg = f"checkpoint {checkpoint_id} of job {self.job_id} is already complete ({directory})"
            raise CheckpointError(msg)
        if completed and checkpoint_id < completed[-1]:
            msg = (f"checkpoint {checkpoint_id} of job {self.job_id} cannot complete: checkpoint {completed[-1]} is "
                   "newer and complete (ids must increase)")
            raise CheckpointError(msg)
        if not directory.is_dir():
            msg = (f"checkpoint {checkpoint_id} of job {self.job_id} cannot complete: {directory} does not exist "
                   "(aborted?); begin a checkpoint with checkpoint_dir()")
            raise CheckpointError(msg)
        for handle in metadata.subtasks.values():
            _check_state_file(directory / handle.name, handle, contents=False)
        blob = encode_metadata(metadata)
        try:
            _fsync_dir(directory)
        except OSError as exc:
            msg = f"cannot make checkpoint {directory} durable: {exc}"
            raise CheckpointError(msg) from exc
        _write_durably(directory, METADATA_NAME, blob)
        try:
            _fsync_dir(directory)
            _fsync_dir(self.job_dir)
        except OSError as exc:
            _unlink_quietly(directory / METADATA_NAME)  # not known durable: not complete
            msg = f"cannot make checkpoint {directory} durable: {exc}"
            raise CheckpointError(msg) from exc
        self._apply_retention(older_incomplete_than=checkpoint_id)
        return CompletedCheckpoint(directory, metadata)

    def abort(self, checkpoint_id: int) -> None:
        """Remove incomplete checkpoint ``checkpoint_id`` with its state files; nothing if it does not exist.

        A worker still writing into it fails with CheckpointError (its directory is gone) and leaves nothing.

        Raises:
            CheckpointError: the checkpoint is complete (retention removes those).
        """
        _check_checkpoint_id(checkpoint_id)
        directory = self._path(checkpoint_id)
        if (directory / METADATA_NAME).exists():
            msg = f"checkpoint {checkpoint_id} of job {self.job_id} is complete and cannot be aborted ({directory})"
            raise CheckpointError(msg)
        self._remove(directory)

    # -- reading

    def latest(self) -> CompletedCheckpoint | None:
        """The newest complete checkpoint that passes :func:`load_checkpoint` (all files checked), or None.

        A complete checkpoint that fails its checks is skipped (with a warning logged), not removed: an older
        one is used instead.
        """
        dirs = self._checkpoint_dirs()
        for checkpoint_id in reversed(self.completed_ids()):
            try:
                return load_checkpoint(dirs[checkpoint_id])
            except CheckpointError as exc:
                _log.warning("skipping checkpoint %d of job %s: %s", checkpoint_id, self.job_id, exc)
        return None

    # -- removing

    def cleanup(self) -> list[Path]:
        """Remove what a crash left behind; returns the paths removed.

        Incomplete checkpoints (no ``_metadata``), temporary files in complete ones, directories half removed,
        and complete checkpoints beyond the ``retained`` newest. Call it only while no checkpoint of the job is
        in flight (the constructor does).
        """
        removed = []
        # The job directory's leftovers, and those of a discard_all() (of any job) that did not finish.
        entries = [e for e in os.scandir(self.root) if e.name.startswith(_DISCARD_PREFIX)]
        try:
            entries += list(os.scandir(self.job_dir))
        except FileNotFoundError:
            pass
        for entry in entries:
            if entry.name.startswith(_DISCARD_PREFIX) or _is_temporary(entry.name):
                self._delete(Path(entry.path))
                removed.append(Path(entry.path))
        for directory in self._checkpoint_dirs().values():
            if not (directory / METADATA_NAME).exists():
                self._remove(directory)
                removed.append(directory)
                continue
            for entry in os.scandir(directory):
                if _is_temporary(entry.name):
                    _unlink_quietly(Path(entry.path))
                    removed.append(Path(entry.path))
        removed.extend(self._apply_retention(older_incomplete_than=None))
        return removed

    def discard_all(self) -> None:
        """Remove every checkpoint of the job, with its directory: for a finished job whose checkpoints are not
        to be kept. The storage stays usable (a later :meth:`checkpoint_dir` recreates the directory)."""
        staging = self.root / f"{_DISCARD_PREFIX}{self.job_id}-{secrets.token_hex(4)}"
        try:
            os.rename(self.job_dir, staging)
        except FileNotFoundError:
            return
        self._delete(staging)

    def _apply_retention(self, *, older_incomplete_than: int | None) -> list[Path]:
        """Remove complete checkpoints beyond the ``retained`` newest, and incomplete ones older than
        ``older_incomplete_than`` (when given)."""
        dirs = self._checkpoint_dirs()
        completed = sorted(n for n, d in dirs.items() if (d / METADATA_NAME).exists())
        kept = completed[-self.retained:]
        needed = min((self._depends_on(n, dirs[n]) for n in kept), default=0)
        doomed = [n for n in completed[:-self.retained] if n < needed]  # incremental ones need their parents
        if older_incomplete_than is not None:
            doomed += [n for n in dirs if n < older_incomplete_than and n not in completed]
        for n in doomed:
            self._remove(dirs[n])
        return [dirs[n] for n in sorted(doomed)]

    @staticmethod
    def _depends_on(checkpoint_id: int, directory: Path) -> int:
        """The oldest checkpoint that ``checkpoint_id``'s state needs (``extra[DEPENDS_ON_KEY]``: incremental
        snapshots build on earlier ones' files); itself if it records none or cannot be read."""
        try:
            meta = decode_metadata((directory / METADATA_NAME).read_bytes(), source=directory / METADATA_NAME)
        except (OSError, CheckpointError):
            return checkpoint_id
        depends = meta.extra.get(DEPENDS_ON_KEY, checkpoint_id)
        return depends if isinstance(depends, int) and 0 < depends <= checkpoint_id else checkpoint_id

    def _remove(self, directory: Path) -> None:
        """Remove a checkpoint directory: rename it out of the ``chk-*`` namespace first (atomic: it is never
        seen half removed), then delete it. What a concurrent writer adds meanwhile goes at :meth:`cleanup`."""
        staging = self.job_dir / f"{_DISCARD_PREFIX}{directory.name}-{secrets.token_hex(4)}"
        try:
            os.rename(directory, staging)
        except FileNotFoundError:
            return
        self._delete(staging)

    @staticmethod
    def _delete(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            _unlink_quietly(path)


# ----------------------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint directory as a listing shows it (:func:`list_checkpoints`)."""

    job_id: str
    checkpoint_id: int
    #: The checkpoint's timestamp (wall clock, seconds since the epoch) if its metadata reads, else the
    #: directory's modification time.
    timestamp: float
    #: Bytes of all files in the directory.
    nbytes: int
    path: Path
    #: Whether ``_metadata`` exists.
    complete: bool
    #: Why a complete checkpoint is unusable (its metadata or a state file's size fails the checks), else None.
    problem: str | None = None


def list_checkpoints(path: PathLike) -> list[CheckpointInfo]:
    """The checkpoints under ``path``: a checkpoint directory root, or one job's directory in it.

    Sorted by job id, then checkpoint id. State files are checked for size only, not read.

    Raises:
        CheckpointError: ``path`` is not a directory.
    """
    base = Path(path)
    if not base.is_dir():
        msg = f"checkpoint directory {base} does not exist; set state.checkpoints.dir or pass another directory"
        raise CheckpointError(msg)
    children = [e for e in os.scandir(base) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    if any(_CHK_RE.match(e.name) for e in children):
        job_dirs = [base]
    else:
        job_dirs = sorted(Path(e.path) for e in children)
    infos = []
    for job_dir in job_dirs:
        for entry in os.scandir(job_dir):
            match = _CHK_RE.match(entry.name)
            if match is None or not entry.is_dir(follow_symlinks=False):
                continue
            infos.append(_info(job_dir.name, int(match.group(1)), Path(entry.path)))
    return sorted(infos, key=lambda i: (i.job_id, i.checkpoint_id))


def _info(job_id: str, checkpoint_id: int, directory: Path) -> CheckpointInfo:
    nbytes = 0
    for entry in os.scandir(directory):
        try:
            if entry.is_file(follow_symlinks=False):
                nbytes += entry.stat(follow_symlinks=False).st_size
        except OSError:
            pass  # removed meanwhile
    try:
        timestamp = directory.stat().st_mtime
    except OSError:
        timestamp = time.time()
    complete = (directory / METADATA_NAME).exists()
    problem = None
    if complete:
        try:
            timestamp = load_checkpoint(directory, verify_state=False).metadata.timestamp
        except CheckpointError as exc:
            problem = str(exc)
    return CheckpointInfo(job_id, checkpoint_id, timestamp, nbytes, directory, complete, problem)


__all__ = [
    "FORMAT_VERSION", "MAGIC", "METADATA_NAME", "CheckpointInfo", "CheckpointMetadata", "CheckpointStorage",
    "CompletedCheckpoint", "StateHandle", "checkpoint_path", "decode_metadata", "default_checkpoints_dir",
    "encode_metadata",
    "list_checkpoints", "load_checkpoint", "write_state_file",
]
