"""The four kinds of cache policy and the few calls the engine makes on each.

Policies see expert keys, sizes, layer positions, routing scores and the clock, never tensors, so the
same objects run live inside a model and in trace replay.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from specmd.cache.keys import ExpertKey, Tick


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


class EvictionPolicy(ABC):
    """Decides which resident expert leaves the cache when room is needed."""

    @abstractmethod
    def on_access(self, key: ExpertKey, now: Tick) -> None:
        """`key`, already resident, was requested."""

    @abstractmethod
    def on_insert(self, key: ExpertKey, now: Tick) -> None:
        """`key` entered the cache (demand fetch, prefetch or warm-up)."""

    @abstractmethod
    def choose_victim(self, candidates: Candidates, now: Tick) -> ExpertKey:
        """Return a key from `candidates` to evict, and forget it: the engine evicts it at once."""


class RoutePrediction(NamedTuple):
    """A layer's routing as predicted one or more layers ahead.

    ``logits[t][e]`` is the predicted router logit of expert ``e`` of ``layer`` for real token ``t``;
    ``top_k`` is how many experts the model routes each token to.
    """

    layer: int
    top_k: int
    logits: Sequence[Sequence[float]]


class PrefetchPolicy(ABC):
    """Chooses experts to load before their layer asks for them."""

    needs_logits: bool = True
    """Whether the engine must compute predicted router logits for `on_route` (a cost per layer)."""

    @abstractmethod
    def on_route(self, route: RoutePrediction, now: Tick) -> Sequence[int]:
        """Experts of `route.layer` to prefetch, most wanted first."""


@dataclass(frozen=True)
class Fetch:
    """Miss action: load the expert at `precision` and wait for it."""

    precision: str


MissAction = Fetch


class MissPolicy(ABC):
    """Decides what a miss costs: which copy to fetch, or what to do instead."""

    @abstractmethod
    def on_miss(self, key: ExpertKey, now: Tick) -> MissAction:
        """The action for a request of `key` that is not resident."""


class RoutingPolicy(ABC):  # noqa: B024 - a kind of policy; routing that changes choices brings its methods
    """May steer the router toward resident experts; the standard policy leaves routing untouched."""

    neutral: bool = False
    """True when the policy never changes which experts the native router picks."""
