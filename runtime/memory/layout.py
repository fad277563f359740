"""A text picture of how a region is carved: one bar per allocator, a legend of owners, free blocks.

Imports: runtime.memory (buddy, units), runtime.errors.

Nested allocators (a worker's arena carved again inside the coordinator's
grant) are drawn as their own bars, below the allocator that granted their range.
An allocator is drawn from an :class:`AllocatorSnapshot`: plain data, so that
a worker can report its arena (in its heartbeats) and another process draw it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.errors import ProtocolError
from runtime.memory.buddy import BuddyAllocator
from runtime.memory.units import format_bytes

__all__ = ["AllocatorSnapshot", "render_layout"]

_FREE = "."
_SYMBOLS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789#@%&*+=~"


@dataclass(frozen=True)
class AllocatorSnapshot:
    """An allocator's blocks at one moment, as plain data (a copy: it refers to no live segment).

    ``runs``: ``(offset, bytes, owner, blocks)`` for each run of adjacent blocks
    of one owner, in address order (a managed share's pages are often one run);
    ``free``: ``(offset, bytes)`` of each free block. Offsets are the region's.
    """

    offset: int
    size: int
    min_block: int
    runs: tuple[tuple[int, int, str, int], ...]
    free: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, alloc: BuddyAllocator) -> AllocatorSnapshot:
        """What ``alloc`` holds now. O(blocks); owners become their ``str``."""
        runs: list[list[Any]] = []
        for seg in alloc.segments():
            owner = str(seg.owner)
            last = runs[-1] if runs else None
            if last is not None and last[2] == owner and last[0] + last[1] == seg.offset:
                last[1] += seg.size
                last[3] += 1
            else:
                runs.append([seg.offset, seg.size, owner, 1])
        return cls(alloc.offset, alloc.size, alloc.min_block, tuple((o, n, w, c) for o, n, w, c in runs),
                   tuple(alloc.free_blocks()))

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self.free)

    @property
    def largest_free_block(self) -> int:
        return max((n for _, n in self.free), default=0)

    def by_owner(self) -> dict[str, tuple[int, int]]:
        """``owner -> (bytes, blocks)``, in address order of each owner's first block."""
        out: dict[str, tuple[int, int]] = {}
        for _, nbytes, owner, count in self.runs:
            b, c = out.get(owner, (0, 0))
            out[owner] = (b + nbytes, c + count)
        return out

    def to_wire(self) -> list[Any]:
        """msgpack-able: ``[offset, size, min_block, [[offset, bytes, owner, blocks]...], [[offset, bytes]...]]``."""
        return [self.offset, self.size, self.min_block, [list(r) for r in self.runs], [list(f) for f in self.free]]

    @classmethod
    def from_wire(cls, data: Any) -> AllocatorSnapshot:
        """Inverse of :meth:`to_wire`.

        Raises:
            ProtocolError: ``data`` is not of that shape (it came from another process).
        """
        def ints(items: Any, n: int) -> bool:
            return isinstance(items, list) and len(items) == n and all(
                isinstance(v, int) and not isinstance(v, bool) for v in items)

        ok = isinstance(data, list) and len(data) == 5 and ints(data[:3], 3)
        if ok:
            runs, free = data[3], data[4]
            ok = (isinstance(runs, list) and isinstance(free, list) and all(ints(f, 2) for f in free)
                  and all(isinstance(r, list) and len(r) == 4 and ints([r[0], r[1], r[3]], 3)
                          and isinstance(r[2], str) for r in runs))
        if not ok:
            msg = f"an allocator snapshot must be [offset, size, min_block, runs, free]; got {str(data)[:200]}"
            raise ProtocolError(msg)
        return cls(data[0], data[1], data[2], tuple((o, n, w, c) for o, n, w, c in data[3]),
                   tuple((o, n) for o, n in data[4]))


def _bar(alloc: AllocatorSnapshot, width: int, symbols: dict[Hashable, str]) -> str:
    """One character per ``alloc.size / width`` bytes: the owner holding most of that span."""
    cells: list[tuple[float, str]] = [(0, _FREE)] * width  # (bytes of the dominant owner, symbol)
    scale = alloc.size / width
    for offset, nbytes, owner, _ in alloc.runs:
        sym = symbols.setdefault(owner, _SYMBOLS[len(symbols) % len(_SYMBOLS)])
        start = (offset - alloc.offset) / scale
        end = (offset - alloc.offset + nbytes) / scale
        for cell in range(int(start), min(width, int(end - 1e-9) + 1)):
            covered = (min(end, cell + 1) - max(start, cell)) * scale
            if covered > cells[cell][0]:
                cells[cell] = (covered, sym)
    return "".join(sym for _, sym in cells)


def render_layout(allocators: Iterable[tuple[str, BuddyAllocator | AllocatorSnapshot]], *, width: int = 64,
                  details: Mapping[str, Sequence[str]] | None = None) -> str:
    """Draw each ``(title, allocator or snapshot)`` as a bar and list its blocks by owner.

    Each character of a bar stands for ``size / width`` bytes and shows the
    owner that holds most of them (``.`` is free). The legend gives each
    owner's bytes and block count, then the free blocks by size. ``details``:
    lines to print under an owner's legend line (indented), by owner (what
    the owner keeps in its blocks, such as a state backend's bins).
    """
    symbols: dict[Hashable, str] = {}
    lines: list[str] = []
    for title, source in allocators:
        alloc = source if isinstance(source, AllocatorSnapshot) else AllocatorSnapshot.of(source)
        lines.append(f"{title}: [{alloc.offset:#x}, {alloc.offset + alloc.size:#x}) "
                     f"{format_bytes(alloc.size)}, min block {format_bytes(alloc.min_block)}, "
                     f"{format_bytes(alloc.free_bytes)} free, largest free {format_bytes(alloc.largest_free_block)}")
        lines.append(f"  |{_bar(alloc, width, symbols)}|")
        for owner, (nbytes, count) in alloc.by_owner().items():
            blocks = "block" if count == 1 else "blocks"
            lines.append(f"  {symbols[owner]} {owner:<28} {format_bytes(nbytes):>10} in {count} {blocks}")
            lines.extend(f"      {line}" for line in (details or {}).get(owner, ()))
        free_sizes: dict[int, int] = {}
        for _, nbytes in alloc.free:
            free_sizes[nbytes] = free_sizes.get(nbytes, 0) + 1
        if free_sizes:
            parts = ", ".join(f"{n} x {format_bytes(size)}" for size, n in sorted(free_sizes.items(), reverse=True))
            lines.append(f"  {_FREE} free: {parts}")
    return "\n".join(lines)
