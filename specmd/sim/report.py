"""Reports: Markdown tables and PNG figures, in the SpecMD paper's style, from a sweep's results CSV.

For each setting (trace, hardware, link; ordered by trace, then hardware, then link speed, slowest first and
a native-speed link last) it writes a table per capacity (smallest first) and four figures: total vs collision
misses per policy at each capacity (paper Fig. 4/8), per-layer collision rates (Fig. 5/9), prefetch precision
and recall, and hit rate against stall (Fig. 6), and hit rate and TTFT against capacity. Each figure is
titled with its trace, hardware, link and capacities; Belady is drawn as a bound (black, dashed); panels that
are compared share their axes. The tables give each policy's gap to Belady, in points and as the share of the
gap between the better of LRU and LFU (at the same prefetch, miss and routing) and Belady that the policy
closes, and a quality column beside the speed ones: a lossy mix (drops, substitutions, fetches at a precision
other than the one requested, rerouting) is marked "(lossy)" in the tables and figures, never shown as a
plain winner.

The rows are plain dicts grouped with `sorted` and `defaultdict`, not pandas: a sweep is a few hundred rows,
the grouping takes a few lines, and pandas (plus pyarrow for parquet) would be a large new dependency of
every install for it. The CSV stays the one results file (appended row by row, resumable; parquet cannot be
appended to); `pandas.read_csv` reads it as is, `per_layer` and `fetches_by_precision` being JSON cells.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specmd.cache.config import PROFILE
from specmd.cache.hardware import PROFILES
from specmd.sim.sweep import NATIVE, read_results

INTEGER = {"requests", "hits", "late_prefetches", "misses", "collision_misses", "prefetches_issued",
           "prefetches_used", "evictions", "drops", "substitutions", "bytes_transferred", "decode_tokens",
           "drafted_tokens", "verify_passes", "lookahead_prefetches_issued", "lookahead_prefetches_used",
           "lookahead_prefetches_late"}  # fmt: skip
FLOAT = {"cache_frac", "hit_rate", "prefetch_precision", "prefetch_recall", "stall_s", "ttft_s", "tokens_per_s",
         "acceptance_rate", "tokens_per_verify"}  # fmt: skip
Row = dict[str, Any]


def _typed(row: dict[str, str]) -> Row:
    out: Row = dict(row)
    for name in INTEGER:
        out[name] = int(row[name])
    for name in FLOAT:
        out[name] = float(row[name])
    out["per_layer"] = json.loads(row["per_layer"])
    out["fetches_by_precision"] = json.loads(row["fetches_by_precision"])
    out["speculate_k"] = json.loads(row["speculate_k"])
    return out


def label(row: Row) -> str:
    """A policy's short name: its mix without the default miss and routing parts."""
    if row["baseline"] == "unbounded":
        return "unbounded (100%)"
    parts = [row["prefetch"], row["eviction"]]
    if row["miss"] != "fetch" or row["routing"] != "standard":
        parts += [row["miss"], row["routing"]]
    speculate = row.get("speculate")
    return "/".join(parts) + (f" + speculate {speculate}" if speculate else "")


def natural(text: str) -> tuple[tuple[int, float | str], ...]:
    """A sort key that orders the numbers inside `text` by value: "drop:rank=3" before "drop:rank=10"."""
    return tuple((0, float(part)) if i % 2 else (1, part) for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", text)))


def percent(frac: float) -> str:
    """A capacity as a percentage without false rounding: 0.05 -> "5%", 0.025 -> "2.5%"."""
    return f"{round(frac * 100, 6):g}%"


@dataclass(frozen=True)
class Setting:
    """Where a group of runs ran: trace (priced as `shape_from`'s model when set), hardware, link, and with experts on
    disk the drive and host-RAM tier (`lower`, as `lower_label` writes it; "" with experts in RAM)."""

    trace: str
    hardware: str
    bandwidth: str  # as the CSV writes it: "5.0", "profile" or "native"
    shape_from: str
    lower: str = ""

    @property
    def link_gbps(self) -> float:
        """The link's GB/s: the hardware profile's for "profile" (inf if unknown), inf for a native-speed link."""
        if self.bandwidth == NATIVE:
            return math.inf
        if self.bandwidth == PROFILE:
            profile = PROFILES.get(self.hardware)
            return math.inf if profile is None else profile.link_bandwidth_gbps
        return float(self.bandwidth)

    def order(self) -> tuple[Any, ...]:
        """Sort key: trace, model, hardware, then link speed (numbers by value; native, the fastest, last)."""
        kind = {NATIVE: 2, PROFILE: 1}.get(self.bandwidth, 0)
        return (self.trace, self.shape_from, self.hardware, kind == 2, self.link_gbps, kind, self.lower)

    def link(self) -> str:
        if self.bandwidth == NATIVE:
            return "native-speed link"
        if self.bandwidth == PROFILE:  # named after the hardware, as "its"
            speed = self.link_gbps
            return "its link" + ("" if math.isinf(speed) else f" ({speed:g} GB/s)")
        return f"{self.link_gbps:g} GB/s link"

    def title(self, short: bool = False) -> str:
        """trace[, priced as model], hardware, link; `short` names the trace by its file name only."""
        trace = Path(self.trace).name if short else self.trace
        priced = f", priced as {self.shape_from}" if self.shape_from else ""
        lower = f", {self.lower}" if self.lower else ""
        return f"{trace}{priced}, {self.hardware}, {self.link()}{lower}"


def lower_label(row: Row) -> str:
    """Where a row's experts lived below the cache: "" in RAM, else "disk D, host tier F (E)" or "disk D, no host
    tier"."""
    if row["storage"] == "ram":
        return ""
    disk = {NATIVE: "native-speed disk", PROFILE: "its disk"}.get(row["disk"], f"disk {row['disk']}")
    if not row["host_cache_frac"]:
        return f"{disk}, no host tier"
    return f"{disk}, host tier {percent(float(row['host_cache_frac']))} ({row['host_eviction']})"


def _settings(rows: Sequence[Row]) -> list[tuple[Setting, list[Row]]]:
    groups: dict[Setting, list[Row]] = defaultdict(list)
    for row in rows:
        setting = Setting(row["trace"], row["hardware"], row["bandwidth_gbps"], row["shape_from"], lower_label(row))
        groups[setting].append(row)
    return sorted(groups.items(), key=lambda item: item[0].order())


def report(results: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[Path]:
    """Write report.md and its figures into `out`; return every file written."""
    rows = [_typed(row) for row in read_results(results)]
    if not rows:
        raise ValueError(f"{results} holds no runs; run `specmd sweep` first")
    mark_quality(rows)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lines = [f"# specmd report\n\nFrom `{results}`: {len(rows)} runs.\n"]
    settings = _settings(rows)
    for index, (setting, group) in enumerate(settings, start=1):
        prefix = "" if len(settings) == 1 else f"{index}-"
        lines.append(f"## {setting.title()}\n")
        lines += _tables(group)
        caps = _capacities(group)
        where = f"{setting.title(short=True)}, cache {', '.join(percent(c) for c in caps)}"
        for name, subject, draw in FIGURES:
            path = target / f"{prefix}{name}.png"
            _save(draw(group), path, f"{subject}\n{where}")
            written.append(path)
            lines.append(f"![{subject}: {where}]({path.name})\n")
    (target / "report.md").write_text("\n".join(lines))
    return [target / "report.md", *written]


# ---- quality --------------------------------------------------------------------------------------
def _requested(rows: Sequence[Row]) -> dict[tuple[str, str], set[str]]:
    """The precisions requests ask for, per (trace, shape_from): what runs that fetch every miss as asked fetched."""
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        if r["miss"] == "fetch":
            found[(r["trace"], r["shape_from"])].update(p for p, n in r["fetches_by_precision"].items() if n)
    return dict(found)


def quality(row: Row, requested: set[str] | None) -> list[str]:
    """What `row`'s run gave up in quality: drops, substitutions, fetches at precisions not in `requested`
    (None: unknown), rerouting; empty for a lossless run."""
    lost = []
    for name, verb in (("drops", "dropped"), ("substitutions", "substituted")):
        if row[name]:
            lost.append(f"{row[name]:,} {verb} ({row[name] / max(row['requests'], 1):.1%})")
    if requested is None and row["miss"] != "fetch":
        lost.append("precisions unknown (no fetch-on-miss run of this trace)")
    other = {p: n for p, n in sorted(row["fetches_by_precision"].items()) if n and requested and p not in requested}
    if other:
        lost.append("fetched as " + ", ".join(f"{p} {n:,}" for p, n in other.items()))
    if row["routing"] != "standard":
        lost.append(f"rerouted ({row['routing']})")
    return lost


def mark_quality(rows: Sequence[Row]) -> None:
    """Set each row's `quality` (a list of what it gave up) and `lossy` (whether that list is not empty)."""
    requested = _requested(rows)
    for r in rows:
        r["quality"] = quality(r, requested.get((r["trace"], r["shape_from"])))
        r["lossy"] = bool(r["quality"])


def _lossy_labels(group: Sequence[Row]) -> set[str]:
    return {label(r) for r in group if r["lossy"]}


def _name(name: str, lossy: set[str]) -> str:
    return f"{name} (lossy)" if name in lossy else name


# ---- tables ---------------------------------------------------------------------------------------
ONLINE_FLOOR = ("lru", "lfu")
"""The online evictions whose better hit rate is the floor of "gap to Belady closed"."""
LOSSY_NOTE = (
    "(lossy): the run dropped or substituted experts, fetched some at a precision other than the one requested, or "
    "rerouted tokens (the quality column says what and how often); its speed is bought with quality, so weigh it "
    "against that, not against the lossless rows alone. A replay runs no model, so the sweep has no task score: "
    "`specmd eval` measures one."
)


def _floors(group: Sequence[Row]) -> dict[tuple[float, str, str, str], float]:
    """max(LRU, LFU) hit rate per (capacity, prefetch, miss, routing), where the group has both rows."""
    found: dict[tuple[float, str, str, str], dict[str, float]] = defaultdict(dict)
    for r in group:
        if not r["baseline"] and r["eviction"] in ONLINE_FLOOR:
            found[(r["cache_frac"], r["prefetch"], r["miss"], r["routing"])][r["eviction"]] = r["hit_rate"]
    return {key: max(rates.values()) for key, rates in found.items() if len(rates) == len(ONLINE_FLOOR)}


def gap_closed(row: Row, belady: float | None, floor: float | None) -> float | None:
    """The share of the gap between the online floor (max of LRU and LFU at the row's prefetch, miss and routing
    and setting) and Belady that `row` closes: (hit - floor) / (Belady - floor); None when either is unknown or
    Belady is not above the floor."""
    if belady is None or floor is None or belady - floor <= 0:
        return None
    return float((row["hit_rate"] - floor) / (belady - floor))


def _tables(group: Sequence[Row]) -> list[str]:
    belady = {r["cache_frac"]: r["hit_rate"] for r in group if r["baseline"] == "belady"}
    floors = _floors(group)
    lines = []
    for frac in sorted({r["cache_frac"] for r in group}):
        at = sorted(
            (r for r in group if r["cache_frac"] == frac), key=lambda r: (r["baseline"] != "", natural(label(r)))
        )
        lines.append(f"### cache {percent(frac)}\n")
        lines.append(
            "| policy | hit rate | late | misses | collision misses | prefetch precision | recall | stall ms "
            "| TTFT ms | tokens/s | quality | gap to Belady | gap to Belady closed |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        for r in at:
            gap = f"{(belady[frac] - r['hit_rate']) * 100:+.1f} pts" if frac in belady else "-"
            closed = gap_closed(r, belady.get(frac), floors.get((frac, r["prefetch"], r["miss"], r["routing"])))
            name = f"{label(r)} **(lossy)**" if r["lossy"] else label(r)
            lines.append(
                f"| {name} | {r['hit_rate']:.1%} | {r['late_prefetches']:,} | {r['misses']:,} | "
                f"{r['collision_misses']:,} | {r['prefetch_precision']:.1%} | {r['prefetch_recall']:.1%} | "
                f"{r['stall_s'] * 1e3:,.2f} | {r['ttft_s'] * 1e3:,.3f} | {r['tokens_per_s']:,.0f} | "
                f"{'; '.join(r['quality']) or 'lossless'} | {gap} | {'-' if closed is None else f'{closed:.0%}'} |"
            )
        lines.append("")
    if any(r["lossy"] for r in group):
        lines.append(LOSSY_NOTE + "\n")
    return lines + _speculation_table(group)


SPECULATION_NOTE = (
    'Speculative rows replay a lookahead trace (`specmd trace --lookahead K`): "x plain" divides their tokens/s by '
    "the same mix decoding plainly at the same capacity; acceptance = accepted / drafted tokens; lookahead = the "
    "prefetches the draft's routing queued for the verify pass, used / issued (late)."
)


def _speculation_table(group: Sequence[Row]) -> list[str]:
    """The speculative rows' own metrics, per capacity (none when no row speculates)."""
    drafted = [r for r in group if r.get("speculate")]
    if not drafted:
        return []
    plain = {(r["cache_frac"], r["policy"]): r["tokens_per_s"] for r in group if not r.get("speculate")}
    lines = ["### speculative decoding\n", SPECULATION_NOTE + "\n",
             "| cache | policy | tokens/s | x plain | acceptance | tokens per verify | mean K | lookahead |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in sorted(drafted, key=lambda r: (r["cache_frac"], natural(label(r)))):
        base = plain.get((r["cache_frac"], r["policy"]))
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        ks = r["speculate_k"]
        lookahead = f"{r['lookahead_prefetches_used']:,} / {r['lookahead_prefetches_issued']:,} "
        lookahead += f"({r['lookahead_prefetches_late']:,})"
        lines.append(
            f"| {percent(r['cache_frac'])} | {label(r)} | {r['tokens_per_s']:,.1f} | {ratio} | "
            f"{r['acceptance_rate']:.0%} | {r['tokens_per_verify']:.2f} | {sum(ks) / len(ks) if ks else 0:.2f} | "
            f"{lookahead} |"
        )
    return [*lines, ""]


# ---- figures --------------------------------------------------------------------------------------
BOUND = {"color": "black", "linestyle": "--", "linewidth": 1.2}
"""How Belady, a bound rather than a competitor, is drawn."""
BELADY = "Belady (bound without prefetch)"  # a prefetching mix can beat it: late prefetches are not misses
MARKERS = "os^vDPX<>*hp"


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _policies(group: Sequence[Row]) -> list[Row]:
    """The runs of the compared policies: no baseline (Belady is drawn as a bound, the unbounded cache apart)."""
    return [r for r in group if not r["baseline"]]


def _belady(group: Sequence[Row]) -> list[Row]:
    return sorted((r for r in group if r["baseline"] == "belady"), key=lambda r: r["cache_frac"])


def _capacities(group: Sequence[Row]) -> list[float]:
    return sorted({r["cache_frac"] for r in group if r["baseline"] != "unbounded"})


def _by_policy(group: Sequence[Row]) -> list[tuple[str, list[Row]]]:
    """The compared policies' runs grouped by label (natural order), each sorted by capacity."""
    runs: dict[str, list[Row]] = defaultdict(list)
    for r in _policies(group):
        runs[label(r)].append(r)
    return [(name, sorted(runs[name], key=lambda r: r["cache_frac"])) for name in sorted(runs, key=natural)]


def _styles(group: Sequence[Row]) -> dict[str, dict[str, Any]]:
    """One colour and marker per policy, the same in every figure of a setting; a lossy policy dotted, hollow."""
    names = [name for name, _ in _by_policy(group)]
    lossy = _lossy_labels(group)
    cmap = _plt().get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {
        name: {"color": cmap(i % cmap.N), "marker": MARKERS[i % len(MARKERS)], "label": _name(name, lossy)}
        | ({"linestyle": ":", "markerfacecolor": "none"} if name in lossy else {"linestyle": "-"})
        for i, name in enumerate(names)
    }


def _legend(fig: Any, extra: Sequence[Any] = ()) -> None:
    """One legend for the whole figure, below its panels: every label once, the fullest panel's order first, then
    the `extra` handles."""
    found: dict[str, Any] = {}
    for ax in sorted(fig.axes, key=lambda ax: -len(ax.get_legend_handles_labels()[1])):
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            found.setdefault(text, handle)
    found.update((handle.get_label(), handle) for handle in extra)
    columns = max(1, min(len(found), int(fig.get_figwidth() // 3.4)))
    fig.legend(found.values(), found.keys(), loc="outside lower center", ncols=columns, fontsize=8, frameon=False)


def _save(fig: Any, path: Path, title: str) -> None:
    """Title `fig` (also as the PNG's Title metadata), write it to `path` and close it."""
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, metadata={"Title": title})
    _plt().close(fig)


def _percent_axis(ax: Any, fracs: Sequence[float]) -> None:
    ax.set_xticks([f * 100 for f in fracs], [percent(f) for f in fracs])
    ax.set_xlabel("cache capacity (share of all expert bytes)")


def misses_figure(group: Sequence[Row]) -> Any:
    """Total and collision misses per policy at each capacity (paper Fig. 4/8); Belady's misses dashed."""
    plt, fracs, lossy = _plt(), _capacities(group), _lossy_labels(group)
    belady = {r["cache_frac"]: r["misses"] for r in _belady(group)}
    width = max(4.2, 0.45 * len(_by_policy(group)) + 1.2)
    fig, axes = plt.subplots(1, len(fracs), figsize=(width * len(fracs), 4.8), sharey=True, squeeze=False,
                             layout="constrained")  # fmt: skip
    for ax, frac in zip(axes[0], fracs, strict=True):
        at = sorted((r for r in _policies(group) if r["cache_frac"] == frac), key=lambda r: natural(label(r)))
        xs = range(len(at))
        hatch = ["//" if label(r) in lossy else "" for r in at]
        ax.bar([x - 0.2 for x in xs], [r["misses"] for r in at], 0.4, label="misses", color="tab:blue", hatch=hatch)
        ax.bar([x + 0.2 for x in xs], [r["collision_misses"] for r in at], 0.4, label="collision misses",
               color="tab:orange", hatch=hatch)  # fmt: skip
        if frac in belady:
            ax.axhline(belady[frac], label=f"{BELADY}: its misses", **BOUND)
        ax.set_xticks(list(xs), [_name(label(r), lossy) for r in at], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"cache {percent(frac)}", fontsize=9)
    axes[0][0].set_ylabel("count")
    axes[0][0].yaxis.set_major_formatter("{x:,.0f}")
    from matplotlib.patches import Patch

    _legend(fig, [Patch(facecolor="white", edgecolor="black", hatch="//", label="lossy (hatched)")] if lossy else [])
    return fig


def layers_figure(group: Sequence[Row]) -> Any:
    """Collision misses per request, layer by layer (paper Fig. 5/9); Belady dashed."""
    plt, fracs, styles = _plt(), _capacities(group), _styles(group)
    fig, axes = plt.subplots(1, len(fracs), figsize=(4.2 * len(fracs), 4.4), sharex=True, sharey=True,
                             squeeze=False, layout="constrained")  # fmt: skip
    belady = {r["cache_frac"]: r for r in _belady(group)}
    for ax, frac in zip(axes[0], fracs, strict=True):
        runs = [(styles[name], r) for name, rs in _by_policy(group) for r in rs if r["cache_frac"] == frac]
        runs += [(BOUND | {"label": BELADY, "marker": "."}, belady[frac])] if frac in belady else []
        for style, r in runs:
            layers = r["per_layer"]
            rates = [x["collision_misses"] / x["requests"] if x["requests"] else 0.0 for x in layers]
            ax.plot([x["layer"] for x in layers], rates, markersize=4, **style)
        ax.set_title(f"cache {percent(frac)}", fontsize=9)
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("collision misses / requests")
    _legend(fig)
    return fig


def _stall_unit(group: Sequence[Row]) -> tuple[float, str]:
    """Seconds when some stall passes 10 s, else milliseconds: (scale from seconds, unit)."""
    return (1.0, "s") if max(r["stall_s"] for r in group) > 10 else (1e3, "ms")


def prefetch_figure(group: Sequence[Row]) -> Any:
    """Prefetch precision and recall against capacity, and hit rate against stall (paper Fig. 6); Belady dashed."""
    plt, styles = _plt(), _styles(group)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    scale, unit = _stall_unit(group)
    stalls = any(r["stall_s"] for r in group)
    for name, runs in _by_policy(group):
        style = styles[name]
        if any(r["prefetches_issued"] for r in runs):
            fracs = [r["cache_frac"] * 100 for r in runs]
            left.plot(fracs, [r["prefetch_precision"] for r in runs], linewidth=2, **style)
            left.plot(fracs, [r["prefetch_recall"] for r in runs], **(style | {"label": None, "alpha": 0.4}))
        if stalls:
            right.plot([r["stall_s"] * scale for r in runs], [r["hit_rate"] for r in runs], markersize=4, **style)
    belady = _belady(group)
    if belady and stalls:
        right.plot([r["stall_s"] * scale for r in belady], [r["hit_rate"] for r in belady], marker=".",
                   label=BELADY, **BOUND)  # fmt: skip
    _percent_axis(left, _capacities(group))
    left.set(ylabel="prefetch precision, recall", ylim=(-0.02, 1.02),
             title="prefetch precision (bold) and recall (faded)")  # fmt: skip
    for ax, empty, why in ((left, not left.lines, "no policy prefetches"), (right, not stalls, "nothing stalls")):
        if empty:
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    right.set(xlabel=f"stall ({unit}, emulated)", ylabel="hit rate", title="hit rate vs stall, one point per capacity",
              ylim=(-0.02, 1.02))  # fmt: skip
    _legend(fig)
    return fig


def capacity_figure(group: Sequence[Row]) -> Any:
    """Hit rate and TTFT against cache capacity; Belady dashed, the unbounded cache dotted grey."""
    plt, styles = _plt(), _styles(group)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5), sharex=True, layout="constrained")
    lines = [(styles[name], runs) for name, runs in _by_policy(group)]
    if _belady(group):
        lines.append((BOUND | {"label": BELADY, "marker": "."}, _belady(group)))
    for style, runs in lines:
        fracs = [r["cache_frac"] * 100 for r in runs]
        left.plot(fracs, [r["hit_rate"] for r in runs], **style)
        right.plot(fracs, [r["ttft_s"] * 1e3 for r in runs], **style)
    for r in (r for r in group if r["baseline"] == "unbounded"):
        for ax, value in ((left, r["hit_rate"]), (right, r["ttft_s"] * 1e3)):
            ax.axhline(value, color="grey", linestyle=":", label="unbounded cache (100%)")
    for ax, title, unit in ((left, "hit rate", "hit rate"), (right, "time to first token", "TTFT (ms, emulated)")):
        _percent_axis(ax, _capacities(group))
        ax.set(ylabel=unit, title=title)
    left.set_ylim(-0.02, 1.02)
    _legend(fig)
    return fig


FIGURES: tuple[tuple[str, str, Callable[[Sequence[Row]], Any]], ...] = (
    ("misses", "total and collision misses per policy", misses_figure),
    ("collisions-per-layer", "collision misses per request, layer by layer", layers_figure),
    ("prefetch", "prefetch accuracy, and hit rate against stall", prefetch_figure),
    ("capacity", "hit rate and time to first token against capacity", capacity_figure),
)
"""(file name, subject, draw): each draw returns a figure that `report` titles and saves."""
