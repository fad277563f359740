"""The coordinator's web server: the dashboard, the REST API, server-sent events and Prometheus ``/metrics``.

Imports: runtime.web.model, runtime.web.metrics, runtime.web.view, runtime.errors (stdlib http.server,
prometheus_client).

The server is the stdlib's ThreadingHTTPServer in daemon threads of the
coordinator process: no event loop to share with the coordinator, one thread
per connection (an event stream holds one), and nothing on the job's path. It
reads the region's stats area (through a :class:`~runtime.web.model.Sampler`)
and what the coordinator kept of its workers; it never touches a job's socket.

Routes (REST documents in Flink's shape, JSON):
``/overview``, ``/jobs``, ``/jobs/overview``, ``/jobs/<id>``, ``/jobs/<id>/vertices/<vid>``,
``/jobs/<id>/checkpoints``, ``/taskmanagers``, ``/taskmanagers/<id>``,
``/taskmanagers/<id>/metrics?get=a,b``, ``/memory``, ``/metrics`` (Prometheus text),
``/events`` (server-sent events, one document a second), ``/`` (the dashboard).
``PATCH /jobs/<id>`` cancels a job; it needs ``Authorization: Bearer <cluster secret, hex>``
(401 without, 403 with another).

Ownership: :class:`WebServer` owns its sockets and threads; :meth:`WebServer.close` stops
and joins them. Process: the coordinator process.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runtime.errors import ConfigError
from runtime.web.metrics import registry
from runtime.web.model import (
    Sampler,
    checkpoints_document,
    job_document,
    jobs_overview,
    memory_document,
    overview,
    subtask_rows,
    taskmanager_metrics,
    taskmanagers,
    vertex_id,
)
from runtime.web.view import ClusterView

log = logging.getLogger("shmflow.web")

#: Seconds between two documents of an event stream (the dashboard's refresh).
EVENT_INTERVAL = 1.0
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript"),
           "/style.css": ("style.css", "text/css")}


class _NotFound(Exception):
    pass


class WebServer:
    """Serves the dashboard of ``view`` on ``address:port`` (and ``/metrics`` alone on ``prom_port``, if set).

    Raises (from the constructor):
        ConfigError: the port is in use or the address cannot be bound; names ``rest.port`` / ``rest.address``
            (or ``metrics.reporter.prom.port``).
    """

    def __init__(self, view: ClusterView, *, address: str, port: int, prom_port: int = 0) -> None:
        self.view = view
        self.sampler = Sampler(view)
        self.registry = registry(view, self.sampler)
        self._closing = threading.Event()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        try:
            self._servers.append(self._bind(address, port, "rest.port", metrics_only=False))
            if prom_port:
                self._servers.append(self._bind(address, prom_port, "metrics.reporter.prom.port", metrics_only=True))
        except BaseException:
            for server in self._servers:
                server.server_close()
            raise
        self.sampler.start()
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                      name="shmflow-web", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _bind(self, address: str, port: int, key: str, *, metrics_only: bool) -> ThreadingHTTPServer:
        handler = type("Handler", (_Handler,), {"web": self, "metrics_only": metrics_only})
        try:
            server = ThreadingHTTPServer((address, port), handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                msg = (f"{key} {port} is in use on {address}: another process (another shmflow coordinator?) "
                       f"listens there; set {key} to a free port (0: any free port)")
            else:
                msg = f"cannot serve the dashboard on rest.address {address!r}, {key} {port}: {exc.strerror}"
            raise ConfigError(msg) from exc
        server.daemon_threads = True
        return server

    @property
    def url(self) -> str:
        host, port = self._servers[0].server_address[:2]
        return f"http://{host!s}:{port}/"

    @property
    def prom_url(self) -> str | None:
        if len(self._servers) < 2:
            return None
        host, port = self._servers[1].server_address[:2]
        return f"http://{host!s}:{port}/metrics"

    def close(self) -> None:
        """Stop serving: end event streams, shut the servers down, join their threads."""
        self._closing.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)
        self.sampler.stop()

    def __enter__(self) -> WebServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- documents
    def document(self, path: str, query: dict[str, list[str]]) -> Any:
        """The JSON document of a GET route. Raises _NotFound."""
        view, sample = self.view, self.sampler.latest()
        parts = [p for p in path.split("/") if p]
        if parts == ["overview"]:
            return overview(view)
        if parts == ["jobs"]:
            return {"jobs": [{"id": j["jid"], "status": j["state"]} for j in jobs_overview(view)]}
        if parts == ["jobs", "overview"]:
            return {"jobs": jobs_overview(view)}
        if parts == ["memory"]:
            return memory_document(view, sample)
        if parts == ["taskmanagers"]:
            return {"taskmanagers": taskmanagers(view, sample)}
        if len(parts) >= 2 and parts[0] == "taskmanagers":
            tms = {tm["id"]: tm for tm in taskmanagers(view, sample)}
            if parts[1] not in tms:
                msg = f"no taskmanager {parts[1]!r}"
                raise _NotFound(msg)
            if len(parts) == 2:
                return tms[parts[1]]
            if parts[2:] == ["metrics"]:
                metrics = taskmanager_metrics(view, sample, int(parts[1]))
                wanted = [n for item in query.get("get", []) for n in item.split(",") if n]
                if not wanted:
                    return [{"id": name} for name in metrics]
                return [{"id": n, "value": str(metrics[n])} for n in wanted if n in metrics]
        if len(parts) >= 2 and parts[0] == "jobs":
            record = view.jobs.get(parts[1])
            if record is None:
                msg = f"no job {parts[1]!r}"
                raise _NotFound(msg)
            if len(parts) == 2:
                return job_document(view, sample, record)
            if parts[2:] == ["checkpoints"]:
                return checkpoints_document(record)
            if len(parts) == 4 and parts[2] == "vertices":
                for v in record.graph.vertices:
                    if vertex_id(record.graph, v.id) == parts[3] or str(v.id) == parts[3]:
                        return {"id": vertex_id(record.graph, v.id), "name": v.name, "parallelism": v.parallelism,
                                "subtasks": subtask_rows(view, sample, record, v.id)}
                msg = f"no vertex {parts[3]!r} in job {parts[1]!r}"
                raise _NotFound(msg)
        msg = f"no route {path!r}"
        raise _NotFound(msg)

    def event(self, query: dict[str, list[str]]) -> dict[str, Any]:
        """One document of the event stream: the overview, the job asked for (or the latest one), memory."""
        view, sample = self.view, self.sampler.latest()
        wanted = (query.get("job") or [""])[0]
        jobs = list(view.jobs.values())
        record = view.jobs.get(wanted) if wanted else (jobs[-1] if jobs else None)
        return {"overview": overview(view), "jobs": jobs_overview(view),
                "taskmanagers": taskmanagers(view, sample),
                "job": job_document(view, sample, record) if record is not None else None,
                "memory": memory_document(view, sample)}

    def cancel(self, job_id: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        """``PATCH /jobs/<id>``: (status, body)."""
        if not authorization or not authorization.startswith("Bearer "):
            return 401, {"errors": ["cancelling a job needs the cluster secret: Authorization: Bearer <secret hex>"]}
        given = authorization[len("Bearer "):].strip().encode()
        if not hmac.compare_digest(given, self.view.secret.hex().encode()):
            return 403, {"errors": ["the secret given is not the cluster's"]}
        if job_id not in self.view.jobs:
            return 404, {"errors": [f"no job {job_id!r}"]}
        if not self.view.request_cancel(job_id):
            return 409, {"errors": [f"job {job_id!r} is not running"]}
        return 202, {}


class _Handler(BaseHTTPRequestHandler):
    web: WebServer
    metrics_only: bool
    protocol_version = "HTTP/1.1"
    server_version = "shmflow"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, document: Any) -> None:
        self._send(status, json.dumps(document).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        url = urlsplit(self.path)
        path, query = url.path.rstrip("/") or "/", parse_qs(url.query)
        if path == "/metrics":
            self._send(200, generate_latest(self.web.registry), CONTENT_TYPE_LATEST)
            return
        if self.metrics_only:
            self._json(404, {"errors": ["this port serves /metrics only"]})
            return
        if path in _STATIC:
            name, kind = _STATIC[path]
            self._send(200, resources.files("runtime.web").joinpath("static", name).read_bytes(), kind)
            return
        if path == "/events":
            self._events(query)
            return
        try:
            self._json(200, self.web.document(path, query))
        except _NotFound as exc:
            self._json(404, {"errors": [str(exc)]})

    def do_PATCH(self) -> None:  # noqa: N802 - the stdlib's name
        parts = [p for p in urlsplit(self.path).path.split("/") if p]
        if self.metrics_only or len(parts) != 2 or parts[0] != "jobs":
            self._json(405, {"errors": ["only PATCH /jobs/<id> (cancel) changes anything"]})
            return
        status, body = self.web.cancel(parts[1], self.headers.get("Authorization"))
        self._json(status, body)

    def _events(self, query: dict[str, list[str]]) -> None:
        """Server-sent events: one JSON document every EVENT_INTERVAL until the client or the server goes."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        closing = self.web._closing
        try:
            while not closing.is_set():
                data = json.dumps(self.web.event(query))
                self.wfile.write(f"data: {data}\n\n".encode())
                self.wfile.flush()
                closing.wait(EVENT_INTERVAL)
        except (BrokenPipeError, ConnectionResetError):
            return


__all__ = ["EVENT_INTERVAL", "WebServer"]
