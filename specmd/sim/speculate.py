"""Speculative decoding replayed from a lookahead trace, with no model: the self-draft's passes, its expert
lookahead and the verify passes driven through the same engine, `SelfDraft`, governor and counters as a live
`generate(speculative=...)`.

A lookahead trace (`specmd.sim.record(..., lookahead=K)`) holds, at every decode position, the draft's chain of
up to K drafts and the model's verify pass over them (`Chain`). A step at position p drafting k <= K tokens
replays the chain's first k draft passes (each layer's routing also queued as lookahead prefetches for the
target, as live), then one verify pass over the chain's verify rows 0..k; it keeps min(k, accepted) drafts plus
the model's own next token and moves on to the position after them. A step drafting nothing is the position's
plain pass. The governor chooses k from the emulated clock as it does live, so a sweep compares speculation with
plain decoding and next-layer prefetch at any capacity, link and hardware. Greedy decoding only.

Exactness: the chain's rows are those of a pass over K + 1 tokens; a live step drafting k < K computes them in a
pass over k + 1, and its KV cache holds verify passes' entries where the recording's holds plain passes'. Where
the model's batched arithmetic gives each row the same result whatever the batch (fp32 on the CPU: the tests'
models) replay equals live counter for counter; in bf16 a near-tie in a router can flip between the two, and the
replay is close rather than equal (measured in benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from specmd.cache.config import CacheConfig
from specmd.cache.draft import SelfDraft
from specmd.cache.factory import build_manager
from specmd.cache.governor import Counters, VerifyOutcome, check_speculative, make_governor
from specmd.cache.layout import ExpertLayout
from specmd.cache.manager import CacheManager
from specmd.cache.policies.spec import KINDS
from specmd.cache.stats import CacheStats
from specmd.sim.trace.events import Trace, TraceError, TraceEvent
from specmd.sim.trace.passes import LayerStep, build_pass


def check_speculative_replay(trace: Trace, config: CacheConfig, speculative: int | str) -> None:
    """Refuse a speculative replay of `trace` that cannot run: a trace without chains, a K beyond the chains,
    no draft budget, a clairvoyant policy (its future would be the plain trace's, not the steps')."""
    k_max = check_speculative(speculative)
    if not trace.chains:
        raise TraceError(
            f"{trace.source} records no self-draft lookahead; record one with `specmd trace --lookahead K` "
            "(specmd.sim.record(..., lookahead=K)) on a model with a draft"
        )
    wanted = int(speculative) if k_max is None else k_max
    if wanted > trace.lookahead:
        raise ValueError(
            f"speculative={speculative!r} drafts up to {wanted} tokens a step, but {trace.source} records chains of "
            f"at most {trace.lookahead}; use K <= {trace.lookahead} ('auto:{trace.lookahead}' for the governor)"
        )
    if not config.has_draft:
        raise ValueError("a speculative replay needs the self-draft's budget: give draft_frac=... or draft_bytes=...")
    policies = config.policy.build()
    clairvoyant = [kind for kind in KINDS if getattr(getattr(policies, kind), "needs_future", False)]
    if clairvoyant:
        name = getattr(config.policy, clairvoyant[0]).name
        raise ValueError(
            f"{clairvoyant[0]} policy {name!r} reads the future of a plain replay; a speculative replay's passes "
            "depend on the steps the governor takes, so it runs online policies only"
        )


def draft_layout(trace: Trace, price_as: ExpertLayout | None = None) -> ExpertLayout:
    """The layout of the draft's experts the trace's header records (priced as `price_as`'s model when given)."""
    recorded = trace.meta.get("draft")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("precision"), str):
        raise TraceError(f"{trace.source}: the header records no draft (its precision and expert bytes)")
    precision, nbytes = recorded["precision"], recorded.get("expert_bytes")
    if not (isinstance(nbytes, int) and not isinstance(nbytes, bool) and nbytes > 0):
        raise TraceError(f"{trace.source}: the header's draft expert_bytes must be an integer > 0, got {nbytes!r}")
    layout = replace(trace.layout, precision=precision, expert_bytes={precision: nbytes})
    return layout if price_as is None else layout.priced_like(price_as)


def run_speculative(
    trace: Trace,
    config: CacheConfig,
    speculative: int | str,
    target: CacheManager,
    predictor: str,
    price_as: ExpertLayout | None = None,
) -> CacheStats:
    """Replay `trace`'s sequences decoding speculatively (`speculative`: K, "auto" or "auto:K_max") on `target`
    (a fresh manager built for the trace under `config`), with a self-draft of `config`'s draft budget."""
    layout = draft_layout(trace, price_as)
    capacity = config.draft_capacity_bytes(layout)
    draft_config = replace(config, cache_frac=None, cache_bytes=capacity, draft_frac=None, draft_bytes=None)
    draft = SelfDraft(lambda: build_manager(layout, draft_config, wall=lambda: 0.0), None, layout.moe_layers)
    governor = make_governor(speculative, target, draft)
    layers = trace.layout.moe_layers
    chains = {(chain.seq, chain.position): chain for chain in trace.chains}
    for seq, prefill, decode in _sequences(trace):
        if prefill:
            build_pass(seq, prefill, layers, predictor).run(target)
        last = max(decode)
        position = min(decode)
        while position <= last:
            if position not in decode:
                raise TraceError(f"{trace.source}: sequence {seq} has no decode token at position {position}")
            chain = chains.get((seq, position))
            k = governor.choose(chain.length if chain else 0, position)
            before = Counters.of(target)
            if chain is not None and k:
                draft.begin(target)
                for j in range(k):
                    passed = [e for e in chain.draft if e.token == position + j]
                    build_pass(seq, passed, layers, predictor).run(draft.manager, _lookahead(draft, target))
                target.stats.record_draft(draft.end(target), 0.0)
            rows = [e for e in chain.verify if e.token <= position + k] if chain is not None and k else decode[position]
            build_pass(seq, rows, layers, predictor).run(target)
            kept = min(k, chain.accepted) if chain is not None else 0
            new = min(kept + 1, last + 1 - position)  # the text ends at the token after the last position
            target.stats.record_verify(k, new - 1)
            governor.update(VerifyOutcome(k, kept, before, Counters.of(target)))
            position += new
    return draft.stats_of(target)


def _sequences(trace: Trace) -> list[tuple[int, list[TraceEvent], dict[int, list[TraceEvent]]]]:
    """Per sequence in trace order: its prefill events and its decode events by position."""
    by_seq: dict[int, tuple[list[TraceEvent], dict[int, list[TraceEvent]]]] = {}
    for event in trace.events:
        prefill, decode = by_seq.setdefault(event.seq, ([], {}))
        if event.prefill:
            prefill.append(event)
        else:
            decode.setdefault(event.token, []).append(event)
    return [(seq, prefill, decode) for seq, (prefill, decode) in by_seq.items() if decode]


def _lookahead(draft: SelfDraft, target: CacheManager) -> Callable[[LayerStep], None]:
    """After each draft layer: its routing joins the lookahead for the target's verify pass (as live)."""

    def observe(step: LayerStep) -> None:
        experts = [expert for event in step.events for expert in event.experts]
        weights = [weight for event in step.events for weight in event.weights or (0.0,) * len(event.experts)]
        draft.observe(step.layer, experts, weights, target)

    return observe
