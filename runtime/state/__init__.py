"""Keyed state of streaming operators: descriptors, state objects, backends (heap and managed), timers.

Imports: runtime.errors, runtime.memory, runtime.io, runtime.managed (numpy, msgpack).
"""
