"""Helpers to drive the cache manager without a model, as trace replay does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from specmd.cache.clock import PassInfo
from specmd.cache.engine import ExpertCache
from specmd.cache.keys import ExpertKey
from specmd.cache.layout import ExpertLayout
from specmd.cache.link import EmulatedLink
from specmd.cache.manager import CacheManager
from specmd.cache.policies.spec import PolicySpec
from specmd.cache.tiers import DiskPath

PRECISION = "fp32"


@dataclass(frozen=True)
class FixedCompute:
    """Compute times that make hand-worked timelines easy to follow."""

    dense: float = 0.0
    expert: float = 0.5e-6
    head: float = 0.0

    def dense_s(self, layer: int, step: PassInfo) -> float:
        return self.dense

    def expert_s(self, nbytes: int, tokens: int) -> float:
        return self.expert

    def head_s(self, step: PassInfo) -> float:
        return self.head


class CheckedListener:
    """Asserts the capacity bound each time an expert enters the cache."""

    def __init__(self) -> None:
        self.cache: ExpertCache | None = None
        self.loads = 0

    def on_load(self, key: ExpertKey) -> None:
        assert self.cache is not None
        assert self.cache.resident_bytes <= self.cache.capacity_bytes
        self.loads += 1

    def on_evict(self, key: ExpertKey) -> None:
        assert self.cache is not None
        entry = self.cache.get(key)
        assert entry is not None and not entry.pins, f"evicting {key}, which is pinned"
        assert entry.ready_at <= self.cache.last_tick.time_s, f"evicting {key} while it is in flight"


def make_manager(
    policy: str = "none/lru/fetch/standard",
    *,
    capacity_experts: float = 2,
    expert_bytes: int = 1000,
    layers: Sequence[int] = (0, 1),
    num_experts: int = 8,
    top_k: int = 2,
    bandwidth_gbps: float | None = 1.0,
    compute: FixedCompute | None = None,
    disk_gbps: float | None = None,
    host_capacity_experts: float | None = None,
    host_eviction: str = "lru",
) -> CacheManager:
    """A manager over `layers` with 1 us per 1000-byte transfer at the default bandwidth; with `disk_gbps`, experts
    are read from a disk of that bandwidth, through a host tier of `host_capacity_experts` experts when given."""
    spec = PolicySpec.parse(policy)
    policies = spec.build()
    layout = ExpertLayout(
        num_layers=max(layers) + 1,
        moe_layers=tuple(layers),
        experts_per_layer=num_experts,
        top_k=top_k,
        precision=PRECISION,
        expert_bytes={PRECISION: expert_bytes},
        full_precision=PRECISION,
        full_expert_bytes=expert_bytes,
    )
    policies.eviction.bind_layout(layout)
    listener = CheckedListener()
    cache = ExpertCache(
        int(capacity_experts * expert_bytes), policies.eviction, layout.expert_bytes, layout.catalog(), listener
    )
    listener.cache = cache
    link = EmulatedLink(bandwidth_gbps)
    path = None
    if disk_gbps is not None:
        host = None
        if host_capacity_experts is not None:
            host_policy = PolicySpec.parse(f"none/{host_eviction}/fetch/standard").build().eviction
            host_policy.bind_layout(layout)
            host_listener = CheckedListener()
            host = ExpertCache(
                int(host_capacity_experts * expert_bytes), host_policy, layout.expert_bytes, layout.catalog(),
                host_listener,
            )  # fmt: skip
            host_listener.cache = host
        path = DiskPath(link, EmulatedLink(disk_gbps), host)
    return CacheManager(cache, policies, link, compute or FixedCompute(), layout, path=path)


PREFILL = PassInfo(sequences=1, tokens=1, attended=1, context=1, prefill=True)
DECODE = PassInfo(sequences=1, tokens=1, attended=2, context=2, prefill=False)


def run_pass(manager: CacheManager, layers: dict[int, dict[int, int]], predicted=None, info=DECODE) -> None:  # type: ignore[no-untyped-def]
    """One forward pass: `layers` maps each MoE layer to its requests (expert -> tokens)."""
    manager.begin_pass(info)
    for layer, requests in layers.items():
        rows = None if predicted is None else predicted.get(layer)  # the next MoE layer's predicted logits
        ahead = manager.prediction_targets(layer)
        manager.run_layer(layer, requests, {ahead[0]: rows} if rows is not None and ahead else None)
    manager.end_pass()
