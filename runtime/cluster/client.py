"""The client's side of a job: ship its graph, run it, receive collected records and metrics.

Imports: runtime.cluster (protocol, local, progress), runtime.execution.graph,
runtime.network.records, runtime.errors (cloudpickle).

:func:`execute_job` is what ``StreamEnvironment.execute()`` calls: it runs a
job on an embedded :class:`~runtime.cluster.local.LocalCluster`, or submits it
to a standing cluster with :func:`submit`. The user's own modules (a job
script's helpers, a test file) are pickled by value, so standing workers need
not import them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle
import zmq

from runtime.cluster import protocol as control
from runtime.cluster.local import LocalCluster
from runtime.cluster.progress import progress_printer, render_summary, summarize
from runtime.cluster.protocol import JobError, JobSucceeded, Results, Submit
from runtime.errors import JobFailedError, ProtocolError, WorkerLostError
from runtime.execution.graph import JobGraph
from runtime.network.batch import unpack_batch
from runtime.network.transport import connect, context, make_socket
from runtime.web.server import WebServer

if TYPE_CHECKING:
    from runtime.config import ShmflowConfig

#: The directory that holds the ``runtime`` and ``operators`` packages (shipped by reference, never by value).
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["runtime"].__file__ or "")))
_SYSTEM_DIRS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def _user_modules() -> list[Any]:
    """Modules of the user's own code (a job script's helpers, a test file), to ship by value.

    Workers of a standing cluster cannot import them; embedded workers could,
    but shipping by value makes both behave alike.
    """
    out = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or name == "__main__" or name.startswith(("runtime", "operators")):
            continue
        path = os.path.abspath(path)
        if path.startswith(_SYSTEM_DIRS) or "site-packages" in path or "dist-packages" in path:
            continue
        if path.startswith((os.path.join(_PROJECT_ROOT, "runtime"), os.path.join(_PROJECT_ROOT, "operators"))):
            continue
        out.append(module)
    return out


@contextlib.contextmanager
def _user_code_by_value() -> Iterator[None]:
    """While active, cloudpickle ships the user's own modules by value (see :func:`_user_modules`)."""
    registered = []
    for module in _user_modules():
        try:
            cloudpickle.register_pickle_by_value(module)
            registered.append(module)
        except (ValueError, TypeError):
            pass
    try:
        yield
    finally:
        for module in registered:
            cloudpickle.unregister_pickle_by_value(module)


def _dumps(graph: JobGraph) -> bytes:
    try:
        return bytes(cloudpickle.dumps(graph))
    except Exception:  # noqa: BLE001 - find the operator to blame (pickling each is slow: only now)
        pass
    for vertex in graph.vertices:
        for node in vertex.nodes:
            try:
                cloudpickle.dumps(node.operator)
            except Exception as exc:
                msg = (f"operator {node.name!r} of job {graph.name!r} cannot be shipped to the workers: "
                       f"{type(exc).__name__}: {exc}")
                raise JobFailedError(msg) from exc
    return bytes(cloudpickle.dumps(graph))  # not an operator's fault: raise what pickling raises


def check_shippable(graph: JobGraph) -> bytes:
    """Pickle the job graph for the workers; a function that cannot be shipped fails here, by name.

    Raises:
        JobFailedError: names the operator whose function cannot be pickled.
    """
    with _user_code_by_value():
        return _dumps(graph)


def worker_payloads(graph: JobGraph) -> list[bytes]:
    """The job graph pickled once per worker, each with only its share of every splittable source
    (:meth:`JobGraph.for_worker`): a large ``from_collection`` crosses to each worker once, in part.

    Raises:
        JobFailedError: as :func:`check_shippable`.
    """
    with _user_code_by_value():
        return [_dumps(graph.for_worker(i)) for i in range(graph.max_parallelism)]


@dataclass
class JobResult:
    """What ``execute()`` returns: the job's name, wall time and metrics per operator."""

    name: str
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"JobResult({self.name!r}, {self.seconds:.3f}s, {self.metrics.get('records', 0)} records)"

    def summary(self) -> str:
        """One paragraph: records, throughput, memory, backpressure, per operator chain."""
        return render_summary(self.name, self.seconds, self.metrics)


def decode_collect(records: bytes) -> list[Any]:
    return unpack_batch(records)


def execute_job(graph: JobGraph, config: ShmflowConfig, *, collect: dict[str, Any], coordinator: str | None = None,
                secret_file: str | None = None, timeout: float | None = None, ui: bool = False,
                ui_linger: float = 0.0) -> JobResult:
    """Run ``graph`` on an embedded cluster (or the standing one at ``coordinator``); the client's side of a job.

    Ships the graph, feeds every ``collect`` batch to ``collect[sink]._extend``,
    and returns the job's :class:`JobResult`. (The coordinator's side is
    :meth:`Coordinator.run_job`.) With ``ui``, the embedded coordinator serves the
    dashboard on ``rest.address``/``rest.port`` while the job runs (its URL on stderr),
    and ``ui_linger`` seconds after it ends.

    Raises:
        JobFailedError: the job failed, could not be shipped, or the cluster did not start.
    """
    started = time.monotonic()

    def on_collect(sink: str, records: bytes) -> None:
        collect[sink]._extend(decode_collect(records))

    if coordinator is None:
        try:
            cluster = LocalCluster(config)
        except (WorkerLostError, TimeoutError) as exc:
            msg = f"job {graph.name!r} failed: the local cluster did not start: {exc}"
            raise JobFailedError(msg) from exc
        with cluster, contextlib.ExitStack() as web:
            if ui:
                server = web.enter_context(WebServer(cluster.coordinator, address=config.rest_address,
                                                     port=config.rest_port, prom_port=config.prom_port))
                print(f"shmflow dashboard: {server.url}", file=sys.stderr, flush=True)
                web.callback(linger, cluster.coordinator, ui_linger)
            tick = progress_printer(graph.name, cluster.coordinator, started) if sys.stderr.isatty() else None
            try:
                metrics = cluster.coordinator.run_job(graph, worker_payloads(graph), on_collect=on_collect,
                                                      timeout=timeout, on_tick=tick,
                                                      restore_from=config.savepoint_path)
            finally:
                if tick is not None:
                    sys.stderr.write("\r\x1b[K")
                    sys.stderr.flush()
    else:
        metrics = submit(coordinator, graph, check_shippable(graph), on_collect=on_collect, secret_file=secret_file,
                         timeout=timeout, max_message_size=config.max_message_size,
                         restore_from=config.savepoint_path)
    seconds = time.monotonic() - started
    return JobResult(graph.name, seconds, summarize(metrics, seconds))


def linger(coordinator: Any, seconds: float) -> None:
    """Keep the cluster (and its dashboard) up ``seconds`` after a job, answering the workers' heartbeats."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        coordinator.poll(min(0.2, max(0.0, until - time.monotonic())))


SILENCE_LIMIT = 15.0  # seconds without a word from the coordinator before giving up


def submit(endpoint: str, graph: JobGraph, payload: bytes, *, on_collect: Callable[[str, bytes], None],
           secret_file: str | None = None, timeout: float | None = None,
           max_message_size: int = control.DEFAULT_MAX_MESSAGE_SIZE,
           restore_from: str = "") -> dict[int, dict[str, Any]]:
    """Run ``graph`` on the standing cluster at ``endpoint``; returns the per-worker metrics.

    Raises:
        JobFailedError: the job failed, the coordinator refused it, it went silent, or its graph is
            larger than ``cluster.max-message-size``.
    """
    secret = control.load_or_create_secret(secret_file, create=False)
    try:
        control.check_message_size(len(payload), max_message_size, f"the graph of job {graph.name!r}")
    except ProtocolError as exc:
        raise JobFailedError(str(exc)) from exc
    sock = make_socket(context(), zmq.DEALER)
    try:
        control.secure_client(sock, secret, endpoint, max_message_size=max_message_size)
        connect(sock, endpoint)
        control.send(sock, secret, Submit(graph=payload, timeout=timeout, restore_from=restore_from))
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
            if isinstance(message, Results):
                on_collect(message.sink, message.records)
            elif isinstance(message, JobSucceeded):
                return message.metrics
            elif isinstance(message, JobError):
                raise JobFailedError(message.message)
    finally:
        sock.close(linger=0)


__all__ = ["JobResult", "check_shippable", "decode_collect", "execute_job", "submit", "worker_payloads"]
