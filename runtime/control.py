"""Deprecated path: the control protocol lives in runtime.cluster.protocol. Kept for one release (see
CHANGELOG.md)."""

from __future__ import annotations

import warnings

from runtime.cluster.protocol import DEFAULT_SECRET_FILE, load_or_create_secret, new_secret  # noqa: F401
from runtime.errors import AuthenticationError  # noqa: F401

warnings.warn(
    "runtime.control moved; import from runtime.cluster.protocol instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "AuthenticationError",
    "DEFAULT_SECRET_FILE",
    "load_or_create_secret",
    "new_secret",
]
