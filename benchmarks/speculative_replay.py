"""Speculative decoding swept from one lookahead trace, with no model: speculation against plain decoding with
next-layer prefetch across capacities, hardware and policy mixes, and what it costs next to running them live.

1. Records a lookahead trace (`specmd trace --lookahead K`): the bundled model priced as OLMoE-1B-7B, an int4
   self-draft holding every expert, greedy decoding of the first bundled prompts, the draft's chain of K drafts
   and the verify pass over them at every decode position.
2. Compares replay with live runs on fresh models at the same settings: plain decoding (the trace's plain passes
   are the live run's, so every counter must be equal) and `generate(speculative="auto")` (in bf16 a verify pass
   over k + 1 tokens can route a near-tie differently from the recorded pass over K + 1: close, not equal).
3. Sweeps the trace: hardware x capacities x `MIXES` x (plain, K = 4, K = 8, the governor), through `specmd.sim.sweep`
   (the same code as `specmd sweep --speculate`), and prints emulated decode tokens/s per cell: the best plain mix,
   each speculative setting over the speculating mix, and their ratios to the best plain mix.

    python benchmarks/speculative_replay.py [--prompts 3 --new-tokens 32 --lookahead 8 --jobs 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from specmd import AutoOffloadForCausalLM
from specmd.default_model import BUNDLED_PROMPTS, default_model_path
from specmd.sim import replay
from specmd.sim.record import TraceRecorder
from specmd.sim.sweep import SweepGrid, read_results, sweep

SHAPE = "olmoe-1b-7b"
SPECULATING_MIX = "score/least-stale/fetch/standard"
MIXES = ("none/lru/fetch/standard", "topk/least-stale/fetch/standard", SPECULATING_MIX)
SPECULATE = (None, 4, 8, "auto")
WALL = ("wall_ttft_s", "wall_tokens_per_s")


def load(hardware: str, capacity: float) -> AutoOffloadForCausalLM:
    return AutoOffloadForCausalLM.from_pretrained(
        str(default_model_path()), cache_frac=capacity, policy=SPECULATING_MIX, bandwidth_gbps="profile",
        hardware=hardware, shape_from=SHAPE, draft_frac=1.0, draft_precision="int4", progress=False,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", nargs="+", default=["a100", "laptop-rtx4060"])
    parser.add_argument("--capacities", nargs="+", type=float, default=[0.05, 0.10, 0.25])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lookahead", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    texts = [json.loads(line) for line in BUNDLED_PROMPTS.read_text().splitlines() if line.strip()][: args.prompts]
    encoded = [tokenizer(text, return_tensors="pt") for text in texts]
    work = Path(tempfile.mkdtemp(prefix="specmd-spec-replay-"))
    trace_path = work / "lookahead.npz"

    started = time.perf_counter()
    with load(args.hardware[0], args.capacities[0]) as model:
        recorder = TraceRecorder(model.trace_meta())
        with model.observe_routing(recorder):
            for inputs in encoded:
                model.generate_lookahead(recorder, args.lookahead, **inputs, max_new_tokens=args.new_tokens)
    trace = recorder.trace()
    trace.save(trace_path)
    recording_s = time.perf_counter() - started
    print(f"recorded {len(trace.chains)} chains of up to {trace.lookahead} drafts in {recording_s:.0f} s")

    hardware, capacity = args.hardware[0], args.capacities[0]
    for speculative in (None, "auto"):
        started = time.perf_counter()
        with load(hardware, capacity) as model:
            for inputs in encoded:
                model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, speculative=speculative)
            live = model.cache_stats().to_dict()
        live_s = time.perf_counter() - started
        replayed = replay(
            trace_path, policy=SPECULATING_MIX, cache_frac=capacity, hardware=hardware, speculative=speculative,
            draft_frac=None if speculative is None else 1.0,
        ).to_dict()  # fmt: skip
        differ = [name for name in live if name not in WALL and live[name] != replayed[name]]
        gap = max(abs(replayed[n] / live[n] - 1) for n in ("tokens_per_s", "requests", "bytes_transferred"))
        print(
            f"live speculative={speculative!r} on {hardware} at {capacity:.0%}: {live_s:.1f} s, "
            f"{live['tokens_per_s']:.3f} emulated tok/s; replayed: {replayed['tokens_per_s']:.3f}; counters that "
            f"differ: {len(differ)} of {len(live) - len(WALL)} ({', '.join(differ[:4])}{', ...' * (len(differ) > 4)});"
            f" largest gap in tok/s, requests, bytes: {gap:.2%}"
        )

    grid = SweepGrid(
        traces=(str(trace_path),), policies=MIXES, cache_fracs=tuple(args.capacities), bandwidths=("profile",),
        hardware=tuple(args.hardware), baselines=False, speculate=SPECULATE, draft_frac=1.0,
    )  # fmt: skip
    started = time.perf_counter()
    sweep(grid, work / "results.csv", jobs=args.jobs, progress=False)
    sweep_s = time.perf_counter() - started
    rows = read_results(work / "results.csv")
    print(f"swept {len(rows)} runs in {sweep_s:.1f} s ({args.jobs} processes)")
    for hardware in args.hardware:
        for capacity in args.capacities:
            cell = [r for r in rows if r["hardware"] == hardware and float(r["cache_frac"]) == capacity]
            plain = {r["policy"]: float(r["tokens_per_s"]) for r in cell if not r["speculate"]}
            best = max(plain, key=plain.__getitem__)
            spec = {r["speculate"]: r for r in cell if r["speculate"] and r["policy"] == SPECULATING_MIX}
            parts = [f"best plain {best.removesuffix('/fetch/standard')} {plain[best]:.1f}"]
            for setting in SPECULATE[1:]:
                row = spec[str(setting)]
                tokens, accept = float(row["tokens_per_s"]), float(row["acceptance_rate"])
                ks = json.loads(row["speculate_k"])
                parts.append(
                    f"K={setting} {tokens:.1f} ({tokens / plain[best]:.2f}x, accept {accept:.2f}, "
                    f"mean K {sum(ks) / len(ks):.1f})"
                )
            print(f"{hardware:15} {capacity:4.0%}  " + "; ".join(parts))


if __name__ == "__main__":
    main()
