"""Routing traces: the in-memory trace and its replay view, and one reader/writer per file form.

`events` holds the trace and its events, `passes` the forward passes a replay runs, `jsonl` and `npz`
the two file forms, `io` the loading and saving by suffix. Recording from a live model is
`specmd.sim.record`. Nothing here imports torch.
"""

from specmd.sim.trace.events import FORMAT, NEXT_LAYER, VERSION, Chain, Trace, TraceError, TraceEvent
from specmd.sim.trace.io import SUFFIXES, load_trace, save_trace
from specmd.sim.trace.passes import LayerStep, ReplayPass

__all__ = [
    "FORMAT",
    "NEXT_LAYER",
    "SUFFIXES",
    "VERSION",
    "Chain",
    "LayerStep",
    "ReplayPass",
    "Trace",
    "TraceError",
    "TraceEvent",
    "load_trace",
    "save_trace",
]
