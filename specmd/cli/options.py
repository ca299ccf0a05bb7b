"""The options several commands share, each defined once here, and what their values mean.

A command adds them with the `add_*` functions; `load_model` builds the offloaded model the live-run options
describe. Heavy imports (torch, transformers, the model classes) wait inside the functions that use them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BUNDLED = "default"  # the model name that stands for the bundled model
STDIN = "-"  # a prompt source that stands for standard input
DTYPES = ("auto", "fp32", "bf16", "fp16")
NATIVE, PROFILE = "native", "profile"  # the --bandwidth-gbps words; PROFILE passes on as is (cache.config.PROFILE)
LINK_VALUES = f"GB/s, {NATIVE!r} or {PROFILE!r}"
MODEL_HELP = "model directory or hub id, or 'default'"
POLICY_HELP = "prefetch/eviction/miss/routing"
JSON_HELP = "print machine-readable JSON instead of tables"


# ---- the parser and the values it takes -------------------------------------------------------------
class UsageError(Exception):
    """A command line argparse refuses: `main` prints it as one line and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are a `UsageError` (one line, exit 2) instead of usage text and exit."""

    def error(self, message: str) -> Any:  # argparse's hook; every parse error comes through here
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def integer(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = integer(1)
non_negative_int = integer(0)


def _number(text: str, what: str, allowed: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not allowed(value):
        raise argparse.ArgumentTypeError(f"must be a number {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    return _number(text, "> 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    return _number(text, ">= 0", lambda v: v >= 0)


def fraction(text: str) -> float:
    """An argparse type: a number with 0 < value <= 1 (a share of all expert bytes)."""
    return _number(text, "with 0 < value <= 1", lambda v: 0 < v <= 1)


def speculation(text: str) -> int | str:
    """An argparse type: drafted tokens per verify pass, a whole number K >= 0, or auto / auto:K_max."""
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) >= 1):
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"must be a whole number K >= 0, auto or auto:K_max (K_max >= 1), got {text!r}")


def byte_size(text: str) -> int:
    """An argparse type: a byte count, as digits or a size such as 3MB or 6GiB (`specmd.cache.sizes`)."""
    from specmd.cache.sizes import SIZE_FORMS, parse_size

    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {SIZE_FORMS}, got {text!r}") from None


def prompt_text(text: str) -> str:
    """An argparse type: a prompt, which must not be empty (the model needs a token to start from)."""
    if not text:
        raise argparse.ArgumentTypeError("a prompt must hold at least one character, got ''")
    return text


def output_file(text: str) -> str:
    """An argparse type: a file to write, whose folder must exist (checked before anything runs)."""
    folder = Path(text).expanduser().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: folder {folder} does not exist")
    if Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: it is a folder; give a file name")
    return text


# ---- the model ----------------------------------------------------------------------------------
def add_model(parser: argparse.ArgumentParser, text: str = MODEL_HELP, *, optional: bool = False) -> None:
    """The model to use: a positional, optional (the bundled model) with `optional`."""
    if optional:
        parser.add_argument("model", nargs="?", default=BUNDLED, help=text)
    else:
        parser.add_argument("model", help=text)


def model_path(name: str) -> str:
    """A model argument as a directory or hub id: 'default' is the bundled model. A hub id neither cached nor
    reachable is a ValueError at once (the hub's client would retry for half a minute first)."""
    if name == BUNDLED:
        from specmd.default_model import default_model_path

        return str(default_model_path())
    from specmd.default_model import bundled_configs

    if not Path(name).expanduser().exists() and name not in bundled_configs():
        _check_hub_reachable(name)
    return name


def _check_hub_reachable(repo_id: str) -> None:
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return  # not a hub id (a missing path): the loader names it
    if constants.HF_HUB_OFFLINE or try_to_load_from_cache(repo_id, "config.json") is not None:
        return  # offline mode reads the cache at once; a cached model loads even when the hub is down
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as exc:
        raise ValueError(
            f"{repo_id} is not a local directory or file, is not in the Hugging Face cache, and the hub "
            f"({constants.ENDPOINT}) cannot be reached ({exc}): give a local checkpoint directory, or download the "
            "model while online"
        ) from None


def device_name(text: str) -> str:
    """An argparse type: a device a model runs on, as transformers names it: cpu, cuda or cuda:N."""
    if text == "cpu" or re.fullmatch(r"cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", type=device_name, help="cpu, cuda or cuda:N: where the model and its expert cache live "
        "(default: cuda when available, else cpu)",
    )  # fmt: skip


def device(args: argparse.Namespace) -> str:
    """--device, or cuda when torch sees a GPU, else cpu."""
    if args.device:
        return str(args.device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_dtype(parser: argparse.ArgumentParser, text: str = "model and expert dtype (auto: as saved)") -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help=text)


def torch_dtype(name: str) -> Any:
    """A --dtype value as transformers' `dtype` argument."""
    import torch

    return {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def add_policy(parser: argparse.ArgumentParser, text: str = POLICY_HELP, *, many: bool = False) -> None:
    """--policy: one policy mix (default: the library's), or with `many` a list built by repeating it; and
    --plugin, for policies of other modules."""
    add_plugins(parser)
    if many:
        parser.add_argument("--policy", action="append", help=text)
        return
    from specmd.cache.policies import DEFAULT_POLICY

    parser.add_argument("--policy", default=DEFAULT_POLICY, help=text)


def add_plugins(parser: argparse.ArgumentParser) -> None:
    """--plugin MODULE, repeatable: modules `main` imports before the command runs (`load_plugins`)."""
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this module first, whose import registers policies (repeat for several; installed plugins "
        "of the 'specmd.policies' entry-point group load on their own)",
    )


def load_plugins(args: argparse.Namespace) -> None:
    """Import the --plugin modules of a parsed command line (a command without the option has none)."""
    from specmd.cache.policies.plugins import load_plugin

    for module in getattr(args, "plugin", None) or ():
        load_plugin(module)


# ---- the cache, the link and the hardware ------------------------------------------------------
def add_cache_size(parser: argparse.ArgumentParser, *, default: float | None = 0.05, many: bool = False) -> None:
    """--cache-frac or --cache-bytes, not both; with no --cache-frac default one of them is required.

    With `many`, only --cache-frac, a list of capacities.
    """
    if many:
        parser.add_argument(
            "--cache-frac", type=fraction, nargs="+", help="capacities as fractions of all expert bytes"
        )
        return
    size = parser.add_mutually_exclusive_group(required=default is None)
    size.add_argument(
        "--cache-frac",
        type=fraction,
        default=default,
        help="fraction of all expert bytes cached" + (f" ({default})" if default else ""),
    )
    size.add_argument(
        "--cache-bytes",
        type=byte_size,
        help="cache capacity: bytes, or a size such as 600MB or 2GiB"
        + (", instead of --cache-frac" if default else ""),
    )


def cache_size(args: argparse.Namespace) -> dict[str, Any]:
    """The `cache_frac` and `cache_bytes` keywords: --cache-bytes, when given, replaces --cache-frac."""
    return {"cache_frac": args.cache_frac if args.cache_bytes is None else None, "cache_bytes": args.cache_bytes}


def parse_bandwidth(text: str) -> float | str | None:
    """A --bandwidth-gbps value: GB/s, 'native' (None: no emulated transfer time) or 'profile' (the hardware's link)."""
    if text in (NATIVE, PROFILE):
        return None if text == NATIVE else text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a number > 0 of {LINK_VALUES}, got {text!r}") from None


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
    default: str | None = None,
) -> None:
    """--hardware, a profile of the registry (default: `default`, else the registry's); `text` may name {default}
    and {profiles}."""
    from specmd.cache.hardware import DEFAULT_HARDWARE, PROFILES

    default = default or DEFAULT_HARDWARE
    text = text.format(default=default, profiles=", ".join(PROFILES))
    if many:
        parser.add_argument("--hardware", nargs="+", help=text)
    else:
        parser.add_argument("--hardware", default=default, help=text)


def add_shape_from(
    parser: argparse.ArgumentParser, *, many: bool = False, routing: str = "the trace's", default: str | None = None
) -> None:
    """--shape-from: price experts and compute as another model's (a config.json, directory, hub id or bundled name)."""
    from specmd.default_model import bundled_configs  # not info's module: it imports transformers' models

    parser.add_argument(
        "--shape-from",
        nargs="+" if many else None,
        metavar="CONFIG",
        default=default,
        help="price every expert and layer as this model's: a config.json, a checkpoint directory, a hub id or one "
        f"of {', '.join(bundled_configs())} ({routing} routing is kept"
        + (f"; default: {default}, '' for the model's own)" if default else ")"),
    )


def priced_as(name: str) -> Any:
    """The `ExpertLayout` a `--shape-from` value names."""
    from specmd.offload_models.info import expert_layout, load_config

    return expert_layout(load_config(name))


def add_offload_options(
    parser: argparse.ArgumentParser,
    bandwidth: float | str | None,
    *,
    hardware: str | None = None,
    shape_from: str | None = None,
) -> None:
    """What a live run's offloaded model is built with (`load_model`): cache size, link, hardware (default:
    `hardware`, else the registry's), pricing (default: `shape_from`), precisions."""
    add_cache_size(parser)
    add_link(parser, bandwidth)
    add_hardware(parser, default=hardware)
    add_shape_from(parser, routing="the model's", default=shape_from)
    add_device(parser)
    add_dtype(parser)
    parser.add_argument(
        "--precisions",
        help="expert precisions to store, comma-separated; requests use the first (e.g. int4, or int8,int4,int2; "
        "default: the model's dtype)",
    )
    add_storage(parser)


def add_storage(parser: argparse.ArgumentParser, *, replay: bool = False, many: bool = False) -> None:
    """--storage, the tier holding every expert's full copy (`from_pretrained`'s `storage`, which checks the name
    against the registered tiers before anything loads), and with it the host-RAM tier and the disk
    (`storage_settings`).
    With `many` (a sweep), lists of host-tier fractions and disks, no --host-cache-bytes, and no defaults (the
    grid's apply).
    """
    parser.add_argument(
        "--storage",
        metavar="{ram,disk}",
        default=None if many else "ram",
        help="where every expert's full copy lives: ram (host memory) or disk (read from the checkpoint's files on "
        "demand, for models larger than RAM)" + (" as the emulation prices it" if replay else "") + " (default: ram)",
    )
    host = parser.add_mutually_exclusive_group()
    host.add_argument(
        "--host-cache-frac",
        type=fraction,
        nargs="+" if many else None,
        help="with --storage disk: a host-RAM tier between the disk and the cache holding this fraction of all expert "
        "bytes" + ("; several are swept" if many else "") + " (default: none)",
    )
    if not many:
        host.add_argument(
            "--host-cache-bytes", type=byte_size, help="the host-RAM tier as bytes or a size such as 16GB, instead"
        )
    parser.add_argument(
        "--host-eviction",
        default=None if many else "lru",
        help="the host-RAM tier's eviction policy, e.g. lru, lfu, fld" + ("" if many else " (default: lru)"),
    )
    parser.add_argument(
        "--disk",
        type=disk_name,
        nargs="+" if many else None,
        default=None if many else PROFILE,
        help=f"with --storage disk: the drive the emulation prices reads on: {', '.join(_disks())}, profile (the "
        "hardware profile's) or native (no emulated time) (default: profile)",
    )


def _disks() -> list[str]:
    from specmd.cache.hardware import DISKS

    return list(DISKS)


def disk_name(text: str) -> str | None:
    """A --disk value: a disk profile's name, 'profile' (the hardware's drive) or 'native' (None)."""
    if text == NATIVE:
        return None
    if text != PROFILE and text not in _disks():
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(_disks())}, {PROFILE} or {NATIVE}, got {text!r}")
    return text


def storage_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `add_storage` keywords of `from_pretrained` and `replay`."""
    return {
        "storage": args.storage,
        "host_cache_frac": args.host_cache_frac,
        "host_cache_bytes": args.host_cache_bytes,
        "host_eviction": args.host_eviction,
        "disk": args.disk,
    }


def add_speculation(parser: argparse.ArgumentParser, *, replay: bool = False, many: bool = False) -> None:
    """--speculate (repeatable with `many`) and the draft's flags (`add_draft`): speculative decoding with the
    self-draft, live (`load_model`) or replayed from a lookahead trace (`replay`: the trace fixes the precision)."""
    from specmd.cache.governor import DEFAULT_K_MAX

    where = "replayed from a lookahead trace (specmd trace --lookahead K)" if replay else "with the model's self-draft"
    parser.add_argument(
        "--speculate", type=speculation, metavar="auto|K", action="append" if many else None,
        help=f"speculative decoding {where}: K drafted tokens per verify pass, or auto (a governor picks K in "
        f"0..{DEFAULT_K_MAX} each step; auto:K_max sets the bound)"
        + (" (repeat for several; plain decoding runs beside them)" if many else " (default: off)"),
    )  # fmt: skip
    add_draft(parser, precision=not replay)


def add_draft(parser: argparse.ArgumentParser, *, precision: bool = True) -> None:
    """--draft-frac and (with `precision`) --draft-precision: the self-draft's budget and precision."""
    parser.add_argument(
        "--draft-frac", type=fraction, default=1.0,
        help="the draft's fast memory, as a fraction of every expert at the draft's precision (default 1: all)",
    )  # fmt: skip
    if precision:
        parser.add_argument(
            "--draft-precision", default="int4", help="the stored precision the draft's experts run at (default int4)"
        )


def draft_options(args: argparse.Namespace) -> dict[str, Any]:
    """`from_pretrained`'s draft keywords when --speculate or --lookahead is given (none otherwise)."""
    if getattr(args, "speculate", None) is None and getattr(args, "lookahead", None) is None:
        return {}
    return {"draft_frac": args.draft_frac, "draft_precision": args.draft_precision}


def load_model(args: argparse.Namespace, policy: str) -> Any:
    """The offloaded model of --model (or the model positional) with the `add_offload_options` settings (and
    `add_speculation`'s, where the command has them)."""
    from specmd.offload_models.auto import AutoOffloadForCausalLM

    return AutoOffloadForCausalLM.from_pretrained(
        model_path(args.model),
        **cache_size(args),
        policy=policy,
        bandwidth_gbps=args.bandwidth_gbps,
        hardware=args.hardware,
        shape_from=args.shape_from or None,
        expert_precisions=tuple(args.precisions.split(",")) if args.precisions else None,
        **storage_settings(args),
        dtype=torch_dtype(args.dtype),
        device_map={"": device(args)},
        progress=not args.json,
        **draft_options(args),
    )


def add_max_new_tokens(parser: argparse.ArgumentParser, text: str = "tokens generated per prompt (32)") -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help=text)


def add_jobs(parser: argparse.ArgumentParser, text: str = "worker processes (default: one per core)") -> None:
    parser.add_argument("--jobs", type=positive_int, help=text)


def load_tokenizer(path: str) -> Any:
    """The tokenizer of a model directory or hub id; none of the checkpoint's own code runs."""
    from transformers import AutoTokenizer

    from specmd.offload_models.checkpoint import config_errors

    with config_errors(path):  # a tokenizer may read the model's config
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


# ---- prompts ----------------------------------------------------------------------------------------
def read_prompts(path: str) -> list[str]:
    """One prompt per line (blank lines skipped); in a .jsonl file each line is a JSON string or {"prompt": ...}.

    `-` reads standard input, one prompt per line. A source that holds no prompt is a ValueError.
    """
    text = sys.stdin.read() if path == STDIN else Path(path).read_text()
    name = "standard input" if path == STDIN else path
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{name} holds no prompts")
    if not path.endswith(".jsonl"):
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        item = json.loads(line)
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{number}: expected a non-empty JSON string or an object with a 'prompt' string")
        prompts.append(prompt)
    return prompts


def add_prompt_sources(parser: argparse.ArgumentParser) -> None:
    """Where a command's prompts come from: --prompt TEXT, repeated, or --prompts FILE; one of them, not both
    (`given_prompts`). `-` stands for standard input in either."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompt", type=prompt_text, action="append", metavar="TEXT", help="a prompt (repeat for several); "
        "'-' reads one prompt from standard input, all of it but the final line break",
    )  # fmt: skip
    source.add_argument(
        "--prompts", metavar="FILE", help="a file of prompts, one a line or a .jsonl of strings; '-' reads them "
        "from standard input, one a line (instead of --prompt)",
    )  # fmt: skip


def given_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts `add_prompt_sources`' options give, in order; standard input is read where they say `-`."""
    if args.prompts is not None:
        return read_prompts(args.prompts)
    if args.prompt.count(STDIN) > 1:
        raise ValueError("--prompt - reads all of standard input as one prompt; give it once")
    return [_stdin_prompt() if prompt == STDIN else prompt for prompt in args.prompt]


def _stdin_prompt() -> str:
    text = sys.stdin.read()
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ValueError("--prompt -: standard input holds no prompt")
    return text


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[Any]:
    """Each prompt as model inputs; one that encodes to no tokens is a ValueError (before any model loads)."""
    encoded = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        if inputs["input_ids"].shape[1] == 0:
            raise ValueError(f"the prompt {prompt!r} encodes to no tokens; a prompt needs some text")
        encoded.append(inputs)
    return encoded


def add_sampling(parser: argparse.ArgumentParser) -> None:
    """--temperature, --top-p and --seed: how `continuations` picks tokens (`sampling`)."""
    parser.add_argument(
        "--temperature", type=non_negative_float, default=0.0,
        help="sample at this temperature (default 0: greedy, the most likely token each step)",
    )  # fmt: skip
    parser.add_argument(
        "--top-p", type=fraction, help="sample only from the most likely tokens holding this share of the "
        "probability (default 1: all of them; needs --temperature)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=non_negative_int, help="seed each prompt's sampling: the same seed gives the same text "
        "(default: a different draw each run)",
    )  # fmt: skip


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The `continuations` keywords of `add_sampling`'s options; --top-p without sampling is a ValueError."""
    if args.top_p is not None and args.temperature == 0:
        raise ValueError("--top-p narrows sampling, which needs --temperature > 0 (the default, 0, is greedy)")
    return {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}


def continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    stream: Callable[[int], Any] | None = None,
    speculative: int | str | None = None,
) -> list[str]:
    """The continuation of each prompt (`encode_prompts`' inputs), one request at a time.

    Greedy at `temperature` 0, else sampled from the temperature-scaled distribution, narrowed to the most
    likely tokens holding `top_p` of it (only those two: the model's generation config does not add a top-k);
    `seed` seeds each prompt's generation, so a prompt and seed give the same text. `stream(i)` makes the
    `generate` streamer of prompt `i` (`output.TextStream`), which shows the text as it comes. `speculative`
    decodes speculatively with the model's self-draft (`generate(speculative=...)`); None decodes plainly.
    """
    from transformers import set_seed

    picking: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        picking = {"do_sample": True, "temperature": temperature, "top_p": top_p or 1.0, "top_k": 0}
    if speculative is not None:
        picking["speculative"] = speculative
    texts = []
    for index, inputs in enumerate(prompts):
        if seed is not None:
            set_seed(seed)
        output = model.generate(
            **inputs.to(model.device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            streamer=stream(index) if stream else None,
            **picking,
        )
        texts.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return texts


# ---- output -----------------------------------------------------------------------------------------
def add_json(parser: argparse.ArgumentParser, text: str = JSON_HELP) -> None:
    parser.add_argument("--json", action="store_true", help=text)


def add_output(parser: argparse.ArgumentParser) -> None:
    """--json, and --out for a copy of the JSON result (`output.emit`)."""
    add_json(parser)
    parser.add_argument("--out", dest="json_out", type=output_file, help="also write the JSON result to this file")
