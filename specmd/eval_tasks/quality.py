"""How much a precision costs in quality: weight error per expert, logits divergence, perplexity.

Shapes: B = batch, S = sequence length, V = vocabulary.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specmd.cache.live.store import ExpertWeights
from specmd.cache.stats import CacheStats
from specmd.offload_models.auto import AutoOffloadForCausalLM
from specmd.offload_models.checkpoint import ExpertCheckpoint, checkpoint_files, read_config
from specmd.offload_models.info import full_precision, load_config
from specmd.quant.formats import ExpertShape, get_format
from specmd.sim.reproduce import QualityPoint


def relative_error(precision: str, gate_up: torch.Tensor, down: torch.Tensor) -> float:
    """||W - Q(W)|| / ||W|| (Frobenius, both matrices together) of one expert stored at `precision`."""
    fmt = get_format(precision)
    shape = ExpertShape(hidden=gate_up.shape[1], intermediate=down.shape[1])
    restored = fmt.dequantize(fmt.unpack(fmt.pack(gate_up, down), shape))
    original = torch.cat([gate_up.float().reshape(-1), down.float().reshape(-1)])
    error = original - torch.cat([w.float().reshape(-1) for w in restored])
    return (error.norm() / original.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()


def expert_errors(
    experts: str | os.PathLike[str] | Iterable[ExpertWeights], precision: str
) -> dict[tuple[int, int], float]:
    """`relative_error` of every routed expert, keyed (layer, expert), from a checkpoint path or expert weights."""
    if isinstance(experts, str | os.PathLike):
        experts = checkpoint_experts(experts)
    return {(layer, expert): relative_error(precision, gate_up, down) for layer, expert, gate_up, down in experts}


def checkpoint_experts(path: str | os.PathLike[str]) -> Iterable[ExpertWeights]:
    """Every routed expert of the checkpoint at `path` (a directory or hub id), read one at a time."""
    config = read_config(path)
    arch = AutoOffloadForCausalLM.class_for(config.model_type).arch
    return ExpertCheckpoint(
        checkpoint_files(path),
        arch.checkpoint,
        arch.moe_layers(config),
        arch.num_experts(config),
        arch.expert_shape(config),
    )


@dataclass(frozen=True)
class LogitsAgreement:
    """A model's next-token distributions against a reference's, over the real (unmasked) positions.

    Attributes:
        kl: mean KL(reference || model) per position, in nats.
        kl_max: the largest per-position KL.
        top1: fraction of positions where both models' most likely next token is the same.
        positions: how many positions were compared.
    """

    kl: float
    kl_max: float
    top1: float
    positions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # [B, S, V]


def logits_agreement(
    model: Any, reference: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> LogitsAgreement:
    """Compare `model`'s logits on `input_ids` [B, S] with `reference`'s (e.g. the same model at full precision)."""
    logits = _logits(model, input_ids, attention_mask)  # [B, S, V]
    expected = _logits(reference, input_ids, attention_mask)  # [B, S, V]
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()  # [B, S]
    logp, logq = F.log_softmax(expected[real], dim=-1), F.log_softmax(logits[real], dim=-1)  # [N, V]
    kl = (logp.exp() * (logp - logq)).sum(dim=-1).clamp_min(0.0)  # [N]
    top1 = (expected[real].argmax(dim=-1) == logits[real].argmax(dim=-1)).float()  # [N]
    return LogitsAgreement(kl.mean().item(), kl.max().item(), top1.mean().item(), int(real.sum()))


def perplexity(
    model: Any, text_or_ids: str | torch.Tensor, tokenizer: Any = None, attention_mask: torch.Tensor | None = None
) -> float:
    """exp(mean next-token negative log-likelihood) of `model` on a text (with `tokenizer`) or token ids [B, S]."""
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise ValueError("perplexity of a text needs its tokenizer")
        encoded = tokenizer(text_or_ids, return_tensors="pt")
        input_ids, attention_mask = encoded["input_ids"], encoded.get("attention_mask")
    else:
        input_ids = text_or_ids
    input_ids = input_ids.to(model.device)
    attention_mask = None if attention_mask is None else attention_mask.to(model.device)
    if input_ids.shape[1] < 2:
        raise ValueError("perplexity needs at least two tokens")
    logits = _logits(model, input_ids, attention_mask)[:, :-1]  # [B, S-1, V]: predictions of tokens 1..S-1
    targets = input_ids[:, 1:]  # [B, S-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")  # [B(S-1)]
    if attention_mask is not None:
        keep = attention_mask[:, 1:].bool().reshape(-1) & attention_mask[:, :-1].bool().reshape(-1)
        nll = nll[keep]
    return math.exp(nll.mean().item())


@dataclass(frozen=True)
class PrecisionQuality:
    """A precision mix against full precision on the same inputs."""

    expert_precisions: tuple[str, ...]
    agreement: LogitsAgreement
    perplexity: float
    reference_perplexity: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def precision_quality(
    path: str | os.PathLike[str],
    expert_precisions: tuple[str, ...],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **load_kwargs: Any,
) -> PrecisionQuality:
    """Load the checkpoint at `path` with `expert_precisions` and at full precision; compare them on `input_ids`.

    `load_kwargs` go to both loads (`policy`, `dtype`, ...); the cache holds everything (`cache_frac=1.0`)
    unless they say otherwise, so what is compared is the precisions, not the cache.
    """
    load_kwargs = {"cache_frac": 1.0, "progress": False} | load_kwargs
    with (
        AutoOffloadForCausalLM.from_pretrained(path, expert_precisions=expert_precisions, **load_kwargs) as model,
        AutoOffloadForCausalLM.from_pretrained(path, **load_kwargs) as reference,
    ):
        return PrecisionQuality(
            expert_precisions=tuple(model.offload_options.expert_precisions),
            agreement=logits_agreement(model, reference, input_ids, attention_mask),
            perplexity=perplexity(model, input_ids, attention_mask=attention_mask),
            reference_perplexity=perplexity(reference, input_ids, attention_mask=attention_mask),
        )


NATIVE = "native"
"""In a run's precisions: the model's own dtype."""

MISS_PLANE: tuple[tuple[str, str, tuple[str, ...]], ...] = (  # (label, miss policy, stored precisions)
    ("fetch (lossless)", "fetch", (NATIVE,)),
    ("fetch-priority", "fetch-priority", (NATIVE, "int8", "int4", "int2")),
    ("cascade", "cascade", (NATIVE, "int8", "int4", "int2")),
    ("fetch-lowest-bit", "fetch-lowest-bit", (NATIVE, "int8", "int4", "int2")),
    ("drop (rank >= 3)", "drop", (NATIVE,)),
    ("substitute", "substitute", (NATIVE,)),
)


def miss_policy_plane(
    path: str | os.PathLike[str],
    input_ids: torch.Tensor,
    *,
    eviction: str = "least-stale",
    runs: Iterable[tuple[str, str, tuple[str, ...]]] = MISS_PLANE,
    **load_kwargs: Any,
) -> list[tuple[QualityPoint, CacheStats]]:
    """Each miss policy's held-out perplexity on `input_ids` [W, S] (W windows) against the emulated TTFT of a
    window (its prefill), no prefetch and `eviction`: the quality/speed plane of the paper's miss-handling study.

    A run stores its experts at its precisions (`NATIVE` is the model's own dtype); `load_kwargs` go to every
    load (`cache_frac`, `bandwidth_gbps`, `hardware`, `shape_from`, `dtype`, ...). Returns each run's point
    and its cache counters over all windows.
    """
    native = full_precision(load_config(path))
    points = []
    for label, miss, precisions in runs:
        stored = tuple(native if p == NATIVE else p for p in precisions)
        with AutoOffloadForCausalLM.from_pretrained(
            path, policy=f"none/{eviction}/{miss}/standard", expert_precisions=stored, **load_kwargs
        ) as model:
            ppl = sum(perplexity(model, window[None]) for window in input_ids) / len(input_ids)
            stats = model.cache_stats()
        points.append((QualityPoint(label, ppl, stats.ttft_s), stats))
    return points
