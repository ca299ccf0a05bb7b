"""A routing trace in memory: its events (one per token per MoE layer) and its header, read as an `ExpertLayout`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specmd.cache.layout import MAX_EXPERTS_PER_LAYER, ExpertLayout
from specmd.cache.manager import NEXT_LAYER

if TYPE_CHECKING:
    from specmd.sim.trace.passes import ReplayPass

FORMAT = "specmd-trace"
VERSION = 1


class TraceError(ValueError):
    """A trace that cannot be read: the message names the file and, where it can, the line or field."""


INT_LIMIT = 2**63
"""Row integers (sequence, token, layer, passes ahead) stay below it: the binary form stores them as int64."""


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


@dataclass(frozen=True, slots=True)
class Chain:
    """What the self-draft predicted at one decode position of a sequence, in a lookahead trace (recorded by
    `specmd.sim.record(..., lookahead=K)`; replayed by `specmd.sim.speculate`).

    At `position` (where the pending token sits) the draft proposed K tokens, one pass each: `draft` holds its
    routing events, at tokens position .. position + K - 1 (pass j at position + j), every MoE layer each. The
    model then verified the pending token and the K drafts in one pass: `verify`, at tokens position ..
    position + K. The first `accepted` drafts were the model's own greedy choices. A speculative step drafting
    k <= K tokens from here is this chain cut to k; a plain step is the trace's own event at `position`.
    """

    seq: int
    position: int
    accepted: int
    draft: tuple[TraceEvent, ...]
    verify: tuple[TraceEvent, ...]

    @property
    def length(self) -> int:
        """K: the tokens drafted."""
        return len({event.token for event in self.draft})

    def to_json(self) -> dict[str, Any]:
        return {
            "chain": {"seq": self.seq, "position": self.position, "accepted": self.accepted},
            "draft": [event.to_json() for event in self.draft],
            "verify": [event.to_json() for event in self.verify],
        }

    def problem(self, rules: RowRules) -> str | None:
        """What is wrong with the chain under a header's `rules` (its events included), or None."""
        for name in ("seq", "position", "accepted"):
            value = getattr(self, name)
            if not (_is_int(value) and 0 <= value < INT_LIMIT):
                return f"the chain's {name!r} must be an integer in [0, 2**63), got {value!r}"
        k = self.length
        if self.accepted > k:
            return f"the chain accepts {self.accepted} drafts of {k}"
        for name, events, width in (("draft", self.draft, k), ("verify", self.verify, k + 1 if k else 0)):
            first = self.position
            seen: set[tuple[int, int]] = set()
            for event in events:
                problem = rules.problem(event)
                if problem is None and event.seq != self.seq:
                    problem = f"belongs to sequence {event.seq}, not the chain's {self.seq}"
                if problem is None and not first <= event.token < first + width:
                    problem = f"token {event.token} is outside [{first}, {first + width})"
                if problem is None and (event.token, event.layer) in seen:
                    problem = f"token {event.token} layer {event.layer} comes twice"
                if problem is not None:
                    return f"{name} event: {problem}"
                seen.add((event.token, event.layer))
            if len(seen) != width * len({layer for _, layer in seen}):
                return f"the {name} events do not give every token the same MoE layers"
        draft_layers = {event.layer for event in self.draft}
        if {event.layer for event in self.verify} != draft_layers:
            return "the draft and verify events route at different MoE layers"
        return None


# The header fields a command line may supply for a trace that lacks them, and the flags that do.
_REQUIRED = (("expert_bytes", "--expert-bytes"), ("experts_per_layer", "--experts-per-layer"))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def with_overrides(meta: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The header with values given apart from the file (the command line's) filled in or replacing its own.

    `expert_bytes` prices every expert as that many bytes: it replaces the header's sizes at every precision,
    full precision included.
    """
    header = dict(meta)
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        header[name] = value
        if name == "expert_bytes":
            header.pop("full_expert_bytes", None)
            header.pop("full_precision", None)
    return header


def layout_of(meta: Mapping[str, Any], layers: Iterable[int], top_k: int) -> ExpertLayout:
    """The layout `meta` declares; MoE layers, decoder layers, top-k and precision default to what the rows show
    (`layers`, `top_k`). A wrong field is a ValueError naming it."""
    header = dict(meta)
    if header.get("moe_layers") is None:
        header["moe_layers"] = sorted(set(layers))
    if header.get("num_layers") is None:
        declared = header["moe_layers"]
        valid = isinstance(declared, list | tuple) and declared and all(_is_int(layer) for layer in declared)
        header["num_layers"] = max(declared) + 1 if valid else 1  # invalid layers: the layout says why
    if header.get("top_k") is None:
        header["top_k"] = top_k
    sizes = header.get("expert_bytes")
    if header.get("precision") is None and isinstance(sizes, Mapping) and sizes:
        header["precision"] = next(iter(sizes))
    try:
        return ExpertLayout.from_header(header)
    except TypeError as exc:  # a field of a type the layout does not compare (a string among layer indices, ...)
        raise ValueError(str(exc)) from None


def check_header(meta: Mapping[str, Any], source: str) -> None:
    """Refuse a header with a wrong field, as read (before any row): a `TraceError` naming the file and the field.

    Fields a trace may lack until the command line gives them (experts per layer, expert bytes) and those the
    rows show (MoE layers, top-k) are checked as far as they are given.
    """
    header = dict(meta)
    if header.get("experts_per_layer") is None:
        header["experts_per_layer"] = MAX_EXPERTS_PER_LAYER
    if header.get("expert_bytes") is None:
        header["expert_bytes"] = 1
    shape = header.get("shape")
    if header.get("num_layers") is None and header.get("moe_layers") is None and isinstance(shape, Mapping):
        header["num_layers"] = shape.get("num_layers")
    try:
        layout_of(header, [0], 1)  # MoE layers unknown till the rows: one stands for them
    except ValueError as exc:
        raise TraceError(f"{source}: header: {exc}") from None


class RowRules:
    """What a (checked) header requires of every row: experts below `experts_per_layer`, layers among `moe_layers`
    (or below `num_layers`), logit rows as wide as `experts_per_layer`, or else as wide as the first one.

    `problem` says what is wrong with a row, or None; it also checks the types of a row built in memory.
    """

    def __init__(self, meta: Mapping[str, Any]) -> None:
        experts = meta.get("experts_per_layer")
        layers = meta.get("moe_layers")
        self.experts: int | None = experts if _is_int(experts) else None
        self.layers: list[int] | None = list(layers) if isinstance(layers, list | tuple) else None
        self._layer_set = frozenset(self.layers or ())
        num_layers = meta.get("num_layers")
        self.num_layers: int | None = num_layers if _is_int(num_layers) else None
        self.width: int | None = self.experts  # of every logit row: one row per layer's experts

    def _layer(self, layer: object, what: str) -> str | None:
        if not (_is_int(layer) and 0 <= layer < INT_LIMIT):  # type: ignore[operator]
            return f"{what} must be an integer in [0, 2**63), got {layer!r}"
        if self.layers is not None and layer not in self._layer_set:
            return f"{what} {layer} is not one of the header's moe_layers {self.layers}"
        if self.layers is None and self.num_layers is not None and layer >= self.num_layers:  # type: ignore[operator]
            return f"{what} {layer} is not below the header's num_layers={self.num_layers}"
        return None

    def _width(self, row: Sequence[float], name: str) -> str | None:
        if self.width is None:
            self.width = len(row)
        elif len(row) != self.width:
            whose = "layers have" if self.experts is not None else "earlier rows'"
            unit = " experts (experts_per_layer)" if self.experts is not None else ""
            return f"{name} has {len(row)} values, but {whose} {self.width}{unit}"
        return None

    def problem(self, event: TraceEvent) -> str | None:
        """What is wrong with `event` (already parsed) under this header, or None."""
        for name in ("seq", "token"):
            value = getattr(event, name)
            if not (_is_int(value) and 0 <= value < INT_LIMIT):
                return f"{name!r} must be an integer in [0, 2**63), got {value!r}"
        problem = self._layer(event.layer, "layer")
        if problem:
            return problem
        for name in ("logits", "next_logits"):
            row = getattr(event, name)
            if row is not None:
                problem = self._width(row, repr(name))
                if problem:
                    return problem
        for ahead, layer, row in event.predictions or ():
            if not (_is_int(ahead) and 0 <= ahead < INT_LIMIT):
                return f"a prediction's 'passes_ahead' must be an integer in [0, 2**63), got {ahead!r}"
            problem = self._layer(layer, "a prediction's layer") or self._width(row, "a prediction's 'logits'")
            if problem:
                return problem
        experts = event.experts
        limit = self.experts or self.width or MAX_EXPERTS_PER_LAYER
        if not experts or len(set(experts)) != len(experts):
            return f"'experts' must list distinct experts, at least one, got {list(experts)}"
        for expert in experts:
            if not (_is_int(expert) and 0 <= expert < limit):
                if not (_is_int(expert) and 0 <= expert < MAX_EXPERTS_PER_LAYER):
                    return f"'experts' must be an integer in [0, {limit}), got {expert!r}"
                if self.experts is not None:
                    return f"routes to expert {expert}, but layers have {limit} experts (experts_per_layer)"
                return f"routes to expert {expert}, but its logits cover {limit} experts"
        return None


def _count(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


@dataclass
class Trace:
    """A routing trace: its header (`meta`) and its events, in file order."""

    meta: dict[str, Any]
    events: list[TraceEvent]
    sha256: str = ""
    source: str = "<memory>"
    chains: list[Chain] = field(default_factory=list)
    """The self-draft's predictions per decode position (a lookahead trace; empty otherwise)."""
    _passes: dict[str, list[ReplayPass]] = field(default_factory=dict, repr=False, compare=False)
    _checked_meta: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """The header the events were last checked against (by a reader as it read them, or by `layout`)."""

    def __repr__(self) -> str:
        """One line: the model, how many sequences, passes and requests, and the routing's shape (never the events)."""
        sequences: set[int] = set()
        layers: set[int] = set()
        requests: dict[tuple[int, int, int], set[int]] = {}  # (sequence, pass, layer) -> experts, as a replay counts
        top_k = 0
        for e in self.events:
            sequences.add(e.seq)
            layers.add(e.layer)
            requests.setdefault((e.seq, -1 if e.prefill else e.token, e.layer), set()).update(e.experts)
            top_k = max(top_k, len(e.experts))
        passes = len({(seq, token) for seq, token, _ in requests})
        model = self.meta.get("model") or self.meta.get("model_type") or "model not recorded"
        experts = self.meta.get("experts_per_layer") or "?"
        counts = (
            _count(len(sequences), "sequence", "sequences"),
            _count(passes, "pass", "passes"),
            _count(sum(map(len, requests.values())), "request", "requests"),
        )
        return (
            f"Trace({self.source}: {model}, {', '.join(counts)}, {len(layers)} MoE layers x {experts} experts, "
            f"top-{self.meta.get('top_k') or top_k}, sha256={self.sha256[:12] or '-'})"
        )

    @classmethod
    def concat(cls, traces: Sequence[Trace]) -> Trace:
        """One trace of several of the same model (the first one's header), their sequences numbered apart."""
        if not traces:
            raise ValueError("concatenating traces needs at least one")
        first = traces[0]
        for other in traces[1:]:
            if other.layout != first.layout:
                raise TraceError(f"{other.source} is not of the same model as {first.source} (their headers differ)")
        events, chains, base = [], [], 0
        for trace in traces:
            seqs = sorted({e.seq for e in trace.events})
            renumber = {seq: base + i for i, seq in enumerate(seqs)}
            events += [replace(e, seq=renumber[e.seq]) for e in trace.events]
            chains += [
                replace(
                    chain,
                    seq=renumber[chain.seq],
                    draft=tuple(replace(e, seq=renumber[e.seq]) for e in chain.draft),
                    verify=tuple(replace(e, seq=renumber[e.seq]) for e in chain.verify),
                )
                for chain in trace.chains
            ]
            base += len(seqs)
        sha256, source = ",".join(t.sha256 for t in traces), " + ".join(t.source for t in traces)
        return cls(dict(first.meta), events, sha256, source, chains)

    # ---- what the header says (or the command line supplied) ------------------------------------
    @cached_property
    def layout(self) -> ExpertLayout:
        """The header's expert layout; layers, top-k and precision default to what the events show.

        A header or an event the header does not allow (an expert beyond `experts_per_layer`, a layer outside
        `moe_layers`, a logit row of another width) is a `TraceError`: a trace built in memory is checked here,
        once; a loaded one was checked as it was read.
        """
        for name, flag in _REQUIRED:
            if self.meta.get(name) is None:
                raise TraceError(f"{self.source}: the header gives no {name}; pass {flag}")
        if not self.events:
            raise TraceError(f"{self.source}: the trace has no routing rows")
        if self._checked_meta != self.meta:
            self._check_rows()
        try:
            return layout_of(self.meta, {e.layer for e in self.events}, max(len(e.experts) for e in self.events))
        except ValueError as exc:
            raise TraceError(f"{self.source}: header: {exc}") from None

    def _check_rows(self) -> None:
        check_header(self.meta, self.source)
        rules = RowRules(self.meta)
        for event in self.events:
            problem = rules.problem(event)
            if problem is not None:
                raise TraceError(
                    f"{self.source}: sequence {event.seq} token {event.token} layer {event.layer}: {problem}"
                )
        decode = {(e.seq, e.token) for e in self.events if not e.prefill}
        chained: set[tuple[int, int]] = set()
        for chain in self.chains:
            problem = chain.problem(rules)
            where = (chain.seq, chain.position)
            if problem is None and where not in decode:
                problem = "the sequence has no decode token there"
            if problem is None and where in chained:
                problem = "a second chain at the same position"
            chained.add(where)
            if problem is not None:
                raise TraceError(
                    f"{self.source}: the chain at sequence {chain.seq} position {chain.position}: {problem}"
                )
        self._checked_meta = dict(self.meta)

    @property
    def lookahead(self) -> int:
        """The most tokens a chain drafted (0: not a lookahead trace; a speculative replay drafts at most this)."""
        return max((chain.length for chain in self.chains), default=0)

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
