"""Shared memory: one region per cluster, carved by a buddy allocator into segments.

Imports: runtime.errors only (nothing of the network, processes or operators).
"""

from runtime.memory.buddy import AllocatorStats, BuddyAllocator
from runtime.memory.manager import LeakReport, MemoryManager, MemoryManagerStats
from runtime.memory.region import SharedRegion, list_regions, sweep
from runtime.memory.segment import MemorySegment, SegmentHandle
from runtime.memory.units import format_bytes

__all__ = [
    "AllocatorStats",
    "BuddyAllocator",
    "LeakReport",
    "MemoryManager",
    "MemoryManagerStats",
    "MemorySegment",
    "SegmentHandle",
    "SharedRegion",
    "format_bytes",
    "list_regions",
    "sweep",
]
