"""The bundled default model: a small OLMoE-architecture MoE trained on the Python standard library.

64 experts per layer, 8 per token, 8 layers, hidden size 128, a 4,096-token byte-level BPE tokenizer;
bf16 weights shipped inside the package (`specmd/data/olmoe-stdlib/`). `scripts/train_tiny_moe.py`
trained it; `training_info.json` beside the weights records the command, corpus hashes and held-out
perplexity.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

NAME = "olmoe-stdlib"
# The configs of the four models the SpecMD paper studies (`specmd.offload_models.info` reads them); listing
# them imports nothing heavy, so the command line's help can name them.
BUNDLED_CONFIGS = Path(__file__).parent / "data" / "configs"
# Twelve short Python prompts (one JSON string a line) that `specmd demo` and `specmd reproduce` generate from.
BUNDLED_PROMPTS = Path(__file__).parent / "data" / "prompts" / "stdlib.jsonl"
# The paper's regime for the bundled model's routing: priced as OLMoE-1B-7B on the paper's system as measured.
PAPER_SHAPE, PAPER_HARDWARE = "olmoe-1b-7b", "a100-paper"


def bundled_configs() -> list[str]:
    """The names of the real models' configs that ship with specmd."""
    return sorted(path.parent.name for path in BUNDLED_CONFIGS.glob("*/config.json"))


def cache_dir() -> Path:
    """Where specmd keeps files it builds (later: quantized expert copies); `SPECMD_CACHE_DIR` overrides it."""
    return Path(os.environ.get("SPECMD_CACHE_DIR") or platformdirs.user_cache_dir("specmd"))


def default_model_path() -> Path:
    """Directory of the bundled default model (config, safetensors, tokenizer, training_info.json)."""
    path = Path(__file__).parent / "data" / NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the bundled model is missing from {path}; reinstall specmd")
    return path
