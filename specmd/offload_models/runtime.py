"""What an offloaded model runs with: the pass scope around each forward, and each MoE layer's call.

Shapes: B = batch, S = new positions in this pass, T = B x S, H = hidden size, K = experts per token.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specmd.cache.clock import PassInfo
from specmd.cache.manager import CacheManager
from specmd.cache.prefetcher import Watchdog
from specmd.offload_models.experts import ExpertJob, OffloadedExperts
from specmd.sim.trace import TraceRecorder


def real_tokens(
    batch: int, new: int, attention_mask: torch.Tensor | None, past: int
) -> tuple[list[int], list[int], torch.Tensor | None]:
    """Per sequence, real (non-pad) tokens cached before the pass and new in it; and the [T] mask of
    real tokens (None: all are real)."""
    if attention_mask is None:
        return [past] * batch, [new] * batch, None
    mask = attention_mask.bool()  # [B, past + S] from generate, or [B, S]
    current = mask[:, -new:]  # [B, S]
    news = current.sum(dim=1).tolist()
    pasts = mask[:, :past].sum(dim=1).tolist() if mask.shape[1] == past + new else [past] * batch
    return pasts, news, None if all(n == new for n in news) else current.reshape(-1)


def router_logits(router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """A router's logits over its experts for [T, H] inputs, computed outside the router so that
    transformers' router-output recording never sees the call."""
    return F.linear(hidden_states, router.weight, getattr(router, "bias", None))  # [T, E]


class OffloadRuntime:
    """Drives one model's `CacheManager` from inside its forward passes (and feeds a trace recorder)."""

    def __init__(
        self, manager: CacheManager, watchdog: Watchdog, routers: Mapping[int, nn.Module], meta: Mapping[str, Any]
    ) -> None:
        self.manager = manager
        self.watchdog = watchdog
        self.meta = dict(meta)
        self.recorder: TraceRecorder | None = None
        self._routers = dict(routers)
        # Prefetch predicts the next MoE layer's routing with that layer's router.
        self._next_router = {layer: routers[nxt] for layer, nxt in pairwise(sorted(routers))}
        self._token_mask: torch.Tensor | None = None

    @contextmanager
    def forward_pass(self, batch: int, new: int, attention_mask: torch.Tensor | None, past: int) -> Iterator[None]:
        """Scope one model forward as one pass; a pass that raises releases its pins and records nothing."""
        pasts, news, token_mask = real_tokens(batch, new, attention_mask, past)
        info = PassInfo.for_sequences(pasts, news)
        self.manager.begin_pass(info)
        self._token_mask = token_mask
        if self.recorder is not None:
            rows = [(row, pasts[row] + j) for row in range(batch) for j in range(news[row])]
            self.recorder.begin_pass(rows, batch, info.prefill)
        try:
            yield
        except BaseException:
            self.manager.abort_pass()
            raise
        else:
            self.manager.end_pass()
            if self.recorder is not None:
                self.recorder.end_pass()
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
        layer, recorder = module.layer_idx, self.recorder
        predicted = None
        following = self._next_router.get(layer)
        if following is not None and (recorder is not None or self.manager.wants_predictions):
            real = hidden_states if mask is None else hidden_states[mask]  # [T_real, H]
            predicted = router_logits(following, real).tolist()  # [T_real, E]
        if recorder is not None:
            real = hidden_states if mask is None else hidden_states[mask]  # [T_real, H]
            weights = top_k_weights if mask is None else top_k_weights[mask]  # [T_real, K]
            own = router_logits(self._routers[layer], real).tolist()  # [T_real, E]
            recorder.layer(layer, routed.tolist(), weights.tolist(), own, predicted)
        job = ExpertJob(hidden_states, top_k_index, top_k_weights, module.act_fn)
        self.manager.run_layer(layer, requests, predicted if self.manager.wants_predictions else None, job)
        return job.result()

    def close(self) -> None:
        """Stop the watchdog thread (queued copies finish first)."""
        self.watchdog.stop()
