"""Prefetch targets carry their pass: a prediction for the next token's pass is fetched now and used then.

Hand-worked on 1000-byte experts over a 1 GB/s link (1 us a transfer), 0.5 us per expert computed.
"""

from __future__ import annotations

import pytest

from tests.cache.conftest import DECODE, PREFILL, FixedCompute, make_manager

US = 1e-6
FIVE = [[0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0]]  # top-1: expert 5
FIVE_SIX = [[0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 8.0, 0.0]]  # top-2: experts 5 and 6


def serve(manager, layers, predicted, info=DECODE):  # type: ignore[no-untyped-def]
    """One pass; `predicted` maps a layer to the predictions made from it."""
    manager.begin_pass(info)
    for layer, requests in layers.items():
        manager.run_layer(layer, requests, predicted.get(layer))
    manager.end_pass()


def test_a_prediction_for_the_next_pass_is_prefetched_now_and_used_then() -> None:
    m = make_manager("topk/lru/fetch/standard", capacity_experts=4, top_k=1)
    # Pass 1, layer 0: e0 misses (lands 1 us, computed by 1.5 us); the link is then idle, so layer 0's expert 5
    # for pass 2 starts at 1.5 us and lands at 2.5 us. Layer 1's miss queues behind it (3.5 us).
    serve(m, {0: {0: 1}, 1: {1: 1}}, {0: {(1, 0): FIVE}}, info=PREFILL)
    s = m.snapshot()
    assert (s.prefetches_issued, s.prefetches_used, s.misses) == (1, 0, 2)
    assert s.stall_s == pytest.approx(1 * US + 2 * US)
    serve(m, {0: {5: 1}, 1: {1: 1}}, {})
    s = m.snapshot()
    assert (s.hits, s.prefetches_used, s.prefetch_precision, s.prefetch_recall) == (2, 1, 1.0, 0.25)


def test_a_next_pass_prefetch_still_queued_when_its_layer_begins_is_dropped() -> None:
    m = make_manager("topk/lru/fetch/standard", capacity_experts=4, top_k=2, bandwidth_gbps=1e-3)  # 1 ms a transfer
    # Pass 1's layer 1 predicts experts 5 and 6 of layer 0 for pass 2: 5 starts when layer 1 ends, 6 waits.
    serve(m, {0: {0: 1}, 1: {1: 1}}, {1: {(1, 0): FIVE_SIX}}, info=PREFILL)
    # Pass 2's layer 0 begins with 6 still queued: it is dropped, so it is not fetched once the link frees.
    serve(m, {0: {5: 1}}, {})
    s = m.snapshot()
    assert (s.prefetches_issued, s.late_prefetches, s.prefetches_used) == (1, 1, 1)


def test_prefetches_for_a_pass_that_has_gone_are_dropped_when_the_next_begins() -> None:
    m = make_manager(
        "topk/lru/fetch/standard", capacity_experts=4, top_k=2, bandwidth_gbps=1e-3, compute=FixedCompute(dense=5e-3)
    )
    serve(m, {0: {0: 1}, 1: {1: 1}}, {1: {(1, 1): FIVE_SIX}}, info=PREFILL)  # 5 starts, 6 waits for pass 2
    serve(m, {}, {})  # pass 2 never reaches layer 1
    serve(m, {0: {0: 1}}, {})  # the link is free by now: 6 would start here had pass 3 kept it
    assert m.snapshot().prefetches_issued == 1


@pytest.mark.parametrize(
    ("layer", "target"),
    [(1, (0, 0)), (1, (0, 1)), (0, (0, 7)), (0, (-1, 1)), (0, ("1", 1))],
)
def test_targets_must_be_later_in_the_pass_or_in_a_later_pass(layer: int, target: tuple) -> None:  # type: ignore[type-arg]
    m = make_manager("topk/lru/fetch/standard", capacity_experts=4, top_k=1)
    m.begin_pass(PREFILL)
    if layer == 1:
        m.run_layer(0, {0: 1})
    with pytest.raises(ValueError, match="is not a later MoE layer of this pass or a MoE layer of a later pass"):
        m.run_layer(layer, {1: 1}, {target: FIVE})
