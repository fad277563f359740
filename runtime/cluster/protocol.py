"""How the processes talk: every control message, typed, versioned, signed with the cluster secret.

Imports: runtime.errors (stdlib, msgpack, pyzmq otherwise).

Every control-plane message between client, coordinator and workers is one
frozen dataclass below, with a type tag (``TYPE``). It travels as a msgpack
map ``{"v": PROTOCOL_VERSION, "t": TYPE, <fields>}`` in two frames,
``[HMAC-SHA256(secret, payload), payload]``. :func:`open_message` verifies the
MAC (constant time) before it even decodes the payload, then refuses an
unknown version or type, a missing or unexpected field, and a field of the
wrong type with :class:`ProtocolError` (``Welcome: expected `int`, got `str`
at `$.worker```). Pickled job graphs travel as bytes inside verified
messages only, and are unpickled after verification.

Who sends what (a job's life, see :class:`~runtime.cluster.coordinator.Coordinator`):

=================  ======================  ==========================================
message            direction               meaning
=================  ======================  ==========================================
Register           worker -> coordinator   a worker process is up (``worker=-1``: number me)
Welcome            coordinator -> worker   its id, the region's name and the arena granted to it
Attached           worker -> coordinator   the region is mapped and the arena carved
Heartbeat          worker -> coordinator   alive; progress of the running job; arena and state when changed
Ack                coordinator -> worker   the coordinator is alive (answer to a heartbeat)
Shutdown           coordinator -> worker   exit (cluster closing, or no arena left)
Deploy             coordinator -> worker   build the subtasks of a job (pickled graph, config)
Deployed           worker -> coordinator   subtasks built; the endpoints of their input gates
Start              coordinator -> worker   every gate's endpoint: connect and run
Cancel             coordinator -> worker   stop the job (another worker failed)
Collect            worker -> coordinator   a batch of a ``collect()`` sink's records
TriggerCheckpoint  coordinator -> worker   take checkpoint n: sources snapshot and inject barrier n
AckCheckpoint      worker -> coordinator   a subtask snapshotted checkpoint n; where its state file is
CheckpointDone     coordinator -> worker   checkpoint n is complete (commit what it covers)
Finished           worker -> coordinator   the job ended on this worker; its metrics
Failed             worker -> coordinator   an operator (or the runtime) raised; its traceback
Submit             client -> coordinator   run this pickled job graph
Running            coordinator -> client   the job is still running (keeps the client patient)
Results            coordinator -> client   a relayed ``Collect`` batch
JobSucceeded       coordinator -> client   the job ended; metrics per worker
JobError           coordinator -> client   the job failed or was refused; why
=================  ======================  ==========================================

The secret is 32 random bytes, kept in a file readable by its owner only
(:func:`load_or_create_secret`) or handed to embedded workers on their stdin.

Transport security (:func:`secure_server` / :func:`secure_client`): on ``tcp://``
endpoints every control socket speaks ZeroMQ's CURVE, with key pairs derived
from the secret (:func:`curve_keys`), so a peer without the secret cannot even
complete the handshake: none of its bytes becomes a message, and nothing it
sends is buffered beyond the handshake. Every control socket also refuses any
message part larger than ``cluster.max-message-size`` (``ZMQ_MAXMSGSIZE``: the
peer is disconnected). Local ``ipc://`` endpoints (the embedded cluster's
abstract sockets) get the size bound only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import msgpack
import zmq
from zmq.utils import z85

from runtime.errors import AuthenticationError, ProtocolError

log = logging.getLogger("shmflow.control")

#: Bumped on any change of a message's fields; a peer speaking another version is refused.
PROTOCOL_VERSION = 5
SECRET_BYTES = 32
#: cluster.max-message-size's default: a job graph with a from_collection of a few million small records.
DEFAULT_MAX_MESSAGE_SIZE = 256 << 20
DEFAULT_SECRET_FILE = Path.home() / ".shmflow" / "cluster.secret"


# ------------------------------------------------------------------ messages
@dataclass(frozen=True)
class Message:
    """Base of every control message. ``TYPE`` is its tag on the wire."""

    TYPE: ClassVar[str] = ""


@dataclass(frozen=True)
class Register(Message):
    TYPE: ClassVar[str] = "register"
    worker: int  # -1: a standing worker, numbered by the coordinator
    pid: int
    start_ticks: int = 0  # when its process started (/proc/<pid>/stat); 0: unknown. Tells a local worker.


@dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    worker: int
    region: str
    arena: list[int]  # the arena's segment handle: [offset, size, generation]
    min_block: int
    segment_size: int
    network_buffers: int
    managed_bytes: int


@dataclass(frozen=True)
class Attached(Message):
    TYPE: ClassVar[str] = "attached"
    worker: int


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    worker: int
    progress: dict[str, list[int]] | None = None  # operator chain -> [records in, records out]
    # The worker's arena (runtime.memory.layout.AllocatorSnapshot.to_wire), when it changed since the last one
    arena: list[Any] | None = None
    # Each managed state backend's stats by the owner of its managed pages (runtime.state.backend.BackendStats
    # .to_wire), when they changed since the last ones; {}: none any more
    state: dict[str, list[Any]] | None = None


@dataclass(frozen=True)
class Ack(Message):
    TYPE: ClassVar[str] = "ack"


@dataclass(frozen=True)
class Shutdown(Message):
    TYPE: ClassVar[str] = "shutdown"
    reason: str = ""


@dataclass(frozen=True)
class Deploy(Message):
    TYPE: ClassVar[str] = "deploy"
    job: str
    graph: bytes  # the cloudpickled JobGraph (this worker's share of it)
    config: dict[str, Any]  # ShmflowConfig.as_dict()
    checkpoint_dir: str = ""  # where this job's checkpoints go ("": checkpointing off)
    restore_dir: str = ""  # the directory of the checkpoint to start from ("": a fresh start)
    checkpoint_area: list[int] = field(default_factory=list)  # [region offset, size] of its checkpoint area; []: none
    # "<checkpoint id>/<subtask key>" -> [region offset, size] of a blob of the checkpoint to restore (or of one
    # it builds on), still in the region
    restore_shared: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Deployed(Message):
    TYPE: ClassVar[str] = "deployed"
    job: str
    worker: int
    gates: dict[str, str]  # vertex id -> the endpoint of this worker's input gate


@dataclass(frozen=True)
class Start(Message):
    TYPE: ClassVar[str] = "start"
    job: str
    gates: dict[str, list[str]]  # vertex id -> the endpoint of each subtask's input gate


@dataclass(frozen=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    job: str


@dataclass(frozen=True)
class Collect(Message):
    TYPE: ClassVar[str] = "collect"
    job: str
    worker: int
    sink: str
    records: bytes  # runtime.network.records.pack_batch
    checkpoint: int = 0  # the checkpoint that covers these records (the first one after them); 0: none


@dataclass(frozen=True)
class TriggerCheckpoint(Message):
    TYPE: ClassVar[str] = "trigger_checkpoint"
    job: str
    checkpoint: int
    timestamp: float  # wall clock, seconds


@dataclass(frozen=True)
class AckCheckpoint(Message):
    TYPE: ClassVar[str] = "ack_checkpoint"
    job: str
    checkpoint: int
    worker: int
    subtask: str  # "<vertex id>-<index>"
    state: list[Any]  # [file name, size, CRC-32 hex] in the checkpoint's directory; []: the subtask had finished
    alignment_seconds: float = 0.0
    snapshot_seconds: float = 0.0
    source_position: Any = None  # a source subtask's snapshot_state() (listed by `shmflow checkpoints`)
    shared_memory: list[int] = field(default_factory=list)  # [region offset, size] of the blob's copy; []: none
    depends_on: int = 0  # the oldest checkpoint whose files the snapshot needs (incremental); 0: only its own


@dataclass(frozen=True)
class CheckpointDone(Message):
    TYPE: ClassVar[str] = "checkpoint_done"
    job: str
    checkpoint: int


@dataclass(frozen=True)
class Finished(Message):
    TYPE: ClassVar[str] = "finished"
    job: str
    worker: int
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Failed(Message):
    TYPE: ClassVar[str] = "failed"
    job: str
    worker: int
    operator: str
    traceback: str


@dataclass(frozen=True)
class Submit(Message):
    TYPE: ClassVar[str] = "submit"
    graph: bytes
    timeout: float | None = None
    restore_from: str = ""  # a checkpoint to start from (execution.savepoint.path)


@dataclass(frozen=True)
class Running(Message):
    TYPE: ClassVar[str] = "running"


@dataclass(frozen=True)
class Results(Message):
    TYPE: ClassVar[str] = "results"
    sink: str
    records: bytes


@dataclass(frozen=True)
class JobSucceeded(Message):
    TYPE: ClassVar[str] = "job_succeeded"
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class JobError(Message):
    TYPE: ClassVar[str] = "job_error"
    message: str


@dataclass(frozen=True)
class Inspect(Message):
    """A client asks the coordinator how the region is carved now (``shmflow layout --coordinator``)."""

    TYPE: ClassVar[str] = "inspect"


@dataclass(frozen=True)
class ClusterLayout(Message):
    """The answer to Inspect: the coordinator's allocator, and each worker's arena as of its last report."""

    TYPE: ClassVar[str] = "cluster_layout"
    region: list[Any]  # AllocatorSnapshot.to_wire() of the coordinator's allocator
    workers: list[list[Any]]  # [worker id, pid, AllocatorSnapshot.to_wire() of its arena or None]
    job: str | None = None  # the job running now
    # worker id -> owner of managed pages -> BackendStats.to_wire() of the state backend in them (last reported)
    state: dict[int, dict[str, list[Any]]] = field(default_factory=dict)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Register, Welcome, Attached, Heartbeat, Ack, Shutdown, Deploy, Deployed, Start, Cancel,
                Collect, TriggerCheckpoint, AckCheckpoint, CheckpointDone, Finished, Failed, Submit, Running,
                Results, JobSucceeded, JobError, Inspect, ClusterLayout)
}


# ------------------------------------------------------------- encode/decode
def encode(message: Message) -> bytes:
    """The msgpack payload of ``message`` (unsigned; :func:`seal` signs it)."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": message.TYPE}
    for f in dataclasses.fields(message):
        body[f.name] = getattr(message, f.name)
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    return payload


def decode(payload: bytes, *, peer: str = "peer") -> Message:
    """The message in a (verified) payload.

    Raises:
        ProtocolError: not a map, another protocol version, an unknown type,
            missing or unexpected fields, or a field of the wrong type.
    """
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types for bad bytes
        msg = f"control message from {peer} is not msgpack: {type(exc).__name__}: {exc}"
        raise ProtocolError(msg) from exc
    if not isinstance(body, dict):
        msg = f"control message from {peer} must be a map; got {type(body).__name__}"
        raise ProtocolError(msg)
    version = body.pop("v", None)
    if version != PROTOCOL_VERSION:
        msg = (f"control message from {peer} speaks protocol version {version!r}; this process speaks "
               f"{PROTOCOL_VERSION}: run the same shmflow version on every process of the cluster")
        raise ProtocolError(msg)
    tag = body.pop("t", None)
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        msg = f"control message from {peer} has unknown type {tag!r}; known: {', '.join(sorted(MESSAGE_TYPES))}"
        raise ProtocolError(msg)
    hints = _field_types(cls)
    unexpected = sorted(set(body) - set(hints))
    if unexpected:
        msg = f"{cls.__name__} from {peer}: unexpected field(s) {', '.join(map(repr, unexpected))}"
        raise ProtocolError(msg)
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                msg = f"{cls.__name__} from {peer}: missing field `$.{f.name}`"
                raise ProtocolError(msg)
            continue
        _check_type(body[f.name], hints[f.name], f"$.{f.name}", cls.__name__)
    return cls(**body)


_HINTS: dict[type[Message], dict[str, Any]] = {}


def _field_types(cls: type[Message]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        resolved = typing.get_type_hints(cls)
        hints = _HINTS[cls] = {f.name: resolved[f.name] for f in dataclasses.fields(cls)}
    return hints


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _check_type(value: Any, tp: Any, where: str, message: str) -> None:
    """Raise ProtocolError unless ``value`` (as msgpack decoded it) fits the annotation ``tp``."""
    if tp is Any:
        return
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        for option in options:
            try:
                _check_type(value, option, where, message)
            except ProtocolError:
                continue
            return
        names = " | ".join("None" if o is type(None) else _type_name(typing.get_origin(o) or o) for o in options)
        msg = f"{message}: expected `{names}`, got `{type(value).__name__}` at `{where}`"
        raise ProtocolError(msg)
    if tp is type(None):
        ok = value is None
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is list:
        ok = isinstance(value, list)
        if ok:
            (item,) = typing.get_args(tp) or (Any,)
            for i, v in enumerate(value):
                _check_type(v, item, f"{where}[{i}]", message)
    elif origin is dict:
        ok = isinstance(value, dict)
        if ok:
            key_tp, value_tp = typing.get_args(tp) or (Any, Any)
            for k, v in value.items():
                _check_type(k, key_tp, f"{where}.<key>", message)
                _check_type(v, value_tp, f"{where}.{k}", message)
    else:
        ok = isinstance(value, tp)
    if not ok:
        msg = f"{message}: expected `{_type_name(origin or tp)}`, got `{type(value).__name__}` at `{where}`"
        raise ProtocolError(msg)


# ------------------------------------------------------------------ signing
def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def load_or_create_secret(path: str | os.PathLike[str] | None = None, *, create: bool = True) -> bytes:
    """The cluster secret from ``path`` (default ~/.shmflow/cluster.secret), created 0600 if missing.

    Raises:
        AuthenticationError: the file is readable by others than its owner, or
            missing when ``create`` is False.
    """
    path = Path(path) if path else DEFAULT_SECRET_FILE
    if not path.exists():
        if not create:
            msg = f"cluster secret file {path} does not exist; start the coordinator first or pass --secret-file"
            raise AuthenticationError(msg)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(new_secret().hex().encode())
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        msg = f"cluster secret file {path} has mode {mode:o}; it must be readable by its owner only (chmod 600)"
        raise AuthenticationError(msg)
    secret = bytes.fromhex(path.read_text().strip())
    if len(secret) < 16:
        msg = f"cluster secret in {path} is {len(secret)} bytes; expected >= 16"
        raise AuthenticationError(msg)
    return secret


@dataclass(frozen=True)
class CurveKeys:
    """The CURVE key pairs of a cluster (z85-encoded, as pyzmq's socket options take them)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def curve_keys(secret: bytes) -> CurveKeys:
    """The cluster's CURVE key pairs, derived from its secret (HMAC-SHA256 per role), the same in every process.

    The server's public key is derived too and never printed: without the secret a peer cannot compute it,
    and without it no CURVE handshake with the coordinator completes.
    Raises:
        AuthenticationError: this libzmq was built without CURVE (``zmq.has("curve")`` is False).
    """
    if not zmq.has("curve"):
        msg = (f"libzmq {zmq.zmq_version()} has no CURVE security; a standing cluster on tcp:// needs it "
               f"(install pyzmq's wheel, which bundles libsodium)")
        raise AuthenticationError(msg)
    pairs = []
    for role in (b"server", b"client"):
        private = z85.encode(hmac.new(secret, b"shmflow curve key v1 " + role, hashlib.sha256).digest())
        pairs += [zmq.curve_public(private), private]
    return CurveKeys(*pairs)


def _is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def secure_server(sock: zmq.Socket[Any], secret: bytes, endpoint: str, *, max_message_size: int) -> None:
    """Before ``bind``: bound every message part to ``max_message_size``; on tcp, be the CURVE server."""
    sock.maxmsgsize = max_message_size
    if _is_tcp(endpoint):
        keys = curve_keys(secret)
        sock.curve_secretkey = keys.server_secret
        sock.curve_publickey = keys.server_public
        sock.curve_server = True


def secure_client(sock: zmq.Socket[Any], secret: bytes, endpoint: str, *, max_message_size: int) -> None:
    """Before ``connect``: as :func:`secure_server`, for the connecting side (a CURVE client on tcp)."""
    sock.maxmsgsize = max_message_size
    if _is_tcp(endpoint):
        keys = curve_keys(secret)
        sock.curve_serverkey = keys.server_public
        sock.curve_secretkey = keys.client_secret
        sock.curve_publickey = keys.client_public


def check_message_size(nbytes: int, max_message_size: int, what: str) -> None:
    """Raise ProtocolError before sending a message part its receiver would refuse (and drop the connection for).

    Raises:
        ProtocolError: names the sizes, the key and the remedy.
    """
    if nbytes > max_message_size:
        msg = (f"{what} is {nbytes / (1 << 20):.1f} MiB; cluster.max-message-size allows "
               f"{max_message_size / (1 << 20):.1f} MiB: raise it (-D cluster.max-message-size=...) on the "
               f"coordinator, its workers and the client alike. Collections travel inside the job graph: the "
               f"embedded cluster ships each worker only its share, a standing cluster the whole graph once per "
               f"worker; read large inputs from files (read_text, from_source) instead")
        raise ProtocolError(msg)


def seal(secret: bytes, message: Message) -> list[bytes]:
    """The two frames of a signed message: [mac, payload]."""
    payload = encode(message)
    return [hmac.new(secret, payload, hashlib.sha256).digest(), payload]


def open_message(secret: bytes, frames: list[bytes], *, peer: str = "peer") -> Message:
    """Verify and decode a signed message.

    Raises:
        AuthenticationError: wrong frame count or MAC; the payload is never decoded.
        ProtocolError: a verified payload that is not a message of this protocol version.
    """
    if len(frames) != 2:
        msg = f"control message from {peer} has {len(frames)} frames; expected 2 (mac, payload)"
        raise AuthenticationError(msg)
    mac, payload = frames
    if not hmac.compare_digest(mac, hmac.new(secret, payload, hashlib.sha256).digest()):
        msg = f"control message from {peer} failed its HMAC check (wrong or no cluster secret)"
        raise AuthenticationError(msg)
    return decode(payload, peer=peer)


def send(sock: zmq.Socket[bytes], secret: bytes, message: Message, *, identity: bytes | None = None) -> None:
    """Sign and send ``message`` (ROUTER side: to the peer ``identity``)."""
    frames = seal(secret, message)
    if identity is not None:
        frames.insert(0, identity)
    sock.send_multipart(frames)


def recv_from(sock: zmq.Socket[bytes], secret: bytes) -> tuple[bytes, Message] | None:
    """ROUTER side: (identity, message), or None (logged) when the message is refused."""
    frames = sock.recv_multipart()
    identity, rest = frames[0], frames[1:]
    try:
        return identity, open_message(secret, rest, peer=f"peer {identity.hex()}")
    except (AuthenticationError, ProtocolError) as exc:
        log.warning("refused a control message: %s", exc)
        return None


def recv(sock: zmq.Socket[bytes], secret: bytes) -> Message | None:
    """DEALER side: the message, or None (logged) when it is refused."""
    frames = sock.recv_multipart()
    try:
        return open_message(secret, frames, peer="coordinator")
    except (AuthenticationError, ProtocolError) as exc:
        log.warning("refused a control message: %s", exc)
        return None


__all__ = [
    "DEFAULT_SECRET_FILE",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "Ack",
    "Attached",
    "Cancel",
    "ClusterLayout",
    "AckCheckpoint",
    "CheckpointDone",
    "Collect",
    "TriggerCheckpoint",
    "CurveKeys",
    "Deploy",
    "Deployed",
    "Failed",
    "Finished",
    "Heartbeat",
    "Inspect",
    "JobError",
    "JobSucceeded",
    "Message",
    "Register",
    "Results",
    "Running",
    "Shutdown",
    "Start",
    "Submit",
    "Welcome",
    "check_message_size",
    "curve_keys",
    "decode",
    "encode",
    "load_or_create_secret",
    "new_secret",
    "open_message",
    "recv",
    "recv_from",
    "seal",
    "secure_client",
    "secure_server",
    "send",
]
