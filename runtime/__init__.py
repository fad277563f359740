"""shmflow's runtime: shared memory, network buffers, coordinator and workers.

Public re-exports only: ``from runtime import StreamEnvironment``.
"""

from runtime._version import __version__
from runtime.errors import JobFailedError, ShmflowError

__all__ = [
    "JobFailedError", "KeyedProcessFunction", "ListStateDescriptor", "MapStateDescriptor", "ReducingStateDescriptor",
    "RuntimeContext", "ShmflowError", "StateTtlConfig", "StreamEnvironment", "TimeDomain", "ValueStateDescriptor",
    "__version__",
]

#: Names re-exported on first use (so that `import runtime.memory` stays light, and layered): name -> module.
_LAZY = {
    "StreamEnvironment": "runtime.api",
    "KeyedProcessFunction": "operators.process",
    "RuntimeContext": "operators.process",
    "TimeDomain": "operators.process",
    "ValueStateDescriptor": "runtime.state.descriptors",
    "ListStateDescriptor": "runtime.state.descriptors",
    "MapStateDescriptor": "runtime.state.descriptors",
    "ReducingStateDescriptor": "runtime.state.descriptors",
    "StateTtlConfig": "runtime.state.descriptors",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is not None:
        import importlib
        return getattr(importlib.import_module(module), name)
    msg = f"module 'runtime' has no attribute {name!r}"
    raise AttributeError(msg)
