"""Soak: many generate calls on one offloaded model, watching what should stay flat.

Every `--every` calls it samples the process's resident memory (RSS), its threads, its open files and the
experts resident in the cache, and prints them with the cache's counters so far; at the end, the growth of
each between the first sample and the last. Prompts rotate over the bundled ones and every tenth call
raises inside a forward pass (a KeyboardInterrupt at a random layer), as a notebook user's Ctrl-C would, so
recovery is soaked too.

    python benchmarks/soak.py [--calls 1000] [--every 100] [--tokens 16] [--cache-frac 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from specmd import AutoOffloadForCausalLM, default_model_path
from specmd.offload_models.experts import ExpertJob

PROMPTS = Path(__file__).parents[1] / "specmd" / "data" / "prompts" / "stdlib.jsonl"


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


class Interrupter:
    """Raises KeyboardInterrupt at the `at`-th expert computed (0: never), once: install it with `install`."""

    def __init__(self) -> None:
        self.at = 0
        self.count = 0

    def install(self) -> None:
        compute = ExpertJob.compute

        def interrupting(job: ExpertJob, *args: Any) -> None:
            self.count += 1
            if self.count == self.at:
                self.at = 0
                raise KeyboardInterrupt("soak: an interrupt inside a forward pass")
            compute(job, *args)

        ExpertJob.compute = interrupting  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--cache-frac", type=float, default=0.05)
    parser.add_argument("--policy", default="score/least-stale/fetch/standard")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    interrupter = Interrupter()
    interrupter.install()
    samples = []
    interrupted = 0
    start = time.perf_counter()
    with AutoOffloadForCausalLM.from_pretrained(
        path, cache_frac=args.cache_frac, policy=args.policy, bandwidth_gbps=5.0, progress=False
    ) as model:
        print(
            f"{args.calls} generate calls of {args.tokens} tokens, {args.policy} at {args.cache_frac:.0%}; "
            "every tenth call interrupted inside a pass"
        )
        print(
            f"{'calls':>6}{'RSS MB':>9}{'threads':>9}{'files':>7}{'resident':>10}{'requests':>10}{'hit rate':>10}"
            f"{'s':>7}"
        )
        for call in range(1, args.calls + 1):
            inputs = tokenizer(prompts[call % len(prompts)], return_tensors="pt")
            if call % 10 == 5:
                interrupter.count, interrupter.at = 0, rng.randrange(1, 400)
            try:
                model.generate(
                    **inputs, max_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            except KeyboardInterrupt:
                interrupted += 1
            if call % args.every == 0 or call == 1:
                stats = model.cache_stats()
                sample = (call, rss_mb(), threading.active_count(), open_files(), len(model.expert_cache))
                samples.append(sample)
                print(
                    f"{call:>6}{sample[1]:>9.1f}{sample[2]:>9}{sample[3]:>7}{sample[4]:>10}{stats.requests:>10,}"
                    f"{stats.hit_rate:>10.1%}{time.perf_counter() - start:>7.0f}"
                )
    first, last = samples[0], samples[-1]
    print(
        f"{interrupted} calls interrupted inside a pass; from call {first[0]} to {last[0]}: RSS "
        f"{last[1] - first[1]:+.1f} MB, threads {last[2] - first[2]:+d}, open files {last[3] - first[3]:+d}, "
        f"resident experts {last[4] - first[4]:+d}"
    )


if __name__ == "__main__":
    main()
