"""The bundled default model: a small OLMoE-architecture model with a byte-level tokenizer.

Until a trained default ships, it is built deterministically from a seed (random weights, so its
routing has none of the structure a trained router learns) and saved once under the user cache dir
(`SPECMD_CACHE_DIR` overrides where).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import platformdirs

SEED = 0
RECIPE = "olmoe-random-v2"  # bump when the recipe below changes, so old copies are rebuilt
CONFIG = dict(
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=32,
    num_experts_per_tok=4,
    max_position_embeddings=2048,
)
SPECIAL_TOKENS = {"eos": "<|endoftext|>", "pad": "<|pad|>"}


def cache_dir() -> Path:
    """Where specmd keeps files it builds (the default model, later quantized experts)."""
    return Path(os.environ.get("SPECMD_CACHE_DIR") or platformdirs.user_cache_dir("specmd"))


def default_model_path() -> Path:
    """Directory of the default model (config, safetensors, tokenizer), built on first use."""
    target = cache_dir() / RECIPE
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
        try:
            _build(staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)  # atomic: a half-built model is never visible
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _byte_level_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}  # token id = byte value
    for token in SPECIAL_TOKENS.values():
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS["eos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        padding_side="left",
    )


def _build(directory: Path) -> None:
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    tokenizer = _byte_level_tokenizer()
    config = OlmoeConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **CONFIG,
    )
    torch.manual_seed(SEED)
    OlmoeForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
