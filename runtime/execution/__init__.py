"""What runs inside a worker: the job graph, the Operator protocol, subtasks and the per-job loop.

Imports: runtime.memory, runtime.network, runtime.io, runtime.errors. Never
runtime.cluster (the processes) or ``operators`` (concrete operators arrive
pickled and run through :mod:`runtime.execution.task`'s protocol).

- :mod:`~runtime.execution.graph`: logical job graph, chaining into vertices.
- :mod:`~runtime.execution.task`: the Operator protocol and OperatorContext.
- :mod:`~runtime.execution.subtask`: one parallel instance of a vertex.
- :mod:`~runtime.execution.job_run`: one job on one worker and its cooperative loop.
"""

__all__: list[str] = []
