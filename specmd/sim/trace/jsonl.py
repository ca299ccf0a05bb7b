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

A lookahead trace (`specmd.sim.record(..., lookahead=K)`) adds, after the routing lines, one line per decode
position with what the self-draft predicted there (`Chain`), its routing in the same per-token objects:

    {"chain": {"seq": 0, "position": 7, "accepted": 2}, "draft": [{...}, ...], "verify": [{...}, ...]}

The reader takes a line at a time: memory is the events kept plus one line and its parsed objects, never the
file (measured on a 100 MB trace of 68,176 rows with 64-expert logits and next-layer logits: 115 MB of events,
a tracemalloc peak 14 kB above them; before, the whole file was held as bytes and as text, a peak 204 MB
above). A line that is not UTF-8 or not JSON, nests too deeply, holds an integer too long to convert, a
non-finite number, or a row the header does not allow is one `TraceError` naming the file and the line.
"""

from __future__ import annotations

import hashlib
import json
import math
from array import array
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from specmd.cache.layout import MAX_EXPERTS_PER_LAYER
from specmd.sim.trace.events import (
    INT_LIMIT,
    Chain,
    Prediction,
    RowRules,
    Trace,
    TraceError,
    TraceEvent,
    check_header,
    with_overrides,
)


def _int(value: Any, name: str, where: str, limit: int = INT_LIMIT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        bound = "2**63" if limit == INT_LIMIT else str(limit)
        raise TraceError(f"{where}: {name!r} must be an integer in [0, {bound}), got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _row(value: Any, name: str, where: str) -> array | None:
    """A list of finite numbers as an ``array('d')`` (8 bytes a value); None when absent."""
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        try:
            row = array("d", value)
        except OverflowError:  # an integer beyond any float
            row = None
        # a sum of finite values is finite but for values near the float limit: then look at each one
        if row is not None and (math.isfinite(sum(row)) or all(math.isfinite(v) for v in row)):
            return row
    raise TraceError(f"{where}: {name} must be finite numbers (a list of them)")


def _predictions(value: Any, where: str) -> tuple[Prediction, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(p, dict) for p in value):
        raise TraceError(f"{where}: 'predictions' must be a list of {{passes_ahead, layer, logits}} objects")
    predictions = []
    for item in value:
        row = _row(item.get("logits"), "a prediction's 'logits'", where)
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
    experts = tuple(_int(e, "experts", where, MAX_EXPERTS_PER_LAYER) for e in experts)
    if len(set(experts)) != len(experts):
        raise TraceError(f"{where}: 'experts' lists an expert twice: {list(experts)}")
    weights = _row(obj.get("weights"), "'weights'", where)
    if weights is not None and len(weights) != len(experts):
        raise TraceError(f"{where}: 'weights' has {len(weights)} values for {len(experts)} experts")
    prefill = obj.get("prefill")
    if prefill is not None and not isinstance(prefill, bool):
        raise TraceError(f"{where}: 'prefill' must be true or false, got {_short(prefill)}")
    return TraceEvent(
        seq=_int(obj["seq"], "seq", where),
        token=_int(obj["token"], "token", where),
        layer=_int(obj["layer"], "layer", where),
        experts=experts,
        weights=None if weights is None else tuple(weights),
        logits=_row(obj.get("logits"), "'logits'", where),
        next_logits=_row(obj.get("next_logits"), "'next_logits'", where),
        prefill=prefill,
        predictions=_predictions(obj.get("predictions"), where),
    )


def parse_chain(obj: Any, rules: RowRules, where: str) -> Chain:
    """A chain line's object, checked against the header's `rules`."""
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: a chain must be a JSON object, got {type(obj).__name__}")
    head, draft, verify = obj.get("chain"), obj.get("draft"), obj.get("verify")
    if not isinstance(head, dict) or not isinstance(draft, list) or not isinstance(verify, list):
        raise TraceError(
            f"{where}: a chain line is {{'chain': {{seq, position, accepted}}, 'draft': [...], 'verify': [...]}}"
        )
    chain = Chain(
        seq=_int(head.get("seq"), "seq", where),
        position=_int(head.get("position"), "position", where),
        accepted=_int(head.get("accepted"), "accepted", where),
        draft=tuple(_event(e, where) for e in draft),
        verify=tuple(_event(e, where) for e in verify),
    )
    problem = chain.problem(rules)
    if problem is not None:
        raise TraceError(f"{where}: {problem}")
    return chain


def _parse(raw: bytes, where: str) -> Any:
    """One line's JSON value; anything a hostile line can make the parser raise is one `TraceError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TraceError(f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise TraceError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise TraceError(f"{where}: not valid JSON (an integer too long: {str(exc).split(';')[0]})") from None


def read_jsonl(
    source: Path, overrides: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[TraceEvent], list[Chain], str]:
    """The header (with `overrides` applied), the events, the chains (a lookahead trace's) and the SHA-256 of a JSON
    Lines trace, read one line at a time: a bad line is a `TraceError` naming it.

    Memory: the events kept plus one line (and the parser's objects for it); the file is never held whole. The
    header is checked as soon as it is read, and every row against it (experts, layers, logit widths).

    A sequence whose prompt is logged as many rows at token 0 (no ``prefill`` flags: the layers start over
    within token 0) is read as its prefill: each round of layers at token 0 is one prompt position, and the
    later tokens follow the last of them.
    """
    meta: dict[str, Any] = with_overrides({}, overrides)
    rules: RowRules | None = None
    events: list[TraceEvent] = []
    chains: list[Chain] = []
    last: dict[int, tuple[bool, int, int]] = {}  # seq -> (seen a decode token, token, layer) of its last line
    restarts: dict[int, int] = {}  # seq -> times its layers started over within an unflagged token 0
    digest = hashlib.sha256()
    with source.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            digest.update(raw)
            where = f"{source}:{number}"
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte order mark
            if not raw.strip():
                continue
            obj = _parse(raw, where)
            if isinstance(obj, dict) and "meta" in obj:
                if events or rules is not None:
                    raise TraceError(f"{where}: a 'meta' header may only be the first line")
                if not isinstance(obj["meta"], dict):
                    raise TraceError(f"{where}: 'meta' must be an object")
                meta = with_overrides(obj["meta"], overrides)
                check_header(meta, where)
                rules = RowRules(meta)
                continue
            if rules is None:  # no header line: what the command line gave
                check_header(meta, str(source))
                rules = RowRules(meta)
            if isinstance(obj, dict) and "chain" in obj:
                chains.append(parse_chain(obj, rules, where))
                continue
            if chains:
                raise TraceError(f"{where}: a routing line after a chain line; chains come last")
            event = _event(obj, where)
            problem = rules.problem(event)
            if problem is not None:
                raise TraceError(f"{where}: {problem}")
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
        raise TraceError(f"{source}: the trace has no routing rows")
    return meta, _prompt_positions(events, restarts) if restarts else events, chains, digest.hexdigest()


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
        for chain in trace.chains:
            out.write(json.dumps(chain.to_json()) + "\n")
