"""Spilling: the IOManager writes memory segments to temp files and reads them back in the background.

Imports: runtime.errors, runtime.memory only (never runtime.network, runtime.config or runtime.cluster).
"""

from runtime.io.manager import IOManager, IOManagerStats, sweep_spill_dirs
from runtime.io.spill import BlockRef, SegmentBusyError, SpillFile

__all__ = ["BlockRef", "IOManager", "IOManagerStats", "SegmentBusyError", "SpillFile", "sweep_spill_dirs"]
