"""Client-side job plumbing: shipping a job graph, decoding collected results, summarising metrics.

Imports: runtime.graph, runtime.network.records, runtime.errors (cloudpickle).
"""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Any, Iterator

import cloudpickle

from runtime.errors import JobFailedError
from runtime.graph import JobGraph
from runtime.network.records import unpack_batch

_PROJECT_DIRS = tuple(os.path.dirname(os.path.dirname(os.path.abspath(p)))
                      for p in (__file__, sys.modules["runtime"].__file__))
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
        if path.startswith(os.path.join(_PROJECT_DIRS[0], "runtime")) or path.startswith(
                os.path.join(_PROJECT_DIRS[0], "operators")):
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
        return cloudpickle.dumps(graph)
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
    return cloudpickle.dumps(graph)  # not an operator's fault: raise what pickling raises


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
        """One paragraph: records, throughput, memory high-water, backpressure, per operator chain."""
        from runtime.memory.units import format_bytes
        m = self.metrics
        lines = [f"job {self.name!r}: {m.get('records', 0):,} records in {m.get('timed_seconds', self.seconds):.2f}s "
                 f"({m.get('records_per_s', 0):,.0f} records/s; {self.seconds:.2f}s with start-up); memory high-water "
                 f"{format_bytes(m.get('memory_high_water_bytes', 0))}; backpressure "
                 f"{m.get('backpressure_seconds', 0):.2f}s"]
        for name, ops in m.get("operators", {}).items():
            late = f", {ops['late_records_dropped']:,} late records dropped" if ops.get("late_records_dropped") else ""
            lines.append(f"  {name}: {ops.get('records_in', 0):,} in, {ops.get('records_out', 0):,} out{late}")
        return "\n".join(lines)


def check_graph_payload(payload: bytes) -> JobGraph:
    """Unpickle a submitted job graph (its HMAC was verified before this is called)."""
    graph = cloudpickle.loads(payload)
    if not isinstance(graph, JobGraph):
        raise JobFailedError(f"a submitted job must be a JobGraph; got {type(graph).__name__}")
    return graph


def decode_collect(records: bytes) -> list[Any]:
    return unpack_batch(records)


def summarize(per_worker: dict[int, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Merge the workers' metrics: per operator chain, records in/out and backpressure; totals."""
    operators: dict[str, dict[str, float]] = {}
    high_water = 0
    for metrics in per_worker.values():
        for name, values in metrics.items():
            if name == "memory_high_water_bytes":
                high_water += values
                continue
            chain = name.rsplit("[", 1)[0]
            agg = operators.setdefault(chain, {})
            for k, v in values.items():
                if k == "first_record_at":
                    agg[k] = min(agg.get(k, v), v)
                elif k == "finished_at":
                    agg[k] = max(agg.get(k, v), v)
                else:
                    agg[k] = agg.get(k, 0) + v
    records = sum(m.get("source_records", 0) for m in operators.values())
    starts = [m["first_record_at"] for m in operators.values() if "first_record_at" in m]
    ends = [m["finished_at"] for m in operators.values() if "finished_at" in m]
    # The timed region of WORKLOADS.md: first source record to the last subtask's end (monotonic, system-wide).
    timed = (max(ends) - min(starts)) if starts and ends else seconds
    return {
        "timed_seconds": timed,
        "seconds": seconds,
        "operators": operators,
        "records": records,
        "records_per_s": records / timed if timed > 0 else 0.0,
        "backpressure_seconds": sum(m.get("backpressure_seconds", 0) for m in operators.values()),
        "memory_high_water_bytes": high_water,
    }
