"""MemoryManager: budgets, all-or-nothing pages, release/release_all, leak reports, threads, a real worker."""

from __future__ import annotations

import logging
import os
import random
import threading

import numpy as np
import pytest
from helpers import SPAWN, reap

from runtime.errors import (
    DoubleFreeError,
    InvalidHandleError,
    InvalidSizeError,
    OutOfMemoryError,
    SegmentFreedError,
    ShmflowError,
)
from runtime.memory import BuddyAllocator, SharedRegion
from runtime.memory.manager import LeakReport, MemoryManager

KiB = 1024
MiB = 1024 * KiB
PAGE = 32 * KiB


@pytest.fixture
def manager(region):
    """A 1 MiB budget over a 2 MiB range: the budget, not the arena, is the limit."""
    mm = MemoryManager.for_range(region, 0, 2 * MiB, budget=1 * MiB, name="worker-0 managed memory")
    yield mm
    mm.close()
    mm.allocator.check_invariants()
    assert mm.allocator.allocated_bytes == 0


# --------------------------------------------------------------------- budget
def test_pages_are_page_sized_segments_of_the_owner(manager):
    pages = manager.allocate_pages("sort-2", 4)
    assert [p.size for p in pages] == [PAGE] * 4
    assert {p.owner for p in pages} == {"sort-2"}
    assert len({p.offset for p in pages}) == 4
    assert manager.owners() == {"sort-2": 4 * PAGE}
    assert manager.available() == 1 * MiB - 4 * PAGE
    assert manager.available_pages() == 28
    assert manager.segments("sort-2") == pages
    assert manager.release(pages) == 4 * PAGE


def test_budget_is_enforced_with_a_message_naming_owner_request_left_and_key(manager):
    manager.allocate_pages("sort-1", 29)  # 928 KiB of 1 MiB: 96 KiB left
    with pytest.raises(OutOfMemoryError, match=r"^cannot allocate 4 pages \(128 KiB\) for 'sort-2': 96 KiB of "
                       r"the 1 MiB managed budget left; raise memory\.managed\.fraction$"):
        manager.allocate_pages("sort-2", 4)
    assert manager.allocate_pages("sort-2", 3)  # exactly what is left
    assert manager.available() == 0
    with pytest.raises(OutOfMemoryError, match=r"^cannot allocate 1 page \(32 KiB\) for 'sort-2': 0 B of"):
        manager.allocate_pages("sort-2", 1)
    assert manager.stats().failed_allocations == 2
    manager.release_all("sort-1", report=False)
    manager.release_all("sort-2", report=False)


def test_allocate_counts_the_rounded_block_against_the_budget(manager):
    seg = manager.allocate("hash-join", 100_000)
    assert seg.size == 128 * KiB
    assert manager.owners() == {"hash-join": 128 * KiB}
    manager.allocate_pages("hash-join", 28)  # 128 KiB + 896 KiB: the whole 1 MiB budget
    with pytest.raises(OutOfMemoryError, match=r"^cannot allocate 1 B \(1 bytes, a 4 KiB block\) for 'x': 0 B of "
                       r"the 1 MiB managed budget left; raise memory\.managed\.fraction$"):
        manager.allocate("x", 1)
    manager.release_all("hash-join", report=False)


def test_a_failed_allocation_leaves_nothing_allocated_even_when_the_arena_fails(region):
    """Budget larger than what the allocator can still give (another user took most of it)."""
    alloc = BuddyAllocator(region, 4096, offset=0, size=1 * MiB)
    other = alloc.allocate(512 * KiB, owner="network buffers")  # shares the allocator
    mm = MemoryManager(alloc, budget=1 * MiB)
    before = alloc.stats()
    with pytest.raises(OutOfMemoryError, match=r"^cannot allocate 20 pages \(640 KiB\) for 'sort': 1 MiB of the "
                       r"1 MiB managed budget left, but the arena's largest free block is 512 KiB; "
                       r"raise memory\.managed\.fraction$") as info:
        mm.allocate_pages("sort", 20)
    assert isinstance(info.value.__cause__, OutOfMemoryError)
    after = alloc.stats()
    assert (after.free_bytes, after.allocated_bytes_by_owner) == (before.free_bytes, before.allocated_bytes_by_owner)
    assert mm.owners() == {} and mm.available() == 1 * MiB
    alloc.check_invariants()
    assert mm.close() == []
    alloc.free(other)


def test_bad_arguments_are_refused(region):
    alloc = BuddyAllocator(region, 4096, size=1 * MiB)
    with pytest.raises(InvalidSizeError, match=r"^page_size must be a power of two >= the allocator's min_block "
                       r"\(4096\); got 3000; change memory\.segment\.size$"):
        MemoryManager(alloc, page_size=3000)
    with pytest.raises(InvalidSizeError, match=r"^managed budget must be in \[1, 1048576\] bytes"):
        MemoryManager(alloc, budget=2 * MiB)
    mm = MemoryManager(alloc)
    with pytest.raises(TypeError, match="n must be an int; got float"):
        mm.allocate_pages("a", 1.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidSizeError, match=r"^number of pages must be >= 0; got -1$"):
        mm.allocate_pages("a", -1)
    with pytest.raises(InvalidSizeError, match=r"^allocation size must be > 0 bytes; got 0$"):
        mm.allocate("a", 0)
    assert mm.allocate_pages("a", 0) == [] and mm.owners() == {}
    assert mm.close() == []


# -------------------------------------------------------------------- release
def test_release_frees_and_later_access_raises(manager):
    (page,) = manager.allocate_pages("map-1", 1)
    page.put_int64(0, 7)
    assert manager.release(page) == PAGE
    with pytest.raises(SegmentFreedError):
        page.get_int64(0)
    assert manager.owners() == {} and manager.available() == 1 * MiB


def test_double_release_and_foreign_segments_are_typed_errors(manager, region):
    (page,) = manager.allocate_pages("map-1", 1)
    manager.release(page)
    with pytest.raises(DoubleFreeError, match=r"^segment at offset \d+ \(32 KiB\) of 'map-1' was released twice$"):
        manager.release(page)
    stranger = BuddyAllocator(region, 4096, offset=2 * MiB, size=1 * MiB).allocate(PAGE, owner="map-1")
    with pytest.raises(InvalidHandleError, match=r"^segment at offset 2097152 \(32 KiB\) was not allocated by "
                       r"worker-0 managed memory; release it where it was allocated$"):
        manager.release(stranger)
    direct = manager.allocator.allocate(PAGE, owner="map-1")  # same allocator, but not through the manager
    with pytest.raises(InvalidHandleError, match="was not allocated by worker-0 managed memory"):
        manager.release(direct)
    manager.allocator.free(direct)
    (bypassed,) = manager.allocate_pages("map-1", 1)
    bypassed.free()
    with pytest.raises(DoubleFreeError, match=r"was freed with seg\.free\(\), bypassing worker-0 managed memory"):
        manager.release(bypassed)
    assert manager.owners() == {}


def test_release_all_returns_bytes_logs_and_records_a_leak(manager, caplog):
    manager.allocate_pages("window-3", 3)
    manager.allocate("window-3", 100 * KiB)
    manager.allocate_pages("sort-1", 1)
    with caplog.at_level(logging.WARNING, logger="shmflow.memory"):
        assert manager.release_all("window-3") == 3 * PAGE + 128 * KiB
    (record,) = caplog.records
    assert record.name == "shmflow.memory" and record.levelno == logging.WARNING
    assert record.getMessage() == ("worker-0 managed memory: owner 'window-3' still held 4 segments (224 KiB, "
                                   "229376 bytes) of managed memory when its task ended; released them")
    assert manager.leak_reports() == [LeakReport("worker-0 managed memory", "window-3", 4, 229376, "release_all")]
    assert manager.owners() == {"sort-1": PAGE}
    assert manager.release_all("window-3") == 0  # nothing left: no second report
    assert len(manager.leak_reports()) == 1


def test_a_task_that_released_everything_leaves_no_report(manager, caplog):
    pages = manager.allocate_pages("map-1", 2)
    manager.release(pages)
    with caplog.at_level(logging.WARNING, logger="shmflow.memory"):
        assert manager.release_all("map-1") == 0
        assert manager.release_all("never-allocated") == 0
        manager.allocate_pages("sorter", 2)
        assert manager.release_all("sorter", report=False) == 2 * PAGE  # a deliberate bulk release
    assert caplog.records == [] and manager.leak_reports() == []


def test_close_reports_every_owner_still_holding_memory_and_refuses_more(region, caplog):
    mm = MemoryManager.for_range(region, 0, 1 * MiB, name="mm")
    mm.allocate_pages("a", 2)
    mm.allocate_pages(("job", 7), 1)  # any hashable owner
    held = mm.segments("a")
    with caplog.at_level(logging.WARNING, logger="shmflow.memory"):
        leaks = mm.close()
    assert leaks == [LeakReport("mm", "a", 2, 2 * PAGE, "close"), LeakReport("mm", ("job", 7), 1, PAGE, "close")]
    assert [r.getMessage() for r in caplog.records] == [str(leak) for leak in leaks]
    assert str(leaks[1]) == ("mm: owner ('job', 7) still held 1 segment (32 KiB, 32768 bytes) of managed "
                             "memory when the manager closed; released them")
    assert mm.allocator.allocated_bytes == 0 and mm.closed
    assert mm.close() == []
    with pytest.raises(ShmflowError, match=r"^cannot allocate 1 page \(32 KiB\) for 'a': mm is closed$"):
        mm.allocate_pages("a", 1)
    with pytest.raises(DoubleFreeError, match=r"was released twice \(the manager was closed\)$"):
        mm.release(held[0])
    assert mm.stats().leaks == 2


def test_stats_and_high_water_mark(manager):
    a = manager.allocate_pages("a", 4)
    manager.allocate_pages("b", 2)
    manager.release(a[:2])
    s = manager.stats()
    assert s == manager.statistics()
    assert (s.used_bytes, s.available_bytes, s.segments, s.high_water_mark) == (4 * PAGE, MiB - 4 * PAGE, 4, 6 * PAGE)
    assert (s.allocations, s.releases, s.failed_allocations, s.leaks) == (2, 2, 0, 0)
    assert s["bytes_by_owner"] == {"a": 2 * PAGE, "b": 2 * PAGE}
    assert s.as_dict()["budget"] == MiB and s.page_size == PAGE and not s.closed
    manager.release_all("a", report=False)
    manager.release_all("b", report=False)


def test_concurrent_allocate_and_release_from_threads_keeps_the_books(manager):
    errors: list[BaseException] = []
    start = threading.Barrier(4, timeout=30)

    def task(owner: str, seed: int) -> None:
        rnd = random.Random(seed)
        held = []
        try:
            start.wait()
            for _ in range(300):
                if held and rnd.random() < 0.5:
                    manager.release(held.pop(rnd.randrange(len(held))))
                else:
                    try:
                        held.extend(manager.allocate_pages(owner, rnd.randint(1, 3)))
                    except OutOfMemoryError:
                        pass  # four tasks compete for 32 pages
            manager.release(held)
        except BaseException as exc:  # noqa: BLE001 - pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=task, args=(f"task-{i}", i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert manager.owners() == {} and manager.available() == MiB
    manager.allocator.check_invariants()
    assert manager.allocator.allocated_bytes == 0
    assert manager.stats().high_water_mark <= MiB


def test_unclosed_manager_holding_memory_warns_when_collected(region):
    mm = MemoryManager.for_range(region, 0, MiB, name="forgotten")
    mm.allocate_pages("a", 1)
    with pytest.warns(ResourceWarning, match=r"^forgotten was garbage-collected holding 1 segments \(32 KiB\)"):
        del mm


# -------------------------------------------------------------- real process
def _worker_task(name: str, offset: int, size: int, conn) -> None:
    """A worker: managed memory over its arena of the coordinator's region; one task leaks on purpose."""
    region = SharedRegion.attach(name)
    try:
        mm = MemoryManager.for_range(region, offset, size, budget=size // 2, name=f"worker {os.getpid()}")
        pages = mm.allocate_pages("sort-0", 4)
        for i, page in enumerate(pages):
            page.as_array(np.uint64)[:] = i + 1
        try:
            mm.allocate_pages("sort-0", size // PAGE)
        except OutOfMemoryError as exc:
            oom = str(exc)
        conn.send(([p.handle() for p in pages], oom))
        conn.recv()  # the task ends: the worker takes everything back
        released = mm.release_all("sort-0")
        conn.send((released, [str(r) for r in mm.leak_reports()], mm.close()))
    finally:
        region.close()


def test_worker_process_release_all_frees_the_arena_pages_the_coordinator_sees():
    with SharedRegion.create(4 * MiB) as region:
        parent, child = SPAWN.Pipe()
        proc = SPAWN.Process(target=_worker_task, args=(region.name, 2 * MiB, MiB, child))
        proc.start()
        try:
            assert parent.poll(60), "worker did not report"
            handles, oom = parent.recv()
            assert oom == ("cannot allocate 32 pages (1 MiB) for 'sort-0': 384 KiB of the 512 KiB managed "
                           "budget left; raise memory.managed.fraction")
            views = [region.segment(h, readonly=True) for h in handles]
            assert all(v.offset >= 2 * MiB for v in views)
            assert [int(v.as_array(np.uint64).sum()) for v in views] == [(i + 1) * PAGE // 8 for i in range(4)]
            parent.send("task ended")
            assert parent.poll(30), "worker did not release"
            released, reports, close_leaks = parent.recv()
            assert released == 4 * PAGE and close_leaks == []
            assert reports == [f"worker {proc.pid}: owner 'sort-0' still held 4 segments (128 KiB, 131072 bytes) "
                               f"of managed memory when its task ended; released them"]
            assert all(v.freed for v in views)  # the generation table tells the coordinator
            proc.join(30)
            assert proc.exitcode == 0
        finally:
            reap(proc)


def test_each_owner_has_a_peak_until_peaks_are_reset(manager):
    pages = manager.allocate_pages("sort[0]", 4)
    manager.allocate_pages("join[0]", 1)
    for seg in pages[:3]:
        manager.release(seg)
    assert manager.owner_figures("sort[0]") == (manager.page_size, 4 * manager.page_size)
    manager.reset_peaks()  # a new job: peaks start from what each owner holds
    assert manager.owner_figures("sort[0]") == (manager.page_size, manager.page_size)
    assert manager.owner_figures("nobody") == (0, 0)
    manager.release_all("sort[0]", report=False)
    manager.release_all("join[0]", report=False)
