"""The self-draft of speculative decoding: the model's own dense part with its experts at a low stored precision,
held in a cache of their own, and the expert lookahead its routing gives the target's cache. Torch-free: a live
model drives it from its draft passes, a replay from a trace's recorded draft routing (`specmd.sim.speculate`).

The draft runs the same forward passes as the model (same weights, same KV cache) except that each MoE layer
computes its experts from the draft's cache at the draft's precision. What it routes to at every MoE layer for
the tokens it drafts is what the target's verify pass will most likely route to at that layer for the same
positions (the routers are the model's own; only the expert outputs upstream differ a little), so after each
draft layer those experts are queued on the target's cache as prefetches for the verify pass: nearest layer
first, highest routing weight first.

"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from specmd.cache.manager import CacheManager, Payload
from specmd.cache.stats import CacheStats


class DraftPayload(Payload, Protocol):
    """A live model's payload for the draft's cache, which a recovery empties."""

    def reset(self) -> None:
        """Free every slot."""
        ...


class SelfDraft:
    """The draft's cache manager (its own capacity and arena, on the target's link and clock) and its lookahead.

    `lookahead` switches the expert lookahead on or off (on by default; off, the draft only proposes tokens).
    `payload` is a live model's (None in a replay, which moves no bytes).
    """

    def __init__(
        self, rebuild: Callable[[], CacheManager], payload: DraftPayload | None, moe_layers: Sequence[int]
    ) -> None:
        self._rebuild = rebuild
        self.payload = payload
        self.manager = rebuild()
        if payload is not None:
            self.manager.attach(payload)
        self.lookahead = True
        self._position = {layer: i for i, layer in enumerate(moe_layers)}
        self._buffer: dict[tuple[int, int], float] = {}  # (layer, expert) -> highest routing weight drafted
        self._since = 0.0  # the link carried queued prefetches up to here

    def recover(self) -> CacheManager:
        """A fresh empty draft cache (after a draft pass raised), keeping its counters and payload."""
        old = self.manager
        fresh = self._rebuild()
        fresh.stats = old.stats
        if self.payload is not None:
            self.payload.reset()
            fresh.attach(self.payload)
        self.manager = fresh
        return fresh

    def stats_of(self, target: CacheManager) -> CacheStats:
        """The target's counters with the draft's fast memory (its capacity and peak) beside them."""
        cache = self.manager.cache
        return replace(
            target.snapshot(),
            draft_capacity_bytes=cache.capacity_bytes,
            draft_peak_resident_bytes=cache.peak_resident_bytes,
        )

    def begin(self, target: CacheManager) -> None:
        """Drafting starts where the target's clock is, on the target's link (one host link for both)."""
        self.manager.link = target.link
        self.manager.advance_to(target.time)
        self._buffer.clear()
        self._since = target.time

    def observe(
        self,
        layer: int,
        experts: Sequence[int],
        weights: Sequence[float],
        target: CacheManager,
    ) -> None:
        """A draft layer's routing (every token's chosen experts and their weights, flattened alike) joins the
        lookahead buffer, which goes to `target` as prefetches for its next pass in priority order; the link
        carries them while the draft computes on."""
        if not self.lookahead:
            return
        buffer = self._buffer
        for expert, weight in zip(experts, weights, strict=True):
            key = (layer, expert)
            if weight > buffer.get(key, -1.0):
                buffer[key] = weight
        self._queue(target)

    def end(self, target: CacheManager) -> float:
        """Drafting is over: the link carried prefetches until the draft's clock, which the target's takes.
        Returns the emulated seconds the draft took."""
        if self.lookahead and self._buffer:
            self._queue(target)
        start = target.time
        target.advance_to(self.manager.time)
        return target.time - start

    def _queue(self, target: CacheManager) -> None:
        position, buffer = self._position, self._buffer
        picks = sorted(buffer, key=lambda key: (position[key[0]], -buffer[key], key[1]))
        now = self.manager.time
        target.lookahead(picks, self._since, now)
        self._since = now
