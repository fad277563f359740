"""SharedRegion across real processes: attach by name, generations, cleanup on every kind of exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import SPAWN, reap, wait_until

from runtime.errors import InvalidHandleError, OutOfMemoryError, RegionError, SegmentFreedError
from runtime.memory import BuddyAllocator, SharedRegion, sweep
from runtime.memory.region import HEADER_FIXED, is_orphaned

MiB = 1 << 20


def shm_path(name: str) -> str:
    return os.path.join("/dev/shm", name)


def test_create_gives_size_usable_bytes_with_the_header_on_top(shm_prefix):
    with SharedRegion.create(3 * MiB + 5) as region:
        assert region.name.startswith(shm_prefix)
        assert region.size == 3 * MiB + 5
        assert len(region.buf) == region.size
        st = os.stat(shm_path(region.name))
        assert st.st_size >= region.size + HEADER_FIXED
        assert st.st_mode & 0o777 == 0o600
        assert region.creator_pid == os.getpid()
    assert not os.path.exists(shm_path(region.name))


def test_close_is_idempotent_and_attach_after_unlink_fails():
    region = SharedRegion.create(MiB)
    name = region.name
    region.close()
    region.close()
    with pytest.raises(RegionError, match=rf"no shared region named '{name}'"):
        SharedRegion.attach(name)


def test_region_larger_than_dev_shm_is_refused_before_creating_anything():
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(OutOfMemoryError, match=r"/dev/shm has .* free \(containers often give 64 MB\); "
                       r"lower memory\.region\.size"):
        SharedRegion.create(1 << 50)
    assert set(os.listdir("/dev/shm")) == before


def test_attach_refuses_a_block_that_is_not_a_region(shm_prefix):
    from runtime.memory.region import _unlink_name, _Untracked
    name, mapping = _Untracked.open(f"{shm_prefix}{os.getpid()}-notours", create=True, size=4096)
    try:
        with pytest.raises(RegionError, match="is not a shmflow region"):
            SharedRegion.attach(name)
    finally:
        mapping.close()
        _unlink_name(name)


# ---------------------------------------------------------------- cross-process
def _child_reads_and_writes(name, handle, conn):
    region = SharedRegion.attach(name)
    seg = region.segment(handle)
    arr = seg.as_array(np.uint64)
    total = int(arr.sum(dtype=np.uint64))
    arr[:] = arr * 2  # writes the parent will see
    seg.put_bytes(0, b"child wrote")
    conn.send(("ok", total, os.getpid()))
    conn.recv()  # wait for the parent to free the block
    try:
        seg.get_int64(0)
        conn.send("no error")
    except SegmentFreedError as exc:
        conn.send(f"freed: {exc}")
    try:
        region.segment(handle)
        conn.send("no error")
    except InvalidHandleError as exc:
        conn.send(f"stale: {exc}")
    del arr, seg
    region.close()


def test_spawned_child_reads_and_writes_through_a_handle():
    with SharedRegion.create(8 * MiB) as region:
        alloc = BuddyAllocator(region, min_block=4096)
        seg = alloc.allocate(1 * MiB, owner="test")
        arr = seg.as_array(np.uint64)
        arr[:] = np.arange(arr.size, dtype=np.uint64)
        parent, child = SPAWN.Pipe()
        proc = SPAWN.Process(target=_child_reads_and_writes, args=(region.name, seg.handle(), child))
        proc.start()
        try:
            assert parent.poll(60), "child did not report"
            status, total, pid = parent.recv()
            assert status == "ok" and pid != os.getpid()
            assert total == arr.size * (arr.size - 1) // 2
            assert seg.get_bytes(0, 11) == b"child wrote"
            assert arr[5] == 10 and arr[-1] == 2 * (arr.size - 1)
            del arr
            seg.free()
            parent.send("freed")
            assert parent.poll(30)
            assert parent.recv().startswith("freed: get_int64 on a freed segment")
            assert parent.poll(30)
            assert parent.recv().startswith("stale: stale handle for offset 0: generation 0, region has 1")
            proc.join(30)
            assert proc.exitcode == 0
        finally:
            reap(proc)


ATTACH_SCRIPT = textwrap.dedent("""
    import sys
    from runtime.memory import SharedRegion
    region = SharedRegion.attach(sys.argv[1])
    seg = region.segment([int(x) for x in sys.argv[2:5]])
    seg.put_int64(0, 1234)
    print("attached", flush=True)
""")


def test_attaching_process_exit_neither_unlinks_nor_warns():
    """Python 3.11's resource tracker would unlink the block when an attacher exits, and warn."""
    with SharedRegion.create(MiB) as region:
        seg = BuddyAllocator(region).allocate(4096)
        args = [str(x) for x in seg.handle()]
        out = subprocess.run([sys.executable, "-c", ATTACH_SCRIPT, region.name, *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "attached"
        assert out.stderr == ""
        assert os.path.exists(shm_path(region.name))
        assert seg.get_int64(0) == 1234
        SharedRegion.attach(region.name).close()  # still attachable


# ---------------------------------------------------------------------- cleanup
CREATOR_SCRIPT = textwrap.dedent("""
    import sys, time
    from runtime.memory import SharedRegion
    mode = sys.argv[1]
    region = SharedRegion.create(1 << 20)
    print(region.name, flush=True)
    if mode == "exit":
        sys.exit(0)
    if mode == "raise":
        raise RuntimeError("boom")
    sys.stdin.readline()   # wait for a signal
""")


def _start_creator(mode):
    proc = subprocess.Popen([sys.executable, "-c", CREATOR_SCRIPT, mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    name = proc.stdout.readline().strip()
    assert name, proc.stderr.read()
    return proc, name


@pytest.mark.parametrize(("mode", "sig", "exitcode"), [
    ("exit", None, 0),
    ("raise", None, 1),
    ("wait", signal.SIGTERM, -signal.SIGTERM),
    ("wait", signal.SIGINT, -signal.SIGINT),  # KeyboardInterrupt, re-raised as the signal
])
def test_creator_unlinks_on_exit_exception_and_signals(mode, sig, exitcode):
    proc, name = _start_creator(mode)
    try:
        if sig is not None:
            assert os.path.exists(shm_path(name))
            proc.send_signal(sig)
        proc.wait(30)
        assert proc.returncode == exitcode, proc.stderr.read()
        assert not os.path.exists(shm_path(name))
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()


def _create_and_wait(conn):
    region = SharedRegion.create(MiB)
    conn.send(region.name)
    conn.recv()  # never answered: the parent SIGKILLs us


def test_sweep_removes_the_block_of_a_sigkilled_creator_and_spares_live_ones(shm_prefix):
    with SharedRegion.create(MiB) as live:
        parent, child = SPAWN.Pipe()
        proc = SPAWN.Process(target=_create_and_wait, args=(child,))
        proc.start()
        try:
            assert parent.poll(60)
            name = parent.recv()
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(30)
            assert proc.exitcode == -signal.SIGKILL
        finally:
            reap(proc)
        assert os.path.exists(shm_path(name)), "a SIGKILLed creator cannot clean up by itself"
        assert is_orphaned(name) and not is_orphaned(live.name)
        removed = sweep(shm_prefix)
        assert removed == [name]
        assert not os.path.exists(shm_path(name))
        assert os.path.exists(shm_path(live.name))


def test_next_start_up_sweeps_dead_blocks(shm_prefix):
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_create_and_wait, args=(child,))
    proc.start()
    try:
        assert parent.poll(60)
        name = parent.recv()
        proc.kill()
        proc.join(30)
    finally:
        reap(proc)
    with SharedRegion.create(MiB):  # sweeps on start-up
        wait_until(lambda: not os.path.exists(shm_path(name)), timeout=5, msg=f"{name} swept")


def test_sweep_removes_the_block_of_a_sigkilled_creator_that_is_a_zombie(shm_prefix):
    # `shmflow sweep` (runtime.memory.sweep): a creator that was SIGKILLed but not yet reaped by its parent
    # still has a pid; its state in /proc/<pid>/stat is Z, and that is dead.
    code = ("from runtime.memory import SharedRegion; r = SharedRegion.create(1 << 20); "
            "print(r.name, flush=True); input()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        name = proc.stdout.readline().strip()
        assert name.startswith(shm_prefix)
        os.kill(proc.pid, signal.SIGKILL)  # and no wait(): the child stays a zombie

        def state() -> bytes:
            with open(f"/proc/{proc.pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0]
        wait_until(lambda: state() == b"Z", timeout=10, msg=f"pid {proc.pid} to become a zombie")
        assert is_orphaned(name)
        assert sweep(shm_prefix) == [name]
        assert not os.path.exists(shm_path(name))
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
