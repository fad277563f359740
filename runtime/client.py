"""Submitting a job to a standing cluster (``shmflow coordinator``) and receiving its results.

Imports: runtime.control, runtime.network.transport, runtime.errors.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import zmq

from runtime import control
from runtime.errors import JobFailedError
from runtime.graph import JobGraph
from runtime.network.transport import connect, context, make_socket

SILENCE_LIMIT = 15.0  # seconds without a word from the coordinator before giving up


def submit(endpoint: str, graph: JobGraph, payload: bytes, *, on_collect: Callable[[str, bytes], None],
           secret_file: str | None = None, timeout: float | None = None) -> dict[int, dict[str, Any]]:
    """Run ``graph`` on the standing cluster at ``endpoint``; returns the per-worker metrics.

    Raises:
        JobFailedError: the job failed, the coordinator refused it, or it went silent.
    """
    secret = control.load_or_create_secret(secret_file, create=False)
    sock = make_socket(context(), zmq.DEALER)
    try:
        connect(sock, endpoint)
        control.send(sock, secret, {"type": "submit", "graph": payload, "timeout": timeout})
        last = time.monotonic()
        while True:
            if not sock.poll(500):
                if time.monotonic() - last > SILENCE_LIMIT:
                    msg = (f"no answer from the coordinator at {endpoint} for {SILENCE_LIMIT:.0f}s: is it running, "
                           f"and does {secret_file or control.DEFAULT_SECRET_FILE} hold the cluster's secret?")
                    raise JobFailedError(msg)
                continue
            message = control.recv(sock, secret)
            if message is None:
                continue
            last = time.monotonic()
            kind = message["type"]
            if kind == "collect":
                on_collect(message["sink"], message["records"])
            elif kind == "result":
                return message["metrics"]
            elif kind == "error":
                raise JobFailedError(message["message"])
    finally:
        sock.close(linger=0)
