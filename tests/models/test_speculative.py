"""Speculative decoding with the self-draft: output unchanged (greedy exactly, sampling in distribution),
K=0 is plain decoding, counters deterministic, bad settings refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare
from transformers import OlmoeForCausalLM

from specmd import OffloadOLMoE
from specmd.offload_models.speculative import accept_sampled
from tests.conftest import tiny_model

PROMPT = torch.tensor([[1, 5, 9, 13, 17, 3]])
POLICY = "score/least-stale/fetch/standard"
WALL = {"wall_ttft_s", "wall_tokens_per_s"}


def load(path: Path, **options: object) -> OffloadOLMoE:
    settings = {"cache_frac": 0.25, "bandwidth_gbps": 5.0, "policy": POLICY, "progress": False} | options
    return OffloadOLMoE.from_pretrained(path, **settings)


@pytest.fixture(scope="module")
def vocab8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model over 8 tokens: few enough outcomes to count."""
    path = tmp_path_factory.mktemp("vocab8")
    tiny_model(vocab_size=8, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2).save_pretrained(path)
    return path


@pytest.mark.parametrize("cache_frac", [0.1, 0.25, 1.0])
def test_greedy_output_is_plain_greedy_decoding(checkpoint: Path, cache_frac: float) -> None:
    with load(checkpoint, cache_frac=cache_frac) as plain_model:
        plain = plain_model.generate(input_ids=PROMPT, max_new_tokens=16, do_sample=False)
    drafted = 0
    for precision in ("int4", "int2"):
        with load(checkpoint, cache_frac=cache_frac, draft_frac=0.5, draft_precision=precision) as model:
            for k in (1, 3, "auto"):
                out = model.generate(input_ids=PROMPT, max_new_tokens=16, do_sample=False, speculative=k)
                assert torch.equal(out, plain), (precision, k)
            stats = model.cache_stats()
            drafted += stats.drafted_tokens
            assert stats.decode_tokens == 3 * 15
            assert stats.draft_peak_resident_bytes <= stats.draft_capacity_bytes
            assert stats.peak_resident_bytes <= stats.capacity_bytes
    assert drafted > 0


def test_greedy_rejections_are_exercised(checkpoint: Path) -> None:
    """The int2 draft of the tiny random model is wrong often enough that verification rejects drafts."""
    with load(checkpoint, draft_frac=1.0, draft_precision="int2") as model:
        model.generate(input_ids=PROMPT, max_new_tokens=24, do_sample=False, speculative=4)
        stats = model.cache_stats()
    assert 0 < stats.accepted_tokens < stats.drafted_tokens
    assert stats.acceptance_rate == stats.accepted_tokens / stats.drafted_tokens


def test_k0_is_plain_decoding_pass_for_pass(checkpoint: Path) -> None:
    with load(checkpoint) as model:
        model.generate(input_ids=PROMPT, max_new_tokens=12, do_sample=False)
        plain = model.cache_stats().to_dict()
    with load(checkpoint, draft_frac=0.5) as model:
        model.generate(input_ids=PROMPT, max_new_tokens=12, do_sample=False, speculative=0)
        spec = model.cache_stats().to_dict()
    assert spec.pop("speculate_k") == [0] * 11 and spec.pop("verify_passes") == 11
    assert spec.pop("tokens_per_verify") == 1.0
    assert spec.pop("draft_capacity_bytes") > 0
    for name in (*WALL, "speculate_k", "verify_passes", "tokens_per_verify", "draft_capacity_bytes"):
        plain.pop(name)
    for name in WALL:
        spec.pop(name)
    assert spec == plain


def test_counters_are_deterministic(checkpoint: Path) -> None:
    runs = []
    for _ in range(2):
        with load(checkpoint, draft_frac=0.5, draft_precision="int2") as model:
            model.generate(input_ids=PROMPT, max_new_tokens=20, do_sample=False, speculative="auto")
            stats = model.cache_stats().to_dict()
        runs.append({k: v for k, v in stats.items() if k not in WALL})
    assert runs[0] == runs[1]
    assert runs[0]["lookahead_prefetches_issued"] > 0
    assert runs[0]["lookahead_prefetches_used"] <= runs[0]["lookahead_prefetches_issued"]
    assert runs[0]["lookahead_prefetches_late"] <= runs[0]["lookahead_prefetches_used"]


def test_sampling_rule_gives_the_target_distribution() -> None:
    """Accept with min(1, p/q), resample from max(0, p - q): the first token out is distributed as p.
    Tolerance: a chi-square test at p-value 1e-3 over 10,000 seeded draws."""
    torch.manual_seed(0)
    p = torch.tensor([[0.05, 0.4, 0.1, 0.2, 0.25], [0.2] * 5])  # [K+1, V]
    q = torch.tensor([[0.3, 0.1, 0.3, 0.2, 0.1]])  # [K, V]
    counts = torch.zeros(5)
    draws = 10_000
    for draft in torch.multinomial(q[0], draws, replacement=True).tolist():
        kept, following = accept_sampled(p, q, [draft])
        counts[draft if kept else following] += 1
    assert chisquare(counts.numpy(), (p[0] * draws).numpy()).pvalue > 1e-3


def test_sampled_output_follows_the_model(vocab8: Path) -> None:
    """End to end: the second generated token (the first a verify pass decides) is distributed as the model's
    own sampling distributes it, computed exactly from stock transformers (given a first token that is not the
    stop token). Chi-square at p-value 1e-3, 200 runs."""
    stock = OlmoeForCausalLM.from_pretrained(vocab8, experts_implementation="eager").eval()
    prompt = torch.tensor([[1, 5, 3]])
    with torch.no_grad():
        first = torch.softmax(stock(prompt).logits[0, -1].float() / 2.0, dim=-1)  # [V]
        extended = [torch.cat([prompt, torch.tensor([[t]])], 1) for t in range(8)]
        following = torch.stack([torch.softmax(stock(ids).logits[0, -1] / 2.0, -1) for ids in extended])  # [V, V]
    first[2] = 0.0  # token 2 is the stop token: a text that starts with it has no second token
    expected = first @ following  # [V]
    torch.manual_seed(1)
    counts = torch.zeros(8, dtype=torch.float64)
    runs = 200
    with load(vocab8, cache_frac=1.0, draft_frac=1.0, draft_precision="int2") as model:
        for _ in range(runs):
            out = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=True, temperature=2.0, top_k=0,
                                 speculative=1)  # fmt: skip
            if out.shape[1] > 4:
                counts[out[0, 4]] += 1
        stats = model.cache_stats()
    assert 0 < stats.accepted_tokens < stats.drafted_tokens  # both branches of the rule ran
    assert chisquare(counts.numpy(), (expected.double() / expected.double().sum() * counts.sum()).numpy()).pvalue > 1e-3


@pytest.mark.parametrize(
    ("speculative", "message"),
    [("fast", "speculative must be"), (-1, "speculative must be"), (True, "speculative must be"),
     ("auto:0", "K_max >= 1")],
)  # fmt: skip
def test_bad_speculative_is_refused(checkpoint: Path, speculative: object, message: str) -> None:
    with load(checkpoint, draft_frac=0.5) as model, pytest.raises(ValueError, match=message):
        model.generate(input_ids=PROMPT, max_new_tokens=4, speculative=speculative)


def test_speculation_needs_a_draft_and_one_unpadded_sequence(checkpoint: Path) -> None:
    with load(checkpoint) as model, pytest.raises(ValueError, match="needs a self-draft"):
        model.generate(input_ids=PROMPT, max_new_tokens=4, speculative=2)
    with load(checkpoint, draft_frac=0.5) as model:
        with pytest.raises(ValueError, match="one sequence at a time"):
            model.generate(input_ids=PROMPT.repeat(2, 1), max_new_tokens=4, speculative=2)
        with pytest.raises(ValueError, match="does not take num_beams"):
            model.generate(input_ids=PROMPT, max_new_tokens=4, speculative=2, num_beams=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"draft_frac": 0.0}, "draft_frac must be"), ({"draft_frac": 0.5, "draft_bytes": 100}, "at most one"),
     ({"draft_bytes": 10}, "less than one nf4 expert"), ({"draft_frac": 0.5, "draft_precision": "int3"}, "unknown")],
)  # fmt: skip
def test_bad_draft_settings_are_refused(checkpoint: Path, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load(checkpoint, **options)
