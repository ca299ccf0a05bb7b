"""The `specmd` command line: demo, generate, info, routing-stats, policies, trace, replay, sweep, report, reproduce,
eval.

Every command has --help and --json.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.console import Console

from specmd.cli import evaluate, models, reproduce, research, run
from specmd.cli.options import load_model as _load  # noqa: F401  (cli._load: a model as the commands load it)

# Every command prints through these two, looked up here at each print: replacing them here redirects all output.
out = Console()
err = Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for family in (run, models, research, reproduce, evaluate):  # each adds its commands, in --help's order
        family.register(commands)
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
