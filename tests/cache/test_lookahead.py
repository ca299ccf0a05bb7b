"""The expert lookahead of speculative decoding: the draft's picks queue as prefetches for the next pass, in
priority order, between passes; used and late ones are counted."""

from __future__ import annotations

import pytest

from specmd.cache.keys import ExpertKey
from tests.cache.conftest import DECODE, PRECISION, make_manager, run_pass


def test_lookahead_prefetches_in_priority_order_and_counts_their_use() -> None:
    manager = make_manager(capacity_experts=4)
    run_pass(manager, {0: {0: 1}, 1: {1: 1}})
    start = manager.time
    picks = [(0, 3), (1, 5), (0, 4)]
    manager.lookahead(picks, start, start)  # the draft's picks so far: the first starts at once
    manager.lookahead(picks, start, start + 1.0)  # the draft ran on: the link carried the rest meanwhile
    arrivals = {key.expert: manager.cache.get(key).ready_at for key in manager.cache.resident() if key.expert > 2}
    assert arrivals[3] < arrivals[5] < arrivals[4]  # one link, in the order given
    manager.time = arrivals[5]  # the target resumes when (0, 3) and (1, 5) have landed
    run_pass(manager, {0: {3: 1, 4: 1}, 1: {5: 1}})
    stats = manager.snapshot()
    assert stats.lookahead_prefetches_issued == 3
    assert stats.lookahead_prefetches_used == 3
    assert stats.lookahead_prefetches_late == 1  # (0, 4) was still in flight
    assert stats.late_prefetches == 1 and stats.prefetches_used == 3


def test_later_picks_reorder_what_has_not_started() -> None:
    manager = make_manager(capacity_experts=8, bandwidth_gbps=1.0)
    run_pass(manager, {0: {0: 1}, 1: {1: 1}})
    now = manager.time
    manager.lookahead([(1, 6), (1, 7)], now, now)  # (1, 6) starts at once, (1, 7) waits for the link
    picks = [(0, 2), (1, 6), (1, 7)]
    manager.lookahead(picks, now, now)  # a nearer layer's expert goes ahead of (1, 7)
    manager.lookahead(picks, now, now + 1.0)
    ready = {key.expert: manager.cache.get(key).ready_at for key in manager.cache.resident()}
    assert ready[6] < ready[2] < ready[7]


def test_lookahead_never_evicts_its_own_picks_and_respects_capacity() -> None:
    manager = make_manager(capacity_experts=2)
    run_pass(manager, {0: {0: 1}, 1: {1: 1}})
    now = manager.time
    picks = [(0, 2), (0, 3), (1, 4)]
    manager.lookahead(picks, now, now)
    manager.lookahead(picks, now, now + 1.0)  # room for two: (1, 4) waits
    resident = set(manager.cache.resident())
    assert resident == {ExpertKey(0, 2, PRECISION), ExpertKey(0, 3, PRECISION)}
    assert manager.cache.resident_bytes <= manager.cache.capacity_bytes


def test_lookahead_is_between_passes_and_checks_its_picks() -> None:
    manager = make_manager()
    with pytest.raises(ValueError, match="not a \\(MoE layer, expert\\)"):
        manager.lookahead([(0, 99)], 0.0, 0.0)
    manager.begin_pass(DECODE)
    with pytest.raises(RuntimeError, match="between passes"):
        manager.lookahead([(0, 1)], 0.0, 0.0)
    with pytest.raises(RuntimeError, match="between passes"):
        manager.advance_to(1.0)
