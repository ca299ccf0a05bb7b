"""specmd.sim.routing_stats: definitions on a hand-worked routing, and the same numbers live and offloaded."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import OlmoeForCausalLM

from specmd import OffloadOLMoE
from specmd.sim.routing_stats import _layer_stats, routing_stats


def test_definitions_on_a_hand_worked_routing() -> None:
    # 4 experts, top-2, one sequence of 4 tokens (experts listed best first)
    chosen = [torch.tensor([[0, 1], [0, 2], [3, 2], [3, 2]])]
    # the previous layer's input through this layer's router, per token: scores over the 4 experts
    predicted = [torch.tensor([[9.0, 8, 0, 0], [9, 0, 0, 8], [0, 0, 9, 8], [0, 9, 8, 0]])]
    row = _layer_stats(5, chosen, predicted, num_experts=4)
    assert row.layer == 5
    assert row.top1_reuse == pytest.approx(2 / 3)  # (0,0) same, (0,3) not, (3,3) same
    assert row.any_reuse == pytest.approx((1 / 2 + 1 / 2 + 2 / 2) / 3)  # {0,1}->{0,2}->{3,2}->{3,2}
    assert row.prefetch_recall == pytest.approx((2 + 1 + 2 + 1) / 8)
    usage = torch.tensor([2, 1, 3, 2]) / 8  # assignments per expert
    assert row.entropy_bits == pytest.approx(-float((usage * usage.log2()).sum()))
    assert (row.max_entropy_bits, row.top1_reuse_uniform, row.any_reuse_uniform) == (2.0, 1 / 4, 2 / 4)
    assert _layer_stats(0, chosen, [], num_experts=4).prefetch_recall is None


def test_pairs_never_cross_sequences() -> None:
    chosen = [torch.tensor([[0, 1], [0, 1]]), torch.tensor([[2, 3], [0, 1]])]
    row = _layer_stats(0, chosen, [], num_experts=4)
    assert row.top1_reuse == 0.5 and row.any_reuse == 0.5  # 2 pairs: one identical, one disjoint


def test_live_and_offloaded_models_give_the_same_stats(checkpoint: Path, stock: OlmoeForCausalLM) -> None:
    torch.manual_seed(0)
    sequences = [torch.randint(3, 96, (40,)), torch.randint(3, 96, (25,))]
    live = routing_stats(stock, sequences)
    with OffloadOLMoE.from_pretrained(checkpoint, cache_frac=0.25, progress=False) as model:
        offloaded = routing_stats(model, sequences)
    assert live == offloaded
    assert (live.num_experts, live.top_k, live.sequences, live.tokens) == (16, 4, 2, 65)
    assert [row.layer for row in live.layers] == [0, 1, 2, 3]
    assert live.layers[0].prefetch_recall is None and all(0 <= r.prefetch_recall <= 1 for r in live.layers[1:])
    mean = live.to_dict()["mean"]
    assert mean["top1_reuse"] == pytest.approx(sum(r.top1_reuse for r in live.layers) / 4)
    assert math.isclose(live.layers[0].max_entropy_bits, 4.0)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in stock.modules())  # hooks removed
