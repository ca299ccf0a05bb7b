"""Reports: Markdown tables and PNG figures, in the SpecMD paper's style, from a sweep's results CSV.

For each setting (trace, hardware, link) it writes: total vs collision misses per policy at each
capacity (paper Fig. 4/8), per-layer collision rates (Fig. 5/9), prefetch precision and recall, and hit
rate against stall (Fig. 6), hit rate and TTFT against capacity, and each policy's gap to Belady, in
points and as the share of the gap between the better of LRU and LFU (at the same prefetch, miss and
routing) and Belady that the policy closes.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specmd.sim.sweep import read_results

INTEGER = {"requests", "hits", "late_prefetches", "misses", "collision_misses", "prefetches_issued",
           "prefetches_used", "evictions", "bytes_transferred", "decode_tokens"}  # fmt: skip
FLOAT = {"cache_frac", "hit_rate", "prefetch_precision", "prefetch_recall", "stall_s", "ttft_s", "tokens_per_s"}


def _typed(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(row)
    for name in INTEGER:
        out[name] = int(row[name])
    for name in FLOAT:
        out[name] = float(row[name])
    out["per_layer"] = json.loads(row["per_layer"])
    return out


def label(row: dict[str, Any]) -> str:
    """A policy's short name: its mix without the default miss and routing parts."""
    if row["baseline"] == "unbounded":
        return "unbounded (100%)"
    parts = [row["prefetch"], row["eviction"]]
    if row["miss"] != "fetch" or row["routing"] != "standard":
        parts += [row["miss"], row["routing"]]
    return "/".join(parts)


def _settings(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["trace"], row["hardware"], row["bandwidth_gbps"], row["shape_from"])].append(row)
    return dict(groups)


def report(results: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[Path]:
    """Write report.md and its figures into `out`; return every file written."""
    rows = [_typed(row) for row in read_results(results)]
    if not rows:
        raise ValueError(f"{results} holds no runs; run `specmd sweep` first")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lines = [f"# specmd report\n\nFrom `{results}`: {len(rows)} runs.\n"]
    settings = _settings(rows)
    for index, ((trace, hardware, bandwidth, shape), group) in enumerate(sorted(settings.items()), start=1):
        prefix = "" if len(settings) == 1 else f"{index}-"
        link = "native-speed link" if bandwidth == "native" else f"{bandwidth} GB/s link"
        priced = f", priced as {shape}" if shape else ""
        lines.append(f"## {trace}{priced}, {hardware}, {link}\n")
        lines += _tables(group)
        for name, draw in FIGURES:
            path = target / f"{prefix}{name}.png"
            draw(group, path)
            written.append(path)
            lines.append(f"![{name}]({path.name})\n")
    (target / "report.md").write_text("\n".join(lines))
    return [target / "report.md", *written]


# ---- tables ---------------------------------------------------------------------------------------
ONLINE_FLOOR = ("lru", "lfu")
"""The online evictions whose better hit rate is the floor of "gap to Belady closed"."""


def _floors(group: Sequence[dict[str, Any]]) -> dict[tuple[float, str, str, str], float]:
    """max(LRU, LFU) hit rate per (capacity, prefetch, miss, routing), where the group has both rows."""
    found: dict[tuple[float, str, str, str], dict[str, float]] = defaultdict(dict)
    for r in group:
        if not r["baseline"] and r["eviction"] in ONLINE_FLOOR:
            found[(r["cache_frac"], r["prefetch"], r["miss"], r["routing"])][r["eviction"]] = r["hit_rate"]
    return {key: max(rates.values()) for key, rates in found.items() if len(rates) == len(ONLINE_FLOOR)}


def gap_closed(row: dict[str, Any], belady: float | None, floor: float | None) -> float | None:
    """The share of the gap between the online floor (max of LRU and LFU at the row's prefetch, miss and routing
    and setting) and Belady that `row` closes: (hit - floor) / (Belady - floor); None when either is unknown or
    Belady is not above the floor."""
    if belady is None or floor is None or belady - floor <= 0:
        return None
    return float((row["hit_rate"] - floor) / (belady - floor))


def _tables(group: Sequence[dict[str, Any]]) -> list[str]:
    belady = {r["cache_frac"]: r["hit_rate"] for r in group if r["baseline"] == "belady"}
    floors = _floors(group)
    lines = []
    for frac in sorted({r["cache_frac"] for r in group}):
        at = sorted((r for r in group if r["cache_frac"] == frac), key=lambda r: (r["baseline"] != "", label(r)))
        lines.append(f"### cache {frac:.0%}\n")
        lines.append(
            "| policy | hit rate | late | misses | collision misses | prefetch precision | recall | stall ms "
            "| TTFT ms | tokens/s | gap to Belady | gap to Belady closed |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in at:
            gap = f"{(belady[frac] - r['hit_rate']) * 100:+.1f} pts" if frac in belady else "-"
            closed = gap_closed(r, belady.get(frac), floors.get((frac, r["prefetch"], r["miss"], r["routing"])))
            lines.append(
                f"| {label(r)} | {r['hit_rate']:.1%} | {r['late_prefetches']} | {r['misses']} | "
                f"{r['collision_misses']} | {r['prefetch_precision']:.1%} | {r['prefetch_recall']:.1%} | "
                f"{r['stall_s'] * 1e3:.2f} | {r['ttft_s'] * 1e3:.3f} | {r['tokens_per_s']:,.0f} | {gap} | "
                f"{'-' if closed is None else f'{closed:.0%}'} |"
            )
        lines.append("")
    return lines


# ---- figures --------------------------------------------------------------------------------------
def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _bounded(group: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in group if r["baseline"] != "unbounded"]


def _capacities(group: Sequence[dict[str, Any]]) -> list[float]:
    return sorted({r["cache_frac"] for r in _bounded(group)})


def _by_policy(group: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Bounded runs grouped by policy label, each sorted by capacity."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in _bounded(group):
        runs[label(r)].append(r)
    return [(name, sorted(rs, key=lambda r: r["cache_frac"])) for name, rs in sorted(runs.items())]


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def misses_figure(group: Sequence[dict[str, Any]], path: Path) -> None:
    """Total and collision misses per policy at each capacity (paper Fig. 4/8)."""
    plt = _plt()
    fracs = _capacities(group)
    fig, axes = plt.subplots(1, len(fracs), figsize=(4.2 * len(fracs), 3.8), squeeze=False)
    for ax, frac in zip(axes[0], fracs, strict=True):
        at = sorted((r for r in _bounded(group) if r["cache_frac"] == frac), key=label)
        xs = range(len(at))
        ax.bar([x - 0.2 for x in xs], [r["misses"] for r in at], 0.4, label="misses")
        ax.bar([x + 0.2 for x in xs], [r["collision_misses"] for r in at], 0.4, label="collision misses")
        ax.set_xticks(list(xs), [label(r) for r in at], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"cache {frac:.0%}")
    axes[0][0].set_ylabel("count")
    axes[0][0].legend(fontsize=8)
    _save(fig, path)


def layers_figure(group: Sequence[dict[str, Any]], path: Path) -> None:
    """Collision misses per request, layer by layer (paper Fig. 5/9)."""
    plt = _plt()
    fracs = _capacities(group)
    fig, axes = plt.subplots(1, len(fracs), figsize=(4.2 * len(fracs), 3.6), squeeze=False)
    for ax, frac in zip(axes[0], fracs, strict=True):
        for r in sorted((r for r in _bounded(group) if r["cache_frac"] == frac), key=label):
            layers = r["per_layer"]
            rates = [x["collision_misses"] / x["requests"] if x["requests"] else 0.0 for x in layers]
            ax.plot([x["layer"] for x in layers], rates, marker="o", markersize=3, label=label(r))
        ax.set_title(f"cache {frac:.0%}")
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("collision misses / requests")
    axes[0][-1].legend(fontsize=7)
    _save(fig, path)


def prefetch_figure(group: Sequence[dict[str, Any]], path: Path) -> None:
    """Prefetch precision and recall against capacity, and hit rate against stall (paper Fig. 6)."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, runs in _by_policy(group):
        if any(r["prefetches_issued"] for r in runs):
            fracs = [r["cache_frac"] * 100 for r in runs]
            (line,) = left.plot(fracs, [r["prefetch_precision"] for r in runs], marker="o", label=f"{name} precision")
            left.plot(fracs, [r["prefetch_recall"] for r in runs], marker="s", linestyle="--", color=line.get_color(),
                      label=f"{name} recall")  # fmt: skip
        right.scatter([r["stall_s"] * 1e3 for r in runs], [r["hit_rate"] for r in runs], label=name, s=18)
    left.set_xlabel("cache capacity (%)")
    left.set_ylabel("prefetch precision / recall")
    left.set_title("prefetch accuracy")
    if left.lines:
        left.legend(fontsize=7)
    right.set_xlabel("stall (ms, emulated)")
    right.set_ylabel("hit rate")
    right.set_title("hit rate vs stall")
    right.legend(fontsize=7)
    _save(fig, path)


def capacity_figure(group: Sequence[dict[str, Any]], path: Path) -> None:
    """Hit rate and TTFT against cache capacity."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, runs in _by_policy(group):
        fracs = [r["cache_frac"] * 100 for r in runs]
        left.plot(fracs, [r["hit_rate"] for r in runs], marker="o", label=name)
        right.plot(fracs, [r["ttft_s"] * 1e3 for r in runs], marker="o", label=name)
    for ax, title, unit in ((left, "hit rate", "hit rate"), (right, "time to first token", "TTFT (ms, emulated)")):
        ax.set_xlabel("cache capacity (%)")
        ax.set_ylabel(unit)
        ax.set_title(title)
    left.legend(fontsize=7)
    _save(fig, path)


FIGURES = (
    ("misses", misses_figure),
    ("collisions-per-layer", layers_figure),
    ("prefetch", prefetch_figure),
    ("capacity", capacity_figure),
)
