"""Engine cost: microseconds per request on the lookup path, with no model and no tensors.

Drives the `CacheManager` exactly as a live model or a trace replay does (begin_pass, run_layer per MoE
layer, end_pass) with synthetic OLMoE-like decode routing: 16 layers x 64 experts, top-8, where each
token re-uses about half of the previous token's experts in a layer. Reports wall microseconds per
request for each eviction policy, capacity and prefetch setting.

    python benchmarks/engine.py [--tokens 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from specmd.cache.clock import ModelShape, PassInfo, RooflineCompute
from specmd.cache.engine import ExpertCache
from specmd.cache.keys import ExpertKey
from specmd.cache.manager import CacheManager
from specmd.cache.policies.spec import PolicySpec
from specmd.cache.transfer import EmulatedLink
from specmd.sim.hardware import get_profile

LAYERS, EXPERTS, TOP_K = 16, 64, 8
EXPERT_BYTES = 3 * 2048 * 1024 * 2  # OLMoE-1B-7B, bf16


def routing(tokens: int, seed: int = 0) -> list[list[dict[int, int]]]:
    """Per token, per layer: the experts requested (expert -> 1 token)."""
    rng = random.Random(seed)
    previous = [rng.sample(range(EXPERTS), TOP_K) for _ in range(LAYERS)]
    stream = []
    for _ in range(tokens):
        step = []
        for layer in range(LAYERS):
            kept = rng.sample(previous[layer], TOP_K // 2)
            fresh = rng.sample([e for e in range(EXPERTS) if e not in kept], TOP_K - len(kept))
            previous[layer] = kept + fresh
            step.append(dict.fromkeys(previous[layer], 1))
        stream.append(step)
    return stream


def run(policy: str, cache_frac: float, stream: list[list[dict[int, int]]]) -> tuple[float, float]:
    """(microseconds per request, hit rate)."""
    spec = PolicySpec.parse(policy)
    policies = spec.build()
    precision = "bf16"
    catalog = [ExpertKey(layer, e, precision) for layer in range(LAYERS) for e in range(EXPERTS)]
    capacity = int(cache_frac * len(catalog) * EXPERT_BYTES)
    cache = ExpertCache(capacity, policies.eviction, {precision: EXPERT_BYTES}, catalog)
    shape = ModelShape(LAYERS, 2048, 2048, (20_000_000,) * LAYERS, 100_000_000, 3 * 2048 * 1024, 2)
    profile = get_profile("a100")
    manager = CacheManager(
        cache,
        policies,
        EmulatedLink(5.0, profile.link_latency_s),
        RooflineCompute(shape, profile.peak_flops, profile.memory_bandwidth),
        precision=precision,
        moe_layers=range(LAYERS),
        num_layers=LAYERS,
        num_experts=EXPERTS,
        top_k=TOP_K,
    )
    rng = random.Random(1)
    predicted = [[[rng.gauss(0, 1) for _ in range(EXPERTS)]] for _ in range(LAYERS)]
    wants = manager.wants_predictions
    start = time.perf_counter()
    for position, step in enumerate(stream, start=1):
        manager.begin_pass(PassInfo(1, 1, position, position, prefill=False))
        for layer, requests in enumerate(step):
            manager.run_layer(layer, requests, predicted[layer] if wants else None)
        manager.end_pass()
    elapsed = time.perf_counter() - start
    stats = manager.snapshot()
    return elapsed / stats.requests * 1e6, stats.hit_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    stream = routing(args.tokens)
    rows = []
    print(f"{args.tokens} decode tokens x {LAYERS} layers x top-{TOP_K} = {args.tokens * LAYERS * TOP_K} requests")
    print(f"{'policy':36}{'capacity':>10}{'us/request':>12}{'hit rate':>10}")
    for policy in ("none/lru/fetch/standard", "none/least-stale/fetch/standard", "topk/lru/fetch/standard",
                   "topk/least-stale/fetch/standard"):  # fmt: skip
        for cache_frac in (0.05, 0.25):
            run(policy, cache_frac, stream[:50])  # warm-up
            micros, hit_rate = run(policy, cache_frac, stream)
            rows.append({"policy": policy, "cache_frac": cache_frac, "us_per_request": micros, "hit_rate": hit_rate})
            print(f"{policy:36}{cache_frac:>10.0%}{micros:>12.2f}{hit_rate:>10.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
