"""The research half: `specmd trace` records routing, `replay` and `sweep` run it through policies, `report`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from specmd import cli
from specmd.cli import options, output


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_trace(commands)
    _add_replay(commands)
    _add_sweep(commands)
    _add_report(commands)


def _add_trace(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    trace = commands.add_parser("trace", help="record a routing trace while generating from a file of prompts")
    options.add_model(trace)
    trace.add_argument(
        "--prompts", required=True, help="one prompt per line (or a .jsonl of strings); '-' reads standard input"
    )
    trace.add_argument(
        "--out", type=trace_file, required=True, help="trace file to write: .jsonl (interchange) or .npz (compact)"
    )
    options.add_max_new_tokens(trace)
    options.add_policy(trace, "the live run's policy (the trace does not depend on it)")
    options.add_offload_options(trace, bandwidth=options.PROFILE)
    trace.add_argument(
        "--lookahead", type=options.positive_int, metavar="K",
        help="record a lookahead trace: at every decode position the self-draft's K drafts and the verify pass over "
        "them (greedy), so replay and sweep can --speculate with any K' <= K or auto:K",
    )  # fmt: skip
    options.add_draft(trace)
    options.add_json(trace)
    trace.set_defaults(func=cmd_trace)


def trace_file(text: str) -> str:
    """An argparse type: a trace file to write, by its suffix, in a folder that exists."""
    from specmd.sim.trace import SUFFIXES

    if Path(text).suffix not in SUFFIXES:
        raise argparse.ArgumentTypeError(f"cannot write a trace to {text}: use a {' or '.join(SUFFIXES)} file")
    return options.output_file(text)


def cmd_trace(args: argparse.Namespace) -> int:
    from specmd.sim.record import TraceRecorder

    prompts = options.read_prompts(args.prompts)
    tokenizer = options.load_tokenizer(options.model_path(args.model))
    encoded = options.encode_prompts(tokenizer, prompts)
    with options.load_model(args, args.policy) as model:
        recorder = TraceRecorder(model.trace_meta())
        with model.observe_routing(recorder):
            if args.lookahead is None:
                options.continuations(model, tokenizer, encoded, args.max_new_tokens)
            else:
                for inputs in encoded:
                    model.generate_lookahead(
                        recorder, args.lookahead, **inputs.to(model.device),
                        max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, do_sample=False,
                    )  # fmt: skip
        stats = model.cache_stats()
    trace = recorder.trace()
    path = trace.save(args.out)
    payload = {"trace": str(path), "events": len(trace.events), "prompts": len(prompts), "stats": stats.to_dict()}
    output.emit(args, payload)
    if not args.json:
        cli.out.print(f"wrote {len(trace.events)} routing records of {len(prompts)} prompts to {path}")
        output.print_stats(args, stats)
    return 0


def _add_replay(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = commands.add_parser("replay", help="replay a routing trace through a policy mix, no model needed")
    replay.add_argument("trace", help="a .jsonl or .npz trace")
    options.add_policy(replay)
    options.add_cache_size(replay, default=None)
    options.add_link(replay, options.PROFILE)
    replay.add_argument(
        "--link-latency-us", type=options.non_negative_float, help="per-transfer latency (default: the profile's)"
    )
    options.add_hardware(replay, "hardware profile ({profiles})")
    options.add_storage(replay, replay=True)
    replay.add_argument("--experts-per-layer", type=options.positive_int, help="for traces whose header lacks it")
    replay.add_argument(
        "--expert-bytes",
        type=options.byte_size,
        help="bytes of one expert (or a size such as 12.6MB), for traces whose header lacks it",
    )
    options.add_shape_from(replay)
    options.add_speculation(replay, replay=True)
    options.add_output(replay)
    replay.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    from specmd.sim.replay import replay
    from specmd.sim.trace import load_trace

    if args.shape_from and args.expert_bytes:
        raise ValueError("--shape-from prices every expert as that model's; give it or --expert-bytes, not both")
    trace = load_trace(args.trace, experts_per_layer=args.experts_per_layer, expert_bytes=args.expert_bytes)
    stats = replay(
        trace,
        policy=args.policy,
        **options.cache_size(args),
        bandwidth_gbps=args.bandwidth_gbps,
        link_latency_s=None if args.link_latency_us is None else args.link_latency_us * 1e-6,
        hardware=args.hardware,
        price_as=options.priced_as(args.shape_from) if args.shape_from else None,
        **options.storage_settings(args),
        speculative=args.speculate,
        draft_frac=None if args.speculate is None else args.draft_frac,
    )
    payload = {"trace": args.trace, "trace_sha256": trace.sha256, "policy": args.policy, "stats": stats.to_dict()}
    output.emit(args, payload)
    if not args.json:
        output.print_stats(args, stats, wall=False)  # a replay has no wall clock
    return 0


def _add_sweep(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sweep = commands.add_parser("sweep", help="replay traces x capacities x bandwidths x policies into a CSV")
    sweep.add_argument("traces", nargs="*", help="trace files")
    sweep.add_argument("--grid", help="a TOML grid (traces, policies, cache_frac, bandwidth_gbps, hardware)")
    options.add_policy(sweep, "a policy mix (repeat for several)", many=True)
    options.add_cache_size(sweep, many=True)
    options.add_link(sweep, many=True)
    options.add_hardware(sweep, "hardware profiles (default: {default})", many=True)
    options.add_shape_from(sweep, many=True)
    options.add_storage(sweep, replay=True, many=True)
    options.add_speculation(sweep, replay=True, many=True)
    sweep.add_argument("--no-baselines", action="store_true", help="leave out the Belady and unbounded runs")
    sweep.add_argument(
        "--out", type=options.output_file, required=True, help="results CSV (existing rows are kept and skipped)"
    )
    options.add_jobs(sweep, "worker processes of the local backend (default: one per core)")
    sweep.add_argument(
        "--backend",
        choices=("local", "ray"),
        help="where the runs go: a local process pool (the default) or a Ray cluster (needs specmd[ray])",
    )
    sweep.add_argument(
        "--address",
        help="the Ray cluster: HOST:PORT, ray://HOST:PORT or 'auto' (default: RAY_ADDRESS, else a new local one)",
    )
    options.add_json(sweep, "print a JSON summary instead of text")
    sweep.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from specmd.sim.sweep import SweepGrid, SweepInterrupted, sweep

    given = {
        "traces": args.traces,
        "policies": args.policy,
        "cache_fracs": args.cache_frac,
        "bandwidths": args.bandwidth_gbps,
        "hardware": args.hardware,
        "shape_from": args.shape_from,
        "host_cache_fracs": args.host_cache_frac,
        "disks": args.disk,
        "speculate": [None, *args.speculate] if args.speculate else None,  # plain decoding runs beside them
    }
    storage = {k: v for k, v in (("storage", args.storage), ("host_eviction", args.host_eviction)) if v is not None}
    if args.speculate:
        storage["draft_frac"] = args.draft_frac
    if args.grid:
        grid = SweepGrid.from_toml(args.grid, **given, **storage)
    else:
        needed = (("TRACE", "traces"), ("--policy", "policies"), ("--cache-frac", "cache_fracs"))
        missing = [flag for flag, key in needed if not given[key]]
        if missing:
            raise ValueError(f"a sweep needs {', '.join(missing)} (or a --grid file)")
        grid = SweepGrid(**{k: tuple(v) for k, v in given.items() if v}, **storage)
    if args.no_baselines:
        grid = SweepGrid(**{**grid.__dict__, "baselines": False})
    shapes = {name: options.priced_as(name) for name in grid.shape_from if name}
    try:
        rows = sweep(grid, args.out, jobs=args.jobs, progress=not args.json, shapes=shapes, backend=args.backend,
                     address=args.address)  # fmt: skip
    except SweepInterrupted as stop:
        cli.err.print(
            f"interrupted: {stop.done} of {stop.total} runs are in {stop.path}; run the same command again to "
            f"resume: specmd {shlex.join(args.argv)}",
            soft_wrap=True, highlight=False, markup=False,
        )  # fmt: skip
        return 130
    output.emit(args, {"results": args.out, "new_runs": len(rows), "runs": len(grid.runs())})
    if not args.json:
        cli.out.print(f"{len(rows)} new runs of {len(grid.runs())} written to {args.out}")
    return 0


def _add_report(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = commands.add_parser("report", help="write Markdown tables and PNG figures from sweep results")
    report.add_argument("results", help="results CSV from `specmd sweep`")
    report.add_argument("--out", required=True, help="directory for report.md and the figures")
    options.add_json(report, "print the written files as JSON")
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from specmd.sim.report import report

    files = report(args.results, args.out)
    output.emit(args, {"files": [str(f) for f in files]})
    if not args.json:
        cli.out.print(f"wrote {files[0]} and {len(files) - 1} figures")
    return 0
