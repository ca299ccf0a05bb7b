"""What the commands print besides their own lines: the JSON result, and the cache-metric tables.

Everything prints through `specmd.cli.out`, looked up at each call, so that it can be replaced there.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from specmd import cli
from specmd.cache.hardware import PROFILES
from specmd.cli.options import PROFILE
from specmd.sim.report import percent


def _rate(per_s: float) -> str:
    """A speed to three significant digits below 100 (the paper's system decodes 1.7 tokens/s), else whole."""
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.3g}"


METRICS: tuple[tuple[str, Callable[[Any], str]], ...] = (
    ("hit rate", lambda s: f"{s.hit_rate:.1%}"),
    ("late", lambda s: str(s.late_prefetches)),
    ("collisions", lambda s: str(s.collision_misses)),
    ("stall ms", lambda s: f"{s.stall_s * 1e3:.1f}"),
    ("TTFT ms", lambda s: f"{s.ttft_s * 1e3:.2f}"),
    ("tok/s", lambda s: _rate(s.tokens_per_s)),
    ("wall tok/s", lambda s: _rate(s.wall_tokens_per_s)),
)

DISK_METRICS: tuple[tuple[str, Callable[[Any], str]], ...] = (
    ("host hit rate", lambda s: f"{s.host_hit_rate:.1%}" if s.host_capacity_bytes else "no host tier"),
    ("disk MB read", lambda s: f"{s.disk_bytes_read / 1e6:,.1f}"),
    ("disk stall ms", lambda s: f"{s.disk_stall_s * 1e3:.1f}"),
)
"""Rows a run with experts on disk adds (`--storage disk`)."""

METRIC_NOTE = (
    "hit rate: requests found resident and ready; late: prefetches still in flight when requested; "
    "collisions: misses on experts evicted earlier in the same pass; stall, TTFT and tok/s are emulated "
    "(link + hardware profile); wall tok/s is this machine's real speed."
)


def emit(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    """The JSON result: printed with --json, written to --out when the command has and got one."""
    text = json.dumps(payload, indent=2, default=str)
    if getattr(args, "json_out", None):
        Path(args.json_out).write_text(text + "\n")
    if args.json:
        print(text)


def capacity_label(args: argparse.Namespace) -> str:
    """The cache size as given: "5%" of --cache-frac, or "N B" of --cache-bytes."""
    return f"{args.cache_bytes} B" if args.cache_bytes else percent(args.cache_frac)


def link_label(args: argparse.Namespace) -> str:
    """The link as given: "5.0 GB/s", "native speed", or the hardware profile's link."""
    if args.bandwidth_gbps == PROFILE:
        profile = PROFILES.get(args.hardware)
        return f"the {args.hardware} link" + (f" ({profile.link_bandwidth_gbps:g} GB/s)" if profile else "")
    return f"{args.bandwidth_gbps} GB/s" if args.bandwidth_gbps else "native speed"


def _metrics(wall: bool) -> tuple[tuple[str, Callable[[Any], str]], ...]:
    return METRICS if wall else tuple(m for m in METRICS if not m[0].startswith("wall"))


def metrics_table(title: str, label: str, *, fold: bool = False, wall: bool = True) -> Table:
    """A table of one run a row: a `label` column, then a column a metric (headers folded with `fold`; without
    the wall-clock ones when not `wall`)."""
    table = Table(title=title)
    table.add_column(label, no_wrap=True)
    for name, _ in _metrics(wall):
        table.add_column(name, justify="right", overflow="fold" if fold else "ellipsis")
    return table


def metric_cells(stats: Any, *, wall: bool = True) -> list[str]:
    """The row of `stats` (CacheStats, or any object with its fields) under the `metrics_table` columns."""
    return [fmt(stats) for _, fmt in _metrics(wall)]


def show_metrics(table: Table) -> None:
    """Print a metrics table, and the note that says what the metrics mean."""
    cli.out.print(table)
    cli.out.print(METRIC_NOTE, style="dim")


def print_stats(args: argparse.Namespace, stats: Any, *, wall: bool = True) -> None:
    """One run's metrics, a row each (without the wall-clock ones when not `wall`)."""
    title = f"{args.policy}, cache {capacity_label(args)}"
    table = Table(title=title, min_width=len(title))  # a two-column table would wrap its title mid-word
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, fmt in _metrics(wall):
        table.add_row(name, fmt(stats))
    if getattr(args, "storage", "ram") == "disk":
        for name, fmt in DISK_METRICS:
            table.add_row(name, fmt(stats))
    if stats.verify_passes:
        for name, value in speculation_rows(stats):
            table.add_row(name, value)
    show_metrics(table)


def speculation_rows(stats: Any) -> list[tuple[str, str]]:
    """The speculative-decoding metrics of `stats` (a run with `generate(speculative=...)`), as table rows."""
    ks = stats.speculate_k
    return [
        ("drafted / accepted tokens", f"{stats.drafted_tokens:,} / {stats.accepted_tokens:,}"),
        ("acceptance rate", f"{stats.acceptance_rate:.1%}"),
        ("tokens per verify pass", f"{stats.tokens_per_verify:.2f}"),
        ("mean K (min-max)", f"{sum(ks) / len(ks):.2f} ({min(ks)}-{max(ks)})"),
        (
            "lookahead prefetches used / issued (late)",
            f"{stats.lookahead_prefetches_used:,} / {stats.lookahead_prefetches_issued:,} "
            f"({stats.lookahead_prefetches_late:,})",
        ),
        ("draft's fast memory", f"{stats.draft_capacity_bytes / 1e6:,.1f} MB"),
    ]


class TextStream:
    """A `generate` streamer that prints a prompt (bold), then its continuation as it comes, then a line break.

    The continuation is decoded whole at each token, as `options.continuations` decodes it, and what it adds
    is written to `cli.out`'s file unchanged (no markup, wrapping or tab expansion), so what shows is the text
    the command returns. A character whose bytes have not all come yet waits for them.
    """

    def __init__(self, tokenizer: Any, prompt: str) -> None:
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.tokens: list[int] | None = None  # the continuation's, once the prompt has passed
        self.shown = ""

    def put(self, value: Any) -> None:
        """`generate` hands the prompt's tokens first, then each new token."""
        if self.tokens is None:
            self.tokens = []
            cli.out.print(Text(self.prompt, style="bold"), end="", soft_wrap=True, highlight=False)
            return
        self.tokens.extend(value.reshape(-1).tolist())
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)
        cli.out.file.write("\n")
        cli.out.file.flush()

    def _show(self, *, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens or [], skip_special_tokens=True)
        if text.startswith(self.shown) and (final or not text.endswith("\ufffd")):
            cli.out.file.write(text[len(self.shown) :])
            cli.out.file.flush()
            self.shown = text
