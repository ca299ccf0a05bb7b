"""How far to speculate: K drafted tokens per verify pass, fixed or chosen each step by an amortization model.

The model (`AmortizationGovernor`) weighs the tokens a step is expected to yield against its emulated cost,
for every K in 0..K_max, and picks the best rate:

    tokens(K) = (1 - a^(K+1)) / (1 - a)                       (K + 1 when a = 1)
    cost(K)   = K * c_draft + verify(K + 1) + max(0, L * m * u(K + 1) * t_x - K * c_draft)
    u(n)      = E * (1 - (1 - k / E)^(1 + r * (n - 1)))

a is the running per-draft acceptance (accepted drafts / drafts verification judged: those up to and including
the first rejected, since the ones after it were never tested; older steps weighing less), c_draft the measured
emulated time of one draft pass, verify(n) the compute of a pass over n tokens on the hardware profile
(roofline: dense layers, u(n) experts per MoE layer, the head), L the MoE layers, E and k the experts per layer
and per token, and u(n) the distinct experts n consecutive tokens route to: as many as 1 + r * (n - 1) tokens
choosing independently would (r = 1: they share no more than chance; r = 0: all choose alike), r measured from
the verify passes' requests. m is the measured fraction of requested experts that had to cross the link (misses
and lookahead prefetches), t_x one expert's transfer (latency + bytes / bandwidth). The last term is the link
time the verify pass's experts need that the lookahead could not hide behind the K draft passes. K = 0 is
plain decoding. Once a K has been run its measured cost per step replaces the model's, and the governor starts
with plain steps to measure plain decoding, so a K is chosen only while it measures (or, untried, models)
faster per token; where a K > 0 is best, the next K up is tried once if it has not run (the model's u(n) is an
estimate, and a step is cheap to measure). A K = 0 step teaches it nothing new about drafts, so once plain
decoding measures best it stays with it (Cascade's switch-off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from specmd.cache.clock import PassInfo
from specmd.cache.manager import CacheManager

AUTO = "auto"
DEFAULT_K_MAX = 8
PLAIN_PROBES = 2  # plain steps the governor measures before it models
_SMOOTHING = 0.25  # weight of the newest step in running means
_MEMORY = 0.9  # the acceptance counts decay by this each step that drafts, so the rate follows the text


@dataclass(frozen=True)
class Counters:
    """The target's clock and request counters at one instant (what a verify pass changes)."""

    time_s: float
    draft_s: float  # emulated time the draft has taken
    requests: int
    transferred: int  # requests that needed the link: misses and lookahead prefetches used

    @classmethod
    def of(cls, manager: CacheManager) -> Counters:
        requests = misses = 0
        for counters in manager.stats.layers.values():
            requests += counters.requests
            misses += counters.misses
        spec = manager.stats.speculation
        return cls(manager.time, spec.draft_s, requests, misses + spec.lookahead_used)


@dataclass(frozen=True)
class VerifyOutcome:
    """One speculative step: `k` drafted, `kept` accepted; the target's counters before its draft and after its
    verify pass."""

    k: int
    kept: int
    before: Counters
    after: Counters


class Governor(Protocol):
    """Chooses K for each step and learns from what the step gave."""

    def choose(self, limit: int, context: int) -> int:
        """K for the next step, at most `limit`, with `context` tokens already in the KV cache."""
        ...

    def update(self, outcome: VerifyOutcome) -> None:
        """What the step that was chosen gave."""
        ...


class FixedK:
    """K drafted tokens every step (fewer only where the text ends sooner)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def choose(self, limit: int, context: int) -> int:
        return min(self.k, limit)

    def update(self, outcome: VerifyOutcome) -> None:
        return None


class AmortizationGovernor:
    """K in 0..`k_max` per step from the amortization model of the module docstring, on `target`'s clock."""

    def __init__(self, target: CacheManager, draft: CacheManager, k_max: int = DEFAULT_K_MAX) -> None:
        self.k_max = k_max
        layout = target.layout
        self._target = target
        self._layers = len(layout.moe_layers)
        self._experts = layout.experts_per_layer
        self._top_k = layout.top_k
        self._bytes = layout.expert_bytes[layout.precision]
        link = target.link
        self._transfer_s = 0.0 if link.bytes_per_s is None else link.latency_s + self._bytes / link.bytes_per_s
        self._draft_bytes = draft.layout.expert_bytes[draft.layout.precision]
        self._draft = draft
        self._accepted, self._drafted = 2.8, 4.0  # a prior of 0.7, worth four drafted tokens
        self._sharing = 0.5  # r of the module docstring, before any verify pass measured it
        self._miss: float | None = None
        self._draft_s: float | None = None
        self._cost: dict[int, float] = {}  # K -> measured emulated seconds per step
        self._steps = 0
        self.chosen: list[int] = []

    @property
    def acceptance(self) -> float:
        return self._accepted / self._drafted

    def distinct(self, tokens: int) -> float:
        """Expected distinct experts per MoE layer that `tokens` tokens of one sequence route to."""
        independent = 1.0 + self._sharing * (tokens - 1)
        return self._experts * (1.0 - (1.0 - self._top_k / self._experts) ** independent)

    def expected_tokens(self, k: int) -> float:
        """Tokens a step drafting `k` yields on average: kept drafts plus the model's own next token."""
        a = self.acceptance
        return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)

    def modeled_cost(self, k: int, context: int) -> float:
        """The model's emulated seconds for a step drafting `k` (draft passes, verify compute, unhidden transfers)."""
        draft = k * self._draft_pass_s(context)
        n = k + 1
        needed = self._layers * (self._miss if self._miss is not None else 1.0) * self.distinct(n) * self._transfer_s
        return draft + self._pass_s(self._target, n, context, self._bytes) + max(0.0, needed - draft)

    def cost(self, k: int, context: int) -> float:
        """Measured seconds per step at `k` where it has run, the model's otherwise."""
        measured = self._cost.get(k)
        return measured if measured is not None else self.modeled_cost(k, context)

    def choose(self, limit: int, context: int) -> int:
        top = min(self.k_max, limit)
        if self._steps < PLAIN_PROBES or top <= 0:
            k = 0
        else:
            k = max(range(top + 1), key=lambda k: (self.expected_tokens(k) / self.cost(k, context), -k))
            if k and k < top and k + 1 not in self._cost:
                k += 1  # speculation pays and the next K up has not run: try it once (the model may overprice it)
        self.chosen.append(k)
        return k

    def update(self, outcome: VerifyOutcome) -> None:
        self._steps += 1
        k, before, after = outcome.k, outcome.before, outcome.after
        if k:
            self._accepted = _MEMORY * self._accepted + outcome.kept
            self._drafted = _MEMORY * self._drafted + min(k, outcome.kept + 1)  # the drafts verification judged
        requests = after.requests - before.requests
        if requests:
            self._miss = _blend(self._miss, (after.transferred - before.transferred) / requests)
            distinct = requests / self._layers
            if k and self._top_k < distinct < self._experts:
                independent = math.log(1.0 - distinct / self._experts) / math.log(1.0 - self._top_k / self._experts)
                self._sharing = _blend(self._sharing, min(1.0, max(0.0, (independent - 1.0) / k)))
        spent = after.time_s - before.time_s
        self._cost[k] = _blend(self._cost.get(k), spent)
        if k:
            self._draft_s = _blend(self._draft_s, (after.draft_s - before.draft_s) / k)

    def _draft_pass_s(self, context: int) -> float:
        if self._draft_s is not None:
            return self._draft_s
        return self._pass_s(self._draft, 1, context, self._draft_bytes)

    def _pass_s(self, manager: CacheManager, tokens: int, context: int, nbytes: int) -> float:
        """Compute of one pass over `tokens` new tokens, no transfers (the roofline; 0 with measured compute)."""
        compute = manager.compute
        if compute is None:
            return 0.0
        info = PassInfo.for_sequences([context], [tokens])
        dense = sum(compute.dense_s(layer, info) for layer in range(manager.num_layers))
        experts = self.distinct(tokens)
        per_expert = compute.expert_s(nbytes, max(1, round(tokens * self._top_k / experts)))
        return dense + self._layers * experts * per_expert + compute.head_s(info)


def _blend(old: float | None, new: float) -> float:
    return new if old is None else (1.0 - _SMOOTHING) * old + _SMOOTHING * new


def check_speculative(speculative: object) -> int | None:
    """K_max of an "auto" / "auto:K_max" setting, None for a fixed K >= 0; anything else is a ValueError."""
    if isinstance(speculative, str) and (speculative == AUTO or speculative.startswith(AUTO + ":")):
        text = speculative[len(AUTO) + 1 :] or str(DEFAULT_K_MAX)
        if not (text.isdigit() and int(text) >= 1):
            raise ValueError(f"speculative={speculative!r}: 'auto:K_max' needs a whole number K_max >= 1")
        return int(text)
    if isinstance(speculative, bool) or not isinstance(speculative, int) or speculative < 0:
        raise ValueError(
            f"speculative must be a whole number of drafted tokens K >= 0, 'auto' or 'auto:K_max', got {speculative!r}"
        )
    return None


def make_governor(speculative: int | str, target: CacheManager, draft: Any) -> Governor:
    """The governor `speculative` names (`check_speculative`). A K > 0 or "auto" needs the model's self-draft
    (`draft`, a `SelfDraft`), else it is a ValueError."""
    k_max = check_speculative(speculative)
    if (k_max is not None or speculative) and draft is None:
        raise ValueError(
            "speculative decoding needs a self-draft: load the model with draft_frac=... or draft_bytes=... "
            "(and draft_precision=..., default int4)"
        )
    if k_max is None:
        return FixedK(speculative)  # type: ignore[arg-type]
    return AmortizationGovernor(target, draft.manager, k_max)
