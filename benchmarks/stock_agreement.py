"""How exactly specmd's lossless path agrees with stock transformers, against each of its expert kernels.

Loads the bundled model three ways, in bf16 (its dtype) and fp32: stock with eager experts, stock with
transformers' default experts implementation (`grouped_mm` in 5.23), and offloaded by specmd at 5% capacity
(the lossless default mix). For each of the 12 bundled prompts it compares the prompt's logits and 32 greedy
tokens. specmd computes every expert as eager does (the same matmuls, summed in ascending expert order), so it
matches eager bit for bit; grouped_mm orders its sums differently, so it differs from both by rounding.

    python benchmarks/stock_agreement.py
"""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specmd import default_model_path
from specmd.default_model import BUNDLED_PROMPTS
from specmd.offload_models.auto import AutoOffloadForCausalLM


def main() -> None:
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(json.loads(line), return_tensors="pt").input_ids for line in BUNDLED_PROMPTS.open()]
    for dtype in (torch.bfloat16, torch.float32):
        eager = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()
        stock = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        kernel = stock.config._experts_implementation
        with AutoOffloadForCausalLM.from_pretrained(path, cache_frac=0.05, dtype=dtype, progress=False) as ours:
            gap = {"eager": 0.0, kernel: 0.0}
            same = {"eager": 0, kernel: 0}
            for ids in prompts:
                with torch.no_grad():
                    logits = ours(ids).logits.float()
                    tokens = ours.generate(ids, max_new_tokens=32, do_sample=False)
                    for name, model in (("eager", eager), (kernel, stock)):
                        gap[name] = max(gap[name], (logits - model(ids).logits.float()).abs().max().item())
                        same[name] += torch.equal(tokens, model.generate(ids, max_new_tokens=32, do_sample=False))
        for name in gap:
            print(f"{str(dtype).removeprefix('torch.'):9} stock {name:11} max |logit difference| {gap[name]:<10.3g}"
                  f"32 greedy tokens equal on {same[name]}/{len(prompts)} prompts")  # fmt: skip


if __name__ == "__main__":
    main()
