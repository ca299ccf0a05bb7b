"""The options several commands share, each defined once here, and what their values mean.

A command adds them with the `add_*` functions; `load_model` builds the offloaded model the live-run options
describe. Heavy imports (torch, transformers, the model classes) wait inside the functions that use them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

BUNDLED = "default"  # the model name that stands for the bundled model
DTYPES = ("auto", "fp32", "bf16", "fp16")
NATIVE, PROFILE = "native", "profile"  # the --bandwidth-gbps words; PROFILE passes on as is (cache.config.PROFILE)
LINK_VALUES = f"GB/s, {NATIVE!r} or {PROFILE!r}"
MODEL_HELP = "model directory or hub id, or 'default'"
POLICY_HELP = "prefetch/eviction/miss/routing"
JSON_HELP = "print machine-readable JSON instead of tables"


# ---- the model ----------------------------------------------------------------------------------
def add_model(
    parser: argparse.ArgumentParser, text: str = MODEL_HELP, *, flag: bool = False, optional: bool = False
) -> None:
    """The model to use: a positional, optional (the bundled model) with `optional`, or `--model` with `flag`."""
    if flag:
        parser.add_argument("--model", default=BUNDLED, help=text)
    elif optional:
        parser.add_argument("model", nargs="?", default=BUNDLED, help=text)
    else:
        parser.add_argument("model", help=text)


def model_path(name: str) -> str:
    """A model argument as a directory or hub id: 'default' is the bundled model."""
    if name == BUNDLED:
        from specmd.default_model import default_model_path

        return str(default_model_path())
    return name


def add_dtype(parser: argparse.ArgumentParser, text: str = "model and expert dtype (auto: as saved)") -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help=text)


def torch_dtype(name: str) -> Any:
    """A --dtype value as transformers' `dtype` argument."""
    import torch

    return {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def add_policy(parser: argparse.ArgumentParser, text: str = POLICY_HELP, *, many: bool = False) -> None:
    """--policy: one policy mix (default: the library's), or with `many` a list built by repeating it."""
    if many:
        parser.add_argument("--policy", action="append", help=text)
        return
    from specmd.cache.policies import DEFAULT_POLICY

    parser.add_argument("--policy", default=DEFAULT_POLICY, help=text)


# ---- the cache, the link and the hardware ------------------------------------------------------
def add_cache_size(parser: argparse.ArgumentParser, *, default: float | None = 0.05) -> None:
    """--cache-frac or --cache-bytes, not both; with no --cache-frac default one of them is required."""
    size = parser.add_mutually_exclusive_group(required=default is None)
    size.add_argument(
        "--cache-frac",
        type=float,
        default=default,
        help="fraction of all expert bytes cached" + (f" ({default})" if default else ""),
    )
    size.add_argument(
        "--cache-bytes", type=int, help="cache capacity in bytes" + (", instead of --cache-frac" if default else "")
    )


def cache_size(args: argparse.Namespace) -> dict[str, Any]:
    """The `cache_frac` and `cache_bytes` keywords: --cache-bytes, when given, replaces --cache-frac."""
    return {"cache_frac": args.cache_frac if args.cache_bytes is None else None, "cache_bytes": args.cache_bytes}


def parse_bandwidth(text: str) -> float | str | None:
    """A --bandwidth-gbps value: GB/s, 'native' (None: no emulated transfer time) or 'profile' (the hardware's link)."""
    if text in (NATIVE, PROFILE):
        return None if text == NATIVE else text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of {LINK_VALUES}") from None


def add_link(parser: argparse.ArgumentParser, default: float | str | None = None, *, many: bool = False) -> None:
    """--bandwidth-gbps, the emulated host-to-device link; with `many`, a list of them."""
    if many:
        text = LINK_VALUES
    elif default == PROFILE:
        text = f"{LINK_VALUES} (default: the hardware profile's link)"
    else:
        text = f"emulated host-to-device link, GB/s (default: {default or 'native speed, no emulation'})"
    parser.add_argument(
        "--bandwidth-gbps", type=parse_bandwidth, nargs="+" if many else None, default=default, help=text
    )


def add_hardware(
    parser: argparse.ArgumentParser,
    text: str = "hardware profile pricing emulated compute ({default})",
    *,
    many: bool = False,
) -> None:
    """--hardware, a profile of the registry (default: its default); `text` may name {default} and {profiles}."""
    from specmd.cache.hardware import DEFAULT_HARDWARE, PROFILES

    text = text.format(default=DEFAULT_HARDWARE, profiles=", ".join(PROFILES))
    if many:
        parser.add_argument("--hardware", nargs="+", help=text)
    else:
        parser.add_argument("--hardware", default=DEFAULT_HARDWARE, help=text)


def add_shape_from(parser: argparse.ArgumentParser, *, many: bool = False, routing: str = "the trace's") -> None:
    """--shape-from: price experts and compute as another model's (a config.json, directory, hub id or bundled name)."""
    from specmd.offload_models.info import bundled_configs

    parser.add_argument(
        "--shape-from",
        nargs="+" if many else None,
        metavar="CONFIG",
        help="price every expert and layer as this model's: a config.json, a checkpoint directory, a hub id or one "
        f"of {', '.join(bundled_configs())} ({routing} routing is kept)",
    )


def priced_as(name: str) -> Any:
    """The `ExpertLayout` a `--shape-from` value names."""
    from specmd.offload_models.info import expert_layout, load_config

    return expert_layout(load_config(name))


def add_offload_options(parser: argparse.ArgumentParser, bandwidth: float | None) -> None:
    """What a live run's offloaded model is built with (`load_model`): cache size, link, hardware, precisions."""
    add_cache_size(parser)
    add_link(parser, bandwidth)
    add_hardware(parser)
    add_shape_from(parser, routing="the model's")
    add_dtype(parser)
    parser.add_argument(
        "--precisions",
        help="expert precisions to store, comma-separated; requests use the first (e.g. int4, or int8,int4,int2; "
        "default: the model's dtype)",
    )


def load_model(args: argparse.Namespace, policy: str) -> Any:
    """The offloaded model of --model (or the model positional) with the `add_offload_options` settings."""
    from specmd.offload_models.auto import AutoOffloadForCausalLM

    return AutoOffloadForCausalLM.from_pretrained(
        model_path(args.model),
        **cache_size(args),
        policy=policy,
        bandwidth_gbps=args.bandwidth_gbps,
        hardware=args.hardware,
        shape_from=args.shape_from,
        expert_precisions=tuple(args.precisions.split(",")) if args.precisions else None,
        dtype=torch_dtype(args.dtype),
        progress=not args.json,
    )


def continuations(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of each prompt, one request at a time."""
    texts = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        texts.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return texts


# ---- output -----------------------------------------------------------------------------------------
def add_json(parser: argparse.ArgumentParser, text: str = JSON_HELP) -> None:
    parser.add_argument("--json", action="store_true", help=text)


def add_output(parser: argparse.ArgumentParser) -> None:
    """--json, and --out for a copy of the JSON result (`output.emit`)."""
    add_json(parser)
    parser.add_argument("--out", dest="json_out", help="also write the JSON result to this file")
