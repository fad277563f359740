"""Managed memory for batch operators: hash aggregation tables, hybrid-hash spilling, external sort.

Imports: runtime.memory, runtime.io, runtime.errors only (numpy, msgpack, stdlib otherwise); never
runtime.network, the cluster, the execution layer or operators.

Not yet wired into operators: ``operators/keyed.py`` still aggregates in heap dicts.
"""

from runtime.managed.hash_table import Agg, FixedHashTable, parse_aggs
from runtime.managed.serialized_table import SerializedBatch, SerializedHashTable
from runtime.managed.share import ManagedShare, SpillStream, mix64, unmix64
from runtime.managed.sort import ExternalSorter, SorterStats
from runtime.managed.spilling import HashAggregator, HashAggregatorStats

__all__ = [
    "Agg",
    "ExternalSorter",
    "FixedHashTable",
    "HashAggregator",
    "HashAggregatorStats",
    "ManagedShare",
    "SerializedBatch",
    "SerializedHashTable",
    "SorterStats",
    "SpillStream",
    "mix64",
    "parse_aggs",
    "unmix64",
]
