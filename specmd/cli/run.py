"""Live runs of an offloaded model: `specmd demo` and `specmd generate`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from rich.progress import Progress
from rich.table import Table

from specmd import cli
from specmd.cli import options, output
from specmd.default_model import BUNDLED_PROMPTS, PAPER_HARDWARE, PAPER_SHAPE

# The rows of `specmd demo`: the paper's story on one recording, each mix replayed from it.
DEMO_ROWS = (
    "none/lru/fetch/standard",
    "none/least-stale/fetch/standard",
    "topk/lru/fetch/standard",
    "topk/least-stale/fetch/standard",
    "score/least-stale/fetch/standard",
    "none/next-use/fetch/standard",
    "none/belady/fetch/standard",
)
# The demo's live row of speculative decoding: SpecMD's mix, its K chosen by the governor, an int4 self-draft.
SPECULATIVE_ROW = ("score/least-stale/fetch/standard", "auto")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_demo(commands)
    _add_generate(commands)


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo", help="the paper's story on the bundled model: eviction, prefetch and the Belady bound side by side"
    )
    options.add_model(demo, "model directory or hub id (default: the bundled model)", optional=True)
    options.add_max_new_tokens(demo)
    options.add_offload_options(demo, bandwidth=options.PROFILE, hardware=PAPER_HARDWARE, shape_from=PAPER_SHAPE)
    options.add_output(demo)
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate once from the bundled prompts, recording the routing, then replay that recording through each
    of `DEMO_ROWS` (a lossless mix replays a live run's counters exactly), so the model loads once."""
    from specmd.sim.record import TraceRecorder
    from specmd.sim.replay import replay

    prompts = options.read_prompts(str(BUNDLED_PROMPTS))
    tokenizer = options.load_tokenizer(options.model_path(args.model))
    encoded = options.encode_prompts(tokenizer, prompts)
    price_as = options.priced_as(args.shape_from) if args.shape_from else None
    rows: dict[str, Any] = {}
    with Progress(console=cli.err, disable=args.json, transient=True) as progress:
        task = progress.add_task(f"generating with {DEMO_ROWS[0]}", total=len(DEMO_ROWS) + 2)
        with options.load_model(args, DEMO_ROWS[0]) as model:
            recorder = TraceRecorder(model.trace_meta())
            with model.observe_routing(recorder):
                texts = options.continuations(model, tokenizer, encoded, args.max_new_tokens)
            live = model.cache_stats()
        progress.advance(task)
        trace = recorder.trace()
        for policy in DEMO_ROWS:
            progress.update(task, description=f"replaying {policy}")
            rows[policy] = replay(
                trace, policy=policy, **options.cache_size(args), bandwidth_gbps=args.bandwidth_gbps,
                hardware=args.hardware, price_as=price_as,
            )  # fmt: skip
            progress.advance(task)
        progress.update(task, description=f"generating with {SPECULATIVE_ROW[0]}, speculating")
        speculative = speculative_row(args, tokenizer, encoded)
        progress.advance(task)
    notes = demo_notes(rows)
    speculative["note"] = speculation_note(speculative["stats"], rows[SPECULATIVE_ROW[0]])
    output.emit(
        args,
        {
            "model": args.model,
            "cache_frac": args.cache_frac,
            "cache_bytes": args.cache_bytes,
            "bandwidth_gbps": args.bandwidth_gbps,
            "hardware": args.hardware,
            "shape_from": args.shape_from or None,
            "prompts": prompts,
            "max_new_tokens": args.max_new_tokens,
            "live": {"policy": DEMO_ROWS[0], "outputs": texts, "stats": live.to_dict()},
            "results": [{"policy": p, "note": notes[p], "stats": s.to_dict()} for p, s in rows.items()],
            "speculative": speculative | {"stats": speculative["stats"].to_dict()},
        },
    )
    if not args.json:
        priced = f", priced as {args.shape_from}" if args.shape_from else ""
        title = (
            f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, cache {output.capacity_label(args)}, "
            f"{output.link_label(args)}, {args.hardware} compute{priced}"
        )
        table = output.metrics_table(title, "mix", fold=True, wall=False)
        for policy, stats in rows.items():
            table.add_row(policy.removesuffix("/fetch/standard"), *output.metric_cells(stats, wall=False))
        table.add_row(speculative["label"], *output.metric_cells(speculative["stats"], wall=False))
        output.show_metrics(table)
        what = Table.grid(padding=(0, 2))
        what.add_column(no_wrap=True)
        what.add_column()
        for policy, note in notes.items():
            what.add_row(policy.removesuffix("/fetch/standard"), note)
        what.add_row(speculative["label"], speculative["note"])
        cli.out.print("\nWhat to notice:")
        cli.out.print(what, highlight=False)
        speed = live.wall_tokens_per_s
        cli.out.print(
            f"\nThe model ran once, with {DEMO_ROWS[0]}, at {speed:,.{0 if speed >= 10 else 1}f} tokens/s on this "
            "machine; each row replays the routing it recorded (the same counters a live run of that mix gives).",
            style="dim",
        )
    return 0


def speculative_row(args: argparse.Namespace, tokenizer: Any, encoded: Any) -> dict[str, Any]:
    """The demo's live run of `SPECULATIVE_ROW`: a second model with an int4 self-draft, its experts resident from
    the start as a draft loaded on the device would be."""
    policy, speculate = SPECULATIVE_ROW
    draft_args = argparse.Namespace(**vars(args), speculate=speculate, draft_frac=1.0, draft_precision="int4")
    with options.load_model(draft_args, policy) as model:
        model.draft_cache.warm()
        texts = options.continuations(model, tokenizer, encoded, args.max_new_tokens, speculative=speculate)
        stats = model.cache_stats()
    label = f"{policy.removesuffix('/fetch/standard')} + speculate {speculate} (live)"
    return {"policy": policy, "speculative": speculate, "label": label, "outputs": texts, "stats": stats}


def speculation_note(stats: Any, plain: Any) -> str:
    """What the live speculative row shows against the same mix decoding plainly (its replay row)."""
    speed = stats.tokens_per_s / plain.tokens_per_s if plain.tokens_per_s else 0.0
    if not stats.drafted_tokens:
        return (
            "The governor chose K = 0 at every step: on this profile every draft pass pays the per-layer overhead of a "
            "whole pass, and its model priced speculation above plain decoding; so this is plain decoding (the same "
            "counters as the mix's row)."
        )
    return (
        f"The model drafts with its own experts at int4 ({stats.draft_capacity_bytes / 1e6:,.0f} MB of fast memory "
        f"beside the cache), verifies K+1 tokens per pass and prefetches what the draft routed to: "
        f"{stats.acceptance_rate:.0%} of drafts kept, {stats.tokens_per_verify:.2f} tokens per pass, "
        f"{speed:.2f}x the tokens/s of the same mix decoding plainly; the text is the same."
    )


def demo_notes(rows: Mapping[str, Any]) -> dict[str, str]:
    """One sentence per `DEMO_ROWS` mix saying what its numbers show, from the numbers themselves."""
    lru, ls = rows["none/lru/fetch/standard"], rows["none/least-stale/fetch/standard"]
    topk_lru, topk_ls = rows["topk/lru/fetch/standard"], rows["topk/least-stale/fetch/standard"]
    score_ls, belady = rows["score/least-stale/fetch/standard"], rows["none/belady/fetch/standard"]
    next_use = rows["none/next-use/fetch/standard"]

    def fewer(a: int, b: int, other: str) -> str:
        return f"{a / b:.1f}x fewer collisions than {other}" if b else f"no collisions where {other} has {a}"

    def points(a: Any, b: Any) -> str:
        return f"{(a.hit_rate - b.hit_rate) * 100:+.1f} points"

    return {
        "none/lru/fetch/standard": "Each pass walks the layers in order and LRU evicts the experts used longest ago: "
        "often those the next pass needs first.",
        "none/least-stale/fetch/standard": f"Least-Stale evicts experts of layers this pass has finished first: "
        f"{fewer(lru.collision_misses, ls.collision_misses, 'LRU')}, {points(ls, lru)} of hits.",
        "topk/lru/fetch/standard": f"Top-k prefetch loads the next layer's likely experts while its attention runs: "
        f"{points(topk_lru, lru)} against LRU alone.",
        "topk/least-stale/fetch/standard": f"The same prefetch over Least-Stale: "
        f"{fewer(topk_lru.collision_misses, topk_ls.collision_misses, 'top-k over LRU')}, "
        f"{points(topk_ls, topk_lru)}.",
        "score/least-stale/fetch/standard": f"SpecMD's mix (config5): score prefetch takes experts until the "
        f"router's probability is covered: {points(score_ls, topk_ls)} against top-k.",
        "none/next-use/fetch/standard": f"Beyond the paper: next-use predicts each expert's next request from "
        f"routing history; {points(next_use, belady)} from the bound.",
        "none/belady/fetch/standard": "Belady, offline: evicts the expert requested farthest ahead, the best any "
        "eviction can do without prefetch.",
    }


def _add_generate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    generate = commands.add_parser(
        "generate", help="generate text with an offloaded model, streamed as it comes, and report cache metrics"
    )
    options.add_model(generate)
    options.add_prompt_sources(generate)
    options.add_max_new_tokens(generate)
    options.add_sampling(generate)
    options.add_policy(generate)
    options.add_offload_options(generate, bandwidth=options.PROFILE)
    options.add_speculation(generate)
    options.add_output(generate)
    generate.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Each prompt's continuation, one prompt at a time, streamed unless --json; then the cache metrics."""
    sampling = options.sampling(args)
    prompts = options.given_prompts(args)
    tokenizer = options.load_tokenizer(options.model_path(args.model))
    encoded = options.encode_prompts(tokenizer, prompts)
    stream = None if args.json else lambda index: output.TextStream(tokenizer, prompts[index])
    with options.load_model(args, args.policy) as model:
        texts = options.continuations(
            model, tokenizer, encoded, args.max_new_tokens, **sampling, stream=stream, speculative=args.speculate
        )
        stats = model.cache_stats()
        offload_options = model.offload_options.to_dict()
    output.emit(args, {"model": args.model, "options": offload_options, "outputs": texts, "stats": stats.to_dict()})
    if not args.json:
        output.print_stats(args, stats)
    return 0
