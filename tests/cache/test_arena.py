"""The fast-tier arena: any set of experts the byte capacity admits is placeable, at any mix of sizes,
after any history of inserts and evictions; contents survive compaction; nothing is allocated after build."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specmd.cache.live.arena import ALIGN, SlotArena, buffer_bytes


class Resident:
    """What a driver like the engine holds: blocks, their sizes and a byte pattern written into each."""

    def __init__(self, arena: SlotArena) -> None:
        self.arena = arena
        self.blocks: dict[int, tuple[int, int]] = {}  # handle -> (bytes, pattern seed)
        self.compactions = 0

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self.blocks.values())

    def insert(self, size: int, seed: int) -> None:
        handle = self.arena.acquire(size)
        if handle is None:  # fragmented: what the live payload does
            self.arena.compact()
            self.compactions += 1
            handle = self.arena.acquire(size)
        assert handle is not None, f"{size} B did not fit with {self.bytes} B of {self.arena.capacity_bytes} resident"
        self.arena.view(handle).copy_(pattern(size, seed))
        self.blocks[handle] = (size, seed)

    def evict(self, handle: int) -> None:
        self.arena.release(handle)
        del self.blocks[handle]

    def check(self) -> None:
        assert self.bytes <= self.arena.capacity_bytes
        spans = []
        for handle, (size, seed) in self.blocks.items():
            view = self.arena.view(handle)
            assert view.numel() == size and torch.equal(view, pattern(size, seed))  # contents survive moves
            start = view.data_ptr() - self.arena._buffer.data_ptr()
            assert start % ALIGN == 0 and start >= 0 and start + size <= self.arena.nbytes
            spans.append((start, start + size))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no two blocks overlap
        assert self.arena.free_bytes + sum(-(-s // ALIGN) * ALIGN for s, _ in self.blocks.values()) == self.arena.nbytes


def pattern(size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=4, unique=True),
    slack=st.integers(0, 12_000),
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6)), max_size=120),
)
def test_every_admissible_sequence_is_placeable(sizes: list[int], slack: int, ops: list[tuple[int, int]]) -> None:
    capacity = max(sizes) + slack
    arena = SlotArena(capacity, sizes, torch.device("cpu"))
    resident = Resident(arena)
    for n, (which, seed) in enumerate(ops):
        size = sizes[which % len(sizes)]
        victims = random.Random(seed)
        while resident.bytes + size > capacity:  # the engine evicts (here: at random) until the bytes fit
            resident.evict(victims.choice(sorted(resident.blocks)))
        resident.insert(size, seed + n)
        if seed % 3 == 0 and resident.blocks:  # and sometimes evicts with no insert pending
            resident.evict(victims.choice(sorted(resident.blocks)))
        resident.check()
    if len(sizes) == 1:
        assert resident.compactions == 0  # one size class never fragments


def test_compaction_happens_and_keeps_contents() -> None:
    """Small blocks pinned between holes: the large one fits only after compaction."""
    big, small = 1000, 300
    arena = SlotArena(2 * big, [big, small], torch.device("cpu"))
    resident = Resident(arena)
    for seed in range(6):
        resident.insert(small, seed)  # 6 x 320 B of 2000 B
    for handle in sorted(resident.blocks)[::2]:
        resident.evict(handle)  # 3 holes of 320 B, none large enough for 1000 B
    resident.insert(big, 99)
    resident.check()
    assert resident.compactions == 1 == arena.compactions


def test_one_size_class_is_the_old_slot_array() -> None:
    arena = SlotArena(5 * 1000 + 999, [1000], torch.device("cpu"))
    assert arena.num_slots == 5 and arena.nbytes == 5 * 1024 and arena._scratch is None
    handles = [arena.acquire(1000) for _ in range(5)]
    assert None not in handles and arena.free_slots == 0 and arena.acquire(1000) is None
    arena.release(handles[2])
    assert arena.free_slots == 1 and arena.acquire(1000) is not None


def test_buffer_bound() -> None:
    # Blocks are rounded up to 64 B: 100 B blocks take 128 B each, so 10 of them (1000 B) need 1280 B.
    assert buffer_bytes(1000, [100, 500]) >= 10 * 128
    assert buffer_bytes(1000, [100]) == 10 * 128
    with pytest.raises(ValueError, match="capacity of at least one block"):
        buffer_bytes(99, [100])


def test_a_large_move_through_the_scratch() -> None:
    """Overlapping moves of blocks larger than the scratch copy correctly."""
    from specmd.cache.live import arena as arena_module

    size = 3 * arena_module.SCRATCH_BYTES // 2 + 7
    arena = SlotArena(2 * size + 64, [size, 64], torch.device("cpu"))
    resident = Resident(arena)
    resident.insert(64, 1)
    resident.insert(size, 2)
    resident.evict(min(resident.blocks))  # a 64 B hole before the large block: it moves back by 64 B
    arena.compact()
    resident.check()
