"""Network buffers and channels: buffer pools, the record serializer, ZeroMQ transports, credits.

Imports: runtime.memory, runtime.errors (and pyzmq, msgpack).
"""
