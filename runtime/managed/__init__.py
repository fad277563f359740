"""What operators keep in managed memory: hash aggregation tables, hybrid-hash spilling, external sort,
and the streaming table of keyed accumulators.

Imports: runtime.memory, runtime.io, runtime.errors only (numpy, msgpack, stdlib otherwise); never
runtime.network, the cluster, the execution layer or operators. The operators that use it:
``operators/managed_keyed.py`` (batch aggregations), ``operators/sort.py`` (``sort_by``) and
``operators/managed_streaming.py`` (streaming aggregations with ``state.backend: managed``).
"""

from runtime.managed.hash_table import Agg, FixedHashTable, parse_aggs
from runtime.managed.serialized_table import SerializedBatch, SerializedHashTable
from runtime.managed.share import ManagedShare, SpillStream, mix64, unmix64
from runtime.managed.sort import ExternalSorter, SorterStats
from runtime.managed.spilling import HashAggregator, HashAggregatorStats
from runtime.managed.streaming_table import StreamingFixedState

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
    "StreamingFixedState",
    "mix64",
    "parse_aggs",
    "unmix64",
]
