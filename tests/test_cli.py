"""The `specmd` console script, run as users run it (a subprocess)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from specmd import cli
from specmd.cli.run import DEMO_ROWS


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("specmd-cache")


def specmd(cache_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"SPECMD_CACHE_DIR": str(cache_dir), "COLUMNS": "160"}
    exe = Path(sys.executable).with_name("specmd")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300, check=False)


def test_demo_tells_the_papers_story_from_one_run(cache_dir: Path) -> None:
    run = specmd(cache_dir, "demo", "--max-new-tokens", "6", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert [r["policy"] for r in result["results"]] == list(DEMO_ROWS)
    assert (result["cache_frac"], result["bandwidth_gbps"], result["hardware"], result["shape_from"]) == (
        0.05, "profile", "a100-paper", "olmoe-1b-7b",
    )  # fmt: skip
    stats = {r["policy"]: r["stats"] for r in result["results"]}
    prompts = len(result["prompts"])
    for row in stats.values():
        assert row["requests"] == row["hits"] + row["late_prefetches"] + row["misses"] > 0
        assert row["decode_tokens"] == 5 * prompts and row["ttft_s"] > 0
    # the model ran once; its live counters are the first row's replay, digit for digit (wall clock aside)
    live = result["live"]["stats"]
    assert {k: v for k, v in live.items() if not k.startswith("wall")} == {
        k: v for k, v in stats[DEMO_ROWS[0]].items() if not k.startswith("wall")
    }
    assert len(result["live"]["outputs"]) == prompts
    # the story the rows tell on the bundled model in the paper's regime
    lru, ls = stats["none/lru/fetch/standard"], stats["none/least-stale/fetch/standard"]
    belady = stats["none/belady/fetch/standard"]
    assert ls["collision_misses"] < lru["collision_misses"] and ls["hit_rate"] > lru["hit_rate"]
    assert stats["topk/lru/fetch/standard"]["hit_rate"] > lru["hit_rate"] + 0.2  # prefetches land
    assert belady["hit_rate"] >= max(s["hit_rate"] for p, s in stats.items() if p.startswith("none/"))
    assert all(r["note"] for r in result["results"])


def test_demo_table(cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SPECMD_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(cli, "out", Console(width=160))
    assert cli.main(["demo", "--max-new-tokens", "2", "--cache-frac", "0.25", "--bandwidth-gbps", "5"]) == 0
    shown = capsys.readouterr().out
    assert "cache 25%, 5.0 GB/s, a100-paper compute, priced as" in shown
    assert "topk/least-stale" in shown and "none/belady" in shown and "What to notice" in shown
    assert "fewer collisions than LRU" in shown and "The model ran once" in shown


def test_generate_prints_text_and_metrics(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    run = specmd(
        cache_dir, "generate", "default", "--prompt", "import os", "--max-new-tokens", "5",
        "--policy", "none/lru/fetch/standard", "--bandwidth-gbps", "5", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "import os" in run.stdout and "hit rate" in run.stdout and "TTFT ms" in run.stdout
    result = json.loads(out.read_text())
    assert result["options"]["policy"]["eviction"]["name"] == "lru"
    assert result["options"]["bandwidth_gbps"] == 5.0
    assert result["stats"]["decode_tokens"] == 4 and len(result["outputs"]) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cache-frac", "1.5"], "argument --cache-frac: must be a number with 0 < value <= 1, got '1.5'"),
        (["--policy", "topk/mru/fetch/standard"], "valid eviction policies: lru, least-stale (ls)"),
        (["--bandwidth-gbps", "0"], "argument --bandwidth-gbps: must be a number > 0"),
    ],
)
def test_generate_reports_bad_input(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.setenv("SPECMD_CACHE_DIR", str(cache_dir))
    console = Console(width=300, record=True, file=io.StringIO())
    monkeypatch.setattr(cli, "err", console)
    assert cli.main(["generate", "default", "--prompt", "x", *args]) == 2
    assert message in console.export_text()


def test_policies_lists_every_registered_name(cache_dir: Path) -> None:
    run = specmd(cache_dir, "policies", "--json")
    listed = {(p["kind"], p["name"]) for p in json.loads(run.stdout)["policies"]}
    assert {("eviction", "lru"), ("eviction", "least-stale"), ("prefetch", "topk"), ("miss", "fetch")} <= listed


@pytest.mark.parametrize("command", ["demo", "generate", "info", "routing-stats", "policies"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0 and "--json" in capsys.readouterr().out
