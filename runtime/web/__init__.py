"""Observability: the workers' stats blocks, the coordinator's web server, its REST API and Prometheus metrics.

Imports: runtime.memory, runtime.state (its stats type), runtime.execution (job graphs, subtask counters),
runtime.config, runtime.errors (prometheus_client). Never runtime.cluster: the coordinator hands the server
a :class:`runtime.web.view.ClusterView` to read, and its workers write their slots of the stats block.
"""
