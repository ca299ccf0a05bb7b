"""What an offloaded model runs with: the pass scope around each forward, and each MoE layer's call.

Shapes: B = batch, S = new positions in this pass, T = B x S, H = hidden size, K = experts per token.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from specmd.cache.clock import PassInfo
from specmd.cache.manager import CacheManager
from specmd.cache.prefetcher import Watchdog
from specmd.offload_models.experts import ExpertJob, OffloadedExperts


def pass_info(
    batch: int, new: int, attention_mask: torch.Tensor | None, past: int
) -> tuple[PassInfo, torch.Tensor | None]:
    """The pass as the cache sees it, and the [T] mask of real (non-pad) tokens (None: all real)."""
    if attention_mask is None:
        return PassInfo.for_sequences([past] * batch, [new] * batch), None
    mask = attention_mask.bool()  # [B, past + S] from generate, or [B, S]
    current = mask[:, -new:]  # [B, S]
    news = current.sum(dim=1).tolist()
    pasts = mask[:, :past].sum(dim=1).tolist() if mask.shape[1] == past + new else [past] * batch
    token_mask = None if all(n == new for n in news) else current.reshape(-1)
    return PassInfo.for_sequences(pasts, news), token_mask


class OffloadRuntime:
    """Drives one model's `CacheManager` from inside its forward passes."""

    def __init__(self, manager: CacheManager, watchdog: Watchdog, routers: Mapping[int, nn.Module]) -> None:
        self.manager = manager
        self.watchdog = watchdog
        layers = sorted(routers)
        # Prefetch predicts the next MoE layer's routing with that layer's router.
        self._next_router = {layer: routers[nxt] for layer, nxt in pairwise(layers)}
        self._token_mask: torch.Tensor | None = None

    @contextmanager
    def forward_pass(self, batch: int, new: int, attention_mask: torch.Tensor | None, past: int) -> Iterator[None]:
        """Scope one model forward as one pass; a pass that raises releases its pins and records nothing."""
        info, token_mask = pass_info(batch, new, attention_mask, past)
        self.manager.begin_pass(info)
        self._token_mask = token_mask
        try:
            yield
        except BaseException:
            self.manager.abort_pass()
            raise
        else:
            self.manager.end_pass()
        finally:
            self._token_mask = None

    def run_experts(
        self,
        module: OffloadedExperts,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, K]
        top_k_weights: torch.Tensor,  # [T, K]
    ) -> torch.Tensor:
        """One MoE layer's experts through the cache; returns [T, H]."""
        mask = self._token_mask
        routed = top_k_index if mask is None else top_k_index[mask]  # [T_real, K]: pad tokens request nothing
        counts = torch.bincount(routed.reshape(-1), minlength=module.num_experts).tolist()  # [E]
        requests = {expert: n for expert, n in enumerate(counts) if n}
        predicted = None
        router = self._next_router.get(module.layer_idx)
        if router is not None and self.manager.wants_predictions:
            real = hidden_states if mask is None else hidden_states[mask]  # [T_real, H]
            predicted = F.linear(real, router.weight, getattr(router, "bias", None)).tolist()  # [T_real, E]
        job = ExpertJob(hidden_states, top_k_index, top_k_weights, module.act_fn)
        self.manager.run_layer(module.layer_idx, requests, predicted, job)
        return job.result()

    def close(self) -> None:
        """Stop the watchdog thread (queued copies finish first)."""
        self.watchdog.stop()
