"""Fixtures for the lm_eval integration: a tiny OLMoE with a real tokenizer, and an offline environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

from specmd import default_model_path
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def eval_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random OLMoE (4 layers of 16 experts, top-4) saved with the default model's byte-level tokenizer."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPECMD_CACHE_DIR", str(tmp_path_factory.mktemp("specmd-cache")))
        tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = OlmoeConfig(
        **TINY
        | dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,  # room for GSM8K's 5-shot prompts, which byte-level tokens make long
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("eval-model")
    OlmoeForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for lm_eval subprocesses: offline, caches in a temp dir, this checkout's specmd, one thread."""
    home = tmp_path_factory.mktemp("hf-home")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "1",  # a tiny model; more threads only contend on a loaded machine
        "TOKENIZERS_PARALLELISM": "false",
    }


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The models here are tiny: one thread is fastest, and far faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
