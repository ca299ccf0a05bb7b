"""Recording routing traces from a live model: `TraceRecorder` is a routing observer, `record` the one-call form."""

from __future__ import annotations

import os
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from specmd.cache.manager import PredictedRows
from specmd.sim.trace.events import Prediction, Trace, TraceEvent


class TraceRecorder:
    """Collects the routing of each forward pass of a model observing it (`model.observe_routing(recorder)`).

    The model calls `begin_pass` with each real (non-pad) token's (batch row, position), `layer` once per
    MoE layer with per-token lists, and `end_pass`. Each generation's sequences get new sequence numbers.
    """

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.meta = dict(meta)
        self.events: list[TraceEvent] = []
        self._base = 0  # sequence number of batch row 0 in the current generation
        self._batch = 0
        self._rows: list[tuple[int, int]] = []
        self._prefill = False
        self._pending: list[TraceEvent] = []

    def begin_pass(self, rows: Sequence[tuple[int, int]], batch: int, prefill: bool) -> None:
        if prefill and self.events:
            self._base += self._batch  # a new generation starts new sequences
        self._batch = batch
        self._rows = list(rows)
        self._prefill = prefill
        self._pending = []

    def layer(
        self,
        layer: int,
        experts: Sequence[Sequence[int]],
        weights: Sequence[Sequence[float]],
        logits: Sequence[Sequence[float]],
        next_logits: Sequence[Sequence[float]] | None,
        predictions: Mapping[tuple[int, int], PredictedRows] | None,
    ) -> None:
        predicted: dict[int, list[Prediction]] = {}  # real token -> what the predictor predicted from it
        for (ahead, target), (tokens, rows) in (predictions or {}).items():
            for token, row in zip(tokens, rows, strict=True):
                predicted.setdefault(token, []).append((ahead, target, array("d", row)))
        for i, (row, position) in enumerate(self._rows):
            self._pending.append(
                TraceEvent(
                    seq=self._base + row,
                    token=position,
                    layer=layer,
                    experts=tuple(experts[i]),
                    weights=tuple(weights[i]),
                    logits=array("d", logits[i]),
                    next_logits=None if next_logits is None else array("d", next_logits[i]),
                    prefill=self._prefill or None,
                    predictions=tuple(predicted[i]) if i in predicted else None,
                )
            )

    def end_pass(self) -> None:
        self.events.extend(sorted(self._pending, key=lambda e: (e.seq, e.token, e.layer)))
        self._pending = []

    def trace(self) -> Trace:
        """What was recorded, ordered by sequence (tokens and layers in order within each)."""
        events = sorted(self.events, key=lambda e: (e.seq, not e.prefill, e.token, e.layer))
        return Trace(self.meta, events)


def record(model: Any, input_ids: Any, path: str | os.PathLike[str], **generate_kwargs: Any) -> Any:
    """Run `model.generate(input_ids, **generate_kwargs)` and write its routing trace to `path`.

    Returns generate's output; `model.cache_stats()` then also counts this run. Pad tokens are not
    recorded. Replay reproduces a batch-1 run's counters exactly; batched sequences replay one by one.
    """
    recorder = TraceRecorder(model.trace_meta())
    with model.observe_routing(recorder):
        output = model.generate(input_ids, **generate_kwargs)
    recorder.trace().save(path)
    return output
