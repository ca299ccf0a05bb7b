"""What a model is and how it routes, and which policies there are: `specmd info`, `routing-stats`, `policies`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rich.table import Table

from specmd import cli
from specmd.cli import options, output
from specmd.sim.report import percent

ROUTING_NOTE = (
    "entropy: of the layer's expert usage (max: every expert used equally); top-1 reuse: consecutive tokens with "
    "the same top-1 expert; any reuse: share of a token's experts the previous token also used; prefetch recall: "
    "share of a layer's experts in the top-k of its router applied to the previous layer's input. "
    "Uniform-random routing in brackets."
)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_info(commands)
    _add_routing_stats(commands)
    _add_policies(commands)


def _add_info(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    info = commands.add_parser(
        "info", help="layers, experts, top-k and expert bytes of a model, from its config alone (no weights)"
    )
    options.add_model(info, "checkpoint directory, config.json file, hub id, or 'default'")
    info.add_argument(
        "--cache-frac", type=options.fraction, nargs="+", default=[0.01, 0.05, 0.25],
        help="capacities to size, as fractions of all expert bytes (0.01 0.05 0.25)",
    )  # fmt: skip
    info.add_argument(
        "--kv-tokens", type=options.positive_int, default=1000,
        help="tokens of context whose KV cache (batch 1) the device memory counts (1000)",
    )  # fmt: skip
    options.add_output(info)
    info.set_defaults(func=cmd_info)


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

    info = model_info(load_config(options.model_path(args.model)), tuple(args.cache_frac), args.kv_tokens)
    output.emit(args, {"model": args.model, **info.to_dict()})
    if not args.json:
        dense = sorted(set(range(info.num_layers)) - set(info.moe_layers))
        layers = f"{len(info.moe_layers)} of {info.num_layers} layers are MoE" + (
            f" (dense: {', '.join(map(str, dense))})" if dense else ""
        )
        cli.out.print(f"[bold]{args.model}[/bold]: {info.model_type}, loads as {info.offload_class}", highlight=False)
        cli.out.print(
            f"{layers}; {info.experts_per_layer} experts per layer, top-{info.top_k}; "
            f"{info.routed_experts} routed experts of {info.hidden_size} x {info.expert_intermediate_size} "
            f"({info.expert_params:,} weights each)",
            highlight=False,
        )
        table = Table(
            title=f"routed-expert bytes, and what a cache of a fraction of them (at {info.full_precision}) holds"
        )
        table.add_column("precision")
        for column in ("one expert", "all experts (host RAM)"):
            table.add_column(column, justify="right")
        for capacity in info.precisions[0].capacities:
            table.add_column(f"{percent(capacity.cache_frac)} cache", justify="right")
        for sizes in info.precisions:
            stored = " (stored)" if sizes.precision == info.stored_precision else ""
            cells = [f"{_size(c.bytes)}: {_experts(c.experts)}" for c in sizes.capacities]
            table.add_row(sizes.precision + stored, _size(sizes.bytes_per_expert), _size(sizes.total_bytes), *cells)
        cli.out.print(table)
        device = Table(title=f"fast memory at batch 1 with {args.kv_tokens:,} tokens of context")
        for column in ("cache", "expert cache", "other weights", "KV cache", "total"):
            device.add_column(column, justify="right")
        for need in info.device:
            device.add_row(
                percent(need.cache_frac), _size(need.cache_bytes), _size(need.dense_bytes), _size(need.kv_bytes),
                _size(need.total_bytes),
            )  # fmt: skip
        cli.out.print(device)
        cli.out.print(
            f"GB = 1e9 B. A cache under one expert is refused at load. Host RAM: every expert at each precision "
            f"stored (storage='ram'; several precisions, their sum). Other weights: embeddings, attention, norms, "
            f"routers, dense and shared MLPs, LM head at {info.full_precision}, kept in fast memory. KV cache: "
            f"{_size(info.kv_bytes_per_token * 1000)} per 1,000 tokens. Activations and the framework's buffers "
            f"come on top.",
            style="dim",
        )
    return 0


def _add_routing_stats(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    routing = commands.add_parser("routing-stats", help="per-layer routing statistics that matter to a cache")
    options.add_model(routing)
    routing.add_argument("--text", required=True, help="a UTF-8 text file to run the model over")
    routing.add_argument("--window", type=options.integer(2), default=512, help="tokens per forward pass (512)")
    routing.add_argument(
        "--max-tokens", type=options.integer(2), default=8192, help="use at most this many tokens of the text"
    )
    options.add_dtype(routing, "model dtype (auto: as saved)")
    options.add_device(routing)
    options.add_output(routing)
    routing.set_defaults(func=cmd_routing_stats)


def cmd_routing_stats(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from specmd.offload_models.checkpoint import read_config
    from specmd.sim.routing_stats import routing_stats, text_sequences

    path = options.model_path(args.model)
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    tokenizer = options.load_tokenizer(path)
    sequences = text_sequences(tokenizer, text, args.window, args.max_tokens)
    if not sequences:
        raise ValueError(f"--text {args.text} has fewer than 2 tokens")
    config = read_config(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=options.torch_dtype(args.dtype), device_map={"": options.device(args)},
        trust_remote_code=False,
    ).eval()  # fmt: skip
    stats = routing_stats(model, sequences)
    output.emit(args, {"model": args.model, "text": args.text, "window": args.window} | stats.to_dict())
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
        cli.out.print(table)
        cli.out.print(ROUTING_NOTE, style="dim")
    return 0


def _add_policies(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policies = commands.add_parser(
        "policies", help="list every policy and named configuration: aliases, parameters and what it does"
    )
    options.add_plugins(policies)
    options.add_output(policies)
    policies.set_defaults(func=cmd_policies)


def _value(value: object) -> str:
    """A parameter's default as a mix's text writes it: (0.2,0.1), (int8,nf4,hqq2), cyclic, 1.5."""
    if isinstance(value, tuple | list):
        return "(" + ",".join(_value(v) for v in value) + ")"
    return str(value)


def cmd_policies(args: argparse.Namespace) -> int:
    from inspect import Parameter

    from specmd.cache.policies import DEFAULT_POLICY, catalog
    from specmd.cache.policies.spec import parameters

    rows = [(*row, parameters(row[0], row[1]) if row[0] != "config" else {}) for row in catalog()]
    output.emit(
        args,
        {
            "default": DEFAULT_POLICY,
            "policies": [
                {
                    "kind": k,
                    "name": n,
                    "aliases": list(a),
                    "description": d,
                    "parameters": {name: None if v is Parameter.empty else v for name, v in p.items()},
                }
                for k, n, a, d, p in rows
            ],
        },
    )
    if not args.json:
        table = Table(title=f"policies (default: {DEFAULT_POLICY})")
        for column in ("kind", "name", "aliases", "parameters (defaults)", "description"):
            table.add_column(column, overflow="fold")
        for kind, name, aliases, description, params in rows:
            listed = [name if v is Parameter.empty else f"{name}={_value(v)}" for name, v in params.items()]
            table.add_row(kind, name, ", ".join(aliases), "\n".join(listed), description)
        cli.out.print(table)
        cli.out.print(
            "A mix is prefetch/eviction/miss/routing; parameters follow a name after ':', e.g. "
            "topk:overfetch=1.5/least-stale/fetch/standard.",
            style="dim",
            highlight=False,
        )
    return 0
