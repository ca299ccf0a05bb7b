"""Eviction policies: which resident expert leaves when the cache needs room."""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_left, bisect_right, insort
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


LEAST_STALE_ORDERS = ("cyclic", "layer")


@mypyc_attr(allow_interpreted_subclasses=True)
class LeastStale(EvictionPolicy):
    """Least-Stale (SpecMD §4.2): evicts experts the ongoing pass cannot need before those it can.

    An expert is *current* once requested or loaded (a demand fetch or a prefetch) in the ongoing
    forward pass and *stale* otherwise; it is *left* when its layer is at or before the execution point
    (a layer whose experts the pass has looked up: its requested experts are pinned until computed, so an
    unpinned one cannot be needed again before the next pass) and *right* when the pass has yet to reach
    it. Victims come from four groups in turn: stale-left, current-left, stale-right, current-right, so an
    expert an upcoming layer may need is the last choice and one just prefetched for it the very last.
    Within a group, `order` picks:

    - "cyclic" (default): the layer whose next possible use is farthest in the cyclic layer order first
      (the layer just computed, then the one before it, ...; among right layers the deepest first);
    - "layer": ascending layer position, the paper's literal "FIFO by layer position".

    Within a layer, the expert that entered its group first leaves first. On the bundled model's trace of
    77,503 requests without prefetch (`benchmarks/RESULTS.md`, "The paper's policy space"), "cyclic" has
    4.5x fewer collision misses than LRU at 5% capacity and 16-18x fewer at 10-50%; "layer" 3.0x at 5%,
    5.3x at 10%, 1.5x at 25% and more than LRU at 50%. Every update is O(1); a victim costs a scan over
    the layers' groups to the first evictable expert.
    """

    def __init__(self, order: object = "cyclic") -> None:
        if not isinstance(order, str) or order not in LEAST_STALE_ORDERS:  # `object`: the same error compiled or not
            raise ValueError(f"least-stale order must be one of {', '.join(LEAST_STALE_ORDERS)}, got {order!r}")
        self.order = order
        self._pass = -1  # the pass whose experts are current
        self._stale: dict[int, dict[ExpertKey, None]] = {}  # layer -> keys in the order they went stale
        self._current: dict[int, dict[ExpertKey, None]] = {}  # layer -> keys in the order they became current
        self._layers: list[int] = []  # every layer with a group, ascending

    def _roll(self, now: Tick) -> None:
        """A new pass began: every current expert goes stale, behind those already stale in its layer."""
        self._pass = now.pass_idx
        for layer, keys in self._current.items():
            if keys:
                self._stale[layer].update(keys)
                keys.clear()

    def _current_of(self, layer: int) -> dict[ExpertKey, None]:
        queue = self._current.get(layer)
        if queue is None:
            queue = self._current[layer] = {}
            self._stale[layer] = {}
            insort(self._layers, layer)
        return queue

    def on_access(self, key: ExpertKey, now: Tick) -> None:
        if now.pass_idx != self._pass:
            self._roll(now)
        current = self._current_of(key.layer)
        if key in current:
            del current[key]  # used again: it goes to the back of its group
        else:
            del self._stale[key.layer][key]
        current[key] = None

    def on_insert(self, key: ExpertKey, now: Tick) -> None:
        if now.pass_idx != self._pass:
            self._roll(now)
        self._current_of(key.layer)[key] = None  # an inserted key is in no group: it was evicted, or never resident

    def _sweep(
        self, groups: dict[int, dict[ExpertKey, None]], layers: list[int], candidates: Candidates
    ) -> ExpertKey | None:
        for layer in layers:
            queue = groups[layer]
            for key in queue:
                if key in candidates:
                    del queue[key]
                    return key
        return None

    def choose_victim(self, candidates: Candidates, now: Tick) -> ExpertKey:
        if now.pass_idx != self._pass:
            self._roll(now)
        split = bisect_right(self._layers, now.layer)
        left, right = self._layers[:split], self._layers[split:]
        if self.order == "cyclic":  # farthest next use first: the latest left layer, then the deepest right one
            left.reverse()
            right.reverse()
        for groups, layers in (
            (self._stale, left),
            (self._current, left),
            (self._stale, right),
            (self._current, right),
        ):
            victim = self._sweep(groups, layers, candidates)
            if victim is not None:
                return victim
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


class _Expert:
    """What `NextUse` remembers of one (layer, expert), resident or not: its request rate and recent requests."""

    __slots__ = ("rate", "updated", "uses")

    def __init__(self) -> None:
        self.rate = 0.0  # exponentially weighted share of passes that requested it, as of pass `updated`
        self.updated = 0
        self.uses: list[int] = []  # the passes that requested it, ascending, the last `window` of them at most


NEXT_USE_MAX_WINDOW = 1024


@mypyc_attr(allow_interpreted_subclasses=True)
class NextUse(EvictionPolicy):
    """Predicted next use: evicts the expert whose next request is expected farthest away.

    Belady's rule with the future estimated from the routing seen so far.
    Distances are counted in layer-steps (one per MoE layer served). From the execution point (the MoE
    layer the pass has reached; before the first, none), an expert's layer comes next after
    ``reach`` = its position - the point's position steps if the pass has yet to reach it, else
    M + that (M MoE layers per pass): the layer just looked up is the farthest. Two estimates of the
    distance to the expert's next request are blended:

    - *frequency*: ``reach + M * (1/p - 1)``, with p the expert's request rate: an exponentially
      weighted average, at `rate` per pass, of "this pass requested it" (kept across evictions, decayed
      lazily, so it blends frequency and recency). An expert never requested (a prefetch not yet used)
      has p = 0 and goes first.
    - *loop*: greedy decoding often falls into a loop, each token's routing repeating the one T passes
      earlier. For every lag k of 1 to `window` passes, a score tracks (smoothed at `smoothing` per pass)
      the share of a finished pass's requests that the pass k earlier also made; the period T is the
      best-scoring lag (the shortest on ties) and its score c, in [0, 1], the confidence. With Q the pass
      of the layer's next occurrence (this one, or the next if the pass has reached the layer), passes
      that repeat with period T make the expert's next request T passes after its earliest request s
      among passes Q - T to Q - 1: at ``reach + M * (s - (Q - T))``. An expert none of them requested is
      placed beyond them all, at ``M * T`` + the frequency estimate.

    The victim maximizes ``c * loop + (1 - c) * frequency`` (the frequency estimate alone while no lag
    has scored); ties go to the least recently requested or loaded. ``window=0`` turns the loop estimate
    off. Requests are read from `observe` (every expert a layer's routing asks for, hit or miss), so the
    estimates do not depend on what the cache held.

    Parameters: `rate` in (0, 1) (default 0.1), `window` an integer in [0, 1024] (48 passes),
    `smoothing` in (0, 1] (0.3), chosen on tuning traces. On the bundled model's traces recorded from
    prompts not used to tune them (`benchmarks/RESULTS.md`, "Beyond the paper"), it closes 68%, 72%, 59%
    and 59% of the gap between max(LRU, LFU) and Belady at 5%, 10%, 25% and 50% capacity without
    prefetch, and 68%, 72%, 59% and 60% with top-k prefetch on the 5 GB/s link (the original prompts:
    69%, 72%, 66%, 53%, and with top-k the same but 56% at 50%); the built-in policies close at most 23%.
    The loop estimate carries most of it: the frequency estimate alone (`window=0`) closes 30-49%.

    Cost: each layer keeps its resident experts sorted by distance, re-sorted when a new pass starts or
    the layer's routing is observed (O(R log R) per pass in all, R resident experts); a victim takes the
    farthest evictable expert of each layer, O(M) when the first is evictable; a finished pass costs
    `window` set intersections.
    """

    needs_routing = True

    def __init__(self, rate: object = 0.1, window: object = 48, smoothing: object = 0.3) -> None:
        # Typed `object` and checked here, so a wrong value is the same ValueError compiled (mypyc would coerce a bool
        # to a float, and reject a string with a TypeError) and not.
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < 1:
            raise ValueError(f"next-use rate must be a number in (0, 1), got {rate!r}")
        if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= NEXT_USE_MAX_WINDOW:
            raise ValueError(f"next-use window must be an integer in [0, {NEXT_USE_MAX_WINDOW}], got {window!r}")
        if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) or not 0 < smoothing <= 1:
            raise ValueError(f"next-use smoothing must be a number in (0, 1], got {smoothing!r}")
        self.rate = float(rate)
        self.window = window
        self.smoothing = float(smoothing)
        self.period = 0
        """The detected loop period in passes (0: none yet)."""
        self.confidence = 0.0
        """The period's score: the smoothed share of a pass's requests the pass `period` earlier made."""
        self._keep = 1.0 - self.rate
        self._layers: list[int] = []  # the MoE layers, ascending (from the layout)
        self._position: dict[int, int] = {}  # MoE layer -> its position in a pass
        self._experts: dict[tuple[int, int], _Expert] = {}
        self._resident: dict[int, dict[ExpertKey, int]] = {}  # layer -> its resident keys -> their recency
        self._clock = 0  # recency: ticks at every request or load of a resident key
        # layer -> the (pass, whether the pass has yet to reach the layer) its order holds for, as 2 * pass + ahead,
        # and the order: its resident keys as (-h, recency, key), farthest first (the distance is reach + M * h).
        # A request or load adds the key's new entry (its old one, of another recency, is skipped); observing the
        # layer's routing drops the order, and so does a new pass.
        self._orders: dict[int, tuple[int, list[tuple[float, int, ExpertKey]]]] = {}
        self._pass = 0  # the pass whose requests `_requested` collects
        self._requested: set[tuple[int, int]] = set()
        self._past: dict[int, set[tuple[int, int]]] = {}  # pass -> its requests, the last `window` finished passes
        self._lags = [0.0] * (window + 1)  # lag k -> its smoothed score

    def bind_layout(self, layout: ExpertLayout) -> None:
        self._layers = sorted(layout.moe_layers)
        self._position = {layer: i for i, layer in enumerate(self._layers)}

    def _record(self, layer: int, expert: int) -> _Expert:
        ident = (layer, expert)
        record = self._experts.get(ident)
        if record is None:
            record = self._experts[ident] = _Expert()
        return record

    def _advance(self, pass_idx: int) -> None:
        """Move on to pass `pass_idx`: the pass before it has finished, so score every lag on it."""
        if pass_idx == self._pass:
            return
        finished, done = self._requested, self._pass
        self._pass = pass_idx
        self._requested = set()
        if not finished or not self.window:
            return
        size = len(finished)
        keep, weight = 1.0 - self.smoothing, self.smoothing
        lags, past = self._lags, self._past
        period, confidence = 0, 0.0
        for lag in range(1, self.window + 1):
            earlier = past.get(done - lag)
            share = len(finished & earlier) / size if earlier is not None else 0.0
            score = lags[lag] = keep * lags[lag] + weight * share
            if score > confidence:
                period, confidence = lag, score
        self.period, self.confidence = period, confidence
        past[done] = finished
        for old in [p for p in past if p <= done - self.window]:
            del past[old]

    def observe(self, layer: int, routing: Mapping[int, Routed], now: Tick) -> None:
        pass_idx = now.pass_idx
        self._advance(pass_idx)
        for expert in routing:
            record = self._record(layer, expert)
            if record.updated == pass_idx:
                continue  # already counted in this pass
            record.rate = record.rate * self._keep ** (pass_idx - record.updated) + self.rate
            record.updated = pass_idx
            uses = record.uses
            uses.append(pass_idx)
            if uses[0] <= pass_idx - self.window:
                del uses[: bisect_right(uses, pass_idx - self.window)]
            self._requested.add((layer, expert))
        self._orders.pop(layer, None)

    def _touch(self, key: ExpertKey, record: _Expert, pass_idx: int) -> None:
        self._clock += 1
        layer = key.layer
        keys = self._resident.get(layer)
        if keys is None:
            keys = self._resident[layer] = {}
        keys[key] = self._clock
        sorted_order = self._orders.get(layer)
        if sorted_order is not None:
            stamp, order = sorted_order
            if stamp >> 1 == pass_idx:
                insort(order, (-self._h(record, bool(stamp & 1), pass_idx), self._clock, key))
            else:
                del self._orders[layer]

    def on_access(self, key: ExpertKey, now: Tick) -> None:
        self._touch(key, self._experts[(key.layer, key.expert)], now.pass_idx)

    def on_insert(self, key: ExpertKey, now: Tick) -> None:
        self._touch(key, self._record(key.layer, key.expert), now.pass_idx)

    def choose_victim(self, candidates: Candidates, now: Tick) -> ExpertKey:
        if not self._position:
            raise RuntimeError(
                "next-use eviction needs the expert layout (bind_layout); build caches with specmd.cache.factory"
            )
        pass_idx = now.pass_idx
        self._advance(pass_idx)
        span = len(self._layers)
        point = bisect_right(self._layers, now.layer) - 1  # the position the pass has reached (-1: none)
        victim: ExpertKey | None = None
        farthest, oldest = -1.0, 0
        for layer, keys in self._resident.items():
            if not keys:
                continue
            position = self._position[layer]
            ahead = position > point  # this pass has yet to reach the layer
            stamp = 2 * pass_idx + ahead
            sorted_order = self._orders.get(layer)
            if sorted_order is not None and sorted_order[0] == stamp:
                order = sorted_order[1]
            else:
                order = sorted(
                    (-self._h(self._experts[(k.layer, k.expert)], ahead, pass_idx), recency, k)
                    for k, recency in keys.items()
                )
                self._orders[layer] = (stamp, order)
            reach = position - point if ahead else span + position - point  # layer-steps to its next occurrence
            i = 0
            while i < len(order):
                negative_h, recency, key = order[i]
                if keys.get(key) != recency:  # evicted, or superseded by a later request
                    del order[i]
                elif key in candidates:
                    distance = reach - span * negative_h
                    if distance > farthest or (distance == farthest and recency < oldest):
                        victim, farthest, oldest = key, distance, recency
                    break
                else:
                    i += 1
        if victim is None:
            raise LookupError("next-use found no evictable expert")
        del self._resident[victim.layer][victim]
        return victim

    def _h(self, record: _Expert, ahead: bool, pass_idx: int) -> float:
        """The expert's expected distance to its next request beyond its layer's next occurrence, in passes.

        `ahead`: the pass `pass_idx` has yet to reach the expert's layer. The distance in layer-steps is
        ``reach + M * h`` (`choose_victim`).
        """
        p = record.rate * self._keep ** (pass_idx - record.updated)
        if p <= 0.0:
            return math.inf  # never requested (or so long ago that its rate underflowed)
        frequency = 1.0 / p - 1.0
        period = self.period
        if not period:
            return frequency
        first = pass_idx - period if ahead else pass_idx + 1 - period  # the first of the passes a loop repeats
        uses = record.uses
        i = bisect_left(uses, first)
        loop = float(uses[i] - first) if i < len(uses) else period + frequency
        return self.confidence * loop + (1.0 - self.confidence) * frequency


# Registered here rather than by class decorators: a decorated class could not be compiled as a native
# class (specmd/compiled.py).
register_eviction("lru")(LRU)
register_eviction("least-stale", "ls")(LeastStale)
register_eviction("belady", "min")(Belady)
register_eviction("lfu")(LFU)
register_eviction("lhu")(LHU)
register_eviction("fld")(FarthestLayer)
register_eviction("score", "sb")(ScoreBased)
register_eviction("next-use", "nu")(NextUse)
