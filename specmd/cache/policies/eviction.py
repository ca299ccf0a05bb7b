"""Eviction policies: which resident expert leaves when the cache needs room."""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_right
from collections import OrderedDict

from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.policies.base import Candidates, EvictionPolicy, Future
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
    otherwise. Victims come from the stale queue first, then from the current queue, each FIFO by
    layer position. The current queue is a priority heap keyed by layer position (O(log N) insert):
    experts enter it out of layer order (a prefetch for layer L+1 arrives before layer L's last
    demand fetch), and ordering by position keeps experts of layers the pass has not reached over
    those it has finished with, which is what avoids collision misses. When a pass ends, its current
    experts join the stale queue in layer order, so the stale queue is FIFO by (pass it went stale,
    layer): the most stale expert leaves first.

    Choices where the paper is not explicit, each isolated in `_position` so a variant is one
    override: an expert's position is its own layer (a prefetched expert sits at the layer it was
    fetched for, not the layer that issued it), and experts of one layer leave in the order they
    entered the queue.
    """

    def __init__(self) -> None:
        self._pass: int | None = None
        self._stale: list[tuple[int, int, int, ExpertKey]] = []  # (pass it went stale, position, seq, key)
        self._current: list[tuple[int, int, ExpertKey]] = []  # (position, seq, key)
        self._live: dict[ExpertKey, int] = {}  # key -> sequence number of its one live heap entry
        self._counter = itertools.count()

    def _position(self, key: ExpertKey) -> int:
        return key.layer

    def _roll(self, now: Tick) -> None:
        if now.pass_idx == self._pass:
            return
        ended, self._pass = self._pass, now.pass_idx
        live = self._live
        for position, seq, key in sorted(self._current):
            if live.get(key) == seq:
                heapq.heappush(self._stale, (ended or 0, position, seq, key))
        self._current = []

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
            held: list = []
            victim = None
            while heap:
                item = heapq.heappop(heap)
                key, seq = item[-1], item[-2]
                if live.get(key) != seq:
                    continue  # superseded by a later access
                if key in candidates:
                    victim = key
                    break
                held.append(item)
            for item in held:
                heapq.heappush(heap, item)
            if victim is not None:
                del live[victim]
                return victim
        raise LookupError("Least-Stale found no evictable expert")


@register_eviction("belady", "min")
class Belady(EvictionPolicy):
    """Belady's MIN (replay only): evicts the expert whose next request is farthest in the future.

    With no prefetch and one precision it is the optimal offline policy, the bound every online eviction
    policy is measured against. An expert never requested again is the first victim; ties go to the
    lowest (layer, expert).
    """

    needs_future = True

    def __init__(self) -> None:
        self._uses: dict[tuple[int, int], list[int]] | None = None
        self._next: dict[ExpertKey, float] = {}  # key -> its next use as last computed (the live heap entry)
        self._heap: list[tuple[float, int, int, ExpertKey]] = []  # (-next use, layer, expert, key)

    def bind_future(self, future: Future) -> None:
        self._uses = future.uses

    def _note(self, key: ExpertKey, now: Tick) -> None:
        if self._uses is None:
            raise RuntimeError("belady eviction needs the future: it runs only in trace replay")
        uses = self._uses.get((key.layer, key.expert), ())
        i = bisect_right(uses, now.step)
        following = uses[i] if i < len(uses) else math.inf
        self._next[key] = following
        heapq.heappush(self._heap, (-following, key.layer, key.expert, key))

    on_access = _note
    on_insert = _note

    def choose_victim(self, candidates: Candidates, now: Tick) -> ExpertKey:
        held = []
        victim = None
        while self._heap:
            item = heapq.heappop(self._heap)
            key = item[-1]
            if self._next.get(key) != -item[0]:
                continue  # superseded by a later request
            if key in candidates:
                victim = key
                break
            held.append(item)
        for item in held:
            heapq.heappush(self._heap, item)
        if victim is None:
            raise LookupError("Belady found no evictable expert")
        del self._next[victim]
        return victim
