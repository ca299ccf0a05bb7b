"""The four kinds of cache policy and the few calls the engine makes on each.

Policies see expert keys, sizes, layer positions, routing scores and the clock, never tensors, so the
same objects run live inside a model and in trace replay.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

from mypy_extensions import mypyc_attr

from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.layout import ExpertLayout


# ---- parameter checks: every constructor refuses a bad value with one ValueError naming it -------------------
# Constructors type their parameters `object` and convert them here, so a wrong value is the same ValueError in a
# compiled build (mypyc would turn a bool into a number, and refuse a string with a bare TypeError) and not.
def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


def _allowed(low: float | None, high: float | None, low_open: bool) -> str:
    if low is None:
        return "" if high is None else f" <= {_bound(high)}"
    if high is None:
        return f" {'>' if low_open else '>='} {_bound(low)}"
    return f" in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}]"


def _within(value: float, low: float | None, high: float | None, low_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    return above and (high is None or value <= high)


def number_param(
    policy: str, name: str, value: object, low: float | None, high: float | None = None, *, low_open: bool = False
) -> float:
    """`value` as a float when it is a finite number (never a bool) with `low` <= value <= `high` (`low` < value
    with `low_open`; None: no bound on that side), else a ValueError naming the policy, the parameter, the value
    and the allowed range."""
    number = math.nan
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() <= 1000:  # an int must fit a float (one of 10**400 does not)
            number = float(value)
    elif isinstance(value, float):
        number = value
    if not (math.isfinite(number) and _within(number, low, high, low_open)):
        raise ValueError(f"{policy} {name} must be a finite number{_allowed(low, high, low_open)}, got {value!r}")
    return number


def int_param(policy: str, name: str, value: object, low: int, high: int) -> int:
    """`value` when it is an integer (never a bool or a float) with `low` <= value <= `high`, else a ValueError
    naming the policy, the parameter, the value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{policy} {name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def numbers_param(
    policy: str, name: str, value: object, low: float | None, high: float | None = None, *, low_open: bool = False
) -> tuple[float, ...]:
    """A non-empty list or tuple of numbers each as `number_param` takes them (a lone number is a list of one)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        items: list[object] = [value]
    elif isinstance(value, list | tuple) and value:
        items = list(value)
    else:
        raise ValueError(f"{policy} {name} must be a number or a non-empty list of numbers, got {value!r}")
    return tuple(number_param(policy, name, item, low, high, low_open=low_open) for item in items)


def names_param(policy: str, name: str, value: object) -> tuple[str, ...]:
    """A non-empty list or tuple of non-empty names (a lone name is a list of one, never its characters)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items or not all(isinstance(v, str) and v for v in items):
        raise ValueError(f"{policy} {name} must be a name or a non-empty list of names, got {value!r}")
    return tuple(str(item) for item in items)


class Clairvoyant(Protocol):
    """A policy that can only run in trace replay, where the future is known."""

    needs_future: bool

    def bind_future(self, future: Future) -> None: ...


class Candidates(Protocol):
    """The experts an eviction policy may evict right now: resident, unpinned and not in flight."""

    def __contains__(self, key: object) -> bool: ...

    def __iter__(self) -> Iterator[ExpertKey]: ...


@dataclass(frozen=True)
class Future:
    """What a trace replay knows ahead of time, for the bounds (Belady eviction, oracle prefetch).

    ``uses[(layer, expert)]`` lists the logical steps (`Tick.step`) that request the expert, ascending;
    ``requests[(pass_idx, layer)]`` maps each expert a layer requests in a pass to its token count.
    """

    uses: dict[tuple[int, int], list[int]]
    requests: dict[tuple[int, int], dict[int, int]]


class Routed(NamedTuple):
    """How a layer's real tokens chose one expert in one pass."""

    tokens: int
    """Tokens routed to it."""
    weight: float
    """The sum of their routing weights."""
    rank: int
    """Its best position in any of those tokens' top-k (0 = a first choice)."""


@mypyc_attr(allow_interpreted_subclasses=True)
class EvictionPolicy(ABC):
    """Decides which resident expert leaves the cache when room is needed."""

    needs_routing: bool = False
    """Whether the engine must call `observe` with each layer's routing before serving it."""

    def observe(self, layer: int, routing: Mapping[int, Routed], now: Tick) -> None:  # noqa: B027 - optional hook
        """How `layer`'s requests of this pass were routed (only called when `needs_routing`)."""

    def bind_layout(self, layout: ExpertLayout) -> None:  # noqa: B027 - optional hook
        """The model's expert layout (layers, experts, stored precisions), given once before the first request."""

    @abstractmethod
    def on_access(self, key: ExpertKey, now: Tick) -> None:
        """`key`, already resident, was requested."""

    @abstractmethod
    def on_insert(self, key: ExpertKey, now: Tick) -> None:
        """`key` entered the cache (demand fetch, prefetch or warm-up)."""

    @abstractmethod
    def choose_victim(self, candidates: Candidates, now: Tick) -> ExpertKey:
        """Return a key from `candidates` to evict, and forget it: the engine evicts it at once."""


class RoutePrediction:
    """A layer's routing as predicted ahead of time.

    ``logits[t][e]`` is the predicted router logit of expert ``e`` of ``layer`` for predicting token ``t``;
    ``top_k`` is how many experts the model routes each token to; ``passes_ahead`` says which pass the
    prediction is for (0: the ongoing one, 1: the next token's, ...).
    """

    __slots__ = ("layer", "logits", "passes_ahead", "top_k")

    def __init__(self, layer: int, top_k: int, logits: Sequence[Sequence[float]], passes_ahead: int = 0) -> None:
        self.layer = layer
        self.top_k = top_k
        self.logits = logits
        self.passes_ahead = passes_ahead

    def __repr__(self) -> str:
        return (
            f"RoutePrediction(layer={self.layer}, top_k={self.top_k}, tokens={len(self.logits)}, "
            f"passes_ahead={self.passes_ahead})"
        )


@mypyc_attr(allow_interpreted_subclasses=True)
class PrefetchPolicy(ABC):
    """Chooses experts to load before their layer asks for them."""

    needs_logits: bool = True
    """Whether the engine must compute predicted router logits for `on_route` (a cost per layer)."""
    depth: int = 1
    """How many MoE layers ahead it prefetches (each predicted with its own router on this layer's input)."""

    @abstractmethod
    def on_route(self, route: RoutePrediction, now: Tick) -> Sequence[int]:
        """Experts of `route.layer` to prefetch, most wanted first."""


@dataclass(frozen=True)
class Fetch:
    """Miss action: use the expert at `precision`, loading it if that copy is not resident."""

    precision: str


@dataclass(frozen=True)
class Drop:
    """Miss action: skip the expert; its tokens get no contribution from it."""


@dataclass(frozen=True)
class Substitute:
    """Miss action: run the tokens through resident `expert` (same layer, copy at `precision`) instead."""

    expert: int
    precision: str


MissAction = Fetch | Drop | Substitute


class MissContext:
    """What a miss policy may consult about the layer being served.

    Attributes:
        layer: the MoE layer.
        routing: how the layer's tokens chose each requested expert.
        probs: each expert's router probability averaged over the layer's tokens, when known
            (live always; in replay when the trace records logits), else None.
        stored: the stored precisions and the bytes of one expert at each, the requested one first.
        wait_s: emulated seconds until a transfer issued now would start (the link's queue).
        bandwidth_bytes_s: the link's bytes per second (None: transfers take no emulated time).
        latency_s: the link's fixed cost per transfer.
        resident: (a property) keys of this layer resident and ready now, at any precision.
    """

    def __init__(
        self,
        layer: int,
        routing: Mapping[int, Routed],
        probs: Mapping[int, float] | None,
        stored: Mapping[str, int],
        wait_s: float,
        bandwidth_bytes_s: float | None,
        latency_s: float,
        find_resident: Callable[[], Sequence[ExpertKey]],
    ) -> None:
        self.layer = layer
        self.routing = routing
        self.probs = probs
        self.stored = stored
        self.wait_s = wait_s
        self.bandwidth_bytes_s = bandwidth_bytes_s
        self.latency_s = latency_s
        self.find_resident = find_resident
        self._resident: Sequence[ExpertKey] | None = None

    @property
    def resident(self) -> Sequence[ExpertKey]:
        """Keys of this layer resident and ready now, at any precision (looked up on first use)."""
        if self._resident is None:
            self._resident = self.find_resident()
        return self._resident

    def transfer_s(self, nbytes: int) -> float:
        """Emulated seconds a transfer of `nbytes` issued now would take to land."""
        if self.bandwidth_bytes_s is None:
            return 0.0
        return self.wait_s + self.latency_s + nbytes / self.bandwidth_bytes_s


@mypyc_attr(allow_interpreted_subclasses=True)
class MissPolicy(ABC):
    """Decides what a miss costs: which copy to fetch, or what to do instead."""

    needs_routing: bool = False
    """Whether the policy reads `MissContext.routing` weights and ranks (live runs then compute them)."""
    needs_probs: bool = False
    """Whether the policy reads `MissContext.probs` (live runs then compute them)."""
    precision_params: ClassVar[tuple[str, ...]] = ()
    """Constructor parameters that name precisions: a policy spec resolves their aliases (int4 -> nf4)."""

    @abstractmethod
    def on_miss(self, key: ExpertKey, now: Tick, context: MissContext) -> MissAction:
        """The action for a request of `key` (at the requested precision) that is not resident."""


@mypyc_attr(allow_interpreted_subclasses=True)
class RoutingPolicy(ABC):
    """May steer the router toward resident experts; the standard policy leaves routing untouched.

    Dual-logit semantics: the biased logits choose a token's experts; the original logits weigh them.
    """

    neutral: bool = False
    """True when the policy never changes which experts the native router picks."""

    @abstractmethod
    def bias(self, layer: int, resident: Sequence[int], margin: float, now: Tick) -> Mapping[int, float] | None:
        """Logit offsets (expert -> offset) for `layer` given its resident experts, or None for no change.

        `margin` is this pass's mean gap, over the layer's tokens, between the top-1 logit and the
        top-k-th one: the scale on which routing decisions are made.
        """
