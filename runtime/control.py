"""The control plane's messages between client, coordinator and workers: msgpack maps signed with HMAC.

Imports: runtime.errors (stdlib, msgpack, pyzmq otherwise).

The cluster runs shipped Python code, so nothing from a peer is trusted
before its signature checks out: every message is two frames,
``[HMAC-SHA256(secret, payload), payload]``, and :func:`open_message` verifies
the MAC (constant-time) before it even decodes the msgpack payload. Pickled
job graphs travel inside verified payloads only, and are unpickled after
verification. The secret is 32 random bytes, kept in a file readable by its
owner only (:func:`load_or_create_secret`) or handed to embedded workers
through their spawn arguments.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import msgpack
import zmq

from runtime.errors import ShmflowError

log = logging.getLogger("shmflow.control")

SECRET_BYTES = 32
DEFAULT_SECRET_FILE = Path.home() / ".shmflow" / "cluster.secret"


class AuthenticationError(ShmflowError):
    """A control message failed its HMAC check (no or wrong cluster secret)."""


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
        raise AuthenticationError(f"cluster secret in {path} is {len(secret)} bytes; expected >= 16")
    return secret


def seal(secret: bytes, message: dict[str, Any]) -> list[bytes]:
    """The two frames of a signed message."""
    payload = msgpack.packb(message, use_bin_type=True)
    return [hmac.new(secret, payload, hashlib.sha256).digest(), payload]


def open_message(secret: bytes, frames: list[bytes], *, peer: str = "peer") -> dict[str, Any]:
    """Verify and decode a signed message.

    Raises:
        AuthenticationError: wrong frame count or MAC; the payload is never decoded.
    """
    if len(frames) != 2:
        raise AuthenticationError(f"control message from {peer} has {len(frames)} frames; expected 2 (mac, payload)")
    mac, payload = frames
    if not hmac.compare_digest(mac, hmac.new(secret, payload, hashlib.sha256).digest()):
        raise AuthenticationError(f"control message from {peer} failed its HMAC check (wrong or no cluster secret)")
    message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if not isinstance(message, dict) or "type" not in message:
        raise AuthenticationError(f"control message from {peer} is not a typed map")
    return message


def send(sock: zmq.Socket, secret: bytes, message: dict[str, Any], *, identity: bytes | None = None) -> None:
    frames = seal(secret, message)
    if identity is not None:
        frames.insert(0, identity)
    sock.send_multipart(frames)


def recv_from(sock: zmq.Socket, secret: bytes) -> tuple[bytes, dict[str, Any]] | None:
    """ROUTER side: (identity, message), or None (logged) when the message fails authentication."""
    frames = sock.recv_multipart()
    identity, rest = frames[0], frames[1:]
    try:
        return identity, open_message(secret, rest, peer=f"peer {identity.hex()}")
    except AuthenticationError as exc:
        log.warning("refused a control message: %s", exc)
        return None


def recv(sock: zmq.Socket, secret: bytes) -> dict[str, Any] | None:
    """DEALER side: the message, or None (logged) when it fails authentication."""
    frames = sock.recv_multipart()
    try:
        return open_message(secret, frames, peer="coordinator")
    except AuthenticationError as exc:
        log.warning("refused a control message: %s", exc)
        return None
