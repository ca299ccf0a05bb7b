"""The `specmd` command line: `demo`, `generate`, `routing-stats`, `policies`. Every command has --help and --json."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

DEMO_PROMPTS = (
    "def fibonacci(n):\n    ",
    "import os\nfor path in ",
    "The cache holds only a few experts, so",
)
DEMO_POLICIES = (
    "none/lru/fetch/standard",
    "topk/lru/fetch/standard",
    "none/least-stale/fetch/standard",
    "topk/least-stale/fetch/standard",
)
DTYPES = ("auto", "fp32", "bf16", "fp16")

out = Console()
err = Console(stderr=True)


# ---- shared pieces ----------------------------------------------------------------------------------
def _model_path(name: str) -> str:
    if name == "default":
        from specmd.default_model import default_model_path

        return str(default_model_path())
    return name


def _load(args: argparse.Namespace, policy: str) -> Any:
    import torch

    from specmd.offload_models.auto import AutoOffloadForCausalLM

    dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return AutoOffloadForCausalLM.from_pretrained(
        _model_path(args.model),
        cache_frac=args.cache_frac if args.cache_bytes is None else None,
        cache_bytes=args.cache_bytes,
        policy=policy,
        bandwidth_gbps=args.bandwidth_gbps,
        hardware=args.hardware,
        dtype=dtype,
        progress=not args.json,
    )


def _generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of each prompt, one request at a time."""
    texts = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        texts.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return texts


METRICS: tuple[tuple[str, Callable[[Any], str]], ...] = (
    ("hit rate", lambda s: f"{s.hit_rate:.1%}"),
    ("late", lambda s: str(s.late_prefetches)),
    ("collisions", lambda s: str(s.collision_misses)),
    ("stall ms", lambda s: f"{s.stall_s * 1e3:.1f}"),
    ("TTFT ms", lambda s: f"{s.ttft_s * 1e3:.2f}"),
    ("tok/s", lambda s: f"{s.tokens_per_s:,.0f}"),
    ("wall tok/s", lambda s: f"{s.wall_tokens_per_s:,.0f}"),
)
METRIC_NOTE = (
    "hit rate: requests found resident and ready; late: prefetches still in flight when requested; "
    "collisions: misses on experts evicted earlier in the same pass; stall, TTFT and tok/s are emulated "
    "(link + hardware profile); wall tok/s is this machine's real speed."
)


ROUTING_NOTE = (
    "entropy: of the layer's expert usage (max: every expert used equally); top-1 reuse: consecutive tokens with "
    "the same top-1 expert; any reuse: share of a token's experts the previous token also used; prefetch recall: "
    "share of a layer's experts in the top-k of its router applied to the previous layer's input. "
    "Uniform-random routing in brackets."
)


def _emit(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)


def _add_cache_options(parser: argparse.ArgumentParser, bandwidth: float | None) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--cache-frac", type=float, default=0.05, help="fraction of all expert bytes cached (0.05)")
    size.add_argument("--cache-bytes", type=int, help="cache capacity in bytes, instead of --cache-frac")
    parser.add_argument(
        "--bandwidth-gbps",
        type=float,
        default=bandwidth,
        help=f"emulated host-to-device link, GB/s (default: {bandwidth or 'native speed, no emulation'})",
    )
    parser.add_argument("--hardware", default="a100", help="hardware profile pricing emulated compute (a100)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="model and expert dtype (auto: as saved)")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    parser.add_argument("--out", help="also write the JSON result to this file")


# ---- commands ---------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_path(args.model))
    with _load(args, args.policy) as model:
        texts = _generate(model, tokenizer, args.prompt, args.max_new_tokens)
        stats = model.cache_stats()
        options = model.offload_options.to_dict()
    _emit(args, {"model": args.model, "options": options, "outputs": texts, "stats": stats.to_dict()})
    if not args.json:
        for prompt, text in zip(args.prompt, texts, strict=True):
            out.print(f"[bold]{prompt}[/bold]{text}", markup=True, highlight=False)
        capacity = f"{args.cache_bytes} B" if args.cache_bytes else f"{args.cache_frac:.0%}"
        table = Table(title=f"{args.policy}, cache {capacity}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, fmt in METRICS:
            table.add_row(name, fmt(stats))
        out.print(table)
        out.print(METRIC_NOTE, style="dim")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_path(args.model))
    results = []
    with Progress(console=err, disable=args.json, transient=True) as progress:
        task = progress.add_task("specmd demo", total=len(DEMO_POLICIES))
        for policy in DEMO_POLICIES:
            progress.update(task, description=f"running {policy}")
            with _load(args, policy) as model:
                _generate(model, tokenizer, DEMO_PROMPTS, args.max_new_tokens)
                results.append((policy, model.cache_stats()))
            progress.advance(task)
    _emit(
        args,
        {
            "model": args.model,
            "cache_frac": args.cache_frac,
            "cache_bytes": args.cache_bytes,
            "bandwidth_gbps": args.bandwidth_gbps,
            "hardware": args.hardware,
            "prompts": list(DEMO_PROMPTS),
            "max_new_tokens": args.max_new_tokens,
            "results": [{"policy": p, "stats": s.to_dict()} for p, s in results],
        },
    )
    if not args.json:
        capacity = f"{args.cache_bytes} B" if args.cache_bytes else f"{args.cache_frac:.0%}"
        link = f"{args.bandwidth_gbps} GB/s" if args.bandwidth_gbps else "native speed"
        table = Table(title=f"{len(DEMO_PROMPTS)} prompts, {args.max_new_tokens} new tokens, cache {capacity}, {link}")
        table.add_column("prefetch/eviction")
        for name, _ in METRICS:
            table.add_column(name, justify="right")
        for policy, stats in results:
            table.add_row("/".join(policy.split("/")[:2]), *(fmt(stats) for _, fmt in METRICS))
        out.print(table)
        out.print(METRIC_NOTE, style="dim")
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    from specmd.cache.policies import DEFAULT_POLICY, catalog

    rows = catalog()
    _emit(
        args,
        {
            "default": DEFAULT_POLICY,
            "policies": [{"kind": k, "name": n, "aliases": list(a), "description": d} for k, n, a, d in rows],
        },
    )
    if not args.json:
        table = Table(title=f"policies (default: {DEFAULT_POLICY})")
        for column in ("kind", "name", "aliases", "description"):
            table.add_column(column)
        for kind, name, aliases, description in rows:
            table.add_row(kind, name, ", ".join(aliases), description)
        out.print(table)
    return 0


def cmd_routing_stats(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specmd.sim.routing_stats import routing_stats, text_sequences

    path = _model_path(args.model)
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    tokenizer = AutoTokenizer.from_pretrained(path)
    sequences = text_sequences(tokenizer, text, args.window, args.max_tokens)
    if not sequences:
        raise ValueError(f"--text {args.text} has fewer than 2 tokens")
    dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    stats = routing_stats(model, sequences)
    _emit(args, {"model": args.model, "text": args.text, "window": args.window} | stats.to_dict())
    if not args.json:
        k, e = stats.top_k, stats.num_experts
        table = Table(title=f"routing of {args.model}: {stats.tokens:,} tokens of {args.text}, top-{k} of {e} experts")
        for column in ("layer", "entropy bits", "top-1 reuse", "any reuse", f"prefetch recall@{k}"):
            table.add_column(column, justify="right")
        mean = stats.mean()
        rows = [(str(r.layer), r.entropy_bits, r.top1_reuse, r.any_reuse, r.prefetch_recall) for r in stats.layers]
        rows.append(("mean", mean["entropy_bits"], mean["top1_reuse"], mean["any_reuse"], mean["prefetch_recall"]))
        for name, entropy, top1, any_, recall in rows:
            table.add_row(
                name,
                f"{entropy:.2f} / {math.log2(e):.2f}",
                f"{top1:.1%} ({1 / e:.1%})",
                f"{any_:.1%} ({k / e:.1%})",
                "-" if recall is None else f"{recall:.1%} ({k / e:.1%})",
            )
        out.print(table)
        out.print(ROUTING_NOTE, style="dim")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from specmd.cache.policies import DEFAULT_POLICY

    parser = argparse.ArgumentParser(prog="specmd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="compare eviction and prefetch policies on the default model")
    demo.add_argument("--model", default="default", help="model directory or hub id (default: the bundled model)")
    demo.add_argument("--max-new-tokens", type=int, default=32)
    _add_cache_options(demo, bandwidth=5.0)
    _add_output_options(demo)
    demo.set_defaults(func=cmd_demo)

    generate = commands.add_parser("generate", help="generate text with an offloaded model and report cache metrics")
    generate.add_argument("model", help="model directory or hub id, or 'default'")
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--policy", default=DEFAULT_POLICY, help="prefetch/eviction/miss/routing")
    _add_cache_options(generate, bandwidth=None)
    _add_output_options(generate)
    generate.set_defaults(func=cmd_generate)

    routing = commands.add_parser("routing-stats", help="per-layer routing statistics that matter to a cache")
    routing.add_argument("model", help="model directory or hub id, or 'default'")
    routing.add_argument("--text", required=True, help="a UTF-8 text file to run the model over")
    routing.add_argument("--window", type=int, default=512, help="tokens per forward pass (512)")
    routing.add_argument("--max-tokens", type=int, default=8192, help="use at most this many tokens of the text")
    routing.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype (auto: as saved)")
    _add_output_options(routing)
    routing.set_defaults(func=cmd_routing_stats)

    policies = commands.add_parser("policies", help="list every policy name with a one-line description")
    _add_output_options(policies)
    policies.set_defaults(func=cmd_policies)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
