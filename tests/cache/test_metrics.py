"""Metric definitions (DESIGN §5) on small hand-worked timelines.

Defaults: 1000-byte experts on a 1 GB/s link (1 us per transfer), 0.5 us per expert computed,
no dense or head compute time.
"""

from __future__ import annotations

import pytest

from tests.cache.conftest import PREFILL, make_manager, run_pass

US = 1e-6


def test_misses_stall_until_each_expert_lands_and_compute_overlaps_transfers() -> None:
    m = make_manager()
    run_pass(m, {0: {0: 1, 1: 1}}, info=PREFILL)
    s = m.snapshot()
    assert (s.requests, s.hits, s.late_prefetches, s.misses) == (2, 0, 0, 2)
    # e0 lands at 1us (stall 1), computes to 1.5; e1 lands at 2us (stall 0.5), computes to 2.5.
    assert s.stall_s == pytest.approx(1.5 * US)
    assert s.ttft_s == pytest.approx(2.5 * US)
    assert s.bytes_transferred == 2000
    assert s.fetches_by_precision == {"fp32": 2}


def test_resident_experts_are_hits_with_no_stall() -> None:
    m = make_manager()
    run_pass(m, {0: {0: 1, 1: 1}})
    m.reset_stats()
    run_pass(m, {0: {0: 1, 1: 1}})
    s = m.snapshot()
    assert (s.requests, s.hits, s.misses, s.stall_s, s.hit_rate) == (2, 2, 0, 0.0, 1.0)
    assert s.tokens_per_s == pytest.approx(1 / (1.0 * US))  # one decode token, two 0.5us experts


def test_collision_miss_is_a_miss_on_an_expert_evicted_in_the_same_pass() -> None:
    m = make_manager(capacity_experts=2)
    run_pass(m, {0: {0: 1, 1: 1}, 1: {0: 1, 1: 1}})  # layer 1 evicts both layer-0 experts
    assert m.snapshot().collision_misses == 0
    # Next pass: layer 0 misses (evicted last pass: not a collision) and evicts layer 1's experts (LRU),
    # which layer 1 then misses: collisions.
    run_pass(m, {0: {0: 1, 1: 1}, 1: {0: 1, 1: 1}})
    s = m.snapshot()
    assert s.misses == 8
    assert s.collision_misses == 2
    assert [layer["collision_misses"] for layer in s.per_layer] == [0, 2]
    assert s.evictions == 6


def test_prefetch_late_arrival_precision_and_recall() -> None:
    m = make_manager("topk/lru/fetch/standard", capacity_experts=4, top_k=2)
    predicted_for_layer_1 = [[0.0, 0.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0]]  # top-2: experts 2 then 3
    run_pass(m, {0: {0: 1}, 1: {2: 1, 5: 1}}, predicted={0: predicted_for_layer_1}, info=PREFILL)
    s = m.snapshot()
    # Layer 0: e0 misses, lands at 1us, computes to 1.5us; the link is then idle, so the prefetch of
    # layer-1 expert 2 starts at 1.5us and lands at 2.5us. Expert 3 is still queued when layer 1 starts
    # and is dropped. Layer 1: e2 is in flight (late prefetch), e5 misses and queues behind it (lands
    # 3.5us). Stalls: 1 (layer 0) + 1 (e2) + 0.5 (e5).
    assert (s.requests, s.hits, s.late_prefetches, s.misses) == (3, 0, 1, 2)
    assert (s.prefetches_issued, s.prefetches_used) == (1, 1)
    assert s.prefetch_precision == 1.0
    assert s.prefetch_recall == pytest.approx(1 / 3)
    assert s.stall_s == pytest.approx(2.5 * US)
    assert s.ttft_s == pytest.approx(4.0 * US)
    assert s.bytes_transferred == 3000


def test_an_unused_prefetch_lowers_precision() -> None:
    m = make_manager("topk/lru/fetch/standard", capacity_experts=4, top_k=1, bandwidth_gbps=None)
    run_pass(m, {0: {0: 1}, 1: {6: 1}}, predicted={0: [[9.0, 0, 0, 0, 0, 0, 0, 0]]})
    s = m.snapshot()
    assert (s.prefetches_issued, s.prefetches_used, s.prefetch_precision, s.prefetch_recall) == (1, 0, 0.0, 0.0)
    assert s.misses == 2


def test_native_speed_link_costs_no_emulated_time() -> None:
    m = make_manager(bandwidth_gbps=None)
    run_pass(m, {0: {0: 1, 1: 1}}, info=PREFILL)
    s = m.snapshot()
    assert s.misses == 2 and s.stall_s == 0.0
    assert s.ttft_s == pytest.approx(1.0 * US)


def test_streaming_serves_a_layer_wider_than_the_cache() -> None:
    m = make_manager(capacity_experts=1, num_experts=8)
    run_pass(m, {0: {e: 1 for e in range(8)}}, info=PREFILL)
    s = m.snapshot()
    assert (s.requests, s.misses, s.evictions) == (8, 8, 7)
    assert s.peak_resident_bytes == 1000
    # One slot: each expert is fetched (1us) only after the previous one is computed (0.5us).
    assert s.ttft_s == pytest.approx(8 * 1.5 * US)
    assert s.stall_s == pytest.approx(8 * 1.0 * US)


def test_wall_and_pass_counters() -> None:
    m = make_manager()
    run_pass(m, {0: {0: 1}}, info=PREFILL)
    run_pass(m, {0: {0: 1}})
    run_pass(m, {0: {0: 1}})
    s = m.snapshot()
    assert (s.prefill_passes, s.decode_passes, s.decode_tokens) == (1, 2, 2)
    assert s.wall_ttft_s > 0 and s.wall_tokens_per_s > 0
