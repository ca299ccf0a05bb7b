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


@pytest.mark.launch
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
    # the live speculative row: the same text as plain greedy decoding, drafts verified, its own fast memory
    speculative = result["speculative"]
    assert speculative["outputs"] == result["live"]["outputs"]
    assert speculative["stats"]["verify_passes"] > 0 and speculative["stats"]["draft_capacity_bytes"] > 0
    assert speculative["stats"]["decode_tokens"] == 5 * prompts and speculative["note"]


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


class Writes(io.StringIO):
    """A console's file that keeps each write apart, to see text arrive in pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def generate(monkeypatch: pytest.MonkeyPatch, cache_dir: Path, tmp_path: Path, *args: str) -> tuple[dict, Writes]:
    """`specmd generate default ARGS --out FILE` in this process: the JSON result, and what it printed."""
    monkeypatch.setenv("SPECMD_CACHE_DIR", str(cache_dir))
    shown = Writes()
    monkeypatch.setattr(cli, "out", Console(file=shown, width=160))
    out = tmp_path / "result.json"
    assert cli.main(["generate", "default", "--max-new-tokens", "8", "--out", str(out), *args]) == 0
    return json.loads(out.read_text()), shown


def test_generate_streams_the_text_it_returns(monkeypatch: pytest.MonkeyPatch, cache_dir: Path, tmp_path: Path) -> None:
    prompts = ["import os", "def f(x):"]
    result, shown = generate(monkeypatch, cache_dir, tmp_path, "--prompt", prompts[0], "--prompt", prompts[1])
    texts = result["outputs"]
    assert len(texts) == 2 and all(texts)
    # each prompt, then its continuation exactly as returned, then a line break; the metrics after
    streamed = "".join(f"{prompt}{text}\n" for prompt, text in zip(prompts, texts, strict=True))
    assert shown.getvalue().startswith(streamed) and "hit rate" in shown.getvalue()
    # the continuation came in pieces as it was generated, not in one write at the end
    assert shown.writes.index(prompts[1]) - shown.writes.index(prompts[0]) > 3
    # the default link is the hardware profile's, not native speed
    assert result["options"]["bandwidth_gbps"] == "profile"


def test_generate_reads_experts_from_disk(monkeypatch: pytest.MonkeyPatch, cache_dir: Path, tmp_path: Path) -> None:
    ram, _ = generate(monkeypatch, cache_dir, tmp_path, "--prompt", "import os")
    disk, _ = generate(monkeypatch, cache_dir, tmp_path, "--prompt", "import os", "--storage", "disk")
    assert disk["outputs"] == ram["outputs"] and disk["options"]["storage"] == "disk"


def test_generate_samples_reproducibly_with_a_seed(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def sample(seed: str) -> list[str]:
        result, shown = generate(monkeypatch, cache_dir, tmp_path, "--prompt", "import os", "--prompt", "class A",
                                 "--temperature", "1.5", "--top-p", "0.95", "--seed", seed, "--json")  # fmt: skip
        assert shown.getvalue() == ""  # --json streams nothing ...
        assert json.loads(capsys.readouterr().out) == result  # ... and prints the JSON result alone
        assert set(result) == {"model", "options", "outputs", "stats"}
        return result["outputs"]

    first = sample("3")
    assert sample("3") == first  # the same seed, the same text
    assert sample("4") != first  # another seed draws other tokens
    greedy, _ = generate(monkeypatch, cache_dir, tmp_path, "--prompt", "import os", "--prompt", "class A", "--json")
    assert greedy["outputs"] != first  # sampling at 1.5 leaves the greedy path
    assert generate(monkeypatch, cache_dir, tmp_path, "--prompt", "import os", "--seed", "3")[0]["outputs"] == [
        greedy["outputs"][0]
    ]  # a seed without --temperature is still greedy


def test_generate_reads_prompts_from_a_file_or_stdin(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path, tmp_path: Path
) -> None:
    given, _ = generate(monkeypatch, cache_dir, tmp_path, "--prompt", "import os", "--prompt", "def f(x):")
    (tmp_path / "p.jsonl").write_text('"import os"\n{"prompt": "def f(x):"}\n')
    from_file, _ = generate(monkeypatch, cache_dir, tmp_path, "--prompts", str(tmp_path / "p.jsonl"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("import os\n\ndef f(x):\n"))
    from_stdin, shown = generate(monkeypatch, cache_dir, tmp_path, "--prompts", "-")
    assert from_file["outputs"] == from_stdin["outputs"] == given["outputs"]
    assert shown.getvalue().startswith(f"import os{given['outputs'][0]}\ndef f(x):{given['outputs'][1]}\n")


def test_generate_takes_a_prompt_from_stdin_in_the_console_script(cache_dir: Path, tmp_path: Path) -> None:
    """`--prompt -` is all of standard input but its final line break, in its place among the --prompt values."""
    out = tmp_path / "result.json"
    env = os.environ | {"SPECMD_CACHE_DIR": str(cache_dir)}
    run = subprocess.run(
        [str(Path(sys.executable).with_name("specmd")), "generate", "default", "--prompt", "import re",
         "--prompt", "-", "--max-new-tokens", "6", "--out", str(out)],
        input="class A:\n    def f(self):\n", capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    first, second = json.loads(out.read_text())["outputs"]
    assert run.stdout.startswith(f"import re{first}\nclass A:\n    def f(self):{second}\n")


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


def test_generate_speculates_to_the_same_text(monkeypatch: pytest.MonkeyPatch, cache_dir: Path, tmp_path: Path) -> None:
    plain, _ = generate(monkeypatch, cache_dir, tmp_path, "--prompt", "import os")
    spec, shown = generate(monkeypatch, cache_dir, tmp_path, "--prompt", "import os", "--speculate", "auto")
    assert spec["outputs"] == plain["outputs"]  # greedy: speculation does not change the text
    stats = spec["stats"]
    assert stats["verify_passes"] == len(stats["speculate_k"]) > 0 and stats["draft_capacity_bytes"] > 0
    assert spec["options"]["draft_precision"] == "nf4" and spec["options"]["draft_frac"] == 1.0
    assert (
        "acceptance rate" in shown.getvalue()
        and "acceptance rate" not in generate(monkeypatch, cache_dir, tmp_path, "--prompt", "import os")[1].getvalue()
    )
