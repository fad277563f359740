"""A thin pyzmq layer: one context per process, sockets that never linger, endpoints that leave no files.

Imports: runtime.errors (and pyzmq).

Endpoints: ``ipc://@shmflow-<pid>-<random>`` uses Linux's abstract socket
namespace, so nothing is created on disk and nothing can leak; ``tcp://`` binds
to 127.0.0.1 on a port the kernel picks unless told otherwise.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Literal

import zmq

from runtime.errors import TransportError

__all__ = ["Kind", "bind", "connect", "context", "local_endpoint", "make_socket"]

Kind = Literal["ipc", "tcp"]

#: The longest any wait of a gate or a partition goes without calling its ``keep_alive`` callback (the
#: worker's heartbeat and cancel check): a worker waiting for its peers still heartbeats and stops on cancel.
KEEP_ALIVE_INTERVAL = 0.1


def context() -> zmq.Context[zmq.Socket[bytes]]:
    """This process's zmq context. Never fork after creating it (spawn workers instead)."""
    return zmq.Context.instance()


def local_endpoint(kind: Kind = "ipc", *, host: str = "127.0.0.1") -> str:
    """A fresh endpoint to bind: an abstract ipc name, or ``tcp://host:*`` (port picked at bind)."""
    if kind == "ipc":
        if sys.platform.startswith("linux"):
            return f"ipc://@shmflow-{os.getpid()}-{secrets.token_hex(6)}"
        return f"ipc:///tmp/shmflow-{os.getpid()}-{secrets.token_hex(6)}"
    if kind == "tcp":
        return f"tcp://{host}:*"
    msg = f"endpoint kind must be 'ipc' or 'tcp'; got {kind!r}"
    raise ValueError(msg)


def make_socket(ctx: zmq.Context[zmq.Socket[bytes]], socket_type: int, *, hwm: int | None = None,
                identity: bytes | None = None) -> zmq.Socket[bytes]:
    """A socket with linger 0 (closing never blocks on unsent messages) and optional high-water marks."""
    sock = ctx.socket(socket_type)
    sock.linger = 0
    if hwm is not None:
        sock.sndhwm = hwm
        sock.rcvhwm = hwm
    if identity is not None:
        sock.identity = identity
    return sock


def bind(sock: zmq.Socket[bytes], endpoint: str) -> str:
    """Bind and return the endpoint peers should connect to (with the port the kernel chose)."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        msg = f"cannot bind {endpoint}: {exc}"
        raise TransportError(msg) from exc
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def connect(sock: zmq.Socket[bytes], endpoint: str) -> None:
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        msg = f"cannot connect to {endpoint}: {exc}"
        raise TransportError(msg) from exc
