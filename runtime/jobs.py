"""Deprecated path: job shipping and results live in runtime.cluster.client. Kept for one release (see
CHANGELOG.md)."""

from __future__ import annotations

import warnings

from runtime.cluster.client import JobResult, check_shippable, decode_collect, worker_payloads  # noqa: F401
from runtime.cluster.progress import summarize  # noqa: F401

warnings.warn(
    "runtime.jobs moved; import from runtime.cluster.client instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "JobResult",
    "check_shippable",
    "decode_collect",
    "summarize",
    "worker_payloads",
]
