"""The names the engine and every policy share: expert keys and the logical clock tick (and how the engine's
frozen dataclasses pickle)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, NamedTuple


class ExpertKey(NamedTuple):
    """One cacheable expert copy: the decoder layer, the expert's index in it, and its stored precision."""

    layer: int
    expert: int
    precision: str


class Tick:
    """What a policy knows of time when the engine calls it (policies read it, never change it).

    ``step`` counts MoE layer-steps since the cache was built (logical time); ``pass_idx`` counts
    forward passes; ``layer`` is the decoder layer being computed (-1 outside a layer); ``time_s``
    is the emulated clock in seconds.
    """

    __slots__ = ("layer", "pass_idx", "step", "time_s")

    def __init__(self, step: int, pass_idx: int, layer: int, time_s: float) -> None:
        self.step = step
        self.pass_idx = pass_idx
        self.layer = layer
        self.time_s = time_s

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tick):
            return NotImplemented
        return (
            self.step == other.step
            and self.pass_idx == other.pass_idx
            and self.layer == other.layer
            and self.time_s == other.time_s
        )

    def __hash__(self) -> int:
        return hash((self.step, self.pass_idx, self.layer, self.time_s))

    def __repr__(self) -> str:
        return f"Tick(step={self.step}, pass_idx={self.pass_idx}, layer={self.layer}, time_s={self.time_s})"


START = Tick(step=0, pass_idx=0, layer=-1, time_s=0.0)


def rebuilt(obj: Any) -> tuple[Any, tuple[Any, ...]]:
    """The `__reduce__` of a frozen dataclass: pickled as its fields and rebuilt by its constructor (a frozen
    dataclass compiled with mypyc cannot be unpickled field by field)."""
    return type(obj), tuple(getattr(obj, f.name) for f in fields(obj))
