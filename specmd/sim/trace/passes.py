"""The replay view of a trace: its forward passes, each a list of what `CacheManager.run_layer` is given per layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from specmd.cache.clock import PassInfo
from specmd.cache.manager import CacheManager, Target
from specmd.cache.policies.base import Routed
from specmd.sim.trace.events import NEXT_LAYER, Trace, TraceEvent


@dataclass(frozen=True)
class LayerStep:
    """One MoE layer of one replayed pass.

    `requests` maps each expert to the tokens routed to it; `predicted` maps prediction targets (passes
    ahead, MoE layer) to predicted router logits, one row per predicting token (when recorded);
    `routing` gives each requested expert's summed weight (0 when the trace has no weights) and best
    rank; `probs` each expert's mean router probability (when the trace records logits). `routing` and
    `probs` are computed on first use: as in a live run, only the policies that read them pay for them.
    """

    layer: int
    requests: dict[int, int]
    predicted: dict[Target, list[Sequence[float]]] | None
    events: tuple[TraceEvent, ...] = field(repr=False)

    @cached_property
    def routing(self) -> dict[int, Routed]:
        """Per requested expert: tokens, summed weight and best rank (`experts` lists choices in rank order)."""
        weight: dict[int, float] = {}
        tokens: dict[int, int] = {}
        rank: dict[int, int] = {}
        for event in self.events:
            for position, expert in enumerate(event.experts):
                tokens[expert] = tokens.get(expert, 0) + 1
                weight[expert] = weight.get(expert, 0.0) + (event.weights[position] if event.weights else 0.0)
                rank[expert] = min(rank.get(expert, position), position)
        return {e: Routed(tokens[e], weight[e], rank[e]) for e in sorted(tokens)}

    @cached_property
    def probs(self) -> dict[int, float] | None:
        """Every expert's mean router probability, when all of the layer's events carry logits."""
        events = self.events
        if not events or any(e.logits is None for e in events):
            return None
        logits = np.array([e.logits for e in events], dtype=np.float64)  # [T, E]
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        return dict(enumerate(probs.mean(axis=0).tolist()))


@dataclass(frozen=True)
class ReplayPass:
    """One forward pass rebuilt from a trace."""

    seq: int
    info: PassInfo
    layers: tuple[LayerStep, ...]

    def run(self, manager: CacheManager, after_layer: Callable[[LayerStep], None] | None = None) -> None:
        """Drive `manager` through this pass (routing and router probabilities computed only where its policies
        read them, as live); `after_layer` is told each layer once the manager has served it."""
        routing, probs = manager.wants_routing, manager.wants_probs
        manager.begin_pass(self.info)
        for step in self.layers:
            manager.run_layer(
                step.layer,
                step.requests,
                step.predicted,
                None,
                step.routing if routing else None,
                step.probs if probs else None,
            )
            if after_layer is not None:
                after_layer(step)
        manager.end_pass()


def _next_layer(events: list[TraceEvent], following: int | None) -> dict[Target, list[Sequence[float]]] | None:
    """The default predictor's rows: the next MoE layer's router on each token's input (all or nothing)."""
    rows = [e.next_logits for e in events if e.next_logits is not None]
    if following is None or not events or len(rows) != len(events):
        return None
    return {(0, following): rows}  # type: ignore[dict-item]


def _recorded(events: list[TraceEvent]) -> dict[Target, list[Sequence[float]]] | None:
    """Another predictor's rows, grouped by target in token order."""
    predicted: dict[Target, list[Sequence[float]]] = {}
    for event in events:
        for ahead, layer, row in event.predictions or ():
            predicted.setdefault((ahead, layer), []).append(row)
    return predicted or None


def build_pass(
    seq: int, events: Sequence[TraceEvent], layers: Sequence[int], predictor: str = NEXT_LAYER
) -> ReplayPass:
    """One pass over `events` (tokens in order, each at every MoE layer it routes at; the first token's position
    is where the pass starts), with `predictor`'s predictions; `layers` are the model's MoE layers."""
    tokens = sorted({e.token for e in events})
    info = PassInfo.for_sequences([tokens[0]], [len(tokens)])
    by_layer: dict[int, list[TraceEvent]] = {}
    for event in events:  # token by token, so each list is in token order
        by_layer.setdefault(event.layer, []).append(event)
    steps = []
    for layer, following in zip(layers, (*layers[1:], None), strict=True):
        at_layer = by_layer.get(layer, [])
        requests: dict[int, int] = {}  # expert -> tokens routed to it
        for event in at_layer:
            for expert in event.experts:
                requests[expert] = requests.get(expert, 0) + 1
        predicted = _next_layer(at_layer, following) if predictor == NEXT_LAYER else _recorded(at_layer)
        steps.append(LayerStep(layer, dict(sorted(requests.items())), predicted, tuple(at_layer)))
    return ReplayPass(seq, info, tuple(steps))


def build_passes(trace: Trace, predictor: str = NEXT_LAYER) -> Iterator[ReplayPass]:
    """Per sequence: its prefill positions as one pass, then one pass per token; predictions from `predictor`."""
    by_seq: dict[int, list[TraceEvent]] = {}
    for event in trace.events:
        by_seq.setdefault(event.seq, []).append(event)
    layers = trace.layout.moe_layers
    for seq, events in by_seq.items():
        groups: dict[tuple[bool, int], list[TraceEvent]] = {}
        for event in events:
            group = (True, -1) if event.prefill else (False, event.token)
            groups.setdefault(group, []).append(event)
        for group_events in groups.values():
            yield build_pass(seq, group_events, layers, predictor)
