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
from transformers import PretrainedConfig

from specmd.cache.clock import PassInfo
from specmd.cache.keys import Tick
from specmd.cache.manager import CacheManager
from specmd.cache.policies.base import Routed
from specmd.cache.prefetcher import Watchdog
from specmd.offload_models.experts import ExpertJob, OffloadedExperts
from specmd.offload_models.routing import SoftmaxTopK, logit_margin
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


def summarize_routing(
    routed: torch.Tensor, weights: torch.Tensor, num_experts: int, requests: Mapping[int, int]
) -> dict[int, Routed]:
    """Per requested expert: tokens, summed routing weight and best top-k rank, from [T, K] choices."""
    flat = routed.reshape(-1)  # [T*K]
    k = routed.shape[1]
    weight = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, flat, weights.reshape(-1).double())  # [E]
    ranks = torch.arange(k).repeat(routed.shape[0])  # [T*K]: each choice's position in its token's top-k
    best = torch.full((num_experts,), k).scatter_reduce_(0, flat, ranks, "amin")  # [E]
    weight_list, best_list = weight.tolist(), best.tolist()
    return {e: Routed(n, weight_list[e], best_list[e]) for e, n in requests.items()}


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
        # Prefetch predicts a later MoE layer's routing with that layer's router on this layer's input.
        self._next_layer = dict(pairwise(sorted(routers)))
        self._next_router = {layer: routers[nxt] for layer, nxt in self._next_layer.items()}
        self._token_mask: torch.Tensor | None = None
        self._hooks: list[Any] = []

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
        manager, recorder, layer = self.manager, self.recorder, module.layer_idx
        mask = self._token_mask
        routed = top_k_index if mask is None else top_k_index[mask]  # [T_real, K]: pad tokens request nothing
        weights = top_k_weights if mask is None else top_k_weights[mask]  # [T_real, K]
        real = hidden_states if mask is None else hidden_states[mask]  # [T_real, H]
        counts = torch.bincount(routed.reshape(-1), minlength=module.num_experts).tolist()  # [E]
        requests = {expert: n for expert, n in enumerate(counts) if n}

        ahead = list(manager.prediction_layers(layer))
        following = self._next_router.get(layer)
        if recorder is not None and following is not None and not ahead:
            ahead = [self._next_layer[layer]]
        predicted = {target: router_logits(self._routers[target], real).tolist() for target in ahead}  # [T_real, E]
        own = None
        if recorder is not None or manager.wants_probs:
            own = router_logits(self._routers[layer], real)  # [T_real, E]
        if recorder is not None:
            nxt = predicted.get(self._next_layer.get(layer, -1))
            recorder.layer(layer, routed.tolist(), weights.tolist(), own.tolist(), nxt)  # type: ignore[union-attr]
        routing = summarize_routing(routed, weights, module.num_experts, requests) if manager.wants_routing else None
        probs = None
        if manager.wants_probs:
            probs = dict(enumerate(torch.softmax(own.float(), dim=-1).mean(dim=0).tolist()))  # type: ignore[union-attr]

        job = ExpertJob(hidden_states, top_k_index, top_k_weights, module.act_fn)
        wanted = predicted if manager.prediction_layers(layer) else None
        manager.run_layer(layer, requests, wanted, job, routing, probs)
        return job.result()

    def steer_routing(self, contract: SoftmaxTopK, config: PretrainedConfig, top_k: int) -> None:
        """Let the routing policy re-select each MoE layer's experts (a forward hook on every router)."""
        manager = self.manager
        policy = manager.policies.routing

        def steer(layer: int, output: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            logits = output[0]  # [T, E]
            real = logits if self._token_mask is None else logits[self._token_mask]  # [T_real, E]
            margin = logit_margin(real, top_k) if real.shape[0] else 0.0
            resident = sorted({key.expert for key in manager.cache.ready_in_layer(layer, manager.time)})
            now = Tick(manager.step, manager.pass_idx, layer, manager.time)
            offsets = policy.bias(layer, resident, margin, now)
            if offsets is None:
                return output
            bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)  # [E]
            for expert, offset in offsets.items():
                bias[expert] = offset
            weights, indices = contract.select(config, logits, bias, top_k)  # [T, K], [T, K]
            return (logits, weights, indices)

        for layer, router in self._routers.items():
            self._hooks.append(router.register_forward_hook(lambda _m, _a, out, layer=layer: steer(layer, out)))

    def close(self) -> None:
        """Stop the watchdog thread (queued copies finish first) and remove routing hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.watchdog.stop()
