"""next-use: Belady's rule with the next request predicted from the routing so far, worked by hand."""

from __future__ import annotations

import math

import pytest

from specmd.cache.engine import ExpertCache
from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.layout import ExpertLayout
from specmd.cache.policies.base import EvictionPolicy, Routed
from specmd.cache.policies.eviction import LFU, LRU, FarthestLayer, NextUse
from specmd.cache.policies.spec import PolicySpec
from tests.cache.conftest import make_manager, run_pass
from tests.cache.test_eviction_order import key, tick, victims


def layout(layers: int) -> ExpertLayout:
    return ExpertLayout(
        num_layers=layers,
        moe_layers=tuple(range(layers)),
        experts_per_layer=8,
        top_k=1,
        precision="fp32",
        expert_bytes={"fp32": 1},
        full_precision="fp32",
        full_expert_bytes=1,
    )


def serve(policy: EvictionPolicy, passes: list[dict[int, list[int]]], layers: int = 1) -> ExpertCache:
    """A cache with room for 8 one-byte experts, through `passes` (each: layer -> the experts it requests),
    numbered from 1: the policy observes each layer's routing, then each request is a hit or a load."""
    policy.bind_layout(layout(layers))
    cache = ExpertCache(8, policy, {"fp32": 1})
    for pass_idx, requests in enumerate(passes, start=1):
        for layer, experts in requests.items():
            now = tick(pass_idx, layer)
            policy.observe(layer, {e: Routed(1, 1.0, 0) for e in experts}, now)
            for e in experts:
                if key(layer, e) in cache:
                    cache.touch(key(layer, e), now)
                else:
                    cache.insert(key(layer, e), now, ready_at=0.0)
    return cache


LOOP = [{0: [0]}, {0: [1]}, {0: [2]}] * 2  # passes 1-6: experts 0, 1, 2 of one layer, twice over


def test_in_a_loop_the_expert_just_used_is_needed_last() -> None:
    # Pass 7 will repeat pass 4 (expert 0), pass 8 pass 5 (expert 1), pass 9 pass 6 (expert 2): Belady's order of
    # eviction is 2, 1, 0. LRU, LFU (two uses each, ties by recency) and FLD (one layer: LRU within it) evict 0 first,
    # the expert needed soonest.
    before_pass_7 = tick(7, -1)
    policy = NextUse()
    assert victims(serve(policy, LOOP), before_pass_7, 3) == [key(0, 2), key(0, 1), key(0, 0)]
    for other in (LRU(), LFU(), FarthestLayer()):
        assert victims(serve(other, LOOP), before_pass_7, 3) == [key(0, 0), key(0, 1), key(0, 2)]
    # The period: lag 3 matched passes 4, 5 and 6 (shares 1), scored 0.3, 0.51 and 0.657 at smoothing 0.3;
    # no other lag ever matched.
    assert policy.period == 3
    assert policy.confidence == pytest.approx(0.657)


def test_without_the_loop_estimate_frequency_and_recency_decide() -> None:
    # window=0: rates 0.126 (expert 0, requested in passes 1 and 4), 0.140 (2, 5) and 0.156 (3, 6) at pass 7, so
    # the least recent goes first, as with LRU.
    assert victims(serve(NextUse(window=0), LOOP), tick(7, -1), 3) == [key(0, 0), key(0, 1), key(0, 2)]


def test_a_hot_expert_of_the_layer_just_computed_outlives_a_cold_one_of_the_next_layer() -> None:
    # Three layers; layer 0 requests expert 0 (hot) in every pass, layer 1 expert 3, layer 2 expert 5 (cold) in pass 1
    # only and expert 4 after. In pass 5, with layer 1 being computed, FLD evicts the hot expert: its layer is the
    # farthest ahead. next-use weighs how often each is requested. Rates: hot 0.41, cold 0.066 (expected passes beyond
    # their layers' next occurrence: 1/rate - 1 = 1.44 and 14.2). Loop: each pass repeated the last (period 1,
    # confidence 0.608), so the hot one is due at its layer's next occurrence, 2 layer-steps away, and the cold one
    # not within the period (1 + 14.2 passes). Blended: hot 2 + 3 x 0.39 x 1.44 = 3.7 steps, cold
    # 1 + 3 x (0.608 x 15.2 + 0.392 x 14.2) = 45.5 steps.
    passes = [{0: [0], 1: [3], 2: [5]}] + [{0: [0], 1: [3], 2: [4]}] * 3 + [{0: [0], 1: [3]}]
    hot, cold = key(0, 0), key(2, 5)
    at_layer_1 = tick(5, 1)
    cache = serve(NextUse(), passes, layers=3)
    cache.pin(key(1, 3))  # layer 1 computes its expert
    cache.pin(key(2, 4))  # keep the test to the two in question
    assert victims(cache, at_layer_1, 1) == [cold]
    cache = serve(FarthestLayer(), passes, layers=3)
    cache.pin(key(1, 3))
    cache.pin(key(2, 4))
    assert victims(cache, at_layer_1, 1) == [hot]


def test_rates_decay_where_lfu_counts_forever() -> None:
    # Expert 0 was requested in passes 1-4, expert 1 in passes 8-10, with other experts in between. At pass 11 LFU
    # keeps 0 (4 uses against 3). next-use's rate for 0 has decayed to 0.344 x 0.9^7 = 0.164, below 1's 0.244: it
    # evicts 0.
    passes = [{0: [0]}] * 4 + [{0: [5]}] * 3 + [{0: [1]}] * 3
    assert victims(serve(NextUse(window=0), passes), tick(11, -1), 1) == [key(0, 0)]
    assert victims(serve(LFU(), passes), tick(11, -1), 1) == [key(0, 5)]  # 3 uses and less recent than 1
    assert victims(serve(LFU(), passes), tick(11, -1), 2)[1] == key(0, 1)


def test_an_expert_never_requested_goes_first_the_least_recent_of_them_first() -> None:
    # Prefetched experts nobody asked for yet have rate 0: their expected distance is infinite, whatever their layer.
    policy = NextUse()
    cache = serve(policy, [{0: [0], 1: [0]}] * 3, layers=2)
    first, second = key(1, 6), key(0, 7)
    cache.insert(first, tick(3, 1), ready_at=0.0)
    cache.insert(second, tick(3, 1), ready_at=0.0)
    assert victims(cache, tick(4, -1), 2) == [first, second]


def test_a_loop_larger_than_the_cache_gets_hits_where_lru_gets_none() -> None:
    # One expert per layer and pass, repeating every 3 passes: 6 experts cycle through a cache of 4. LRU always evicts
    # the expert needed next; next-use finds the loop and keeps what it needs soonest, as Belady does.
    stream = [{0: {t % 3: 1}, 1: {3 + t % 3: 1}} for t in range(60)]

    def hits(policy: str) -> int:
        manager = make_manager(f"none/{policy}/fetch/standard", capacity_experts=4, layers=(0, 1))
        for layers in stream:
            run_pass(manager, layers)
        return manager.snapshot().hits

    assert hits("lru") == hits("lfu") == hits("fld") == 0
    assert hits("next-use") == 65  # of 120 requests; Belady's MIN gets 69 (it does not need a period to see the loop)


def test_registered_with_its_parameters() -> None:
    policy = PolicySpec.parse("none/nu:rate=0.2,window=0,smoothing=1/fetch/standard").build().eviction
    assert isinstance(policy, NextUse)
    assert (policy.rate, policy.window, policy.smoothing) == (0.2, 0, 1.0)
    assert policy.needs_routing


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("rate", 0),
        ("rate", 1),
        ("rate", -0.1),
        ("rate", math.nan),
        ("rate", math.inf),
        ("rate", True),
        ("rate", "0.1"),
        ("window", -1),
        ("window", 1025),
        ("window", 2.0),
        ("window", True),
        ("smoothing", 0),
        ("smoothing", 1.5),
        ("smoothing", math.nan),
        ("smoothing", -math.inf),
        ("smoothing", False),
    ],
)
def test_parameters_are_checked(param: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"next-use {param} must be .* got {value!r}"):
        NextUse(**{param: value})  # type: ignore[arg-type]


def test_it_needs_the_layout() -> None:
    cache = ExpertCache(1, NextUse(), {"fp32": 1})
    cache.insert(ExpertKey(0, 0, "fp32"), Tick(0, 1, 0, 0.0), ready_at=0.0)
    with pytest.raises(RuntimeError, match="bind_layout"):
        cache.make_room(1, Tick(0, 1, 0, 0.0))
