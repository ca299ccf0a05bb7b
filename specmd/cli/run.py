"""Live runs of an offloaded model: `specmd demo` and `specmd generate`."""

from __future__ import annotations

import argparse

from rich.progress import Progress

from specmd import cli
from specmd.cli import options, output

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


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_demo(commands)
    _add_generate(commands)


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser("demo", help="compare eviction and prefetch policies on the default model")
    options.add_model(demo, "model directory or hub id (default: the bundled model)", flag=True)
    options.add_max_new_tokens(demo)
    options.add_offload_options(demo, bandwidth=5.0)
    options.add_output(demo)
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    tokenizer = options.load_tokenizer(options.model_path(args.model))
    prompts = options.encode_prompts(tokenizer, DEMO_PROMPTS)
    results = []
    with Progress(console=cli.err, disable=args.json, transient=True) as progress:
        task = progress.add_task("specmd demo", total=len(DEMO_POLICIES))
        for policy in DEMO_POLICIES:
            progress.update(task, description=f"running {policy}")
            with options.load_model(args, policy) as model:
                options.continuations(model, tokenizer, prompts, args.max_new_tokens)
                results.append((policy, model.cache_stats()))
            progress.advance(task)
    output.emit(
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
        title = (
            f"{len(DEMO_PROMPTS)} prompts, {args.max_new_tokens} new tokens, cache {output.capacity_label(args)}, "
            f"{output.link_label(args)}"
        )
        table = output.metrics_table(title, "prefetch/eviction", fold=True)  # narrow terminals fold headers
        for policy, stats in results:
            table.add_row("/".join(policy.split("/")[:2]), *output.metric_cells(stats))
        output.show_metrics(table)
    return 0


def _add_generate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    generate = commands.add_parser("generate", help="generate text with an offloaded model and report cache metrics")
    options.add_model(generate)
    generate.add_argument(
        "--prompt", type=options.prompt_text, action="append", required=True, help="a prompt (repeat for several)"
    )
    options.add_max_new_tokens(generate)
    options.add_policy(generate)
    options.add_offload_options(generate, bandwidth=None)
    options.add_output(generate)
    generate.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    tokenizer = options.load_tokenizer(options.model_path(args.model))
    prompts = options.encode_prompts(tokenizer, args.prompt)
    with options.load_model(args, args.policy) as model:
        texts = options.continuations(model, tokenizer, prompts, args.max_new_tokens)
        stats = model.cache_stats()
        offload_options = model.offload_options.to_dict()
    output.emit(args, {"model": args.model, "options": offload_options, "outputs": texts, "stats": stats.to_dict()})
    if not args.json:
        for prompt, text in zip(args.prompt, texts, strict=True):
            cli.out.print(f"[bold]{prompt}[/bold]{text}", markup=True, highlight=False)
        output.print_stats(args, stats)
    return 0
