"""Recording routing traces from a live model: `TraceRecorder` is a routing observer, `record` the one-call form."""

from __future__ import annotations

import os
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from specmd.cache.manager import PredictedRows
from specmd.sim.trace.events import Chain, Prediction, Trace, TraceEvent


class TraceRecorder:
    """Collects the routing of each forward pass of a model observing it (`model.observe_routing(recorder)`).

    The model calls `begin_pass` with each real (non-pad) token's (batch row, position), `layer` once per
    MoE layer with per-token lists, and `end_pass`. Each generation's sequences get new sequence numbers.

    A lookahead recording (`generate_lookahead` of an offloaded model) wraps each decode position's
    draft passes (`begin_draft_pass`) and verify pass in `begin_chain` / `end_chain`: they make the position's
    `Chain`; its plain pass follows as usual.
    """

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.meta = dict(meta)
        self.events: list[TraceEvent] = []
        self._base = 0  # sequence number of batch row 0 in the current generation
        self._batch = 0
        self._rows: list[tuple[int, int]] = []
        self._prefill = False
        self._pending: list[TraceEvent] = []
        self.chains: list[Chain] = []
        self._chain: int | None = None  # the position of the chain being recorded
        self._drafting = False
        self._draft: list[TraceEvent] = []
        self._verify: list[TraceEvent] = []

    def begin_chain(self, position: int) -> None:
        """The self-draft's passes from `position` follow, then the verify pass starting there."""
        self._chain, self._draft, self._verify = position, [], []

    def end_chain(self, accepted: int) -> None:
        """The chain's verify pass is done; `accepted` leading drafts were the model's own choices."""
        if self._chain is None:
            raise RuntimeError("end_chain without begin_chain")
        self.chains.append(Chain(self._base, self._chain, accepted, tuple(self._draft), tuple(self._verify)))
        self._chain = None

    def begin_draft_pass(self, rows: Sequence[tuple[int, int]]) -> None:
        """A pass of the self-draft starts (its routing belongs to the open chain)."""
        if self._chain is None:
            raise RuntimeError(
                "a speculative run's draft passes are not a routing trace; record a lookahead trace with "
                "specmd.sim.record(..., lookahead=K) (specmd trace --lookahead K)"
            )
        self._drafting = True
        self._rows = list(rows)
        self._prefill = False
        self._pending = []

    def begin_pass(self, rows: Sequence[tuple[int, int]], batch: int, prefill: bool) -> None:
        self._drafting = False
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
        pending = sorted(self._pending, key=lambda e: (e.seq, e.token, e.layer))
        self._pending = []
        if self._drafting:
            self._draft.extend(pending)
        elif self._chain is not None:  # the chain's verify pass
            self._verify.extend(pending)
        else:
            self.events.extend(pending)

    def trace(self) -> Trace:
        """What was recorded, ordered by sequence (tokens and layers in order within each)."""
        events = sorted(self.events, key=lambda e: (e.seq, not e.prefill, e.token, e.layer))
        chains = sorted(self.chains, key=lambda c: (c.seq, c.position))
        return Trace(self.meta, events, chains=chains)


def record(
    model: Any, input_ids: Any, path: str | os.PathLike[str], *, lookahead: int | None = None, **generate_kwargs: Any
) -> Any:
    """Run `model.generate(input_ids, **generate_kwargs)` and write its routing trace to `path`.

    Returns generate's output; `model.cache_stats()` then also counts this run. Pad tokens are not
    recorded. Replay reproduces a batch-1 run's counters exactly; batched sequences replay one by one.

    `lookahead=K` (a model with a self-draft, greedy, one sequence) records a lookahead trace instead: at every
    decode position the draft's chain of up to K drafts and the verify pass over them (`generate_lookahead`),
    so `specmd.sim.replay(..., speculative=k)` replays speculative decoding with any k <= K, or the governor, at
    any capacity, link and hardware. Each position also decodes plainly after its chain, so the recording run's
    own counters are not those of any one run.
    """
    if "speculative" in generate_kwargs:
        raise ValueError(
            "a speculative run's passes do not replay under other settings; record its lookahead with "
            "lookahead=K (plain greedy decoding plus the draft's chains), then replay with speculative=..."
        )
    recorder = TraceRecorder(model.trace_meta())
    with model.observe_routing(recorder):
        if lookahead is None:
            output = model.generate(input_ids, **generate_kwargs)
        else:
            output = model.generate_lookahead(recorder, lookahead, input_ids=input_ids, **generate_kwargs)
    recorder.trace().save(path)
    return output
