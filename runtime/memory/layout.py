"""A text picture of how a region is carved: one bar per allocator, a legend of owners, free blocks.

Imports: runtime.memory (buddy, units).

Nested allocators (a worker's arena carved again inside the coordinator's
grant) are drawn as their own bars, below the allocator that granted their range.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from runtime.memory.buddy import BuddyAllocator
from runtime.memory.units import format_bytes

__all__ = ["render_layout"]

_FREE = "."
_SYMBOLS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789#@%&*+=~"


def _bar(alloc: BuddyAllocator, width: int, symbols: dict[Hashable, str]) -> str:
    """One character per ``alloc.size / width`` bytes: the owner holding most of that span."""
    cells: list[tuple[float, str]] = [(0, _FREE)] * width  # (bytes of the dominant owner, symbol)
    scale = alloc.size / width
    for seg in alloc.segments():
        sym = symbols.setdefault(seg.owner, _SYMBOLS[len(symbols) % len(_SYMBOLS)])
        start = (seg.offset - alloc.offset) / scale
        end = (seg.offset - alloc.offset + seg.size) / scale
        for cell in range(int(start), min(width, int(end - 1e-9) + 1)):
            covered = (min(end, cell + 1) - max(start, cell)) * scale
            if covered > cells[cell][0]:
                cells[cell] = (covered, sym)
    return "".join(sym for _, sym in cells)


def render_layout(allocators: Iterable[tuple[str, BuddyAllocator]], *, width: int = 64) -> str:
    """Draw each ``(title, allocator)`` as a bar and list its blocks by owner.

    Each character of a bar stands for ``size / width`` bytes and shows the
    owner that holds most of them (``.`` is free). The legend gives each
    owner's bytes and block count, then the free blocks by size.
    """
    symbols: dict[Hashable, str] = {}
    lines: list[str] = []
    for title, alloc in allocators:
        stats = alloc.stats()
        lines.append(f"{title}: [{alloc.offset:#x}, {alloc.offset + alloc.size:#x}) "
                     f"{format_bytes(alloc.size)}, min block {format_bytes(alloc.min_block)}, "
                     f"{format_bytes(stats.free_bytes)} free, largest free {format_bytes(stats.largest_free_block)}")
        lines.append(f"  |{_bar(alloc, width, symbols)}|")
        per_owner: dict[Hashable, tuple[int, int]] = {}
        for seg in alloc.segments():
            nbytes, count = per_owner.get(seg.owner, (0, 0))
            per_owner[seg.owner] = (nbytes + seg.size, count + 1)
        for owner, (nbytes, count) in per_owner.items():
            blocks = "block" if count == 1 else "blocks"
            lines.append(f"  {symbols[owner]} {str(owner):<28} {format_bytes(nbytes):>10} in {count} {blocks}")
        free_sizes: dict[int, int] = {}
        for _, nbytes in alloc.free_blocks():
            free_sizes[nbytes] = free_sizes.get(nbytes, 0) + 1
        if free_sizes:
            parts = ", ".join(f"{n} x {format_bytes(size)}" for size, n in sorted(free_sizes.items(), reverse=True))
            lines.append(f"  {_FREE} free: {parts}")
    return "\n".join(lines)
