"""Data-parallel lm_eval: `accelerate launch` of the stock `lm_eval` and `specmd eval --num-processes 2`, two CPU
ranks each, against one process on the bundled model: the same scores and generations, and cache metrics
summed over ranks with each rank's own beside them.

Which counters add up to the one-process figures, and why. Every run has batch size 1, so a forward pass
holds one document: what the routing asks for depends on that document alone (standard routing ignores the
cache). So `requests` (distinct (pass, layer, expert)), per layer too, `prefill_passes`, `decode_passes` and
`decode_tokens` of the two ranks sum exactly to one process's. What the cache answers does not: one cache
carries the experts of every earlier document, while each rank's sees only its half. Even with the cache
holding every expert and no prefetch, a miss is the first touch of an expert in that cache, so one process
misses each expert once and two ranks each miss the experts their own documents touch: `misses` (hence
`hits`, `bytes_transferred`, stall and emulated times) lie between the busier rank's and the ranks' sum, which
is asserted over the whole run (a rank's cache also carries experts from one task into the next).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from specmd.cache.stats import _SUMMED
from specmd.eval_tasks import TASK_DIR
from specmd.eval_tasks.run import evaluate

pytestmark = pytest.mark.launch  # accelerate and `specmd eval` start the ranks as subprocesses
TASKS = ("specmd_nq_open", "specmd_truthfulqa_gen")
POLICY = "none/lru/fetch/standard"  # no prefetch: a fetch is a demand miss, of one expert's bytes
DOCUMENTS, GEN_TOKS = 4, 8  # the fixtures hold 4 documents per task: 2 per rank, no padding requests
ADDS_UP = ("requests", "prefill_passes", "decode_passes", "decode_tokens", "lm_eval_requests")
INTS = [name for name in _SUMMED if name != "stall_s"]


def accelerate_launch(env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    """The stock command users run: two ranks of `lm_eval --model offload-hf` (CPU ranks: no GPU here)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None, f"no accelerate script beside {sys.executable}"
    args = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "lm_eval", "--model", "offload-hf", "--model_args",
        f"pretrained=default,cache_frac=1.0,policy={POLICY},bandwidth_gbps=5,progress=False",
        "--tasks", ",".join(TASKS), "--include_path", str(TASK_DIR),
        "--metadata", json.dumps({"specmd_data": "fixtures"}),
        "--limit", str(DOCUMENTS), "--batch_size", "1", "--gen_kwargs", f"max_gen_toks={GEN_TOKS}", "--device", "cpu",
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    out.mkdir(parents=True)
    return subprocess.Popen(args, stdout=(out / "log.txt").open("w"), stderr=subprocess.STDOUT, env=env)


def specmd_eval(env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    args = [
        sys.executable, "-m", "specmd.cli", "eval", "--num-processes", "2", "--tasks", ",".join(TASKS),
        "--limit", str(DOCUMENTS), "--max-gen-toks", str(GEN_TOKS), "--cache-frac", "1", "--policy", POLICY,
        "--bandwidth-gbps", "5", "--device", "cpu", "--log-samples", "--out", str(out / "results.json"),
    ]  # fmt: skip
    out.mkdir(parents=True)
    return subprocess.Popen(args, stdout=(out / "log.txt").open("w"), stderr=subprocess.STDOUT, env=env)


def finished(process: subprocess.Popen[bytes], out: Path) -> str:
    process.wait(timeout=600)
    log = (out / "log.txt").read_text()
    assert process.returncode == 0, log[-5000:]
    return log


@pytest.fixture(scope="module")
def runs(lm_eval_script: tuple[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both two-rank runs started side by side, and the one-process run in this process meanwhile."""
    _, env = lm_eval_script
    out = tmp_path_factory.mktemp("data-parallel")
    started = {"accelerate": accelerate_launch(env, out / "accelerate"), "specmd": specmd_eval(env, out / "specmd")}
    try:
        one = evaluate(
            "default", TASKS, cache_frac=1.0, policy=POLICY, bandwidth_gbps=5, device="cpu", limit=DOCUMENTS,
            max_gen_toks=GEN_TOKS, log_samples=True, progress=False,
        )  # fmt: skip
        finished(started["accelerate"], out / "accelerate")
        (results,) = (out / "accelerate").glob("*/results_*.json")
        samples = {task: [] for task in TASKS}
        for path in (out / "accelerate").glob("*/samples_*.jsonl"):
            task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
            samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
        accelerate = json.loads(results.read_text()) | {"samples": samples}
        log = finished(started["specmd"], out / "specmd")
        specmd = json.loads((out / "specmd" / "results.json").read_text())
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
    assert one is not None
    return {"one": one, "accelerate": accelerate, "specmd": specmd, "specmd log": log}


def generations(result: dict[str, Any], task: str) -> list[tuple[int, str, str]]:
    return sorted((s["doc_id"], s["filter"], json.dumps(s["resps"])) for s in result["samples"][task])


@pytest.mark.parametrize("launcher", ["accelerate", "specmd"])
def test_two_ranks_score_and_generate_as_one_process(runs: dict[str, Any], launcher: str) -> None:
    one, two = runs["one"], runs[launcher]
    assert two["results"] == json.loads(json.dumps(one["results"]))
    for task in TASKS:
        assert two["n-samples"][task]["effective"] == DOCUMENTS
        assert generations(two, task) == generations(one, task)
        assert {s["doc_id"] for s in two["samples"][task]} == set(range(DOCUMENTS))


@pytest.mark.parametrize("launcher", ["accelerate", "specmd"])
def test_cache_metrics_are_summed_over_ranks_with_each_rank_beside(runs: dict[str, Any], launcher: str) -> None:
    one, two = runs["one"]["config"]["specmd"], runs[launcher]["config"]["specmd"]
    assert "world_size" not in one and two["world_size"] == 2
    expert_bytes = two["model"]["full_expert_bytes"]
    rank_misses = [0, 0]
    for task in TASKS:
        mine, theirs = two["tasks"][task], one["tasks"][task]
        ranks = mine["per_rank"]
        assert [rank["rank"] for rank in ranks] == [0, 1]
        assert [rank["lm_eval_requests"] for rank in ranks] == [DOCUMENTS // 2] * 2
        for name in INTS:  # the sum over ranks, whatever one process would count
            assert mine[name] == sum(rank[name] for rank in ranks), (task, name)
        assert mine["hit_rate"] == mine["hits"] / mine["requests"]  # recomputed, not the mean of the ranks'
        for name in ADDS_UP:  # per-document counters: the ranks add up to one process
            assert mine[name] == theirs[name], (task, name)
        per_layer = [[layer["requests"] for layer in stats["per_layer"]] for stats in (mine, theirs)]
        assert per_layer[0] == per_layer[1], task
        for stats in (*ranks, theirs):
            assert stats["evictions"] == stats["late_prefetches"] == stats["prefetches_issued"] == 0, task
            assert stats["hits"] + stats["misses"] == stats["requests"], task
            assert stats["bytes_transferred"] == stats["misses"] * expert_bytes, task
        for rank in ranks:
            rank_misses[rank["rank"]] += rank["misses"]
    one_misses = sum(one["tasks"][task]["misses"] for task in TASKS)
    assert max(rank_misses) <= one_misses <= sum(rank_misses)  # first touches: of a half, of all, of both halves


def test_specmd_eval_prints_rank_zeros_table_once(runs: dict[str, Any]) -> None:
    log = " ".join(runs["specmd log"].split())
    assert log.count("expert cache per task") == 1 and "expert cache per task, summed over 2 ranks:" in log
