"""Eviction policies: which resident expert leaves when the cache needs room."""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_right, insort
from collections import OrderedDict
from collections.abc import Mapping

from mypy_extensions import mypyc_attr

from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.layout import ExpertLayout
from specmd.cache.policies.base import Candidates, EvictionPolicy, Future, Routed
from specmd.cache.policies.spec import register_eviction

_SLACK = 256  # superseded heap entries tolerated beyond the live ones before a compaction


def _compact(heap: list, live: dict[ExpertKey, int]) -> None:
    """Drop a lazy heap's superseded entries in place, once they outnumber the live keys.

    Every access pushes a fresh entry; without evictions to pop the old ones, a long run at a high hit
    rate would grow the heap by one entry per request. Only superseded entries go, so the order of
    victims is unchanged; the amortized cost is O(1) per push.
    """
    if len(heap) > 2 * len(live) + _SLACK:
        heap[:] = [item for item in heap if live.get(item[-1]) == item[-2]]
        heapq.heapify(heap)


def _pop_evictable(heap: list, live: dict[ExpertKey, int], candidates: Candidates) -> ExpertKey | None:
    """Pop a lazy heap (entries end with (sequence number, key)) down to its first live, evictable key.

    Entries whose sequence number is no longer the key's live one are stale and dropped; live entries
    that cannot be evicted now are pushed back. The victim's live mark is removed.
    """
    held = []
    victim = None
    while heap:
        item = heapq.heappop(heap)
        if live.get(item[-1]) != item[-2]:
            continue  # superseded by a later update
        if item[-1] in candidates:
            victim = item[-1]
            break
        held.append(item)
    for item in held:
        heapq.heappush(heap, item)
    if victim is not None:
        del live[victim]
    return victim


@mypyc_attr(allow_interpreted_subclasses=True)
class LRU(EvictionPolicy):
    """Least recently used: evicts the expert whose last request (or arrival) is oldest."""

    def __init__(self) -> None:
        self._order: dict[ExpertKey, None] = {}  # least recent first

    def on_access(self, key: ExpertKey, now: Tick) -> None:
        del self._order[key]
        self._order[key] = None

    def on_insert(self, key: ExpertKey, now: Tick) -> None:
        self._order[key] = None

    def choose_victim(self, candidates: Candidates, now: Tick) -> ExpertKey:
        for key in self._order:
            if key in candidates:
                del self._order[key]
                return key
        raise LookupError("LRU found no evictable expert")


@mypyc_attr(allow_interpreted_subclasses=True)
class LeastStale(EvictionPolicy):
    """Least-Stale (SpecMD §4.2): evicts experts not used in the current forward pass first.

    An expert is *current* once requested or loaded during the ongoing forward pass and *stale*
    otherwise. Victims come from the stale queue first, then from the current queue, each FIFO by
    layer position. The current queue is kept per position: experts enter it out of layer order (a
    prefetch for layer L+1 arrives before layer L's last demand fetch), and taking victims from the
    lowest position first keeps experts of layers the pass has not reached over those it has finished
    with, which is what avoids collision misses. When a pass ends, its current experts join the end of
    the stale queue in position order, so the stale queue is FIFO by (pass it went stale, position):
    the most stale expert leaves first. Every update is O(1); a victim costs a scan to the first
    evictable expert.

    Choices where the paper is not explicit, each isolated in `_position` so a variant is one
    override: an expert's position is its own layer (a prefetched expert sits at the layer it was
    fetched for, not the layer that issued it), and experts of one position leave in the order they
    (last) entered the queue.
    """

    def __init__(self) -> None:
        self._pass = -1  # the pass whose experts are current
        self._stale: dict[ExpertKey, None] = {}  # in eviction order
        self._current: dict[int, dict[ExpertKey, None]] = {}  # position -> keys in the order they became current
        self._positions: list[int] = []  # the positions in _current, ascending

    def _position(self, key: ExpertKey) -> int:
        return key.layer

    def _roll(self, now: Tick) -> None:
        """A new pass began: the current experts go stale, behind those already stale, in position order."""
        self._pass = now.pass_idx
        for position in self._positions:
            self._stale.update(self._current[position])
        self._current = {}
        self._positions = []

    def _queue_of(self, key: ExpertKey, now: Tick) -> dict[ExpertKey, None]:
        """The current queue of `key`'s position in the pass of `now`."""
        if now.pass_idx != self._pass:
            self._roll(now)
        position = self._position(key)
        queue = self._current.get(position)
        if queue is None:
            queue = self._current[position] = {}
            insort(self._positions, position)
        return queue

    def on_access(self, key: ExpertKey, now: Tick) -> None:
        queue = self._queue_of(key, now)
        if key in queue:
            del queue[key]  # used again: it goes to the back of its position
        elif self._stale and key in self._stale:
            del self._stale[key]
        queue[key] = None

    def on_insert(self, key: ExpertKey, now: Tick) -> None:
        self._queue_of(key, now)[key] = None  # an inserted key is in no queue: it was evicted, or never resident

    def choose_victim(self, candidates: Candidates, now: Tick) -> ExpertKey:
        if now.pass_idx != self._pass:
            self._roll(now)
        if self._stale:
            for key in self._stale:
                if key in candidates:
                    del self._stale[key]
                    return key
        for i, position in enumerate(self._positions):
            queue = self._current[position]
            for key in queue:
                if key in candidates:
                    del queue[key]
                    if not queue:
                        del self._current[position]
                        del self._positions[i]
                    return key
        raise LookupError("Least-Stale found no evictable expert")


@mypyc_attr(allow_interpreted_subclasses=True)
class _LowestFirst(EvictionPolicy):
    """Shared bookkeeping for policies that evict the lowest-valued resident key (ties: least recent).

    A subclass sets a key's value with `_set`; a lazy heap keeps the order at O(log N) per update.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, ExpertKey]] = []  # (value, recency, key)
        self._live: dict[ExpertKey, int] = {}  # key -> recency of its live heap entry (lazy deletion)
        self._counter = itertools.count()

    def _set(self, key: ExpertKey, value: float) -> None:
        recency = next(self._counter)
        self._live[key] = recency
        heapq.heappush(self._heap, (value, recency, key))
        _compact(self._heap, self._live)

    def on_insert(self, key: ExpertKey, now: Tick) -> None:
        self.on_access(key, now)  # an arrival is ranked as an access

    def choose_victim(self, candidates: Candidates, now: Tick) -> ExpertKey:
        victim = _pop_evictable(self._heap, self._live, candidates)
        if victim is None:
            raise LookupError(f"{type(self).__name__} found no evictable expert")
        return victim


@mypyc_attr(allow_interpreted_subclasses=True)
class Belady(_LowestFirst):
    """Belady's MIN (replay only): evicts the expert whose next request is farthest in the future.

    With no prefetch and one precision it is the optimal offline policy, the bound every online eviction
    policy is measured against. An expert never requested again is the first victim; ties go to the
    least recently used.
    """

    needs_future = True

    def __init__(self) -> None:
        super().__init__()
        self._uses: dict[tuple[int, int], list[int]] | None = None

    def bind_future(self, future: Future) -> None:
        self._uses = future.uses

    def on_access(self, key: ExpertKey, now: Tick) -> None:
        if self._uses is None:
            raise RuntimeError("belady eviction needs the future: it runs only in trace replay")
        uses = self._uses.get((key.layer, key.expert), ())
        i = bisect_right(uses, now.step)
        self._set(key, -(uses[i] if i < len(uses) else math.inf))  # lowest value = farthest next use


@mypyc_attr(allow_interpreted_subclasses=True)
class LFU(_LowestFirst):
    """Least frequently used: evicts the expert requested least often so far (ties: least recent).

    Counts are kept per expert copy across evictions, so an expert's popularity survives its
    eviction (the "perfect" LFU of the caching literature); a load counts as a use.
    """

    def __init__(self) -> None:
        super().__init__()
        self._uses: dict[ExpertKey, int] = {}

    def on_access(self, key: ExpertKey, now: Tick) -> None:
        self._uses[key] = self._uses.get(key, 0) + 1
        self._set(key, self._uses[key])


@mypyc_attr(allow_interpreted_subclasses=True)
class LHU(_LowestFirst):
    """Least high-precision used (HOBBIT-style): evicts the expert used least often at high precision.

    For precision cascades: an expert's count grows only when its highest-precision copy (the largest
    the store holds) is requested or loaded, and every copy of the expert is ranked by that count, so
    experts the cascade keeps demoting leave first. Ties: least recent.
    """

    def __init__(self) -> None:
        super().__init__()
        self._high_uses: dict[tuple[int, int], int] = {}
        self._high: frozenset[str] | None = None  # the stored precisions of the largest copies

    def bind_layout(self, layout: ExpertLayout) -> None:
        largest = max(layout.expert_bytes.values())
        self._high = frozenset(p for p, nbytes in layout.expert_bytes.items() if nbytes == largest)

    def on_access(self, key: ExpertKey, now: Tick) -> None:
        if self._high is None:
            raise RuntimeError(
                "lhu eviction needs the expert layout (bind_layout); build caches with specmd.cache.factory"
            )
        expert = (key.layer, key.expert)
        if key.precision in self._high:
            self._high_uses[expert] = self._high_uses.get(expert, 0) + 1
        self._set(key, self._high_uses.get(expert, 0))


@mypyc_attr(allow_interpreted_subclasses=True)
class FarthestLayer(EvictionPolicy):
    """Farthest layer distance: evicts an expert of the layer the forward pass will reach last.

    Distance is counted forward from the current layer around the pass, (layer - current) mod L, with
    L the number of layers seen: the layer just finished is the farthest, the next layer the nearest.
    Within a layer the least recently used leaves first.
    """

    def __init__(self) -> None:
        self._layers: dict[int, OrderedDict[ExpertKey, None]] = {}

    def on_access(self, key: ExpertKey, now: Tick) -> None:
        bucket = self._layers.setdefault(key.layer, OrderedDict())
        bucket[key] = None
        bucket.move_to_end(key)

    def on_insert(self, key: ExpertKey, now: Tick) -> None:
        self.on_access(key, now)

    def choose_victim(self, candidates: Candidates, now: Tick) -> ExpertKey:
        span = max(self._layers) + 1
        current = max(now.layer, 0)
        for layer in sorted(self._layers, key=lambda lay: (lay - current) % span, reverse=True):
            bucket = self._layers[layer]
            for key in bucket:
                if key in candidates:
                    del bucket[key]
                    return key
        raise LookupError("FLD found no evictable expert")


@mypyc_attr(allow_interpreted_subclasses=True)
class ScoreBased(_LowestFirst):
    """Score-based: evicts the expert with the lowest accumulated gate score.

    Each pass adds the routing weights the expert received (summed over tokens) to its score; scores
    accumulate without decay for the life of the cache. An expert never routed to (only prefetched)
    scores 0. Ties: least recent.
    """

    needs_routing = True

    def __init__(self) -> None:
        super().__init__()
        self._score: dict[tuple[int, int], float] = {}
        self._resident: dict[tuple[int, int], set[ExpertKey]] = {}

    def observe(self, layer: int, routing: Mapping[int, Routed], now: Tick) -> None:
        for expert, routed in routing.items():
            ident = (layer, expert)
            self._score[ident] = self._score.get(ident, 0.0) + routed.weight
            for key in self._resident.get(ident, ()):
                self._set(key, self._score[ident])

    def on_access(self, key: ExpertKey, now: Tick) -> None:
        self._set(key, self._score.get((key.layer, key.expert), 0.0))

    def on_insert(self, key: ExpertKey, now: Tick) -> None:
        self._resident.setdefault((key.layer, key.expert), set()).add(key)
        self.on_access(key, now)

    def choose_victim(self, candidates: Candidates, now: Tick) -> ExpertKey:
        victim = super().choose_victim(candidates, now)
        self._resident[(victim.layer, victim.expert)].discard(victim)
        return victim


# Registered here rather than by class decorators: a decorated class could not be compiled as a native
# class (specmd/compiled.py).
register_eviction("lru")(LRU)
register_eviction("least-stale", "ls")(LeastStale)
register_eviction("belady", "min")(Belady)
register_eviction("lfu")(LFU)
register_eviction("lhu")(LHU)
register_eviction("fld")(FarthestLayer)
register_eviction("score", "sb")(ScoreBased)
