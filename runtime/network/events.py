"""In-band events: what travels between workers in order with the records, but is not a record.

Imports: nothing from the project (stdlib only).

Events are plain frozen dataclasses. The serializer (``runtime.network.serializer``)
writes them as EVENT frames with ``BufferSerializer.write_event`` and the
deserializer yields them between the batches they were written between, so a
consumer sees, e.g., every record a producer emitted before its watermark
before that watermark [Flink ``AbstractEvent`` / ``EndOfPartitionEvent``].

* :class:`EndOfPartition` - the producer emitted its last record on this channel.
* :class:`Watermark` - event time on this channel has reached ``timestamp``
  (float seconds; ``float("inf")`` closes every window).
* :class:`UserEvent` - an application event carrying a msgpack-able ``payload``
  (None, bool, int, float, str, bytes, list, tuple, dict; tuples come back as tuples).
* :class:`CheckpointBarrier` - everything before it on this channel belongs to
  checkpoint ``checkpoint_id``, everything after it to the next one
  (Carbone et al., "Lightweight Asynchronous Snapshots for Distributed Dataflows", 2015).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EndOfPartition:
    """The producer has finished this channel: no record or event follows."""


@dataclass(frozen=True)
class Watermark:
    """Event time on this channel has advanced to ``timestamp`` (seconds, int or float; may be inf)."""

    timestamp: float


@dataclass(frozen=True)
class UserEvent:
    """An application event: ``payload`` is any msgpack-able value (see the serializer's record types)."""

    payload: Any


@dataclass(frozen=True)
class CheckpointBarrier:
    """Checkpoint ``checkpoint_id`` (>= 1) passes this point of the channel; ``timestamp`` (wall clock,
    seconds) is when the coordinator triggered it."""

    checkpoint_id: int
    timestamp: float


#: Every in-band event type; ``isinstance(item, EVENT_TYPES)`` tells events from batches.
EVENT_TYPES = (EndOfPartition, Watermark, UserEvent, CheckpointBarrier)
Event = EndOfPartition | Watermark | UserEvent | CheckpointBarrier

__all__ = ["EVENT_TYPES", "CheckpointBarrier", "EndOfPartition", "Event", "UserEvent", "Watermark"]
