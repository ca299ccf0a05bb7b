"""Miss policies: what a request for a non-resident expert does (fetch, at which precision, drop, substitute)."""

from __future__ import annotations

from typing import ClassVar

from mypy_extensions import mypyc_attr

from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.layout import MAX_EXPERTS_PER_LAYER
from specmd.cache.policies.base import (
    Drop,
    Fetch,
    MissAction,
    MissContext,
    MissPolicy,
    Substitute,
    int_param,
    names_param,
    number_param,
    numbers_param,
)
from specmd.cache.policies.spec import register_miss


def _resident_copy(key: ExpertKey, context: MissContext) -> str | None:
    """The largest resident precision of `key`'s expert, if any copy is ready."""
    copies = [k.precision for k in context.resident if k.expert == key.expert]
    return max(copies, key=context.stored.__getitem__) if copies else None


@mypyc_attr(allow_interpreted_subclasses=True)
class FetchOnMiss(MissPolicy):
    """Fetch the requested expert at its requested precision and wait for it (lossless)."""

    def __init__(self) -> None:
        self._actions: dict[str, Fetch] = {}  # one immutable action per precision, built on first use

    def on_miss(self, key: ExpertKey, now: Tick, context: MissContext) -> MissAction:
        action = self._actions.get(key.precision)
        if action is None:
            action = self._actions[key.precision] = Fetch(key.precision)
        return action


@mypyc_attr(allow_interpreted_subclasses=True)
class FetchLowestBit(MissPolicy):
    """Use a resident copy of the expert at any precision if there is one, else fetch the smallest stored copy."""

    def on_miss(self, key: ExpertKey, now: Tick, context: MissContext) -> MissAction:
        resident = _resident_copy(key, context)
        return Fetch(resident or min(context.stored, key=context.stored.__getitem__))


@mypyc_attr(allow_interpreted_subclasses=True)
class FetchPriority(MissPolicy):
    """Important experts at full precision; the rest at a lower precision when the transfer would stall.

    An expert whose summed routing weight is at or above the `percentile` (default 60th) of the weights
    of this layer's requested experts is fetched at the requested precision. Any other miss that would
    stall (the link takes emulated time) uses the first of `fallback` (int8, then int4 = nf4, then int2 =
    hqq2) that is stored and smaller than the requested copy: a resident copy at that precision if there
    is one, else a transfer. With nothing to fall back to, it fetches the requested precision. A policy
    spec resolves `fallback`'s aliases; built directly, it takes the names the store uses.
    """

    needs_routing = True
    precision_params: ClassVar[tuple[str, ...]] = ("fallback",)

    def __init__(self, percentile: object = 60.0, fallback: object = ("int8", "nf4", "hqq2")) -> None:
        self.percentile = number_param("fetch-priority", "percentile", percentile, 0, 100)
        self.fallback = names_param("fetch-priority", "fallback", fallback)

    def _threshold(self, context: MissContext) -> float:
        weights = sorted(r.weight for r in context.routing.values())
        return weights[min(len(weights) - 1, int(len(weights) * self.percentile / 100))]

    def on_miss(self, key: ExpertKey, now: Tick, context: MissContext) -> MissAction:
        routed = context.routing[key.expert]
        full = context.stored[key.precision]
        if routed.weight >= self._threshold(context) or context.transfer_s(full) == 0.0:
            return Fetch(key.precision)
        for precision in self.fallback:
            if context.stored.get(precision, full) < full:
                return Fetch(precision)
        return Fetch(key.precision)


@mypyc_attr(allow_interpreted_subclasses=True)
class DropOnMiss(MissPolicy):
    """Skip a missing expert whose best rank in its tokens' top-k is `rank` or worse (1 = first choice;
    default 3); better-ranked experts are fetched. A dropped expert contributes nothing to its tokens."""

    needs_routing = True

    def __init__(self, rank: object = 3) -> None:
        self.rank = int_param("drop", "rank", rank, 2, MAX_EXPERTS_PER_LAYER)  # 1, the first choice, is always fetched

    def on_miss(self, key: ExpertKey, now: Tick, context: MissContext) -> MissAction:
        if context.routing[key.expert].rank + 1 >= self.rank:
            return Drop()
        return Fetch(key.precision)


@mypyc_attr(allow_interpreted_subclasses=True)
class SubstituteOnMiss(MissPolicy):
    """Run a missing expert's tokens through the resident expert of the same layer whose router
    probability is closest to its own, if within `tolerance` (absolute difference of mean probabilities
    over the layer's tokens); never for a token's first choice (best rank 1); otherwise fetch.

    Probabilities come from the layer's router logits: always known live; in replay only when the trace
    records logits (without them, every miss is fetched).
    """

    needs_routing = True
    needs_probs = True

    def __init__(self, tolerance: object = 0.1) -> None:
        self.tolerance = number_param("substitute", "tolerance", tolerance, 0)

    def on_miss(self, key: ExpertKey, now: Tick, context: MissContext) -> MissAction:
        probs = context.probs
        if probs is None or context.routing[key.expert].rank == 0:
            return Fetch(key.precision)
        target = probs[key.expert]
        best = min(
            (k for k in context.resident if k.expert != key.expert),
            key=lambda k: (abs(probs[k.expert] - target), -context.stored[k.precision], k.expert),
            default=None,
        )
        if best is None or abs(probs[best.expert] - target) > self.tolerance:
            return Fetch(key.precision)
        return Substitute(best.expert, best.precision)


@mypyc_attr(allow_interpreted_subclasses=True)
class Cascade(MissPolicy):
    """HOBBIT-style precision cascade: the expert's mean routing weight per token picks the precision.

    With stored precisions ordered from largest to smallest, a weight at or above `thresholds[0]`
    (default 0.2) gets the first, at or above `thresholds[1]` (default 0.1) the second, and so on;
    below every threshold, the smallest. A resident copy at the chosen precision is used as is.
    """

    needs_routing = True

    def __init__(self, thresholds: object = (0.2, 0.1)) -> None:
        values = numbers_param("cascade", "thresholds", thresholds, None)
        if list(values) != sorted(values, reverse=True):
            raise ValueError(f"cascade thresholds must be in decreasing order, got {thresholds!r}")
        self.thresholds = values

    def on_miss(self, key: ExpertKey, now: Tick, context: MissContext) -> MissAction:
        routed = context.routing[key.expert]
        weight = routed.weight / routed.tokens if routed.tokens else 0.0
        ladder = sorted(context.stored, key=context.stored.__getitem__, reverse=True)
        level = sum(weight < t for t in self.thresholds)
        return Fetch(ladder[min(level, len(ladder) - 1)])


# Registered here rather than by class decorators: a decorated class could not be compiled as a native
# class (specmd/compiled.py).
register_miss("fetch")(FetchOnMiss)
register_miss("fetch-lowest-bit")(FetchLowestBit)
register_miss("fetch-priority")(FetchPriority)
register_miss("drop")(DropOnMiss)
register_miss("substitute")(SubstituteOnMiss)
register_miss("cascade")(Cascade)
