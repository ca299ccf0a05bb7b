"""scripts/train_tiny_moe.py on a tiny slice of the corpus: it trains, saves a loadable model, and is deterministic."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from specmd import OffloadOLMoE

pytestmark = pytest.mark.launch  # the training script
SCRIPT = Path(__file__).parents[1] / "scripts" / "train_tiny_moe.py"
TINY = [
    "--max-files", "30", "--vocab-size", "300", "--hidden-size", "32", "--layers", "2", "--heads", "2",
    "--experts", "8", "--top-k", "2", "--expert-size", "16", "--steps", "4", "--batch-size", "2",
    "--seq-len", "32", "--warmup", "2", "--eval-every", "2", "--save-every", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def train():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("train_tiny_moe", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def runs(train, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:  # type: ignore[no-untyped-def]
    """Two runs with the same seed."""
    root = tmp_path_factory.mktemp("train")
    for name in ("a", "b"):
        train.main([*TINY, "--out", str(root / name)])
    return [root / "a", root / "b"]


def test_same_seed_same_weights_and_tokenizer(runs: list[Path]) -> None:
    a, b = runs
    for name in ("model.safetensors", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not (a / "train_state.pt").exists()  # resumable state is removed once the checkpoint is written


def test_resume_gives_the_uninterrupted_result(train, runs: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    out = runs[0].parent / "resumed"

    def crash(*args: object) -> None:
        raise RuntimeError("interrupted")

    with monkeypatch.context() as patch:
        patch.setattr(train, "_write_checkpoint", crash)  # dies after the last step, before writing
        with pytest.raises(RuntimeError, match="interrupted"):
            train.main([*TINY, "--out", str(out)])
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 2
    train.main([*TINY, "--out", str(out), "--resume"])
    assert (out / "model.safetensors").read_bytes() == (runs[0] / "model.safetensors").read_bytes()


def test_records_corpus_and_evaluation(runs: list[Path]) -> None:
    info = json.loads((runs[0] / "training_info.json").read_text())
    assert info["python"] == sys.version.split()[0]
    corpus = info["corpus"]
    assert corpus["files"] == corpus["train_files"] + corpus["heldout_files"] == 30
    assert len(corpus["file_list_sha256"]) == len(corpus["content_sha256"]) == 64
    assert info["command"].startswith("python scripts/train_tiny_moe.py --max-files 30")
    assert info["heldout"]["uniform_perplexity"] == 300 and info["heldout"]["perplexity"] > 0
    assert info["training"]["steps"] == 4 and len(info["training"]["history"]) >= 4


def test_checkpoint_loads_offloaded_and_tokenizes(runs: list[Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(runs[0])
    text = "def f(x):\n    return x  # é\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: every text round-trips
    with OffloadOLMoE.from_pretrained(runs[0], cache_frac=0.5, progress=False) as model, torch.no_grad():
        assert model.dtype == torch.bfloat16
        assert model(torch.tensor([ids])).logits.shape == (1, len(ids), 300)


def test_heldout_split_is_by_path(train) -> None:  # type: ignore[no-untyped-def]
    assert train.is_heldout("dataclasses.py", 3.0)  # the bundled model's README example text
    names = [f"pkg/module_{i}.py" for i in range(2000)]
    share = sum(train.is_heldout(n, 3.0) for n in names) / len(names)
    assert 0.02 < share < 0.04
