"""Hardware profiles: the roofline, and profiles calibrated to a measured throughput (a100-paper)."""

from __future__ import annotations

import pytest

from specmd.cache.clock import PassInfo
from specmd.cache.config import CacheConfig
from specmd.cache.factory import compute_model
from specmd.cache.hardware import calibrate, decode_roofline_s, get_profile
from specmd.cache.keys import START
from specmd.cache.policies.base import RoutePrediction
from specmd.cache.policies.prefetch import ScorePrefetch
from specmd.offload_models.info import expert_layout, load_config


@pytest.fixture(scope="module")
def olmoe():  # type: ignore[no-untyped-def]
    return expert_layout(load_config("olmoe-1b-7b"))


def decode_s(layout, profile: str) -> float:  # type: ignore[no-untyped-def]
    """One emulated decode token with every expert resident, from the factory's compute model."""
    compute = compute_model(layout, CacheConfig(cache_frac=0.05, hardware=profile))
    token = PassInfo(sequences=1, tokens=1, attended=512, context=512, prefill=False)
    dense = sum(compute.dense_s(layer, token) for layer in range(layout.num_layers))
    experts = 16 * 8 * compute.expert_s(layout.expert_bytes["bf16"], 1)
    return dense + experts + compute.head_s(token)


def test_a_calibrated_profile_decodes_at_the_throughput_it_was_calibrated_to(olmoe) -> None:  # type: ignore[no-untyped-def]
    a100 = get_profile("a100")
    assert 1 / decode_roofline_s(olmoe, a100) == pytest.approx(798, rel=0.01)  # what the roofline alone allows
    slow = calibrate(a100, olmoe, 2.0, name="slow")
    assert slow.layer_overhead_us == pytest.approx((0.5 - decode_roofline_s(olmoe, a100)) / 16 * 1e6)
    with pytest.raises(ValueError, match="faster than a100's roofline allows"):
        calibrate(a100, olmoe, 5000.0)


def test_a100_paper_is_a100_calibrated_to_the_papers_olmoe_throughput(olmoe) -> None:  # type: ignore[no-untyped-def]
    paper = get_profile("a100-paper")
    again = calibrate(get_profile("a100"), olmoe, 1.69)
    assert paper.layer_overhead_us == pytest.approx(again.layer_overhead_us, abs=0.1)
    assert 1 / decode_s(olmoe, "a100-paper") == pytest.approx(1.69, rel=1e-4)
    assert 1 / decode_s(olmoe, "a100") == pytest.approx(798, rel=0.01)


def test_score_prefetch_is_capped_at_a_multiple_of_top_k() -> None:
    flat = RoutePrediction(layer=1, top_k=8, logits=[[0.0] * 64])  # 80% of a flat softmax is 52 experts
    assert len(ScorePrefetch().on_route(flat, START)) == 16
    assert len(ScorePrefetch(cap=1.0).on_route(flat, START)) == 8
    assert len(ScorePrefetch(cap=100).on_route(flat, START)) == 52
    with pytest.raises(ValueError, match="score cap must be a finite number in"):
        ScorePrefetch(cap=float("nan"))
