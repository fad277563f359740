"""The sending side of a network exchange: result partitions and their output channels.

Imports: runtime.memory, runtime.network (buffer_pool, messages, transport), runtime.errors.
The receiving side is :mod:`runtime.network.gate`; the wire format both speak is
:mod:`runtime.network.messages`.

A **ResultPartition** has one subpartition per consumer; each subpartition is
an :class:`OutputChannel`, a DEALER socket connected to the consumer's
:class:`~runtime.network.gate.InputGate`. Buffers move in two ways:

* ``shm`` (one host): the bytes stay in the shared region. Each channel owns a
  ring (:mod:`runtime.network.ring`) in its worker's arena: (index, size)
  descriptors of buffers in the sender's pool go forward through it, and the
  receiver, which reads them through read-only views, gives the indices back
  through it (which recycles them into the sender's pool) and grants credits
  there. Zero copy, and no message while both sides are busy: the socket only
  carries the hello and a wake-up for a side that parked in the ring.
* ``tcp``: the bytes travel, straight from the sender's buffers (Flink's
  Netty writes its network buffers to the socket the same way). A batch is one
  zmq message: each run of buffers that lie back to back in the pool and are
  full (but the last) is one frame, a view of the pool that zmq sends without
  a copy; the run's buffers go back to the pool when zmq lets go of the frame
  (:meth:`OutputChannel.frames_sent`, from pyzmq's garbage-collector thread).
  A batch scattered over more runs than ``MAX_FRAMES`` is joined into one
  frame instead (a copy, which frees the buffers at once). Credits come back
  as ``C`` messages.

**Credits** (Flink's credit-based flow control): a sender ships a buffer only
against a credit. Each channel is granted ``exclusive`` credits at the
handshake; a gate lends up to ``floating`` more to channels that report a
backlog, and takes them back when their backlog is gone. So the buffers in
flight on one channel never exceed ``exclusive + floating``, and a slow
consumer stops its producers instead of growing memory: a sender without
credits blocks (backpressure), and the time it blocks is counted.

Over ``shm`` a buffer is pushed into the ring as soon as it is queued and a
credit is there (a push is a few stores). Over ``tcp`` buffers travel in
batches: a sender ships once half its credit window is queued (and the credits
for it are there), every queued buffer its credits allow in one message, and
ships everything it can before it blocks.

Threads: none. A partition is used by one thread, which polls its sockets
when it has to wait; every wait calls the partition's ``keep_alive`` at least
every ``KEEP_ALIVE_INTERVAL`` seconds (as the gate's waits do).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import zmq

from runtime.errors import BrokenChannelError, DeserializationError, TransportError
from runtime.memory import BuddyAllocator, MemorySegment
from runtime.memory.snapshot import Snapshot
from runtime.network import messages as msg
from runtime.network import ring as rings
from runtime.network.buffer_pool import LocalBufferPool, NetworkBuffer, release_buffers
from runtime.network.transport import KEEP_ALIVE_INTERVAL, connect, context, make_socket

TRANSPORTS = ("shm", "tcp")
#: A batch of descriptors ships at most this many bytes of buffers (unless ``ship_batch`` says otherwise).
SHIP_BATCH_BYTES = 4 << 20
#: A tcp batch whose buffers form more runs than this (buffers back to back in the pool) is copied into one
#: frame rather than sent as that many zero-copy frames (each costs a zmq message part and its release).
MAX_FRAMES = 8
#: A tcp data message carries at most this many bytes of buffers: several messages in flight let the
#: consumer work on one while the next arrives (it sees a message only once all of it is there).
TCP_MESSAGE_BYTES = 1 << 20
#: Closing a tcp channel waits at most this long for zmq to let go of its zero-copy frames.
ZERO_COPY_CLOSE_SECONDS = 5.0
#: After returns arrived through a ring, a partition that waits for more re-checks the rings (yielding the
#: CPU between checks) for this long before it parks; see ``gate.SPIN_SECONDS``, its twin.
SPIN_SECONDS = 0.0005


# --------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class PartitionStats(Snapshot):
    buffers_sent: int
    bytes_sent: int
    messages_sent: int  # zmq messages: data (tcp) or wake-ups of a parked consumer (shm)
    in_flight: int
    max_in_flight_per_channel: int
    backpressure_seconds: float  # time spent blocked for want of a credit or a free buffer
    backlog: int


# ------------------------------------------------------------------------ sender
class OutputChannel:
    """One subpartition: queued buffers, credits, and the buffers in flight to one consumer.

    Ownership: a buffer passed to :meth:`enqueue` belongs to the channel; it is
    released back to its pool when the consumer recycles it (shm), when zmq
    has sent its bytes (tcp), or when the channel is reclaimed. Over shm the
    channel also owns its ring's block, allocated from the partition's
    allocator here and freed by :meth:`close`.
    Process: the producing worker, one thread.
    """

    def __init__(self, partition: ResultPartition, index: int, endpoint: str, channel_id: int) -> None:
        self.partition = partition
        self.index = index
        self.endpoint = endpoint
        self.name = f"{partition.name}[{index}]"
        self.socket = make_socket(partition.ctx, zmq.DEALER, identity=b"ch%d" % channel_id)
        connect(self.socket, endpoint)
        self.credits = 0
        self.queue: deque[NetworkBuffer] = deque()  # full buffers waiting for credit: the backlog
        self.in_flight: dict[int, NetworkBuffer] = {}  # shm: buffer index -> buffer, until recycled
        self.max_in_flight = 0
        self.closed = False
        self.ring: rings.Ring | None = None  # shm: written by this channel and its consumer only
        self.ring_block: MemorySegment | None = None
        self.granted_seen = 0  # shm: the consumer's cumulative credit count, as last read from the ring
        self.announced = 0  # the backlog the consumer was last told of (with data, or by announce_backlog)
        # tcp: buffers handed to zmq without a copy, and of those the ones it let go of (frames_sent, which
        # runs in whichever thread drops the frame's last reference: the lock keeps the count whole).
        self.zero_copy_sent = 0
        self.zero_copy_returned = 0
        self._returns_lock = threading.Lock()
        hello = dict(partition.hello_fields)
        if partition.transport == "shm":
            capacity = rings.ring_capacity(partition.pool.max)
            allocator = cast(BuddyAllocator, partition.allocator)  # checked by the partition for shm
            self.ring_block, self.ring = rings.create_ring(allocator, capacity, owner=f"{self.name} ring")
            hello.update(ring_offset=self.ring_block.offset, ring_capacity=capacity,
                         ring_generation=self.ring_block.generation)
        self.socket.send(msg.encode_hello(channel=channel_id, **hello))

    @property
    def outstanding(self) -> int:
        """Buffers this channel holds that are neither queued nor back in the pool: recycled by the
        consumer later (shm), or still referenced by zmq (tcp)."""
        return len(self.in_flight) + self.zero_copy_sent - self.zero_copy_returned

    def ship_threshold(self) -> int:
        """The batch to ship: half the credit window (credits plus shm buffers in flight), at most
        ``SHIP_BATCH_BYTES`` of buffers (big buffers pipeline better in small batches), at least 1."""
        half = (self.credits + len(self.in_flight)) >> 1
        cap = self.partition.ship_cap
        return max(1, half if half < cap else cap)

    def check_open(self) -> None:
        """Raise BrokenChannelError if the consumer is gone (no buffer may be queued any more)."""
        if self.closed:
            text = f"channel {self.name} to {self.endpoint} is closed; its consumer is gone"
            raise BrokenChannelError(text)

    def enqueue(self, buffer: NetworkBuffer) -> None:
        self.check_open()
        self.queue.append(buffer)

    def ship(self) -> int:
        """Send as many queued buffers as credits allow: over shm in one push, over tcp in messages of at
        most ``TCP_MESSAGE_BYTES`` of buffers. Returns how many."""
        n = min(self.credits, len(self.queue))
        if n <= 0:
            return 0
        queue = self.queue
        batch = [queue.popleft() for _ in range(n)]
        self.credits -= n
        ring = self.ring
        if ring is not None:
            return self._push(ring, batch)
        return self._send_bytes(batch)

    def _send_bytes(self, batch: list[NetworkBuffer]) -> int:
        """tcp: send ``batch`` (off the queue, its credits spent) in messages of at most the partition's
        ``message_cap`` buffers, each with the backlog that stays queued after it. Returns how many."""
        part = self.partition
        n, cap, queued = len(batch), part.message_cap, len(self.queue)
        for first in range(0, n, cap):
            chunk = batch[first:first + cap]
            header = msg.encode_bytes_header(queued + n - first - len(chunk), [b.size for b in chunk])
            self.socket.send_multipart([header, *self._frames(chunk)], copy=False)
            part._messages_sent += 1
        self.announced = queued
        part._buffers_sent += n
        part._bytes_sent += sum(b.size for b in batch)
        return n

    def _frames(self, batch: list[NetworkBuffer]) -> list[Any]:
        """tcp: the payload frames of ``batch``: one view of the pool per run of buffers back to back and
        full but the last, whose buffers :meth:`frames_sent` releases once zmq dropped the view; or, when
        the batch is scattered over more than ``MAX_FRAMES`` runs, one joined copy (buffers released now)."""
        net = self.partition.pool.network_pool
        capacity = net.buffer_size
        runs: list[tuple[int, int]] = []
        start = 0
        for k in range(1, len(batch)):
            prev = batch[k - 1]
            if batch[k].index != prev.index + 1 or prev.size != capacity:
                runs.append((start, k))
                start = k
        runs.append((start, len(batch)))
        if len(runs) > MAX_FRAMES:
            try:
                return [b"".join([b.segment.view(0, b.size) for b in batch])]
            finally:
                release_buffers(batch)  # the bytes are in the payload now
        frames: list[Any] = []  # views of the pool (ndarrays: a finalizer needs a weak reference)
        for first, end in runs:
            run = batch[first:end]
            view = net.span(run[0].index, (len(run) - 1) * capacity + run[-1].size)
            weakref.finalize(view, self.frames_sent, run)
            frames.append(view)
        self.zero_copy_sent += len(batch)
        return frames

    def frames_sent(self, run: list[NetworkBuffer]) -> None:
        """tcp: zmq let go of the frame of ``run`` (sent, or dropped with the socket): release its buffers
        and ring the partition's doorbell, which wakes a producer that waits for buffers.

        Process: the producer's; any thread (pyzmq's garbage-collector thread for a zero-copy frame).
        """
        try:
            release_buffers(run)
        finally:
            with self._returns_lock:
                self.zero_copy_returned += len(run)
            self.partition.ring_doorbell()

    def on_control(self, frames: list[zmq.Frame]) -> None:
        """Apply a message from the consumer: a credit (``C``, tcp) or a wake-up (``W``, shm: the ring
        has something; :meth:`take_returns` reads it)."""
        frame = frames[0].buffer
        kind = frame[0]
        if kind == msg.WAKE and self.ring is not None:
            return
        if kind != msg.CREDIT or self.ring is not None:
            text = f"channel {self.name}: unexpected control message kind {kind!r}"
            raise DeserializationError(text)
        self.credits += msg.decode_credit(frame, where=f"channel {self.name}")

    def take_returns(self) -> None:
        """shm: apply the credits granted and the buffers given back through the ring since the last call."""
        try:
            granted, indices = cast(rings.Ring, self.ring).take_returns()
        except ValueError as exc:
            text = f"channel {self.name}: {exc}"
            raise DeserializationError(text) from None
        if granted != self.granted_seen:
            self.credits += granted - self.granted_seen
            self.granted_seen = granted
            self.partition.spin_until = time.monotonic() + SPIN_SECONDS
        if not indices:
            return
        self.partition.spin_until = time.monotonic() + SPIN_SECONDS
        pop = self.in_flight.pop
        returned = [pop(i, None) for i in indices]
        if None in returned:  # release what came back before the bad index; what follows it stays in flight
            bad = returned.index(None)
            for i, buf in zip(indices[bad + 1:], returned[bad + 1:]):
                if buf is not None:
                    self.in_flight[i] = buf
            release_buffers(cast("list[NetworkBuffer]", returned[:bad]))
            text = f"channel {self.name}: consumer recycled buffer {indices[bad]}, not in flight"
            raise DeserializationError(text)
        release_buffers(cast("list[NetworkBuffer]", returned))

    def _push(self, ring: rings.Ring, batch: list[NetworkBuffer]) -> int:
        """shm: publish ``batch`` (off the queue, its credits spent) in the ring. Its buffers stay in
        flight, still this channel's, until the consumer gives them back (:meth:`take_returns`).
        Returns how many."""
        indices = [b.index for b in batch]
        sizes = [b._size for b in batch]
        part = self.partition
        self.announced = len(self.queue)
        if ring.push(indices, sizes, self.announced):
            self.socket.send(msg.WAKE_FRAME)  # the consumer parked: the one wake-up of its wait
            part._messages_sent += 1
        in_flight = self.in_flight
        in_flight.update(zip(indices, batch))
        n = len(batch)
        part._buffers_sent += n
        part._bytes_sent += sum(sizes)
        if len(in_flight) > self.max_in_flight:
            self.max_in_flight = len(in_flight)
        return n

    def announce_backlog(self) -> None:
        """Tell the consumer of this channel's backlog: it has buffers queued and no credit, and the
        consumer, told of none with the last data, may have taken its floating credits back. One ``A``
        message, until data carries the backlog again."""
        self.announced = len(self.queue)
        self.socket.send(msg.encode_backlog(self.announced))
        self.partition._messages_sent += 1

    def park(self) -> bool:
        """shm: announce in the ring that this channel waits for credits or recycles; False (not parked)
        if they are there already."""
        return cast(rings.Ring, self.ring).park_producer(self.granted_seen)

    def unpark(self) -> None:
        cast(rings.Ring, self.ring).unpark_producer()

    def reclaim(self) -> int:
        """The consumer is gone: return every buffer this channel holds to its pool. Returns how many."""
        n = 0
        for buf in list(self.queue) + list(self.in_flight.values()):
            buf.release()
            n += 1
        self.queue.clear()
        self.in_flight.clear()
        self.closed = True
        return n

    def close(self) -> None:
        """Free the ring (after :meth:`reclaim`: nothing of it is in use) and close the socket; tcp: wait
        until zmq let go of every frame that still points into the pool (dropped with the socket), so
        that the pool may be destroyed after."""
        if self.ring is not None:
            rings.free_ring(self.ring, cast(MemorySegment, self.ring_block),
                            cast(BuddyAllocator, self.partition.allocator))
            self.ring = self.ring_block = None
        self.socket.close(linger=0)
        deadline = time.monotonic() + ZERO_COPY_CLOSE_SECONDS
        while self.zero_copy_sent != self.zero_copy_returned and time.monotonic() < deadline:
            time.sleep(0.001)


class ResultPartition:
    """The sending side of one producer subtask: one :class:`OutputChannel` per consumer.

    ``pool`` is the producer's LocalBufferPool; ``endpoints[i]`` is the gate of
    consumer ``i`` and ``channel_ids[i]`` this producer's channel number in
    that gate. Over ``shm`` each channel's ring is carved from ``allocator``
    (default: the allocator of the pool's NetworkBufferPool, the worker's
    arena). ``keep_alive`` is called at least every ``KEEP_ALIVE_INTERVAL``
    seconds while the partition waits (for buffers, credits or recycles); it
    may raise to end the wait (a cancelled job).

    Ownership: :meth:`request_buffer` gives the caller a buffer (refcount 1);
    :meth:`send_buffer` takes it back (the channel owns it until recycled).
    Process: the producing worker. Not thread-safe.
    """

    def __init__(self, pool: LocalBufferPool, endpoints: list[str], *, channel_ids: list[int] | int,
                 transport: str = "shm", name: str = "partition", ship_batch: int = 0,
                 max_backlog: int = 10, keep_alive: Callable[[], None] | None = None,
                 allocator: BuddyAllocator | None = None) -> None:
        if transport not in TRANSPORTS:
            text = f"transport must be one of {TRANSPORTS}; got {transport!r}"
            raise ValueError(text)
        allocator = allocator or pool.network_pool.allocator
        if transport == "shm":
            if not rings.AVAILABLE:
                text = ("the shm transport needs the compiled runtime.network._ring (pip install with a C "
                        "compiler); set network.transport=tcp")
                raise TransportError(text)
            if allocator is None:
                text = (f"partition {name}: the shm transport carves its rings from an allocator; the pool's "
                        "network pool has none (from_segment): pass allocator=")
                raise ValueError(text)
        self.allocator = allocator  # shm: carves and frees the channels' rings
        self.pool = pool
        self.transport = transport
        self.name = name
        self.keep_alive = keep_alive
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
        self.message_cap = max(1, TCP_MESSAGE_BYTES // pool.network_pool.buffer_size)  # tcp: buffers a message
        self._poll_mask = 3 if self.ship_cap >= 32 else 0
        self._poller = zmq.Poller()
        for ch in self.channels:
            self._poller.register(ch.socket, zmq.POLLIN)
        # tcp: readable once zmq let go of zero-copy frames (their buffers are back in the pool); a wait for
        # buffers polls it with the sockets. Written by OutputChannel.frames_sent, drained by _drain_control.
        self.doorbell: int | None = None
        self._doorbell_lock = threading.Lock()  # a late frames_sent must not write to a closed (reused) fd
        self._doorbell_rung = False  # set by ring_doorbell (any thread), cleared by _drain_control
        if transport == "tcp":
            self.doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._poller.register(self.doorbell, zmq.POLLIN)
        self._by_socket = {ch.socket: ch for ch in self.channels}
        self._rings = [ch for ch in self.channels if ch.ring is not None]
        self._parked: list[OutputChannel] = []
        self.spin_until = 0.0  # monotonic: re-check the rings instead of parking until then (SPIN_SECONDS)
        self._buffers_sent = self._bytes_sent = self._messages_sent = 0
        self._blocked = 0.0

    # ---------------------------------------------------------------- buffers
    def request_buffer(self, *, timeout: float | None = None) -> NetworkBuffer:
        """A free buffer from the pool; while there is none, ship and wait for recycles.

        Ownership: the caller owns the buffer (refcount 1) until it passes it to :meth:`send_buffer`
        or releases it.

        Raises:
            TimeoutError: no buffer came back within ``timeout`` seconds.
        """
        buf = self.pool.try_request_buffer()
        if buf is not None:
            return buf
        return self._wait_buffers(1, timeout)[0]

    def request_buffers(self, n: int, *, timeout: float | None = None) -> list[NetworkBuffer]:
        """Between 1 and ``n`` free buffers, taken under one lock; waits as :meth:`request_buffer` while
        there is none. The batch path for producers that fill buffer after buffer.

        Ownership: the caller owns each buffer until it passes it to :meth:`send_buffer(s) <send_buffers>`
        or releases it. Raises TimeoutError as :meth:`request_buffer`.
        """
        bufs = self.pool.try_request_buffers(n)
        return bufs if bufs else self._wait_buffers(n, timeout)

    def _wait_buffers(self, n: int, timeout: float | None) -> list[NetworkBuffer]:
        start = time.monotonic()
        try:
            while True:
                self.ship_all()
                bufs = self.pool.try_request_buffers(n)  # shm: ship_all took what the rings gave back
                if bufs:
                    return bufs
                if timeout is not None and time.monotonic() - start >= timeout:
                    msg_ = (f"partition {self.name}: no network buffer recycled within {timeout}s "
                            f"({self._in_flight()} in flight, {self._backlog()} queued); the consumers are not "
                            f"reading — raise network.buffers-per-channel or check the consumers")
                    raise TimeoutError(msg_)
                self._wait_control(0.05 if timeout is None else max(0.0, min(0.05, start + timeout - time.monotonic())))
        finally:
            self._blocked += time.monotonic() - start

    def send_buffer(self, subpartition: int, buffer: NetworkBuffer, *, block: bool = True) -> None:
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

    def send_buffers(self, subpartition: int, buffers: list[NetworkBuffer], *, block: bool = True) -> None:
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
        if ch.ring is not None:  # a push costs a few stores: ship at once
            ch.take_returns()  # a few loads: credits, and recycles back in the pool before it runs dry
            ch.ship()
        elif batch:
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
        if queue and not ch.credits and not ch.announced and not ch.closed:
            ch.announce_backlog()
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
                text = f"partition {self.name}: {self._backlog()} buffers found no credit in {timeout}s"
                raise TimeoutError(text)
            self._wait_control(0.05)
        if blocked_from is not None:
            self._blocked += time.monotonic() - blocked_from

    def wait_all_recycled(self, *, timeout: float) -> None:
        """Block until every sent buffer is back in the pool (before the pool is destroyed)."""
        deadline = time.monotonic() + timeout
        while self._in_flight():
            if time.monotonic() > deadline:
                text = f"partition {self.name}: {self._in_flight()} buffers not recycled in {timeout}s"
                raise TimeoutError(text)
            self._wait_control(0.05)

    # ------------------------------------------------------------------ control
    def _drain_control(self) -> None:
        if self._doorbell_rung:  # read the eventfd only when it was written: this runs every loop
            self._doorbell_rung = False
            try:
                os.eventfd_read(cast(int, self.doorbell))
            except BlockingIOError:
                pass  # a drain after the flag was set again took it already
        for ch in self.channels:
            self._drain_channel(ch)

    def ring_doorbell(self) -> None:
        """tcp: buffers came back from zmq; wake a wait for them (any thread)."""
        with self._doorbell_lock:
            if self.doorbell is not None:
                self._doorbell_rung = True  # before the write: a drain that misses the write reads it later
                os.eventfd_write(self.doorbell, 1)

    @staticmethod
    def _drain_channel(ch: OutputChannel) -> None:
        """Apply the channel's pending control messages and ring returns without blocking."""
        sock = ch.socket
        while sock.poll(0):
            ch.on_control(sock.recv_multipart(copy=False))
        if ch.ring is not None:
            ch.take_returns()

    def _wait_control(self, timeout: float) -> None:
        """Wait up to ``timeout`` (at most KEEP_ALIVE_INTERVAL) for control messages; every wait of the
        partition passes here, so it calls ``keep_alive`` first. Over shm it parks in the rings of the
        channels that hold buffers or a backlog first, so their consumers wake it."""
        if self.keep_alive is not None:
            self.keep_alive()
        timeout = min(timeout, KEEP_ALIVE_INTERVAL)
        if self._rings and time.monotonic() < self.spin_until:
            os.sched_yield()  # a streaming consumer gives back again before a wake-up could arrive
        elif self._park_channels(lambda ch: bool(ch.queue or ch.in_flight)):
            try:
                for sock, _ in self._poller.poll(int(timeout * 1000)):  # what Poller.poll does with a float
                    ch = self._by_socket.get(sock)
                    if ch is not None:  # else the doorbell, drained below
                        ch.on_control(sock.recv_multipart(copy=False))
            finally:
                self.unpark()
        self._drain_control()

    def _park_channels(self, waits: Callable[[OutputChannel], bool]) -> bool:
        """Park in the ring of every channel ``waits`` names; False (none stays parked) if one of them
        has returns already."""
        parked = self._parked
        for ch in self._rings:
            if waits(ch):
                if not ch.park():
                    self.unpark()
                    return False
                parked.append(ch)
        return True

    def park(self) -> bool:
        """Before the worker's loop sleeps: announce in the rings that this partition waits, for credits
        (channels with a backlog) or for buffers (channels holding some, when the pool has none left).
        Returns False, parked nowhere, when returns are there already: do not sleep. Pair with
        :meth:`unpark` after the sleep."""
        starved = not self.pool.available()

        def waits(ch: OutputChannel) -> bool:
            return bool(ch.queue or (starved and ch.in_flight))

        if time.monotonic() < self.spin_until and any(waits(ch) for ch in self._rings):
            return False  # re-check soon: a streaming consumer gives back before a wake-up arrives
        return self._park_channels(waits)

    def unpark(self) -> None:
        """The wait is over: no wake-up is wanted any more."""
        for ch in self._parked:
            if ch.ring is not None:
                ch.unpark()
        self._parked.clear()

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
        with self._doorbell_lock:
            if self.doorbell is not None:
                os.close(self.doorbell)
                self.doorbell = None
                self._doorbell_rung = False

    def __enter__(self) -> ResultPartition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pool_hello_fields(pool: LocalBufferPool) -> dict[str, str | int]:
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


__all__ = ["TRANSPORTS", "OutputChannel", "PartitionStats", "ResultPartition", "pool_hello_fields"]
