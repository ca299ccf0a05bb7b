"""Replay a routing trace through the cache engine: no model, no tensors, no torch.

The same `CacheManager`, engine and policy objects as a live run are driven from the trace's passes,
so a routing-neutral lossless policy reproduces the live run's counters exactly (for a batch-1
recording, with the same cache size, link and hardware profile).
"""

from __future__ import annotations

import os
from typing import Any

from specmd.cache import config as cache_config  # a module reference: cache.config imports sim.hardware
from specmd.cache.clock import RooflineCompute, ZeroCompute
from specmd.cache.engine import ExpertCache
from specmd.cache.keys import ExpertKey
from specmd.cache.manager import CacheManager
from specmd.cache.policies.base import Future
from specmd.cache.policies.spec import KINDS
from specmd.cache.stats import CacheStats
from specmd.sim.hardware import DEFAULT_HARDWARE
from specmd.sim.trace import Trace, TraceError, load_trace


def future_of(trace: Trace) -> Future:
    """Every request's logical step, numbered as the manager numbers them (one step per MoE layer call)."""
    uses: dict[tuple[int, int], list[int]] = {}
    requests: dict[tuple[int, int], dict[int, int]] = {}
    step = 0
    for pass_idx, replay_pass in enumerate(trace.passes(), start=1):
        for layer_step in replay_pass.layers:
            step += 1
            requests[(pass_idx, layer_step.layer)] = layer_step.requests
            for expert in layer_step.requests:
                uses.setdefault((layer_step.layer, expert), []).append(step)
    return Future(uses, requests)


def build_manager(trace: Trace, config: cache_config.CacheConfig) -> CacheManager:
    """A fresh cache and manager sized and configured for replaying `trace` under `config`."""
    precision, expert_bytes = trace.precision, trace.expert_bytes
    experts = trace.experts_per_layer
    catalog = [ExpertKey(layer, e, precision) for layer in trace.moe_layers for e in range(experts)]
    # A live model's cache_frac counts its experts at full precision, whatever precision requests use.
    full_bytes = trace.meta.get("full_expert_bytes") or expert_bytes
    capacity = config.capacity_bytes(len(catalog) * full_bytes, expert_bytes)
    policies = config.policy.build()
    if not policies.routing.neutral:
        raise ValueError(
            f"routing policy {config.policy.routing.name!r} changes routing; a trace replays fixed routing"
        )
    if policies.prefetch.needs_logits and policies.prefetch.depth > 1:
        raise TraceError(
            f"prefetch policy {config.policy.prefetch.name!r} looks {policies.prefetch.depth} layers ahead, but a "
            "trace records predictions one layer ahead ('next_logits'); replay it with depth=1"
        )
    if policies.prefetch.needs_logits and not trace.has_next_logits:
        raise TraceError(
            f"prefetch policy {config.policy.prefetch.name!r} predicts from the next layer's router logits, which "
            f"{trace.source} does not record ('next_logits'); 'none' and 'oracle' prefetch replay without them"
        )
    clairvoyant = [getattr(policies, kind) for kind in KINDS if getattr(getattr(policies, kind), "needs_future", False)]
    if clairvoyant:
        future = future_of(trace)
        for policy in clairvoyant:
            policy.bind_future(future)
    shape = trace.shape
    profile = config.profile
    compute = ZeroCompute() if shape is None else RooflineCompute(shape, profile.peak_flops, profile.memory_bandwidth)
    return CacheManager(
        ExpertCache(capacity, policies.eviction, {precision: expert_bytes}, catalog),
        policies,
        config.link(),
        compute,
        precision=precision,
        moe_layers=trace.moe_layers,
        num_layers=shape.num_layers if shape is not None else trace.num_layers,
        num_experts=experts,
        top_k=trace.top_k,
        wall=lambda: 0.0,  # a replay has no wall clock: wall-time fields read 0
    )


def run_trace(trace: Trace, config: cache_config.CacheConfig) -> CacheStats:
    """Replay every pass of `trace` under `config`."""
    manager = build_manager(trace, config)
    begin, run_layer, end = manager.begin_pass, manager.run_layer, manager.end_pass
    routing, probs = manager.wants_routing, manager.wants_probs  # as live: computed only for policies that read them
    for replay_pass in trace.passes():
        begin(replay_pass.info)
        for step in replay_pass.layers:
            run_layer(
                step.layer,
                step.requests,
                step.predicted,
                None,
                step.routing if routing else None,
                step.probs if probs else None,
            )
        end()
    return manager.snapshot()


def replay(
    trace: Trace | str | os.PathLike[str],
    *,
    policy: Any = None,
    cache_frac: float | None = None,
    cache_bytes: int | None = None,
    bandwidth_gbps: float | str | None = "profile",
    link_latency_s: float | None = None,
    hardware: str = DEFAULT_HARDWARE,
) -> CacheStats:
    """Replay `trace` (a `Trace` or a .jsonl/.npz path) with a policy mix and a cache size.

    `bandwidth_gbps` defaults to the hardware profile's link ("profile"); None means native speed
    (transfers take no emulated time), as for a live model. Example::

        stats = specmd.sim.replay("trace.jsonl", policy="topk/least-stale/fetch/standard",
                                  cache_frac=0.05, bandwidth_gbps=5.0)
    """
    config = cache_config.CacheConfig(
        cache_frac=cache_frac,
        cache_bytes=cache_bytes,
        policy=policy,
        bandwidth_gbps=bandwidth_gbps,
        link_latency_s=link_latency_s,
        hardware=hardware,
    )
    return run_trace(trace if isinstance(trace, Trace) else load_trace(trace), config)
