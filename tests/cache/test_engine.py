"""ExpertCache: byte accounting, pins, in-flight protection, warm-up."""

from __future__ import annotations

import pytest

from specmd.cache.engine import ExpertCache
from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.policies.eviction import LRU

SIZES = {"fp32": 100}


def key(layer: int, expert: int) -> ExpertKey:
    return ExpertKey(layer, expert, "fp32")


def at(t: float) -> Tick:
    return Tick(step=0, pass_idx=1, layer=0, time_s=t)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, ExpertKey]] = []

    def on_load(self, k: ExpertKey) -> None:
        self.events.append(("load", k))

    def on_evict(self, k: ExpertKey) -> None:
        self.events.append(("evict", k))


def test_make_room_evicts_just_enough_in_policy_order_and_tells_the_listener() -> None:
    listener = Recorder()
    cache = ExpertCache(250, LRU(), SIZES, listener=listener)
    cache.insert(key(0, 0), at(0), ready_at=0.0)
    cache.insert(key(0, 1), at(0), ready_at=0.0)
    cache.touch(key(0, 0), at(0))  # 0 is now more recent than 1
    assert cache.make_room(100, at(0)) == [key(0, 1)]
    assert cache.resident() == [key(0, 0)]
    assert cache.resident_bytes == 100
    assert listener.events == [("load", key(0, 0)), ("load", key(0, 1)), ("evict", key(0, 1))]


def test_make_room_is_free_when_bytes_fit() -> None:
    cache = ExpertCache(300, LRU(), SIZES)
    cache.insert(key(0, 0), at(0), ready_at=0.0)
    assert cache.make_room(200, at(0)) == []
    assert cache.make_room(301, at(0)) is None  # larger than the whole cache


def test_pinned_and_in_flight_experts_are_never_evicted() -> None:
    cache = ExpertCache(200, LRU(), SIZES)
    cache.insert(key(0, 0), at(0), ready_at=0.0, pinned=True)
    cache.insert(key(0, 1), at(0), ready_at=5.0)  # its transfer lands at t=5
    assert cache.make_room(100, at(1)) is None  # nothing evictable: the cache is left untouched
    assert len(cache) == 2
    assert cache.next_arrival(1.0) == 5.0
    assert cache.make_room(100, at(5)) == [key(0, 1)]  # landed and unpinned: evictable now
    assert cache.next_arrival(5.0) is None


def test_unpin_without_pin_is_an_error() -> None:
    cache = ExpertCache(200, LRU(), SIZES)
    cache.insert(key(0, 0), at(0), ready_at=0.0, pinned=True)
    cache.unpin(key(0, 0))
    with pytest.raises(RuntimeError, match="not pinned"):
        cache.unpin(key(0, 0))


def test_a_policy_choosing_a_pinned_expert_is_caught() -> None:
    class PicksFirst(LRU):
        def choose_victim(self, candidates, now):  # type: ignore[no-untyped-def]
            return key(0, 0)

    cache = ExpertCache(200, PicksFirst(), SIZES)
    cache.insert(key(0, 0), at(0), ready_at=0.0, pinned=True)
    cache.insert(key(0, 1), at(0), ready_at=0.0)
    with pytest.raises(RuntimeError, match="not evictable"):
        cache.make_room(100, at(0))


def test_insert_refuses_to_exceed_capacity_or_duplicate() -> None:
    cache = ExpertCache(100, LRU(), SIZES)
    cache.insert(key(0, 0), at(0), ready_at=0.0)
    with pytest.raises(RuntimeError, match="already resident"):
        cache.insert(key(0, 0), at(0), ready_at=0.0)
    with pytest.raises(RuntimeError, match="exceed the capacity"):
        cache.insert(key(0, 1), at(0), ready_at=0.0)


def test_warm_fills_from_the_catalog_without_evicting() -> None:
    catalog = [key(layer, e) for layer in range(2) for e in range(3)]
    cache = ExpertCache(450, LRU(), SIZES, catalog=catalog)
    assert cache.warm() == 4
    assert cache.resident() == catalog[:4]
    assert cache.warm([key(1, 2)]) == 0  # full: warm never evicts
    with pytest.raises(ValueError, match="precision 'int4'"):
        cache.warm([ExpertKey(0, 0, "int4")])


@pytest.mark.parametrize("capacity", [0, -5, 1.5, True])
def test_capacity_must_be_a_positive_integer(capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity_bytes"):
        ExpertCache(capacity, LRU(), SIZES)  # type: ignore[arg-type]
