"""The contract every registered policy holds, on random request streams (hypothesis).

Capacity is never exceeded (checked at every load), victims are always evictable, the request
counters add up, and the same stream gives the same counters every time. LRU and Least-Stale are
also checked victim by victim against brute-force reference models.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specmd.cache.keys import ExpertKey
from specmd.cache.policies.base import Future, Routed
from specmd.cache.policies.spec import catalog
from tests.cache.conftest import make_manager

LAYERS = (0, 1, 2)
EXPERTS = 6
EVICTIONS = [name for kind, name, _, _ in catalog() if kind == "eviction"]
PREFETCHES = [name for kind, name, _, _ in catalog() if kind == "prefetch"]
MISSES = [name for kind, name, _, _ in catalog() if kind == "miss"]

layer_requests = st.dictionaries(st.integers(0, EXPERTS - 1), st.integers(1, 3), min_size=1, max_size=4)
passes = st.lists(st.fixed_dictionaries({layer: layer_requests for layer in LAYERS}), min_size=1, max_size=8)
logits = st.lists(st.floats(-4, 4, allow_nan=False), min_size=EXPERTS, max_size=EXPERTS)


def future(stream):  # type: ignore[no-untyped-def]
    """What a replay would tell the clairvoyant policies about `stream` (steps numbered as the manager does)."""
    uses, requests, step = {}, {}, 0
    for pass_idx, layers in enumerate(stream, start=1):
        for layer, wanted in layers.items():
            step += 1
            requests[(pass_idx, layer)] = wanted
            for expert in wanted:
                uses.setdefault((layer, expert), []).append(step)
    return Future(uses, requests)


def run(manager, stream, predictions):  # type: ignore[no-untyped-def]
    from specmd.cache.clock import PassInfo

    for policy in (manager.policies.prefetch, manager.policies.eviction):
        if getattr(policy, "needs_future", False):
            policy.bind_future(future(stream))
    for index, layers in enumerate(stream):
        manager.begin_pass(PassInfo(sequences=1, tokens=1, attended=index + 1, context=index + 1, prefill=index == 0))
        for layer, requests in layers.items():
            ahead = manager.prediction_targets(layer)
            routing = {e: Routed(n, 0.1 * n, rank) for rank, (e, n) in enumerate(sorted(requests.items()))}
            probs = {e: (e + 1) / (EXPERTS * (EXPERTS + 1) / 2) for e in range(EXPERTS)}
            manager.run_layer(layer, requests, {target: predictions for target in ahead} or None, None, routing, probs)
        manager.end_pass()
    return manager.snapshot()


def comparable(stats):  # type: ignore[no-untyped-def]
    wall = {"wall_ttft_s", "wall_tokens_per_s"}
    return {k: v for k, v in dataclasses.asdict(stats).items() if k not in wall}


@pytest.mark.parametrize("prefetch", PREFETCHES)
@pytest.mark.parametrize("eviction", EVICTIONS)
@settings(max_examples=40, deadline=None)
@given(
    miss=st.sampled_from(MISSES),
    stream=passes,
    capacity=st.integers(1, len(LAYERS) * EXPERTS),
    bandwidth=st.sampled_from([None, 0.5, 1.0, 8.0]),
    predicted=st.lists(logits, min_size=1, max_size=3),
)
def test_contract(eviction: str, prefetch: str, miss, stream, capacity, bandwidth, predicted) -> None:  # type: ignore[no-untyped-def]
    def fresh():  # type: ignore[no-untyped-def]
        return make_manager(
            f"{prefetch}/{eviction}/{miss}/standard",
            capacity_experts=capacity,
            layers=LAYERS,
            num_experts=EXPERTS,
            bandwidth_gbps=bandwidth,
        )

    manager = fresh()
    stats = run(manager, stream, predicted)
    assert stats.hits + stats.late_prefetches + stats.misses == stats.requests
    assert stats.requests == sum(len(r) for layers in stream for r in layers.values())
    for layer in stats.per_layer:
        assert layer["hits"] + layer["late_prefetches"] + layer["misses"] == layer["requests"]
    assert stats.prefetches_used <= stats.prefetches_issued
    assert stats.collision_misses <= stats.misses
    assert stats.drops + stats.substitutions <= stats.misses
    assert stats.peak_resident_bytes <= stats.capacity_bytes
    assert not any(manager.cache.get(k).pins for k in manager.cache.resident())  # every pin released
    assert comparable(run(fresh(), stream, predicted)) == comparable(stats)


def reference_victims(stream, capacity: int, order):  # type: ignore[no-untyped-def]
    """Evictions of a demand-only cache that mirrors the manager's per-layer order, victims by `order`.

    `order(key, state)` ranks evictable keys (lowest first); `state` holds each resident key's last
    (pass, clock) touch, every expert's use count and accumulated routing weight (kept across evictions),
    the current pass and layer, the number of layers seen, and every request so far (pass -> layer ->
    experts, the current layer's included).
    """
    touched: dict[tuple[int, int], tuple[int, int]] = {}
    requested: dict[int, dict[int, set[int]]] = {}
    state = {"touched": touched, "uses": {}, "score": {}, "pass": 0, "layer": 0, "span": 1, "requests": requested}
    evicted = []
    clock = 0

    def use(k):  # type: ignore[no-untyped-def]
        nonlocal clock
        clock += 1
        touched[k] = (state["pass"], clock)
        state["uses"][k] = state["uses"].get(k, 0) + 1
        state["span"] = max(state["span"], k[0] + 1)

    for pass_idx, layers in enumerate(stream, start=1):
        state["pass"] = pass_idx
        for layer, requests in layers.items():
            state["layer"] = layer
            requested.setdefault(pass_idx, {})[layer] = set(requests)
            wanted = sorted(requests)
            for e in wanted:
                state["score"][(layer, e)] = state["score"].get((layer, e), 0.0) + 0.1 * requests[e]
            misses = [e for e in wanted if (layer, e) not in touched]
            for e in wanted:
                if (layer, e) in touched:
                    use((layer, e))
            for e in misses:
                while len(touched) >= capacity:
                    candidates = [k for k in touched if not (k[0] == layer and k[1] in wanted)]
                    victim = min(candidates, key=lambda k: order(k, state))
                    del touched[victim]
                    evicted.append(victim)
                use((layer, e))
    return evicted


def next_use_distance(k, s, rate=0.1, window=48, smoothing=0.3):  # type: ignore[no-untyped-def]
    """next-use's predicted distance to `k`'s next request, recomputed from every request so far.

    The arithmetic follows the policy's operation by operation, so equal distances stay equal.
    """
    pass_idx, point, span = s["pass"], LAYERS.index(s["layer"]), len(LAYERS)
    requests = s["requests"]
    sets = {q: {(layer, e) for layer, es in by_layer.items() for e in es} for q, by_layer in requests.items()}
    period, confidence, lags = 0, 0.0, [0.0] * (window + 1)
    for done in range(1, pass_idx):  # every finished pass scores every lag
        period, confidence = 0, 0.0
        for lag in range(1, window + 1):
            earlier = sets.get(done - lag)
            share = len(sets[done] & earlier) / len(sets[done]) if earlier is not None else 0.0
            lags[lag] = (1.0 - smoothing) * lags[lag] + smoothing * share
            if lags[lag] > confidence:
                period, confidence = lag, lags[lag]
    used = [q for q in sorted(requests) if k[1] in requests[q].get(k[0], ())]
    r, updated = 0.0, 0
    for q in used:
        r, updated = r * (1.0 - rate) ** (q - updated) + rate, q
    p = r * (1.0 - rate) ** (pass_idx - updated)
    position = LAYERS.index(k[0])
    ahead = position > point
    reach = position - point if ahead else span + position - point
    if p <= 0.0:
        return math.inf
    frequency = 1.0 / p - 1.0
    h = frequency
    if period:
        first = pass_idx - period if ahead else pass_idx + 1 - period
        later = [q for q in used if q >= first]
        loop = float(later[0] - first) if later else period + frequency
        h = confidence * loop + (1.0 - confidence) * frequency
    return reach - span * -h


REFERENCE_ORDER = {
    "lru": lambda k, s: s["touched"][k][1],
    # groups stale-left, current-left, stale-right, current-right (left: the layers the pass has looked up);
    # within one, the deepest layer (the farthest next use in cyclic order), then the least recent.
    "least-stale": lambda k, s: (
        (0 if k[0] <= s["layer"] else 2) + (s["touched"][k][0] == s["pass"]),
        -k[0],
        s["touched"][k][1],
    ),
    "lfu": lambda k, s: (s["uses"][k], s["touched"][k][1]),
    "lhu": lambda k, s: (s["uses"][k], s["touched"][k][1]),  # one full-precision copy: high uses = uses
    "fld": lambda k, s: (-((k[0] - s["layer"]) % s["span"]), s["touched"][k][1]),
    "score": lambda k, s: (s["score"].get(k, 0.0), s["touched"][k][1]),
    # the farthest predicted next request first, then the least recent
    "next-use": lambda k, s: (-next_use_distance(k, s), s["touched"][k][1]),
}


@pytest.mark.parametrize("eviction", sorted(REFERENCE_ORDER))
@settings(max_examples=60, deadline=None)
@given(stream=passes, capacity=st.integers(4, len(LAYERS) * EXPERTS))
def test_victims_match_the_reference_model(eviction: str, stream, capacity: int) -> None:  # type: ignore[no-untyped-def]
    manager = make_manager(
        f"none/{eviction}/fetch/standard", capacity_experts=capacity, layers=LAYERS, num_experts=EXPERTS
    )
    seen: list[ExpertKey] = []
    listener = manager.cache.listener
    original = listener.on_evict

    def on_evict(key: ExpertKey) -> None:
        seen.append(key)
        original(key)

    listener.on_evict = on_evict  # type: ignore[method-assign]
    run(manager, stream, None)
    expected = reference_victims(stream, capacity, REFERENCE_ORDER[eviction])
    assert [(k.layer, k.expert) for k in seen] == expected


def test_every_registered_eviction_policy_has_a_reference_or_its_own_order_test() -> None:
    # Belady is checked against every online policy instead (tests/sim/test_replay.py).
    assert set(EVICTIONS) - {"belady"} <= set(REFERENCE_ORDER)


def test_lru_reference_is_plain_lru_without_pins() -> None:
    # Sanity of the reference itself: with one expert per layer it is textbook LRU.
    stream = [{0: {0: 1}, 1: {1: 1}, 2: {2: 1}}, {0: {3: 1}, 1: {1: 1}, 2: {2: 1}}]
    assert reference_victims(stream, 3, REFERENCE_ORDER["lru"]) == [(0, 0)]


@pytest.mark.parametrize("eviction", EVICTIONS)
def test_memory_does_not_grow_with_requests_when_nothing_is_evicted(eviction: str) -> None:
    """A long generation whose experts all fit: policy bookkeeping stays O(resident), not O(requests)."""
    import random
    import tracemalloc

    from specmd.cache.clock import PassInfo

    rng = random.Random(0)
    stream = [{layer: dict.fromkeys(rng.sample(range(EXPERTS), 4), 1) for layer in LAYERS} for _ in range(2400)]
    manager = make_manager(
        f"none/{eviction}/fetch/standard", capacity_experts=len(LAYERS) * EXPERTS, layers=LAYERS, num_experts=EXPERTS
    )
    if getattr(manager.policies.eviction, "needs_future", False):
        manager.policies.eviction.bind_future(future(stream))
    info = PassInfo(sequences=1, tokens=1, attended=1, context=1, prefill=False)

    def serve(passes):  # type: ignore[no-untyped-def]
        for layers in passes:
            manager.begin_pass(info)
            for layer, requests in layers.items():
                routing = {e: Routed(1, 0.5, 0) for e in requests}
                manager.run_layer(layer, requests, None, None, routing, None)
            manager.end_pass()
        return manager.snapshot()

    tracemalloc.start()
    try:
        warm = serve(stream[:400])
        before = tracemalloc.get_traced_memory()[0]
        stats = serve(stream[400:])  # 24,000 more requests, every one a hit
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert stats.hits - warm.hits == stats.requests - warm.requests == 24_000
    assert grown < 100_000, f"{eviction} kept {grown} more bytes after 24,000 hits"
