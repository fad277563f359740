"""Result partitions and input gates: network buffers between workers with credit-based flow control.

Imports: runtime.memory, runtime.network (buffer_pool, messages, transport), runtime.errors.

A **ResultPartition** (sender side) has one subpartition per consumer; each
subpartition is an :class:`OutputChannel`, a DEALER socket connected to the
consumer's gate. An **InputGate** (receiver side) binds one ROUTER socket that
every producer's channel connects to. Buffers move in two ways:

* ``shm``: the bytes stay in the shared region; a ``D`` message carries
  (index, size) descriptors of buffers in the sender's pool. The receiver
  reads them through read-only views and hands the indices back in ``R``
  messages, which recycles them into the sender's pool. Zero copy.
* ``tcp``: the bytes travel as zmq frames sent with ``copy=False``; the sender
  recycles a buffer once zmq reports the frame sent (a MessageTracker).

**Credits** (Flink's credit-based flow control): a sender ships a buffer only
against a credit. Each channel is granted ``exclusive`` credits at the
handshake; a gate lends up to ``floating`` more to channels that report a
backlog, and takes them back when their backlog is gone. So the buffers in
flight on one channel never exceed ``exclusive + floating``, and a slow
consumer stops its producers instead of growing memory: a sender without
credits blocks (backpressure), and the time it blocks is counted.

Descriptors and credits travel in batches: a sender ships once half its credit
window is queued (and the credits for it are there), every queued buffer its
credits allow in one message, and ships everything it can before it blocks;
a receiver returns recycles in one
message per channel, when a quarter of its credit window is pending or before it would block.

Threads: none. A partition and a gate are each used by one thread, which
polls their sockets when it has to wait.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from runtime.memory.snapshot import Snapshot
from runtime.errors import DeserializationError, ShmflowError
from runtime.memory import SharedRegion
from runtime.network import messages as msg
from runtime.network.buffer_pool import release_buffers
from runtime.network.transport import bind, connect, context, local_endpoint, make_socket

TRANSPORTS = ("shm", "tcp")
#: A batch of descriptors ships at most this many bytes of buffers (unless ``ship_batch`` says otherwise).
SHIP_BATCH_BYTES = 4 << 20


class ChannelClosedError(ShmflowError):
    """A channel's peer went away (consumer died or closed); names the channel."""


# --------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class PartitionStats(Snapshot):
    buffers_sent: int
    bytes_sent: int
    messages_sent: int
    in_flight: int
    max_in_flight_per_channel: int
    backpressure_seconds: float  # time spent blocked for want of a credit or a free buffer
    backlog: int


@dataclass(frozen=True)
class GateStats(Snapshot):
    buffers_received: int
    bytes_received: int
    messages_received: int
    credits_granted: int
    floating_lent: int
    unreleased: int


# ------------------------------------------------------------------------ sender
class OutputChannel:
    """One subpartition: queued buffers, credits, and the buffers in flight to one consumer.

    Ownership: a buffer passed to :meth:`enqueue` belongs to the channel; it is
    released back to its pool when the consumer recycles it (shm), when zmq
    has sent its bytes (tcp), or when the channel is reclaimed.
    Process: the producing worker, one thread.
    """

    def __init__(self, partition: "ResultPartition", index: int, endpoint: str, channel_id: int) -> None:
        self.partition = partition
        self.index = index
        self.endpoint = endpoint
        self.name = f"{partition.name}[{index}]"
        self.socket = make_socket(partition.ctx, zmq.DEALER, identity=b"ch%d" % channel_id)
        connect(self.socket, endpoint)
        self.credits = 0
        self.queue: deque = deque()  # full buffers waiting for credit: the backlog
        self.in_flight: dict[int, Any] = {}  # shm: buffer index -> buffer, until recycled
        self.tracked: deque = deque()  # tcp: (MessageTracker, [buffers]) until zmq sent them
        self.max_in_flight = 0
        self.closed = False
        self.socket.send(msg.encode_hello(channel=channel_id, **partition.hello_fields))

    @property
    def outstanding(self) -> int:
        return len(self.in_flight) + sum(len(bufs) for _, bufs in self.tracked)

    def ship_threshold(self) -> int:
        """The batch to ship: half the credit window (credits plus shm buffers in flight), at most
        ``SHIP_BATCH_BYTES`` of buffers (big buffers pipeline better in small batches), at least 1."""
        half = (self.credits + len(self.in_flight)) >> 1
        cap = self.partition.ship_cap
        return max(1, half if half < cap else cap)

    def check_open(self) -> None:
        """Raise ChannelClosedError if the consumer is gone (no buffer may be queued any more)."""
        if self.closed:
            raise ChannelClosedError(f"channel {self.name} to {self.endpoint} is closed; its consumer is gone")

    def enqueue(self, buffer: Any) -> None:
        self.check_open()
        self.queue.append(buffer)

    def ship(self) -> int:
        """Send as many queued buffers as credits allow, in one message. Returns how many."""
        n = min(self.credits, len(self.queue))
        if n <= 0:
            return 0
        queue = self.queue
        batch = [queue.popleft() for _ in range(n)]
        self.credits -= n
        part = self.partition
        if part.transport == "shm":
            desc = np.empty(n, msg.DESCRIPTOR)
            desc["index"] = [b.index for b in batch]
            desc["size"] = [b.size for b in batch]
            self.socket.send(msg.encode_data(len(queue), desc))  # small: copying beats zmq's free callback
            in_flight = self.in_flight
            for b in batch:
                in_flight[b.index] = b
        else:
            frames = [msg.encode_bytes_header(len(queue), n)]
            frames += [b.segment.view(0, b.size) for b in batch]
            tracker = self.socket.send_multipart(frames, copy=False, track=True)
            self.tracked.append((tracker, batch))
        part._buffers_sent += n
        part._bytes_sent += sum(b.size for b in batch)
        part._messages_sent += 1
        if self.outstanding > self.max_in_flight:
            self.max_in_flight = self.outstanding
        return n

    def reap_sent(self) -> None:
        """tcp: release buffers whose frames zmq has finished sending."""
        tracked = self.tracked
        while tracked and tracked[0][0].done:
            for b in tracked.popleft()[1]:
                b.release()

    def on_control(self, frames: list) -> None:
        """Apply a credit (``C``) or recycle (``R``) message from the consumer."""
        frame = frames[0].buffer
        kind = frame[0]
        if kind not in (msg.CREDIT, msg.RECYCLE):
            raise DeserializationError(f"channel {self.name}: unexpected control message kind {kind!r}")
        credits, indices = msg.decode_credit(frame, where=f"channel {self.name}")
        self.credits += credits
        if not len(indices):
            return
        pop = self.in_flight.pop
        returned = []
        try:
            for i in indices.tolist():
                buf = pop(i, None)
                if buf is None:
                    raise DeserializationError(f"channel {self.name}: consumer recycled buffer {i}, not in flight")
                returned.append(buf)
        finally:
            release_buffers(returned)

    def reclaim(self) -> int:
        """The consumer is gone: return every buffer this channel holds to its pool. Returns how many."""
        n = 0
        for buf in list(self.queue) + list(self.in_flight.values()):
            buf.release()
            n += 1
        self.queue.clear()
        self.in_flight.clear()
        for tracker, bufs in self.tracked:
            for buf in bufs:
                buf.release()
                n += 1
        self.tracked.clear()
        self.closed = True
        return n

    def close(self) -> None:
        self.socket.close(linger=0)


class ResultPartition:
    """The sending side of one producer subtask: one :class:`OutputChannel` per consumer.

    ``pool`` is the producer's LocalBufferPool; ``endpoints[i]`` is the gate of
    consumer ``i`` and ``channel_ids[i]`` this producer's channel number in
    that gate. ``region`` is required for ``shm``.

    Ownership: :meth:`request_buffer` gives the caller a buffer (refcount 1);
    :meth:`send_buffer` takes it back (the channel owns it until recycled).
    Process: the producing worker. Not thread-safe.
    """

    def __init__(self, pool: Any, endpoints: list[str], *, channel_ids: list[int] | int,
                 transport: str = "shm", name: str = "partition", ship_batch: int = 0,
                 max_backlog: int = 10) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}; got {transport!r}")
        self.pool = pool
        self.transport = transport
        self.name = name
        self.ctx = context()
        self.hello_fields = {"transport": transport, **pool_hello_fields(pool)}
        if isinstance(channel_ids, int):
            channel_ids = [channel_ids] * len(endpoints)
        self.channels = [OutputChannel(self, i, ep, cid) for i, (ep, cid) in enumerate(zip(endpoints, channel_ids))]
        # Ship when this many buffers queue up on a channel (0: half the channel's credit window, with
        # the credits for it).
        self.ship_batch = ship_batch
        # Full buffers a channel may queue beyond its credits before send_buffer blocks
        # (Flink's max-buffers-per-channel): bounds the backlog a slow consumer causes.
        self.max_backlog = max(1, max_backlog)
        self.ship_cap = max(1, SHIP_BATCH_BYTES // pool.network_pool.buffer_size)
        self._poll_mask = 3 if self.ship_cap >= 32 else 0
        self._poller = zmq.Poller()
        for ch in self.channels:
            self._poller.register(ch.socket, zmq.POLLIN)
        self._by_socket = {ch.socket: ch for ch in self.channels}
        self._buffers_sent = self._bytes_sent = self._messages_sent = 0
        self._blocked = 0.0

    # ---------------------------------------------------------------- buffers
    def request_buffer(self, *, timeout: float | None = None) -> Any:
        """A free buffer from the pool; while there is none, ship and wait for recycles.

        Raises:
            TimeoutError: no buffer came back within ``timeout`` seconds.
        """
        buf = self.pool.try_request_buffer()
        if buf is not None:
            return buf
        return self._wait_buffers(1, timeout)[0]

    def request_buffers(self, n: int, *, timeout: float | None = None) -> list:
        """Between 1 and ``n`` free buffers, taken under one lock; waits as :meth:`request_buffer` while
        there is none. The batch path for producers that fill buffer after buffer.

        Ownership: the caller owns each buffer until it passes it to :meth:`send_buffer(s) <send_buffers>`
        or releases it. Raises TimeoutError as :meth:`request_buffer`.
        """
        bufs = self.pool.try_request_buffers(n)
        return bufs if bufs else self._wait_buffers(n, timeout)

    def _wait_buffers(self, n: int, timeout: float | None) -> list:
        start = time.monotonic()
        try:
            while True:
                self.ship_all()
                self._wait_control(0.05 if timeout is None else max(0.0, min(0.05, start + timeout - time.monotonic())))
                bufs = self.pool.try_request_buffers(n)
                if bufs:
                    return bufs
                if timeout is not None and time.monotonic() - start >= timeout:
                    msg_ = (f"partition {self.name}: no network buffer recycled within {timeout}s "
                            f"({self._in_flight()} in flight, {self._backlog()} queued); the consumers are not "
                            f"reading — raise network.buffers-per-channel or check the consumers")
                    raise TimeoutError(msg_)
        finally:
            self._blocked += time.monotonic() - start

    def send_buffer(self, subpartition: int, buffer: Any, *, block: bool = True) -> None:
        """Queue a filled buffer (``buffer.size`` bytes) for consumer ``subpartition``.

        Buffers ship in batches: once half the channel's credit window (credits
        plus buffers in flight) is queued and as many credits are there for it
        (or ``ship_batch`` buffers, when set). Every path that blocks (and
        :meth:`ship_all` / :meth:`flush`) ships whatever credits allow first.
        With ``block`` (the default), wait while the channel's backlog is at
        ``max_backlog`` (backpressure). Callers that must never block (the
        worker's loop, through RecordWriter) pass ``block=False`` and check
        :meth:`available` before producing more.
        Ownership: the channel owns the buffer from now on.
        """
        ch = self.channels[subpartition]
        ch.enqueue(buffer)
        self._queued(ch, block)

    def send_buffers(self, subpartition: int, buffers: list, *, block: bool = True) -> None:
        """:meth:`send_buffer` for each of ``buffers`` in order, deciding once whether to ship.

        Ownership: the channel owns every buffer from now on.
        """
        ch = self.channels[subpartition]
        ch.check_open()
        ch.queue.extend(buffers)
        self._queued(ch, block)

    def _queued(self, ch: OutputChannel, block: bool) -> None:
        """Buffers were queued on ``ch``: ship if a batch is due, then apply backpressure if ``block``."""
        queue = ch.queue
        queued = len(queue)
        batch = self.ship_batch
        if batch:
            if queued >= batch:
                self._drain_channel(ch)
                ch.ship()
        else:
            threshold = ch.ship_threshold()
            if queued >= threshold:
                # Poll for credits (and recycles) only when they are short, and then every 4th small buffer.
                if ch.credits < threshold and not (queued - threshold) & self._poll_mask:
                    self._drain_channel(ch)
                    threshold = ch.ship_threshold()
                if ch.credits >= threshold:
                    ch.ship()
        if block and len(queue) >= self.max_backlog:
            self._wait_backlog(ch)

    def _wait_backlog(self, ch: OutputChannel) -> None:
        """Backpressure: block until the channel's backlog is below ``max_backlog``."""
        start = time.monotonic()
        while len(ch.queue) >= self.max_backlog and not ch.closed:
            self._wait_control(0.05)
            ch.ship()
        self._blocked += time.monotonic() - start

    def available(self) -> bool:
        """True if a buffer can be requested and queued without blocking."""
        return self.pool.available() > 0 and all(
            len(ch.queue) < self.max_backlog for ch in self.channels)

    def ship_all(self) -> None:
        """Apply pending control messages, then ship every queued buffer that has a credit."""
        self._drain_control()
        for ch in self.channels:
            if ch.queue and ch.credits:
                ch.ship()

    def flush(self, *, timeout: float | None = None) -> None:
        """Ship every queued buffer, waiting for credits as needed (backpressure)."""
        start = time.monotonic()
        blocked_from = None
        while True:
            self.ship_all()
            if not self._backlog():
                break
            blocked_from = blocked_from or time.monotonic()
            if timeout is not None and time.monotonic() - start >= timeout:
                raise TimeoutError(f"partition {self.name}: {self._backlog()} buffers found no credit in {timeout}s")
            self._wait_control(0.05)
        if blocked_from is not None:
            self._blocked += time.monotonic() - blocked_from

    def wait_all_recycled(self, *, timeout: float) -> None:
        """Block until every sent buffer is back in the pool (before the pool is destroyed)."""
        deadline = time.monotonic() + timeout
        while self._in_flight():
            if time.monotonic() > deadline:
                raise TimeoutError(f"partition {self.name}: {self._in_flight()} buffers not recycled in {timeout}s")
            self._wait_control(0.05)

    # ------------------------------------------------------------------ control
    def _drain_control(self) -> None:
        for ch in self.channels:
            self._drain_channel(ch)

    @staticmethod
    def _drain_channel(ch: OutputChannel) -> None:
        """Apply the channel's pending control messages without blocking."""
        sock = ch.socket
        while sock.poll(0):
            ch.on_control(sock.recv_multipart(copy=False))
        if ch.tracked:
            ch.reap_sent()

    def _wait_control(self, timeout: float) -> None:
        tracked = [t for ch in self.channels for t, _ in ch.tracked]
        if tracked and not any(t.done for t in tracked):
            tracked[0].wait(timeout)  # tcp: buffers return when zmq has sent them
        else:
            for sock, _ in self._poller.poll(timeout * 1000):
                ch = self._by_socket[sock]
                ch.on_control(sock.recv_multipart(copy=False))
        self._drain_control()

    def reclaim_channel(self, subpartition: int) -> int:
        """Consumer ``subpartition`` died: its leased buffers return to the pool. Returns how many."""
        return self.channels[subpartition].reclaim()

    def _in_flight(self) -> int:
        return sum(ch.outstanding for ch in self.channels)

    def _backlog(self) -> int:
        return sum(len(ch.queue) for ch in self.channels)

    def stats(self) -> PartitionStats:
        return PartitionStats(
            buffers_sent=self._buffers_sent, bytes_sent=self._bytes_sent, messages_sent=self._messages_sent,
            in_flight=self._in_flight(), max_in_flight_per_channel=max(ch.max_in_flight for ch in self.channels),
            backpressure_seconds=self._blocked, backlog=self._backlog(),
        )

    statistics = stats

    def close(self) -> None:
        """Close the sockets; buffers still held return to the pool."""
        for ch in self.channels:
            ch.reclaim()
            ch.close()

    def __enter__(self) -> "ResultPartition":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pool_hello_fields(pool: Any) -> dict[str, Any]:
    """What a receiver needs to turn (index, size) descriptors into views of the sender's pool."""
    network = pool.network_pool
    block = network.segment
    return {
        "region": block.region.name,
        "pool_offset": block.offset,
        "pool_generation": block.generation,
        "buffer_size": network.buffer_size,
        "num_buffers": network.num_buffers,
    }


# ---------------------------------------------------------------------- receiver
class ReceivedBuffer:
    """A buffer that arrived on a channel: a read-only view of its bytes until :meth:`release`.

    Ownership: the gate lends it; call ``release()`` exactly once when done
    (that recycles it to its sender and returns the credit). The view must not
    be used after that.
    """

    __slots__ = ("gate", "channel", "index", "view", "_released")

    def __init__(self, gate: "InputGate", channel: int, index: int, view: Any) -> None:
        self.gate = gate
        self.channel = channel
        self.index = index
        self.view = view
        self._released = False

    @property
    def size(self) -> int:
        return len(self.view)

    def release(self) -> None:
        if self._released:
            from runtime.errors import DoubleFreeError
            raise DoubleFreeError(f"buffer {self.index} of channel {self.channel} was released twice")
        self._released = True
        self.view = None
        self.gate._release(self.channel, self.index)


class _ChannelState:
    """Receiver-side state of one input channel: credits, floating loans, pending returns."""

    __slots__ = ("index", "identity", "name", "hello", "base", "buffer_size", "region", "view", "granted",
                 "floating", "backlog", "pending_credits", "pending_recycles", "unreleased", "finished")

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.name = name
        self.identity: bytes | None = None
        self.hello: dict | None = None
        self.base = 0
        self.buffer_size = 0
        self.region: SharedRegion | None = None
        self.view: memoryview | None = None  # read-only view of the region's usable area (shm)
        self.granted = 0  # credits granted and not yet consumed by a buffer
        self.floating = 0  # floating credits lent to this channel (granted or in use)
        self.backlog = 0
        self.pending_credits = 0
        self.pending_recycles: list[int] = []
        self.unreleased = 0
        self.finished = False


class InputGate:
    """The receiving side of one consumer subtask: reads the channels of every producer.

    ``num_channels`` producers connect to :attr:`endpoint`; producer channel
    ``i`` must say ``channel_id=i`` in its handshake. ``exclusive`` credits per
    channel and ``floating`` credits for the whole gate bound the buffers in
    flight (``network.buffers-per-channel`` / ``network.floating-buffers-per-gate``).
    ``region`` is the shared region (shm transport); when None, the gate
    attaches to the region a producer names in its handshake.

    Process: the consuming worker. Not thread-safe.
    """

    def __init__(self, num_channels: int, *, exclusive: int = 2, floating: int = 8, name: str = "gate",
                 endpoint: str | None = None, region: SharedRegion | None = None) -> None:
        if exclusive < 1:
            raise ValueError(f"exclusive credits per channel must be >= 1 (network.buffers-per-channel); got {exclusive}")
        self.name = name
        self.exclusive = exclusive
        self.floating_total = floating
        self.floating_free = floating
        self.ctx = context()
        self.socket = make_socket(self.ctx, zmq.ROUTER)
        self.endpoint = bind(self.socket, endpoint or local_endpoint("ipc"))
        self.channels = [_ChannelState(i, f"{name}<-{i}") for i in range(num_channels)]
        self._by_identity: dict[bytes, _ChannelState] = {}
        self._region = region
        self._attached: dict[str, SharedRegion] = {}
        self._ready: deque[ReceivedBuffer] = deque()
        self._buffers = self._bytes = self._messages = 0
        self._granted_total = 0

    # ---------------------------------------------------------------- receiving
    def next_buffer(self, *, timeout: float | None = None) -> ReceivedBuffer | None:
        """The next buffer in arrival order (per channel in send order), or None on timeout.

        Ownership: the caller must ``release()`` it.
        """
        ready = self._ready
        if not ready:
            self._wait_ready(timeout)
        return ready.popleft() if ready else None

    def next_buffers(self, *, timeout: float | None = None) -> list[ReceivedBuffer]:
        """Every buffer received so far (waiting up to ``timeout`` for the first)."""
        if not self._ready:
            self._wait_ready(timeout)
        out = list(self._ready)
        self._ready.clear()
        return out

    def _wait_ready(self, timeout: float | None) -> None:
        """Receive until a buffer is ready or ``timeout`` passes (control messages do not count)."""
        if timeout is not None and timeout <= 0:
            self._receive(0)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            self._receive(remaining)

    def _receive(self, timeout: float | None) -> None:
        """Process incoming messages; block up to ``timeout`` for the first one.

        Pending credits and recycles go out before any wait (what keeps credit
        flow deadlock-free); when messages are already waiting, a blocking
        call takes them first and lets the returns batch up further.
        """
        sock = self.socket
        if timeout == 0 or not sock.poll(0):
            self.flush_credits()  # about to wait: return everything released so far
            if not sock.poll(None if timeout is None else int(timeout * 1000)):
                return
        while True:
            self._on_message(sock.recv_multipart(copy=False))
            if not sock.poll(0):
                break

    def _on_message(self, frames: list) -> None:
        identity = frames[0].bytes
        head = frames[1]
        kind = head.buffer[0]
        self._messages += 1
        ch = self._by_identity.get(identity)
        if kind == msg.HELLO:
            self._on_hello(identity, head.bytes)
            return
        if ch is None:
            raise DeserializationError(f"gate {self.name}: message from unknown peer {identity!r} before its hello")
        where = f"channel {ch.name}"
        if kind == msg.DATA:
            backlog, desc = msg.decode_data(head.buffer, where=where)
            n = len(desc)
            if ch.region is not None and ch.region.generation(ch.base) != ch.hello["pool_generation"]:
                raise ChannelClosedError(f"{where}: the sender's buffer pool was freed (its worker is gone)")
            buf = ch.view
            if buf is None and ch.region is not None:
                buf = ch.view = ch.region.buf.toreadonly()  # slices of it are read-only views
            base, bsize = ch.base, ch.buffer_size
            idx_list = desc["index"].tolist()
            size_list = desc["size"].tolist()
            if n and (max(idx_list) >= ch.hello["num_buffers"] or max(size_list) > bsize):
                i, size = next((i, size) for i, size in zip(idx_list, size_list)
                               if i >= ch.hello["num_buffers"] or size > bsize)
                raise DeserializationError(f"{where}: descriptor ({i}, {size}) outside the sender's pool")
            cindex = ch.index
            self._ready.extend([ReceivedBuffer(self, cindex, i, buf[base + i * bsize:base + i * bsize + size])
                                for i, size in zip(idx_list, size_list)])
            self._bytes += sum(size_list)
        elif kind == msg.BYTES:
            payload = frames[2:]
            n = len(payload)
            backlog = msg.decode_bytes_header(head.buffer, n, where=where)
            ready = self._ready
            for f in payload:
                ready.append(ReceivedBuffer(self, ch.index, -1, f.buffer))
                self._bytes += len(f.buffer)
        else:
            raise DeserializationError(f"{where}: unexpected message kind {kind!r}")
        if n > ch.granted:
            raise DeserializationError(f"{where}: sender shipped {n} buffers with {ch.granted} credits")
        ch.granted -= n
        ch.unreleased += n
        ch.backlog = backlog
        self._buffers += n
        if backlog and self.floating_free:  # lend floating credits to a channel with a backlog
            lend = min(backlog, self.floating_free)
            self.floating_free -= lend
            ch.floating += lend
            self._grant(ch, lend)

    def _on_hello(self, identity: bytes, frame: bytes) -> None:
        hello = msg.decode_hello(frame, where=f"gate {self.name}")
        cid = hello.get("channel")
        if not isinstance(cid, int) or not 0 <= cid < len(self.channels):
            raise DeserializationError(f"gate {self.name}: hello names channel {cid!r}; expected 0..{len(self.channels) - 1}")
        ch = self.channels[cid]
        if ch.identity is not None:
            raise DeserializationError(f"gate {self.name}: channel {cid} connected twice")
        ch.identity = identity
        ch.hello = hello
        self._by_identity[identity] = ch
        if hello.get("transport") == "shm":
            ch.region = self._region_named(hello["region"])
            ch.base = hello["pool_offset"]
            ch.buffer_size = hello["buffer_size"]
        self._grant(ch, self.exclusive)
        self.flush_credits()

    def _region_named(self, name: str) -> SharedRegion:
        if self._region is not None and self._region.name == name:
            return self._region
        if name not in self._attached:
            self._attached[name] = SharedRegion.attach(name)
        return self._attached[name]

    # ------------------------------------------------------------------ credits
    def _grant(self, ch: _ChannelState, n: int) -> None:
        ch.granted += n
        ch.pending_credits += n
        self._granted_total += n

    def _release(self, channel: int, index: int) -> None:
        ch = self.channels[channel]
        ch.unreleased -= 1
        if index >= 0:
            ch.pending_recycles.append(index)
        if ch.floating and ch.backlog == 0:  # give the loan back to the gate
            ch.floating -= 1
            self.floating_free += 1
        else:
            self._grant(ch, 1)
        pending = len(ch.pending_recycles)
        if pending < ch.pending_credits:
            pending = ch.pending_credits
        if pending >= ((self.exclusive + ch.floating) >> 2 or 1):  # a quarter of the credit window
            self._send_credits(ch)

    def release_all(self, buffers: list[ReceivedBuffer]) -> None:
        """Release every buffer in ``buffers``, as ``rb.release()`` on each in order, returning their
        credits and recycles per channel in one go (the batch counterpart of :meth:`next_buffers`).

        Raises DoubleFreeError at the first buffer released already (those before it stay released).
        """
        groups: dict[int, list[int]] = {}
        twice = None
        for rb in buffers:
            if rb.gate is not self:
                rb.release()
                continue
            if rb._released:
                twice = rb
                break
            rb._released = True
            rb.view = None
            group = groups.get(rb.channel)
            if group is None:
                group = groups[rb.channel] = []
            group.append(rb.index)
        for channel, indices in groups.items():
            self._release_many(self.channels[channel], indices)
        if twice is not None:
            twice.release()  # raises DoubleFreeError

    def _release_many(self, ch: _ChannelState, indices: list[int]) -> None:
        n = len(indices)
        ch.unreleased -= n
        if indices[0] >= 0:
            ch.pending_recycles.extend(indices)
        if ch.floating and ch.backlog == 0:  # give loans back to the gate
            back = min(ch.floating, n)
            ch.floating -= back
            self.floating_free += back
            n -= back
        if n:
            self._grant(ch, n)
        pending = len(ch.pending_recycles)
        if pending < ch.pending_credits:
            pending = ch.pending_credits
        if pending >= ((self.exclusive + ch.floating) >> 2 or 1):
            self._send_credits(ch)

    def _send_credits(self, ch: _ChannelState) -> None:
        if ch.identity is None:
            return
        if ch.pending_recycles:
            frame = msg.encode_recycle(ch.pending_credits, ch.pending_recycles)
            ch.pending_recycles = []
        elif ch.pending_credits:
            frame = msg.encode_credit(ch.pending_credits)
        else:
            return
        ch.pending_credits = 0
        self.socket.send_multipart([ch.identity, frame])

    def flush_credits(self) -> None:
        """Send every pending credit and recycle (called before blocking and on close)."""
        for ch in self.channels:
            if ch.pending_credits or ch.pending_recycles:
                self._send_credits(ch)

    # ------------------------------------------------------------------ lifetime
    @property
    def connected(self) -> int:
        return sum(ch.identity is not None for ch in self.channels)

    def wait_connected(self, *, timeout: float) -> None:
        """Block until every producer's channel has said hello."""
        deadline = time.monotonic() + timeout
        while self.connected < len(self.channels):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"gate {self.name}: {self.connected} of {len(self.channels)} channels "
                                   f"connected within {timeout}s")
            self._receive(min(remaining, 0.1))

    def stats(self) -> GateStats:
        return GateStats(
            buffers_received=self._buffers, bytes_received=self._bytes, messages_received=self._messages,
            credits_granted=self._granted_total, floating_lent=self.floating_total - self.floating_free,
            unreleased=sum(ch.unreleased for ch in self.channels),
        )

    statistics = stats

    def close(self) -> None:
        """Release what the caller dropped, return every credit, close the socket and regions."""
        for rb in self._ready:
            rb.release()
        self._ready.clear()
        self.flush_credits()
        self.socket.close(linger=0)
        for ch in self.channels:
            if ch.view is not None:
                try:
                    ch.view.release()
                except BufferError:
                    pass  # still exported to a caller's array; released with it
                ch.view = None
        for region in self._attached.values():
            region.close()
        self._attached.clear()

    def __enter__(self) -> "InputGate":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ResultPartition", "OutputChannel", "InputGate", "ReceivedBuffer", "ChannelClosedError",
           "PartitionStats", "GateStats", "TRANSPORTS", "pool_hello_fields"]
