"""Routing policies: whether the router may lean toward experts that are already resident."""

from __future__ import annotations

from specmd.cache.policies.base import RoutingPolicy
from specmd.cache.policies.spec import register_routing


@register_routing("standard", "stnd")
class StandardRouting(RoutingPolicy):
    """The model's native router, untouched."""

    neutral = True
