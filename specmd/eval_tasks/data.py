"""Where specmd's lm_eval tasks read their documents: the standard datasets, the fixtures, or local JSONL.

Each task YAML names one of the loaders below as its `custom_dataset`; lm_eval calls it with the task's
metadata and `dataset_kwargs` as keywords. The source is, first found:

1. `specmd_data` in the task metadata (`lm_eval --metadata '{"specmd_data": "fixtures"}'`);
2. the `SPECMD_EVAL_DATA` environment variable;
3. `hub`: the standard datasets from the Hugging Face hub (or its local cache).

A source is `hub`, `fixtures` (the self-written items shipped in `specmd/eval_tasks/fixtures`), or a
directory laid out like the fixtures: `<dir>/<dataset>/<split>.jsonl`, one item per line with the
standard dataset's fields (`DATASETS` lists them).

`specmd_sample: N` keeps N documents of the evaluated split, drawn without replacement with seed
`specmd_seed` (default 0), in their original order; few-shot examples still come from the whole training
split. The `*_100` tasks set it to 100 (their `dataset_kwargs`); on the other tasks, metadata can
(`--metadata '{"specmd_sample": 50, "specmd_seed": 1}'`).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from specmd.eval_tasks import FIXTURES_DIR

DATA_ENV = "SPECMD_EVAL_DATA"
HUB = "hub"
FIXTURES = "fixtures"
DEFAULT_SEED = 0


@dataclass(frozen=True)
class DatasetSource:
    """A dataset as specmd's tasks use it.

    Attributes:
        hub_path, hub_name: `datasets.load_dataset` arguments for the standard dataset.
        splits: the splits the task reads; the last one is evaluated.
        fields: fields every item needs (the standard dataset's names).
    """

    hub_path: str
    hub_name: str | None
    splits: tuple[str, ...]
    fields: tuple[str, ...]

    @property
    def eval_split(self) -> str:
        return self.splits[-1]


DATASETS = {
    "gsm8k": DatasetSource("openai/gsm8k", "main", ("train", "test"), ("question", "answer")),
    "truthfulqa": DatasetSource(
        "truthfulqa/truthful_qa",
        "generation",
        ("validation",),
        ("question", "best_answer", "correct_answers", "incorrect_answers"),
    ),
    "nq_open": DatasetSource("google-research-datasets/nq_open", None, ("train", "validation"), ("question", "answer")),
}


def gsm8k(**options: Any) -> datasets.DatasetDict:
    """GSM8K (train, test) for `specmd_gsm8k*`."""
    return load("gsm8k", **options)


def truthfulqa(**options: Any) -> datasets.DatasetDict:
    """TruthfulQA, generation config (validation) for `specmd_truthfulqa_gen*`."""
    return load("truthfulqa", **options)


def nq_open(**options: Any) -> datasets.DatasetDict:
    """NaturalQuestions-open (train, validation) for `specmd_nq_open*`."""
    return load("nq_open", **options)


def load(
    name: str,
    *,
    specmd_data: str | os.PathLike[str] | None = None,
    specmd_sample: int | None = None,
    specmd_seed: int = DEFAULT_SEED,
    **_metadata: Any,  # lm_eval passes every metadata key (model args, version, ...): not ours to judge
) -> datasets.DatasetDict:
    """The splits of dataset `name` from the chosen source, the evaluated split sampled if asked."""
    source = DATASETS[name]
    root = data_root(specmd_data or os.environ.get(DATA_ENV) or HUB)
    if root is None:
        loaded = _from_hub(name, source)
    else:
        loaded = datasets.DatasetDict({split: _from_jsonl(root, name, split, source) for split in source.splits})
    if specmd_sample is not None:
        loaded[source.eval_split] = sample(loaded[source.eval_split], specmd_sample, specmd_seed)
    return loaded


def data_root(where: str | os.PathLike[str]) -> Path | None:
    """The directory of JSONL files a data source names (None: the hub); anything else is a ValueError."""
    if str(where) == HUB:
        return None
    root = FIXTURES_DIR if str(where) == FIXTURES else Path(where).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"task data source {str(where)!r} is neither 'hub', 'fixtures' nor a directory "
            f"(set by specmd_data metadata or ${DATA_ENV})"
        )
    return root


def sample(docs: datasets.Dataset, size: int, seed: int = DEFAULT_SEED) -> datasets.Dataset:
    """`size` documents drawn without replacement with `seed` (all of them if fewer), in their original order."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"specmd_sample must be a positive integer, got {size!r}")
    if size >= len(docs):
        return docs
    return docs.select(sorted(random.Random(seed).sample(range(len(docs)), size)))


def _from_hub(name: str, source: DatasetSource) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_dataset(source.hub_path, source.hub_name)
    except Exception as exc:
        raise ValueError(
            f"could not load {source.hub_path} for specmd's {name} tasks ({exc}). Offline, point the tasks at "
            f"local data: SPECMD_EVAL_DATA=fixtures, or a directory with {name}/<split>.jsonl files"
        ) from exc
    return datasets.DatasetDict({split: loaded[split] for split in source.splits})


def _from_jsonl(root: Path, name: str, split: str, source: DatasetSource) -> datasets.Dataset:
    path = root / name / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: a local data directory holds {name}/{'.jsonl, '.join(source.splits)}.jsonl"
        )
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from None
        missing = [key for key in source.fields if not isinstance(item, dict) or key not in item]
        if missing:
            raise ValueError(f"{path}:{number}: missing {', '.join(missing)} ({name} items need {source.fields})")
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no items")
    return datasets.Dataset.from_list(items)
