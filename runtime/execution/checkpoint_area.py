"""A worker's checkpoint area: the block of the shared region where its subtasks' latest snapshots stay.

Imports: stdlib only.

The coordinator grants each worker slot one block of the region for checkpoints
(``state.checkpoints.shared-memory.size``) and keeps it across the worker's
death: a replacement in the same slot is deployed with it, and with where the
blobs of the last complete checkpoint lie in it, and reads them in place
instead of the checkpoint's files.

:class:`CheckpointArea` hands out space for blobs as a ring: blobs are
allocated at the head, in checkpoint order, and freed from the tail once a
later checkpoint completed (:meth:`release_before`), so the area holds the
last complete checkpoint's blobs and those of the checkpoint in progress, and
needs no free list. A blob that does not fit goes to the heap instead (only
its file then serves a restore). A restored job first reserves the blobs it
restores from (:meth:`reserve`), so that its own first snapshots do not
overwrite them while a second failure could still need them.

Ownership: the coordinator allocates and frees the block; the worker deployed
in the slot is the only writer of its bytes, through this object; blobs of a
completed checkpoint are read-only. Process: the worker, its job thread.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["CheckpointArea"]

#: Blobs start at multiples of this (their buffers are 8-aligned inside; a cache line between blobs).
ALIGN = 64


@dataclass(frozen=True)
class _Blob:
    checkpoint_id: int
    start: int  # relative to the area
    end: int


class CheckpointArea:
    """Ring allocation of snapshot blobs in ``size`` bytes at region offset ``offset`` (see the module)."""

    def __init__(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0:
            msg = f"a checkpoint area needs offset and size >= 0; got offset {offset}, size {size}"
            raise ValueError(msg)
        self.offset = offset
        self.size = size
        self._blobs: deque[_Blob] = deque()
        self.head = 0  # where the next blob goes (relative)
        self.refused = 0  # blobs that did not fit (they went to the heap)

    def allocate(self, checkpoint_id: int, nbytes: int) -> int | None:
        """Region offset of ``nbytes`` for a blob of ``checkpoint_id``, or None when the area cannot hold it
        next to the blobs it keeps."""
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        start = self._fit(need) if need <= self.size else None
        if start is None:
            self.refused += 1
            return None
        self._blobs.append(_Blob(checkpoint_id, start, start + need))
        self.head = start + need
        return self.offset + start

    def _fit(self, need: int) -> int | None:
        if not self._blobs:
            self.head = 0
            return 0
        tail = self._blobs[0].start
        if self.head > tail:  # live bytes are [tail, head): room after head, else before tail
            if self.size - self.head >= need:
                return self.head
            return 0 if tail >= need else None
        # wrapped (or full): live bytes are [tail, size) and [0, head)
        return self.head if tail - self.head >= need else None

    def reserve(self, blobs: list[tuple[int, int]]) -> None:
        """Keep the blobs ``[(region offset, bytes)]`` (a restore's, checkpoint id 0) until a checkpoint
        completes: new blobs go after the last of them. Blobs outside the area are ignored."""
        inside = sorted((o - self.offset, o - self.offset + n) for o, n in blobs
                        if n > 0 and self.offset <= o and o + n <= self.offset + self.size)
        if not inside or self._blobs:
            return
        start, end = inside[0][0], -(-inside[-1][1] // ALIGN) * ALIGN
        self._blobs.append(_Blob(0, start, min(end, self.size)))
        self.head = min(end, self.size)

    def release_before(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` completed: free the blobs of every earlier one (and of aborted ones)."""
        while self._blobs and self._blobs[0].checkpoint_id < checkpoint_id:
            self._blobs.popleft()
        if not self._blobs:
            self.head = 0

    @property
    def used_bytes(self) -> int:
        return sum(b.end - b.start for b in self._blobs)
