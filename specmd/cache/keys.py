"""The names the engine and every policy share: expert keys and the logical clock tick."""

from __future__ import annotations

from typing import NamedTuple


class ExpertKey(NamedTuple):
    """One cacheable expert copy: the decoder layer, the expert's index in it, and its stored precision."""

    layer: int
    expert: int
    precision: str


class Tick(NamedTuple):
    """What a policy knows of time when the engine calls it.

    ``step`` counts MoE layer-steps since the cache was built (logical time); ``pass_idx`` counts
    forward passes; ``layer`` is the decoder layer being computed (-1 outside a layer); ``time_s``
    is the emulated clock in seconds.
    """

    step: int
    pass_idx: int
    layer: int
    time_s: float


START = Tick(step=0, pass_idx=0, layer=-1, time_s=0.0)
