"""``shmflow layout``: a picture of how a cluster with a given configuration carves its region.

Imports: runtime.memory, runtime.network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.memory import BuddyAllocator, SharedRegion, format_bytes
from runtime.memory.layout import render_layout
from runtime.network import NetworkBufferPool

if TYPE_CHECKING:
    from runtime.config import ShmflowConfig


def render_cluster_layout(config: ShmflowConfig, *, width: int = 64) -> str:
    """A text picture of how a cluster with ``config`` carves its region, built with the real parts.

    Creates the region (then removes it), grants one arena per worker as the
    coordinator does, and carves each arena's network buffer pool as a worker
    does; managed memory is allocated on demand from the rest of the arena.
    """
    plan = config.memory_plan()
    with SharedRegion.create(config.region_size) as region:
        coordinator = BuddyAllocator(region, config.min_block)
        views = [("region (coordinator's allocator)", coordinator)]
        pools = []
        for wid in range(config.workers):
            arena = coordinator.allocate(plan.arena_bytes, owner=f"worker-{wid} arena")
            alloc = BuddyAllocator(region, config.min_block, offset=arena.offset, size=arena.size)
            pools.append(NetworkBufferPool(alloc, plan.network_buffers_per_worker, config.segment_size,
                                           owner=f"worker-{wid} network buffers"))
            views.append((f"worker {wid} arena", alloc))
        text = render_layout(views, width=width)
        for pool in pools:
            pool.close()
    managed = (f"managed memory: up to {format_bytes(plan.managed_bytes_per_worker)} per worker, "
               f"allocated on demand from the free part of its arena (memory.managed.fraction)")
    return f"{text}\n{managed}"


__all__ = ["render_cluster_layout"]
