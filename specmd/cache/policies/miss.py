"""Miss policies: what a request for a non-resident expert does."""

from __future__ import annotations

from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.policies.base import Fetch, MissAction, MissPolicy
from specmd.cache.policies.spec import register_miss


@register_miss("fetch")
class FetchOnMiss(MissPolicy):
    """Fetch the requested expert at its requested precision and wait for it (lossless)."""

    def on_miss(self, key: ExpertKey, now: Tick) -> MissAction:
        return Fetch(key.precision)
