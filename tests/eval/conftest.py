"""Fixtures for the lm_eval integration: a tiny OLMoE with a real tokenizer, and an offline environment."""

from __future__ import annotations

import os
import shutil
import site
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

from specmd import default_model_path
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[2]
PTH = REPO / "specmd" / "eval_tasks" / "specmd-lm-eval.pth"


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


@pytest.fixture(scope="session")
def lm_eval_script(offline_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """The `lm_eval` script beside this interpreter, and an environment where specmd's .pth hook is active.

    An install (`pip install -e .`, as `make test` does) has put the hook in site-packages. A source tree
    used through PYTHONPATH has not: then the same file is given to the script through the user site
    directory, which Python reads .pth files from just the same.
    """
    script = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.fail(f"no lm_eval console script beside {sys.executable}: install specmd's eval extra")
    installed = [*site.getsitepackages(), site.getusersitepackages()]
    if any((Path(directory) / PTH.name).is_file() for directory in installed):
        return script, offline_env
    if not site.ENABLE_USER_SITE:
        pytest.skip("specmd-lm-eval.pth is not installed here and the user site is disabled: pip install -e .")
    base = tmp_path_factory.mktemp("userbase")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    user_site = base / "lib" / version / "site-packages"
    user_site.mkdir(parents=True)
    shutil.copy(PTH, user_site / PTH.name)
    return script, offline_env | {"PYTHONUSERBASE": str(base)}
