"""Fixtures for traces: a recorded trace of the tiny model, and random in-memory traces."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from specmd import OffloadOLMoE
from specmd.sim import Trace, TraceEvent, record

PROMPT = torch.tensor([[5, 17, 33, 8, 91, 2, 40, 40, 12, 7, 66, 3]])
TOKENS = 10


def live_run(checkpoint: Path, path: Path, **kwargs) -> dict:  # type: ignore[no-untyped-def]
    """Record a trace of one generation; return that run's live counters (wall fields dropped)."""
    with OffloadOLMoE.from_pretrained(checkpoint, progress=False, **kwargs) as model:
        record(model, PROMPT, path, max_new_tokens=TOKENS, do_sample=False)
        stats = model.cache_stats().to_dict()
    return without_wall(stats)


def without_wall(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if not k.startswith("wall_")}


@pytest.fixture(scope="session")
def recorded(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "tiny.jsonl"
    live_run(checkpoint, path, cache_frac=0.25, bandwidth_gbps=5.0)
    return path


def random_trace(seed: int, layers: int = 3, experts: int = 6, top_k: int = 2, tokens: int = 12) -> Trace:
    """Routing with some reuse between consecutive tokens, a 4-token prefill, no logits."""
    rng = random.Random(seed)
    events = []
    previous = {layer: rng.sample(range(experts), top_k) for layer in range(layers)}
    for token in range(tokens):
        for layer in range(layers):
            keep = [e for e in previous[layer] if rng.random() < 0.5]
            rest = [e for e in rng.sample(range(experts), experts) if e not in keep]
            chosen = (keep + rest)[:top_k]
            previous[layer] = chosen
            events.append(TraceEvent(0, token, layer, tuple(chosen), prefill=token < 4 or None))
    meta = {"experts_per_layer": experts, "expert_bytes": 100, "precision": "bf16", "top_k": top_k}
    return Trace(meta, events)
