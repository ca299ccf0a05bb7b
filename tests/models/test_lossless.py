"""The lossless path: logits and greedy tokens bit-identical to stock transformers (eager experts),
at every capacity, with every lossless policy, from every checkpoint layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import OlmoeForCausalLM

from specmd import OffloadOLMoE
from tests.conftest import EXPERT_BYTES

CAPACITIES = {
    "all": {"cache_frac": 1.0},
    "quarter": {"cache_frac": 0.25},
    "5pct": {"cache_frac": 0.05},
    "one-expert": {"cache_bytes": EXPERT_BYTES},
}
POLICIES = [
    "none/lru/fetch/standard",
    "topk/lru/fetch/standard",
    "none/least-stale/fetch/standard",
    "topk:overfetch=2/ls/fetch/standard",
]
PROMPT = torch.tensor([[5, 17, 33, 8, 91, 2, 40, 40, 12, 7, 66, 3]])
BATCH = torch.tensor([[0, 0, 0, 0, 14, 9, 27, 81], [11, 52, 3, 3, 70, 18, 6, 44]])  # left padding (pad id 0)
BATCH_MASK = (BATCH != 0).long()


def load(path: Path, **kwargs) -> OffloadOLMoE:  # type: ignore[no-untyped-def]
    return OffloadOLMoE.from_pretrained(path, progress=False, bandwidth_gbps=5.0, **kwargs)


def greedy(model, ids, mask=None):  # type: ignore[no-untyped-def]
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def reference(stock: OlmoeForCausalLM) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {
            "logits": stock(PROMPT).logits,
            "tokens": greedy(stock, PROMPT),
            "batch_logits": stock(BATCH, attention_mask=BATCH_MASK).logits,
            "batch_tokens": greedy(stock, BATCH, BATCH_MASK),
        }


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("capacity", CAPACITIES, ids=str)
def test_bit_identical_to_stock_eager(checkpoint: Path, reference, capacity: str, policy: str) -> None:  # type: ignore[no-untyped-def]
    with load(checkpoint, policy=policy, **CAPACITIES[capacity]) as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, reference["logits"])
        assert torch.equal(greedy(model, PROMPT), reference["tokens"])
        real = BATCH_MASK.bool()  # pad positions hold no prediction anyone reads
        assert torch.equal(model(BATCH, attention_mask=BATCH_MASK).logits[real], reference["batch_logits"][real])
        assert torch.equal(greedy(model, BATCH, BATCH_MASK), reference["batch_tokens"])
        assert model.cache_stats().requests > 0


@pytest.mark.parametrize("layout", ["legacy", "fused", "sharded"])
@pytest.mark.parametrize("capacity", ["all", "5pct"])
def test_every_checkpoint_layout(checkpoints: dict[str, Path], reference, layout: str, capacity: str) -> None:  # type: ignore[no-untyped-def]
    with load(checkpoints[layout], **CAPACITIES[capacity]) as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, reference["logits"])
        assert torch.equal(greedy(model, PROMPT), reference["tokens"])


def test_bf16_is_bit_identical_too(checkpoint: Path) -> None:
    stock = OlmoeForCausalLM.from_pretrained(checkpoint, experts_implementation="eager", dtype=torch.bfloat16)
    with load(checkpoint, cache_frac=0.05, dtype=torch.bfloat16) as model, torch.no_grad():
        assert model.expert_cache.sizes == {"bf16": EXPERT_BYTES // 2}
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
        assert torch.equal(greedy(model, PROMPT), greedy(stock, PROMPT))


def test_close_to_the_default_grouped_mm(checkpoint: Path) -> None:
    default = OlmoeForCausalLM.from_pretrained(checkpoint)  # experts_implementation="grouped_mm"
    with load(checkpoint, cache_frac=0.25) as model, torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, default(PROMPT).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(greedy(model, PROMPT), greedy(default, PROMPT))


def test_expert_weights_are_not_parameters_or_buffers(checkpoint: Path, stock: OlmoeForCausalLM) -> None:
    with load(checkpoint, cache_frac=0.25) as model:
        assert not [name for name in model.state_dict() if ".experts." in name]
        expert_params = 4 * 16 * 3 * 32 * 16
        stock_params = sum(p.numel() for p in stock.parameters())
        assert sum(p.numel() for p in model.parameters()) == stock_params - expert_params
        model.to(torch.float32)  # what lm_eval does: must leave the cache alone
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
