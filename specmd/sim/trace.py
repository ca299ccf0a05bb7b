"""Routing traces: the interchange format, its readers and writers, and recording from a live model.

A trace is JSON Lines, one object per (sequence, token, layer)::

    {"meta": {...}}                                             (optional header, first line)
    {"seq": 0, "token": 5, "layer": 3, "experts": [7, 1], "weights": [0.62, 0.38],
     "logits": [...], "next_logits": [...], "prefill": true}

Only ``seq``, ``token``, ``layer`` and ``experts`` are required. ``logits`` are the layer's router logits
over all its experts; ``next_logits`` the next MoE layer's router applied to this layer's input (what
logit-based prefetch replays from). ``token`` counts the prefill positions first; lines of prefill
positions carry ``"prefill": true`` and replay as one pass (a trace without the field replays every
token as its own pass). Tokens of one sequence come in order. A compact binary form (``.npz``) holds
the same content for fast loading. This module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from specmd.cache.clock import ModelShape, PassInfo
from specmd.cache.policies.base import Routed

FORMAT = "specmd-trace"
VERSION = 1
SUFFIXES = (".jsonl", ".npz")


class TraceError(ValueError):
    """A trace that cannot be read: the message names the file and, for JSON Lines, the line."""


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """The routing of one token at one MoE layer.

    The readers and the recorder store `logits` and `next_logits` as ``array('d')``, 8 bytes a value
    (a tuple of floats takes about 32); any sequence of floats is accepted.
    """

    seq: int
    token: int
    layer: int
    experts: tuple[int, ...]
    weights: tuple[float, ...] | None = None
    logits: Sequence[float] | None = None
    next_logits: Sequence[float] | None = None
    prefill: bool | None = None

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
        return data


@dataclass(frozen=True)
class LayerStep:
    """One MoE layer of one replayed pass: what `CacheManager.run_layer` is given for it.

    `requests` maps each expert to the tokens routed to it; `predicted` maps the next MoE layer to its
    router's logits on this layer's input (when recorded); `routing` gives each requested expert's
    summed weight (0 when the trace has no weights) and best rank; `probs` each expert's mean router
    probability (when the trace records logits). `routing` and `probs` are computed on first use: as in a
    live run, only the policies that read them pay for them.
    """

    layer: int
    requests: dict[int, int]
    predicted: dict[int, list[Sequence[float]]] | None
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


@dataclass
class Trace:
    """A routing trace in memory: its header and its events, in file order."""

    meta: dict[str, Any]
    events: list[TraceEvent]
    sha256: str = ""
    source: str = "<memory>"
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ---- what the header says (or the command line supplied) ------------------------------------
    @property
    def experts_per_layer(self) -> int:
        return self._required("experts_per_layer", "--experts-per-layer")

    @property
    def precision(self) -> str:
        return self.meta.get("precision") or next(iter(self._expert_bytes()), "bf16")

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert at the trace's precision."""
        sizes = self._expert_bytes()
        if self.precision not in sizes:
            raise TraceError(f"{self.source}: the header gives no expert_bytes; pass --expert-bytes")
        return sizes[self.precision]

    def _expert_bytes(self) -> dict[str, int]:
        value = self.meta.get("expert_bytes")
        if isinstance(value, int):
            return {self.meta.get("precision") or "bf16": value}
        return dict(value or {})

    def _required(self, name: str, flag: str) -> Any:
        if self.meta.get(name) is None:
            raise TraceError(f"{self.source}: the header gives no {name}; pass {flag}")
        return self.meta[name]

    @property
    def top_k(self) -> int:
        return int(self.meta.get("top_k") or max(len(e.experts) for e in self.events))

    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(self.meta.get("moe_layers") or sorted({e.layer for e in self.events}))

    @property
    def num_layers(self) -> int:
        return int(self.meta.get("num_layers") or max(self.moe_layers) + 1)

    @property
    def shape(self) -> ModelShape | None:
        shape = self.meta.get("shape")
        return None if shape is None else ModelShape.from_dict(shape)

    @property
    def has_next_logits(self) -> bool:
        last = self.moe_layers[-1]
        return all(e.next_logits is not None for e in self.events if e.layer != last)

    @property
    def num_requests(self) -> int:
        return sum(len(step.requests) for p in self.passes() for step in p.layers)

    # ---- replay view ----------------------------------------------------------------------------
    def passes(self) -> list[ReplayPass]:
        """The forward passes to replay: per sequence, its prefill positions as one pass, then one per token."""
        if "passes" not in self._cache:
            self._cache["passes"] = list(self._build_passes())
        return self._cache["passes"]

    def _build_passes(self) -> Iterator[ReplayPass]:
        by_seq: dict[int, list[TraceEvent]] = {}
        for event in self.events:
            by_seq.setdefault(event.seq, []).append(event)
        layers = self.moe_layers
        for seq, events in by_seq.items():
            groups: dict[tuple[bool, int], list[TraceEvent]] = {}
            for event in events:
                group = (True, -1) if event.prefill else (False, event.token)
                groups.setdefault(group, []).append(event)
            for group_events in groups.values():
                tokens = sorted({e.token for e in group_events})
                info = PassInfo.for_sequences([tokens[0]], [len(tokens)])
                by_layer: dict[int, list[TraceEvent]] = {}
                for event in group_events:  # file order: token by token, so each list is in token order
                    by_layer.setdefault(event.layer, []).append(event)
                steps = []
                for layer, following in zip(layers, (*layers[1:], None), strict=True):
                    at_layer = by_layer.get(layer, [])
                    requests: dict[int, int] = {}  # expert -> tokens routed to it
                    for event in at_layer:
                        for expert in event.experts:
                            requests[expert] = requests.get(expert, 0) + 1
                    rows = [e.next_logits for e in at_layer if e.next_logits is not None]
                    predicted = None
                    if following is not None and at_layer and len(rows) == len(at_layer):
                        predicted = {following: rows}
                    steps.append(LayerStep(layer, dict(sorted(requests.items())), predicted, tuple(at_layer)))
                yield ReplayPass(seq, info, tuple(steps))

    # ---- writing --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON Lines (.jsonl) or the compact binary form (.npz), by the path's suffix."""
        target = Path(path)
        if target.suffix == ".jsonl":
            _write_jsonl(self, target)
        elif target.suffix == ".npz":
            _write_npz(self, target)
        else:
            raise TraceError(f"cannot write a trace to {target}: use a {' or '.join(SUFFIXES)} file")
        return target


# ---- reading ------------------------------------------------------------------------------------
def load_trace(
    path: str | os.PathLike[str],
    *,
    experts_per_layer: int | None = None,
    expert_bytes: int | None = None,
    top_k: int | None = None,
) -> Trace:
    """Read a trace (.jsonl or .npz); keyword values fill in or override the header's."""
    source = Path(path)
    if not source.is_file():
        raise TraceError(f"trace file {source} does not exist")
    if source.suffix not in SUFFIXES:
        raise TraceError(f"cannot read {source}: a trace is a {' or '.join(SUFFIXES)} file")
    data = source.read_bytes()
    meta, events = _read_jsonl(source, data) if source.suffix == ".jsonl" else _read_npz(source)
    overrides = {"experts_per_layer": experts_per_layer, "expert_bytes": expert_bytes, "top_k": top_k}
    for key, value in overrides.items():
        if value is not None:
            meta[key] = value
    trace = Trace(meta, events, hashlib.sha256(data).hexdigest(), str(source))
    _validate(trace)
    return trace


def _int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TraceError(f"{where}: {name!r} must be an integer >= 0, got {value!r}")
    return value


def _numbers(value: Any, name: str, where: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise TraceError(f"{where}: {name!r} must be a list of numbers")
    return tuple(float(v) for v in value)


def _row(value: Any, name: str, where: str) -> array | None:
    numbers = _numbers(value, name, where)
    return None if numbers is None else array("d", numbers)


def _event(obj: Any, where: str) -> TraceEvent:
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("seq", "token", "layer", "experts") if k not in obj]
    if missing:
        raise TraceError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    experts = obj["experts"]
    if not isinstance(experts, list) or not experts:
        raise TraceError(f"{where}: 'experts' must be a non-empty list of expert indices")
    experts = tuple(_int(e, "experts", where) for e in experts)
    if len(set(experts)) != len(experts):
        raise TraceError(f"{where}: 'experts' lists an expert twice: {list(experts)}")
    weights = _numbers(obj.get("weights"), "weights", where)
    if weights is not None and len(weights) != len(experts):
        raise TraceError(f"{where}: 'weights' has {len(weights)} values for {len(experts)} experts")
    prefill = obj.get("prefill")
    if prefill is not None and not isinstance(prefill, bool):
        raise TraceError(f"{where}: 'prefill' must be true or false, got {prefill!r}")
    return TraceEvent(
        seq=_int(obj["seq"], "seq", where),
        token=_int(obj["token"], "token", where),
        layer=_int(obj["layer"], "layer", where),
        experts=experts,
        weights=weights,
        logits=_row(obj.get("logits"), "logits", where),
        next_logits=_row(obj.get("next_logits"), "next_logits", where),
        prefill=prefill,
    )


def _read_jsonl(source: Path, data: bytes) -> tuple[dict[str, Any], list[TraceEvent]]:
    meta: dict[str, Any] = {}
    events: list[TraceEvent] = []
    last: dict[int, tuple[bool, int, int]] = {}  # seq -> (seen a decode token, token, layer) of its last line
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        where = f"{source}:{number}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not valid JSON ({exc.msg})") from exc
        if isinstance(obj, dict) and "meta" in obj:
            if events or meta:
                raise TraceError(f"{where}: a 'meta' header may only be the first line")
            if not isinstance(obj["meta"], dict):
                raise TraceError(f"{where}: 'meta' must be an object")
            meta = dict(obj["meta"])
            continue
        event = _event(obj, where)
        previous = last.get(event.seq)
        here = (not event.prefill, event.token, event.layer)
        if previous is not None and here <= previous:
            raise TraceError(
                f"{where}: sequence {event.seq} goes back (token {event.token}, layer {event.layer} after "
                f"token {previous[1]}, layer {previous[2]}); a sequence's lines must come in order"
            )
        last[event.seq] = here
        events.append(event)
    if not events:
        raise TraceError(f"{source}: the trace has no routing lines")
    return meta, events


def _validate(trace: Trace) -> None:
    experts = trace.meta.get("experts_per_layer")
    if experts is None:
        return
    for event in trace.events:
        if max(event.experts) >= experts:
            raise TraceError(
                f"{trace.source}: sequence {event.seq} token {event.token} layer {event.layer} routes to expert "
                f"{max(event.experts)}, but layers have {experts} experts (experts_per_layer)"
            )


# ---- writing ------------------------------------------------------------------------------------
def _header(trace: Trace) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, **trace.meta}


def _write_jsonl(trace: Trace, target: Path) -> None:
    with target.open("w") as out:
        out.write(json.dumps({"meta": _header(trace)}) + "\n")
        for event in trace.events:
            out.write(json.dumps(event.to_json()) + "\n")


def _matrix(rows: Sequence[Sequence[float] | None]) -> tuple[np.ndarray, np.ndarray] | None:
    """A float32 matrix with NaN rows where a value is absent, and the presence mask; None if all absent."""
    width = max((len(r) for r in rows if r is not None), default=0)
    if not width:
        return None
    matrix = np.full((len(rows), width), np.nan, dtype=np.float32)
    present = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        if row is not None:
            matrix[i, : len(row)] = row
            present[i] = True
    return matrix, present


def _write_npz(trace: Trace, target: Path) -> None:
    events = trace.events
    offsets = np.zeros(len(events) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e.experts) for e in events])
    arrays: dict[str, np.ndarray] = {
        "meta": np.array(json.dumps(_header(trace))),
        "seq": np.array([e.seq for e in events], dtype=np.int64),
        "token": np.array([e.token for e in events], dtype=np.int64),
        "layer": np.array([e.layer for e in events], dtype=np.int64),
        "prefill": np.array([-1 if e.prefill is None else int(e.prefill) for e in events], dtype=np.int8),
        "offsets": offsets,
        "experts": np.array([x for e in events for x in e.experts], dtype=np.int64),
    }
    if all(e.weights is not None for e in events):
        arrays["weights"] = np.array([w for e in events for w in e.weights], dtype=np.float32)  # type: ignore[union-attr]
    for name in ("logits", "next_logits"):
        packed = _matrix([getattr(e, name) for e in events])
        if packed is not None:
            arrays[name], arrays[f"has_{name}"] = packed
    with target.open("wb") as out:
        np.savez_compressed(out, **arrays)


def _read_npz(source: Path) -> tuple[dict[str, Any], list[TraceEvent]]:
    try:
        with np.load(source, allow_pickle=False) as npz:
            data = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        raise TraceError(f"{source}: not a readable .npz trace ({exc})") from exc
    required = {"meta", "seq", "token", "layer", "prefill", "offsets", "experts"}
    if not required <= set(data):
        raise TraceError(f"{source}: missing arrays {sorted(required - set(data))}")
    meta = json.loads(str(data["meta"]))
    offsets, experts = data["offsets"].tolist(), data["experts"].tolist()
    weights = data["weights"].tolist() if "weights" in data else None

    def rows(name: str) -> list[array | None]:
        if name not in data:
            return [None] * len(offsets[1:])
        values, present = data[name].astype(np.float64), data[f"has_{name}"].tolist()
        return [array("d", values[i].tobytes()) if there else None for i, there in enumerate(present)]

    logits, next_logits = rows("logits"), rows("next_logits")
    events = []
    for i, (seq, token, layer, prefill) in enumerate(
        zip(data["seq"].tolist(), data["token"].tolist(), data["layer"].tolist(), data["prefill"].tolist(), strict=True)
    ):
        start, end = offsets[i], offsets[i + 1]
        events.append(
            TraceEvent(
                seq=seq,
                token=token,
                layer=layer,
                experts=tuple(experts[start:end]),
                weights=None if weights is None else tuple(weights[start:end]),
                logits=logits[i],
                next_logits=next_logits[i],
                prefill=None if prefill < 0 else bool(prefill),
            )
        )
    return meta, events


# ---- recording ----------------------------------------------------------------------------------
class TraceRecorder:
    """Collects the routing of each forward pass of a model it is attached to (see `record`).

    The model's runtime calls `begin_pass` with each real (non-pad) token's (batch row, position),
    `layer` once per MoE layer with per-token lists, and `end_pass`. Each generation's sequences get
    new sequence numbers.
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
    ) -> None:
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
    with model.recording(recorder):
        output = model.generate(input_ids, **generate_kwargs)
    recorder.trace().save(path)
    return output
