"""The stock `lm_eval` console script, run as users run it: `--model offload-hf` on every specmd task, and
`--model hf` still working beside it (same environment, same hook)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from specmd.eval_tasks import TASK_DIR

pytestmark = pytest.mark.launch  # the stock `lm_eval` script, in subprocesses
TASKS = ("specmd_gsm8k", "specmd_truthfulqa_gen", "specmd_nq_open")
SCORES = {
    "specmd_gsm8k": ("exact_match,strict-match", "exact_match,flexible-extract"),
    "specmd_truthfulqa_gen": ("bleu_max,none", "bleu_acc,none", "rouge1_acc,none", "rougeL_max,none"),
    "specmd_nq_open": ("exact_match,remove_whitespace",),
}
CACHE_METRICS = ("hit_rate", "collision_misses", "ttft_s", "wall_ttft_s", "tokens_per_s", "wall_tokens_per_s",
                 "stall_s", "bytes_transferred", "requests", "hits", "misses", "late_prefetches")  # fmt: skip


class LmEvalRun:
    """One `lm_eval` run on two documents per task, in a batch of two; started at once, read by `result`."""

    def __init__(self, script: tuple[str, dict[str, str]], out: Path, model: str, model_args: str, tasks: str):
        command, env = script
        args = [
            command, "--model", model, "--model_args", model_args, "--tasks", tasks,
            "--include_path", str(TASK_DIR), "--metadata", json.dumps({"specmd_data": "fixtures"}),
            "--limit", "2", "--batch_size", "2", "--gen_kwargs", "max_gen_toks=6", "--device", "cpu",
            "--output_path", str(out), "--log_samples",
        ]  # fmt: skip
        self.out = out
        self.log = out / "log.txt"
        out.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)

    def result(self) -> tuple[dict, dict[str, list[dict]], str]:
        """The results JSON, the logged samples per task, and the log."""
        self.process.wait(timeout=600)
        log = self.log.read_text()
        assert self.process.returncode == 0, log[-5000:]
        (results,) = self.out.glob("*/results_*.json")
        samples = {}
        for path in self.out.glob("*/samples_*.jsonl"):
            task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
            samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
        return json.loads(results.read_text()), samples, log


@pytest.fixture(scope="module")
def runs(lm_eval_script: tuple[str, dict[str, str]], eval_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """`--model offload-hf` on every specmd task and `--model hf` on two, run side by side (each lm_eval
    start indexes lm_eval's thousands of task files, which takes most of a run here)."""
    out = tmp_path_factory.mktemp("lm-eval")
    offload = f"pretrained={eval_model},cache_frac=0.25,policy=topk/least-stale/fetch/standard,bandwidth_gbps=5"
    stock = f"pretrained={eval_model},experts_implementation=eager"
    started = {
        "offload-hf": LmEvalRun(lm_eval_script, out / "offload", "offload-hf", offload + ",progress=False", "specmd"),
        "hf": LmEvalRun(lm_eval_script, out / "hf", "hf", stock, "specmd_nq_open,specmd_truthfulqa_gen"),
    }
    try:
        return {name: run.result() for name, run in started.items()}
    finally:
        for run in started.values():
            if run.process.poll() is None:
                run.process.kill()


def test_offload_hf_scores_every_task_and_records_cache_metrics(runs) -> None:  # type: ignore[no-untyped-def]
    results, samples, log = runs["offload-hf"]
    specmd = results["config"]["specmd"]
    assert specmd["options"]["cache_frac"] == 0.25 and specmd["options"]["bandwidth_gbps"] == 5
    assert specmd["options"]["policy"]["eviction"]["name"] == "least-stale"
    for task in TASKS:
        assert results["n-samples"][task]["effective"] == 2, task
        for score in SCORES[task]:
            assert isinstance(results["results"][task][score], float), (task, score)
        stats = specmd["tasks"][task]
        for metric in CACHE_METRICS:
            assert metric in stats, (task, metric)
        assert stats["lm_eval_requests"] == 2 and stats["prefill_passes"] == 1, task  # one batch of two
        assert stats["requests"] == stats["hits"] + stats["late_prefetches"] + stats["misses"] > 0, task
        assert stats["ttft_s"] > 0 and stats["wall_ttft_s"] > 0 and stats["bytes_transferred"] > 0, task
        assert {sample["doc_id"] for sample in samples[task]} == {0, 1}, task
        assert f"specmd cache on {task}: hit rate" in log


def test_hf_still_runs_and_generates_the_same_text(runs) -> None:  # type: ignore[no-untyped-def]
    """--model hf in the same environment; with a lossless policy its generations equal offload-hf's."""
    results, samples, _ = runs["hf"]
    assert "specmd" not in results["config"]
    _, offloaded, _ = runs["offload-hf"]
    for task in ("specmd_nq_open", "specmd_truthfulqa_gen"):
        assert results["n-samples"][task]["effective"] == 2
        theirs = sorted((s["doc_id"], s["filter"], s["resps"]) for s in samples[task])
        mine = sorted((s["doc_id"], s["filter"], s["resps"]) for s in offloaded[task])
        assert theirs == mine, task


def test_a_misspelt_model_arg_is_one_clear_error(lm_eval_script: tuple[str, dict[str, str]], eval_model: Path) -> None:
    """`cache_fracc=` stops the stock command with specmd's error listing the keys, not transformers' TypeError."""
    command, env = lm_eval_script
    run = subprocess.run(
        [command, "--model", "offload-hf", "--model_args", f"pretrained={eval_model},cache_fracc=0.05",
         "--tasks", "specmd_nq_open", "--include_path", str(TASK_DIR), "--device", "cpu", "--limit", "1"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    shown = run.stdout + run.stderr
    assert run.returncode != 0 and "TypeError" not in shown, shown[-3000:]
    last = shown.strip().splitlines()[-1]
    assert last.startswith("ValueError: offload-hf takes no model_args key 'cache_fracc' (did you mean cache_frac?)")
    assert "specmd's bandwidth_gbps, cache_bytes, cache_frac" in last and "lm_eval HFLM's" in last, last
