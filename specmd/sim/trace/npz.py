"""The compact binary trace form (.npz): the JSON Lines content as flat numpy arrays, for fast loading.

Arrays: ``meta`` (the header as JSON); per event ``seq``, ``token``, ``layer``, ``prefill`` (-1 unknown, 0, 1)
and ``offsets`` into ``experts`` (and ``weights`` when every event has them); ``logits`` / ``next_logits``
as float32 matrices with a ``has_*`` mask; other predictors' ``predictions`` as ``pred_offsets`` per event
into ``pred_passes_ahead``, ``pred_layer`` and the ``pred_logits`` matrix.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from specmd.sim.trace.events import Prediction, Trace, TraceError, TraceEvent


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


def _offsets(counts: Sequence[int]) -> np.ndarray:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    return offsets


def write_npz(trace: Trace, target: Path) -> None:
    """Write `trace` in the compact binary form."""
    events = trace.events
    arrays: dict[str, np.ndarray] = {
        "meta": np.array(json.dumps(trace.header())),
        "seq": np.array([e.seq for e in events], dtype=np.int64),
        "token": np.array([e.token for e in events], dtype=np.int64),
        "layer": np.array([e.layer for e in events], dtype=np.int64),
        "prefill": np.array([-1 if e.prefill is None else int(e.prefill) for e in events], dtype=np.int8),
        "offsets": _offsets([len(e.experts) for e in events]),
        "experts": np.array([x for e in events for x in e.experts], dtype=np.int64),
    }
    if all(e.weights is not None for e in events):
        arrays["weights"] = np.array([w for e in events for w in e.weights], dtype=np.float32)  # type: ignore[union-attr]
    for name in ("logits", "next_logits"):
        packed = _matrix([getattr(e, name) for e in events])
        if packed is not None:
            arrays[name], arrays[f"has_{name}"] = packed
    predictions = [p for e in events for p in e.predictions or ()]
    if predictions:
        arrays["pred_offsets"] = _offsets([len(e.predictions or ()) for e in events])
        arrays["pred_passes_ahead"] = np.array([ahead for ahead, _, _ in predictions], dtype=np.int64)
        arrays["pred_layer"] = np.array([layer for _, layer, _ in predictions], dtype=np.int64)
        arrays["pred_logits"] = _matrix([row for _, _, row in predictions])[0]  # type: ignore[index]
    with target.open("wb") as out:
        np.savez_compressed(out, **arrays)


def _rows(matrix: np.ndarray) -> list[array]:
    values = matrix.astype(np.float64)
    return [array("d", values[i].tobytes()) for i in range(len(values))]


def read_npz(source: Path) -> tuple[dict[str, Any], list[TraceEvent]]:
    """The header and events of a compact binary trace."""
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
    count = len(offsets) - 1

    def rows(name: str) -> list[array | None]:
        if name not in data:
            return [None] * count
        present = data[f"has_{name}"].tolist()
        return [row if there else None for row, there in zip(_rows(data[name]), present, strict=True)]

    logits, next_logits = rows("logits"), rows("next_logits")
    predicted: list[tuple[Prediction, ...] | None] = [None] * count
    if "pred_offsets" in data:
        bounds = data["pred_offsets"].tolist()
        ahead, layers = data["pred_passes_ahead"].tolist(), data["pred_layer"].tolist()
        rows = _rows(data["pred_logits"])
        table = list(zip(ahead, layers, rows, strict=True))
        predicted = [tuple(table[bounds[i] : bounds[i + 1]]) or None for i in range(count)]
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
                predictions=predicted[i],
            )
        )
    return meta, events
