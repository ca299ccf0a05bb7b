"""The live payload: the tensors behind the engine's keys.

The engine tells it when a key enters (take an arena slot, have the watchdog read the expert in from
its storage tier) and leaves (free the slot); the manager asks it to compute an expert, which first waits
for that expert's copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from specmd.cache.clock import WallClock, wall_clock
from specmd.cache.keys import ExpertKey
from specmd.cache.live.arena import SlotArena
from specmd.cache.live.copiers import Copier
from specmd.cache.live.store import ExpertStore
from specmd.cache.live.watchdog import DEFAULT_TIMEOUT_S, Ticket, Watchdog
from specmd.quant.formats import ExpertFormat, ExpertShape, Weights


@dataclass(slots=True)
class _Slot:
    handle: int
    ticket: Ticket
    buffer: Any
    weights: Weights | None = None


class LivePayload:
    """Moves experts from a storage tier into a `SlotArena` and runs them (a `CacheListener` and `Payload`).

    No wait on a copy lasts longer than `timeout_s`.
    """

    def __init__(
        self,
        store: ExpertStore,
        arena: SlotArena,
        watchdog: Watchdog,
        copier: Copier,
        formats: Mapping[str, ExpertFormat],
        shape: ExpertShape,
        wall: WallClock = wall_clock,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.store = store
        self.arena = arena
        self.watchdog = watchdog
        self.copier = copier
        self.formats = dict(formats)
        self.shape = shape
        self.wall = wall
        self.timeout_s = timeout_s
        self._slots: dict[ExpertKey, _Slot] = {}

    def on_load(self, key: ExpertKey) -> None:
        handle, moved = self.arena.acquire_compacting(self.store.nbytes(key), self._settle)
        self._refresh(moved)
        destination = self.arena.view(handle)
        label = f"expert {key.expert} of layer {key.layer} at {key.precision}"
        ticket = self.watchdog.submit(partial(self.store.read_into, key, destination, self.copier), label)
        self._slots[key] = _Slot(handle, ticket, destination)

    def on_evict(self, key: ExpertKey) -> None:
        slot = self._slots[key]
        slot.ticket.retire(self.timeout_s)  # no copy may still land in the slot once another key takes it
        del self._slots[key]
        self.arena.release(slot.handle)

    def reset(self) -> None:
        """Give up every expert (the cache is being rebuilt empty): cancel or finish their copies, free the arena.

        Safe to call again after an interruption: what is done stays done.
        """
        for slot in self._slots.values():
            slot.ticket.retire(self.timeout_s)
        self._slots.clear()
        self.arena.clear()  # also what a slot interrupted between its block and its record had taken

    def _settle(self) -> None:
        """Before the arena compacts (mixed precisions only): every copy lands."""
        for slot in self._slots.values():
            slot.ticket.wait(self.timeout_s)  # evicted slots' copies were retired at eviction; these are the rest

    def _refresh(self, moved: list[int]) -> None:
        """The slots compaction moved view their new place."""
        if not moved:
            return
        handles = set(moved)
        for slot in self._slots.values():
            if slot.handle in handles:
                slot.buffer = self.arena.view(slot.handle)
                slot.weights = None  # views into the old place; unpacked again on next use

    def compute(self, key: ExpertKey, job: Any, expert: int) -> float:
        slot = self._slots[key]
        fmt = self.formats[key.precision]
        if slot.weights is None:
            slot.ticket.wait(self.timeout_s)
            slot.weights = fmt.unpack(slot.buffer, self.shape)
        start = self.wall()
        job.compute(expert, slot.weights, fmt)
        return self.wall() - start

    def check(self) -> None:
        self.watchdog.check()
