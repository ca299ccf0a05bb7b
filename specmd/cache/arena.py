"""The fast tier: memory for cached experts, allocated once, carved into slots."""

from __future__ import annotations

import torch

ALIGN = 64  # bytes; every slot starts on a cache-line boundary, like the allocator's own tensors


class SlotArena:
    """One buffer allocated up front on `device`, carved into `num_slots` slots of one size class.

    Nothing is allocated after construction: acquiring and releasing a slot only moves an index.
    """

    def __init__(self, slot_bytes: int, num_slots: int, device: torch.device) -> None:
        if slot_bytes <= 0 or num_slots <= 0:
            raise ValueError(f"an arena needs slot_bytes > 0 and num_slots > 0, got {slot_bytes}, {num_slots}")
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self._stride = -(-slot_bytes // ALIGN) * ALIGN
        self._buffer = torch.empty(self._stride * num_slots, dtype=torch.uint8, device=device)
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> tuple[int, torch.Tensor]:
        """A free slot: its index and a `slot_bytes`-long uint8 view."""
        if not self._free:
            raise RuntimeError(f"all {self.num_slots} arena slots are in use")
        index = self._free.pop()
        start = index * self._stride
        return index, self._buffer[start : start + self.slot_bytes]

    def release(self, index: int) -> None:
        self._free.append(index)
