"""The workloads behind ``shmflow bench`` (not collected by pytest)."""

#: The submodules (``from runtime.bench import *`` imports them); ``runner`` is ``shmflow bench``.
__all__ = ["alloc", "baselines", "keyed", "runner", "serializer", "shmflow_runs", "workloads"]
