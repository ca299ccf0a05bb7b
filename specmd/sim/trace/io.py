"""Reading and writing traces by file suffix, and the checks every loaded trace passes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from specmd.sim.trace.events import Trace, TraceError
from specmd.sim.trace.jsonl import read_jsonl, write_jsonl
from specmd.sim.trace.npz import read_npz, write_npz

SUFFIXES = (".jsonl", ".npz")


def load_trace(
    path: str | os.PathLike[str],
    *,
    experts_per_layer: int | None = None,
    expert_bytes: int | None = None,
    top_k: int | None = None,
) -> Trace:
    """Read a trace (.jsonl or .npz); keyword values fill in or override the header's.

    `expert_bytes` prices every expert as that many bytes: it replaces the header's sizes at every
    precision, full precision included (a cache fraction then counts experts of that size).
    """
    source = Path(path)
    if not source.is_file():
        raise TraceError(f"trace file {source} does not exist")
    if source.suffix not in SUFFIXES:
        raise TraceError(f"cannot read {source}: a trace is a {' or '.join(SUFFIXES)} file")
    data = source.read_bytes()
    meta, events = read_jsonl(source, data) if source.suffix == ".jsonl" else read_npz(source)
    if experts_per_layer is not None:
        meta["experts_per_layer"] = experts_per_layer
    if top_k is not None:
        meta["top_k"] = top_k
    if expert_bytes is not None:
        meta["expert_bytes"] = expert_bytes
        meta.pop("full_expert_bytes", None)
        meta.pop("full_precision", None)
    trace = Trace(meta, events, hashlib.sha256(data).hexdigest(), str(source))
    _validate(trace)
    return trace


def _validate(trace: Trace) -> None:
    """Every event routes to experts and layers the header declares (when it declares them)."""
    experts = trace.meta.get("experts_per_layer")
    if experts is None:
        return
    for event in trace.events:
        if max(event.experts) >= experts:
            raise TraceError(
                f"{trace.source}: sequence {event.seq} token {event.token} layer {event.layer} routes to expert "
                f"{max(event.experts)}, but layers have {experts} experts (experts_per_layer)"
            )


def save_trace(trace: Trace, path: str | os.PathLike[str]) -> Path:
    """Write `trace` as JSON Lines (.jsonl) or the compact binary form (.npz), by the path's suffix."""
    target = Path(path)
    if target.suffix == ".jsonl":
        write_jsonl(trace, target)
    elif target.suffix == ".npz":
        write_npz(trace, target)
    else:
        raise TraceError(f"cannot write a trace to {target}: use a {' or '.join(SUFFIXES)} file")
    return target
