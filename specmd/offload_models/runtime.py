"""What an offloaded model runs with: the pass scope around each forward, and each MoE layer's call.

Shapes: B = batch, S = new positions in this pass, T = B x S, H = hidden size, K = experts per token,
E = experts per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from itertools import accumulate, pairwise
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from specmd.cache.clock import PassInfo
from specmd.cache.draft import SelfDraft
from specmd.cache.keys import Tick
from specmd.cache.live.store import ExpertStore
from specmd.cache.live.watchdog import Watchdog
from specmd.cache.manager import CacheManager
from specmd.cache.policies.base import Routed
from specmd.offload_models.experts import ExpertJob, OffloadedExperts
from specmd.offload_models.observer import RoutingObserver
from specmd.offload_models.predictors import NextLayerRouter, PredictedLogits, RoutePredictor, router_logits
from specmd.offload_models.routing import SoftmaxTopK, logit_margin


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


RECOVERED = (
    "specmd abandoned this forward pass and emptied the expert cache: the model can run again, as if just loaded "
    "(its counters so far are kept); if the same error comes back, its cause is still there"
)


class OffloadRuntime:
    """Drives one model's `CacheManager` from inside its forward passes (and tells routing observers).

    A pass that raises (an error or an interrupt, anywhere in it) leaves the model as freshly loaded: the cache
    is rebuilt empty with `rebuild` before the next pass, at the latest, so a later run gives exactly a fresh
    model's output and counters from there.
    """

    def __init__(
        self,
        manager: CacheManager,
        watchdog: Watchdog,
        routers: Mapping[int, nn.Module],
        meta: Mapping[str, Any],
        predictor: RoutePredictor,
        rebuild: Callable[[], CacheManager],
        draft: SelfDraft | None = None,
    ) -> None:
        self.manager = manager
        self.draft = draft
        self._target: CacheManager | None = None  # while the draft runs: the target's manager (self.manager's draft's)
        self.governors: dict[int | str, Any] = {}  # speculative setting -> its governor (they learn as they run)
        self.watchdog = watchdog
        self.meta = dict(meta)
        self.predictor = predictor
        self.observers: list[RoutingObserver] = []
        self._watching: list[RoutingObserver] = []  # during a pass: the observers it tells (`_observers_of_pass`)
        self._routers = dict(routers)
        self._following = dict(pairwise(sorted(routers)))  # MoE layer -> the next MoE layer
        self._next_layer = predictor if isinstance(predictor, NextLayerRouter) else NextLayerRouter(routers)
        self._token_mask: torch.Tensor | None = None
        self._last_tokens: list[int] = []
        self._hooks: list[Any] = []
        self._rebuild = rebuild
        self._dirty = False  # a pass began and did not end: rebuild the cache before the next

    @contextmanager
    def forward_pass(self, batch: int, new: int, attention_mask: torch.Tensor | None, past: int) -> Iterator[None]:
        """Scope one model forward as one pass; a pass that raises empties the cache and tells no observer it ended."""
        if self._dirty:
            self._recover()  # the last pass raised, and its recovery was itself interrupted
        pasts, news, token_mask = real_tokens(batch, new, attention_mask, past)
        info = PassInfo.for_sequences(pasts, news)
        self._dirty = True
        self.manager.begin_pass(info)
        self._token_mask = token_mask
        self._last_tokens = [end - 1 for end, n in zip(accumulate(news), news, strict=True) if n]
        watching = self._watching = self._observers_of_pass()
        try:
            if watching:
                rows = [(row, pasts[row] + j) for row in range(batch) for j in range(news[row])]
                for observer in watching:
                    if self._target is None:
                        observer.begin_pass(rows, batch, info.prefill)
                    else:
                        observer.begin_draft_pass(rows)  # type: ignore[attr-defined]
            yield
        except BaseException as exc:
            exc.add_note(RECOVERED)
            self._recover()
            raise
        else:
            self.manager.end_pass()
            for observer in watching:
                observer.end_pass()
            self._dirty = False
        finally:
            self._token_mask = None
            self._watching = []

    def _observers_of_pass(self) -> list[RoutingObserver]:
        """The observers of this pass: all of them, or in a draft pass those that see drafts (`begin_draft_pass`)."""
        if self._target is None:
            return self.observers
        return [observer for observer in self.observers if hasattr(observer, "begin_draft_pass")]

    def _recover(self) -> None:
        """Rebuild the cache empty with fresh policies, keeping the counters and the payload (its slots freed);
        a draft pass that raised rebuilds the draft's cache alone."""
        if self._target is not None and self.draft is not None:
            self.manager = self.draft.recover()
            self._dirty = False
            return
        old = self.manager
        payload, host = old.payload, old.host_payload
        if payload is not None:
            payload.reset()
        if host is not None:
            host.reset()  # type: ignore[attr-defined]  (a HostTier; after the fast tier, whose copies read it)
        fresh = self._rebuild()
        fresh.stats = old.stats
        if payload is not None:
            fresh.attach(payload, host)
        self.manager = fresh
        self._dirty = False

    def run_experts(
        self,
        module: OffloadedExperts,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, K]
        top_k_weights: torch.Tensor,  # [T, K]
    ) -> torch.Tensor:
        """One MoE layer's experts through the cache; returns [T, H]."""
        manager, layer = self.manager, module.layer_idx
        mask = self._token_mask
        routed = top_k_index if mask is None else top_k_index[mask]  # [T_real, K]: pad tokens request nothing
        weights = top_k_weights if mask is None else top_k_weights[mask]  # [T_real, K]
        real = hidden_states if mask is None else hidden_states[mask]  # [T_real, H]
        counts = torch.bincount(routed.reshape(-1), minlength=module.num_experts).tolist()  # [E]
        requests = {expert: n for expert, n in enumerate(counts) if n}

        target = self._target
        observing, default = bool(self._watching), self.predictor is self._next_layer
        found = None
        if manager.wants_predictions or (observing and not default):
            found = self.predictor.predict(layer, real, self._last_tokens, manager.prediction_targets(layer))
        predicted = None
        if manager.wants_predictions:
            predicted = {target: logits.tolist() for target, (_, logits) in found.items()}  # type: ignore[union-attr]
        own = router_logits(self._routers[layer], real) if observing or manager.wants_probs else None  # [T_real, E]
        if observing:
            self._observe(layer, real, routed, weights, own, found)  # type: ignore[arg-type]
        routing = summarize_routing(routed, weights, module.num_experts, requests) if manager.wants_routing else None
        probs = None
        if manager.wants_probs:
            probs = dict(enumerate(torch.softmax(own.float(), dim=-1).mean(dim=0).tolist()))  # type: ignore[union-attr]

        job = ExpertJob(hidden_states, top_k_index, top_k_weights, module.act_fn)
        manager.run_layer(layer, requests, predicted, job, routing, probs)
        draft = self.draft
        if target is not None and draft is not None:  # a draft pass: its routing predicts the verify pass's experts
            draft.observe(layer, routed.reshape(-1).tolist(), weights.reshape(-1).tolist(), target)
        return job.result()

    @contextmanager
    def drafting(self) -> Iterator[SelfDraft]:
        """Passes inside run the self-draft; on leaving, its emulated time counts as decode time of the target."""
        draft = self.draft
        if draft is None:
            raise RuntimeError(
                "speculative decoding needs a self-draft: load the model with draft_frac=... or draft_bytes=..."
            )
        if self._target is not None:
            raise RuntimeError("the draft is already running")
        target = self.manager
        draft.begin(target)
        wall = target.wall()
        self._target, self.manager = target, draft.manager
        try:
            yield draft
        finally:
            self.manager, self._target = target, None
            target.stats.record_draft(draft.end(target), target.wall() - wall)

    def _observe(
        self,
        layer: int,
        real: torch.Tensor,  # [T_real, H]
        routed: torch.Tensor,  # [T_real, K]
        weights: torch.Tensor,  # [T_real, K]
        own: torch.Tensor,  # [T_real, E]
        found: Mapping[tuple[int, int], PredictedLogits] | None,
    ) -> None:
        """Tell every observer this layer's routing, the next MoE layer's router on its input, and what a
        predictor other than that one predicted."""
        default = self.predictor is self._next_layer
        following = self._following.get(layer)
        next_logits = None
        if following is not None:
            target = (0, following)
            if not (default and found and target in found):
                found_next = self._next_layer.predict(layer, real, self._last_tokens, [target])
                next_logits = found_next[target][1].tolist()  # [T_real, E]
            else:
                next_logits = found[target][1].tolist()
        extra = None
        if not default and found is not None:
            extra = {target: (list(tokens), logits.tolist()) for target, (tokens, logits) in found.items()}
        experts, chosen, logits = routed.tolist(), weights.tolist(), own.tolist()
        for observer in self._watching:
            observer.layer(layer, experts, chosen, logits, next_logits, extra)

    def steer_routing(self, contract: SoftmaxTopK, config: PretrainedConfig, top_k: int) -> None:
        """Let the routing policy re-select each MoE layer's experts (a forward hook on every router)."""

        def steer(layer: int, output: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            manager = self.manager  # read at each call: a recovery replaces it
            policy = manager.policies.routing
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
        """Stop the watchdog thread (queued copies finish first), close the storage tier and remove routing hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        shutdown(self.watchdog, getattr(self.manager.payload, "store", None))


def shutdown(watchdog: Watchdog, store: ExpertStore | None) -> None:
    """Stop `watchdog`, then close `store`: unless a copy still runs on (a daemon thread reading from it)."""
    if watchdog.stop() and store is not None:
        store.close()
