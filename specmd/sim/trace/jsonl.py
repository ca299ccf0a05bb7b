"""The JSON Lines trace form, the interchange format other tools write: one object per (sequence, token, layer).

    {"meta": {...}}                                             (optional header, first line)
    {"seq": 0, "token": 5, "layer": 3, "experts": [7, 1], "weights": [0.62, 0.38],
     "logits": [...], "next_logits": [...], "prefill": true,
     "predictions": [{"passes_ahead": 1, "layer": 3, "logits": [...]}]}

Only ``seq``, ``token``, ``layer`` and ``experts`` are required. ``logits`` are the layer's router logits
over all its experts; ``next_logits`` the next MoE layer's router applied to this layer's input (what
logit-based prefetch replays from); ``predictions`` what the header's ``predictor`` predicted from this
token, each for a MoE layer some passes ahead. ``token`` counts the prefill positions first; lines of
prefill positions carry ``"prefill": true`` and replay as one pass (a trace without the field replays
every token as its own pass). Tokens of one sequence come in order.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import replace
from pathlib import Path
from typing import Any

from specmd.sim.trace.events import Prediction, Trace, TraceError, TraceEvent


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


def _predictions(value: Any, where: str) -> tuple[Prediction, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(p, dict) for p in value):
        raise TraceError(f"{where}: 'predictions' must be a list of {{passes_ahead, layer, logits}} objects")
    predictions = []
    for item in value:
        row = _row(item.get("logits"), "predictions' logits", where)
        if row is None:
            raise TraceError(f"{where}: a prediction has no 'logits'")
        predictions.append(
            (_int(item.get("passes_ahead"), "passes_ahead", where), _int(item.get("layer"), "layer", where), row)
        )
    return tuple(predictions)


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
        predictions=_predictions(obj.get("predictions"), where),
    )


def read_jsonl(source: Path, data: bytes) -> tuple[dict[str, Any], list[TraceEvent]]:
    """The header and events of a JSON Lines trace; a bad line is a `TraceError` naming it.

    A sequence whose prompt is logged as many rows at token 0 (no ``prefill`` flags: the layers start over
    within token 0) is read as its prefill: each round of layers at token 0 is one prompt position, and the
    later tokens follow the last of them.
    """
    meta: dict[str, Any] = {}
    events: list[TraceEvent] = []
    last: dict[int, tuple[bool, int, int]] = {}  # seq -> (seen a decode token, token, layer) of its last line
    restarts: dict[int, int] = {}  # seq -> times its layers started over within an unflagged token 0
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
            if not (event.prefill is None and event.token == 0 and previous[1] == 0):
                raise TraceError(
                    f"{where}: sequence {event.seq} goes back (token {event.token}, layer {event.layer} after "
                    f"token {previous[1]}, layer {previous[2]}); a sequence's lines must come in order"
                )
            restarts[event.seq] = restarts.get(event.seq, 0) + 1  # the next prompt position, logged at token 0
        last[event.seq] = here
        events.append(event)
    if not events:
        raise TraceError(f"{source}: the trace has no routing lines")
    return meta, _prompt_positions(events, restarts) if restarts else events


def _prompt_positions(events: list[TraceEvent], restarts: dict[int, int]) -> list[TraceEvent]:
    """Number the prompt positions of sequences logged at token 0, flag them prefill, and shift later tokens."""
    position: dict[int, int] = {}  # seq -> current prompt position
    layer_of: dict[int, int] = {}  # seq -> layer of its last token-0 row
    fixed = []
    for event in events:
        prompt = restarts.get(event.seq, 0) + 1
        if prompt == 1:
            fixed.append(event)
        elif event.token == 0:
            if event.seq in layer_of and event.layer <= layer_of[event.seq]:
                position[event.seq] = position.get(event.seq, 0) + 1
            layer_of[event.seq] = event.layer
            fixed.append(replace(event, token=position.get(event.seq, 0), prefill=True))
        else:
            fixed.append(replace(event, token=event.token + prompt - 1))
    return fixed


def write_jsonl(trace: Trace, target: Path) -> None:
    """Write `trace` as JSON Lines, its header first."""
    with target.open("w") as out:
        out.write(json.dumps({"meta": trace.header()}) + "\n")
        for event in trace.events:
            out.write(json.dumps(event.to_json()) + "\n")
