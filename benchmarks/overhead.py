"""specmd's overhead on the lossless path: cache_frac=1.0, warm, vs stock transformers, side by side.

An OLMoE-shaped model sized for a small machine is saved once, then loaded three ways: stock with eager
experts (the same per-expert loop specmd runs), stock with its default grouped_mm experts, and specmd
(OffloadOLMoE at cache_frac=1.0, every expert preloaded). Prefill and decode steps are timed in
interleaved rounds after a warm-up, so all three see the same machine state; medians are reported.

    python benchmarks/overhead.py [--layers 16 --hidden 512 --experts 64 --top-k 8 --prompt 128 --steps 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from specmd import OffloadOLMoE


def build_checkpoint(args: argparse.Namespace, directory: Path) -> None:
    config = OlmoeConfig(
        vocab_size=32_000,
        hidden_size=args.hidden,
        intermediate_size=args.hidden // 2,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    OlmoeForCausalLM(config).save_pretrained(directory)


@torch.inference_mode()
def prefill_and_decode(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """Seconds for the prefill, and median seconds per decode step."""
    start = time.perf_counter()
    out = model(prompt, use_cache=True)
    prefill = time.perf_counter() - start
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return prefill, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        build_checkpoint(args, path)
        models = {
            "stock eager": OlmoeForCausalLM.from_pretrained(path, experts_implementation="eager").eval(),
            "stock grouped_mm": OlmoeForCausalLM.from_pretrained(path).eval(),
            "specmd 100% warm": OffloadOLMoE.from_pretrained(path, cache_frac=1.0, progress=False).eval(),
        }
        specmd_model = models["specmd 100% warm"]
        specmd_model.expert_cache.warm()
        prompt = torch.randint(0, 32_000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        for model in models.values():  # warm-up round, not timed
            prefill_and_decode(model, prompt, 2)
        samples: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                prefill, decode = prefill_and_decode(model, prompt, args.steps)
                samples[name]["prefill"].append(prefill)
                samples[name]["decode"].append(decode)
        stats = specmd_model.cache_stats()
        assert stats.misses == 0, "cache_frac=1.0 after warm() must never miss"
        specmd_model.close()

    median = {name: {phase: statistics.median(v) for phase, v in s.items()} for name, s in samples.items()}
    mine = median["specmd 100% warm"]
    print(
        f"OLMoE-shaped: {args.layers} layers, hidden {args.hidden}, {args.experts} experts, top-{args.top_k}; "
        f"prompt {args.prompt} tokens, {args.steps} decode steps, median of {args.rounds} interleaved rounds; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(f"{'':20}{'prefill ms':>12}{'decode ms/token':>18}{'specmd/this prefill':>22}{'specmd/this decode':>21}")
    for name, m in median.items():
        print(
            f"{name:20}{m['prefill'] * 1e3:12.2f}{m['decode'] * 1e3:18.3f}"
            f"{mine['prefill'] / m['prefill']:22.3f}{mine['decode'] / m['decode']:21.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "median_s": median}, indent=2) + "\n")


if __name__ == "__main__":
    main()
