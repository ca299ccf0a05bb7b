"""transformers' `from_pretrained` keywords: specmd gives the logits stock transformers gives with the same keywords."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import OlmoeForCausalLM

from specmd import OffloadOLMoE
from tests.conftest import tiny_model

PROMPT = torch.tensor([[5, 17, 33, 8, 91, 2, 40, 40, 12, 7, 66, 3]])


def load(path: Path | str, **kwargs) -> OffloadOLMoE:  # type: ignore[no-untyped-def]
    return OffloadOLMoE.from_pretrained(path, cache_frac=0.25, progress=False, **kwargs)


def assert_same_as_stock(path: Path | str, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """specmd loaded with `kwargs` gives stock transformers' logits and greedy tokens (eager experts) bit for bit."""
    stock = OlmoeForCausalLM.from_pretrained(path, experts_implementation="eager", **kwargs).eval()
    with load(path, **kwargs) as model, torch.no_grad():
        assert model.dtype == stock.dtype
        assert {p.device for p in model.parameters()} == {torch.device("cpu")}
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
        greedy = {"max_new_tokens": 6, "do_sample": False}
        assert torch.equal(model.generate(PROMPT, **greedy), stock.generate(PROMPT, **greedy))


def test_subfolder_and_variant_of_a_local_checkpoint(tmp_path: Path) -> None:
    """Three different models in one directory: specmd reads its experts from the one transformers loads."""
    tiny_model(seed=1).save_pretrained(tmp_path)
    tiny_model(seed=2).save_pretrained(tmp_path / "sub")
    tiny_model(seed=3).save_pretrained(tmp_path, variant="v2")
    tiny_model(seed=4).save_pretrained(tmp_path / "sub", variant="v2", max_shard_size="20KB")
    for kwargs in ({}, {"subfolder": "sub"}, {"variant": "v2"}, {"subfolder": "sub", "variant": "v2"}):
        assert_same_as_stock(tmp_path, **kwargs)


def test_revision_cache_dir_and_subfolder_of_a_hub_checkpoint(tmp_path: Path) -> None:
    """A hub id served offline from a cache with two revisions, each holding other weights at its root and in a
    subfolder: specmd reads its config and experts from the revision and folder transformers loads."""
    repo = tmp_path / "models--specmd--tiny"
    for seed, ref in enumerate(("main", "v2")):
        commit = f"{seed + 1:040x}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        tiny_model(seed=seed + 5).save_pretrained(repo / "snapshots" / commit)
        tiny_model(seed=seed + 7).save_pretrained(repo / "snapshots" / commit / "sub")
    hub = {"cache_dir": str(tmp_path), "local_files_only": True}
    for kwargs in ({}, {"revision": "v2"}, {"revision": "v2", "subfolder": "sub"}):
        assert_same_as_stock("specmd/tiny", **hub, **kwargs)
