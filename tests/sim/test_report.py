"""`specmd report` on hand-made results: settings and capacities in numeric order, quality beside speed, the
figures' titles, Belady as a bound and shared axes. (A report of a real sweep: tests/sim/test_sweep.py.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from specmd.sim import report as rep
from specmd.sim.report import BELADY, LOSSY_NOTE, _typed, mark_quality, natural, percent, report
from specmd.sim.sweep import COLUMNS, STAT_COLUMNS


def row(policy: str = "none/lru/fetch/standard", frac: float = 0.1, bandwidth: str = "5.0", **fields: Any) -> dict:
    """A whole results row (2 layers, 100 requests) with `fields` overriding its defaults."""
    prefetch, eviction, miss, routing = policy.split("/")
    layer = {"requests": 50, "collision_misses": 3}
    out: dict[str, Any] = dict.fromkeys(STAT_COLUMNS, 0) | {
        "trace": "traces/code.npz", "trace_sha256": "0" * 64, "policy": policy, "cache_frac": frac,
        "bandwidth_gbps": bandwidth, "hardware": "a100", "shape_from": "", "storage": "ram", "host_cache_frac": "",
        "disk": "", "host_eviction": "", "baseline": "", "prefetch": prefetch,
        "eviction": eviction, "miss": miss, "routing": routing, "specmd_version": "0.1.0", "requests": 100,
        "hits": int(frac * 100), "misses": 100 - int(frac * 100), "hit_rate": frac, "stall_s": 0.1, "ttft_s": 0.01,
        "tokens_per_s": 100.0, "fetches_by_precision": {"bf16": 90},
        "per_layer": [{"layer": 0, **layer}, {"layer": 1, **layer}],
    }  # fmt: skip
    out |= fields
    out["fetches_by_precision"] = json.dumps(out["fetches_by_precision"])
    out["per_layer"] = json.dumps(out["per_layer"])
    return out


def belady(frac: float = 0.1, bandwidth: str = "5.0", **fields: Any) -> dict:
    return row("none/belady/fetch/standard", frac, bandwidth, baseline="belady", hit_rate=0.5, **fields)


def write(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def headings(text: str, level: str) -> list[str]:
    return [line[len(level) + 1 :] for line in text.splitlines() if line.startswith(level + " ")]


def cells(text: str) -> dict[str, list[str]]:
    """Every table row of report.md: its policy cell -> its cells (the last capacity's row wins)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return {r[0]: r for r in rows if r[0] != "policy"}


def test_settings_sort_links_by_speed_and_capacities_by_size(tmp_path: Path) -> None:
    # In the CSV's own order, text order would put 16 before 5 and "native" before "profile"; and 50% first.
    links = ("16.0", "native", "5.0", "profile", "100.0")
    rows = [row(frac=f, bandwidth=b) for b in links for f in (0.5, 0.025, 0.1)]
    text = (report(write(tmp_path / "r.csv", rows), tmp_path / "out")[0]).read_text()
    assert headings(text, "##") == [
        "traces/code.npz, a100, 5 GB/s link",
        "traces/code.npz, a100, its link (5 GB/s)",  # the a100 profile's link: 5 GB/s, after a plain 5
        "traces/code.npz, a100, 16 GB/s link",
        "traces/code.npz, a100, 100 GB/s link",
        "traces/code.npz, a100, native-speed link",  # no emulation: the fastest, last
    ]
    assert headings(text, "###")[:3] == ["cache 2.5%", "cache 10%", "cache 50%"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[:2] == ["1-capacity.png", "1-collisions-per-layer.png"]


def test_policies_with_numbers_sort_by_value() -> None:
    names = ["none/lru/drop:rank=10/standard", "none/lru/drop:rank=3/standard", "none/lfu"]
    assert sorted(names, key=natural) == ["none/lfu", "none/lru/drop:rank=3/standard", "none/lru/drop:rank=10/standard"]
    assert [percent(f) for f in (0.05, 0.1, 0.025, 1.0)] == ["5%", "10%", "2.5%", "100%"]


def test_lossy_rows_are_marked_with_what_they_gave_up(tmp_path: Path) -> None:
    rows = [
        row("none/lru/fetch/standard"),
        row("none/lru/drop:rank=2/standard", drops=25, hit_rate=0.9, tokens_per_s=900.0),
        row("none/lru/substitute/standard", substitutions=4),
        row("none/lru/fetch-priority/standard", fetches_by_precision={"bf16": 40, "int8": 30, "nf4": 2}),
        row("none/lru/fetch-priority/standard", frac=0.5),  # no fallback fetched at this capacity: lossless
        row("none/lru/fetch/cache-aware:lam=0.5"),
        belady(),
    ]
    text = (report(write(tmp_path / "r.csv", rows), tmp_path / "out")[0]).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| policy"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns.index("quality") == columns.index("tokens/s") + 1  # beside speed
    table = cells(text)
    quality = columns.index("quality")
    assert table["none/lru"][quality] == "lossless" and table["none/belady"][quality] == "lossless"
    assert table["none/lru/drop:rank=2/standard **(lossy)**"][quality] == "25 dropped (25.0%)"
    assert table["none/lru/substitute/standard **(lossy)**"][quality] == "4 substituted (4.0%)"
    assert table["none/lru/fetch-priority/standard **(lossy)**"][quality] == "fetched as int8 30, nf4 2"
    assert table["none/lru/fetch-priority/standard"][quality] == "lossless"  # the 50% row
    assert table["none/lru/fetch/cache-aware:lam=0.5 **(lossy)**"][quality] == "rerouted (cache-aware:lam=0.5)"
    assert LOSSY_NOTE in text


def test_without_a_fetch_on_miss_run_precisions_are_unknown() -> None:
    rows = [_typed({k: str(v) for k, v in row("none/lru/cascade/standard").items()})]
    mark_quality(rows)
    assert rows[0]["lossy"] and rows[0]["quality"] == ["precisions unknown (no fetch-on-miss run of this trace)"]


def test_every_figure_is_titled_with_its_setting(tmp_path: Path) -> None:
    rows = [row(frac=f, shape_from="olmoe-1b-7b", hardware="a100-paper", bandwidth="profile") for f in (0.05, 0.25)]
    files = report(write(tmp_path / "r.csv", rows), tmp_path / "out")
    text = files[0].read_text()
    where = "code.npz, priced as olmoe-1b-7b, a100-paper, its link (5 GB/s), cache 5%, 25%"
    for figure in files[1:]:
        title = Image.open(figure).text["Title"]  # the PNG carries the title it shows
        assert title.endswith("\n" + where), title
        assert f"({figure.name})" in text and f": {where}]" in text


def lines_labelled(ax: Any, name: str) -> list[Any]:
    return [line for line in ax.get_lines() if line.get_label() == name]


def test_belady_is_a_dashed_bound_and_compared_panels_share_axes() -> None:
    raw = [row(frac=f) for f in (0.1, 0.5)] + [belady(f) for f in (0.1, 0.5)]
    group = [_typed({k: str(v) for k, v in r.items()}) for r in raw]
    mark_quality(group)
    plt = rep._plt()
    for draw in (rep.capacity_figure, rep.layers_figure):
        fig = draw(group)
        bounds = [line for ax in fig.axes for line in lines_labelled(ax, BELADY)]
        assert bounds and all(line.get_linestyle() == "--" for line in bounds)
        assert not [line for ax in fig.axes for line in lines_labelled(ax, "none/belady")]  # not a competitor
        plt.close(fig)
    fig = rep.misses_figure(group)
    first, second = fig.axes[:2]
    assert first.get_shared_y_axes().joined(first, second)
    assert [line.get_linestyle() for line in first.get_lines()] == ["--"]  # Belady's misses, not a bar
    plt.close(fig)
    fig = rep.layers_figure(group)
    assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])
    plt.close(fig)


@pytest.mark.parametrize("stall", [0.0, 0.2])
def test_the_prefetch_figure_says_when_nothing_stalls(stall: float) -> None:
    group = [_typed({k: str(v) for k, v in row(frac=f, stall_s=stall).items()}) for f in (0.1, 0.5)]
    mark_quality(group)
    fig = rep.prefetch_figure(group)
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert texts == (["nothing stalls"] if stall == 0 else [])
    rep._plt().close(fig)
