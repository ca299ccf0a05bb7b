"""`specmd eval`: the same evaluation as lm_eval's `offload-hf`, with specmd's defaults (fixtures, 5%, 5 GB/s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from specmd import cli
from specmd.eval_tasks import TASK_DIR, judge


def test_specmd_eval_prints_scores_and_cache_metrics(
    eval_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SPECMD_EVAL_DATA", raising=False)
    monkeypatch.setattr(cli, "out", Console(width=200))
    judge.set_judge(lambda request: float(request.prediction.strip() == ""))
    try:
        args = ["eval", str(eval_model), "--tasks", "specmd_nq_open,specmd_truthfulqa_gen", "--limit", "2",
                "--max-gen-toks", "4", "--batch-size", "2", "--device", "cpu"]  # fmt: skip
        args += ["--out", str(tmp_path / "r.json")]
        assert cli.main(args) == 0
    finally:
        judge.set_judge(None)
    shown = capsys.readouterr().out
    assert "specmd_nq_open" in shown and "exact_match" in shown and "judge" in shown
    assert "expert cache per task" in shown and "cache 5%, the a100 link (5 GB/s)" in shown and "collisions" in shown
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["config"]["model"] == "offload-hf"
    options = result["config"]["specmd"]["options"]
    assert (options["cache_frac"], options["bandwidth_gbps"], options["policy"]["eviction"]["name"]) == (
        0.05, "profile", "least-stale")  # fmt: skip
    assert 0 <= result["results"]["specmd_nq_open"]["judge,remove_whitespace"] <= 1
    for task in ("specmd_nq_open", "specmd_truthfulqa_gen"):
        stats = result["config"]["specmd"]["tasks"][task]
        assert stats["lm_eval_requests"] == 2 and stats["requests"] > 0 and stats["decode_tokens"] > 0


def test_specmd_eval_speculates_with_a_self_draft(
    eval_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPECMD_EVAL_DATA", raising=False)
    monkeypatch.setattr(cli, "out", Console(width=200))
    args = ["eval", str(eval_model), "--tasks", "specmd_nq_open", "--limit", "2", "--max-gen-toks", "6",
            "--device", "cpu", "--speculate", "2", "--draft-precision", "int2", "--json",
            "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert cli.main(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    stats = result["config"]["specmd"]["tasks"]["specmd_nq_open"]
    assert stats["lm_eval_requests"] == 2 and stats["verify_passes"] > 0 and stats["drafted_tokens"] > 0
    assert len(stats["speculate_k"]) == stats["verify_passes"] and stats["draft_capacity_bytes"] > 0


def test_print_task_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["eval", "--print-task-dir"]) == 0
    assert capsys.readouterr().out.strip() == str(TASK_DIR)


def test_bad_data_source_is_an_error(eval_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", str(eval_model), "--tasks", "specmd_nq_open", "--data", "/no/such/dir", "--device", "cpu"]
    assert cli.main(args) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert error == (
        "error: task data source '/no/such/dir' is neither 'hub', 'fixtures' nor a directory "
        "(set by specmd_data metadata or $SPECMD_EVAL_DATA)"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-processes", "0"], "specmd eval: argument --num-processes: must be a whole number >= 1, got '0'"),
        (["--num-processes", "two"], "specmd eval: argument --num-processes: must be a whole number >= 1, got 'two'"),
        (["--num-processes", "2", "--device", "cuda:1"], "--device cuda:1 names one GPU, but each of the 2 processes "
         "takes its own (rank r runs on cuda:r): pass --device cuda or --device cpu"),
        (["--num-processes", "3", "--device", "cuda"], "--num-processes 3 needs 3 GPUs, one per rank; torch sees 1: "
         "pass at most 1, or --device cpu"),
    ],
)  # fmt: skip
def test_bad_num_processes_is_one_error_before_any_launch(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess

    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"launched {a}"))
    assert cli.main(["eval", "--tasks", "specmd_nq_open", *args]) == 2
    assert " ".join(capsys.readouterr().err.split()).startswith(f"error: {message}")
