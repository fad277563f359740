"""A tour of shmflow's memory core: one shared region, a buddy allocator, and a worker process
that reads and writes a segment through a handle, zero-copy.

Run: python examples/memory_demo.py
"""

from __future__ import annotations

import multiprocessing

import numpy as np

from runtime.memory import BuddyAllocator, SharedRegion, format_bytes


def worker(region_name: str, handle: tuple, conn) -> None:
    """In another process: attach by name, turn the handle back into the same bytes."""
    region = SharedRegion.attach(region_name)
    seg = region.segment(handle)
    data = seg.as_array(np.float64)
    conn.send(float(data.sum()))
    data *= 2  # the coordinator sees this write: same physical pages
    del data, seg
    region.close()


def main() -> None:
    with SharedRegion.create(64 << 20) as region:
        print(f"created {region.name}: {format_bytes(region.size)} usable")
        alloc = BuddyAllocator(region, min_block=4096)
        seg = alloc.allocate(1_000_000, owner="demo")
        print(f"allocated {format_bytes(seg.size)} at offset {seg.offset} for 1,000,000 bytes")
        values = seg.as_array(np.float64)
        values[:] = np.arange(values.size, dtype=np.float64)
        expected = float(values.sum())

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(region.name, tuple(seg.handle()), child))
        proc.start()
        total = parent.recv()
        proc.join()
        print(f"worker pid {proc.pid} summed the segment: {total:,.0f} (expected {expected:,.0f})")
        print(f"worker doubled it in place: values[3] = {values[3]:.0f}")

        small = [alloc.allocate(n, owner="demo-small") for n in (4096, 5000, 40_000)]
        stats = alloc.stats()
        print(f"allocated by owner: {stats.allocated_bytes_by_owner}")
        print(f"largest free block {format_bytes(stats.largest_free_block)}, "
              f"fragmentation {stats.fragmentation:.2f}")
        del values
        for s in [seg, *small]:
            s.free()
        print(f"after freeing everything: one free block of {format_bytes(alloc.stats().largest_free_block)}")
    print("region unlinked; /dev/shm is clean")


if __name__ == "__main__":
    main()
