"""Deprecated path: the coordinator lives in runtime.cluster.coordinator, the embedded cluster in
runtime.cluster.local, the client's run_job is runtime.cluster.client.execute_job. Kept for one
release (see CHANGELOG.md)."""

from __future__ import annotations

import warnings

from runtime.cluster.client import execute_job as run_job  # noqa: F401
from runtime.cluster.coordinator import Coordinator, WorkerHandle  # noqa: F401
from runtime.cluster.layout import render_cluster_layout  # noqa: F401
from runtime.cluster.local import LocalCluster  # noqa: F401
from runtime.cluster.progress import progress_line  # noqa: F401

warnings.warn(
    "runtime.coordinator moved; import from runtime.cluster.coordinator instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "Coordinator",
    "LocalCluster",
    "WorkerHandle",
    "progress_line",
    "render_cluster_layout",
    "run_job",
]
