"""shmflow's operator library: concrete operators implementing runtime.execution.task's protocol.

Role: the operators the facade (runtime.api) instantiates. Modules:
``stateless`` (Map, Filter, FlatMap, MapBatches, WithTimestamps), ``aggregations``
(Aggregation, count/sum/min/max/reduce), ``keyed`` (KeyedAggregate, KeyedCombine;
re-exports the aggregations), ``keyed_vectorized`` (the numpy fast path of
count/sum/min/max), ``window`` (assigners, WindowAggregate), ``sources`` and ``sinks``.

The aggregation factories ``count, sum, min, max, reduce`` shadow builtins,
so they are not re-exported here: use ``operators.keyed.sum(...)``.

Imports: runtime.execution.task, runtime.errors, stdlib, numpy. Never runtime.api,
runtime.cluster or runtime.network.
"""

from operators.keyed import (
    Aggregation,
    Count,
    KeyedAggregate,
    KeyedCombine,
    Max,
    Min,
    Reduce,
    Sum,
    combinable,
    partial_key,
)
from operators.sinks import CollectSink, FileSink, PrintSink
from operators.sources import CollectionSource, GeneratorSource, TextFileSource
from operators.stateless import Filter, FlatMap, Map, MapBatches, WithTimestamps, to_records
from operators.window import (
    SlidingEventTimeWindows,
    SlidingProcessingTimeWindows,
    TumblingEventTimeWindows,
    TumblingProcessingTimeWindows,
    WindowAggregate,
    WindowAssigner,
)

__all__ = [
    "Map", "Filter", "FlatMap", "MapBatches", "WithTimestamps", "to_records",
    "Aggregation", "Count", "Sum", "Min", "Max", "Reduce", "combinable", "partial_key",
    "KeyedAggregate", "KeyedCombine",
    "WindowAssigner", "TumblingEventTimeWindows", "SlidingEventTimeWindows",
    "TumblingProcessingTimeWindows", "SlidingProcessingTimeWindows", "WindowAggregate",
    "CollectionSource", "GeneratorSource", "TextFileSource",
    "CollectSink", "PrintSink", "FileSink",
]
