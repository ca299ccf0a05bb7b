"""The module that stands where a sparse block's experts were, and the per-layer expert job.

Shapes: T = tokens in the pass (batch x sequence, flattened), H = hidden size, K = experts per token,
E = experts in the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from specmd.quant.formats import ExpertFormat, Weights

if TYPE_CHECKING:
    from specmd.offload_models.runtime import OffloadRuntime


class ExpertJob:
    """One layer's expert computation, fed one expert at a time in whatever order the cache delivers.

    Outputs are kept per expert and summed in ascending expert order at the end, exactly as
    transformers' eager experts sum them, so the result is bit-identical whatever the arrival order.
    """

    def __init__(
        self,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, K]
        top_k_weights: torch.Tensor,  # [T, K]
        act_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.hidden_states = hidden_states
        self.top_k_index = top_k_index
        self.top_k_weights = top_k_weights
        self.act_fn = act_fn
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def compute(self, expert: int, weights: Weights, fmt: ExpertFormat) -> None:
        """Run `expert` on every token routed to it (pad tokens included, as eager does)."""
        # Rows ordered by top-k position, then token: the order eager's one_hot/where produces.
        top_k_pos, token_idx = torch.where(expert == self.top_k_index.T)  # [n], [n]
        out = fmt.forward(self.hidden_states[token_idx], weights, self.act_fn)  # [n, H]
        self._outputs[expert] = (token_idx, out * self.top_k_weights[token_idx, top_k_pos, None])

    def result(self) -> torch.Tensor:
        """The layer's expert output [T, H]."""
        final = torch.zeros_like(self.hidden_states)
        for expert in sorted(self._outputs):
            token_idx, out = self._outputs[expert]
            # Each row is added to once per expert, as index_add_ does (same rounding), but
            # index_put_ measured faster on CPU for the few-row adds of decoding.
            final.index_put_((token_idx,), out.to(final.dtype), accumulate=True)
        return final


class OffloadedExperts(nn.Module):
    """A sparse block's experts, held by specmd's cache instead of as parameters.

    It has no weights of its own: `forward` keeps the experts' (hidden, top_k_index, top_k_weights)
    contract and hands the work to the model's `OffloadRuntime`.
    """

    def __init__(self, layer_idx: int, num_experts: int, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.runtime: OffloadRuntime | None = None  # a plain attribute: the runtime is not a submodule

    def forward(
        self,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, K]
        top_k_weights: torch.Tensor,  # [T, K]
    ) -> torch.Tensor:
        if self.runtime is None:
            raise RuntimeError("this model's expert cache is closed; load the model again with from_pretrained")
        return self.runtime.run_experts(self, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, num_experts={self.num_experts}"
