"""Shared fixtures: tiny OLMoE checkpoints saved with save_pretrained, in each layout users meet."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

# Tiny models gain nothing from a second intra-op thread, and on a machine busy with other work
# OpenMP's barrier waits for it make every small matmul take milliseconds.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the same for the subprocesses tests start

# Started in the background of a non-interactive shell, the run inherits Ctrl-C ignored (and so would the processes
# it starts); the Ctrl-C tests need it delivered as at a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
EXPERT_BYTES = 3 * 32 * 16 * 4  # fp32
TOTAL_EXPERT_BYTES = 4 * 16 * EXPERT_BYTES


def tiny_model(seed: int = 0, **overrides: object) -> OlmoeForCausalLM:
    torch.manual_seed(seed)
    return OlmoeForCausalLM(OlmoeConfig(**(TINY | overrides))).eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny model saved in the hub's per-expert layout, the fused layout, and as shards."""
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_model()
    paths = {name: root / name for name in ("legacy", "fused", "sharded")}
    model.save_pretrained(paths["legacy"])
    model.save_pretrained(paths["fused"], save_original_format=False)
    model.save_pretrained(paths["sharded"], max_shard_size="20KB")
    return paths


@pytest.fixture(scope="session")
def checkpoint(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["legacy"]


@pytest.fixture(scope="session")
def stock(checkpoint: Path) -> OlmoeForCausalLM:
    """Stock transformers with eager experts: the bit-exact reference."""
    return OlmoeForCausalLM.from_pretrained(checkpoint, experts_implementation="eager").eval()


@pytest.fixture(autouse=True)
def no_leaked_watchdogs():
    """Every test leaves no specmd thread running."""
    yield
    import gc

    alive = [t for t in threading.enumerate() if t.name.startswith("specmd")]
    if alive:  # a full collection costs ~0.2 s here, so only when a model may await it to stop its thread
        gc.collect()
    for thread in alive:
        thread.join(timeout=5)
    assert not [t for t in alive if t.is_alive()], "a specmd watchdog thread outlived its test"


@pytest.fixture
def fresh_plugins(monkeypatch: pytest.MonkeyPatch):
    """Policy plugins a test loads are forgotten after it: their policies, their modules (named specmd_test_*),
    and which plugins this process loaded."""
    import sys

    from specmd.cache.policies import plugins, spec

    saved = {kind: (dict(spec._REGISTRY[kind]), dict(spec._ALIASES[kind])) for kind in spec.KINDS}
    monkeypatch.setattr(plugins, "_loaded", [])
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    yield
    for kind, (names, aliases) in saved.items():
        spec._REGISTRY[kind].clear()
        spec._REGISTRY[kind].update(names)
        spec._ALIASES[kind].clear()
        spec._ALIASES[kind].update(aliases)
    for name in [name for name in sys.modules if name.startswith("specmd_test_")]:
        del sys.modules[name]
