"""Each eviction policy evicts exactly what its definition says, on hand-made request streams."""

from __future__ import annotations

from specmd.cache.engine import ExpertCache
from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.layout import ExpertLayout
from specmd.cache.policies.eviction import LFU, LHU, LRU, FarthestLayer, ScoreBased


def key(layer: int, expert: int) -> ExpertKey:
    return ExpertKey(layer, expert, "fp32")


def tick(pass_idx: int, layer: int) -> Tick:
    return Tick(step=0, pass_idx=pass_idx, layer=layer, time_s=0.0)


def fill(policy, keys, pass_idx=1):  # type: ignore[no-untyped-def]
    """A cache with room for exactly 8 one-byte experts, holding `keys`."""
    cache = ExpertCache(8, policy, {"fp32": 1})
    for k in keys:
        cache.insert(k, tick(pass_idx, k.layer), ready_at=0.0)
    return cache


def victims(cache: ExpertCache, now: Tick, n: int) -> list[ExpertKey]:
    """The next `n` experts the cache evicts to make room, in order."""
    out: list[ExpertKey] = []
    free = cache.capacity_bytes - cache.resident_bytes
    for i in range(1, n + 1):
        out += cache.make_room(free + i, now)
    return out


def test_lru_evicts_the_least_recently_requested() -> None:
    a, b, c = key(0, 0), key(0, 1), key(1, 0)
    cache = fill(LRU(), [a, b, c])
    cache.touch(a, tick(1, 0))  # touch 0, so 1 is now the oldest
    assert victims(cache, tick(1, 1), 3) == [b, c, a]


def test_lfu_evicts_the_least_used_and_breaks_ties_by_recency() -> None:
    a, b, c, d = key(0, 0), key(0, 1), key(0, 2), key(1, 0)
    cache = fill(LFU(), [a, b, c])
    for k in (a, a, c):
        cache.touch(k, tick(1, 0))
    cache.insert(d, tick(1, 1), ready_at=0.0)  # one use, like b, but more recent
    assert victims(cache, tick(1, 1), 4) == [b, d, c, a]


def test_lfu_remembers_an_experts_popularity_across_evictions() -> None:
    a, b = key(0, 0), key(0, 1)
    cache = ExpertCache(2, LFU(), {"fp32": 1})
    cache.insert(a, tick(1, 0), ready_at=0.0)
    cache.touch(a, tick(1, 0))  # a: 2 uses
    assert cache.make_room(2, tick(1, 0)) == [a]
    cache.insert(a, tick(1, 1), ready_at=0.0)  # back: 3 uses, not 1
    cache.insert(b, tick(1, 1), ready_at=0.0)  # b: 1 use, more recent
    assert cache.make_room(1, tick(1, 1)) == [b]


def test_lhu_counts_only_full_precision_uses() -> None:
    policy = LHU()
    sizes = {"fp32": 4, "nf4": 1}  # the largest stored copy is the high-precision one
    policy.bind_layout(
        ExpertLayout(num_layers=1, moe_layers=(0,), experts_per_layer=2, top_k=1, precision="fp32",
                     expert_bytes=sizes, full_precision="fp32", full_expert_bytes=4)
    )  # fmt: skip
    cache = ExpertCache(8, policy, sizes)
    high, low = ExpertKey(0, 0, "fp32"), ExpertKey(0, 1, "nf4")
    cache.insert(high, tick(1, 0), ready_at=0.0)
    cache.insert(low, tick(1, 0), ready_at=0.0)
    for _ in range(5):
        cache.touch(low, tick(1, 0))  # many uses, all at low precision
    cache.touch(high, tick(1, 0))
    free = cache.capacity_bytes - cache.resident_bytes
    assert cache.make_room(free + 1, tick(1, 0)) == [low]


def test_fld_evicts_the_layer_the_pass_reaches_last() -> None:
    keys = [key(layer, 0) for layer in range(4)]
    cache = fill(FarthestLayer(), keys)
    # At layer 2: layer 1 was just finished (3 layers away), then 0, then 3 (next), then 2 itself.
    assert victims(cache, tick(1, 2), 4) == [key(1, 0), key(0, 0), key(3, 0), key(2, 0)]


def test_score_eviction_keeps_experts_with_high_accumulated_gate_scores() -> None:
    from specmd.cache.policies.base import Routed

    policy = ScoreBased()
    low, high, never = key(0, 1), key(0, 0), key(1, 5)
    cache = fill(policy, [high, low, never])
    policy.observe(0, {0: Routed(2, 1.5, 0), 1: Routed(1, 0.2, 1)}, tick(1, 0))
    assert victims(cache, tick(1, 1), 3) == [never, low, high]
