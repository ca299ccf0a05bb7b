"""Replay throughput (and engine cost per request): one core, no model, no tensors.

Builds a synthetic trace of OLMoE-1B-7B's shape (16 MoE layers x 64 experts, top-8, bf16 experts of
12.6 MB) in which each decode token re-uses about half of the previous token's experts in each layer,
saves it in the compact .npz form, loads it back, and replays it through `specmd.sim` with each
eviction policy (no prefetch) and with top-k prefetch where the trace records next-layer logits.
Reports requests per second and microseconds per request (the engine's cost on the lookup path), and
whether the engine runs compiled (SPECMD_COMPILE=1 builds, see the README) or as pure Python.

    python benchmarks/replay.py [--tokens 8000]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from specmd.cache.config import CacheConfig
from specmd.compiled import is_compiled
from specmd.sim.replay import run_trace
from specmd.sim.trace import Trace, TraceEvent, load_trace

LAYERS, EXPERTS, TOP_K = 16, 64, 8
HIDDEN, INTERMEDIATE = 2048, 1024
META = {
    "model": "synthetic OLMoE-1B-7B shape",
    "num_layers": LAYERS,
    "moe_layers": list(range(LAYERS)),
    "experts_per_layer": EXPERTS,
    "top_k": TOP_K,
    "precision": "bf16",
    "expert_bytes": {"bf16": 3 * HIDDEN * INTERMEDIATE * 2},
    "shape": {
        "num_layers": LAYERS,
        "hidden_size": HIDDEN,
        "kv_dim": HIDDEN,
        "dense_params": [4 * HIDDEN * HIDDEN + EXPERTS * HIDDEN] * LAYERS,
        "head_params": 50_304 * HIDDEN,
        "expert_params": 3 * HIDDEN * INTERMEDIATE,
        "dtype_bytes": 2,
    },
}


def synthetic(tokens: int, seed: int = 0, logits: bool = False) -> Trace:
    rng = random.Random(seed)
    chosen = [rng.sample(range(EXPERTS), TOP_K) for _ in range(LAYERS)]
    events = []
    for token in range(tokens):
        for layer in range(LAYERS):
            kept = rng.sample(chosen[layer], TOP_K // 2)
            chosen[layer] = kept + rng.sample([e for e in range(EXPERTS) if e not in kept], TOP_K - len(kept))
            predicted = None
            if logits and layer + 1 < LAYERS:
                predicted = tuple(rng.gauss(0, 1) for _ in range(EXPERTS))
            events.append(TraceEvent(0, token, layer, tuple(chosen[layer]), next_logits=predicted))
    return Trace(dict(META), events)


def measure(trace: Trace, policy: str, cache_frac: float) -> dict[str, float]:
    config = CacheConfig(cache_frac=cache_frac, policy=policy, bandwidth_gbps=5.0)
    run_trace(trace, config)  # warm-up
    start = time.perf_counter()
    stats = run_trace(trace, config)
    seconds = time.perf_counter() - start
    return {"requests_per_s": stats.requests / seconds, "us_per_request": seconds / stats.requests * 1e6,
            "hit_rate": stats.hit_rate, "requests": stats.requests}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8000, help="decode tokens (x 16 layers x top-8 requests)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic(args.tokens).save(Path(tmp) / "trace.npz")
        start = time.perf_counter()
        trace = load_trace(path)
        trace.passes()
        load_s = time.perf_counter() - start
        requests = trace.num_requests
        print(f"engine: {'compiled (mypyc)' if is_compiled() else 'pure Python'}")
        print(f"trace: {requests:,} requests ({args.tokens:,} tokens x {LAYERS} layers x top-{TOP_K}); "
              f"loading the .npz and building its passes took {load_s:.2f} s")  # fmt: skip
        print(f"{'policy':36}{'capacity':>9}{'requests/s':>14}{'us/request':>12}{'hit rate':>10}")
        cases = [(f"none/{e}/fetch/standard", f) for e in ("lru", "least-stale", "belady") for f in (0.05, 0.25)]
        for policy, frac in cases:
            row = {"policy": policy, "cache_frac": frac, **measure(trace, policy, frac)}
            rows.append(row)
            print(f"{policy:36}{frac:>9.0%}{row['requests_per_s']:>14,.0f}{row['us_per_request']:>12.2f}"
                  f"{row['hit_rate']:>10.1%}")  # fmt: skip
        with_logits = synthetic(args.tokens // 4, logits=True)  # logits make the trace 60x larger
        for policy in ("topk/lru/fetch/standard", "topk/least-stale/fetch/standard"):
            row = {"policy": policy, "cache_frac": 0.25, **measure(with_logits, policy, 0.25)}
            rows.append(row)
            print(f"{policy:36}{0.25:>9.0%}{row['requests_per_s']:>14,.0f}{row['us_per_request']:>12.2f}"
                  f"{row['hit_rate']:>10.1%}  ({row['requests']:,} requests)")  # fmt: skip
    if args.json:
        results = {"args": vars(args), "compiled": is_compiled(), "load_s": load_s, "rows": rows}
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
