"""Record writers and readers: batches <-> serialized frames in network buffers, partitioned by channel.

Imports: runtime.network (channel, serializer, events), runtime.errors (numpy, msgpack).

A :class:`RecordWriter` splits each batch across a ResultPartition's channels
(:class:`Partitioner`: forward, hash, rebalance, broadcast), serializes each
channel's share into that channel's current buffer and sends full buffers.
It never blocks: when no buffer is free it keeps the rest of the batch (Python
objects, at most one step's output) and writes it when buffers come back —
:meth:`RecordWriter.available` is False meanwhile, so the worker does not feed
it more. Partly filled buffers are sent after ``network.buffer-timeout``
(0: after every batch) and at end of stream.

A :class:`RecordReader` turns the buffers of an InputGate back into batches
and events, one deserializer per channel (frames may span buffers).

Event-time batches (TimestampedBatch) travel as a ``UserEvent`` carrying the
timestamps, immediately followed by the RECORDS frame of their records.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeGuard, cast

import numpy as np

from runtime.errors import RecordTooLargeError
from runtime.network.batch import Batch, TimestampedBatch, pack_batch, unpack_batch
from runtime.network.buffer_pool import LocalBufferPool, NetworkBuffer
from runtime.network.events import CheckpointBarrier, Event, UserEvent
from runtime.network.gate import InputGate, ReceivedBuffer
from runtime.network.partition import PartitionStats, ResultPartition
from runtime.network.serializer import (
    DEFAULT_MAX_RECORD_SIZE,
    BufferDeserializer,
    BufferSerializer,
    Item,
    SerializationResult,
)

__all__ = ["Partitioner", "RecordReader", "RecordWriter", "pack_batch", "unpack_batch"]

_TIMESTAMPS = "__shmflow.timestamps__"
#: Up to this many partitions, a columnar batch is split by one scan per partition; above, by a sort.
_MASK_SPLIT_MAX = 8


# ---------------------------------------------------------------------- partitioning
class Partitioner:
    """Splits a batch into ``(channel, sub-batch)`` pairs.

    ``hash``: a record goes to channel ``hash(key_fn(record)) % n`` (workers share
    PYTHONHASHSEED); a columnar batch is split by its ``columnar_key`` column
    with numpy (integer keys: ``key % n``, the same channel ``hash`` gives an int).
    ``rebalance`` sends whole batches round-robin; ``broadcast`` sends every
    batch to every channel; ``forward`` has one channel.
    """

    def __init__(self, kind: str, n: int, *, key_fn: Callable[[Any], Any] | None = None,
                 columnar_key: str | None = None) -> None:
        self.kind = kind
        self.n = n
        self.key_fn = key_fn
        self.columnar_key = columnar_key
        self._next = 0

    def split(self, batch: Batch | np.ndarray) -> list[tuple[int, Batch | np.ndarray]]:
        """``(channel, sub-batch)`` pairs; a sub-batch is of the batch's kind (records, timestamped or columnar)."""
        n = self.n
        if n == 1 or self.kind == "forward":
            return [(0, batch)]
        if self.kind == "broadcast":
            return [(i, batch) for i in range(n)]
        if self.kind == "rebalance":
            self._next = (self._next + 1) % n
            return [(self._next, batch)]
        if isinstance(batch, (dict, np.ndarray)):
            return self._split_columnar(batch)
        key_fn = cast("Callable[[Any], Any]", self.key_fn)  # a hash partitioner of records has one
        buckets: list[list[Any]] = [[] for _ in range(n)]
        dests = [hash(k) % n for k in map(key_fn, batch)]
        timestamps = getattr(batch, "timestamps", None)
        if timestamps is None:
            appends = [b.append for b in buckets]
            for rec, d in zip(batch, dests):
                appends[d](rec)
            return [(i, b) for i, b in enumerate(buckets) if b]
        ts_buckets: list[list[float]] = [[] for _ in range(n)]
        for rec, ts, d in zip(batch, timestamps, dests):
            buckets[d].append(rec)
            ts_buckets[d].append(ts)
        return [(i, TimestampedBatch(b, ts_buckets[i])) for i, b in enumerate(buckets) if b]

    def _split_columnar(self, batch: dict[str, np.ndarray] | np.ndarray) -> list[tuple[int, Batch | np.ndarray]]:
        col = self.columnar_key
        if col is None:
            msg = "a columnar batch (dict of arrays) can only be hash-partitioned by a column: use key_by('column')"
            raise TypeError(msg)
        keys = batch[col]
        n = self.n
        if keys.dtype.kind in "iu":
            # Floor modulo, as Python's hash(k) % n for ints; for a power of two a mask computes it
            # (two's complement), several times faster than a division.
            dest = keys & (n - 1) if n & (n - 1) == 0 else np.remainder(keys, n)
        else:
            # hash() as for a record's key (an ASCII str hashes as its bytes do: S columns of str keys
            # go where the str would); Python's % and numpy's remainder are both floor modulo.
            dest = np.remainder(np.fromiter(map(hash, keys.tolist()), dtype=np.int64, count=len(keys)), n)
        take: Callable[[np.ndarray], dict[str, np.ndarray] | np.ndarray]
        if isinstance(batch, dict):
            def take(idx: np.ndarray) -> dict[str, np.ndarray]:
                return {name: arr.take(idx, axis=0) for name, arr in batch.items()}
        else:
            take = batch.take
        out: list[tuple[int, Batch | np.ndarray]] = []
        if n <= _MASK_SPLIT_MAX:  # a linear pass per partition beats a sort
            for i in range(n):
                idx = np.flatnonzero(dest == i)
                if idx.size:
                    out.append((i, take(idx)))
            return out
        order = np.argsort(dest, kind="stable")
        counts = np.bincount(dest, minlength=n)
        start = 0
        for i, c in enumerate(counts.tolist()):
            if c:
                out.append((i, take(order[start:start + c])))
            start += c
        return out


# ---------------------------------------------------------------------------- writer
def _is_timestamps(item: object) -> TypeGuard[UserEvent]:
    """The event that carries the timestamps of the TimestampedBatch after it."""
    return type(item) is UserEvent and type(item.payload) is tuple and item.payload[:1] == (_TIMESTAMPS,)


def _halves(item: Item) -> list[Item] | None:
    """A record list or columnar batch cut in two by rows, or None when it holds one row (or is an event)."""
    if isinstance(item, list):
        rows = len(item)
    elif isinstance(item, dict) and item:
        rows = len(next(iter(item.values())))
    elif isinstance(item, np.ndarray):
        rows = len(item)
    else:
        return None
    if rows < 2:
        return None
    mid = rows // 2
    if isinstance(item, TimestampedBatch):  # the reader pairs a list with the timestamps event just before it
        ts = item.timestamps
        return [UserEvent((_TIMESTAMPS, list(ts[:mid]))), TimestampedBatch(item[:mid], ts[:mid]),
                UserEvent((_TIMESTAMPS, list(ts[mid:]))), TimestampedBatch(item[mid:], ts[mid:])]
    if isinstance(item, dict):
        return [{k: v[:mid] for k, v in item.items()}, {k: v[mid:] for k, v in item.items()}]
    return [item[:mid], item[mid:]]


class _ChannelWriter:
    __slots__ = ("index", "ser", "buffer", "items", "continuing", "first_write")

    def __init__(self, index: int, max_record_size: int) -> None:
        self.index = index
        self.ser = BufferSerializer(max_record_size=max_record_size)
        self.buffer: NetworkBuffer | None = None  # the buffer being filled; owned by this writer until sent
        self.items: deque[Item] = deque()  # batches and events not yet written (no buffer was free)
        self.continuing = False  # the serializer holds the rest of a spanning frame
        self.first_write: float | None = None


class RecordWriter:
    """Serializes batches into a ResultPartition's buffers, one serializer per channel.

    Ownership: a buffer requested from the partition's pool belongs to the
    writer until it is full (or flushed) and handed to ``send_buffer``.
    Process: the producing worker, its loop thread.
    """

    def __init__(self, partition: ResultPartition, partitioner: Partitioner, *, buffer_timeout: float = 0.1,
                 clock: Callable[[], float] = time.monotonic,
                 max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> None:
        self.partition = partition
        self.partitioner = partitioner
        self.buffer_timeout = buffer_timeout
        self.clock = clock
        self.pool: LocalBufferPool = partition.pool
        self.channels = [_ChannelWriter(i, max_record_size) for i in range(len(partition.channels))]

    def emit(self, batch: Batch | np.ndarray) -> None:
        for index, sub in self.partitioner.split(batch):
            cw = self.channels[index]
            timestamps = getattr(sub, "timestamps", None)
            if timestamps is not None:
                cw.items.append(UserEvent((_TIMESTAMPS, list(timestamps))))
                cw.items.append(sub)  # a TimestampedBatch: if it must be halved, each half gets its own event
            else:
                cw.items.append(sub)
            self._pump(cw)
            if self.buffer_timeout == 0:
                self._flush_channel(cw)

    def emit_event(self, event: Event) -> None:
        """An in-band event to every channel, in order with the records before it."""
        for cw in self.channels:
            cw.items.append(event)
            self._pump(cw)
            if self.buffer_timeout == 0:
                self._flush_channel(cw)

    # ------------------------------------------------------------------ writing
    def _pump(self, cw: _ChannelWriter) -> bool:
        """Write pending items while buffers are free. True when nothing is left pending."""
        ser = cw.ser
        while True:
            if cw.buffer is None:
                buf = self.pool.try_request_buffer()
                if buf is None:
                    self.partition.ship_all()  # recycles may be waiting
                    buf = self.pool.try_request_buffer()
                    if buf is None:
                        return False
                cw.buffer = buf
                view = buf.segment.view()
                if cw.continuing:
                    cw.continuing = False
                    self._after_write(cw, ser.continue_into(view))
                    continue
                ser.set_buffer(view)
            if not cw.items:
                return True
            item = cw.items.popleft()
            try:
                result = ser.write(item)
            except RecordTooLargeError:  # nothing was written: write it in halves (one record too large raises)
                if _is_timestamps(item) and cw.items:  # halve the batch these timestamps belong to
                    item = cw.items.popleft()
                halves = _halves(item)
                if halves is None:
                    raise
                cw.items.extendleft(reversed(halves))
                continue
            self._after_write(cw, result)

    def _after_write(self, cw: _ChannelWriter, result: SerializationResult) -> None:
        if result.is_full_buffer:
            self._send(cw)
            cw.continuing = not result.is_full_record
        elif cw.first_write is None:
            cw.first_write = self.clock()

    def _send(self, cw: _ChannelWriter) -> None:
        buf = cast(NetworkBuffer, cw.buffer)  # callers check that the channel holds one
        buf.size = cw.ser.position
        cw.buffer = None
        cw.first_write = None
        self.partition.send_buffer(cw.index, buf, block=False)  # the worker's loop never blocks

    def _flush_channel(self, cw: _ChannelWriter) -> None:
        """Send the channel's partly filled buffer (if it holds complete frames only)."""
        if cw.buffer is not None and not cw.continuing and cw.ser.position:
            self._send(cw)

    # ------------------------------------------------------------------ control
    def available(self) -> bool:
        """True when nothing waits for a buffer and the partition can take more."""
        return all(not cw.items and not cw.continuing for cw in self.channels) and self.partition.available()

    def pump(self) -> bool:
        """Write what is pending as buffers allow and ship what credits allow; True when everything is written.

        Shipping matters even with nothing pending here: :meth:`available` is False while a
        channel's backlog is at ``max_backlog``, and only credits applied by ``ship_all`` lower it.
        """
        done = True
        for cw in self.channels:
            if cw.items or cw.continuing:
                done = self._pump(cw) and done
        self.partition.ship_all()
        return done

    def flush_if_due(self, now: float) -> None:
        self.pump()
        timeout = self.buffer_timeout
        for cw in self.channels:
            if cw.first_write is not None and now - cw.first_write >= timeout:
                self._flush_channel(cw)

    def next_flush_due(self) -> float | None:
        due = [cw.first_write + self.buffer_timeout for cw in self.channels if cw.first_write is not None]
        return min(due) if due else None

    def flush(self) -> None:
        """Send partly filled buffers (non-blocking; call :meth:`drained` to know it all went out)."""
        self.pump()
        for cw in self.channels:
            if not cw.items:
                self._flush_channel(cw)
        self.partition.ship_all()

    def drained(self) -> bool:
        """Everything emitted is in buffers handed to the partition and shipped."""
        self.flush()
        return (all(not cw.items and not cw.continuing and cw.buffer is None for cw in self.channels)
                and self.partition.stats().backlog == 0)

    def stats(self) -> PartitionStats:
        return self.partition.stats()

    def close(self) -> None:
        """Return buffers still being filled to the pool."""
        for cw in self.channels:
            if cw.buffer is not None:
                cw.buffer.release()
                cw.buffer = None
            cw.items.clear()
            cw.ser.clear()


# ---------------------------------------------------------------------------- reader
class RecordReader:
    """Reads batches and events from an InputGate, in order per channel.

    Ownership: a buffer's bytes are released (recycled to the sender) at the
    next :meth:`poll`, so zero-copy columnar arrays returned by one poll are
    valid until the next one; operators that keep them must copy.

    Barrier alignment (``align=True``, exactly-once checkpoints): once a
    channel has delivered a :class:`CheckpointBarrier`, the reader holds back
    everything behind it on that channel (items of the same buffer, then
    whole buffers, unread and unreleased, so their credits stop and the
    producer is backpressured) until :meth:`unblock_all`; other channels go on.
    """

    def __init__(self, gate: InputGate, *, max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
                 align: bool = False) -> None:
        self.gate = gate
        self.align = align
        n = len(gate.channels)
        self._des = [BufferDeserializer(ch.name, max_record_size=max_record_size) for ch in gate.channels]
        self._timestamps: list[list[float] | None] = [None] * n
        self._held: list[ReceivedBuffer] = []
        self._blocked = [False] * n
        # Per channel, while blocked: items read behind its barrier (with the buffers they live in), then
        # buffers not read yet; both go out, in that order, after unblock_all.
        self._parked_items: list[deque[Any]] = [deque() for _ in range(n)]
        self._parked_holders: list[list[ReceivedBuffer]] = [[] for _ in range(n)]
        self._parked_buffers: list[deque[ReceivedBuffer]] = [deque() for _ in range(n)]
        self._resume: list[int] = []  # channels unblocked with something parked: read them first

    def blocked(self, channel: int) -> bool:
        return self._blocked[channel]

    def unblock_all(self) -> None:
        """End an alignment: every channel is read again, what each held back first."""
        for ch, blocked in enumerate(self._blocked):
            if blocked:
                self._blocked[ch] = False
                if self._parked_items[ch] or self._parked_buffers[ch]:
                    self._resume.append(ch)

    def poll(self) -> list[tuple[int, Any]]:
        """Everything that arrived since the last poll: ``(channel, batch_or_event)`` pairs."""
        if self._held:
            self.gate.release_all(self._held)  # one give-back per channel, not one per buffer
            self._held = []
        out: list[tuple[int, Any]] = []
        if self._resume:
            resume, self._resume = self._resume, []
            for ch in resume:
                self._take_parked(ch, out)
        for rb in self.gate.next_buffers(timeout=0):
            ch = rb.channel
            if self._blocked[ch]:
                self._parked_buffers[ch].append(rb)
                continue
            self._read(rb, out)
        return out

    def _take_parked(self, ch: int, out: list[tuple[int, Any]]) -> None:
        """Give out what channel ``ch`` held back, until it blocks again (a later barrier)."""
        items, holders = self._parked_items[ch], self._parked_holders[ch]
        while items and not self._blocked[ch]:
            self._emit(ch, items.popleft(), out)
        if items:  # blocked again: the rest (and the buffers it lives in) stay parked
            return
        self._held.extend(holders)  # released at the next poll, after their items were used
        holders.clear()
        if self._blocked[ch]:
            return
        buffers = self._parked_buffers[ch]
        while buffers and not self._blocked[ch]:
            self._read(buffers.popleft(), out)

    def _read(self, rb: ReceivedBuffer, out: list[tuple[int, Any]]) -> None:
        ch = rb.channel
        parked = False
        for item in self._des[ch].feed(cast(memoryview, rb.view)):  # not released before the next poll
            if _is_timestamps(item):
                self._timestamps[ch] = item.payload[1]
                continue
            ts = self._timestamps[ch]
            if ts is not None and type(item) is list:
                item = TimestampedBatch(item, ts)
                self._timestamps[ch] = None
            if self._blocked[ch]:
                self._parked_items[ch].append(item)
                parked = True
            else:
                self._emit(ch, item, out)
        (self._parked_holders[ch] if parked else self._held).append(rb)

    def _emit(self, ch: int, item: Any, out: list[tuple[int, Any]]) -> None:
        out.append((ch, item))
        if self.align and type(item) is CheckpointBarrier:
            self._blocked[ch] = True

    def close(self) -> None:
        for rb in self._held:
            rb.release()
        self._held = []
        for ch in range(len(self._blocked)):
            for rb in (*self._parked_holders[ch], *self._parked_buffers[ch]):
                rb.release()
            self._parked_holders[ch].clear()
            self._parked_buffers[ch].clear()
            self._parked_items[ch].clear()
