"""The public facade: StreamEnvironment and DataStream, a fluent API in the spirit of Flink's DataStream.

Imports: the one runtime module allowed to import ``operators``; also
runtime.execution.graph, runtime.config, runtime.errors and, lazily, the cluster
(runtime.cluster.client) that executes jobs.

A program builds :class:`StreamNode` s through DataStream calls; ``execute()``
turns them into a job graph (chaining forward edges; in batch mode putting a
combiner before each keyed shuffle) and runs it on an embedded local cluster,
or on a standing one when ``coordinator=`` names it.
"""

from __future__ import annotations

import copy
import operator as _operator
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from operators import keyed, process, sinks, sort, sources, stateless, window
from runtime.cluster.client import JobResult
from runtime.errors import InvalidArgumentError
from runtime.execution.graph import JobGraph, StreamNode, build_job_graph
from runtime.execution.task import Operator

MODES = ("auto", "streaming", "batch")
#: Set by `shmflow run --ui` / `--ui-linger SECONDS`: the defaults of StreamEnvironment's ui and ui_linger.
UI_ENV, UI_LINGER_ENV = "SHMFLOW_UI", "SHMFLOW_UI_LINGER"


class CollectResult:
    """The records a ``collect()`` sink shipped back to the client; filled by ``execute()``."""

    def __init__(self, sink_id: str) -> None:
        self.sink_id = sink_id
        self._values: list[Any] = []
        self.done = False

    def values(self) -> list[Any]:
        """All records, in arrival order (per upstream subtask in emission order)."""
        return self._values

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def _extend(self, batch: Iterable[Any]) -> None:
        self._values.extend(batch)


class StreamEnvironment:
    """Builds and runs streaming jobs.

    ``StreamEnvironment(workers=2)`` runs jobs on an embedded local cluster:
    a coordinator in this process and ``workers`` worker processes sharing
    one memory region, started by ``execute()`` and torn down after it.
    ``StreamEnvironment(coordinator="tcp://127.0.0.1:6123")`` submits to a
    standing cluster instead (``shmflow coordinator`` / ``shmflow worker``).
    ``config`` is a ShmflowConfig, a TOML path, or a dict of keys;
    ``mode`` is "streaming", "batch", or "auto" (batch when every source is bounded).
    ``ui=True`` serves the live dashboard of an embedded cluster's job on ``rest.address`` /
    ``rest.port`` (its URL printed on stderr), ``ui_linger`` seconds beyond the job's end.
    """

    def __init__(self, workers: int | None = None, *, config: Any = None, mode: str = "auto",
                 coordinator: str | None = None, secret_file: str | None = None, ui: bool | None = None,
                 ui_linger: float | None = None) -> None:
        from runtime.config import ShmflowConfig, load_config
        if mode not in MODES:
            msg = f"mode must be one of {MODES}; got {mode!r}"
            raise InvalidArgumentError(msg)
        # ui=None: as `shmflow run --ui` said (SHMFLOW_UI); the dashboard's address: rest.address, rest.port
        self.ui = bool(os.environ.get(UI_ENV)) if ui is None else bool(ui)
        linger = os.environ.get(UI_LINGER_ENV, "0") if ui_linger is None else ui_linger
        try:
            self.ui_linger = float(linger)
        except (TypeError, ValueError):
            self.ui_linger = -1.0
        if not self.ui_linger >= 0 or self.ui_linger == float("inf"):
            msg = f"ui_linger (--ui-linger, {UI_LINGER_ENV}) must be a number of seconds >= 0; got {linger!r}"
            raise InvalidArgumentError(msg)
        overrides = {} if workers is None else {"workers": workers}
        if isinstance(config, ShmflowConfig):
            cfg = config.with_overrides(overrides, source="StreamEnvironment(workers=...)") if overrides else config
        elif isinstance(config, dict):
            labelled = {key: (value, "StreamEnvironment(config=...)") for key, value in config.items()}
            labelled.update((key, (value, "StreamEnvironment(workers=...)")) for key, value in overrides.items())
            cfg = load_config(labelled=labelled)
        else:
            cfg = load_config(config, labelled={key: (value, "StreamEnvironment(workers=...)")
                                                for key, value in overrides.items()})
        self.config = cfg
        self.workers: int = cfg.workers
        self.mode = mode
        self.coordinator = coordinator
        self.secret_file = secret_file
        self._nodes: list[StreamNode] = []
        self._collects: dict[str, CollectResult] = {}
        self._keyed_aggs: list[int] = []  # node ids of keyed aggregations (batch mode adds combiners)

    # ----------------------------------------------------------------- sources
    def from_collection(self, items: Iterable[Any], *, name: str = "from_collection") -> DataStream:
        """A bounded source over ``items``, split into contiguous shares across the workers.

        A dict of equal-length numpy arrays is a columnar collection: each worker
        gets a contiguous slice of the columns.
        """
        return self._source(sources.CollectionSource(items if isinstance(items, dict) else list(items)), name)

    def from_generator(self, fn: Callable[[int], Any], rate: float | None = None, *, count: int | None = None,
                       name: str = "from_generator") -> DataStream:
        """An unbounded source (bounded with ``count``): ``fn(i)`` makes record ``i``; ``rate`` in records/s."""
        return self._source(sources.GeneratorSource(fn, rate=rate, count=count), name)

    def read_text(self, path: str, *, name: str | None = None) -> DataStream:
        """A bounded source of the lines of a text file, split at line boundaries across workers."""
        if not os.path.isfile(path):
            msg = f"read_text: no such file {str(path)!r}"
            raise FileNotFoundError(msg)
        return self._source(sources.TextFileSource(str(path)), name or f"read_text({path})")

    def from_source(self, source: Any, *, name: str | None = None) -> DataStream:
        """A stream from your own source (Flink's ``env.from_source``): a ``SourceOperator`` whose
        ``poll_batch(max_records)`` returns a batch, ``[]`` while nothing is ready, or ``None`` at
        its end (see ``runtime.execution.task.SourceOperator``).

        With ``split(parallelism)`` (a list of ``parallelism`` sources) every worker polls its own
        share; without, the source runs once, on worker 0, and the next shuffle spreads its records.
        """
        if not callable(getattr(source, "poll_batch", None)):
            msg = f"from_source needs a source with poll_batch(max_records); got {type(source).__name__}"
            raise TypeError(msg)
        parallelism = None if callable(getattr(source, "split", None)) else 1
        label = getattr(source, "name", None)
        if label in (None, Operator.name):  # the base class's placeholder: name it after its class
            label = type(source).__name__
        node = self._add(name or label, source, inputs=[], is_source=True, parallelism=parallelism)
        return DataStream(self, node)

    def _source(self, op: Any, name: str) -> DataStream:
        node = self._add(name, op, inputs=[], is_source=True)
        return DataStream(self, node)

    def _add(self, name: str, op: Any, *, inputs: Sequence[tuple[int, str, Callable[[Any], Any] | None]],
             parallelism: int | None = None,
             is_source: bool = False, is_sink: bool = False, columnar_key: str | None = None) -> StreamNode:
        node = StreamNode(id=len(self._nodes), name=name, operator=op,
                          parallelism=parallelism or self.workers, inputs=list(inputs),
                          is_source=is_source, is_sink=is_sink, columnar_key=columnar_key)
        self._nodes.append(node)
        return node

    # ------------------------------------------------------------- checkpoints
    def enable_checkpointing(self, interval: float, mode: str | None = None) -> StreamEnvironment:
        """Take a checkpoint every ``interval`` seconds (PyFlink's name; the config key
        ``execution.checkpointing.interval``), ``mode`` "exactly-once" (default) or "at-least-once".
        Checkpoints apply to streaming mode; with them a failed job restarts by ``restart-strategy.type``
        (default exponential-delay) from its latest checkpoint. Returns the environment.

        Raises:
            ConfigError: the interval or mode is invalid (names the key).
        """
        values: dict[str, Any] = {"execution.checkpointing.interval": interval}
        if mode is not None:
            values["execution.checkpointing.mode"] = mode
        self.config = self.config.with_overrides(values, source="StreamEnvironment.enable_checkpointing(...)")
        return self

    # ---------------------------------------------------------------- execution
    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        bounded = all(getattr(n.operator, "bounded", True) for n in self._nodes if n.is_source)
        return "batch" if bounded else "streaming"

    def job_graph(self, name: str = "job") -> JobGraph:
        """The graph ``execute()`` would run (for inspection and tests)."""
        mode = self.resolved_mode()
        # Copies: the graph sets modes and combiner inputs on its operators, never on the user's stream.
        nodes = [StreamNode(**{**n.__dict__, "inputs": list(n.inputs), "operator": copy.copy(n.operator)})
                 for n in self._nodes]
        for n in nodes:
            op = n.operator
            if isinstance(op, keyed.KeyedAggregate):
                op.mode = mode
        if mode == "batch":
            nodes = _insert_combiners(nodes, self._keyed_aggs)
        return build_job_graph(name, nodes, mode=mode)

    def execute(self, name: str = "job", *, timeout: float | None = None) -> JobResult:
        """Run the job; blocks until it ends. Raises JobFailedError on any failure."""
        from runtime.cluster.client import execute_job
        graph = self.job_graph(name)
        for result in self._collects.values():
            result._values = []
        return execute_job(graph, self.config, collect=self._collects, coordinator=self.coordinator,
                           secret_file=self.secret_file, timeout=timeout, ui=self.ui and self.coordinator is None,
                           ui_linger=self.ui_linger)


def _insert_combiners(nodes: list[StreamNode], keyed_ids: list[int]) -> list[StreamNode]:
    """Batch mode: put a KeyedCombine before each combinable keyed shuffle (Flink's combiner).

    ``upstream -> hash(key_fn) -> KeyedAggregate`` becomes
    ``upstream -> KeyedCombine -> hash(key of partial) -> KeyedAggregate(partial_input=True)``,
    so only one partial per key and subtask crosses the network.
    """
    out = list(nodes)
    for nid in keyed_ids:
        agg_node = out[nid]
        op = agg_node.operator
        if not isinstance(op, keyed.KeyedAggregate) or not keyed.combinable(op.aggregation):
            continue
        (up, part, key_fn), = agg_node.inputs
        upstream = out[up]
        combiner = keyed.KeyedCombine(op.key_fn, op.aggregation)
        combiner.key_column = op.key_column
        combine = StreamNode(id=len(out), name=f"combine({agg_node.name})", operator=combiner,
                             parallelism=upstream.parallelism, inputs=[(up, "forward", None)])
        out.append(combine)
        op.partial_input = True
        agg_node.inputs = [(combine.id, "hash", _operator.itemgetter(0))]
        agg_node.columnar_key = "key"  # a managed combiner's columnar partials: {"key": ..., "acc": ...}
    return out


class DataStream:
    """A stream of records. Every method returns a new stream (or a sink's handle)."""

    def __init__(self, env: StreamEnvironment, node: StreamNode) -> None:
        self.env = env
        self.node = node

    def _then(self, name: str, op: Any, partitioning: str = "forward", key_fn: Any = None, **kw: Any) -> DataStream:
        node = self.env._add(name, op, inputs=[(self.node.id, partitioning, key_fn)], **kw)
        return DataStream(self.env, node)

    # ------------------------------------------------------------ stateless
    def map(self, fn: Callable[[Any], Any], *, name: str = "map") -> DataStream:
        return self._then(name, stateless.Map(fn))

    def filter(self, fn: Callable[[Any], bool], *, name: str = "filter") -> DataStream:
        return self._then(name, stateless.Filter(fn))

    def flat_map(self, fn: Callable[[Any], Iterable[Any]], *, name: str = "flat_map") -> DataStream:
        return self._then(name, stateless.FlatMap(fn))

    def map_batches(self, fn: Callable[[Any], Any], *, name: str = "map_batches") -> DataStream:
        """Apply ``fn`` to whole batches: lists of records, or dicts of numpy arrays (columnar)."""
        return self._then(name, stateless.MapBatches(fn))

    def with_timestamps(self, fn: Callable[[Any], float], out_of_orderness: float = 0.0, *,
                        name: str = "with_timestamps") -> DataStream:
        """Event time: ``fn(record)`` gives its timestamp (seconds); watermarks trail the maximum by
        ``out_of_orderness`` and travel in-band."""
        return self._then(name, stateless.WithTimestamps(fn, out_of_orderness))

    # ------------------------------------------------------------ partitioning
    def key_by(self, key: Callable[[Any], Any] | str) -> KeyedStream:
        """Partition by key: a function of the record, or a column name for columnar batches."""
        return KeyedStream(self, key)

    def sort_by(self, key: Callable[[Any], Any] | str, *, reverse: bool = False, name: str = "sort_by"
                ) -> DataStream:
        """Batch mode: every record, ordered by ``key(record)`` (or a column), within each subtask.

        An external sort in managed memory: sorted runs spill to ``io.tmp-dirs`` when the operator's share
        is full and are merged at end of input. For a global order run it with parallelism 1:
        ``stream.sort_by(key).set_parallelism(1).collect()`` (a sink runs with its input's parallelism).
        """
        key_fn = _column_key(key) if isinstance(key, str) else key
        return self._then(name, sort.Sort(key_fn, reverse=reverse))

    def rebalance(self) -> DataStream:
        return self._then("rebalance", stateless.Map(_identity), partitioning="rebalance")

    def broadcast(self) -> DataStream:
        return self._then("broadcast", stateless.Map(_identity), partitioning="broadcast")

    def union(self, *others: DataStream) -> DataStream:
        inputs = [(s.node.id, "forward", None) for s in (self, *others)]
        node = self.env._add("union", stateless.Map(_identity), inputs=inputs)
        return DataStream(self.env, node)

    def set_parallelism(self, n: int) -> DataStream:
        """Run this operator with ``n`` parallel subtasks (at most the number of workers)."""
        if not isinstance(n, int) or not 1 <= n <= self.env.workers:
            msg = f"parallelism of {self.node.name!r} must be in [1, {self.env.workers}] (workers); got {n!r}"
            raise InvalidArgumentError(msg)
        self.node.parallelism = n
        return self

    # ------------------------------------------------------------ sinks
    def collect(self) -> CollectResult:
        """Ship every record back to the client; read them with ``.values()`` after execute()."""
        sink_id = f"collect-{len(self.env._collects)}"
        result = CollectResult(sink_id)
        self.env._collects[sink_id] = result
        self._sink(f"collect[{sink_id}]", sinks.CollectSink(sink_id))
        return result

    def print(self, prefix: str | None = None) -> None:
        self._sink("print", sinks.PrintSink(prefix))

    def to_file(self, path: str) -> None:
        self._sink(f"to_file({path})", sinks.FileSink(str(path)))

    def _sink(self, name: str, op: Any) -> None:
        # A sink runs with its input's parallelism: chained to it, so the order of a sorted stream survives.
        self._then(name, op, is_sink=True, parallelism=self.node.parallelism)


def _identity(x: Any) -> Any:
    return x


class _Aggregations:
    """reduce / sum / count / min / max, shared by keyed and windowed streams."""

    def _aggregate(self, name: str, aggregation: Any) -> DataStream:
        raise NotImplementedError

    def reduce(self, fn: Callable[[Any, Any], Any]) -> DataStream:
        return self._aggregate("reduce", keyed.reduce(fn))

    def sum(self, field: int | str | None = None) -> DataStream:
        return self._aggregate("sum", keyed.sum(field))

    def count(self) -> DataStream:
        return self._aggregate("count", keyed.count())

    def min(self, field: int | str | None = None) -> DataStream:
        return self._aggregate("min", keyed.min(field))

    def max(self, field: int | str | None = None) -> DataStream:
        return self._aggregate("max", keyed.max(field))


class KeyedStream(_Aggregations):
    """A stream partitioned by key; aggregations keep state per key."""

    def __init__(self, stream: DataStream, key: Callable[[Any], Any] | str) -> None:
        self.stream = stream
        self.columnar_key = key if isinstance(key, str) else None
        self.key_fn = _column_key(key) if isinstance(key, str) else key

    def _aggregate(self, name: str, aggregation: Any) -> DataStream:
        env = self.stream.env
        op = keyed.KeyedAggregate(self.key_fn, aggregation)  # job_graph() sets the mode at execute time
        op.key_column = self.columnar_key
        out = self.stream._then(name, op, partitioning="hash", key_fn=self.key_fn, columnar_key=self.columnar_key)
        env._keyed_aggs.append(out.node.id)
        return out

    def map_batches(self, fn: Callable[[Any], Any], *, name: str = "map_batches") -> DataStream:
        """Hash-shuffle whole batches by key, then apply ``fn`` per batch (columnar keyed pipelines)."""
        return self.stream._then(name, stateless.MapBatches(fn), partitioning="hash", key_fn=self.key_fn,
                                 columnar_key=self.columnar_key)

    def window(self, assigner: Any) -> WindowedStream:
        return WindowedStream(self, assigner)

    def process(self, function: Any, *, name: str = "process") -> DataStream:
        """Run a :class:`~operators.process.KeyedProcessFunction` per key: keyed state (``state.backend``)
        and timers, with PyFlink's names (``open``, ``process_element``, ``on_timer``)."""
        op = process.KeyedProcessOperator(self.key_fn, function, name=name)
        return self.stream._then(name, op, partitioning="hash", key_fn=self.key_fn, columnar_key=self.columnar_key)


class WindowedStream(_Aggregations):
    """Keyed windows; each aggregation emits ``(key, value, window_start, window_end)`` per key and window."""

    def __init__(self, keyed_stream: KeyedStream, assigner: Any) -> None:
        self.keyed = keyed_stream
        self.assigner = assigner

    def _aggregate(self, name: str, aggregation: Any) -> DataStream:
        ks = self.keyed
        op = window.WindowAggregate(ks.key_fn, self.assigner, aggregation)
        return ks.stream._then(f"window-{name}", op, partitioning="hash", key_fn=ks.key_fn)



def _column_key(column: str) -> Callable[[Any], Any]:
    return _operator.itemgetter(column)


# Window assigners, re-exported for users: from runtime.api import TumblingEventTimeWindows
TumblingEventTimeWindows = window.TumblingEventTimeWindows
SlidingEventTimeWindows = window.SlidingEventTimeWindows
TumblingProcessingTimeWindows = window.TumblingProcessingTimeWindows
SlidingProcessingTimeWindows = window.SlidingProcessingTimeWindows

__all__ = ["StreamEnvironment", "DataStream", "KeyedStream", "WindowedStream", "CollectResult", "JobResult",
           "TumblingEventTimeWindows", "SlidingEventTimeWindows", "TumblingProcessingTimeWindows",
           "SlidingProcessingTimeWindows"]
