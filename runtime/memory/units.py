"""Byte counts for people (``format_bytes(16384) == '16 KiB'``) and free space on a file system.

Imports: nothing from the project.
"""

from __future__ import annotations

import os

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: int | float) -> str:
    """A short binary-unit rendering: exact when ``n`` is a whole multiple, else one decimal."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            if value == int(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
        value /= 1024
    msg = "unreachable"
    raise AssertionError(msg)


def free_bytes(path: str) -> int | None:
    """Bytes available to unprivileged users on the file system holding ``path``; None where unknown.

    The one free-space check of the project: /dev/shm before a region is
    created (runtime.memory.region, runtime.config) and spill directories
    (runtime.io).
    """
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):  # no such path, or no statvfs on this platform
        return None
    return st.f_bavail * st.f_frsize


__all__ = ["format_bytes", "free_bytes"]
