"""The `specmd` command line: demo, generate, info, routing-stats, policies, trace, replay, sweep, report, reproduce,
eval.

Every command has --help and --json.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.text import Text

from specmd.cli import evaluate, models, reproduce, research, run
from specmd.cli.options import Parser, UsageError, load_plugins
from specmd.cli.options import load_model as _load  # noqa: F401  (cli._load: a model as the commands load it)

# Every command prints through these two, looked up here at each print: replacing them here redirects all output.
out = Console()
err = Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    from specmd import __version__
    from specmd.compiled import is_compiled

    engine = "compiled" if is_compiled() else "pure Python"
    parser = Parser(prog="specmd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"specmd {__version__} ({engine} engine)")
    commands = parser.add_subparsers(dest="command", required=True)  # each a `Parser` too
    for family in (run, models, research, reproduce, evaluate):  # each adds its commands, in --help's order
        family.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user error (a bad argument, value or file) prints one line and returns 2, Ctrl-C 130.

    Errors that are not the user's (bugs) propagate with their traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # the command line, for a command to show how to run it again
        load_plugins(args)
        return args.func(args)
    except (UsageError, ValueError, OSError) as exc:
        return _user_error(exc)
    except KeyboardInterrupt:  # Ctrl-C: no traceback (a sweep says how to resume itself)
        err.print("interrupted", style="red", highlight=False)
        return 130
    except ImportError as exc:  # a missing optional library (the message names the extra), a plugin
        from specmd.cache.policies.plugins import PluginError
        from specmd.quant.formats import MissingBackendError
        from specmd.sim.sweep_ray import MissingExtraError

        if not isinstance(exc, MissingBackendError | MissingExtraError | PluginError):
            raise
        return _user_error(exc)


def _user_error(exc: BaseException) -> int:
    """Print `exc` as one line on stderr (never wrapped, never read as markup); the exit code, 2."""
    message = " ".join(str(exc).split())
    err.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True, highlight=False)
    return 2
