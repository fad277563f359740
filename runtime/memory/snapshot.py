"""Snapshot: the base of every ``stats()`` dataclass, readable as attributes or as a mapping.

Imports: nothing from the project.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # pragma: no cover
    from _typeshed import DataclassInstance

__all__ = ["Snapshot"]


class Snapshot:
    """Mixin for frozen statistics dataclasses: ``stats.free_bytes == stats["free_bytes"]``."""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        # Every subclass is a dataclass; the mixin itself cannot say so to the type checker.
        return asdict(cast("DataclassInstance", self))
