"""The receiving side of a network exchange: input gates, their channels' credits, received buffers.

Imports: runtime.memory, runtime.network (messages, transport), runtime.errors.
The sending side is :mod:`runtime.network.partition`.

An **InputGate** binds one ROUTER socket that every producer's output channel
connects to. Each channel is granted ``exclusive`` credits at the handshake;
the gate lends up to ``floating`` more to channels that report a backlog and
takes them back when the backlog is gone. Over ``shm`` a received buffer is a
read-only view of the sender's pool until it is released, which queues its
index to be recycled; over ``tcp`` it is the received zmq frame. Recycles and
credits go back in one message per channel, when a quarter of its credit
window is pending or before the gate would block.

Threads: none. A gate is used by one thread, which polls its socket when it
has to wait. Every wait calls the gate's ``keep_alive`` (the worker's heartbeat
and cancel check) at least every ``KEEP_ALIVE_INTERVAL`` seconds: a process that
waits for its peers keeps heartbeating and can be cancelled.
"""

from __future__ import annotations

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
from runtime.network.transport import KEEP_ALIVE_INTERVAL, bind, context, local_endpoint, make_socket


# --------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class GateStats(Snapshot):
    buffers_received: int
    bytes_received: int
    messages_received: int
    credits_granted: int
    floating_lent: int
    unreleased: int


# ---------------------------------------------------------------------- receiver
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
        self.view: memoryview | None = view  # shm: a read-only slice of the sender's pool; tcp: the zmq frame
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

    __slots__ = ("index", "identity", "name", "hello", "base", "buffer_size", "region", "view", "granted",
                 "floating", "backlog", "pending_credits", "pending_recycles", "unreleased", "finished")

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.name = name
        self.identity: bytes | None = None
        self.hello: dict[str, Any] | None = None
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
        if kind == msg.DATA:
            backlog, desc = msg.decode_data(head.buffer, where=where)
            n = len(desc)
            hello = cast("dict[str, Any]", ch.hello)  # set with ch.identity, before ch was in _by_identity
            if ch.region is not None and ch.region.generation(ch.base) != hello["pool_generation"]:
                text = f"{where}: the sender's buffer pool was freed (its worker is gone)"
                raise BrokenChannelError(text)
            buf = ch.view
            if buf is None and ch.region is not None:
                buf = ch.view = ch.region.buf.toreadonly()  # slices of it are read-only views
            base, bsize = ch.base, ch.buffer_size
            idx_list = desc["index"].tolist()
            size_list = desc["size"].tolist()
            if n and (max(idx_list) >= hello["num_buffers"] or max(size_list) > bsize):
                i, size = next((i, size) for i, size in zip(idx_list, size_list)
                               if i >= hello["num_buffers"] or size > bsize)
                text = f"{where}: descriptor ({i}, {size}) outside the sender's pool"
                raise DeserializationError(text)
            cindex = ch.index
            buf = cast(memoryview, buf)  # None only for a tcp channel, which never sends DATA
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
            text = f"{where}: unexpected message kind {kind!r}"
            raise DeserializationError(text)
        if n > ch.granted:
            text = f"{where}: sender shipped {n} buffers with {ch.granted} credits"
            raise DeserializationError(text)
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
