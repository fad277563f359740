"""Deprecated path: the Operator protocol lives in runtime.execution.task. Kept for one release (see
CHANGELOG.md)."""

from __future__ import annotations

import warnings

from runtime.execution.task import (  # noqa: F401
    MAX_WATERMARK,
    Batch,
    Emit,
    Operator,
    OperatorContext,
    SinkOperator,
    SourceOperator,
    TimestampedBatch,
    batch_len,
)

warnings.warn(
    "runtime.task moved; import from runtime.execution.task instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "Batch",
    "Emit",
    "MAX_WATERMARK",
    "Operator",
    "OperatorContext",
    "SinkOperator",
    "SourceOperator",
    "TimestampedBatch",
    "batch_len",
]
