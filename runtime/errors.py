"""The exception hierarchy of shmflow.

Role: every error shmflow raises on purpose is a ``ShmflowError``. Messages
follow one grammar: *subject, rule; got actual*, with the numbers involved and
a remedy (a config key or a call) where one exists.

Imports: nothing from the project.
"""

from __future__ import annotations


class ShmflowError(Exception):
    """Base of everything shmflow raises on purpose."""


class ConfigError(ShmflowError, ValueError):
    """A configuration key has a bad value or combination: names key, value, what is valid."""


class OutOfMemoryError(ShmflowError, MemoryError):
    """An allocator, budget or /dev/shm is exhausted: requested, largest free, total free, key to raise."""


class InsufficientNetworkBuffersError(ShmflowError):
    """A job needs more network buffers than exist: required, available, key to change."""


class InvalidSizeError(ShmflowError, ValueError):
    """A size argument is zero, negative or otherwise unusable."""


class DoubleFreeError(ShmflowError):
    """A segment was freed (or released) twice."""


class InvalidHandleError(ShmflowError):
    """A handle or segment is foreign to this allocator/region, malformed, or stale (generation moved on)."""


class SegmentFreedError(ShmflowError):
    """A segment was accessed after it was freed (use after free)."""


class SegmentIndexError(ShmflowError, IndexError):
    """A read or write falls outside a segment's bounds."""


class ReadOnlySegmentError(ShmflowError, PermissionError):
    """A write was attempted on a segment that is read-only in this process."""


class ClosedResourceError(ShmflowError):
    """A pool, channel or region was used after it was closed or destroyed."""


class SegmentBusyError(ShmflowError, RuntimeError):
    """A segment was submitted to the IOManager while a request on it is still pending."""


class RegionError(ShmflowError):
    """A shared region cannot be created or attached (bad name, bad header, closed)."""


class SpillError(ShmflowError, OSError):
    """A spill file could not be written or read back intact (full disk, missing or corrupt file)."""


class BrokenChannelError(ShmflowError):
    """A channel's peer went away (its worker died or closed the channel): names the channel.

    "Broken", not "closed": this is what the other side did to the channel, not
    a use of a channel this side closed (that is :class:`ClosedResourceError`).
    """


#: The name of :class:`BrokenChannelError` before 0.2; kept for one release.
ChannelClosedError = BrokenChannelError


class TransportError(ShmflowError):
    """A ZeroMQ endpoint could not be bound or connected: names the endpoint."""


class AuthenticationError(ShmflowError):
    """A control message failed its HMAC check (no or wrong cluster secret), or a secret file is unsafe."""


class ProtocolError(ShmflowError):
    """A control message of an unknown type or protocol version, or with fields of the wrong type."""


class InvalidArgumentError(ShmflowError, ValueError):
    """An argument of the public API (StreamEnvironment, DataStream, an operator, a source) has a bad value:
    names the argument, what is valid and what was given. (A wrong *type* raises builtin TypeError.)"""


class GraphError(ShmflowError, ValueError):
    """A job graph that cannot run: a cycle, a dangling edge, a parallelism that does not fit."""


class DeserializationError(ShmflowError):
    """A corrupt, truncated or oversize frame: names the channel and offset."""


class RecordTooLargeError(ShmflowError, ValueError):
    """A frame over ``network.max-record-size``: names its size and the limit. The channel layer splits
    a batch that is too large; it raises only for a single record (or row) over the limit."""


class NestingTooDeepError(ShmflowError, ValueError):
    """A record (or event payload) nests lists, tuples and dicts deeper than the serializer's limit
    (``runtime.network.serializer.MAX_NESTING``): names the limit and where the record passes it."""


class StateAccessError(ShmflowError, RuntimeError):
    """Keyed state was read or written outside a keyed context (in ``open``, say): names the state."""


class StateSerializationError(ShmflowError, TypeError):
    """A state value cannot be stored (it is not msgpack-able): names the state (its descriptor's name) and the
    value's type."""


class CheckpointError(ShmflowError):
    """A checkpoint cannot be written, or read back intact: names the file and what is wrong (truncated:
    expected and found bytes; checksum mismatch; not a shmflow checkpoint; unsupported format version)."""


class WorkerLostError(ShmflowError):
    """A worker process died; carries ``worker_id``, ``pid`` and ``exitcode``."""

    def __init__(self, msg: str, *, worker_id: int | None = None, pid: int | None = None,
                 exitcode: int | None = None) -> None:
        super().__init__(msg)
        self.worker_id = worker_id
        self.pid = pid
        self.exitcode = exitcode


class JobFailedError(ShmflowError):
    """A job failed: names the operator, the worker and the cause (a user function's traceback).

    ``final``: restarting cannot help (a configuration the job cannot run with, its timeout, or the restart
    strategy gave up); the restart strategy is not asked.
    """

    def __init__(self, msg: str, *, final: bool = False) -> None:
        super().__init__(msg)
        self.final = final


class JobCancelledError(JobFailedError):
    """A job was cancelled (``PATCH /jobs/<id>`` with the cluster secret); never restarted."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, final=True)


__all__ = [
    "ShmflowError",
    "ConfigError",
    "OutOfMemoryError",
    "InsufficientNetworkBuffersError",
    "InvalidSizeError",
    "DoubleFreeError",
    "InvalidHandleError",
    "SegmentFreedError",
    "SegmentIndexError",
    "JobCancelledError",
    "ReadOnlySegmentError",
    "ClosedResourceError",
    "RegionError",
    "SegmentBusyError",
    "SpillError",
    "BrokenChannelError",
    "ChannelClosedError",
    "TransportError",
    "AuthenticationError",
    "ProtocolError",
    "InvalidArgumentError",
    "GraphError",
    "DeserializationError",
    "RecordTooLargeError",
    "NestingTooDeepError",
    "StateAccessError",
    "StateSerializationError",
    "CheckpointError",
    "WorkerLostError",
    "JobFailedError",
]
