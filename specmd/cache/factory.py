"""The one way to build a cache: (expert layout, cache config) -> a `CacheManager`, for live runs and replay alike."""

from __future__ import annotations

from specmd.cache.clock import ComputeModel, RooflineCompute, WallClock, ZeroCompute, wall_clock
from specmd.cache.config import CacheConfig
from specmd.cache.engine import ExpertCache
from specmd.cache.layout import ExpertLayout
from specmd.cache.link import EmulatedLink
from specmd.cache.manager import CacheManager
from specmd.cache.policies.base import Future
from specmd.cache.policies.spec import KINDS, PolicyChoice
from specmd.cache.tiers import DiskPath


def compute_model(layout: ExpertLayout, config: CacheConfig) -> ComputeModel:
    """Emulated compute: the hardware profile's roofline (and per-layer overhead) over the layout's model shape;
    with no shape known, compute takes no time."""
    if layout.shape is None:
        return ZeroCompute()
    profile = config.profile
    return RooflineCompute(layout.shape, profile.peak_flops, profile.memory_bandwidth, profile.layer_overhead_s)


def build_manager(
    layout: ExpertLayout,
    config: CacheConfig,
    *,
    measured_compute: bool = False,
    future: Future | None = None,
    wall: WallClock = wall_clock,
) -> CacheManager:
    """A fresh cache, its policies and its manager for `layout` under `config`; every setting is checked here.

    `measured_compute` times compute on this machine (a live model, which then `attach`es its payload)
    instead of pricing it on the hardware profile; `future` is what a trace replay knows ahead (without
    it, the policies that need it are refused).
    """
    capacity = config.capacity_bytes(layout)
    policies = config.policy.build()
    for kind in KINDS:
        policy = getattr(policies, kind)
        if getattr(policy, "needs_future", False):
            if future is None:
                raise ValueError(
                    f"{getattr(config.policy, kind).name!r} knows the future and runs only in trace replay "
                    "(specmd.sim.replay); a live model needs an online policy"
                )
            policy.bind_future(future)
    policies.eviction.bind_layout(layout)
    cache = ExpertCache(capacity, policies.eviction, layout.expert_bytes, layout.catalog())
    compute = None if measured_compute else compute_model(layout, config)
    link = config.link()
    return CacheManager(cache, policies, link, compute, layout, path=disk_path(layout, config, link), wall=wall)


def disk_path(layout: ExpertLayout, config: CacheConfig, link: EmulatedLink) -> DiskPath | None:
    """With experts on disk, the disk link and the host-RAM tier (if `config` sizes one) feeding `link`; else None."""
    disk = config.disk_link()
    if disk is None:
        return None
    host_capacity = config.host_capacity_bytes(layout)
    if host_capacity is None:
        return DiskPath(link, disk, None)
    choice: PolicyChoice = config.host_eviction  # type: ignore[assignment]
    eviction = choice.build("eviction")
    eviction.bind_layout(layout)
    return DiskPath(link, disk, ExpertCache(host_capacity, eviction, layout.expert_bytes, layout.catalog()))
