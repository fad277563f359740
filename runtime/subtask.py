"""Deprecated path: subtasks live in runtime.execution.subtask. Kept for one release (see
CHANGELOG.md)."""

from __future__ import annotations

import warnings

from runtime.execution.subtask import OperatorFailure, Subtask  # noqa: F401

warnings.warn(
    "runtime.subtask moved; import from runtime.execution.subtask instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "OperatorFailure",
    "Subtask",
]
