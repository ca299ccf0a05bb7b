"""The `offload-hf` lm_eval model in-process: HFLM's batching leaves outputs unchanged and pads request nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

from specmd.cache.clock import PassInfo
from specmd.eval_tasks.model import OffloadHFLM

PROMPTS = (
    "Q: what is two plus two?\nA:",
    "Question: a much longer prompt, about trains, timetables and the weather?\nAnswer:",
    "Hi",
    "Name three colours:",
)
PAIRS = (
    ("The capital of France is", " Paris"),
    ("2+2=", " 4"),
    ("A long context sentence about many things, and then some more things", " yes"),
    ("Hi", " there, friend"),
)


def generate_requests(until: list[str], task: str = "t") -> list[Instance]:
    kwargs = {"until": until, "max_gen_toks": 10, "do_sample": False}
    return [Instance("generate_until", {}, (p, kwargs), i, (task, i, 1)) for i, p in enumerate(PROMPTS)]


def loglikelihood_requests(task: str = "ll") -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i, (task, i, 1)) for i, pair in enumerate(PAIRS)]


@pytest.fixture
def lm(eval_model: Path) -> Iterator[OffloadHFLM]:
    model = OffloadHFLM(pretrained=str(eval_model), cache_frac=0.5, device="cpu", batch_size=4, progress=False)
    yield model
    model.model.close()


@pytest.fixture(scope="module")
def stock(eval_model: Path) -> HFLM:
    return HFLM(pretrained=str(eval_model), device="cpu", batch_size=4)


@pytest.fixture
def passes(lm: OffloadHFLM, monkeypatch: pytest.MonkeyPatch) -> list[PassInfo]:
    """Every forward pass the cache manager sees, as `PassInfo` (real tokens only)."""
    seen: list[PassInfo] = []
    runtime = lm.model._specmd
    monkeypatch.setattr(runtime, "manager", _PassSpy(runtime.manager, seen))
    return seen


class _PassSpy:
    """Stands in for the runtime's cache manager (compiled objects cannot be patched) and notes each pass."""

    def __init__(self, manager: object, seen: list[PassInfo]) -> None:
        self._manager, self._seen = manager, seen

    def begin_pass(self, info: PassInfo) -> None:
        self._seen.append(info)
        self._manager.begin_pass(info)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._manager, name)


def test_registered_under_offload_hf() -> None:
    assert get_model("offload-hf") is OffloadHFLM and get_model("hf") is HFLM


def test_model_args_reach_the_cache(lm: OffloadHFLM) -> None:
    options = lm.model.offload_options
    assert options.cache_frac == 0.5 and options.policy.prefetch.name == "topk"
    assert type(lm.model).__name__ == "OffloadOLMoE"


def test_a_misspelt_model_arg_is_one_error_listing_the_accepted_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as error:  # checked before anything loads: the checkpoint's absence is not seen
        OffloadHFLM(pretrained=str(tmp_path / "no-such-model"), cache_fracc=0.05, batch_size=2, device="cpu")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("offload-hf takes no model_args key 'cache_fracc' (did you mean cache_frac?)")
    accepted = set(re.findall(r"\w+", message.split("; it accepts ", 1)[1]))
    assert {
        "cache_frac", "cache_bytes", "policy", "bandwidth_gbps", "link_latency_s", "hardware", "shape_from",
        "expert_precisions", "storage", "batch_size", "max_length", "attn_implementation", "device_map",
    } <= accepted  # fmt: skip


def test_a_refused_transformers_keyword_keeps_its_own_reason(eval_model: Path) -> None:
    """Known to transformers, refused by specmd: not an unknown key, but specmd's reason (`loading.REFUSED`)."""
    with pytest.raises(ValueError, match="experts_implementation='eager' is not supported: specmd runs the routed"):
        OffloadHFLM(pretrained=str(eval_model), experts_implementation="eager", device="cpu", progress=False)


@pytest.mark.parametrize("until", [["e"], ["\n", "a"], ["no such stop"]])
def test_batched_generation_matches_stock_and_skips_finished_rows(
    lm: OffloadHFLM, stock: HFLM, passes: list[PassInfo], until: list[str]
) -> None:
    batched = lm.generate_until(generate_requests(until), disable_tqdm=True)
    assert batched == stock.generate_until(generate_requests(until), disable_tqdm=True)
    batch_stats = lm.task_stats["t"]
    prefill = passes[0]
    assert prefill.prefill and prefill.tokens == sum(len(lm.tok_encode(p)) for p in PROMPTS)  # left pads excluded
    one_by_one, decode_tokens = [], 0
    for request in generate_requests(until):
        one_by_one += lm.generate_until([request], disable_tqdm=True)
        decode_tokens += lm.task_stats["t"]["decode_tokens"]
    assert batched == one_by_one
    # A row finished (stop sequence or end of text) while others generate costs nothing more:
    # the batch decodes exactly the tokens the rows decode alone.
    assert batch_stats["decode_tokens"] == decode_tokens
    assert batch_stats["requests"] == batch_stats["hits"] + batch_stats["late_prefetches"] + batch_stats["misses"]


def test_finished_rows_are_actually_exercised(lm: OffloadHFLM) -> None:
    """The case above must include rows that stop early and rows that run to the end."""
    lm.generate_until(generate_requests(["e"]), disable_tqdm=True)
    batched = lm.task_stats["t"]
    assert batched["decode_tokens"] < batched["decode_passes"] * len(PROMPTS)


def test_batched_loglikelihood_masks_right_padding(lm: OffloadHFLM, stock: HFLM, passes: list[PassInfo]) -> None:
    batched = lm.loglikelihood(loglikelihood_requests(), disable_tqdm=True)
    assert [(p.sequences, p.tokens) for p in passes] == [(4, sum(len(lm.tok_encode(c + x)) - 1 for c, x in PAIRS))]
    alone = [lm.loglikelihood([r], disable_tqdm=True)[0] for r in loglikelihood_requests()]
    reference = stock.loglikelihood(loglikelihood_requests(), disable_tqdm=True)
    for mine, single, theirs in zip(batched, alone, reference, strict=True):  # batch shapes change rounding only
        assert mine[0] == pytest.approx(single[0], abs=1e-4) == pytest.approx(theirs[0], abs=1e-4)
        assert mine[1] == single[1] == theirs[1]


def test_metrics_per_task_in_model_info(lm: OffloadHFLM) -> None:
    lm.task_stats.clear()
    requests = generate_requests(["\n"], task="a")[:2] + generate_requests(["\n"], task="b")[2:]
    lm.generate_until(requests, disable_tqdm=True)
    lm.loglikelihood(loglikelihood_requests(task="a"), disable_tqdm=True)
    info = lm.get_model_info()["specmd"]
    assert set(info["tasks"]) == {"a", "b", "a (loglikelihood)"}
    assert info["options"]["cache_frac"] == 0.5 and info["model"]["experts_per_layer"] == 16
    for name, stats in info["tasks"].items():
        assert stats["requests"] == stats["hits"] + stats["late_prefetches"] + stats["misses"] > 0, name
        for key in ("hit_rate", "collision_misses", "ttft_s", "wall_ttft_s", "tokens_per_s", "wall_tokens_per_s",
                    "stall_s", "bytes_transferred", "per_layer"):  # fmt: skip
            assert key in stats, (name, key)
    assert info["tasks"]["a"]["lm_eval_requests"] == 2 and info["tasks"]["a"]["decode_tokens"] > 0
    assert info["tasks"]["a (loglikelihood)"]["request_type"] == "loglikelihood"


def test_a_sequence_without_new_tokens_takes_no_part_in_a_pass() -> None:
    info = PassInfo.for_sequences([7, 9, 4], [1, 0, 1])
    assert (info.sequences, info.tokens, info.context, info.attended, info.prefill) == (2, 2, 13, 13, False)


def test_storage_disk_in_model_args_scores_the_same(lm: OffloadHFLM, eval_model: Path) -> None:
    args = f"pretrained={eval_model},cache_frac=0.5,storage=disk"
    disk = OffloadHFLM.create_from_arg_string(args, {"device": "cpu", "batch_size": 4})
    try:
        assert disk.model.offload_options.storage == "disk"
        assert disk.loglikelihood(loglikelihood_requests()) == lm.loglikelihood(loglikelihood_requests())
    finally:
        disk.model.close()


@pytest.mark.parametrize("speculate", [3, "auto"])
def test_speculate_in_model_args_generates_the_same_text(stock: HFLM, eval_model: Path, speculate: object) -> None:
    args = f"pretrained={eval_model},cache_frac=0.5,speculate={speculate},draft_frac=1.0,draft_precision=int2"
    drafted = OffloadHFLM.create_from_arg_string(args, {"device": "cpu", "batch_size": 1})
    try:
        for until in (["e"], ["\n", "a"], ["no such stop"]):  # stop sequences end the text where they do plainly
            assert drafted.generate_until(generate_requests(until)) == stock.generate_until(generate_requests(until))
            stats = drafted.task_stats["t"]
            assert stats["verify_passes"] > 0 and stats["lm_eval_requests"] == len(PROMPTS)
        assert len(stats["speculate_k"]) == stats["verify_passes"]  # at native speed the governor may stay plain
        assert (stats["drafted_tokens"] > 0) == (speculate == 3) and stats["accepted_tokens"] <= stats["drafted_tokens"]
        assert drafted.get_model_info()["specmd"]["tasks"]["t"]["drafted_tokens"] == stats["drafted_tokens"]
    finally:
        drafted.model.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"speculate": 2, "draft_frac": 1.0, "batch_size": 4}, "decodes one request at a time: use batch_size=1"),
        ({"speculate": 2}, "needs the self-draft's budget"),
        ({"speculate": "soon", "draft_frac": 1.0}, "speculative must be a whole number"),
    ],
)
def test_bad_speculate_model_args_are_refused_before_loading(tmp_path: Path, args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OffloadHFLM(pretrained=str(tmp_path / "no-such-model"), device="cpu", **args)
