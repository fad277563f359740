"""shmflow's runtime: shared memory, network buffers, coordinator and workers.

Public re-exports only.
"""

from runtime._version import __version__
from runtime.errors import ShmflowError

__all__ = ["ShmflowError", "__version__"]
