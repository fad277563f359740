"""Session-wide leak checks: no ``shmflow-*`` block in /dev/shm and no child process left behind.

Every region this test session (and its children) creates gets the prefix
``shmflow-t<pid>-`` through ``SHMFLOW_SHM_PREFIX``, and every process it starts
inherits ``SHMFLOW_TEST_SESSION``, so leaks are found exactly, even when other
shmflow processes run on the same machine.
"""

from __future__ import annotations

import os
import secrets
import signal

import pytest
from helpers import FakeClock, wait_until

from runtime.memory import BuddyAllocator, SharedRegion

SESSION_PREFIX = f"shmflow-t{os.getpid()}-"
SESSION_TOKEN = secrets.token_hex(8)
os.environ["SHMFLOW_SHM_PREFIX"] = SESSION_PREFIX
os.environ["SHMFLOW_TEST_SESSION"] = SESSION_TOKEN
os.environ.setdefault("PYTHONHASHSEED", "0")


def session_blocks() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(SESSION_PREFIX))


def session_processes() -> list[tuple[int, str]]:
    """Live processes (other than this one and the resource tracker) started by this session."""
    marker = f"SHMFLOW_TEST_SESSION={SESSION_TOKEN}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state == b"Z" or "resource_tracker" in cmdline:
            continue  # zombies are reaped by their parent; the tracker lives as long as we do
        found.append((int(entry), cmdline))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_leaks_in_session():
    """Fails the run if a shmflow block or a child process outlives the session."""
    yield
    problems = []
    try:
        wait_until(lambda: not session_blocks(), timeout=10, msg="shmflow blocks to vanish")
    except AssertionError:
        leaked = session_blocks()
        problems.append(f"/dev/shm still holds {leaked}")
        for name in leaked:  # clean up only after failing
            os.unlink(os.path.join("/dev/shm", name))
    try:
        wait_until(lambda: not session_processes(), timeout=10, msg="child processes to exit")
    except AssertionError:
        orphans = session_processes()
        problems.append(f"processes still alive: {orphans}")
        for pid, _ in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if problems:
        pytest.fail("leak check failed: " + "; ".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def no_blocks_leaked_by_test():
    """Attributes a leaked block to the test that made it."""
    before = set(session_blocks())
    yield
    try:
        wait_until(lambda: not (set(session_blocks()) - before), timeout=5,
                   msg="blocks created by this test to vanish")
    except AssertionError:
        leaked = sorted(set(session_blocks()) - before)
        for name in leaked:
            os.unlink(os.path.join("/dev/shm", name))
        pytest.fail(f"test leaked shared-memory blocks: {leaked}", pytrace=False)


@pytest.fixture
def shm_prefix() -> str:
    return SESSION_PREFIX


# ------------------------------------------------------------- shared fixtures
@pytest.fixture
def region():
    """A real 4 MiB shared region, closed and unlinked after the test."""
    with SharedRegion.create(4 << 20) as r:
        yield r


@pytest.fixture
def alloc(region):
    """A buddy allocator over the whole of ``region``, 4 KiB minimum blocks."""
    return BuddyAllocator(region, min_block=4096)


@pytest.fixture
def clock():
    """A fake monotonic clock: ``clock.advance(30)`` instead of waiting (see helpers.FakeClock)."""
    return FakeClock()
