"""Sweeps are deterministic and resumable; reports build from a results table; the CLI pipeline runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specmd import __version__
from specmd.cache.policies.plugins import load_plugin
from specmd.sim import load_trace, replay
from specmd.sim import sweep as sweep_module
from specmd.sim.report import report
from specmd.sim.sweep import SweepGrid, read_results, sweep
from tests.plugins import FAIL, MIX, MODULE, POLICY, write_plugin

POLICIES = ("none/lru/fetch/standard", "topk/least-stale/fetch/standard")


def grid(trace: Path, **overrides) -> SweepGrid:  # type: ignore[no-untyped-def]
    values = {"traces": (str(trace),), "policies": POLICIES, "cache_fracs": (0.1, 0.25), "bandwidths": (5.0, None)}
    return SweepGrid(**(values | overrides))


def rows_of(path: Path) -> list[tuple]:
    return sorted(tuple(row.items()) for row in read_results(path))


def test_a_sweep_covers_the_grid_and_the_baselines(recorded: Path, tmp_path: Path) -> None:
    new = sweep(grid(recorded), tmp_path / "r.csv", jobs=1, progress=False)
    # 2 policies x 2 capacities x 2 links, + Belady per capacity and link, + the unbounded cache per link
    assert len(new) == 8 + 4 + 2
    rows = read_results(tmp_path / "r.csv")
    assert {r["baseline"] for r in rows} == {"", "belady", "unbounded"}
    assert {r["bandwidth_gbps"] for r in rows} == {"5.0", "native"}
    assert {r["trace_sha256"] for r in rows} == {load_trace(recorded).sha256}
    assert {r["specmd_version"] for r in rows} == {__version__}
    assert all(json.loads(r["per_layer"]) for r in rows)


def test_sweeps_are_deterministic_in_any_number_of_processes(recorded: Path, tmp_path: Path) -> None:
    sweep(grid(recorded), tmp_path / "one.csv", jobs=1, progress=False)
    sweep(grid(recorded), tmp_path / "two.csv", jobs=2, progress=False)
    assert rows_of(tmp_path / "one.csv") == rows_of(tmp_path / "two.csv")


def test_a_sweep_resumes_where_it_stopped(recorded: Path, tmp_path: Path) -> None:
    partial = grid(recorded, policies=POLICIES[:1], cache_fracs=(0.1,))
    first = sweep(partial, tmp_path / "r.csv", jobs=1, progress=False)
    rest = sweep(grid(recorded), tmp_path / "r.csv", jobs=1, progress=False)
    assert len(first) + len(rest) == len(grid(recorded).runs())
    assert sweep(grid(recorded), tmp_path / "r.csv", jobs=1, progress=False) == []  # nothing left to do
    sweep(grid(recorded), tmp_path / "fresh.csv", jobs=1, progress=False)
    assert rows_of(tmp_path / "r.csv") == rows_of(tmp_path / "fresh.csv")


def test_a_sweep_over_disk_settings_replays_each_and_resumes(recorded: Path, tmp_path: Path) -> None:
    disk = grid(recorded, cache_fracs=(0.1,), bandwidths=(5.0,), storage="disk", host_cache_fracs=(None, 0.3),
                disks=("sata", "nvme4"), host_eviction="lfu", baselines=False)  # fmt: skip
    new = sweep(disk, tmp_path / "r.csv", jobs=1, progress=False)
    assert len(new) == 2 * 2 * 2  # policies x host tiers x disks
    for row in read_results(tmp_path / "r.csv"):
        host = float(row["host_cache_frac"]) if row["host_cache_frac"] else None
        assert row["host_eviction"] == ("lfu" if host else "")
        expected = replay(recorded, policy=row["policy"], cache_frac=0.1, bandwidth_gbps=5.0, storage="disk",
                          host_cache_frac=host, host_eviction="lfu", disk=row["disk"])  # fmt: skip
        assert (int(row["disk_bytes_read"]), int(row["host_hits"]), float(row["disk_stall_s"])) == (
            expected.disk_bytes_read,
            expected.host_hits,
            expected.disk_stall_s,
        )
    assert sweep(disk, tmp_path / "r.csv", jobs=1, progress=False) == []  # resumes: nothing left
    report(tmp_path / "r.csv", tmp_path / "rep")
    titles = (tmp_path / "rep" / "report.md").read_text()
    assert "disk sata, no host tier" in titles and "disk nvme4, host tier 30% (lfu)" in titles
    with pytest.raises(ValueError, match="need storage='disk'"):
        grid(recorded, host_cache_fracs=(0.3,))


def test_grid_files_and_early_errors(recorded: Path, tmp_path: Path) -> None:
    toml = tmp_path / "grid.toml"
    toml.write_text(
        f'traces = ["{recorded}"]\npolicies = ["none/ls/fetch/standard"]\ncache_frac = [0.1, 0.5]\n'
        'bandwidth_gbps = [16, "native"]\nhardware = ["h100-pcie"]\n'
    )
    loaded = SweepGrid.from_toml(toml)
    assert loaded.policies == ("none/least-stale/fetch/standard",)
    assert loaded.bandwidths == (16.0, None) and loaded.hardware == ("h100-pcie",)
    toml.write_text('traces = ["x"]\npolicy = ["lru"]\n')
    with pytest.raises(ValueError, match="unknown key 'policy'"):
        SweepGrid.from_toml(toml)
    with pytest.raises(ValueError, match="valid eviction policies"):
        grid(recorded, policies=("none/mru/fetch/standard",))
    with pytest.raises(ValueError, match="cache_frac must be a number"):
        grid(recorded, cache_fracs=(1.5,))
    with pytest.raises(ValueError, match="does not exist"):
        sweep(grid(tmp_path / "missing.jsonl"), tmp_path / "r.csv", progress=False)


def test_results_from_another_layout_are_not_appended_to(recorded: Path, tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("trace,policy\nx,y\n")
    with pytest.raises(ValueError, match="other columns"):
        sweep(grid(recorded), tmp_path / "r.csv", progress=False)


def test_report_writes_tables_and_figures(recorded: Path, tmp_path: Path) -> None:
    sweep(grid(recorded, bandwidths=(5.0,)), tmp_path / "r.csv", jobs=1, progress=False)
    files = report(tmp_path / "r.csv", tmp_path / "report")
    names = sorted(f.name for f in files)
    assert names == ["capacity.png", "collisions-per-layer.png", "misses.png", "prefetch.png", "report.md"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "### cache 10%" in text and "| topk/least-stale |" in text and "gap to Belady" in text
    assert "| none/belady | " in text and "+0.0 pts |" in text
    for figure in files[1:]:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000


def test_report_of_an_empty_table_is_an_error(recorded: Path, tmp_path: Path) -> None:
    sweep(grid(recorded, cache_fracs=(0.1,), policies=POLICIES[:1]), tmp_path / "r.csv", progress=False)
    with (tmp_path / "r.csv").open() as handle:
        header = next(csv.reader(handle))
    (tmp_path / "empty.csv").write_text(",".join(header) + "\n")
    with pytest.raises(ValueError, match="holds no runs"):
        report(tmp_path / "empty.csv", tmp_path / "out")


def test_three_commands_from_a_model_to_a_report(tmp_path: Path) -> None:
    env = os.environ | {"SPECMD_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(Path.cwd())}
    exe = str(Path(sys.executable).with_name("specmd"))

    def specmd(*args: str) -> str:
        run = subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
        assert run.returncode == 0, run.stderr
        return run.stdout

    (tmp_path / "prompts.txt").write_text("def f(x):\nimport os\n")
    specmd("trace", "default", "--prompts", "prompts.txt", "--max-new-tokens", "4", "--out", "t.jsonl")
    specmd("sweep", "t.jsonl", "--policy", "topk/ls/fetch/standard", "--cache-frac", "0.1", "0.5",
           "--bandwidth-gbps", "5", "--out", "r.csv")  # fmt: skip
    summary = json.loads(specmd("report", "r.csv", "--out", "report", "--json"))
    assert len(summary["files"]) == 5 and (tmp_path / "report" / "report.md").is_file()
    replayed = json.loads(specmd("replay", "t.jsonl", "--policy", "none/belady/fetch/standard", "--cache-frac", "0.1",
                                 "--json"))  # fmt: skip
    assert replayed["stats"]["requests"] > 0


def table_rows(text: str, capacity: str) -> dict[str, list[str]]:
    """The rows of report.md's table at `capacity` ("10%"): policy label -> its cells."""
    section = text.split(f"### cache {capacity}\n")[1].strip("\n").split("\n\n")[0]
    lines = section.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[-2:] == ["gap to Belady", "gap to Belady closed"]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_report_shows_the_share_of_the_gap_to_belady_closed(recorded: Path, tmp_path: Path) -> None:
    policies = ("none/lru/fetch/standard", "none/lfu/fetch/standard", "none/next-use/fetch/standard",
                "none/fld/fetch/standard", "topk/lru/fetch/standard")  # fmt: skip
    sweep(grid(recorded, policies=policies, cache_fracs=(0.1,), bandwidths=(None,)), tmp_path / "r.csv", jobs=1,
          progress=False)  # fmt: skip
    hits = {
        (r["prefetch"], r["eviction"], r["baseline"]): float(r["hit_rate"]) for r in read_results(tmp_path / "r.csv")
    }
    floor, belady = max(hits[("none", "lru", "")], hits[("none", "lfu", "")]), hits[("none", "belady", "belady")]
    assert belady > floor  # this trace leaves a gap at 10%
    report(tmp_path / "r.csv", tmp_path / "report")
    rows = table_rows((tmp_path / "report" / "report.md").read_text(), "10%")
    for name in ("lru", "lfu", "next-use", "fld"):
        expected = (hits[("none", name, "")] - floor) / (belady - floor)
        assert rows[f"none/{name}"][-1] == f"{expected:.0%}"
    assert rows["none/belady"][-1] == "100%"
    assert rows["topk/lru"][-1] == "-"  # no topk/lfu row: no floor at that prefetch
    assert rows["none/belady"][-2] == "+0.0 pts"  # the gap in points stays


def test_gap_closed_needs_both_floors_and_a_positive_gap() -> None:
    from specmd.sim.report import _floors, gap_closed

    def row(eviction: str, hit: float, prefetch: str = "none") -> dict:
        return {"cache_frac": 0.1, "prefetch": prefetch, "eviction": eviction, "miss": "fetch",
                "routing": "standard", "baseline": "", "hit_rate": hit}  # fmt: skip

    floors = _floors([row("lru", 0.2), row("lfu", 0.3), row("next-use", 0.5), row("lru", 0.6, "topk")])
    assert floors == {(0.1, "none", "fetch", "standard"): 0.3}  # topk has LRU only
    assert gap_closed(row("next-use", 0.5), 0.7, 0.3) == pytest.approx(0.5)
    assert gap_closed(row("lru", 0.2), 0.7, 0.3) == pytest.approx(-0.25)  # below the floor: negative
    assert gap_closed(row("next-use", 0.5), 0.3, 0.3) is None  # Belady not above the floor
    assert gap_closed(row("next-use", 0.5), None, 0.3) is None
    assert gap_closed(row("next-use", 0.5), 0.7, None) is None


def test_mixes_that_run_live_only_are_refused_before_any_run(recorded: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    for name, config, why in (("hobbit24", "config3", "looks 2 layers ahead"), ("mixturecache25", "config4",
                              "changes routing")):  # fmt: skip
        with pytest.raises(ValueError, match=f"cannot replay .*{config}, {name}.* so no run started: .*{why}") as error:
            sweep(grid(recorded, policies=(*POLICIES, name)), out, jobs=1, progress=False)
        assert f"specmd reproduce runs the paper's {config} live" in str(error.value)
        assert not out.exists()  # not even a header
    sweep(grid(recorded, cache_fracs=(0.25,)), out, jobs=1, progress=False)
    before = out.read_bytes()
    with pytest.raises(ValueError, match="holds less than one expert"):  # a cache too small is refused up front too
        sweep(grid(recorded, cache_fracs=(0.25, 0.001)), out, jobs=1, progress=False)
    assert out.read_bytes() == before  # the finished rows stay, as they were, for the sweep to resume


@pytest.mark.usefixtures("fresh_plugins")
def test_a_run_that_fails_mid_sweep_leaves_only_whole_rows_and_the_sweep_resumes(
    recorded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path / "plugin")))
    load_plugin(MODULE)
    out, failing = tmp_path / "r.csv", grid(recorded, policies=(*POLICIES, MIX), bandwidths=(5.0,))
    monkeypatch.setenv(FAIL, "1")  # the plugin's policy raises at its first eviction, in a worker
    with pytest.raises(ValueError, match="plugin-mru was told to fail"):
        sweep(failing, out, jobs=2, progress=False)
    assert out.read_bytes().endswith(b"\r\n")
    finished = read_results(out)
    assert not caplog.records and all(row["eviction"] != POLICY for row in finished)  # whole rows of finished runs
    monkeypatch.delenv(FAIL)
    assert len(sweep(failing, out, jobs=2, progress=False)) == len(failing.runs()) - len(finished)
    assert len(rows_of(out)) == len({(r["policy"], r["cache_frac"]) for r in read_results(out)}) == 9


@pytest.mark.usefixtures("fresh_plugins")
def test_workers_import_the_plugins_the_parent_loaded(
    recorded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path / "plugin")))
    load_plugin(MODULE)
    monkeypatch.setattr(sweep_module, "START_METHOD", "spawn")  # fresh workers: nothing inherited from the parent
    rows = sweep(grid(recorded, policies=(MIX,), bandwidths=(5.0,)), tmp_path / "r.csv", jobs=2, progress=False)
    assert sorted(row["eviction"] for row in rows) == ["belady", "belady", "lru", POLICY, POLICY]
