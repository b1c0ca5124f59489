"""Free-list allocator of KV-pool slots (plain Python, no torch)."""

from __future__ import annotations


class SlotAllocator:
    """Hands out slot indices of the KV pool; each slot holds one token's K and V."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        # Stack in reverse so slots come out ascending: a request's run of fresh
        # slots is contiguous when the pool is not fragmented, which keeps gathers cheap.
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """Return ``n`` free slots, or ``None`` (allocating nothing) if fewer are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        out = self._free[-n:]
        del self._free[-n:]
        out.reverse()
        return out

    def free(self, slots: list[int]) -> None:
        self._free.extend(reversed(slots))
