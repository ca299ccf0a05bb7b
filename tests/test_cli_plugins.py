"""Policies from other packages on the command line: a pip-installed plugin's policies are names every command
knows, `--plugin MODULE` loads one that is not installed (in a sweep's workers too), and `specmd policies` shows
each policy's description and parameters."""

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
from specmd.sim.sweep import read_results
from tests.plugins import MIX, MODULE, POLICY, write_plugin
from tests.sim.conftest import random_trace

EXE = str(Path(sys.executable).with_name("specmd"))


def specmd(path: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    """The console script, with `path` (a plugin's folder) on the Python path."""
    paths = [str(path)] if path else []
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(paths), "COLUMNS": "200"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=300, check=False)


def listed(run: subprocess.CompletedProcess[str]) -> dict[tuple[str, str], dict]:
    assert run.returncode == 0, run.stderr
    return {(p["kind"], p["name"]): p for p in json.loads(run.stdout)["policies"]}


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("trace") / "trace.npz"
    return str(random_trace(0, layers=4, experts=8, tokens=40).save(path))


def test_a_pip_installed_plugin_needs_no_flag(tmp_path: Path, trace: str) -> None:
    project = write_plugin(tmp_path / "project")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{MODULE}"\nversion = "0.1"\n\n[tool.setuptools]\npy-modules = ["{MODULE}"]\n\n'
        f'[project.entry-points."specmd.policies"]\nmru = "{MODULE}"\n'
    )  # as README's "Policies" shows it
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(target), str(project)], check=True, capture_output=True, timeout=300)
    policies = listed(specmd(target, "policies", "--json"))
    assert policies[("eviction", POLICY)]["aliases"] == ["pmru"]
    run = specmd(target, "replay", trace, "--policy", MIX, "--cache-frac", "0.3", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["stats"]["evictions"] > 0


def test_plugin_loads_a_module_for_a_replay_and_a_sweep(tmp_path: Path, trace: str) -> None:
    folder = write_plugin(tmp_path / "plugin")
    unknown = specmd(folder, "replay", trace, "--policy", MIX, "--cache-frac", "0.3")
    assert unknown.returncode == 2 and f"unknown eviction policy '{POLICY}'" in unknown.stderr
    run = specmd(folder, "replay", trace, "--plugin", MODULE, "--policy", MIX, "--cache-frac", "0.3", "--json")
    assert run.returncode == 0, run.stderr
    out = tmp_path / "r.csv"
    args = ["sweep", trace, "--plugin", MODULE, "--policy", MIX, "--cache-frac", "0.3", "0.5", "--jobs", "2"]
    run = specmd(folder, *args, "--out", str(out), "--json")
    assert run.returncode == 0, run.stderr
    assert sorted(row["eviction"] for row in read_results(out)) == ["belady", "belady", "lru", POLICY, POLICY]
    assert listed(specmd(folder, "policies", "--plugin", MODULE, "--json"))[("eviction", POLICY)]


def test_a_plugin_that_cannot_be_imported_is_one_line(tmp_path: Path, trace: str) -> None:
    folder = write_plugin(tmp_path / "plugin", source="raise RuntimeError('needs a GPU')\n")
    for args in (
        ["policies", "--plugin", MODULE],
        ["replay", trace, "--plugin", "specmd_test_absent", "--policy", MIX, "--cache-frac", "0.3"],
    ):
        run = specmd(folder, *args)
        assert run.returncode == 2 and run.stdout == ""
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: policy plugin 'specmd_test_")
    assert "failed to import: RuntimeError: needs a GPU" in specmd(folder, "policies", "--plugin", MODULE).stderr


def test_every_command_that_takes_a_policy_takes_plugins() -> None:
    commands = cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    takes = {name for name, parser in commands.items() if "--policy" in parser._option_string_actions}
    assert takes == {"generate", "trace", "replay", "sweep", "eval"}
    assert {name for name, parser in commands.items() if "--plugin" in parser._option_string_actions} == {
        *takes,
        "policies",
    }


def test_policies_shows_whole_descriptions_and_parameters(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    console = Console(width=1000, record=True, file=io.StringIO())
    monkeypatch.setattr(cli, "out", console)
    assert cli.main(["policies"]) == 0
    text = console.export_text()
    for shown in ("fallback=(int8,nf4,hqq2)", "thresholds=(0.2,0.1)", "order=cyclic", "rate=0.1"):
        assert shown in text
    assert "predicted probability mass (softmax of the predicted logits), at most `cap` x top-k of them." in text
    assert cli.main(["policies", "--json"]) == 0
    rows = {(p["kind"], p["name"]): p for p in json.loads(capsys.readouterr().out)["policies"]}
    assert rows[("miss", "drop")]["description"] == (
        "Skip a missing expert whose best rank in its tokens' top-k is `rank` or worse (1 = first choice; "
        "default 3); better-ranked experts are fetched. A dropped expert contributes nothing to its tokens."
    )
    assert rows[("miss", "fetch-priority")]["parameters"] == {"percentile": 60.0, "fallback": ["int8", "nf4", "hqq2"]}
    assert rows[("eviction", "lru")]["parameters"] == {} and rows[("config", "config3")]["parameters"] == {}
