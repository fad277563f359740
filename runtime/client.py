"""Deprecated path: the client lives in runtime.cluster.client. Kept for one release (see
CHANGELOG.md)."""

from __future__ import annotations

import warnings

from runtime.cluster.client import submit  # noqa: F401

warnings.warn(
    "runtime.client moved; import from runtime.cluster.client instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "submit",
]
