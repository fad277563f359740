"""shmflow's runtime: shared memory, network buffers, coordinator and workers.

Public re-exports only: ``from runtime import StreamEnvironment``.
"""

from runtime._version import __version__
from runtime.errors import JobFailedError, ShmflowError

__all__ = ["JobFailedError", "ShmflowError", "StreamEnvironment", "__version__"]


def __getattr__(name: str) -> object:
    # The facade imports the operator library; load it on first use so that
    # `import runtime.memory` stays light (and layered).
    if name == "StreamEnvironment":
        from runtime.api import StreamEnvironment
        return StreamEnvironment
    msg = f"module 'runtime' has no attribute {name!r}"
    raise AttributeError(msg)
