"""Expert precision formats side by side: quantize time, bytes, weight error and forward time against bf16.

For each expert shape (OLMoE-1B-7B's 2048 x 1024 and Mixtral-8x7B's 4096 x 14336 by default) one expert
of Gaussian weights (std 0.02) is packed at every format once (the quantize time), then its forward from
the packed bytes (`unpack` + `forward`, as the cache runs it) is timed for 1 token (decode) and 16 tokens
in interleaved rounds: each round times every format once, and each format's time is divided by bf16's
in the same round, so a load spike on this shared machine hits all formats alike. Medians are reported.

    python benchmarks/quant.py [--shapes 2048x1024,4096x14336] [--rounds 7] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from specmd.quant import ExpertShape, get_format, registered_formats

TOKENS = (1, 16)


def timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_shape(shape: ExpertShape, names: list[str], rounds: int, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    gate_up = torch.randn(2 * shape.intermediate, shape.hidden) * 0.02
    down = torch.randn(shape.hidden, shape.intermediate) * 0.02
    rows: dict[str, dict[str, Any]] = {}
    weights = {}
    for name in names:
        fmt = get_format(name)
        fmt.pack(gate_up[:64, :64].contiguous(), down[:64, :32].contiguous())  # warm-up: imports, first calls
        start = time.perf_counter()
        packed = fmt.pack(gate_up, down)
        quantize_s = time.perf_counter() - start
        restored = fmt.dequantize(fmt.unpack(packed, shape))
        error = torch.cat([(a - b.float()).reshape(-1) for a, b in zip((gate_up, down), restored, strict=True)])
        original = torch.cat([gate_up.reshape(-1), down.reshape(-1)])
        del restored
        rows[name] = {
            "shape": f"{shape.hidden}x{shape.intermediate}",
            "precision": name,
            "bytes": packed.numel(),
            "bytes_vs_bf16": packed.numel() / get_format("bf16").nbytes(shape),
            "quantize_s": quantize_s,
            "weight_error": (error.norm() / original.norm()).item(),
        }
        del error, original
        weights[name] = (fmt, packed.to(device))
    del gate_up, down
    for tokens in TOKENS:
        x = torch.randn(tokens, shape.hidden, device=device).bfloat16()
        runs = {
            name: (lambda f=fmt, b=buffer, x=x: f.forward(x, f.unpack(b, shape), F.silu))
            for name, (fmt, buffer) in weights.items()
        }
        for run in runs.values():
            run()  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        ratios: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            this_round = {name: timed(run, device) for name, run in runs.items()}
            for name, value in this_round.items():
                seconds[name].append(value)
                ratios[name].append(value / this_round["bf16"])
        for name in runs:
            rows[name][f"forward_ms_{tokens}tok"] = 1e3 * statistics.median(seconds[name])
            rows[name][f"forward_vs_bf16_{tokens}tok"] = statistics.median(ratios[name])
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2048x1024,4096x14336", help="hidden x intermediate, comma-separated")
    parser.add_argument("--precisions", default=",".join(f.name for f in registered_formats() if f.name != "fp32"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.precisions.split(",")
    if "bf16" not in names:
        names.insert(0, "bf16")
    rows = []
    for text in args.shapes.split(","):
        hidden, intermediate = map(int, text.split("x"))
        rows += bench_shape(ExpertShape(hidden, intermediate), names, args.rounds, device)
    print(
        f"one expert, Gaussian weights; forward = unpack + forward from the packed bytes, bf16 activations; "
        f"median of {args.rounds} interleaved rounds; torch {torch.__version__}, {args.threads} thread(s), "
        f"{args.device}, {platform.machine()}"
    )
    header = (
        f"{'expert':>11} {'precision':>9} {'MB':>8} {'x bf16':>7} {'weight err':>10} {'quantize s':>10} "
        + " ".join(f"{f'fwd {t} tok ms':>13} {'x bf16':>7}" for t in TOKENS)
    )
    print(header)
    for row in rows:
        print(
            f"{row['shape']:>11} {row['precision']:>9} {row['bytes'] / 1e6:8.2f} {row['bytes_vs_bf16']:7.3f} "
            f"{row['weight_error']:10.4f} {row['quantize_s']:10.2f} "
            + " ".join(f"{row[f'forward_ms_{t}tok']:13.2f} {row[f'forward_vs_bf16_{t}tok']:7.2f}" for t in TOKENS)
        )
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"args": vars(args), "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
