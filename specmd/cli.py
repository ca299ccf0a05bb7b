"""The `specmd` command line: demo, generate, info, routing-stats, policies, trace, replay, sweep, report, eval.

Every command has --help and --json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
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
        expert_precisions=tuple(args.precisions.split(",")) if args.precisions else None,
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
    if getattr(args, "json_out", None):
        Path(args.json_out).write_text(text + "\n")
    if args.json:
        print(text)


def _print_stats(args: argparse.Namespace, stats: Any, *, wall: bool = True) -> None:
    capacity = f"{args.cache_bytes} B" if args.cache_bytes else f"{args.cache_frac:.0%}"
    table = Table(title=f"{args.policy}, cache {capacity}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, fmt in METRICS:
        if wall or not name.startswith("wall"):
            table.add_row(name, fmt(stats))
    out.print(table)
    out.print(METRIC_NOTE, style="dim")


def _bandwidth(text: str) -> float | str | None:
    """--bandwidth-gbps values: GB/s, 'native' (no emulated transfer time) or 'profile' (the hardware's link)."""
    if text in ("native", "profile"):
        return None if text == "native" else text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GB/s, 'native' or 'profile'") from None


def _read_prompts(path: str) -> list[str]:
    """One prompt per line; in a .jsonl file each line is a JSON string or {"prompt": ...}."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not path.endswith(".jsonl"):
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        item = json.loads(line)
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise ValueError(f"{path}:{number}: expected a JSON string or an object with a 'prompt' string")
        prompts.append(prompt)
    return prompts


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
    parser.add_argument(
        "--precisions",
        help="expert precisions to store, comma-separated; requests use the first (e.g. int4, or int8,int4,int2; "
        "default: the model's dtype)",
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    parser.add_argument("--out", dest="json_out", help="also write the JSON result to this file")


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
        _print_stats(args, stats)
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
        table.add_column("prefetch/eviction", no_wrap=True)
        for name, _ in METRICS:
            table.add_column(name, justify="right", overflow="fold")  # narrow terminals fold headers
        for policy, stats in results:
            table.add_row("/".join(policy.split("/")[:2]), *(fmt(stats) for _, fmt in METRICS))
        out.print(table)
        out.print(METRIC_NOTE, style="dim")
    return 0


def _size(nbytes: int) -> str:
    """Bytes in decimal units (GB = 1e9 B, as link speeds are quoted)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{nbytes} B"


def _experts(count: int) -> str:
    return "under one expert" if count == 0 else f"{count:,} expert{'s' if count > 1 else ''}"


def cmd_info(args: argparse.Namespace) -> int:
    from specmd.offload_models.info import load_config, model_info

    info = model_info(load_config(_model_path(args.model)))
    _emit(args, {"model": args.model, **info.to_dict()})
    if not args.json:
        dense = sorted(set(range(info.num_layers)) - set(info.moe_layers))
        layers = f"{len(info.moe_layers)} of {info.num_layers} layers are MoE" + (
            f" (dense: {', '.join(map(str, dense))})" if dense else ""
        )
        out.print(f"[bold]{args.model}[/bold]: {info.model_type}, loads as {info.offload_class}", highlight=False)
        out.print(
            f"{layers}; {info.experts_per_layer} experts per layer, top-{info.top_k}; "
            f"{info.routed_experts} routed experts of {info.hidden_size} x {info.expert_intermediate_size} "
            f"({info.expert_params:,} weights each)",
            highlight=False,
        )
        table = Table(
            title=f"routed-expert bytes, and what a cache of a fraction of them (at {info.full_precision}) holds"
        )
        table.add_column("precision")
        for column in ("one expert", "all experts"):
            table.add_column(column, justify="right")
        for capacity in info.precisions[0].capacities:
            table.add_column(f"{capacity.cache_frac:.0%} cache", justify="right")
        for sizes in info.precisions:
            stored = " (stored)" if sizes.precision == info.stored_precision else ""
            cells = [f"{_size(c.bytes)}: {_experts(c.experts)}" for c in sizes.capacities]
            table.add_row(sizes.precision + stored, _size(sizes.bytes_per_expert), _size(sizes.total_bytes), *cells)
        out.print(table)
        out.print(
            "GB = 1e9 B. A cache under one expert is refused at load. Non-expert weights (attention, norms, "
            "routers, shared experts, embeddings) come on top.",
            style="dim",
        )
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


def cmd_trace(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from specmd.sim.record import TraceRecorder

    prompts = _read_prompts(args.prompts)
    if not prompts:
        raise ValueError(f"{args.prompts} holds no prompts")
    tokenizer = AutoTokenizer.from_pretrained(_model_path(args.model))
    with _load(args, args.policy) as model:
        recorder = TraceRecorder(model.trace_meta())
        with model.observe_routing(recorder):
            _generate(model, tokenizer, prompts, args.max_new_tokens)
        stats = model.cache_stats()
    trace = recorder.trace()
    path = trace.save(args.out)
    _emit(args, {"trace": str(path), "events": len(trace.events), "prompts": len(prompts), "stats": stats.to_dict()})
    if not args.json:
        out.print(f"wrote {len(trace.events)} routing records of {len(prompts)} prompts to {path}")
        _print_stats(args, stats)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from specmd.sim.replay import replay
    from specmd.sim.trace import load_trace

    trace = load_trace(args.trace, experts_per_layer=args.experts_per_layer, expert_bytes=args.expert_bytes)
    stats = replay(
        trace,
        policy=args.policy,
        cache_frac=args.cache_frac if args.cache_bytes is None else None,
        cache_bytes=args.cache_bytes,
        bandwidth_gbps=args.bandwidth_gbps,
        link_latency_s=None if args.link_latency_us is None else args.link_latency_us * 1e-6,
        hardware=args.hardware,
    )
    _emit(args, {"trace": args.trace, "trace_sha256": trace.sha256, "policy": args.policy, "stats": stats.to_dict()})
    if not args.json:
        _print_stats(args, stats, wall=False)  # a replay has no wall clock
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from specmd.sim.sweep import SweepGrid, sweep

    given = {
        "traces": args.traces,
        "policies": args.policy,
        "cache_fracs": args.cache_frac,
        "bandwidths": args.bandwidth_gbps,
        "hardware": args.hardware,
    }
    if args.grid:
        grid = SweepGrid.from_toml(args.grid, **given)
    else:
        needed = (("TRACE", "traces"), ("--policy", "policies"), ("--cache-frac", "cache_fracs"))
        missing = [flag for flag, key in needed if not given[key]]
        if missing:
            raise ValueError(f"a sweep needs {', '.join(missing)} (or a --grid file)")
        grid = SweepGrid(**{k: tuple(v) for k, v in given.items() if v})
    if args.no_baselines:
        grid = SweepGrid(**{**grid.__dict__, "baselines": False})
    rows = sweep(grid, args.out, jobs=args.jobs, progress=not args.json)
    _emit(args, {"results": args.out, "new_runs": len(rows), "runs": len(grid.runs())})
    if not args.json:
        out.print(f"{len(rows)} new runs of {len(grid.runs())} written to {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from specmd.sim.report import report

    files = report(args.results, args.out)
    _emit(args, {"files": [str(f) for f in files]})
    if not args.json:
        out.print(f"wrote {files[0]} and {len(files) - 1} figures")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from specmd.eval_tasks import TASK_DIR

    if args.print_task_dir:
        print(TASK_DIR)
        return 0
    try:
        from lm_eval.utils import handle_non_serializable, make_table
    except ModuleNotFoundError as exc:
        raise ValueError(f"specmd eval needs lm_eval ({exc.name} is missing): pip install 'specmd[eval]'") from None

    from specmd.eval_tasks.run import evaluate

    results = evaluate(
        _model_path(args.model),
        [name for name in args.tasks.split(",") if name],
        data=args.data,
        cache_frac=args.cache_frac if args.cache_bytes is None else None,
        cache_bytes=args.cache_bytes,
        policy=args.policy,
        bandwidth_gbps=args.bandwidth_gbps,
        hardware=args.hardware,
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        max_gen_toks=args.max_gen_toks,
        log_samples=args.log_samples,
        progress=not args.json,
    )
    _emit(args, json.loads(json.dumps(results, default=handle_non_serializable)))
    if not args.json:
        print(make_table(results))  # lm_eval's own Markdown table, as the lm_eval command prints it
        capacity = f"{args.cache_bytes} B" if args.cache_bytes else f"{args.cache_frac:.0%}"
        link = f"{args.bandwidth_gbps} GB/s" if args.bandwidth_gbps else "native speed"
        table = Table(title=f"expert cache per task: {args.policy}, cache {capacity}, {link}")
        table.add_column("task", no_wrap=True)
        for name, _ in METRICS:
            table.add_column(name, justify="right")
        table.add_column("MB moved", justify="right")
        for task, stats in results["config"]["specmd"]["tasks"].items():
            row = SimpleNamespace(**stats)
            table.add_row(task, *(fmt(row) for _, fmt in METRICS), f"{row.bytes_transferred / 1e6:,.1f}")
        out.print(table)
        out.print(METRIC_NOTE, style="dim")
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

    info = commands.add_parser(
        "info", help="layers, experts, top-k and expert bytes of a model, from its config alone (no weights)"
    )
    info.add_argument("model", help="checkpoint directory, config.json file, hub id, or 'default'")
    _add_output_options(info)
    info.set_defaults(func=cmd_info)

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

    trace = commands.add_parser("trace", help="record a routing trace while generating from a file of prompts")
    trace.add_argument("model", help="model directory or hub id, or 'default'")
    trace.add_argument("--prompts", required=True, help="one prompt per line (or a .jsonl of strings)")
    trace.add_argument("--out", required=True, help="trace file to write: .jsonl (interchange) or .npz (compact)")
    trace.add_argument("--max-new-tokens", type=int, default=32)
    trace.add_argument(
        "--policy", default=DEFAULT_POLICY, help="the live run's policy (the trace does not depend on it)"
    )
    _add_cache_options(trace, bandwidth=None)
    trace.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    trace.set_defaults(func=cmd_trace)

    replay = commands.add_parser("replay", help="replay a routing trace through a policy mix, no model needed")
    replay.add_argument("trace", help="a .jsonl or .npz trace")
    replay.add_argument("--policy", default=DEFAULT_POLICY, help="prefetch/eviction/miss/routing")
    size = replay.add_mutually_exclusive_group(required=True)
    size.add_argument("--cache-frac", type=float, help="fraction of all expert bytes cached")
    size.add_argument("--cache-bytes", type=int, help="cache capacity in bytes")
    replay.add_argument("--bandwidth-gbps", type=_bandwidth, default="profile",
                        help="GB/s, 'native' or 'profile' (default: the hardware profile's link)")  # fmt: skip
    replay.add_argument("--link-latency-us", type=float, help="per-transfer latency (default: the profile's)")
    replay.add_argument(
        "--hardware", default="a100", help="hardware profile (a100, rtx4090, h100-pcie, laptop-rtx4060)"
    )
    replay.add_argument("--experts-per-layer", type=int, help="for traces whose header lacks it")
    replay.add_argument("--expert-bytes", type=int, help="bytes of one expert, for traces whose header lacks it")
    _add_output_options(replay)
    replay.set_defaults(func=cmd_replay)

    sweep = commands.add_parser("sweep", help="replay traces x capacities x bandwidths x policies into a CSV")
    sweep.add_argument("traces", nargs="*", help="trace files")
    sweep.add_argument("--grid", help="a TOML grid (traces, policies, cache_frac, bandwidth_gbps, hardware)")
    sweep.add_argument("--policy", action="append", help="a policy mix (repeat for several)")
    sweep.add_argument("--cache-frac", type=float, nargs="+", help="capacities as fractions of all expert bytes")
    sweep.add_argument("--bandwidth-gbps", type=_bandwidth, nargs="+", help="GB/s, 'native' or 'profile'")
    sweep.add_argument("--hardware", nargs="+", help="hardware profiles (default: a100)")
    sweep.add_argument("--no-baselines", action="store_true", help="leave out the Belady and unbounded runs")
    sweep.add_argument("--out", required=True, help="results CSV (existing rows are kept and skipped)")
    sweep.add_argument("--jobs", type=int, help="worker processes (default: one per core)")
    sweep.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    sweep.set_defaults(func=cmd_sweep)

    report = commands.add_parser("report", help="write Markdown tables and PNG figures from sweep results")
    report.add_argument("results", help="results CSV from `specmd sweep`")
    report.add_argument("--out", required=True, help="directory for report.md and the figures")
    report.add_argument("--json", action="store_true", help="print the written files as JSON")
    report.set_defaults(func=cmd_report)

    evaluate = commands.add_parser(
        "eval", help="lm_eval tasks (the paper's GSM8K, TruthfulQA, NaturalQuestions) on an offloaded model"
    )
    evaluate.add_argument("model", nargs="?", default="default", help="model directory or hub id (default: bundled)")
    evaluate.add_argument(
        "--tasks", default="specmd", help="comma-separated lm_eval tasks or tags (default: specmd, the three tasks; "
        "specmd_paper: their 100-document samples)",
    )  # fmt: skip
    evaluate.add_argument(
        "--data", default="fixtures", help="where specmd's tasks read documents: fixtures (the shipped offline items, "
        "default), hub (the standard datasets) or a directory of <dataset>/<split>.jsonl files",
    )  # fmt: skip
    evaluate.add_argument("--policy", default=DEFAULT_POLICY, help="prefetch/eviction/miss/routing")
    _add_cache_options(evaluate, bandwidth=5.0)
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    evaluate.add_argument("--batch-size", type=int, default=1)
    evaluate.add_argument("--limit", type=float, help="documents per task (a fraction if below 1)")
    evaluate.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    evaluate.add_argument("--max-gen-toks", type=int, help="longest generation (default: lm_eval's, 256)")
    evaluate.add_argument("--log-samples", action="store_true", help="keep every prompt and output in the result")
    evaluate.add_argument(
        "--print-task-dir", action="store_true", help="print the task directory for `lm_eval --include_path` and exit"
    )
    _add_output_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
    except ImportError as exc:  # a precision whose optional library is missing: the message names the extra
        from specmd.quant.formats import MissingBackendError

        if not isinstance(exc, MissingBackendError):
            raise
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
