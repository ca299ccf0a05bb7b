"""Reading and writing traces by file suffix, and the checks every loaded trace passes."""

from __future__ import annotations

import os
from pathlib import Path

from specmd.cache.sizes import parse_size
from specmd.sim.trace.events import Trace, TraceError
from specmd.sim.trace.jsonl import read_jsonl, write_jsonl
from specmd.sim.trace.npz import read_npz, write_npz

SUFFIXES = (".jsonl", ".npz")


def load_trace(
    path: str | os.PathLike[str],
    *,
    experts_per_layer: int | None = None,
    expert_bytes: int | str | None = None,
    top_k: int | None = None,
) -> Trace:
    """Read a trace (.jsonl or .npz); keyword values fill in or override the header's.

    `expert_bytes` (a count, or a size such as "12.6MB") prices every expert as that many bytes: it replaces the
    header's sizes at every precision, full precision included (a cache fraction then counts experts of that size).

    Everything is checked here, not during a replay: the header and the keyword values (types, ranges,
    bounds), and every row against them. A problem is one `TraceError` naming the file and the line, row or
    field. A JSON Lines file is read a line at a time (memory: the events kept plus one line).
    """
    source = Path(path)
    if not source.is_file():
        raise TraceError(f"trace file {source} does not exist")
    if source.suffix not in SUFFIXES:
        raise TraceError(f"cannot read {source}: a trace is a {' or '.join(SUFFIXES)} file")
    if expert_bytes is not None:
        try:
            expert_bytes = parse_size(expert_bytes, "expert_bytes")
        except ValueError as error:
            raise TraceError(f"{source}: {error}") from None
    overrides = {"experts_per_layer": experts_per_layer, "top_k": top_k, "expert_bytes": expert_bytes}
    read = read_jsonl if source.suffix == ".jsonl" else read_npz
    meta, events, chains, sha256 = read(source, overrides)
    trace = Trace(meta, events, sha256, str(source), chains)
    if chains:
        trace._check_rows()  # each chain sits at a decode token of its sequence
    trace._checked_meta = dict(meta)
    if all(meta.get(name) is not None for name in ("experts_per_layer", "expert_bytes")):
        trace.layout  # noqa: B018 - the layout the rows imply (MoE layers, top-k) is checked now, not in a replay
    return trace


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
