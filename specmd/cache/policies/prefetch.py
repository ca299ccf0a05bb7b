"""Prefetch policies: which experts of the next MoE layer to load while this one computes."""

from __future__ import annotations

import math
from collections.abc import Sequence

from mypy_extensions import mypyc_attr

from specmd.cache.keys import Tick
from specmd.cache.policies.base import Future, PrefetchPolicy, RoutePrediction, int_param, number_param
from specmd.cache.policies.spec import register_prefetch

MAX_MULTIPLE = 1e6
"""The most `overfetch` or `cap` (multiples of top-k) may be; beyond a layer's experts they all mean "every one"."""
MAX_DEPTH = 64
"""The most MoE layers ahead `lookahead` may look."""


@mypyc_attr(allow_interpreted_subclasses=True)
class NoPrefetch(PrefetchPolicy):
    """No prefetching: every expert is loaded on demand."""

    needs_logits = False

    def on_route(self, route: RoutePrediction, now: Tick) -> Sequence[int]:
        return ()


@mypyc_attr(allow_interpreted_subclasses=True)
class TopK(PrefetchPolicy):
    """Top-k: per token, the next layer's k highest predicted experts, k = the model's top-k x `overfetch`.

    The prediction is the next MoE layer's router applied to this layer's input. The union over the
    pass's tokens is returned, highest predicted logit first; ``ceil`` rounds a fractional k up.
    """

    def __init__(self, overfetch: object = 1.0) -> None:
        self.overfetch = number_param("topk", "overfetch", overfetch, 0, MAX_MULTIPLE, low_open=True)

    def on_route(self, route: RoutePrediction, now: Tick) -> Sequence[int]:
        best: dict[int, float] = {}
        for row in route.logits:
            k = min(len(row), math.ceil(route.top_k * self.overfetch))
            for expert in sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k]:
                if row[expert] > best.get(expert, -math.inf):
                    best[expert] = row[expert]
        return sorted(best, key=lambda e: (-best[e], e))


@mypyc_attr(allow_interpreted_subclasses=True)
class Oracle(PrefetchPolicy):
    """Oracle (replay only): prefetches exactly the experts the target layer will request, most tokens first.

    Perfect next-layer knowledge: the bound for any predictor of the next layer's routing.
    """

    needs_logits = False
    needs_future = True

    def __init__(self) -> None:
        self._requests: dict[tuple[int, int], dict[int, int]] | None = None

    def bind_future(self, future: Future) -> None:
        self._requests = future.requests

    def on_route(self, route: RoutePrediction, now: Tick) -> Sequence[int]:
        if self._requests is None:
            raise RuntimeError("oracle prefetch needs the future: it runs only in trace replay")
        wanted = self._requests.get((now.pass_idx + route.passes_ahead, route.layer), {})
        return sorted(wanted, key=lambda e: (-wanted[e], e))


def _softmax(row: Sequence[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [x / total for x in exps]


@mypyc_attr(allow_interpreted_subclasses=True)
class ScorePrefetch(PrefetchPolicy):
    """Score-based: per token, the next layer's experts that together hold the top `percentile`% of the
    predicted probability mass (softmax of the predicted logits), at most `cap` x top-k of them.

    The number per layer adapts: a confident prediction needs few experts, a flat one many, up to the
    cap (without it, a nearly flat router picks half a layer's experts and floods a small cache). Our
    reading of the paper's "above the 80th percentile of the predicted softmax" is this cumulative-mass
    rule (a percentile over a single softmax would always pick the same count). The union over the pass's
    tokens is returned, highest predicted probability first.
    """

    def __init__(self, percentile: object = 80.0, cap: object = 2.0) -> None:
        self.mass = number_param("score", "percentile", percentile, 0, 100, low_open=True) / 100.0
        self.cap = number_param("score", "cap", cap, 0, MAX_MULTIPLE, low_open=True)

    def on_route(self, route: RoutePrediction, now: Tick) -> Sequence[int]:
        best: dict[int, float] = {}
        limit = math.ceil(route.top_k * self.cap)
        for row in route.logits:
            probs = _softmax(row)
            covered = 0.0
            for expert in sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:limit]:
                if probs[expert] > best.get(expert, -1.0):
                    best[expert] = probs[expert]
                covered += probs[expert]
                if covered >= self.mass:
                    break
        return sorted(best, key=lambda e: (-best[e], e))


@mypyc_attr(allow_interpreted_subclasses=True)
class Lookahead(TopK):
    """Top-k prefetch for the next `depth` MoE layers at once, each predicted by its own router applied to
    this layer's input (later layers are predicted less accurately, and their transfers start earlier)."""

    def __init__(self, depth: object = 2, overfetch: object = 1.0) -> None:
        super().__init__(number_param("lookahead", "overfetch", overfetch, 0, MAX_MULTIPLE, low_open=True))
        self.depth = int_param("lookahead", "depth", depth, 1, MAX_DEPTH)


# Registered here rather than by class decorators: a decorated class could not be compiled as a native
# class (specmd/compiled.py).
register_prefetch("none")(NoPrefetch)
register_prefetch("topk")(TopK)
register_prefetch("oracle")(Oracle)
register_prefetch("score")(ScorePrefetch)
register_prefetch("lookahead")(Lookahead)
