"""Metric definitions (DESIGN §5) on small hand-worked timelines.

Defaults: 1000-byte experts on a 1 GB/s link (1 us per transfer), 0.5 us per expert computed,
no dense or head compute time.
"""

from __future__ import annotations

import pytest

from tests.cache.conftest import DECODE, PREFILL, FixedCompute, make_manager, run_pass

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


def test_collision_misses_by_cause_and_the_paper_rates() -> None:
    m = make_manager(capacity_experts=2)
    run_pass(m, {0: {0: 1, 1: 1}, 1: {0: 1, 1: 1}})
    run_pass(m, {0: {0: 1, 1: 1}, 1: {0: 1, 1: 1}})  # the two collisions of the test above: stale experts
    s = m.snapshot()
    assert (s.collision_misses_stale, s.collision_misses_prefetched) == (2, 0)
    assert s.collision_rate == pytest.approx(2 / 8) and s.per_layer[1]["collision_rate"] == pytest.approx(2 / 4)


def test_a_prefetch_evicted_before_its_layer_runs_is_a_prefetched_collision() -> None:
    m = make_manager("topk/lru/fetch/standard", capacity_experts=2, layers=(0, 1, 2), top_k=1)
    six = [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0]]
    m.begin_pass(PREFILL)
    # Layer 0: e0 lands at 1 us; the link is then free, so expert 6 of layer 2 starts and lands at 2 us.
    m.run_layer(0, {0: 1}, {(0, 2): six})
    # Layer 1 needs two experts in a two-expert cache: e1 evicts e0; e2 waits until e1 is computed, then
    # evicts the least recent of e1 and the prefetched e6: e6, unused.
    m.run_layer(1, {1: 1, 2: 1})
    m.run_layer(2, {6: 1})
    m.end_pass()
    s = m.snapshot()
    assert (s.collision_misses, s.collision_misses_prefetched, s.collision_misses_stale) == (1, 1, 0)
    assert s.prefetches_issued == 1 and s.prefetches_used == 0


def test_hit_rate_with_late_prefetches_counts_in_flight_prefetches_as_papers_do() -> None:
    m = make_manager("topk/lru/fetch/standard", capacity_experts=4, top_k=2)
    predicted_for_layer_1 = [[0.0, 0.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0]]
    run_pass(m, {0: {0: 1}, 1: {2: 1, 5: 1}}, predicted={0: predicted_for_layer_1}, info=PREFILL)
    s = m.snapshot()
    assert (s.hits, s.late_prefetches, s.requests) == (0, 1, 3)
    assert (s.hit_rate, s.hit_rate_with_late) == (0.0, pytest.approx(1 / 3))


def test_the_link_works_on_while_the_next_layer_computes_attention() -> None:
    m = make_manager("topk/lru/fetch/standard", capacity_experts=4, top_k=2, compute=FixedCompute(dense=5 * US))
    predicted_for_layer_1 = [[0.0, 0.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0]]  # experts 2 and 3
    # Layer 0 (attention to 5 us): e0 lands at 6 us; e2 then starts (lands 7 us) while e0 computes (6.5 us).
    # e3 waits for the link, which frees at 7 us, during layer 1's attention (6.5 to 11.5 us): it lands at
    # 8 us, before layer 1 looks its experts up, so both are hits.
    run_pass(m, {0: {0: 1}, 1: {2: 1, 3: 1}}, predicted={0: predicted_for_layer_1}, info=PREFILL)
    s = m.snapshot()
    assert s.prefetches_issued == 2 and s.per_layer[1]["hits"] == 2 and s.stall_s == pytest.approx(1 * US)


def test_a_prefetch_never_evicts_an_expert_needed_before_its_target() -> None:
    m = make_manager("topk/lru/fetch/standard", capacity_experts=3, layers=(0, 1, 2), top_k=1)
    run_pass(m, {0: {0: 1}, 1: {1: 1}, 2: {2: 1}}, info=PREFILL)  # leaves e0, e1, e2 resident
    m.begin_pass(DECODE)
    # Layer 0 evicts e0 (LRU) for e3 and predicts e5 for layer 2. While e3 computes, only e1 (layer 1, needed
    # before the target) and e2 (the target's layer) could make room: the prefetch waits and then evicts e3.
    m.run_layer(0, {3: 1}, {(0, 2): [[0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0]]})
    m.run_layer(1, {1: 1})
    m.run_layer(2, {5: 1})
    m.end_pass()
    s = m.snapshot()
    assert s.prefetches_issued == 1 and s.collision_misses == 0
    assert s.per_layer[1]["hits"] == 1  # e1 survived the prefetch


def test_a_prefetch_may_evict_a_stale_expert_of_a_layer_after_its_target() -> None:
    m = make_manager("topk/lru/fetch/standard", capacity_experts=2, layers=(0, 1, 2), top_k=1)
    run_pass(m, {0: {0: 1}, 1: {1: 1}, 2: {2: 1}}, info=PREFILL)  # leaves e1 and e2 resident
    five = [[0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0]]
    # Layer 0 evicts e1 for e0 and predicts e5 for layer 1: while e0 computes, e2 (layer 2, after the target,
    # stale) makes room at once; layer 2 then misses it again in the same pass.
    run_pass(m, {0: {0: 1}, 1: {5: 1}, 2: {2: 1}}, predicted={0: five})
    s = m.snapshot()
    assert s.prefetches_issued == s.prefetches_used == 1
    assert (s.collision_misses, s.collision_misses_stale) == (1, 1)
