"""The C heap of a process that moves data through zmq: keep freed message memory for the next message.

Imports: the standard library only.

zmq allocates every message it receives (and pyzmq every copy it sends) with
``malloc``, and frees it once the last view of it is gone. glibc gives the
free top of a heap back to the kernel once more than its trim threshold lies
there (128 KiB at start; twice the largest mmapped block freed so far, up to
64 MiB), and a thread's arena (zmq's I/O thread allocates what it receives)
does so with ``MADV_DONTNEED``: the next message faults in every page again,
zeroed by the kernel. A tcp channel that receives 1 MiB messages took about
130,000 page faults per GiB that way, as many as it moved pages.

:func:`keep_message_memory` fixes both thresholds, so that messages up to
``MMAP_THRESHOLD`` come from the heap and up to ``TRIM_THRESHOLD`` of free heap
stays mapped per arena: a process's heap settles at its working set (a few
messages in flight) instead of being unmapped and faulted in per message.
Workers call it at start (:mod:`runtime.cluster.worker`), and so do the
benchmark processes that stand in for them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Free memory at the top of an arena's heap kept mapped (per arena: the main thread's, zmq's I/O thread's).
TRIM_THRESHOLD = 16 << 20
#: Allocations from this size on are mmapped of their own (and unmapped when freed); below it, the heap.
#: Above ``partition.TCP_MESSAGE_BYTES`` and the largest buffer size, so data messages come from the heap.
MMAP_THRESHOLD = 4 << 20


@functools.cache
def keep_message_memory() -> bool:
    """Fix glibc's trim and mmap thresholds for this process (once). False where the C library has no
    ``mallopt`` (not glibc): nothing changes there.

    Process: any; call it early, from the main thread. The setting is the process's, for all its threads.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_message_memory"]
