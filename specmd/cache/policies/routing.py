"""Routing policies: whether the router may lean toward experts that are already resident."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from specmd.cache.keys import Tick
from specmd.cache.policies.base import RoutingPolicy, number_param
from specmd.cache.policies.spec import register_routing

MAX_LAM = 1e6
"""The most `lam` may be: far past the point (about 1) where a resident expert always wins."""


@register_routing("standard", "stnd")
class StandardRouting(RoutingPolicy):
    """The model's native router, untouched."""

    neutral = True

    def bias(self, layer: int, resident: Sequence[int], margin: float, now: Tick) -> Mapping[int, float] | None:
        return None


@register_routing("cache-aware", "mod")
class CacheAwareRouting(RoutingPolicy):
    """Cache-aware routing (Skliar et al., Mixture of Cache-Conditional Experts): z' = z + lam * D * 1_C.

    Resident experts' logits are raised by `lam` times D, the running average (over this layer's passes)
    of the gap between a token's top-1 and top-k-th logits, so `lam` = 1 lets a resident expert overcome
    a typical routing margin. The raised logits choose the experts; the original logits weigh them.
    """

    def __init__(self, lam: object = 0.3) -> None:
        self.lam = number_param("cache-aware", "lam", lam, 0, MAX_LAM)
        self._margins: dict[int, tuple[float, int]] = {}  # layer -> (sum of margins, passes)

    def bias(self, layer: int, resident: Sequence[int], margin: float, now: Tick) -> Mapping[int, float] | None:
        total, count = self._margins.get(layer, (0.0, 0))
        total, count = total + margin, count + 1
        self._margins[layer] = (total, count)
        boost = self.lam * total / count
        return {expert: boost for expert in resident}
