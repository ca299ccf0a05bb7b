"""`specmd reproduce`: the SpecMD paper's experiments in one command, each claim with a figure and a verdict."""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path
from typing import Any

from specmd import cli
from specmd.cli import options, output
from specmd.default_model import BUNDLED_PROMPTS, PAPER_HARDWARE, PAPER_SHAPE

QUALITY_TEXT = Path(sysconfig.get_paths()["stdlib"]) / "dataclasses.py"  # held out from the bundled model's training
LIVE_CONFIGS = ("config3", "config3+ls", "config4", "config4+ls")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reproduce = commands.add_parser(
        "reproduce",
        help="run the SpecMD paper's experiments and write a report: each claim, its figure, numbers and verdict",
    )
    reproduce.add_argument(
        "traces", nargs="*", help="traces of one model (default: record them from --model on --prompts)"
    )
    reproduce.add_argument("--out", required=True, help="directory for report.md, its figures and results.json")
    reproduce.add_argument(
        "--model", help="model for recording, the live-only configurations and the quality plane (default: the "
        "bundled model when no trace is given; none otherwise)",
    )  # fmt: skip
    reproduce.add_argument(
        "--prompts", default=str(BUNDLED_PROMPTS), help="prompts to generate from (default: 12 bundled)"
    )
    options.add_max_new_tokens(reproduce)
    reproduce.add_argument(
        "--shape-from", default=PAPER_SHAPE, metavar="CONFIG",
        help=f"price experts and compute as this model's, '' for the traces' own (default: {PAPER_SHAPE})",
    )  # fmt: skip
    options.add_hardware(reproduce, "hardware profile (default: {default}, the paper's system as measured)",
                         default=PAPER_HARDWARE)  # fmt: skip
    reproduce.add_argument("--capacities", type=options.fraction, nargs="+", default=[0.01, 0.05, 0.25])
    reproduce.add_argument(
        "--links", type=options.parse_bandwidth, nargs="+", default=["profile", 25.0],
        help="links to rank the configurations on (the first is the paper's; default: profile 25)",
    )  # fmt: skip
    reproduce.add_argument("--no-live", action="store_true", help="skip the configurations a trace cannot replay")
    reproduce.add_argument("--no-quality", action="store_true", help="skip the miss policies' quality/speed plane")
    options.add_jobs(reproduce, "replay processes (default: one per core)")
    options.add_device(reproduce)
    options.add_json(reproduce, "print the verdicts as JSON")
    reproduce.set_defaults(func=cmd_reproduce)


def _record(args: argparse.Namespace, model_path: str, prompts: list[str], out: Path) -> Path:
    from specmd.offload_models.auto import AutoOffloadForCausalLM
    from specmd.sim.record import TraceRecorder

    tokenizer = options.load_tokenizer(model_path)
    encoded = options.encode_prompts(tokenizer, prompts)
    with AutoOffloadForCausalLM.from_pretrained(
        model_path, cache_frac=1.0, device_map={"": options.device(args)}, progress=False
    ) as model:
        recorder = TraceRecorder(model.trace_meta())
        with model.observe_routing(recorder):
            options.continuations(model, tokenizer, encoded, args.max_new_tokens)
    return recorder.trace().save(out / "trace.npz")


def _live(args: argparse.Namespace, model_path: str, prompts: list[str]) -> dict[str, Any]:
    """The configurations a trace cannot replay, run on the model at 5% (their stats, by name)."""
    from specmd.offload_models.auto import AutoOffloadForCausalLM

    tokenizer = options.load_tokenizer(model_path)
    encoded = options.encode_prompts(tokenizer, prompts)
    stats = {}
    for name in LIVE_CONFIGS:
        with AutoOffloadForCausalLM.from_pretrained(
            model_path, cache_frac=0.05, policy=name, bandwidth_gbps="profile", hardware=args.hardware,
            shape_from=args.shape_from or None, device_map={"": options.device(args)}, progress=False,
        ) as model:  # fmt: skip
            options.continuations(model, tokenizer, encoded, args.max_new_tokens)
            stats[name] = model.cache_stats()
    return stats


def _quality(args: argparse.Namespace, model_path: str) -> list[Any]:
    from specmd.eval_tasks.quality import miss_policy_plane

    tokenizer = options.load_tokenizer(model_path)
    ids = tokenizer(QUALITY_TEXT.read_text(), return_tensors="pt")["input_ids"][:, : 4 * 256].reshape(4, 256)
    plane = miss_policy_plane(
        model_path, ids, cache_frac=0.05, bandwidth_gbps="profile", hardware=args.hardware,
        shape_from=args.shape_from or None, device_map={"": options.device(args)}, progress=False,
    )  # fmt: skip
    return [point for point, _ in plane]


def cmd_reproduce(args: argparse.Namespace) -> int:
    from specmd.quant.formats import MissingBackendError
    from specmd.sim.reproduce import Setting, findings, run_replays, write_report
    from specmd.sim.trace import Trace, load_trace

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = options.model_path(args.model or "default") if args.model or not args.traces else None
    prompts = options.read_prompts(args.prompts)
    say = (lambda text: None) if args.json else (lambda text: cli.err.print(text, style="dim", highlight=False))
    if args.traces:
        paths = [Path(t) for t in args.traces]
    else:
        say(f"recording {len(prompts)} prompts x {args.max_new_tokens} tokens of {args.model or 'the bundled model'}")
        paths = [_record(args, model, prompts, out)]  # type: ignore[arg-type]
    trace = Trace.concat([load_trace(path) for path in paths])
    setting = Setting(
        capacities=tuple(args.capacities), hardware=args.hardware, links=tuple(args.links),
        shape_from=args.shape_from, price_as=options.priced_as(args.shape_from) if args.shape_from else None,
    )  # fmt: skip
    say(f"replaying {len(setting.mixes())} mixes of {trace.num_requests:,} requests")
    results = run_replays(trace, setting, jobs=args.jobs)
    live, quality = {}, []
    if model is not None and not args.no_live:
        say(f"running {', '.join(LIVE_CONFIGS)} live")
        live = _live(args, model, prompts)
    if model is not None and not args.no_quality:
        say("measuring the miss policies' quality/speed plane")
        try:
            quality = _quality(args, model)
        except MissingBackendError as exc:
            say(f"skipped the quality plane: {exc}")
    found = findings(results, setting, live, quality)
    files = write_report(found, results, setting, out, sources=[str(p) for p in paths], quality=quality, live=live)
    output.emit(args, {"report": str(files[0]), "findings": [vars(f) | {"table": list(f.table)} for f in found]})
    if not args.json:
        from rich.table import Table

        table = Table(title=f"the SpecMD paper's claims ({files[0]})")
        for column in ("claim", "paper", "specmd", "verdict"):
            table.add_column(column, overflow="fold")
        for f in found:
            table.add_row(f.claim, f.paper, f.measured, f.verdict + (f": {f.condition}" if f.condition else ""))
        cli.out.print(table)
    return 0
