"""Fixtures for the precision tests: a small OLMoE trained briefly (so quantization error has structured
weights to act on), and a private specmd cache dir (quantized copies never land in the user's)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

TRAINED = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
TRAIN_STEPS = 200


class MarkovText:
    """A seeded token source with structure a tiny model learns fast: each token has three likely successors."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(3, vocab, (vocab, 3), generator=self.generator)  # [V, 3]
        self.odds = torch.tensor([0.6, 0.3, 0.1])
        self.vocab = vocab

    def sample(self, batch: int, length: int) -> torch.Tensor:
        tokens = torch.empty(batch, length, dtype=torch.long)  # [B, S]
        tokens[:, 0] = torch.randint(3, self.vocab, (batch,), generator=self.generator)
        for t in range(1, length):
            pick = torch.multinomial(self.odds, batch, replacement=True, generator=self.generator)  # [B]
            tokens[:, t] = self.successors[tokens[:, t - 1], pick]
        return tokens


@dataclass(frozen=True)
class Trained:
    path: Path
    eval_ids: torch.Tensor  # [B, S] held-out text from the same source
    loss: float  # the last training batch's loss (the source's entropy is 0.90 nats)


@contextmanager
def cache_dir_at(path: Path) -> Iterator[None]:
    """specmd's cache dir (default model, quantized copies) at `path` while inside."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPECMD_CACHE_DIR", str(path))
        yield


@pytest.fixture(scope="session")
def quant_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("specmd-cache")


@pytest.fixture(autouse=True)
def _private_cache_dir(quant_cache: Path) -> Iterator[None]:
    with cache_dir_at(quant_cache):
        yield


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A 2-layer, 8-expert OLMoE trained for 200 steps on `MarkovText` (about 10 s on one core)."""
    torch.manual_seed(0)
    model = OlmoeForCausalLM(OlmoeConfig(**TRAINED))
    text = MarkovText(TRAINED["vocab_size"], seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is several times faster than two
    try:
        for _ in range(TRAIN_STEPS):
            batch = text.sample(8, 32)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("trained")
    model.eval().save_pretrained(path)
    return Trained(path, text.sample(2, 48), loss.item())
