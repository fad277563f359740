"""``shmflow layout``: how a cluster carves its region, planned from a configuration or live from a standing one.

Imports: runtime.memory, runtime.network, runtime.state.backend, runtime.cluster.protocol, runtime.errors (pyzmq).

Live, under each operator's managed pages, the state backend kept in them
(``state.backend: managed``): its entries, bytes in memory and on disk, how
reads were served, and one row per size class of its small-object allocator
(:mod:`runtime.state.bins`): objects, bytes used, slots and fill.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import zmq

from runtime.cluster import protocol as control
from runtime.cluster.protocol import ClusterLayout, Inspect
from runtime.errors import ProtocolError, TransportError
from runtime.memory import BuddyAllocator, SharedRegion, format_bytes
from runtime.memory.layout import AllocatorSnapshot, render_layout
from runtime.network import NetworkBufferPool
from runtime.network.transport import connect, context, make_socket
from runtime.state.backend import BackendStats

if TYPE_CHECKING:
    from runtime.config import ShmflowConfig


def render_cluster_layout(config: ShmflowConfig, *, width: int = 64) -> str:
    """A text picture of how a cluster with ``config`` carves its region, built with the real parts.

    Creates the region (then removes it), grants one arena per worker as the
    coordinator does, and carves each arena's network buffer pool as a worker
    does; managed memory is allocated on demand from the rest of the arena. With checkpointing on, each
    worker slot also has its checkpoint area (state.checkpoints.shared-memory.size), outside its arena.
    """
    plan = config.memory_plan()
    with SharedRegion.create(plan.shm_bytes) as region:
        coordinator = BuddyAllocator(region, config.min_block)
        views = [("region (coordinator's allocator)", coordinator)]
        pools = []
        for wid in range(config.workers):
            arena = coordinator.allocate(plan.arena_bytes, owner=f"worker-{wid} arena")
            if plan.checkpoint_bytes_per_worker:
                coordinator.allocate(plan.checkpoint_bytes_per_worker, owner=f"worker-{wid} checkpoints")
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


def inspect_cluster(endpoint: str, *, secret_file: str | None = None, timeout: float = 10.0,
                    max_message_size: int = control.DEFAULT_MAX_MESSAGE_SIZE) -> ClusterLayout:
    """Ask the standing coordinator at ``endpoint`` how its region is carved now (also while a job runs).

    Raises:
        TransportError: no answer within ``timeout`` (names the endpoint and the secret file to check).
    """
    secret = control.load_or_create_secret(secret_file, create=False)
    sock = make_socket(context(), zmq.DEALER)
    try:
        control.secure_client(sock, secret, endpoint, max_message_size=max_message_size)
        connect(sock, endpoint)
        control.send(sock, secret, Inspect())
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if sock.poll(int(left * 1000) + 1):
                message = control.recv(sock, secret)
                if isinstance(message, ClusterLayout):
                    return message
        msg = (f"no answer from the coordinator at {endpoint} within {timeout:g}s: is it running, and does "
               f"{secret_file or control.DEFAULT_SECRET_FILE} hold the cluster's secret?")
        raise TransportError(msg)
    finally:
        sock.close(linger=0)


def render_state(stats: BackendStats) -> list[str]:
    """The lines of a state backend: entries, bytes in memory and on disk, cache hit rate; a row per bin."""
    lookups = stats.cache_hits + stats.cache_misses
    reads = (f", cache hit rate {stats.cache_hits / lookups:.0%} of {lookups:,} reads" if lookups
             else ", no reads yet")
    lines = [f"{stats.backend} state: {stats.entries:,} entries, {format_bytes(stats.bytes_in_memory)} in memory, "
             f"{format_bytes(stats.bytes_on_disk)} on disk{reads}"]
    if stats.bins:
        lines.append(f"{'bin':>8} {'objects':>10} {'bytes used':>11} {'slots':>10} {'fill':>5}")
        for size, objects, nbytes, slots in stats.bins:
            name = f"{size} B" if size else "large"  # size class 0: objects with a block of their own
            lines.append(f"{name:>8} {objects:>10,} {format_bytes(nbytes):>11} {slots:>10,} "
                         f"{objects / slots if slots else 0.0:>5.0%}")
    return lines


def render_live_layout(layout: ClusterLayout, *, width: int = 64) -> str:
    """A text picture of a standing cluster's region: the coordinator's arenas, then each worker's arena
    as its last heartbeat reported it (network buffers, each operator's managed pages, free blocks), with
    the state backend kept in an operator's pages under them (:func:`render_state`).

    Raises:
        ProtocolError: a snapshot or state stats in ``layout`` are malformed.
    """
    views: list[tuple[str, AllocatorSnapshot]] = [("region (coordinator's allocator)",
                                                   AllocatorSnapshot.from_wire(layout.region))]
    missing = []
    for entry in layout.workers:
        if len(entry) != 3:
            msg = f"a worker entry of a cluster layout must be [worker, pid, arena]; got {entry!r}"
            raise ProtocolError(msg)
        wid, pid, arena = entry
        if arena is None:
            missing.append(f"worker {wid} (pid {pid}): no report of its arena yet")
        else:
            views.append((f"worker {wid} arena (pid {pid})", AllocatorSnapshot.from_wire(arena)))
    details = {owner: render_state(BackendStats.from_wire(stats))
               for by_owner in layout.state.values() for owner, stats in by_owner.items()}
    head = f"running job {layout.job!r}" if layout.job else "no job running"
    return "\n".join([head, render_layout(views, width=width, details=details), *missing])


__all__ = ["inspect_cluster", "render_cluster_layout", "render_live_layout"]
