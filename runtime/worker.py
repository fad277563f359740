"""Deprecated path: the worker process lives in runtime.cluster.worker. Kept for one release (see
CHANGELOG.md)."""

from __future__ import annotations

import warnings

from runtime.cluster.worker import Worker, main, worker_main  # noqa: F401

warnings.warn(
    "runtime.worker moved; import from runtime.cluster.worker instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "Worker",
    "main",
    "worker_main",
]
