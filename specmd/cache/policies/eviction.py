"""Eviction policies: which resident expert leaves when the cache needs room."""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict

from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.policies.base import Candidates, EvictionPolicy
from specmd.cache.policies.spec import register_eviction


@register_eviction("lru")
class LRU(EvictionPolicy):
    """Least recently used: evicts the expert whose last request (or arrival) is oldest."""

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()

    def on_access(self, key: ExpertKey, now: Tick) -> None:
        self._order.move_to_end(key)

    def on_insert(self, key: ExpertKey, now: Tick) -> None:
        self._order[key] = None

    def choose_victim(self, candidates: Candidates, now: Tick) -> ExpertKey:
        for key in self._order:
            if key in candidates:
                del self._order[key]
                return key
        raise LookupError("LRU found no evictable expert")


@register_eviction("least-stale", "ls")
class LeastStale(EvictionPolicy):
    """Least-Stale (SpecMD §4.2): evicts experts not used in the current forward pass first.

    An expert is *current* once requested or loaded during the ongoing forward pass and *stale*
    otherwise; when a new pass begins every current expert turns stale. Victims come from the stale
    queue first, then from the current queue. Each queue is a priority heap (O(log N) insert,
    lazy deletion) ordered FIFO by layer position: the expert of the earliest layer in the forward
    order leaves first, and within one layer the one that entered the queue first.

    Choices where the paper is not explicit, each isolated in `_position` so variants are one override:
    the position is the expert's own layer (a prefetched expert is positioned at the layer it was
    fetched for, not the layer that issued it), and the stale queue orders by layer alone, whatever
    pass an expert was last used in, so a stale expert of a layer the current pass has already
    passed leaves before one of a layer still ahead.
    """

    def __init__(self) -> None:
        self._pass: int | None = None
        self._stale: list[tuple[int, int, ExpertKey]] = []
        self._current: list[tuple[int, int, ExpertKey]] = []
        self._live: dict[ExpertKey, int] = {}  # key -> sequence number of its one live heap entry
        self._counter = itertools.count()

    def _position(self, key: ExpertKey) -> int:
        return key.layer

    def _roll(self, now: Tick) -> None:
        if now.pass_idx == self._pass:
            return
        self._pass = now.pass_idx
        if self._current:
            live = self._live
            merged = [e for e in itertools.chain(self._stale, self._current) if live.get(e[2]) == e[1]]
            heapq.heapify(merged)
            self._stale, self._current = merged, []

    def _mark_current(self, key: ExpertKey, now: Tick) -> None:
        self._roll(now)
        seq = next(self._counter)
        self._live[key] = seq
        heapq.heappush(self._current, (self._position(key), seq, key))

    on_access = _mark_current
    on_insert = _mark_current

    def choose_victim(self, candidates: Candidates, now: Tick) -> ExpertKey:
        self._roll(now)
        live = self._live
        for heap in (self._stale, self._current):
            held: list[tuple[int, int, ExpertKey]] = []
            victim = None
            while heap:
                item = heapq.heappop(heap)
                if live.get(item[2]) != item[1]:
                    continue  # superseded by a later access
                if item[2] in candidates:
                    victim = item[2]
                    break
                held.append(item)
            for item in held:
                heapq.heappush(heap, item)
            if victim is not None:
                del live[victim]
                return victim
        raise LookupError("Least-Stale found no evictable expert")
