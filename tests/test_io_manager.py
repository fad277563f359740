"""IOManager: spill and read back through managed pages; full disk, missing and corrupt files; cleanup."""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import subprocess
import sys
import textwrap
import threading
import traceback
import zlib

import numpy as np
import pytest
from helpers import SPAWN, reap, wait_until

from runtime.errors import (
    InvalidHandleError,
    InvalidSizeError,
    OutOfMemoryError,
    ReadOnlySegmentError,
    SegmentFreedError,
    SpillError,
)
from runtime.io import BlockRef, IOManager, SegmentBusyError
from runtime.memory import SharedRegion
from runtime.memory.manager import MemoryManager

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PAGE = 32 * KiB


@pytest.fixture
def mm():
    with SharedRegion.create(4 * MiB) as region:
        manager = MemoryManager.for_range(region, 0, 4 * MiB, name="test managed memory")
        yield manager
        assert manager.close() == [], "a test leaked managed memory"


@pytest.fixture
def io(tmp_path):
    with IOManager(str(tmp_path), threads=2) as manager:
        yield manager
    assert not os.path.exists(manager.directory)


def io_threads(manager: IOManager) -> list[threading.Thread]:
    prefix = manager._core.thread_prefix
    return [t for t in threading.enumerate() if t.name.startswith(prefix + "_") or t.name.endswith(prefix)]


def fill(page, seed: int | np.random.Generator) -> bytes:
    """Seeded random bytes into ``page``; returns their SHA-1 (computed here, not by the IOManager)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    rng.random(out=page.as_array(np.float64))
    return hashlib.sha1(page.view()).digest()


# ----------------------------------------------------------------- round trip
def test_write_then_read_returns_the_same_bytes_and_a_checked_block_ref(mm, io, tmp_path):
    src, dst = mm.allocate_pages("sort-1", 2)
    digest = fill(src, 1)
    with io.create_spill_file(hint="sort run/1") as f:
        assert os.path.dirname(f.path) == io.directory and io.directory.startswith(str(tmp_path))
        assert os.path.basename(io.directory).startswith("shmflow-spill-")
        assert f.name == "sort_run_1-000000.spill"
        ref = f.write(src, timeout=30)
        assert ref == BlockRef(f.path, 0, PAGE, zlib.crc32(src.view()))
        half = f.write(src, nbytes=PAGE // 2, timeout=30)
        assert (half.offset, half.nbytes, f.size, f.blocks) == (PAGE, PAGE // 2, PAGE + PAGE // 2, 2)
        assert os.path.getsize(f.path) == PAGE + PAGE // 2
        assert f.read(ref, dst, timeout=30) == PAGE
        assert hashlib.sha1(dst.view()).digest() == digest
        dst.fill(0)
        assert io.read(half, dst, timeout=30) == PAGE // 2  # the manager finds the file by the ref's path
        assert dst.get_bytes(0, PAGE // 2) == src.get_bytes(0, PAGE // 2)
        assert dst.get_bytes(PAGE // 2, 8) == bytes(8)
        assert f.read_copy(half) == src.get_bytes(0, PAGE // 2)  # onto the heap, no segment
    assert not os.path.exists(f.path) and f.deleted
    mm.release_all("sort-1", report=False)


def test_many_async_writes_and_reads_complete_and_are_counted(mm, io):
    pages = mm.allocate_pages("hash-join", 64)
    digests = [fill(p, i) for i, p in enumerate(pages)]
    f = io.create_spill_file("join")
    refs = [fut.result(timeout=30) for fut in [f.write_async(p) for p in pages]]
    assert sorted(r.offset for r in refs) == [i * PAGE for i in range(64)]
    for p in pages:
        p.fill(0)
    assert [fut.result(timeout=30) for fut in [f.read_async(r, p) for r, p in zip(refs, pages)]] == [PAGE] * 64
    assert [hashlib.sha1(p.view()).digest() for p in pages] == digests
    s = io.stats()
    assert s == io.statistics()
    assert (s.files, s.files_created, s.blocks_written, s.bytes_written) == (1, 1, 64, 64 * PAGE)
    assert (s.blocks_read, s.bytes_read, s.pending_requests, s.failed_requests) == (64, 64 * PAGE, 0, 0)
    assert s["bytes_on_disk"] == 64 * PAGE and s.as_dict()["threads"] == 2 and not s.closed
    f.delete()
    assert io.stats().files_deleted == 1 and io.stats().bytes_on_disk == 0
    mm.release_all("hash-join", report=False)


def test_spill_1_gib_through_a_16_mib_budget_reads_back_identical_bytes(tmp_path):
    """64 runs of 16 MiB: fill every page of the budget, spill it, refill; then read every run back.

    Each run is written as 8 gather blocks of 64 pages (as a sorter spills a run). Checksums are
    SHA-1 of each page, computed while generating: the IOManager's own CRC-32 is not what is trusted here.
    """
    rounds, budget, per_block = 64, 16 * MiB, 64
    with SharedRegion.create(budget) as region, IOManager(str(tmp_path)) as io:
        mm = MemoryManager.for_range(region, 0, budget, page_size=PAGE, name="sorter memory")
        pages = mm.allocate_pages("sort-0", budget // PAGE)
        with pytest.raises(OutOfMemoryError, match=r"0 B of the 16 MiB managed budget left"):
            mm.allocate_pages("sort-0", 1)
        groups = [pages[i:i + per_block] for i in range(0, len(pages), per_block)]
        runs = []
        for r in range(rounds):
            f = io.create_spill_file(f"run{r}")
            digests, futures = [], []
            for g, group in enumerate(groups):  # a group is spilled while the next one is generated
                rng = np.random.default_rng([r, g])
                digests.extend(fill(page, rng) for page in group)
                futures.append(f.write_async(group))
            runs.append((f, [fut.result(timeout=60) for fut in futures], digests))
        assert io.stats().bytes_written == rounds * budget == GiB
        for r, (f, refs, digests) in enumerate(runs):
            futures = [f.read_async(ref, group) for ref, group in zip(refs, groups)]
            got = []
            for fut, group in zip(futures, groups):  # check a group while the next ones are read
                assert fut.result(timeout=60) == per_block * PAGE
                got.extend(hashlib.sha1(page.view()).digest() for page in group)
            assert got == digests, f"run {r}: {sum(a != b for a, b in zip(got, digests))} pages differ"
            f.delete()
        s = io.stats()
        assert (s.bytes_read, s.blocks_read, s.files, s.failed_requests) == (GiB, rounds * len(groups), 0, 0)
        assert mm.release_all("sort-0", report=False) == budget
        assert mm.close() == []


def test_gather_write_and_scatter_read_of_more_pages_than_one_system_call_takes(tmp_path):
    """1100 pages of 4 KiB: more than IOV_MAX (1024) buffers, so the transfer is split and resumed."""
    with SharedRegion.create(32 * MiB) as region, IOManager(str(tmp_path)) as io:
        mm = MemoryManager.for_range(region, 0, 32 * MiB, page_size=4096)
        src = mm.allocate_pages("sort", 1100)
        dst = mm.allocate_pages("sort", 1100)
        for i, page in enumerate(src):
            page.as_array(np.uint32)[:] = i
        with io.create_spill_file("gather") as f:
            ref = f.write(src, nbytes=1100 * 4096 - 100, timeout=30)  # the last page only in part
            assert (ref.nbytes, os.path.getsize(f.path)) == (1100 * 4096 - 100, 1100 * 4096 - 100)
            assert f.read(ref, dst, timeout=30) == ref.nbytes
            assert [int(p.get_uint32(0)) for p in dst] == list(range(1100))
            assert dst[-1].get_bytes(0, 3996) == src[-1].get_bytes(0, 3996)
            whole = mm.allocate("sort", 8 * MiB)  # one big segment reads the gathered block back in one piece
            f.read(ref, whole, timeout=30)
            assert int(whole.as_array(np.uint32, count=1, pos=4096 * 1099)[0]) == 1099
            with pytest.raises(SegmentBusyError, match=r"pending request \(it appears twice in this one\)"):
                f.write([src[0], src[1], src[0]], timeout=30)
            with pytest.raises(InvalidSizeError, match=r"^2 segments of 8 KiB together \(8192 bytes\) is too "
                               r"small for the block of 4505500 bytes"):
                f.read(ref, dst[:2], timeout=30)
        mm.release_all("sort", report=False)
        assert mm.close() == []


# ------------------------------------------------------------------ ownership
def test_a_pending_segment_belongs_to_the_io_manager(mm, tmp_path):
    src, other = mm.allocate_pages("sort-1", 2)
    fill(src, 3)
    gate = threading.Event()
    with IOManager(str(tmp_path), threads=1) as io, io.create_spill_file() as f:
        blocker = io._core.executor.submit(gate.wait, 30)  # occupy the only I/O thread
        pending = f.write_async(src)
        assert (io.stats().pending_requests, io.stats().pending_segments) == (1, 1)
        with pytest.raises(SegmentBusyError, match=r"^segment at offset \d+ \(32 KiB\) belongs to the IOManager "
                           r"until its pending write to .*spill-000000\.spill completes; wait for that future "
                           r"before submitting the segment again$"):
            f.write_async(src)
        queued = f.write_async(other)
        assert queued.cancel()  # a cancelled request gives its segment back
        gate.set()
        assert blocker.result(timeout=30)
        ref = pending.result(timeout=30)
        again = f.write(src, timeout=30)  # the segment is the caller's again as soon as the future completes
        assert f.read(ref, other, timeout=30) == PAGE and f.read(again, other, timeout=30) == PAGE
        assert other.get_bytes(0, PAGE) == src.get_bytes(0, PAGE)
        assert io.stats().pending_requests == 0
    mm.release_all("sort-1", report=False)


def test_bad_requests_are_refused_at_once(mm, io):
    big = mm.allocate("sort-1", 64 * KiB)
    small = mm.allocate("sort-1", 16 * KiB)
    f = io.create_spill_file("x")
    ref = f.write(big, timeout=30)
    with pytest.raises(InvalidSizeError, match=r"^segment of 16 KiB \(16384 bytes\) is too small for the block of "
                       r"65536 bytes at offset 0 of spill file .*x-000000\.spill; read into at least 65536 bytes$"):
        f.read_async(ref, small)
    with pytest.raises(InvalidSizeError, match=r"^nbytes to write must be in \[1, 16384\] \(what the segments "
                       r"hold\); got 16385$"):
        f.write_async(small, nbytes=16 * KiB + 1)
    with pytest.raises(TypeError, match=r"^expected a MemorySegment or a non-empty sequence of them to write; "
                       r"got bytes$"):
        f.write_async(b"abc")  # type: ignore[arg-type]
    with pytest.raises(InvalidHandleError, match=r"lies beyond the 65536 bytes written"):
        f.read(ref._replace(offset=PAGE), big, timeout=30)
    other = io.create_spill_file("y")
    with pytest.raises(InvalidHandleError, match=r"^block ref names spill file .*x-000000\.spill, not "):
        other.read(ref, big, timeout=30)
    with pytest.raises(InvalidHandleError, match=r"is not a spill file of the IOManager"):
        io.read(ref._replace(path="/etc/passwd"), big, timeout=30)
    readonly = mm.allocator.region.segment(big.handle(), readonly=True)
    with pytest.raises(ReadOnlySegmentError, match="into a read-only segment"):
        f.read(ref, readonly, timeout=30)
    mm.release(small)
    with pytest.raises(SegmentFreedError, match=r"^cannot write a freed segment"):
        f.write(small, timeout=30)
    mm.release_all("sort-1", report=False)


# ------------------------------------------------------------------- failures
def test_missing_spill_file_is_a_spill_error_not_silent_loss(mm, io):
    src, dst = mm.allocate_pages("sort-1", 2)
    f = io.create_spill_file("gone")
    ref = f.write(src, timeout=30)
    os.remove(f.path)  # a temp cleaner, an operator with rm, ...
    with pytest.raises(SpillError, match=r"^spill file .*gone-000000\.spill is missing \(removed from its "
                       r"directory by someone else\); refusing to read block at offset 0 \(32768 bytes\)"):
        f.read(ref, dst, timeout=30)
    with pytest.raises(SpillError, match=r"is missing"):
        f.read_async(ref, dst).result(timeout=30)  # the same error through the future
    assert io.stats().failed_requests == 2
    f.delete()
    with pytest.raises(SpillError, match=r"^cannot read from spill file .*gone-000000\.spill: it was deleted; "
                       r"block at offset 0 \(32768 bytes\) is gone$"):
        f.read(ref, dst, timeout=30)
    with pytest.raises(SpillError, match=r"^cannot read block ref of spill file .*: the file was deleted$"):
        io.read(ref, dst, timeout=30)
    with pytest.raises(SpillError, match=r"^cannot write to spill file .*: it was deleted$"):
        f.write(src, timeout=30)
    mm.release_all("sort-1", report=False)


def test_corrupt_and_truncated_blocks_are_spill_errors_naming_file_and_offset(mm, io):
    a, b, dst = mm.allocate_pages("sort-1", 3)
    fill(a, 1)
    fill(b, 2)
    f = io.create_spill_file("bad")
    ref_a, ref_b = f.write(a, timeout=30), f.write(b, timeout=30)
    fd = os.open(f.path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, PAGE + 100)
        os.pwrite(fd, bytes([byte[0] ^ 0x01]), PAGE + 100)  # flip one bit of block b
    finally:
        os.close(fd)
    assert f.read(ref_a, dst, timeout=30) == PAGE  # the other block is intact
    with pytest.raises(SpillError, match=rf"^spill file .*bad-000000\.spill is corrupt: block at offset {PAGE} "
                       rf"\(32768 bytes\) has crc32 0x[0-9a-f]{{8}}, expected {ref_b.crc32:#010x}$"):
        f.read_async(ref_b, dst).result(timeout=30)
    with pytest.raises(SpillError, match=rf"^spill file .*bad-000000\.spill is corrupt: block at offset {PAGE} "):
        f.read_copy(ref_b)
    os.truncate(f.path, PAGE + 1000)
    for read in (lambda: f.read(ref_b, dst, timeout=30), lambda: f.read_copy(ref_b)):
        with pytest.raises(SpillError, match=rf"^spill file .*bad-000000\.spill is truncated: block at offset {PAGE} "
                           rf"\(32768 bytes\) needs 32768 bytes, only 1000 could be read \(the file has 33768 "
                           rf"bytes\)$"):
            read()
    mm.release_all("sort-1", report=False)


def _child_fills_the_disk(conn) -> None:
    """A spawned child whose file size limit (RLIMIT_FSIZE) is 48 KiB: the second 32 KiB block cannot fit."""
    import resource
    import signal
    try:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of a signal
        results = {}
        with SharedRegion.create(MiB) as region, IOManager() as io:
            mm = MemoryManager.for_range(region, 0, MiB)
            first, second, dst = mm.allocate_pages("sort-1", 3)
            fill(first, 1)
            fill(second, 2)
            f = io.create_spill_file("full")
            ref = f.write(first, timeout=30)
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (48 * KiB, hard))
            for how in ("future", "sync"):
                try:
                    if how == "future":
                        f.write_async(second).result(timeout=30)
                    else:
                        f.write(second, timeout=30)
                    results[how] = "no error"
                except SpillError as exc:
                    results[how] = (str(exc), exc.errno, isinstance(exc, OSError))
            got = f.read(ref, dst, timeout=30)
            results["earlier block"] = (got, dst.get_bytes(0, PAGE) == first.get_bytes(0, PAGE))
            results["stats"] = (io.stats().failed_requests, io.stats().blocks_written)
            results["directory"] = io.directory
            mm.close()
        conn.send(("ok", results))
    except BaseException:  # noqa: BLE001 - the thread's failure is re-raised in the test
        conn.send(("error", traceback.format_exc()))


def test_full_disk_is_a_spill_error_with_file_bytes_and_free_space():
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_child_fills_the_disk, args=(child,))
    proc.start()
    try:
        assert parent.poll(60), "child did not report"
        status, results = parent.recv()
        assert status == "ok", results
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        reap(proc)
    message, err, is_oserror = results["future"]
    assert err == errno.EFBIG and is_oserror
    assert message.startswith(f"cannot write 32 KiB (32768 bytes) to spill file {results['directory']}/"
                              f"full-000000.spill at offset {PAGE}: File too large (EFBIG) after 16384 bytes; ")
    assert message.endswith(f" free in {results['directory']}; free disk space, raise the file size limit, "
                            f"or pass IOManager(spill_dir=...) on a larger disk")
    sync_message, sync_err, _ = results["sync"]
    assert sync_err == errno.EFBIG and f"at offset {2 * PAGE}: File too large (EFBIG) after 0 bytes" in sync_message
    assert results["earlier block"] == (PAGE, True)
    assert results["stats"] == (2, 1)
    assert not os.path.exists(results["directory"])


# -------------------------------------------------------------------- cleanup
def test_close_joins_the_threads_removes_the_directory_and_refuses_more(mm, tmp_path):
    page = mm.allocate_pages("sort-1", 1)[0]
    io = IOManager(str(tmp_path), threads=3)
    f = io.create_spill_file()
    futures = [f.write_async(page, nbytes=1024)]
    assert io_threads(io)
    io.close()
    assert futures[0].done() and futures[0].result().nbytes == 1024  # pending work finished first
    assert io_threads(io) == [] and not os.path.exists(io.directory) and io.closed
    assert io.stats().closed and io.stats().files == 0
    io.close()  # idempotent
    with pytest.raises(SpillError, match=r"^cannot create a spill file in .*: the IOManager of .* is closed$"):
        io.create_spill_file()
    with pytest.raises(SpillError, match=r"^cannot write to spill file .*: the IOManager of .* is closed$"):
        f.write(page, timeout=30)
    mm.release_all("sort-1", report=False)


def test_close_from_a_done_callback_finishes_on_a_helper_thread(mm, tmp_path):
    page = mm.allocate_pages("sort-1", 1)[0]
    io = IOManager(str(tmp_path), threads=1)
    f = io.create_spill_file()
    gate, closed = threading.Event(), threading.Event()
    called_on: list[str] = []
    io._core.executor.submit(gate.wait, 30)  # hold the only I/O thread until the callback is attached

    def on_done(_):
        called_on.append(threading.current_thread().name)
        io.close()
        closed.set()

    future = f.write_async(page)
    future.add_done_callback(on_done)
    gate.set()
    assert closed.wait(30) and future.result(timeout=30).nbytes == PAGE
    assert called_on == [f"{io._core.thread_prefix}_0"]
    wait_until(lambda: not os.path.exists(io.directory), timeout=30, msg="spill directory removed")
    wait_until(lambda: not io_threads(io), timeout=30, msg="I/O threads and the helper joined")
    mm.release_all("sort-1", report=False)


def test_an_unclosed_io_manager_warns_and_cleans_up_when_collected(tmp_path):
    io = IOManager(str(tmp_path))
    io.create_spill_file().delete()
    directory, prefix = io.directory, io._core.thread_prefix
    with pytest.warns(ResourceWarning, match=r"^unclosed IOManager of .*; removing its spill files$"):
        del io
        gc.collect()
    assert not os.path.exists(directory)
    assert not [t for t in threading.enumerate() if t.name.startswith(prefix)]


def test_a_bad_spill_dir_is_a_spill_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(SpillError, match=rf"^cannot create a spill directory in {missing}: No such file or "
                       r"directory; pass a writable spill_dir$"):
        IOManager(str(missing))
    with pytest.raises(ValueError, match=r"^threads must be an int >= 1; got 0$"):
        IOManager(str(tmp_path), threads=0)


EXIT_SCRIPT = textwrap.dedent("""
    import sys
    from runtime.io import IOManager
    from runtime.memory import SharedRegion
    from runtime.memory.manager import MemoryManager
    region = SharedRegion.create(1 << 20)
    mm = MemoryManager.for_range(region, 0, 1 << 20)
    io = IOManager(sys.argv[1])
    f = io.create_spill_file("left-behind")
    f.write(mm.allocate_pages("sort", 1)[0])
    print(io.directory, flush=True)
    mm.close()
    region.close()
    # no io.close(): the interpreter's exit must remove the directory and join the threads
""")


def test_interpreter_exit_removes_the_spill_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-W", "error", "-c", EXIT_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    directory = proc.stdout.strip()
    assert directory.startswith(str(tmp_path)) and not os.path.exists(directory)
    assert os.listdir(tmp_path) == []


SPILL_AND_DIE = """
import os, signal, sys
import numpy as np
from runtime.io import IOManager
from runtime.memory import SharedRegion, MemoryManager
io = IOManager(sys.argv[1])
with SharedRegion.create(1 << 20) as region:
    mm = MemoryManager.for_range(region, 0, 1 << 20)
    (page,) = mm.allocate_pages("op", 1)
    with io.create_spill_file(hint="doomed") as f:
        f.write(page)
        print(io.directory, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_processs_spill_directory_is_removed_by_the_next_io_manager_and_by_shmflow_sweep(tmp_path):
    import subprocess
    import sys

    from runtime.io import sweep_spill_dirs

    def spill_and_die() -> str:
        proc = subprocess.run([sys.executable, "-c", SPILL_AND_DIE, str(tmp_path)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == -9, proc.stderr
        left = proc.stdout.strip()
        assert os.path.isdir(left) and os.listdir(left)  # SIGKILL: nothing could clean up
        return left

    left = spill_and_die()
    with IOManager(str(tmp_path)) as io:  # the next job's IOManager in the same directory
        assert not os.path.exists(left)
        assert sweep_spill_dirs(str(tmp_path)) == []  # its own directory belongs to a live process
        assert os.path.isdir(io.directory)
    left = spill_and_die()
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "sweep", "-D", f"io.tmp-dirs={tmp_path}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"removed {left}" in out.stdout
    assert os.listdir(tmp_path) == []
