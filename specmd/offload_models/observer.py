"""The routing-observer protocol: what an offloaded model tells anyone watching its routing, pass by pass.

`OffloadMixin.observe_routing(observer)` attaches one; `specmd.sim.record.TraceRecorder` is the one
that writes traces. Rows are per real (non-pad) token of the pass, in batch-row order. The self-draft's passes
(speculative decoding) are shown only to an observer that has a `begin_draft_pass(rows)` method, which they
begin with instead of `begin_pass`; their `layer` and `end_pass` calls are as usual.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from specmd.cache.manager import PredictedRows


class RoutingObserver(Protocol):
    """Receives every forward pass's routing from an offloaded model."""

    def begin_pass(self, rows: Sequence[tuple[int, int]], batch: int, prefill: bool) -> None:
        """A pass starts: each real token's (batch row, position); `batch` rows in all."""
        ...

    def layer(
        self,
        layer: int,
        experts: Sequence[Sequence[int]],
        weights: Sequence[Sequence[float]],
        logits: Sequence[Sequence[float]],
        next_logits: Sequence[Sequence[float]] | None,
        predictions: Mapping[tuple[int, int], PredictedRows] | None,
    ) -> None:
        """One MoE layer: each token's experts in rank order and their weights, its router logits, the next MoE
        layer's router applied to its input (None at the last MoE layer), and what the model's route predictor
        predicted, per target (passes ahead, MoE layer), when it is not that next-layer router."""
        ...

    def end_pass(self) -> None:
        """The pass completed (a pass that raises ends without this call)."""
        ...
