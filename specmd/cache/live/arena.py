"""The fast tier: memory for cached experts, allocated once, carved into blocks of a few size classes.

The engine admits any set of experts whose bytes fit the capacity, at any mix of precisions. The arena
must then always find room for an admitted expert. With one size class (one stored precision) fixed
slots never fragment. With several, freed blocks can leave holes too small for a larger expert even
though enough bytes are free in total; then the arena **compacts**: it slides every block toward the
start of the buffer (a device-local copy, no allocation), which leaves all free bytes in one run at
the end. The buffer is sized so that run always fits (see `buffer_bytes`), so placement never fails
while the engine keeps its byte bound. Compaction needs every block quiescent: the caller (the live
payload) first waits for the copies in flight, then refreshes its views of the blocks that moved.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

import torch

ALIGN = 64  # bytes; every block starts on a cache-line boundary, like the allocator's own tensors
SCRATCH_BYTES = 1 << 20  # staging for moves whose source and destination overlap


def _stride(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def buffer_bytes(capacity_bytes: int, sizes: Iterable[int]) -> int:
    """Bytes an arena needs so that any set of blocks of `sizes` totalling <= `capacity_bytes` fits.

    Each block takes its size rounded up to `ALIGN`. With one size s that is `capacity // s` slots.
    With several, a set of n_i blocks of size s_i with sum(n_i s_i) <= capacity takes
    sum(n_i stride(s_i)) <= capacity x max_i(stride(s_i) / s_i) bytes once compacted.
    """
    classes = sorted(set(sizes))
    if not classes or classes[0] <= 0 or capacity_bytes < classes[-1]:
        raise ValueError(
            f"an arena needs sizes > 0 and a capacity of at least one block, got {classes}, {capacity_bytes}"
        )
    if len(classes) == 1:
        return (capacity_bytes // classes[0]) * _stride(classes[0])
    worst = max(_stride(s) / s for s in classes)
    return _stride(int(capacity_bytes * worst) + 1)


class SlotArena:
    """One buffer allocated up front on `device` (pinned host memory with `pin`), holding blocks of the byte sizes
    in `sizes`.

    Nothing is allocated after construction: acquiring and releasing a block only updates offsets, and
    compaction moves bytes within the buffer (through a small preallocated scratch where they overlap).
    """

    def __init__(
        self, capacity_bytes: int, sizes: Iterable[int], device: torch.device | str, *, pin: bool = False
    ) -> None:
        self.sizes = tuple(sorted(set(sizes), reverse=True))
        self.capacity_bytes = capacity_bytes
        self.nbytes = buffer_bytes(capacity_bytes, self.sizes)
        self._buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=device, pin_memory=pin)
        largest = _stride(self.sizes[0])
        self._scratch = (
            torch.empty(min(SCRATCH_BYTES, largest), dtype=torch.uint8, device=device) if len(self.sizes) > 1 else None
        )
        self._blocks: dict[int, tuple[int, int]] = {}  # handle -> (offset, bytes)
        self._holes: list[tuple[int, int]] = [(0, self.nbytes)]  # free (start, end), sorted, merged
        self._next_handle = 0
        self.compactions = 0

    # ---- accounting ----------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        """How many experts of the largest size the arena holds (its slots, with one size class)."""
        return self.nbytes // _stride(self.sizes[0])

    @property
    def free_slots(self) -> int:
        """How many more experts of the largest size fit now (after a compaction, with several sizes)."""
        return self.free_bytes // _stride(self.sizes[0])

    @property
    def free_bytes(self) -> int:
        return sum(end - start for start, end in self._holes)

    def __len__(self) -> int:
        return len(self._blocks)

    # ---- blocks --------------------------------------------------------------------------------
    def clear(self) -> None:
        """Free every block at once (their handles are no longer valid)."""
        self._blocks.clear()
        self._holes = [(0, self.nbytes)]

    def acquire(self, nbytes: int) -> int | None:
        """A block of `nbytes`: its handle, or None when no hole is large enough (`compact` first)."""
        need = _stride(nbytes)
        best = None
        for i, (start, end) in enumerate(self._holes):  # best fit: keep large holes for large blocks
            room = end - start
            if room >= need and (best is None or room < best[1]):
                best = (i, room)
                if room == need:
                    break
        if best is None:
            return None
        i, room = best
        start, end = self._holes[i]
        if room == need:
            del self._holes[i]
        else:
            self._holes[i] = (start + need, end)
        handle = self._next_handle
        self._next_handle += 1
        self._blocks[handle] = (start, nbytes)
        return handle

    def view(self, handle: int) -> torch.Tensor:
        """The block's bytes where they are now (a uint8 view, exactly its size)."""
        start, nbytes = self._blocks[handle]
        return self._buffer[start : start + nbytes]

    def release(self, handle: int) -> None:
        """Return the block's bytes to the free space."""
        start, nbytes = self._blocks.pop(handle)
        hole = (start, start + _stride(nbytes))
        i = bisect.bisect(self._holes, hole)
        if i < len(self._holes) and self._holes[i][0] == hole[1]:  # merge with the next hole
            hole = (hole[0], self._holes.pop(i)[1])
        if i > 0 and self._holes[i - 1][1] == hole[0]:  # and with the previous one
            hole = (self._holes.pop(i - 1)[0], hole[1])
            i -= 1
        self._holes.insert(i, hole)

    def acquire_compacting(self, nbytes: int, settle: Callable[[], None]) -> tuple[int, list[int]]:
        """A block of `nbytes`, compacting the arena first when no hole is large enough: `settle()` is called
        before (it leaves every block quiescent, as `compact` needs). Returns the handle and the handles of the
        blocks compaction moved (their views must be taken again)."""
        handle = self.acquire(nbytes)
        if handle is not None:
            return handle, []
        settle()
        moved = self.compact()
        handle = self.acquire(nbytes)
        assert handle is not None, "a compacted arena holds every set of experts the capacity admits"
        return handle, moved

    def compact(self) -> list[int]:
        """Slide every block to the front (in address order) so the free bytes form one run; return the moved handles.

        Every block must be quiescent: no copy writing into it and no computation reading it.
        """
        moved = []
        cursor = 0
        for handle, (start, nbytes) in sorted(self._blocks.items(), key=lambda item: item[1][0]):
            if start != cursor:
                self._move(start, cursor, nbytes)
                self._blocks[handle] = (cursor, nbytes)
                moved.append(handle)
            cursor += _stride(nbytes)
        self._holes = [(cursor, self.nbytes)] if cursor < self.nbytes else []
        self.compactions += 1
        return moved

    def _move(self, src: int, dst: int, nbytes: int) -> None:
        # dst < src, so chunks copied front to back never overwrite source bytes not yet copied. A chunk
        # no longer than the gap does not overlap its destination; shorter gaps go through the scratch.
        gap = src - dst
        scratch = self._scratch
        done = 0
        while done < nbytes:
            if scratch is None or gap >= scratch.numel():
                step = min(nbytes - done, gap)
                self._buffer[dst + done : dst + done + step].copy_(self._buffer[src + done : src + done + step])
            else:
                step = min(nbytes - done, scratch.numel())
                scratch[:step].copy_(self._buffer[src + done : src + done + step])
                self._buffer[dst + done : dst + done + step].copy_(scratch[:step])
            done += step
