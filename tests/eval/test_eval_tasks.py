"""specmd's lm_eval tasks: data sources, the 100-document samples, lm_eval's prompts, QA metrics, the judge hook."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from specmd.eval_tasks import FIXTURES_DIR, TASK_DIR, data, judge, metrics

LM_EVAL_TASKS = Path(load_yaml.__code__.co_filename).parent
BASE_TASKS = ("specmd_gsm8k", "specmd_truthfulqa_gen", "specmd_nq_open")


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def local_dir(root: Path, questions: int = 150) -> Path:
    """A data directory in the fixtures' layout with `questions` NQ validation items."""
    write_jsonl(root / "nq_open" / "train.jsonl", [{"question": "train q", "answer": ["a"]}])
    items = [{"question": f"q{i}", "answer": [str(i)]} for i in range(questions)]
    write_jsonl(root / "nq_open" / "validation.jsonl", items)
    return root


@pytest.fixture(autouse=True)
def no_judge(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv(judge.JUDGE_ENV, raising=False)
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    yield
    judge.set_judge(None)


def test_the_tasks_and_tags() -> None:
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    assert set(manager.all_subtasks) == {*BASE_TASKS, *(f"{t}_100" for t in BASE_TASKS)}
    assert manager.task_index["specmd_paper"].tags == {f"{t}_100" for t in BASE_TASKS}


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("specmd_gsm8k", "gsm8k/gsm8k.yaml"), ("specmd_truthfulqa_gen", "truthfulqa/truthfulqa_gen.yaml"),
     ("specmd_nq_open", "nq_open/nq_open.yaml")],
)  # fmt: skip
def test_prompts_and_generation_are_lm_evals(ours: str, theirs: str) -> None:
    mine = load_yaml(TASK_DIR / f"{ours}.yaml", resolve_func=False)
    reference = load_yaml(LM_EVAL_TASKS / theirs, resolve_func=False)
    same = (
        *("doc_to_text", "doc_to_target", "generation_kwargs", "filter_list", "num_fewshot", "description"),
        *("fewshot_delimiter", "target_delimiter", "output_type", "training_split", "validation_split", "test_split"),
    )
    for key in same:
        assert mine.get(key) == reference.get(key), key
    if ours == "specmd_gsm8k":
        assert mine["metric_list"] == reference["metric_list"]


def test_fixtures_feed_every_task() -> None:
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"specmd_data": "fixtures"})
    tasks = manager.load(list(BASE_TASKS))["tasks"]
    for name, task in tasks.items():
        docs = list(task.eval_docs)
        assert 3 <= len(docs) <= 5, name
        assert task.doc_to_text(docs[0]), name
    assert "I have no comment." in next(iter(tasks["specmd_truthfulqa_gen"].eval_docs))["correct_answers"]


def test_local_jsonl_by_environment_and_sampling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.DATA_ENV, str(local_dir(tmp_path)))
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    tasks = manager.load(["specmd_nq_open", "specmd_nq_open_100"])["tasks"]
    assert len(tasks["specmd_nq_open"].eval_docs) == 150
    sampled = [doc["question"] for doc in tasks["specmd_nq_open_100"].eval_docs]
    assert len(sampled) == 100 == len(set(sampled))
    assert sampled == sorted(sampled, key=lambda q: int(q[1:]))  # original order kept
    assert sampled == [d["question"] for d in data.nq_open(specmd_data=str(tmp_path), specmd_sample=100)["validation"]]
    other_seed = data.nq_open(specmd_data=str(tmp_path), specmd_sample=100, specmd_seed=1)["validation"]
    assert [d["question"] for d in other_seed] != sampled
    assert len(tasks["specmd_nq_open_100"].dataset["train"]) == 1  # few-shot examples are not sampled


def test_metadata_overrides_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "nowhere"))
    loaded = data.nq_open(specmd_data="fixtures", pretrained="ignored", version=1.0)
    assert len(loaded["validation"]) == len((FIXTURES_DIR / "nq_open" / "validation.jsonl").read_text().splitlines())


def test_sample_is_reproducible_and_bounded() -> None:
    docs = datasets.Dataset.from_list([{"i": i} for i in range(10)])
    assert data.sample(docs, 4)["i"] == data.sample(docs, 4)["i"] == sorted(data.sample(docs, 4)["i"])
    assert data.sample(docs, 50)["i"] == list(range(10))
    with pytest.raises(ValueError, match="specmd_sample must be a positive integer, got 0"):
        data.sample(docs, 0)


def test_bad_data_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="neither 'hub', 'fixtures' nor a directory"):
        data.gsm8k(specmd_data=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"gsm8k/train\.jsonl does not exist"):
        data.gsm8k(specmd_data=str(tmp_path))
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [{"question": "q", "answer": "#### 1"}])
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match=r"test\.jsonl:1: missing answer"):
        data.gsm8k(specmd_data=str(tmp_path))

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"could not load openai/gsm8k.*SPECMD_EVAL_DATA=fixtures"):
        data.gsm8k()


def test_nq_exact_match_is_lm_evals() -> None:
    doc = {"question": "who developed general relativity", "answer": ["Albert Einstein", "Einstein"]}
    assert metrics.nq_open_results(doc, ["einstein"]) == {"exact_match": 1.0}
    assert metrics.nq_open_results(doc, ["The Albert Einstein!"]) == {"exact_match": 1.0}
    assert metrics.nq_open_results(doc, ["Newton"]) == {"exact_match": 0.0}


def test_judge_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {"question": "capital of australia", "answer": ["Canberra"]}
    seen: list[judge.JudgeRequest] = []
    judge.set_judge(lambda request: (seen.append(request), 0.5)[1])
    assert metrics.nq_open_results(doc, ["Sydney"]) == {"exact_match": 0.0, "judge": 0.5}
    assert seen == [judge.JudgeRequest("nq_open", "capital of australia", "Sydney", ("Canberra",))]

    tqa = {"question": "Can bats see?", "correct_answers": ["Yes, bats can see."], "incorrect_answers": ["No."]}
    scores = metrics.truthfulqa_results(tqa, ["Yes, bats can see."])
    assert scores["judge"] == 0.5 and scores["bleu_acc"] == 1 and "rougeL_max" in scores
    assert seen[-1].incorrect == ("No.",)

    judge.set_judge(None)
    (tmp_path / "my_judge.py").write_text("def strict(request):\n    return float(request.prediction == 'Canberra')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(judge.JUDGE_ENV, "my_judge:strict")
    assert metrics.nq_open_results(doc, ["Canberra"])["judge"] == 1.0
    monkeypatch.setenv(judge.JUDGE_ENV, "my_judge")
    with pytest.raises(ValueError, match="must be 'module:function'"):
        metrics.nq_open_results(doc, ["Canberra"])
    judge.set_judge(lambda request: 2.0)
    with pytest.raises(ValueError, match="scores must lie in"):
        metrics.nq_open_results(doc, ["Canberra"])
