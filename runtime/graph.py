"""Deprecated path: the job graph lives in runtime.execution.graph. Kept for one release (see
CHANGELOG.md)."""

from __future__ import annotations

import warnings

from runtime.errors import GraphError  # noqa: F401
from runtime.execution.graph import JobEdge, JobGraph, JobVertex, StreamNode, build_job_graph  # noqa: F401

warnings.warn(
    "runtime.graph moved; import from runtime.execution.graph instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "GraphError",
    "JobEdge",
    "JobGraph",
    "JobVertex",
    "StreamNode",
    "build_job_graph",
]
