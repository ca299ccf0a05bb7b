"""Applying a routing policy live: re-select each token's experts from biased router logits.

Dual-logit semantics: logits raised by the policy's offsets choose the experts; the router's original
logits weigh them, with the same contract as the native router (float32 softmax, top-k, the model's
renormalisation and output dtype), so zero offsets reproduce the native router bit for bit.
Shapes: T = tokens, E = experts, K = experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig


@dataclass(frozen=True)
class SoftmaxTopK:
    """The softmax-then-top-k router contract (OLMoE, Qwen2-MoE, Mixtral).

    Attributes:
        renormalize: scale the top-k weights to sum to 1; None = as `config.norm_topk_prob` says.
        keep_fp32: return float32 weights (Mixtral) rather than casting them to the logits' dtype.
    """

    renormalize: bool | None = None
    keep_fp32: bool = False

    def select(
        self,
        config: PretrainedConfig,
        logits: torch.Tensor,  # [T, E]
        offsets: torch.Tensor,  # [E]
        top_k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, K], indices [T, K]) chosen by `logits + offsets`, weighted by `logits`."""
        probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)  # [T, E]
        biased = torch.nn.functional.softmax(logits + offsets, dtype=torch.float, dim=-1)  # [T, E]
        indices = torch.topk(biased, top_k, dim=-1).indices  # [T, K]
        weights = probs.gather(-1, indices)  # [T, K]
        renormalize = self.renormalize if self.renormalize is not None else getattr(config, "norm_topk_prob", False)
        if renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        return (weights if self.keep_fp32 else weights.to(logits.dtype)), indices


def logit_margin(logits: torch.Tensor, top_k: int) -> float:
    """Mean gap between each token's top-1 and top-k-th logit ([T, E] logits)."""
    top = torch.topk(logits.float(), top_k, dim=-1).values  # [T, K]
    return (top[:, 0] - top[:, -1]).mean().item()
