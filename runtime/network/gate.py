"""The receiving side of a network exchange: input gates, their channels' credits, received buffers.

Imports: runtime.memory, runtime.network (messages, transport), runtime.errors.
The sending side is :mod:`runtime.network.partition`.

An **InputGate** binds one ROUTER socket that every producer's output channel
connects to. Each channel is granted ``exclusive`` credits at the handshake;
the gate lends up to ``floating`` more to channels that report a backlog and
takes them back when the backlog is gone. Over ``shm`` the producer announces
a ring in its hello (:mod:`runtime.network.ring`): descriptors arrive through
it, a received buffer is a read-only view of the sender's pool until it is
released, and releasing it gives its index back and grants the credit through
the same ring at once. The socket then carries only hellos and wake-ups: a
gate about to sleep parks in its rings, and a producer that publishes into a
parked ring sends one wake-up. Over ``tcp`` a received buffer is a view of
the zmq frame its batch arrived in, and credits go back in one message per
channel when a quarter of its credit window is pending or before the gate
would block.

Threads: none. A gate is used by one thread, which polls its socket when it
has to wait. Every wait calls the gate's ``keep_alive`` (the worker's heartbeat
and cancel check) at least every ``KEEP_ALIVE_INTERVAL`` seconds: a process that
waits for its peers keeps heartbeating and can be cancelled.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import zmq

from runtime.errors import BrokenChannelError, DeserializationError, DoubleFreeError
from runtime.memory import SharedRegion
from runtime.memory.snapshot import Snapshot
from runtime.network import messages as msg
from runtime.network import ring as rings
from runtime.network.transport import KEEP_ALIVE_INTERVAL, bind, context, local_endpoint, make_socket


# --------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class GateStats(Snapshot):
    buffers_received: int
    bytes_received: int
    messages_received: int  # zmq messages: hellos, wake-ups (shm), data (tcp)
    wakeups_sent: int  # shm: wake-ups sent to producers parked in a ring
    credits_granted: int
    floating_lent: int
    unreleased: int


# ---------------------------------------------------------------------- receiver
#: After descriptors arrived, a gate that finds its rings empty re-checks them (yielding the CPU between
#: checks) for this long before it parks: a producer that is streaming publishes again sooner than a
#: wake-up message could arrive (a ZeroMQ message wakes both processes' I/O threads). An idle gate has had
#: no descriptor for longer and parks at once. Measured on W1 (1 GiB, 2 cores): wake-up messages per run
#: 126-166 -> 27 at 1 MiB and 73-75 -> 2-5 at 32 KiB; throughput within the machine's noise. Twin:
#: ``partition.SPIN_SECONDS``.
SPIN_SECONDS = 0.0005
#: How long a closed gate's socket keeps trying to deliver its last recycles and credits (milliseconds).
CLOSE_LINGER_MS = 2000


class ReceivedBuffer:
    """A buffer that arrived on a channel: a read-only view of its bytes until :meth:`release`.

    Ownership: the gate lends it; call ``release()`` exactly once when done
    (that recycles it to its sender and returns the credit). The view must not
    be used after that: ``release()`` sets it to None.
    """

    __slots__ = ("gate", "channel", "index", "view", "_released")

    def __init__(self, gate: InputGate, channel: int, index: int, view: memoryview) -> None:
        self.gate = gate
        self.channel = channel
        self.index = index
        self.view: memoryview | None = view  # shm: a read-only slice of the sender's pool; tcp: of the zmq frame
        self._released = False

    @property
    def size(self) -> int:
        return len(cast(memoryview, self.view))  # a released buffer raises TypeError, as before

    def release(self) -> None:
        if self._released:
            text = f"buffer {self.index} of channel {self.channel} was released twice"
            raise DoubleFreeError(text)
        self._released = True
        self.view = None
        self.gate._release(self.channel, self.index)


class _ChannelState:
    """Receiver-side state of one input channel: credits, floating loans, pending returns."""

    __slots__ = ("index", "identity", "name", "hello", "base", "buffer_size", "region", "view", "ring", "granted",
                 "floating", "backlog", "pending_credits", "unreleased", "finished")

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.name = name
        self.identity: bytes | None = None
        self.hello: dict[str, Any] | None = None
        self.base = 0
        self.buffer_size = 0
        self.region: SharedRegion | None = None  # shm only
        self.view: memoryview | None = None  # read-only view of the region's usable area (shm)
        self.ring: rings.Ring | None = None  # shm, until the producer closes it (then detached: None)
        self.granted = 0  # credits granted and not yet consumed by a buffer
        self.floating = 0  # floating credits lent to this channel (granted or in use)
        self.backlog = 0
        self.pending_credits = 0  # tcp: granted, not sent yet
        self.unreleased = 0
        self.finished = False


class InputGate:
    """The receiving side of one consumer subtask: reads the channels of every producer.

    ``num_channels`` producers connect to :attr:`endpoint`; producer channel
    ``i`` must say ``channel_id=i`` in its handshake. ``exclusive`` credits per
    channel and ``floating`` credits for the whole gate bound the buffers in
    flight (``network.buffers-per-channel`` / ``network.floating-buffers-per-gate``).
    ``region`` is the shared region (shm transport); when None, the gate
    attaches to the region a producer names in its handshake. ``keep_alive``
    is called at least every ``KEEP_ALIVE_INTERVAL`` seconds while the gate
    waits (the worker's heartbeat and cancel check: it may raise to end the
    wait).

    Process: the consuming worker. Not thread-safe.
    """

    def __init__(self, num_channels: int, *, exclusive: int = 2, floating: int = 8, name: str = "gate",
                 endpoint: str | None = None, region: SharedRegion | None = None,
                 keep_alive: Callable[[], None] | None = None) -> None:
        if exclusive < 1:
            text = f"exclusive credits per channel must be >= 1 (network.buffers-per-channel); got {exclusive}"
            raise ValueError(text)
        self.name = name
        self.keep_alive = keep_alive
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
        self._rings: list[_ChannelState] = []  # channels with a ring attached
        self._parked: list[_ChannelState] = []  # channels parked in their ring right now
        self._buffers = self._bytes = self._messages = self._wakeups = 0
        self._granted_total = 0
        self._spin_until = 0.0  # monotonic: re-check the rings instead of parking until then

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
        keep_alive = self.keep_alive
        while not self._ready:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            if keep_alive is not None:
                keep_alive()
                remaining = KEEP_ALIVE_INTERVAL if remaining is None else min(remaining, KEEP_ALIVE_INTERVAL)
            self._receive(remaining)

    def _receive(self, timeout: float | None) -> None:
        """Take what the rings and the socket hold; block up to ``timeout`` when that is nothing.

        Before it waits it returns every pending tcp credit (what keeps credit
        flow deadlock-free) and parks in every ring, so a producer that
        publishes meanwhile wakes it.
        """
        if self._rings:
            self._poll_rings()
        sock = self.socket
        if sock.poll(0):
            self._drain_socket()
        if self._ready or timeout == 0:
            return
        self.flush_credits()  # about to wait: return everything released so far
        while self._rings and time.monotonic() < self._spin_until:  # a streaming producer: re-check first
            os.sched_yield()
            self._poll_rings()
            if self._ready:
                return
        if not self._park_rings():
            self._poll_rings()
            return
        try:
            ready = sock.poll(None if timeout is None else int(timeout * 1000))
        finally:
            self.unpark()
        if ready:
            self._drain_socket()
        if self._rings:
            self._poll_rings()

    def _drain_socket(self) -> None:
        sock = self.socket
        while True:
            self._on_message(sock.recv_multipart(copy=False))
            if not sock.poll(0):
                break

    def _poll_rings(self) -> None:
        """Take every descriptor published in the rings since the last call."""
        for ch in list(self._rings):
            ring = cast(rings.Ring, ch.ring)
            try:
                backlog, indices, sizes = ring.pop()
            except rings.RingGone:
                self._detach(ch)
                continue
            except ValueError as exc:  # a torn descriptor or counter: refused, never followed
                text = f"channel {ch.name}: {exc}"
                raise DeserializationError(text) from None
            if indices:
                self._on_descriptors(ch, backlog, indices, sizes)

    def _on_descriptors(self, ch: _ChannelState, backlog: int, indices: list[int], sizes: list[int]) -> None:
        where = f"channel {ch.name}"
        hello = cast("dict[str, Any]", ch.hello)
        region = cast(SharedRegion, ch.region)
        if region.generation(ch.base) != hello["pool_generation"]:
            text = f"{where}: the sender's buffer pool was freed (its worker is gone)"
            raise BrokenChannelError(text)
        buf = ch.view
        if buf is None:
            buf = ch.view = region.buf.toreadonly()  # slices of it are read-only views
        base, bsize, cindex = ch.base, ch.buffer_size, ch.index
        self._ready.extend([ReceivedBuffer(self, cindex, i, buf[base + i * bsize:base + i * bsize + size])
                            for i, size in zip(indices, sizes)])
        self._bytes += sum(sizes)
        self._received(ch, len(indices), backlog)
        self._spin_until = time.monotonic() + SPIN_SECONDS

    def _received(self, ch: _ChannelState, n: int, backlog: int) -> None:
        """``n`` buffers arrived on ``ch`` with the sender's ``backlog``: consume credits, lend floating ones."""
        if n > ch.granted:
            text = f"channel {ch.name}: sender shipped {n} buffers with {ch.granted} credits"
            raise DeserializationError(text)
        ch.granted -= n
        ch.unreleased += n
        self._buffers += n
        self._lend_floating(ch, backlog)

    def _lend_floating(self, ch: _ChannelState, backlog: int) -> int:
        """The sender of ``ch`` has ``backlog`` buffers queued: lend it up to that many floating credits
        while the gate has some. Returns how many it lent."""
        ch.backlog = backlog
        lend = min(backlog, self.floating_free)
        if lend:
            self.floating_free -= lend
            ch.floating += lend
            self._grant(ch, lend)
        return lend

    def _on_backlog(self, ch: _ChannelState, backlog: int) -> None:
        """The producer of ``ch`` announced ``backlog`` queued buffers and has no credit: lend it floating
        credits, and over tcp send them at once (it waits for them)."""
        if self._lend_floating(ch, backlog) and ch.region is None:
            self._send_credits(ch)

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        head = frames[1]
        kind = head.buffer[0]
        self._messages += 1
        ch = self._by_identity.get(identity)
        if kind == msg.HELLO:
            self._on_hello(identity, head.bytes)
            return
        if ch is None:
            text = f"gate {self.name}: message from unknown peer {identity!r} before its hello"
            raise DeserializationError(text)
        where = f"channel {ch.name}"
        if kind == msg.WAKE and ch.region is not None:
            return  # a producer published into a ring this gate parked in: _poll_rings takes it
        if kind == msg.BACKLOG:
            self._on_backlog(ch, msg.decode_backlog(head.buffer, where=where))
            return
        if kind != msg.BYTES or ch.region is not None:
            text = f"{where}: unexpected message kind {kind!r}"
            raise DeserializationError(text)
        if len(frames) < 3:
            text = f"{where}: bytes message of {len(frames) - 1} frames; expected a header and a payload"
            raise DeserializationError(text)
        payloads = [frame.buffer for frame in frames[2:]]
        total = sum(len(p) for p in payloads)
        backlog, sizes = msg.decode_bytes_header(head.buffer, total, where=where)
        ready = self._ready
        cindex = ch.index
        parts = iter(payloads)
        payload = next(parts)
        end = len(payload)
        start = 0
        for size in sizes:  # views of the frames: each lives until the last view of it is released
            while start + size > end:  # the buffer is in the next frame: a frame holds whole buffers
                if start != end:
                    text = f"{where}: a buffer of {size} bytes crosses the end of a payload frame"
                    raise DeserializationError(text)
                payload = next(parts)  # the sizes add up to the frames' total: there is a next one
                end = len(payload)
                start = 0
            ready.append(ReceivedBuffer(self, cindex, -1, payload[start:start + size]))
            start += size
        self._bytes += total
        self._received(ch, len(sizes), backlog)

    # ------------------------------------------------------------------ parking
    def _park_rings(self) -> bool:
        """Park in every ring; False (parked nowhere) if one has descriptors already."""
        parked = self._parked
        for ch in list(self._rings):
            ring = cast(rings.Ring, ch.ring)
            try:
                if ring.park_consumer():
                    parked.append(ch)
                    continue
                if ring.closed_and_empty():  # its producer is done: nothing will come, stop watching it
                    self._detach(ch)
                    continue
            except rings.RingGone:
                self._detach(ch)
                continue
            self.unpark()
            return False
        return True

    def park(self, *, reading: bool) -> bool:
        """Before the worker's loop sleeps: take what the socket holds and, if the caller is ``reading``,
        announce in every ring that this gate waits. Returns False, parked nowhere, when buffers are
        there to read: do not sleep. Pair with :meth:`unpark` after the sleep."""
        if self.socket.poll(0):
            self._drain_socket()
        if not reading:
            return True
        if self._ready or (self._rings and time.monotonic() < self._spin_until):
            return False  # read now, or re-check soon: a streaming producer publishes before a wake-up arrives
        return self._park_rings()

    def unpark(self) -> None:
        """The wait is over: no wake-up is wanted any more."""
        for ch in self._parked:
            ring = ch.ring
            if ring is not None:
                try:
                    ring.unpark_consumer()
                except rings.RingGone:
                    self._detach(ch)
        self._parked.clear()

    def _detach(self, ch: _ChannelState) -> None:
        """Stop using ``ch``'s ring: its producer closed or freed it (after every buffer came back, or
        because its job is failing)."""
        ring = ch.ring
        if ring is not None:
            ring.close()
            ch.ring = None
            self._rings.remove(ch)

    def _on_hello(self, identity: bytes, frame: bytes) -> None:
        hello = msg.decode_hello(frame, where=f"gate {self.name}")
        cid = hello.get("channel")
        if not isinstance(cid, int) or not 0 <= cid < len(self.channels):
            text = f"gate {self.name}: hello names channel {cid!r}; expected 0..{len(self.channels) - 1}"
            raise DeserializationError(text)
        ch = self.channels[cid]
        if ch.identity is not None:
            text = f"gate {self.name}: channel {cid} connected twice"
            raise DeserializationError(text)
        ch.identity = identity
        ch.hello = hello
        self._by_identity[identity] = ch
        if hello.get("transport") == "shm":
            where = f"gate {self.name}: channel {cid}"
            try:
                region = ch.region = self._region_named(hello["region"])
                ch.base = hello["pool_offset"]
                ch.buffer_size = hello["buffer_size"]
                ch.ring = rings.attach_ring(region, hello["ring_offset"], hello["ring_capacity"],
                                            hello["ring_generation"], num_buffers=hello["num_buffers"],
                                            buffer_size=hello["buffer_size"])
            except rings.RingGone:
                text = f"{where}: the producer freed its ring before the gate attached (its worker is gone)"
                raise BrokenChannelError(text) from None
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                text = f"{where}: hello does not describe a pool and a ring ({exc}); got {hello!r:.300}"
                raise DeserializationError(text) from None
            self._rings.append(ch)
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
        self._granted_total += n
        if ch.region is None:
            ch.pending_credits += n
        else:
            self._give_back(ch, [], n)

    def _give_back(self, ch: _ChannelState, indices: list[int], credits: int) -> None:
        """shm: publish ``indices`` (buffers done with) and ``credits`` in ``ch``'s ring; wake its producer
        if it parked. A detached ring's producer is done: there is nothing to give back to."""
        ring = ch.ring
        if ring is None:
            return
        try:
            wake = ring.give_back(indices, credits)
        except rings.RingGone:
            self._detach(ch)
            return
        if wake:
            self.socket.send_multipart([cast(bytes, ch.identity), msg.WAKE_FRAME])
            self._wakeups += 1

    def _release(self, channel: int, index: int) -> None:
        ch = self.channels[channel]
        ch.unreleased -= 1
        credits = 1
        if ch.floating and ch.backlog == 0:  # give the loan back to the gate
            ch.floating -= 1
            self.floating_free += 1
            credits = 0
        if ch.region is not None:
            ch.granted += credits
            self._granted_total += credits
            self._give_back(ch, [index], credits)
            return
        if credits:
            self._grant(ch, credits)
        if ch.pending_credits >= ((self.exclusive + ch.floating) >> 2 or 1):  # a quarter of the credit window
            self._send_credits(ch)

    def release_all(self, buffers: list[ReceivedBuffer]) -> None:
        """Release every buffer in ``buffers``, as ``rb.release()`` on each in order, returning their
        credits and recycles per channel in one go (the batch counterpart of :meth:`next_buffers`).

        Raises DoubleFreeError at the first buffer released already (those before it stay released).
        """
        groups: dict[int, list[int]] = {}
        channel, group = -1, []  # the group of the channel of the previous buffer (runs are the rule)
        twice = None
        for rb in buffers:
            if rb._released or rb.gate is not self:
                if rb.gate is not self:
                    rb.release()
                    continue
                twice = rb
                break
            rb._released = True
            rb.view = None
            if rb.channel != channel:
                channel = rb.channel
                group = groups.setdefault(channel, [])
            group.append(rb.index)
        for channel, indices in groups.items():
            self._release_many(self.channels[channel], indices)
        if twice is not None:
            twice.release()  # raises DoubleFreeError

    def _release_many(self, ch: _ChannelState, indices: list[int]) -> None:
        n = len(indices)
        ch.unreleased -= n
        if ch.floating and ch.backlog == 0:  # give loans back to the gate
            back = min(ch.floating, n)
            ch.floating -= back
            self.floating_free += back
            n -= back
        if ch.region is not None:
            ch.granted += n
            self._granted_total += n
            self._give_back(ch, indices, n)
            return
        if n:
            self._grant(ch, n)
        if ch.pending_credits >= ((self.exclusive + ch.floating) >> 2 or 1):
            self._send_credits(ch)

    def _send_credits(self, ch: _ChannelState) -> None:
        """tcp: send the channel's pending credits in one ``C`` message."""
        if ch.identity is None or not ch.pending_credits:
            return
        frame = msg.encode_credit(ch.pending_credits)
        ch.pending_credits = 0
        self.socket.send_multipart([ch.identity, frame])

    def flush_credits(self) -> None:
        """Send every pending tcp credit (called before blocking and on close; shm credits are in the
        rings already)."""
        for ch in self.channels:
            if ch.pending_credits:
                self._send_credits(ch)

    # ------------------------------------------------------------------ lifetime
    @property
    def connected(self) -> int:
        return sum(ch.identity is not None for ch in self.channels)

    def wait_connected(self, *, timeout: float, keep_alive: Callable[[], None] | None = None) -> None:
        """Block until every producer's channel has said hello.

        ``keep_alive`` (default: the gate's) is called at least every ``KEEP_ALIVE_INTERVAL``
        seconds meanwhile; whatever it raises (a cancelled job) ends the wait.
        Raises:
            TimeoutError: not every channel connected within ``timeout``.
        """
        keep_alive = keep_alive or self.keep_alive
        deadline = time.monotonic() + timeout
        while self.connected < len(self.channels):
            if keep_alive is not None:
                keep_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                text = (
                    f"gate {self.name}: {self.connected} of {len(self.channels)} channels "
                                   f"connected within {timeout}s"
                )
                raise TimeoutError(text)
            self._receive(min(remaining, KEEP_ALIVE_INTERVAL))

    def stats(self) -> GateStats:
        return GateStats(
            buffers_received=self._buffers, bytes_received=self._bytes, messages_received=self._messages,
            wakeups_sent=self._wakeups,
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
        # The last recycles and credits were only queued: closing with linger 0 would drop them, and a
        # producer still waiting for those buffers (to finish its other channels) would wait forever.
        # Closing does not block on linger; only the context's termination at exit waits (at most this).
        self.socket.close(linger=CLOSE_LINGER_MS)
        self.unpark()
        for ch in list(self._rings):
            self._detach(ch)
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

    def __enter__(self) -> InputGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["GateStats", "InputGate", "ReceivedBuffer"]
