"""The compact binary trace form (.npz): the JSON Lines content as flat numpy arrays, for fast loading.

Arrays: ``meta`` (the header as JSON); per event ``seq``, ``token``, ``layer``, ``prefill`` (-1 unknown, 0, 1)
and ``offsets`` into ``experts`` (and ``weights`` when every event has them); ``logits`` / ``next_logits``
as float32 matrices with a ``has_*`` mask; other predictors' ``predictions`` as ``pred_offsets`` per event
into ``pred_passes_ahead``, ``pred_layer`` and the ``pred_logits`` matrix; a lookahead trace's ``chains`` as
their JSON Lines objects in one JSON list (text; they are a small part of such a trace).

Reading opens only these members (never pickles, never another member, however large), checks each one's
dtype, dimensions and length from its ``.npy`` header before reading any data, then the values: experts
within the header's ``experts_per_layer``, layers among its ``moe_layers``, finite weights and logits, each
sequence's rows in order without repeats. Anything wrong is one `TraceError` naming the file and the array.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
from specmd.sim.trace.jsonl import parse_chain


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
    if trace.chains:
        arrays["chains"] = np.array(json.dumps([chain.to_json() for chain in trace.chains]))
    with target.open("wb") as out:
        np.savez_compressed(out, **arrays)


def _rows(matrix: np.ndarray) -> list[array]:
    values = matrix.astype(np.float64)
    return [array("d", values[i].tobytes()) for i in range(len(values))]


# The members a trace may hold: (dtype kinds, dimensions). Any other member is never read.
_MEMBERS: dict[str, tuple[str, int]] = {
    "meta": ("U", 0),
    "seq": ("iu", 1),
    "token": ("iu", 1),
    "layer": ("iu", 1),
    "prefill": ("iu", 1),
    "offsets": ("iu", 1),
    "experts": ("iu", 1),
    "weights": ("f", 1),
    "logits": ("f", 2),
    "has_logits": ("b", 1),
    "next_logits": ("f", 2),
    "has_next_logits": ("b", 1),
    "pred_offsets": ("iu", 1),
    "pred_passes_ahead": ("iu", 1),
    "pred_layer": ("iu", 1),
    "pred_logits": ("f", 2),
    "chains": ("U", 0),
}
_KINDS = {"iu": "integers", "f": "floats", "b": "booleans", "U": "the header as JSON text"}
_REQUIRED = ("meta", "seq", "token", "layer", "prefill", "offsets", "experts")
_TOGETHER = (
    ("logits", "has_logits"),
    ("next_logits", "has_next_logits"),
    ("pred_offsets", "pred_passes_ahead", "pred_layer", "pred_logits"),
)
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


class _Npz:
    """The known members of an open .npz: their shapes from the .npy headers, their data read on demand."""

    def __init__(self, npz: Any, source: Path) -> None:
        self.source = source
        self._npz = npz
        stored = set(npz.zip.namelist())
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, (kinds, ndim) in _MEMBERS.items():
            member = name + ".npy" if name + ".npy" in stored else name
            if member not in stored:
                continue
            with npz.zip.open(member) as fp:
                version = np.lib.format.read_magic(fp)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
                else:
                    raise ValueError(f"array {name!r} is in .npy format version {version}, which specmd does not read")
            if dtype.kind not in kinds:
                self.fail(f"{name!r} must hold {_KINDS[kinds]}, not {dtype}")
            if len(shape) != ndim:
                self.fail(f"{name!r} must be {ndim}-dimensional, not shape {shape}")
            self.shapes[name] = shape

    def fail(self, message: str) -> None:
        raise TraceError(f"{self.source}: {message}")

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def rows(self, name: str) -> int:
        return self.shapes[name][0]

    def read(self, name: str) -> np.ndarray:
        try:
            values = self._npz[name]
        except _UNREADABLE as exc:
            raise TraceError(f"{self.source}: array {name!r} is not readable ({exc})") from None
        if values.dtype.kind == "u" and values.size and values.max() >= INT_LIMIT:
            self.fail(f"{name!r} holds {values.max()}, beyond the integers a trace holds (2**63)")
        return values.astype(np.int64, copy=False) if values.dtype.kind in "iu" else values


def _check_shapes(npz: _Npz) -> int:
    """The number of rows; every known member's length agrees with it (nothing read yet)."""
    missing = [name for name in _REQUIRED if name not in npz]
    if missing:
        npz.fail(f"missing arrays {missing}")
    for group in _TOGETHER:
        for name in group:
            absent = [other for other in group if other not in npz]
            if name in npz and absent:
                npz.fail(f"{name!r} comes without {absent[0]!r}")
    rows = npz.rows("seq")
    for name in ("token", "layer", "prefill", "logits", "has_logits", "next_logits", "has_next_logits"):
        if name in npz and npz.rows(name) != rows:
            npz.fail(f"{name!r} has {npz.rows(name)} rows, but 'seq' has {rows}")
    for name in ("offsets", "pred_offsets"):
        if name in npz and npz.rows(name) != rows + 1:
            npz.fail(f"{name!r} has {npz.rows(name)} values; {rows} rows need {rows + 1}")
    if "pred_offsets" in npz:
        predictions = npz.rows("pred_passes_ahead")
        for name in ("pred_layer", "pred_logits"):
            if npz.rows(name) != predictions:
                npz.fail(f"{name!r} has {npz.rows(name)} rows, but 'pred_passes_ahead' has {predictions}")
    if not rows:
        npz.fail("the trace has no routing rows")
    return rows


def _meta(npz: _Npz) -> dict[str, Any]:
    text = str(npz.read("meta"))
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:80]
        raise TraceError(f"{npz.source}: 'meta' is not valid JSON ({reason})") from None
    if not isinstance(meta, dict):
        npz.fail(f"'meta' must be a JSON object (the header), got {type(meta).__name__}")
    return meta


def _check_offsets(npz: _Npz, name: str, offsets: np.ndarray, total: int, least: int) -> None:
    steps = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != total or (steps.size and steps.min() < least):
        npz.fail(f"{name!r} must rise from 0 to {total}, by at least {least} a row")


def _check_at_least_0(npz: _Npz, name: str, values: np.ndarray) -> None:
    if values.size and values.min() < 0:
        at = int(np.argmax(values < 0))
        npz.fail(f"{name!r} holds {values[at]} at row {at}; rows hold integers >= 0")


def _check_layers(npz: _Npz, name: str, layers: np.ndarray, meta: Mapping[str, Any]) -> None:
    declared, num_layers = meta.get("moe_layers"), meta.get("num_layers")
    if declared is not None:
        bad = ~np.isin(layers, np.asarray(declared, dtype=np.int64))
        allowed = f"not one of the header's moe_layers {list(declared)}"
    elif num_layers is not None:
        bad = layers >= num_layers
        allowed = f"not below the header's num_layers={num_layers}"
    else:
        return
    if bad.any():
        at = int(np.argmax(bad))
        if name == "layer":
            npz.fail(f"row {at}: layer {layers[at]} is {allowed}")
        npz.fail(f"{name!r} holds {layers[at]} at prediction {at}, {allowed}")


def _check_logits(npz: _Npz, name: str, matrix: np.ndarray, present: np.ndarray | None, width: int | None) -> int:
    """The width of `matrix`'s rows, checked against `width` (the header's, or other matrices'); its present
    rows finite."""
    if width is not None and matrix.shape[1] != width:
        npz.fail(f"{name!r} rows have {matrix.shape[1]} values, but layers have {width} experts")
    finite = np.isfinite(matrix).all(axis=1)
    bad = ~finite if present is None else present & ~finite
    if bad.any():
        npz.fail(f"{name!r} row {int(np.argmax(bad))} must be finite numbers")
    return int(matrix.shape[1])


def _check_order(npz: _Npz, seq: np.ndarray, token: np.ndarray, layer: np.ndarray, prefill: np.ndarray) -> None:
    """Per sequence, rows in order (prefill first, then by token, then by layer), none twice."""
    order = np.argsort(seq, kind="stable")
    keys = [(prefill != 1)[order].astype(np.int64), token[order], layer[order]]
    later = np.zeros(len(order) - 1, dtype=bool)
    same = np.ones(len(order) - 1, dtype=bool)
    for key in keys:
        step = key[1:] - key[:-1]
        later |= same & (step > 0)
        same &= step == 0
    bad = (seq[order][1:] == seq[order][:-1]) & ~later
    if bad.any():
        at = int(order[int(np.argmax(bad)) + 1])
        npz.fail(
            f"row {at} (sequence {seq[at]}, token {token[at]}, layer {layer[at]}) goes back or repeats; a "
            "sequence's rows must come in order"
        )


def read_npz(
    source: Path, overrides: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[TraceEvent], list[Chain], str]:
    """The header (with `overrides` applied), the events, the chains and the SHA-256 of a compact binary trace."""
    try:
        with source.open("rb") as raw:
            sha256 = hashlib.file_digest(raw, "sha256").hexdigest()
        loaded = np.load(source, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with loaded as npz:
            meta, events, chains = _read(_Npz(npz, source), overrides)
            return meta, events, chains, sha256
    except TraceError:
        raise
    except _UNREADABLE as exc:
        raise TraceError(f"{source}: not a readable .npz trace ({exc})") from None


def _chains(npz: _Npz, meta: Mapping[str, Any]) -> list[Chain]:
    if "chains" not in npz:
        return []
    try:
        objects = json.loads(str(npz.read("chains")))
    except (ValueError, RecursionError):
        npz.fail("'chains' is not valid JSON")
    if not isinstance(objects, list):
        npz.fail("'chains' must be a JSON list of chain objects")
    rules = RowRules(meta)
    return [parse_chain(obj, rules, f"{npz.source}: chain {i}") for i, obj in enumerate(objects)]


def _read(npz: _Npz, overrides: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[TraceEvent], list[Chain]]:
    count = _check_shapes(npz)
    meta = with_overrides(_meta(npz), overrides)
    check_header(meta, str(npz.source))
    seq, token, layer, prefill = (npz.read(name) for name in ("seq", "token", "layer", "prefill"))
    for name, values in (("seq", seq), ("token", token), ("layer", layer)):
        _check_at_least_0(npz, name, values)
    if ((prefill < -1) | (prefill > 1)).any():
        at = int(np.argmax((prefill < -1) | (prefill > 1)))
        npz.fail(f"'prefill' holds {prefill[at]} at row {at}; it is -1, 0 or 1")
    _check_layers(npz, "layer", layer, meta)
    offsets, experts = npz.read("offsets"), npz.read("experts")
    _check_offsets(npz, "offsets", offsets, len(experts), 1)
    row_of = np.repeat(np.arange(count), np.diff(offsets))
    if experts.size and experts.min() < 0:
        at = int(np.argmax(experts < 0))
        npz.fail(f"'experts' holds {experts[at]} at row {row_of[at]}; experts are >= 0")
    width: int | None = meta.get("experts_per_layer")
    matrices: dict[str, list[array | None]] = {}
    for name in ("logits", "next_logits"):
        if name in npz:
            present = npz.read(f"has_{name}")
            matrix = npz.read(name)
            width = _check_logits(npz, name, matrix, present, width)
            rows = zip(_rows(matrix), present.tolist(), strict=True)
            matrices[name] = [row if there else None for row, there in rows]
    predicted: list[tuple[Prediction, ...] | None] = [None] * count
    if "pred_offsets" in npz:
        bounds, ahead, targets = npz.read("pred_offsets"), npz.read("pred_passes_ahead"), npz.read("pred_layer")
        _check_offsets(npz, "pred_offsets", bounds, len(ahead), 0)
        _check_at_least_0(npz, "pred_passes_ahead", ahead)
        _check_at_least_0(npz, "pred_layer", targets)
        _check_layers(npz, "pred_layer", targets, meta)
        pred_logits = npz.read("pred_logits")
        width = _check_logits(npz, "pred_logits", pred_logits, None, width)
        table = list(zip(ahead.tolist(), targets.tolist(), _rows(pred_logits), strict=True))
        limits = bounds.tolist()
        predicted = [tuple(table[limits[i] : limits[i + 1]]) or None for i in range(count)]
    limit = width or MAX_EXPERTS_PER_LAYER
    if (experts >= limit).any():
        at = int(np.argmax(experts >= limit))
        if width is None:
            npz.fail(f"'experts' holds {experts[at]} at row {row_of[at]}, beyond {MAX_EXPERTS_PER_LAYER} experts")
        whose = "layers have" if meta.get("experts_per_layer") is not None else "its logits cover"
        npz.fail(f"row {row_of[at]} routes to expert {experts[at]}, but {whose} {limit} experts")
    keys = np.sort(row_of * limit + experts)
    if (keys[1:] == keys[:-1]).any():
        npz.fail(f"row {keys[int(np.argmax(keys[1:] == keys[:-1]))] // limit} lists an expert twice")
    weights = None
    if "weights" in npz:
        values = npz.read("weights")
        if len(values) != len(experts):
            npz.fail(f"'weights' has {len(values)} values for {len(experts)} experts")
        if not np.isfinite(values).all():
            npz.fail(f"'weights' must be finite numbers (row {row_of[int(np.argmax(~np.isfinite(values)))]})")
        weights = values.tolist()
    _check_order(npz, seq, token, layer, prefill)
    expert_list, bounds_list = experts.tolist(), offsets.tolist()
    logits = matrices.get("logits") or [None] * count
    next_logits = matrices.get("next_logits") or [None] * count
    events = []
    columns = zip(seq.tolist(), token.tolist(), layer.tolist(), prefill.tolist(), strict=True)
    for i, (s, t, lay, p) in enumerate(columns):
        start, end = bounds_list[i], bounds_list[i + 1]
        events.append(
            TraceEvent(
                seq=s,
                token=t,
                layer=lay,
                experts=tuple(expert_list[start:end]),
                weights=None if weights is None else tuple(weights[start:end]),
                logits=logits[i],
                next_logits=next_logits[i],
                prefill=None if p < 0 else bool(p),
                predictions=predicted[i],
            )
        )
    return meta, events, _chains(npz, meta)
