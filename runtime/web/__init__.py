"""Observability: the workers' stats blocks, the coordinator's web server, its REST API and Prometheus metrics.

Imports: runtime.memory, runtime.execution (job graphs), runtime.config, runtime.errors. Never
runtime.cluster: the coordinator hands the server a :class:`runtime.web.view.ClusterView` to read.
"""
