"""Speculative decoding with the int4 self-draft against plain decoding, side by side in one run.

For each hardware profile and capacity, on the bundled model priced as OLMoE-1B-7B, greedy decoding of the
bundled prompts: emulated decode tokens/s of
  * plain decoding with each non-speculative mix of `MIXES` (the best of them is "best mix"),
  * the same best mix given the draft's fast memory as extra cache ("best mix + draft memory": equal memory),
  * speculation with the governor ("auto") over the speculating mix, and with fixed K; and "auto" with a
    quarter of the draft's memory (its experts then cross the link too),
and the acceptance rate of the int4 and int2 self-drafts; wall-clock tokens/s beside. The draft's experts are
resident from the start (`draft_cache.warm()`), as a draft loaded on the device would be; its bytes are
reported (and they are what the equal-memory row gets).

    python benchmarks/speculative.py [--hardware a100 laptop-rtx4060] [--capacities 0.05 0.10 0.25] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AutoTokenizer

from specmd import AutoOffloadForCausalLM
from specmd.default_model import BUNDLED_PROMPTS, default_model_path

SHAPE = "olmoe-1b-7b"
SPECULATING_MIX = "score/least-stale/fetch/standard"
MIXES = (
    "none/lru/fetch/standard",
    "topk/least-stale/fetch/standard",
    SPECULATING_MIX,
)


def prompts(count: int) -> list[str]:
    return [json.loads(line) for line in BUNDLED_PROMPTS.read_text().splitlines() if line.strip()][:count]


@contextmanager
def model_with(hardware: str, capacity: float | None, **options: Any) -> Iterator[Any]:
    settings: dict[str, Any] = {"bandwidth_gbps": "profile", "hardware": hardware, "shape_from": SHAPE}
    if capacity is not None:
        settings["cache_frac"] = capacity
    with AutoOffloadForCausalLM.from_pretrained(
        str(default_model_path()), progress=False, **settings, **options
    ) as model:
        yield model


def run(model: Any, encoded: Sequence[Any], new_tokens: int, **generate: Any) -> dict[str, Any]:
    """Generate from each prompt; the stats of all of them."""
    model.reset_cache_stats()
    for inputs in encoded:
        model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **generate)
    stats = model.cache_stats()
    return {
        "tokens_per_s": stats.tokens_per_s,
        "wall_tokens_per_s": stats.wall_tokens_per_s,
        "stall_s": stats.stall_s,
        "hit_rate": stats.hit_rate,
        "acceptance_rate": stats.acceptance_rate,
        "tokens_per_verify": stats.tokens_per_verify,
        "lookahead_issued": stats.lookahead_prefetches_issued,
        "lookahead_used": stats.lookahead_prefetches_used,
        "lookahead_late": stats.lookahead_prefetches_late,
        "mean_k": sum(stats.speculate_k) / len(stats.speculate_k) if stats.speculate_k else 0.0,
        "capacity_bytes": stats.capacity_bytes,
        "draft_capacity_bytes": stats.draft_capacity_bytes,
    }


def cell(hardware: str, capacity: float, encoded: Sequence[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Every row of one (hardware, capacity) cell."""
    rows: dict[str, Any] = {}
    for mix in MIXES:
        with model_with(hardware, capacity, policy=mix) as model:
            rows[mix] = run(model, encoded, args.new_tokens)
    best = max(MIXES, key=lambda mix: rows[mix]["tokens_per_s"])
    for precision in ("int4", "int2"):
        draft = {"draft_frac": args.draft_frac, "draft_precision": precision}
        with model_with(hardware, capacity, policy=SPECULATING_MIX, **draft) as model:
            model.draft_cache.warm()
            if precision == "int4":
                rows["auto"] = run(model, encoded, args.new_tokens, speculative="auto")
            for k in args.fixed_k if precision == "int4" else args.fixed_k[-1:]:
                rows[f"K={k} {precision}"] = run(model, encoded, args.new_tokens, speculative=k)
    small = {"draft_frac": args.draft_frac / 4, "draft_precision": "int4"}
    with model_with(hardware, capacity, policy=SPECULATING_MIX, **small) as model:
        model.draft_cache.warm()
        rows[f"auto, draft {small['draft_frac']:.0%}"] = run(model, encoded, args.new_tokens, speculative="auto")
    draft_bytes = rows["auto"]["draft_capacity_bytes"]
    with model_with(hardware, None, policy=best, cache_bytes=rows[best]["capacity_bytes"] + draft_bytes) as model:
        rows["best mix + draft memory"] = run(model, encoded, args.new_tokens)
    return {"best_mix": best, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", nargs="+", default=["a100", "laptop-rtx4060"])
    parser.add_argument("--capacities", nargs="+", type=float, default=[0.05, 0.10, 0.25])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--draft-frac", type=float, default=1.0, help="the draft's budget (fraction of int4 experts)")
    parser.add_argument("--fixed-k", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    encoded = [tokenizer(text, return_tensors="pt") for text in prompts(args.prompts)]
    results = []
    started = time.perf_counter()
    for hardware in args.hardware:
        for capacity in args.capacities:
            result = cell(hardware, capacity, encoded, args)
            results.append({"hardware": hardware, "capacity": capacity, **result})
            rows, best = result["rows"], result["best_mix"]
            base, plain = rows[best]["tokens_per_s"], rows[SPECULATING_MIX]["tokens_per_s"]
            print(f"\n{hardware}, cache {capacity:.0%}: best non-speculative mix {best}")
            print(f"{'row':34} {'tok/s':>9} {'x best':>7} {'x plain':>8} {'accept':>7} {'tok/pass':>8} "
                  f"{'mean K':>6} {'la used/issued (late)':>22} {'wall tok/s':>10}")  # fmt: skip
            for name, row in rows.items():
                lookahead = f"{row['lookahead_used']}/{row['lookahead_issued']} ({row['lookahead_late']})"
                print(
                    f"{name:34} {row['tokens_per_s']:9.1f} {row['tokens_per_s'] / base:7.2f} "
                    f"{row['tokens_per_s'] / plain:8.2f} {row['acceptance_rate']:7.2f} {row['tokens_per_verify']:8.2f} "
                    f"{row['mean_k']:6.2f} {lookahead:>22} {row['wall_tokens_per_s']:10.1f}"
                )
            draft_mb = rows["auto"]["draft_capacity_bytes"] / 1e6
            print(f"cache {rows[best]['capacity_bytes'] / 1e6:.0f} MB; the draft's fast memory {draft_mb:.0f} MB")
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "results": results}, out, indent=1)


if __name__ == "__main__":
    main()
