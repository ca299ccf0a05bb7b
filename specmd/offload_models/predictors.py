"""Route predictors: where predicted router logits for prefetching come from, chosen by name.

A predictor turns one MoE layer's input into predicted router logits for later targets, each a MoE
layer some passes ahead: (0, L) is layer L of the ongoing pass, (1, L) layer L of the next token's
pass. The cache's prefetch policy picks experts from them. `next-layer` (the default, the paper's)
applies each later layer's own router to this layer's input; `next-token` predicts the next token's
routing at this layer from this token's.

Shapes: T = real tokens of the pass, H = hidden size, E = experts per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from specmd.cache.manager import NEXT_LAYER, Target

PredictedLogits = tuple[Sequence[int], torch.Tensor]
"""(which real tokens predicted, their predicted logits [n, E])."""


def router_logits(router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """A router's logits over its experts for [T, H] inputs, computed outside the router so that
    transformers' router-output recording never sees the call."""
    return F.linear(hidden_states, router.weight, getattr(router, "bias", None))  # [T, E]


class RoutePredictor(Protocol):
    """Predicts later layers' routing from one MoE layer's input."""

    name: str

    def predict(
        self, layer: int, hidden_states: torch.Tensor, last_tokens: Sequence[int], wanted: Sequence[Target]
    ) -> dict[Target, PredictedLogits]:
        """Predictions from `layer`'s input [T, H]; `last_tokens` are each sequence's last real token (indices
        into T) and `wanted` the targets the prefetch policy asks for in this pass. A predictor may give fewer
        targets or others (later passes)."""
        ...


class NextLayerRouter:
    """Each wanted later MoE layer's own router applied to this layer's input, for every token (SpecMD's predictor)."""

    name = NEXT_LAYER

    def __init__(self, routers: Mapping[int, nn.Module]) -> None:
        self._routers = dict(routers)

    def predict(
        self, layer: int, hidden_states: torch.Tensor, last_tokens: Sequence[int], wanted: Sequence[Target]
    ) -> dict[Target, PredictedLogits]:
        tokens = range(hidden_states.shape[0])
        return {
            (ahead, target): (tokens, router_logits(self._routers[target], hidden_states))  # [T, E]
            for ahead, target in wanted
            if ahead == 0
        }


class NextTokenRouter:
    """The next token's routing at this layer, predicted as this layer's router on each sequence's last token.

    Consecutive tokens share many experts, so the next pass's layer L is prefetched from this pass's
    layer L, a whole pass ahead (the transfer has a pass's compute to hide behind, not a layer's).
    """

    name = "next-token"

    def __init__(self, routers: Mapping[int, nn.Module]) -> None:
        self._routers = dict(routers)

    def predict(
        self, layer: int, hidden_states: torch.Tensor, last_tokens: Sequence[int], wanted: Sequence[Target]
    ) -> dict[Target, PredictedLogits]:
        if not last_tokens:
            return {}
        last = hidden_states[list(last_tokens)]  # [B, H]
        return {(1, layer): (last_tokens, router_logits(self._routers[layer], last))}  # [B, E]


PREDICTORS: dict[str, type] = {cls.name: cls for cls in (NextLayerRouter, NextTokenRouter)}
DEFAULT_PREDICTOR = NextLayerRouter.name


def check_predictor(name: object) -> str:
    """`name` if a predictor is registered under it; anything else is a ValueError listing them."""
    if not isinstance(name, str) or name not in PREDICTORS:
        raise ValueError(f"unknown route predictor {name!r}; available: {', '.join(PREDICTORS)}")
    return name


def make_predictor(name: str, routers: Mapping[int, nn.Module]) -> RoutePredictor:
    """The predictor registered as `name`, over the model's MoE routers (layer -> router)."""
    return PREDICTORS[check_predictor(name)](routers)  # type: ignore[no-any-return]
