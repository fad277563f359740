"""The logical job graph and its translation into vertices (operator chains) and edges.

Imports: runtime.execution.task, runtime.errors (stdlib otherwise). Knows nothing of
the concrete operators: a node holds an operator *object* (shipped to workers
pickled) and a few flags.

The facade builds :class:`StreamNode` s, one per transformation. :func:`build_job_graph`
chains nodes joined by forward edges of equal parallelism (Flink's operator
chaining: records pass in-process, without serialization) into
:class:`JobVertex` es, and keeps the other edges as :class:`JobEdge` s with
their partitioning. Worker ``i`` runs subtask ``i`` of every vertex whose
parallelism exceeds ``i`` (slot sharing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from runtime.errors import GraphError

PARTITIONINGS = ("forward", "hash", "rebalance", "broadcast")


@dataclass
class StreamNode:
    """One transformation of the user's program.

    ``operator`` is an Operator (or SourceOperator) instance; sources that
    can ``split(parallelism)`` give each subtask its own share.
    ``inputs`` are ``(upstream node id, partitioning, key_fn)``.
    """

    id: int
    name: str
    operator: Any
    parallelism: int
    inputs: list[tuple[int, str, Callable[[Any], Any] | None]] = field(default_factory=list)
    is_source: bool = False
    is_sink: bool = False
    columnar_key: str | None = None  # hash partitioning of columnar batches by this column
    split_for: int | None = None  # a source already split: ``operator`` is the share of this subtask


@dataclass
class JobEdge:
    """A network edge between two vertices."""

    source: int  # vertex id
    target: int
    partitioning: str
    key_fn: Callable[[Any], Any] | None = None
    columnar_key: str | None = None
    channel_offset: int = 0  # where this edge's channels start in the target's input gate


@dataclass
class JobVertex:
    """A chain of nodes that runs as one subtask per parallel instance."""

    id: int
    nodes: list[StreamNode]
    parallelism: int
    inputs: list[JobEdge] = field(default_factory=list)
    outputs: list[JobEdge] = field(default_factory=list)

    @property
    def name(self) -> str:
        return " -> ".join(n.name for n in self.nodes)

    @property
    def is_source(self) -> bool:
        return self.nodes[0].is_source


@dataclass
class JobGraph:
    """Vertices in topological order plus their edges."""

    name: str
    vertices: list[JobVertex]
    mode: str  # "streaming" | "batch"

    def vertex(self, vid: int) -> JobVertex:
        return self.vertices[vid]

    def edge_channels(self, edge: JobEdge) -> int:
        """Channels an edge feeds into each target subtask's gate: one (forward) or one per source subtask."""
        return 1 if edge.partitioning == "forward" else self.vertices[edge.source].parallelism

    def gate_channels(self, vertex: JobVertex) -> int:
        return sum(self.edge_channels(e) for e in vertex.inputs)

    @property
    def max_parallelism(self) -> int:
        return max(v.parallelism for v in self.vertices)

    def for_worker(self, index: int) -> JobGraph:
        """This graph as worker ``index`` needs it: every splittable source holds only share ``index``
        (``split(parallelism)[index]``), or nothing where the worker runs no subtask of its vertex.

        A ``from_collection`` of millions of records then ships each worker its own share, not the
        whole collection. The vertices are shallow copies; every other operator is shared.
        """
        vertices = []
        for v in self.vertices:
            nodes = v.nodes
            if v.is_source and callable(getattr(nodes[0].operator, "split", None)):
                src = nodes[0]
                share = src.operator.split(src.parallelism)[index] if index < src.parallelism else None
                nodes = [replace(src, operator=share, split_for=index), *nodes[1:]]
            vertices.append(replace(v, nodes=nodes))
        return replace(self, vertices=vertices)

    def describe(self) -> str:
        lines = [f"job {self.name!r} ({self.mode} mode)"]
        for v in self.vertices:
            ins = ", ".join(f"{e.partitioning} from {e.source}" for e in v.inputs) or "source"
            lines.append(f"  vertex {v.id} x{v.parallelism}: {v.name}  [{ins}]")
        return "\n".join(lines)


def _consumers(nodes: dict[int, StreamNode]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {nid: [] for nid in nodes}
    for node in nodes.values():
        for up, _, _ in node.inputs:
            out[up].append(node.id)
    return out


def build_job_graph(name: str, nodes: list[StreamNode], *, mode: str) -> JobGraph:
    """Chain forward edges and number the vertices in topological order.

    Raises:
        GraphError: a cycle, a dangling input, a partitioning that does not
            exist, or a job without a sink.
    """
    by_id = {n.id: n for n in nodes}
    for n in nodes:
        for up, part, _ in n.inputs:
            if up not in by_id:
                msg = f"operator {n.name!r} reads from node {up}, which is not in the job"
                raise GraphError(msg)
            if part not in PARTITIONINGS:
                msg = f"partitioning must be one of {PARTITIONINGS}; got {part!r} into {n.name!r}"
                raise GraphError(msg)
    if not any(n.is_sink for n in nodes):
        msg = "the job has no sink: add collect(), print() or to_file(path) to a stream"
        raise GraphError(msg)
    consumers = _consumers(by_id)

    def chains_with_upstream(n: StreamNode) -> bool:
        if len(n.inputs) != 1:
            return False
        up, part, _ = n.inputs[0]
        return (part == "forward" and by_id[up].parallelism == n.parallelism
                and len(consumers[up]) == 1)

    # Topological order (Kahn), stable by node id.
    indegree = {n.id: len(n.inputs) for n in nodes}
    order: list[int] = []
    ready = sorted(nid for nid, d in indegree.items() if d == 0)
    while ready:
        nid = ready.pop(0)
        order.append(nid)
        for c in consumers[nid]:
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
                ready.sort()
    if len(order) != len(nodes):
        msg = "the job graph has a cycle"
        raise GraphError(msg)

    vertex_of: dict[int, JobVertex] = {}
    vertices: list[JobVertex] = []
    for nid in order:
        node = by_id[nid]
        if chains_with_upstream(node):
            v = vertex_of[node.inputs[0][0]]
            v.nodes.append(node)
        else:
            v = JobVertex(id=len(vertices), nodes=[node], parallelism=node.parallelism)
            vertices.append(v)
        vertex_of[nid] = v
    for nid in order:
        node = by_id[nid]
        if chains_with_upstream(node):
            continue
        target = vertex_of[nid]
        offset = 0
        for up, part, key_fn in node.inputs:
            source = vertex_of[up]
            if part == "forward" and source.parallelism != target.parallelism:
                part = "rebalance"  # forward needs equal parallelism; spread instead
            edge = JobEdge(source.id, target.id, part, key_fn, node.columnar_key, channel_offset=offset)
            offset += 1 if part == "forward" else source.parallelism
            target.inputs.append(edge)
            source.outputs.append(edge)
    return JobGraph(name=name, vertices=vertices, mode=mode)


__all__ = ["PARTITIONINGS", "JobEdge", "JobGraph", "JobVertex", "StreamNode", "build_job_graph"]
