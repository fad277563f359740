"""Managed memory for batch operators: hash aggregation tables, hybrid-hash spilling, external sort.

Imports: runtime.memory, runtime.io, runtime.errors only (numpy, msgpack, stdlib otherwise); never
runtime.network, the cluster, the execution layer or operators.
"""
