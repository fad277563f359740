"""The processes and what they say to each other: coordinator, workers, the embedded cluster, the client.

Imports: runtime.execution, runtime.network, runtime.memory, runtime.config,
runtime.errors. Never ``operators``.

- :mod:`~runtime.cluster.protocol`: every control message, typed, versioned, signed.
- :mod:`~runtime.cluster.coordinator`: owns the region, grants arenas, runs jobs.
- :mod:`~runtime.cluster.worker`: the worker process, host of job runs.
- :mod:`~runtime.cluster.local`: the embedded cluster (coordinator + N worker processes).
- :mod:`~runtime.cluster.client`: submitting a job and receiving its results.
- :mod:`~runtime.cluster.progress`: the terminal progress line and job summaries.
- :mod:`~runtime.cluster.layout`: ``shmflow layout``'s picture of a cluster's region.
"""

__all__: list[str] = []
