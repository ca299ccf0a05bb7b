"""Fixtures for traces: a recorded trace of the tiny model, and random in-memory traces."""

from __future__ import annotations

import random
from collections.abc import Iterator
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


def random_trace(
    seed: int, layers: int = 3, experts: int = 6, top_k: int = 2, tokens: int = 12, logits: bool = False
) -> Trace:
    """Routing with some reuse between consecutive tokens, a 4-token prefill.

    With `logits`, every row also carries router logits that rank its experts first, the next layer's logits
    as `next_logits` (a perfect next-layer predictor), and `predictions` of a predictor named "ahead" for every
    later MoE layer of its pass and the next pass's first layer (noisy copies of their logits).
    """
    rng = random.Random(seed)
    routing: list[list[tuple[int, ...]]] = []  # [token][layer]
    previous = {layer: rng.sample(range(experts), top_k) for layer in range(layers)}
    for _ in range(tokens):
        row = []
        for layer in range(layers):
            keep = [e for e in previous[layer] if rng.random() < 0.5]
            rest = [e for e in rng.sample(range(experts), experts) if e not in keep]
            chosen = (keep + rest)[:top_k]
            previous[layer] = chosen
            row.append(tuple(chosen))
        routing.append(row)
    if not logits:
        events = [
            TraceEvent(0, token, layer, routing[token][layer], prefill=token < 4 or None)
            for token in range(tokens)
            for layer in range(layers)
        ]
        meta = {"experts_per_layer": experts, "expert_bytes": 100, "precision": "bf16", "top_k": top_k}
        return Trace(meta, events)
    rows = [[_logit_row(rng, experts, chosen) for chosen in row] for row in routing]

    def noisy(values: list[float]) -> list[float]:
        return [v + rng.gauss(0.0, 0.5) for v in values]

    events = []
    for token in range(tokens):
        for layer in range(layers):
            ahead = [(0, later, noisy(rows[token][later])) for later in range(layer + 1, layers)]
            if token + 1 < tokens:
                ahead.append((1, 0, noisy(rows[token + 1][0])))
            chosen = routing[token][layer]
            weights = tuple(sorted((rng.random() for _ in chosen), reverse=True))
            events.append(
                TraceEvent(
                    0, token, layer, chosen, weights=weights, logits=rows[token][layer],
                    next_logits=rows[token][layer + 1] if layer + 1 < layers else None,
                    prefill=token < 4 or None, predictions=tuple(ahead),
                )
            )  # fmt: skip
    meta = {"experts_per_layer": experts, "expert_bytes": 100, "precision": "bf16", "top_k": top_k}
    return Trace(meta | {"predictor": "ahead"}, events)


def _logit_row(rng: random.Random, experts: int, chosen: tuple[int, ...]) -> list[float]:
    """Router logits over `experts` whose top-k, in order, is `chosen`."""
    row = [rng.gauss(0.0, 1.0) for _ in range(experts)]
    for rank, expert in enumerate(chosen):
        row[expert] = 4.0 + len(chosen) - rank + rng.random() * 0.5
    return row


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The address of a local Ray cluster of 2 CPUs, started once for the whole session (it takes seconds) and
    stopped after it. Each sweep connects to it as a new Ray job, as `specmd sweep --address` does."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    yield cluster.address
    cluster.shutdown()
