"""Miss policies on the quality/speed plane (the SpecMD paper's Fetch-Priority question).

The bundled model reads held-out standard-library text (`dataclasses.py`, never trained on) in windows
of 256 tokens at 5% cache on the paper's A100 with its 5 GB/s link. For each miss policy (Least-Stale
eviction, no prefetch) it reports held-out perplexity (quality) against the emulated time of a window's
forward pass, i.e. its TTFT (speed), with the precisions each fetched. Precision policies get a store of
bf16, int8, int4 (nf4) and int2 (hqq2) experts; the others bf16 only. Writes a PNG of the plane.

    python benchmarks/precision_plane.py [--windows 4] [--png benchmarks/policy_space/precision-plane.png]
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
from transformers import AutoTokenizer

from specmd import default_model_path
from specmd.eval_tasks.quality import MISS_PLANE, miss_policy_plane

RUNS = [*MISS_PLANE, *((f"all {p}", "fetch", (p,)) for p in ("int8", "int4", "int2"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--cache-frac", type=float, default=0.05)
    parser.add_argument("--png", default="benchmarks/policy_space/precision-plane.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "dataclasses.py").read_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, : 256 * args.windows].reshape(args.windows, 256)
    print(f"{args.windows} windows x 256 tokens of dataclasses.py; cache {args.cache_frac:.0%}, a100, 5 GB/s")
    print(f"{'policy':24}{'perplexity':>11}{'TTFT ms':>9}{'stall ms':>10}{'MB moved':>10}  fetched by precision")
    plane = miss_policy_plane(
        path, ids, runs=RUNS, cache_frac=args.cache_frac, bandwidth_gbps=5.0, dtype=torch.bfloat16, progress=False
    )
    for point, stats in plane:
        fetched = ", ".join(f"{p} {n}" for p, n in sorted(stats.fetches_by_precision.items()))
        per_window = stats.stall_s * 1e3 / len(ids), stats.bytes_transferred / 1e6 / len(ids)
        cells = f"{point.perplexity:>11.3f}{point.ttft_s * 1e3:>9.3f}{per_window[0]:>10.2f}{per_window[1]:>10.2f}"
        print(f"{point.label:24}{cells}  {fetched}")
    points = [(point.label, point.perplexity, point.ttft_s * 1e3) for point, _ in plane]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, ppl, ttft in points:
        ax.scatter(ttft, ppl, s=30)
        ax.annotate(label, (ttft, ppl), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("TTFT per 256-token window (ms, emulated A100, 5 GB/s)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("miss policies: quality vs speed (cache 5%)")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
