"""Least-Stale as the paper defines it: stale before current, left of the execution point before right."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from specmd.cache.engine import ExpertCache
from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.policies.eviction import LRU, LeastStale
from tests.cache.test_eviction_order import fill, key, tick, victims

A, B, C, D, E = key(0, 0), key(1, 0), key(2, 0), key(3, 0), key(3, 1)


def pass_two_at_layer_one(policy):  # type: ignore[no-untyped-def]
    """Pass 1 loads A-D (layers 0-3). In pass 2 layer 1 uses B again and prefetches E for layer 3: A is
    stale-left, B current-left, C and D stale-right, E current-right."""
    cache = fill(policy, [A, C, D, B])
    cache.touch(B, tick(2, 1))
    cache.insert(E, tick(2, 1), ready_at=0.0)
    return cache


def test_groups_in_order_each_farthest_next_use_first() -> None:
    # Left: B's layer is the one just computed (its next use is the next pass's layer 1, after A's layer 0).
    # Right: D's layer 3 is reached after C's layer 2. LRU keeps what the pass needs next the least.
    assert victims(pass_two_at_layer_one(LeastStale()), tick(2, 1), 5) == [A, B, D, C, E]
    assert victims(pass_two_at_layer_one(LRU()), tick(2, 1), 5) == [A, C, D, B, E]


def test_layer_order_is_the_papers_fifo_by_layer_position() -> None:
    assert victims(pass_two_at_layer_one(LeastStale(order="layer")), tick(2, 1), 5) == [A, B, C, D, E]


def test_before_a_pass_reaches_any_layer_every_expert_is_right_and_the_deepest_goes_first() -> None:
    cache = fill(LeastStale(), [A, B, C, D])
    assert victims(cache, tick(2, -1), 4) == [D, C, B, A]


def test_the_current_layers_own_unused_experts_count_as_left() -> None:
    used, unused, upcoming = key(2, 0), key(2, 1), key(3, 0)
    cache = fill(LeastStale(), [used, unused, upcoming])
    cache.pin(used)  # layer 2 computes `used`; `unused` was not requested by it this pass
    assert victims(cache, tick(2, 2), 1) == [unused]


def test_fifo_within_a_layer_and_pinned_experts_are_skipped() -> None:
    first, second, third = key(2, 7), key(2, 3), key(2, 5)
    cache = fill(LeastStale(), [first, second, third])
    cache.pin(first)
    assert victims(cache, tick(2, 2), 2) == [second, third]
    cache.unpin(first)
    assert victims(cache, tick(2, 2), 1) == [first]


def test_a_prefetch_evicts_computed_layers_and_stale_experts_after_its_target_only() -> None:
    cache = fill(LRU(), [D, A, C, B])  # LRU alone would evict D first
    free = cache.capacity_bytes - cache.resident_bytes
    # At layer 1, for a prefetch of layer 2: A and B (computed) may go, C (the target's layer) may not, and
    # D (after the target) may, being stale.
    assert cache.make_room(free + 3, tick(2, 1), 1, 2) == [D, A, B]
    assert cache.make_room(free + 4, tick(2, 1), 1, 2) is None
    assert cache.resident() == [C]
    prefetched = key(3, 5)
    cache.insert(prefetched, tick(2, 1), ready_at=0.0, prefetch_pass=2)  # for layer 3, not used yet
    full = cache.capacity_bytes - cache.resident_bytes
    assert cache.make_room(full + 1, tick(2, 1), 1, 2) is None  # an unused prefetch is never evicted by one


LAYERS = 4


def group(k: ExpertKey, point: int, last_pass: int, pass_idx: int) -> int:
    """0 stale-left, 1 current-left, 2 stale-right, 3 current-right."""
    return (0 if k.layer <= point else 2) + (last_pass == pass_idx)


# (a new pass?, execution point, layer, expert, pin it?)
LAYER = st.integers(0, LAYERS - 1)
STEP = st.tuples(st.booleans(), st.integers(-1, LAYERS - 1), LAYER, st.integers(0, 5), st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.lists(STEP, min_size=1, max_size=60), st.sampled_from(["cyclic", "layer"]))
def test_victims_come_from_the_first_group_that_has_one(steps, order: str) -> None:  # type: ignore[no-untyped-def]
    """Whatever happened before, a victim is in the earliest group (stale-left, current-left, stale-right,
    current-right) holding an evictable expert, so a current-right expert goes only when no left one can;
    with "cyclic" the victim has the deepest layer of its group."""
    cache = ExpertCache(6, LeastStale(order), {"fp32": 1})
    last: dict[ExpertKey, int] = {}  # key -> pass of its last request or arrival
    pinned: ExpertKey | None = None
    pass_idx = 1
    for new_pass, point, layer, expert, pin in steps:
        pass_idx += new_pass  # passes only move forward
        now = Tick(0, pass_idx, point, 0.0)
        k = ExpertKey(layer, expert, "fp32")
        if k in cache:
            cache.touch(k, now)
        else:
            evictable = [c for c in cache.resident() if c != pinned]
            for victim in cache.make_room(1, now) or []:
                ranks = {c: group(c, point, last[c], pass_idx) for c in evictable}
                assert ranks[victim] == min(ranks.values())
                if order == "cyclic":
                    assert victim.layer == max(c.layer for c, r in ranks.items() if r == ranks[victim])
                evictable.remove(victim)
                del last[victim]
            cache.insert(k, now, ready_at=0.0)
        last[k] = pass_idx
        if pinned is not None:
            cache.unpin(pinned)
            pinned = None
        if pin:
            cache.pin(k)
            pinned = k
