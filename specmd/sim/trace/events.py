"""A routing trace in memory: its events (one per token per MoE layer) and its header, read as an `ExpertLayout`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specmd.cache.layout import ExpertLayout
from specmd.cache.manager import NEXT_LAYER

if TYPE_CHECKING:
    from specmd.sim.trace.passes import ReplayPass

FORMAT = "specmd-trace"
VERSION = 1


class TraceError(ValueError):
    """A trace that cannot be read: the message names the file and, where it can, the line or field."""


Prediction = tuple[int, int, Sequence[float]]
"""(passes ahead, MoE layer, predicted router logits over that layer's experts)."""


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """The routing of one token at one MoE layer.

    `next_logits` is the next MoE layer's router applied to this layer's input (the default predictor);
    `predictions` what another predictor (the header's ``predictor``) predicted from here, possibly for
    later passes. The readers and the recorder store logit rows as ``array('d')``, 8 bytes a value (a
    tuple of floats takes about 32); any sequence of floats is accepted.
    """

    seq: int
    token: int
    layer: int
    experts: tuple[int, ...]
    weights: tuple[float, ...] | None = None
    logits: Sequence[float] | None = None
    next_logits: Sequence[float] | None = None
    prefill: bool | None = None
    predictions: tuple[Prediction, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "seq": self.seq,
            "token": self.token,
            "layer": self.layer,
            "experts": list(self.experts),
        }
        for name in ("weights", "logits", "next_logits"):
            value = getattr(self, name)
            if value is not None:
                data[name] = list(value)
        if self.prefill:
            data["prefill"] = True
        if self.predictions is not None:
            data["predictions"] = [
                {"passes_ahead": ahead, "layer": layer, "logits": list(row)} for ahead, layer, row in self.predictions
            ]
        return data


# The header fields a command line may supply for a trace that lacks them, and the flags that do.
_REQUIRED = (("expert_bytes", "--expert-bytes"), ("experts_per_layer", "--experts-per-layer"))


@dataclass
class Trace:
    """A routing trace: its header (`meta`) and its events, in file order."""

    meta: dict[str, Any]
    events: list[TraceEvent]
    sha256: str = ""
    source: str = "<memory>"
    _passes: dict[str, list[ReplayPass]] = field(default_factory=dict, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"Trace({self.source}, {len(self.events):,} events, sha256={self.sha256[:12] or '-'})"

    @classmethod
    def concat(cls, traces: Sequence[Trace]) -> Trace:
        """One trace of several of the same model (the first one's header), their sequences numbered apart."""
        if not traces:
            raise ValueError("concatenating traces needs at least one")
        first = traces[0]
        for other in traces[1:]:
            if other.layout != first.layout:
                raise TraceError(f"{other.source} is not of the same model as {first.source} (their headers differ)")
        events, base = [], 0
        for trace in traces:
            seqs = sorted({e.seq for e in trace.events})
            renumber = {seq: base + i for i, seq in enumerate(seqs)}
            events += [replace(e, seq=renumber[e.seq]) for e in trace.events]
            base += len(seqs)
        return cls(dict(first.meta), events, ",".join(t.sha256 for t in traces), " + ".join(t.source for t in traces))

    # ---- what the header says (or the command line supplied) ------------------------------------
    @cached_property
    def layout(self) -> ExpertLayout:
        """The header's expert layout; layers, top-k and precision default to what the events show."""
        for name, flag in _REQUIRED:
            if self.meta.get(name) is None:
                raise TraceError(f"{self.source}: the header gives no {name}; pass {flag}")
        header = dict(self.meta)
        if header.get("moe_layers") is None:
            header["moe_layers"] = sorted({e.layer for e in self.events})
        if header.get("num_layers") is None:
            header["num_layers"] = max(header["moe_layers"], default=-1) + 1
        if header.get("top_k") is None:
            header["top_k"] = max(len(e.experts) for e in self.events)
        if header.get("precision") is None and isinstance(header["expert_bytes"], dict) and header["expert_bytes"]:
            header["precision"] = next(iter(header["expert_bytes"]))
        try:
            return ExpertLayout.from_header(header)
        except (ValueError, TypeError) as exc:
            raise TraceError(f"{self.source}: header: {exc}") from None

    @property
    def predictor(self) -> str:
        """The predictor whose `predictions` the events carry (next-layer when they carry none)."""
        return str(self.meta.get("predictor") or NEXT_LAYER)

    @property
    def has_next_logits(self) -> bool:
        last = self.layout.moe_layers[-1]
        return all(e.next_logits is not None for e in self.events if e.layer != last)

    @property
    def num_requests(self) -> int:
        return sum(len(step.requests) for p in self.passes() for step in p.layers)

    # ---- replay view ----------------------------------------------------------------------------
    def passes(self, predictor: str = NEXT_LAYER) -> list[ReplayPass]:
        """The forward passes to replay, with `predictor`'s predictions: per sequence, its prefill positions as
        one pass, then one pass per token."""
        if predictor not in self._passes:
            from specmd.sim.trace.passes import build_passes

            self._passes[predictor] = list(build_passes(self, predictor))
        return self._passes[predictor]

    # ---- writing --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON Lines (.jsonl) or the compact binary form (.npz), by the path's suffix."""
        from specmd.sim.trace.io import save_trace

        return save_trace(self, path)

    def header(self) -> dict[str, Any]:
        """The header as written: the format, its version and `meta`."""
        return {"format": FORMAT, "version": VERSION, **self.meta}
