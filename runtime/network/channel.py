"""Deprecated path: the sending side lives in runtime.network.partition, the receiving side in
runtime.network.gate. Kept for one release (see CHANGELOG.md)."""

from __future__ import annotations

import warnings

from runtime.errors import BrokenChannelError, ChannelClosedError  # noqa: F401
from runtime.network.gate import GateStats, InputGate, ReceivedBuffer  # noqa: F401
from runtime.network.partition import (  # noqa: F401
    TRANSPORTS,
    OutputChannel,
    PartitionStats,
    ResultPartition,
    pool_hello_fields,
)

warnings.warn(
    "runtime.network.channel moved; import from runtime.network.partition instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "BrokenChannelError",
    "ChannelClosedError",
    "GateStats",
    "InputGate",
    "OutputChannel",
    "PartitionStats",
    "ReceivedBuffer",
    "ResultPartition",
    "TRANSPORTS",
    "pool_hello_fields",
]
