"""Snapshot: the base of every ``stats()`` dataclass, readable as attributes or as a mapping.

Imports: nothing from the project.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


class Snapshot:
    """Mixin for frozen statistics dataclasses: ``stats.free_bytes == stats["free_bytes"]``."""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]
