"""The per-layer algorithm (SpecMD's Algorithm 1), driven the same way live and in trace replay.

For each MoE layer of each forward pass: look every requested expert up (hit, late prefetch or miss,
the miss policy resolving each miss), pin what the layer uses, queue the prefetch policy's picks for
the predicted targets (a later MoE layer of this pass, or a layer of a later pass), fetch the misses
(demand transfers go ahead of queued prefetches), compute the experts in the order their data arrives,
unpinning each when done, and count. When the layer needs more experts than fit, experts stream
through the cache: computing one unpins it, so the next can evict it.

Everything happens on the emulated clock, a small discrete-event simulation: events are the layer's
start and each expert's completion. A queued prefetch starts as soon as the link is free, also while a
layer's attention (dense compute) runs, provided room can be made by evicting experts of layers the pass
has already computed or stale experts of layers after the prefetch's target: never an unused prefetch,
nor an expert the pass needs before the target. One still queued when its layer's experts are looked
up is dropped: if the layer requests it, the request misses and fetches it on demand, ahead of every
queued prefetch, the earliest it could arrive anyway. Compute
time comes from the compute model (or is measured here when it is None). Counters therefore do not
depend on thread timing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

from specmd.cache.clock import ComputeModel, PassInfo, WallClock, wall_clock
from specmd.cache.engine import ANY_LAYER, CacheListener, Entry, ExpertCache
from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.layout import ExpertLayout
from specmd.cache.link import EmulatedLink
from specmd.cache.policies.base import Drop, Fetch, MissAction, MissContext, Routed, RoutePrediction, Substitute
from specmd.cache.policies.spec import Policies
from specmd.cache.stats import CacheStats, StatsRecorder
from specmd.cache.tiers import DiskPath

_NO_ROUTING: Mapping[int, Routed] = MappingProxyType({})  # a miss context's routing when no policy reads it

Target = tuple[int, int]
"""Where a prediction or a prefetch is aimed: (passes ahead, MoE layer); (0, L) is layer L of this pass."""

NEXT_LAYER = "next-layer"
"""The default route predictor, and what every trace records (`next_logits`): the next MoE layer's router
applied to this layer's input."""

Predictions = Mapping[Target, Sequence[Sequence[float]]]
"""Predicted router logits per target: one row per predicting token, one value per expert of the target layer."""

PredictedRows = tuple[Sequence[int], Sequence[Sequence[float]]]
"""One target's predictions with the (real) tokens that made them: (token indices, rows)."""

_Waiting = tuple[ExpertKey, int, int]  # a miss waiting for room: (key, routed expert, tokens)
_Pinned = tuple[
    float, int, ExpertKey, Entry, int
]  # an expert to compute: (ready at, routed expert, key, entry, tokens)


class Payload(CacheListener, Protocol):
    """The live side: moves experts' tensors as keys enter and leave, and runs an expert's computation."""

    def compute(self, key: ExpertKey, job: Any, expert: int) -> float:
        """Run the copy `key` on the tokens routed to `expert` (waiting for its data); return wall seconds."""
        ...

    def check(self) -> None:
        """Raise any error a background transfer hit."""
        ...


class _Tally:
    """One layer's counts, kept while it is served and added to the stats at its end (none if it raises)."""

    __slots__ = ("collisions", "collisions_prefetched", "disk_bytes_read", "disk_stall", "drops", "fetched",
                 "fetched_bytes", "fetched_other", "hits", "host_hits", "host_misses", "late", "misses", "stall",
                 "substitutions", "used")  # fmt: skip

    def __init__(self) -> None:
        self.hits = self.late = self.misses = self.collisions = self.collisions_prefetched = self.used = 0
        self.drops = self.substitutions = 0
        self.fetched = 0  # demand fetches at the manager's precision
        self.fetched_other: dict[str, int] = {}  # demand fetches at other precisions
        self.fetched_bytes = 0
        self.stall = 0.0
        self.host_hits = self.host_misses = self.disk_bytes_read = 0  # with experts on disk (`DiskPath`)
        self.disk_stall = 0.0


class CacheManager:
    """Runs forward passes layer by layer against an `ExpertCache` under the emulated clock.

    Call `begin_pass`, then `run_layer` for each MoE layer in order, then `end_pass`. `requests` maps
    each expert the layer's real tokens were routed to onto how many tokens chose it. With experts on disk, `path`
    brings each transferred expert from disk through the host-RAM tier (`specmd.cache.tiers`).
    `specmd.cache.factory` builds one from a layout and a config.
    """

    def __init__(
        self,
        cache: ExpertCache,
        policies: Policies,
        link: EmulatedLink,
        compute: ComputeModel | None,
        layout: ExpertLayout,
        *,
        path: DiskPath | None = None,
        wall: WallClock = wall_clock,
    ) -> None:
        precision = layout.precision
        if precision not in cache.sizes:
            raise ValueError(f"precision {precision!r} is not stored; stored: {sorted(cache.sizes)}")
        self.cache = cache
        self.policies = policies
        self.link = link
        self.path = path
        self.compute = compute
        self.layout = layout
        self.precision = precision
        self.moe_layers = layout.moe_layers
        self.num_layers = layout.num_layers
        self.num_experts = layout.experts_per_layer
        self.top_k = layout.top_k
        self.payload: Payload | None = None
        self.host_payload: CacheListener | None = None
        self.wall = wall
        self.stats = StatsRecorder(self.moe_layers)
        self.pass_idx = 0
        self.step = 0
        self.time = 0.0
        self._in_pass = False
        self._pass: PassInfo | None = None
        self._dense: list[float] = []  # this pass's dense compute seconds per decoder layer (compute model)
        self._cursor = -1  # last decoder layer whose dense compute is on the clock
        self._pass_start = 0.0
        self._wall_start = 0.0
        self._wall_mark = 0.0
        self._evicted_in_pass: dict[ExpertKey, bool] = {}  # evicted this pass -> it was an unused prefetch for it
        self._unused_prefetches: dict[ExpertKey, int] = {}  # resident prefetches not yet used -> the pass they are for
        self._last_layer = -1  # the last MoE layer of this pass served: experts of layers up to it are "left"
        self._queue: deque[tuple[ExpertKey, int]] = deque()  # (key, pass it is for), not yet on the link
        self._queued: set[ExpertKey] = set()
        self._keys = {
            layer: [ExpertKey(layer, e, precision) for e in range(self.num_experts)] for layer in self.moe_layers
        }
        depth = policies.prefetch.depth
        if not (isinstance(depth, int) and depth >= 1):
            raise ValueError(f"prefetch depth must be an integer >= 1, got {depth!r}")
        self._ahead = {
            layer: tuple((0, later) for later in self.moe_layers[i + 1 : i + 1 + depth])
            for i, layer in enumerate(self.moe_layers)
        }
        self._moe_position = {layer: i for i, layer in enumerate(self.moe_layers)}
        self._lookahead: dict[ExpertKey, int] = {}  # lookahead prefetches queued or issued -> the pass they are for
        self._expert_cost: dict[int, dict[int, float]] = {}  # bytes -> tokens -> seconds, from the compute model

    @property
    def wants_routing(self) -> bool:
        """Whether `run_layer` should be given `routing` (weights and ranks of the requested experts)."""
        return self.policies.eviction.needs_routing or self.policies.miss.needs_routing

    @property
    def wants_probs(self) -> bool:
        """Whether `run_layer` should be given `probs` (every expert's mean router probability)."""
        return self.policies.miss.needs_probs

    def attach(self, payload: Payload, host: CacheListener | None = None) -> None:
        """Drive real tensors: `payload` follows the cache's residency and computes the experts (a live model);
        `host` follows the host-RAM tier's (with experts on disk and a host tier)."""
        if self.cache.resident():
            raise RuntimeError("attach the payload before anything enters the cache")
        tier = None if self.path is None else self.path.host
        if (host is None) != (tier is None):
            raise RuntimeError("a host-RAM tier's payload goes with a host-RAM tier, and only with one")
        self.payload = payload
        self.cache.listener = payload
        self.host_payload = host
        if tier is not None:
            tier.listener = host

    # ---- passes --------------------------------------------------------------------------------
    def begin_pass(self, info: PassInfo) -> None:
        """Start a forward pass (a prefill or one decode step); prefetches queued for earlier passes are dropped."""
        if self._in_pass:
            raise RuntimeError("begin_pass called while a pass is running; end or abort it first")
        if self.compute is None and self.payload is None:
            raise RuntimeError(
                "measured compute time needs a live model's payload (attach); replay needs a compute model"
            )
        self.pass_idx += 1
        self._pass = info
        if self.compute is not None:
            self._dense = [self.compute.dense_s(i, info) for i in range(self.num_layers)]
        self._cursor = -1
        self._last_layer = -1
        self._evicted_in_pass.clear()
        if self._queue:
            self._keep_queued(lambda key, target_pass: target_pass >= self.pass_idx)
        if self._lookahead:
            self._lookahead = {key: p for key, p in self._lookahead.items() if p >= self.pass_idx}
        self._pass_start = self.time
        self._wall_start = self._wall_mark = self.wall()
        self._in_pass = True

    def end_pass(self) -> None:
        """Finish the pass: the remaining layers' dense compute and the head go on the clock."""
        info = self._require_pass()
        t = self._advance_dense(self.num_layers - 1)
        if self.compute is not None:
            t += self.compute.head_s(info)
        self.time = t
        self.stats.record_pass(info.prefill, info.sequences, t - self._pass_start, self.wall() - self._wall_start)
        self._in_pass = False

    def _require_pass(self) -> PassInfo:
        if not self._in_pass or self._pass is None:
            raise RuntimeError("no forward pass is running; call begin_pass first")
        return self._pass

    def _advance_dense(self, layer: int) -> float:
        """The clock after the dense compute of decoder layers up to `layer`."""
        self._require_pass()
        if self.compute is None:
            t = self.time + (self.wall() - self._wall_mark)
        else:
            dense = 0.0
            for i in range(self._cursor + 1, layer + 1):
                dense += self._dense[i]
            t = self.time + dense
        if layer > self._cursor:
            self._cursor = layer
        return t

    # ---- one MoE layer -------------------------------------------------------------------------
    def run_layer(
        self,
        layer: int,
        requests: Mapping[int, int],
        predicted: Predictions | None = None,
        job: Any = None,
        routing: Mapping[int, Routed] | None = None,
        probs: Mapping[int, float] | None = None,
    ) -> None:
        """Serve layer `layer`'s requests (expert -> tokens).

        `predicted` gives predicted router logits for later targets (for logit-based prefetch; see
        `prediction_targets`); `routing` says how tokens chose each requested expert and `probs` gives
        every expert's mean router probability (for the policies that read them; see `wants_routing`,
        `wants_probs`).
        """
        if self.payload is not None:
            self.payload.check()
        t = self._advance_dense(layer)
        if self._queue:  # the link works on while the layer's attention computes
            self._pump(self.time, t, self._last_layer)
        self.step += 1
        tick = Tick(self.step, self.pass_idx, layer, t)
        self._drop_queued(layer)
        policies = self.policies
        if routing is None and (policies.eviction.needs_routing or policies.miss.needs_routing):
            routing = {e: Routed(n, 0.0, 0) for e, n in requests.items()}  # tokens known, weights not given
        if policies.eviction.needs_routing:
            policies.eviction.observe(layer, routing, tick)  # type: ignore[arg-type]
        tally = _Tally()
        ready, pending = self._lookup(layer, requests, tick, routing, probs, tally)
        self._enqueue_prefetches(layer, predicted, tick)
        self.time = self._serve(tick, ready, pending, job, tally)
        self._last_layer = layer
        self._count(layer, len(requests), tally)
        if self.compute is None:  # measured compute: the next dense span is timed from here
            self._wall_mark = self.wall()

    def _lookup(
        self,
        layer: int,
        requests: Mapping[int, int],
        tick: Tick,
        routing: Mapping[int, Routed] | None,
        probs: Mapping[int, float] | None,
        tally: _Tally,
    ) -> tuple[list[_Pinned], list[_Waiting]]:
        """Look every request up; pin what the layer computes. Returns the experts found (sorted by
        arrival) and the misses waiting for a transfer, in expert order."""
        # The hot path of live runs and replays alike: counts are kept in locals.
        cache, keys, pass_idx, t = self.cache, self._keys[layer], self.pass_idx, tick.time_s
        miss = self.policies.miss
        evicted_in_pass, unused = self._evicted_in_pass, self._unused_prefetches
        hits = late = misses = collisions = collisions_prefetched = used = 0
        context: MissContext | None = None
        ready: list[_Pinned] = []
        pending: list[_Waiting] = []
        for expert in sorted(requests):
            tokens = requests[expert]
            key = keys[expert]
            entry = cache.get(key)
            if entry is None:
                if context is None:
                    context = self._miss_context(layer, t, routing, probs)
                action = miss.on_miss(key, tick, context)
                if type(action) is Fetch and action.precision == key.precision:  # lossless: fetch what was asked
                    pending.append((key, expert, tokens))
                    missed = True
                else:
                    key, entry, missed = self._resolve_miss(key, tokens, action, tick, pending, tally)
                if missed:
                    misses += 1
                    was_prefetch = evicted_in_pass.get(keys[expert])
                    if was_prefetch is None and key is not keys[expert]:
                        was_prefetch = evicted_in_pass.get(key)
                    if was_prefetch is not None:
                        collisions += 1
                        if was_prefetch:
                            collisions_prefetched += 1
                if entry is None:
                    continue  # dropped, or waiting for room
                if not missed:
                    if entry.ready_at <= t:
                        hits += 1
                    else:
                        late += 1
            elif entry.ready_at <= t:
                hits += 1
            else:
                late += 1
            if entry.prefetch_pass == pass_idx:
                used += 1
                entry.prefetch_pass = 0
                del unused[key]
                if self._lookahead:
                    self._count_lookahead(key, entry.ready_at > t)
            cache.hold(entry)
            cache.touch(key, tick)
            ready.append((entry.ready_at, expert, key, entry, tokens))
        ready.sort()
        tally.hits, tally.late, tally.misses, tally.used = hits, late, misses, used
        tally.collisions, tally.collisions_prefetched = collisions, collisions_prefetched
        return ready, pending

    def _resolve_miss(
        self,
        key: ExpertKey,
        tokens: int,
        action: MissAction,
        tick: Tick,
        pending: list[_Waiting],
        tally: _Tally,
    ) -> tuple[ExpertKey, Entry | None, bool]:
        """What the miss policy's `action` for `key` means: the copy to use, its entry when resident, and whether
        the request missed. A fetch that must be transferred joins `pending`; a dropped request has no copy.
        (`_lookup` handles the commonest action, a fetch at the requested precision, itself.)"""
        miss = self.policies.miss
        if type(action) is Fetch:
            if action.precision != key.precision:
                key = ExpertKey(key.layer, key.expert, action.precision)
                entry = self.cache.get(key)
                if entry is not None:
                    return key, entry, False  # a copy at that precision is resident
            pending.append((key, key.expert, tokens))
            return key, None, True
        if type(action) is Drop:
            tally.drops += 1
            return key, None, True
        if type(action) is Substitute:
            key = ExpertKey(key.layer, action.expert, action.precision)
            entry = self.cache.get(key)
            if entry is None or entry.ready_at > tick.time_s:
                raise RuntimeError(f"{type(miss).__name__} substituted {key}, which is not ready")
            tally.substitutions += 1
            return key, entry, True
        raise TypeError(f"{type(miss).__name__} returned {action!r}, not a miss action")

    def _serve(self, tick: Tick, ready: list[_Pinned], pending: list[_Waiting], job: Any, tally: _Tally) -> float:
        """The layer's event loop on the emulated clock: fetch the waiting misses as room allows, start queued
        prefetches when the link is free, compute each pinned expert once its data has landed and unpin it.
        Returns the clock when the layer's last expert is done."""
        cache, precision, queue, link, payload, compute, path = (
            self.cache, self.precision, self._queue, self.link, self.payload, self.compute, self.path
        )  # fmt: skip
        step, pass_idx, layer, t = tick.step, tick.pass_idx, tick.layer, tick.time_s
        cost = self._expert_cost
        own_bytes = cache.sizes[precision]
        cost_bytes, by_tokens = -1, {}  # the cost table of the last expert size met (usually the only one)
        stall = disk_stall = 0.0
        waiting = 0  # pending[waiting:] still need room
        # Demand fetches land in the order they were issued (the link is FIFO, and misses wait in expert order),
        # so `landing` stays sorted like `ready`: merging the two computes experts in (ready at, expert) order.
        landing: list[_Pinned] = []
        next_ready = next_landing = 0
        while waiting < len(pending) or next_ready < len(ready) or next_landing < len(landing):
            while waiting < len(pending):
                key, expert, tokens = pending[waiting]
                nbytes = own_bytes if key.precision is precision else cache.sizes[key.precision]
                if tick.time_s != t:
                    tick = Tick(step, pass_idx, layer, t)
                evicted = cache.make_room(nbytes, tick)
                if evicted is None:
                    break  # pinned and arriving experts fill the cache: compute some first
                if evicted:
                    self._note_evictions(evicted)
                if path is None:
                    finish = link.schedule(nbytes, t)
                    entry = cache.insert(key, tick, finish, pinned=True)
                else:
                    finish, disk_until = path.transfer(key, nbytes, tick, tally, self.stats.layers)
                    entry = cache.insert(key, tick, finish, pinned=True)
                    entry.disk_until = disk_until
                if key.precision == precision:
                    tally.fetched += 1
                else:
                    tally.fetched_other[key.precision] = tally.fetched_other.get(key.precision, 0) + 1
                tally.fetched_bytes += nbytes
                landing.append((finish, expert, key, entry, tokens))
                waiting += 1
            if next_ready == len(ready) and next_landing == len(landing):
                arrival = cache.next_arrival(t)
                if arrival is None:
                    blocked = pending[waiting][0]
                    raise RuntimeError(
                        f"cannot make room for {blocked} ({cache.nbytes(blocked)} B) in a cache of "
                        f"{cache.capacity_bytes} B"
                    )
                stall += arrival - t  # wait for a prefetch to land so it can be evicted
                t = arrival
                continue
            if queue and waiting == len(pending):
                self._pump(t, t, layer)
            if next_landing < len(landing) and (next_ready == len(ready) or landing[next_landing] < ready[next_ready]):
                ready_at, expert, key, entry, tokens = landing[next_landing]
                next_landing += 1
            else:
                ready_at, expert, key, entry, tokens = ready[next_ready]
                next_ready += 1
            if ready_at > t:
                stall += ready_at - t
                if entry.disk_until > t:  # part of the wait is on the disk
                    disk_stall += (entry.disk_until if entry.disk_until < ready_at else ready_at) - t
                t = ready_at
            measured = payload.compute(key, job, expert) if payload is not None else 0.0
            if compute is None:
                t += measured
            else:
                nbytes = entry.nbytes
                if nbytes != cost_bytes:
                    cost_bytes = nbytes
                    by_tokens = cost.setdefault(nbytes, {})
                seconds = by_tokens.get(tokens)
                if seconds is None:
                    seconds = by_tokens[tokens] = compute.expert_s(nbytes, tokens)
                t += seconds
            cache.release(entry)
        if queue:
            self._pump(t, t, layer)
        tally.stall = stall
        tally.disk_stall = disk_stall
        return t

    def _count(self, layer: int, requests: int, tally: _Tally) -> None:
        """Add a served layer's tally to the stats."""
        counters = self.stats.layers[layer]
        counters.requests += requests
        counters.hits += tally.hits
        counters.late_prefetches += tally.late
        counters.misses += tally.misses
        counters.collision_misses += tally.collisions
        counters.collision_misses_prefetched += tally.collisions_prefetched
        counters.prefetches_used += tally.used
        counters.drops += tally.drops
        counters.substitutions += tally.substitutions
        counters.bytes_transferred += tally.fetched_bytes
        counters.stall_s += tally.stall
        if self.path is not None:
            counters.host_hits += tally.host_hits
            counters.host_misses += tally.host_misses
            counters.disk_bytes_read += tally.disk_bytes_read
            counters.disk_stall_s += tally.disk_stall
        by_precision = self.stats.fetches_by_precision
        if tally.fetched:
            by_precision[self.precision] += tally.fetched
        for other, count in tally.fetched_other.items():
            by_precision[other] += count

    def _miss_context(
        self, layer: int, t: float, routing: Mapping[int, Routed] | None, probs: Mapping[int, float] | None
    ) -> MissContext:
        link = self.link
        wait_s = link.busy_until - t
        return MissContext(
            layer=layer,
            routing=_NO_ROUTING if routing is None else routing,
            probs=probs,
            find_resident=lambda: self.cache.ready_in_layer(layer, t),
            stored=self.cache.sizes,
            wait_s=wait_s if wait_s > 0.0 else 0.0,
            bandwidth_bytes_s=link.bytes_per_s,
            latency_s=link.latency_s,
        )

    # ---- prefetch queue ------------------------------------------------------------------------
    @property
    def wants_predictions(self) -> bool:
        """Whether the prefetch policy reads predicted router logits (`run_layer`'s `predicted`)."""
        return self.policies.prefetch.needs_logits

    def prediction_targets(self, layer: int) -> tuple[Target, ...]:
        """The targets the prefetch policy wants predicted from `layer`: the next MoE layers of this pass, as many
        as its depth (none when it reads no logits). A predictor may give other targets too (later passes)."""
        if not self.policies.prefetch.needs_logits:
            return ()
        return self._ahead[layer]

    def _targets(self, layer: int, predicted: Predictions) -> list[Target]:
        """`predicted`'s targets, checked and ordered: nearest pass first, then layer order."""
        position = self._moe_position
        keys: Iterable[object] = predicted  # checked here, whatever a caller passed
        for target in keys:
            valid = isinstance(target, tuple) and len(target) == 2 and all(type(v) is int for v in target)
            if not (valid and target[0] >= 0 and target[1] in position and (target[0] or target[1] > layer)):  # type: ignore[index]
                raise ValueError(
                    f"prediction target {target!r} from layer {layer} is not a later MoE layer of this "
                    f"pass or a MoE layer of a later pass; MoE layers: {list(self.moe_layers)}"
                )
        if len(predicted) == 1:
            return list(predicted)
        return sorted(predicted, key=lambda target: (target[0], position[target[1]]))

    def _enqueue_prefetches(self, layer: int, predicted: Predictions | None, tick: Tick) -> None:
        prefetch = self.policies.prefetch
        if prefetch.needs_logits:
            if not predicted:
                return
            targets = self._targets(layer, predicted)
        else:
            targets = list(self._ahead[layer])
        for ahead, target in targets:
            logits = predicted[(ahead, target)] if prefetch.needs_logits else ()  # type: ignore[index]
            route = RoutePrediction(target, self.top_k, logits, ahead)
            target_pass = self.pass_idx + ahead
            for expert in prefetch.on_route(route, tick):
                if not (isinstance(expert, int) and 0 <= expert < self.num_experts):
                    raise ValueError(
                        f"{type(prefetch).__name__} asked for expert {expert!r}; "
                        f"layer {target} has experts 0..{self.num_experts - 1}"
                    )
                key = self._keys[target][expert]
                if key not in self.cache and key not in self._queued:
                    self._queue.append((key, target_pass))
                    self._queued.add(key)

    def _keep_queued(self, keep: Callable[[ExpertKey, int], bool]) -> None:
        kept = [(key, p) for key, p in self._queue if keep(key, p)]
        self._queue = deque(kept)
        self._queued = {key for key, _ in kept}

    def _drop_queued(self, layer: int) -> None:
        """Prefetches not yet started when their layer begins are abandoned (a request becomes a miss)."""
        pass_idx = self.pass_idx
        if self._queue and any(p == pass_idx and key.layer <= layer for key, p in self._queue):
            self._keep_queued(lambda key, p: p > pass_idx or key.layer > layer)

    def _pump(self, start_s: float, until_s: float, left: int, beyond: int | None = None) -> None:
        """Start queued prefetches, in order, at the times from `start_s` to `until_s` when the link is free and room
        can be made by evicting experts of layers up to `left` (those the pass has computed); `beyond` overrides the
        layers after which stale experts may go (default: the prefetch's target layer in this pass, none otherwise)."""
        cache, queue, link, path = self.cache, self._queue, self.link, self.path
        while queue:
            key, target_pass = queue[0]
            free = link.busy_until if path is None else path.free_at(key)
            begin = free if free > start_s else start_s
            if begin > until_s:
                return
            if key in cache:
                queue.popleft()
                self._queued.discard(key)
                continue
            nbytes = cache.nbytes(key)
            tick = Tick(self.step, self.pass_idx, left, begin)
            # For this pass, the experts of layers after the target are needed later than it: stale ones may go.
            bound = (key.layer if target_pass == self.pass_idx else ANY_LAYER) if beyond is None else beyond
            evicted = cache.make_room(nbytes, tick, left, bound)
            if evicted is None:
                return  # blocked until pins are released or the pass moves on
            queue.popleft()
            self._queued.discard(key)
            self._note_evictions(evicted)
            counters = self.stats.layers[key.layer]
            if path is None:
                cache.insert(key, tick, link.schedule(nbytes, begin), prefetch_pass=target_pass)
            else:
                finish, disk_until = path.transfer(key, nbytes, tick, counters, self.stats.layers)
                cache.insert(key, tick, finish, prefetch_pass=target_pass).disk_until = disk_until
            self._unused_prefetches[key] = target_pass
            if key in self._lookahead:
                self.stats.speculation.lookahead_issued += 1
            counters.prefetches_issued += 1
            counters.bytes_transferred += nbytes
            self.stats.fetches_by_precision[key.precision] += 1

    def _note_evictions(self, evicted: list[ExpertKey]) -> None:
        pass_idx = self.pass_idx
        for key in evicted:
            self.stats.layers[key.layer].evictions += 1
            self._evicted_in_pass[key] = self._unused_prefetches.pop(key, 0) == pass_idx

    # ---- lookahead (speculative decoding) ----------------------------------------------------------
    def lookahead(self, picks: Sequence[tuple[int, int]], since_s: float, now_s: float) -> None:
        """Between passes, while a draft runs: let the link carry what is queued from `since_s` to `now_s`, then
        queue `picks` ((MoE layer, expert), the first the most urgent) as prefetches for the next pass, ahead of
        everything else queued, and start what the link takes at `now_s`.

        The picks replace earlier lookahead picks not yet started; room for them is made by evicting any landed,
        unpinned expert that is not an unused prefetch (the ended pass's prefetches no longer count as unused).
        """
        if self._in_pass:
            raise RuntimeError("lookahead prefetches are queued between passes, not during one")
        target_pass = self.pass_idx + 1
        cache, unused = self.cache, self._unused_prefetches
        for key in [key for key, p in unused.items() if p < target_pass]:  # their pass is over
            entry = cache.get(key)
            if entry is not None:
                entry.prefetch_pass = 0
            del unused[key]
        if self._queue:
            self._pump(since_s, now_s, -1, -1)
        layers = self._keys
        wanted = []
        for layer, expert in picks:
            if layer not in layers or not (isinstance(expert, int) and 0 <= expert < self.num_experts):
                raise ValueError(f"lookahead pick {(layer, expert)!r} is not a (MoE layer, expert) of this model")
            key = layers[layer][expert]
            if key not in cache:
                self._lookahead[key] = target_pass
                wanted.append(key)
        ahead = dict.fromkeys(wanted)
        rest = [(key, p) for key, p in self._queue if p >= target_pass and key not in ahead]
        self._queue = deque([(key, target_pass) for key in ahead] + rest)
        self._queued = {key for key, _ in self._queue}
        self._pump(now_s, now_s, -1, -1)

    def advance_to(self, time_s: float) -> None:
        """Between passes: move the clock on to `time_s` (another model, a draft, ran on the same link until then)."""
        if self._in_pass:
            raise RuntimeError("the clock moves on between passes, not during one")
        if time_s > self.time:
            self.time = time_s

    def _count_lookahead(self, key: ExpertKey, late: bool) -> None:
        if self._lookahead.get(key) == self.pass_idx:
            spec = self.stats.speculation
            spec.lookahead_used += 1
            if late:
                spec.lookahead_late += 1

    # ---- metrics -------------------------------------------------------------------------------
    def snapshot(self) -> CacheStats:
        """The counters so far."""
        host = None if self.path is None else self.path.host
        if host is None:
            return self.stats.snapshot(self.cache.peak_resident_bytes, self.cache.capacity_bytes)
        return self.stats.snapshot(
            self.cache.peak_resident_bytes, self.cache.capacity_bytes, host.peak_resident_bytes, host.capacity_bytes
        )

    def reset_stats(self) -> None:
        """Zero the counters; the cache keeps its contents and the clock runs on."""
        self.stats.reset()
        self.cache.reset_peak()
        if self.path is not None:
            self.path.reset_peak()
