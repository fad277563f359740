"""Network buffers and channels: buffer pools, the record serializer, ZeroMQ transports, credits.

Imports: runtime.memory, runtime.errors (and pyzmq, msgpack).
"""

from runtime.network.buffer_pool import (
    BufferDescriptor,
    LocalBufferPool,
    NetworkBuffer,
    NetworkBufferPool,
    buffer_view,
)

__all__ = ["BufferDescriptor", "LocalBufferPool", "NetworkBuffer", "NetworkBufferPool", "buffer_view"]
