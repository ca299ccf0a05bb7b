"""Replay a routing trace through the cache engine: no model, no tensors, no torch.

The same `CacheManager`, engine and policy objects as a live run are driven from the trace's passes,
so a routing-neutral lossless policy reproduces the live run's counters exactly (for a batch-1
recording, with the same cache size, link and hardware profile).
"""

from __future__ import annotations

import os
from typing import Any

from specmd.cache.config import CacheConfig
from specmd.cache.factory import build_manager
from specmd.cache.hardware import DEFAULT_HARDWARE
from specmd.cache.layout import ExpertLayout
from specmd.cache.manager import NEXT_LAYER, CacheManager
from specmd.cache.policies.base import Future
from specmd.cache.policies.spec import KINDS, Policies
from specmd.cache.stats import CacheStats
from specmd.sim.speculate import check_speculative_replay, run_speculative
from specmd.sim.trace import Trace, TraceError, load_trace


def future_of(trace: Trace, predictor: str = NEXT_LAYER) -> Future:
    """Every request's logical step, numbered as the manager numbers them (one step per MoE layer call)."""
    uses: dict[tuple[int, int], list[int]] = {}
    requests: dict[tuple[int, int], dict[int, int]] = {}
    step = 0
    for pass_idx, replay_pass in enumerate(trace.passes(predictor), start=1):
        for layer_step in replay_pass.layers:
            step += 1
            requests[(pass_idx, layer_step.layer)] = layer_step.requests
            for expert in layer_step.requests:
                uses.setdefault((layer_step.layer, expert), []).append(step)
    return Future(uses, requests)


def replay_predictor(trace: Trace, config: CacheConfig) -> str:
    """The predictor whose predictions a replay of `trace` uses: the config's, else the one the trace was
    recorded with; it must be the next-layer router (every trace records it) or the trace's own."""
    predictor = config.predictor or trace.predictor
    if predictor not in (NEXT_LAYER, trace.predictor):
        raise TraceError(
            f"{trace.source} records predictions of {NEXT_LAYER!r} and {trace.predictor!r}, not of {predictor!r}"
        )
    return predictor


def check_replay(
    trace: Trace, config: CacheConfig, price_as: ExpertLayout | None = None
) -> tuple[ExpertLayout, str, Policies]:
    """Refuse a replay of `trace` under `config` that cannot run, before it starts: a cache under one expert, a
    mix that changes routing or looks further ahead than the trace records (those run live only). The layout the
    replay prices (as `price_as`'s model when given), the predictor it replays, and the mix's policy objects."""
    layout = trace.layout if price_as is None else trace.layout.priced_like(price_as)
    predictor = replay_predictor(trace, config)
    spec, policies = config.policy, config.policy.build()
    if not policies.routing.neutral:
        raise ValueError(
            f"routing policy {spec.routing.name!r} changes routing, and a trace replays the routing it recorded: "
            "the mix runs live only, on a model (specmd generate, specmd eval; specmd reproduce runs the paper's "
            "config4 live)"
        )
    prefetch = policies.prefetch
    if prefetch.needs_logits and predictor == NEXT_LAYER and prefetch.depth > 1:
        raise TraceError(
            f"prefetch policy {spec.prefetch.name!r} looks {prefetch.depth} layers ahead, but a trace records "
            "predictions one layer ahead ('next_logits'): replay it with depth=1, or run the mix live, on a model "
            "(specmd generate, specmd eval; specmd reproduce runs the paper's config3 live)"
        )
    if prefetch.needs_logits and predictor == NEXT_LAYER and not trace.has_next_logits:
        raise TraceError(
            f"prefetch policy {spec.prefetch.name!r} predicts from the next layer's router logits, which "
            f"{trace.source} does not record ('next_logits'); 'none' and 'oracle' prefetch replay without them"
        )
    config.capacity_bytes(layout)
    config.host_capacity_bytes(layout)
    return layout, predictor, policies


def build_replay(trace: Trace, config: CacheConfig, price_as: ExpertLayout | None = None) -> tuple[CacheManager, str]:
    """A fresh manager sized and configured for replaying `trace` under `config` (its experts and compute priced
    as `price_as`'s model when given), and the predictor it replays."""
    layout, predictor, policies = check_replay(trace, config, price_as)
    clairvoyant = any(getattr(getattr(policies, kind), "needs_future", False) for kind in KINDS)
    manager = build_manager(
        layout,
        config,
        future=future_of(trace, predictor) if clairvoyant else None,
        wall=lambda: 0.0,  # a replay has no wall clock: wall-time fields read 0
    )
    return manager, predictor


def run_trace(
    trace: Trace, config: CacheConfig, price_as: ExpertLayout | None = None, speculative: int | str | None = None
) -> CacheStats:
    """Replay every pass of `trace` under `config`, priced as `price_as`'s model when given; with `speculative`
    (K, "auto" or "auto:K_max") decoding speculatively from a lookahead trace (`specmd.sim.speculate`)."""
    if speculative is not None:
        check_speculative_replay(trace, config, speculative)
    manager, predictor = build_replay(trace, config, price_as)
    if speculative is not None:
        return run_speculative(trace, config, speculative, manager, predictor, price_as)
    for replay_pass in trace.passes(predictor):
        replay_pass.run(manager)
    return manager.snapshot()


def replay(
    trace: Trace | str | os.PathLike[str],
    *,
    policy: Any = None,
    cache_frac: float | None = None,
    cache_bytes: int | str | None = None,
    bandwidth_gbps: float | str | None = "profile",
    link_latency_s: float | None = None,
    hardware: str = DEFAULT_HARDWARE,
    predictor: str | None = None,
    price_as: ExpertLayout | None = None,
    storage: str = "ram",
    host_cache_frac: float | None = None,
    host_cache_bytes: int | str | None = None,
    host_eviction: Any = "lru",
    disk: str | None = "profile",
    speculative: int | str | None = None,
    draft_frac: float | None = None,
    draft_bytes: int | str | None = None,
) -> CacheStats:
    """Replay `trace` (a `Trace` or a .jsonl/.npz path) with a policy mix and a cache size (`cache_frac`, or
    `cache_bytes`: a count, or a size such as "600MB").

    `bandwidth_gbps` defaults to the hardware profile's link ("profile"); None means native speed
    (transfers take no emulated time), as for a live model. `predictor` picks whose recorded predictions
    logit-based prefetch uses ("next-layer", or the trace's own; default: the one it was recorded with).
    `price_as` (a model's `ExpertLayout`, e.g. `specmd.offload_models.info.expert_layout(load_config("olmoe-1b-7b"))`)
    prices the trace's experts and compute as that model's, keeping its routing. With `storage="disk"` every transfer
    first reads the expert over the `disk` link (a `specmd.cache.hardware.DISKS` name; default: the hardware profile's
    drive; None: no emulated time), through a host-RAM tier of `host_cache_frac` (or `host_cache_bytes`) evicting by
    `host_eviction` when one is given. `speculative` (K, "auto" or "auto:K_max") replays speculative decoding
    from a lookahead trace (`specmd.sim.record(..., lookahead=K)`) with a self-draft of `draft_frac` (or
    `draft_bytes`) of the draft's experts, as `generate(speculative=...)` runs it live. Example::

        stats = specmd.sim.replay("trace.jsonl", policy="topk/least-stale/fetch/standard",
                                  cache_frac=0.05, bandwidth_gbps=5.0)
        from_nvme = specmd.sim.replay("trace.jsonl", cache_frac=0.05, storage="disk", host_cache_frac=0.2, disk="nvme4")
        drafted = specmd.sim.replay("lookahead.jsonl", cache_frac=0.05, speculative="auto", draft_frac=1.0)
    """
    config = CacheConfig(
        cache_frac=cache_frac,
        cache_bytes=cache_bytes,
        policy=policy,
        bandwidth_gbps=bandwidth_gbps,
        link_latency_s=link_latency_s,
        hardware=hardware,
        predictor=predictor,
        storage=storage,
        host_cache_frac=host_cache_frac,
        host_cache_bytes=host_cache_bytes,
        host_eviction=host_eviction,
        disk=disk,
        draft_frac=draft_frac,
        draft_bytes=draft_bytes,
    )
    return run_trace(trace if isinstance(trace, Trace) else load_trace(trace), config, price_as, speculative)
