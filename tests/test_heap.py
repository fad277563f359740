"""The heap setting of data-plane processes: freed message memory stays mapped for the next message."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, resource, sys
    from runtime.network.heap import keep_message_memory
    if sys.argv[1] == "keep":
        assert keep_message_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    MiB = 1 << 20

    def messages():  # what a gate does: 8 messages of 1 MiB arrive, are read, and are freed
        blocks = [libc.malloc(MiB) for _ in range(8)]
        for block in blocks:
            ctypes.memset(block, 1, MiB)
        for block in blocks:
            libc.free(block)

    for _ in range(3):
        messages()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        messages()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout)


def test_message_memory_is_kept_mapped_instead_of_faulted_in_again_per_message():
    """glibc gives the freed top of the heap back and faults it in again for the next messages: 2,048 pages
    per round here. With keep_message_memory the rounds after the first reuse the same pages."""
    from runtime.network.heap import keep_message_memory

    if not keep_message_memory():
        pytest.skip("the C library has no mallopt (not glibc)")
    pages_per_round = 8 * (1 << 20) // 4096
    assert _page_faults("default") >= 5 * pages_per_round  # what the setting is for (glibc's default)
    assert _page_faults("keep") < pages_per_round // 4
