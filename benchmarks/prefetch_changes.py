"""What each of the prefetch rules changes, measured by switching it off in turn on one trace.

The rules (issue 19, item 3): a prefetch evicts only experts of layers the pass has computed and stale
experts of layers after its target, never an unused prefetch nor an expert needed before its target
("all rules"; the variants: "evicts left only", the computed layers alone, and "evicts anything", any
evictable expert); queued prefetches start while the next layer's attention computes ("link during
attention"); score prefetch takes at most 2 x top-k experts per token ("score cap"). Each row replays the
same trace with all rules on or one changed. Changing a rule patches the engine for this process only, so
this script runs the pure-Python engine.

    python benchmarks/prefetch_changes.py TRACE [--shape-from olmoe-1b-7b --hardware a100-paper]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from specmd.cache.engine import ANY_LAYER, ExpertCache
from specmd.cache.manager import CacheManager
from specmd.compiled import is_compiled
from specmd.offload_models.info import expert_layout, load_config
from specmd.sim import load_trace, replay


@contextmanager
def patched_room(bounds: Callable[[int, int], tuple[int, int]]) -> Iterator[None]:
    """Prefetches make room within `bounds(through, beyond)` instead of the engine's."""
    make_room = ExpertCache.make_room

    def bounded(
        self: ExpertCache, nbytes: int, now: object, through: int = ANY_LAYER, beyond: int = ANY_LAYER
    ) -> object:
        return make_room(self, nbytes, now, *bounds(through, beyond))  # type: ignore[arg-type]

    ExpertCache.make_room = bounded  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        ExpertCache.make_room = make_room  # type: ignore[method-assign]


def left_only() -> Iterator[None]:
    return patched_room(lambda through, beyond: (through, ANY_LAYER))  # type: ignore[return-value]


def unprotected() -> Iterator[None]:
    return patched_room(lambda through, beyond: (ANY_LAYER, ANY_LAYER))  # type: ignore[return-value]


@contextmanager
def attention_pump_off() -> Iterator[None]:
    pump = CacheManager._pump

    def only_at_events(self: CacheManager, start_s: float, until_s: float, left: int) -> None:
        if start_s == until_s:  # the events inside a layer; the window over the next layer's attention is skipped
            pump(self, start_s, until_s, left)

    CacheManager._pump = only_at_events  # type: ignore[method-assign]
    try:
        yield
    finally:
        CacheManager._pump = pump  # type: ignore[method-assign]


@contextmanager
def nothing_off() -> Iterator[None]:
    yield


VARIANTS: list[tuple[str, Callable[[], object], str]] = [  # (label, context, score prefetch's parameters)
    ("all rules", nothing_off, ""),
    ("evicts left only", left_only, ""),
    ("evicts anything", unprotected, ""),
    ("link during attention: off", attention_pump_off, ""),
    ("score cap: off", nothing_off, ":cap=1000"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--shape-from", help="price the trace as this model's (e.g. olmoe-1b-7b)")
    parser.add_argument("--hardware", default="a100")
    parser.add_argument("--bandwidth-gbps", default="profile", help="GB/s, 'native' or 'profile' (default)")
    parser.add_argument("--cache-frac", type=float, nargs="+", default=[0.05, 0.25])
    args = parser.parse_args()
    if is_compiled():
        raise SystemExit("this script switches rules off by patching the engine: run it on the pure-Python build")
    trace = load_trace(args.trace)
    price_as = expert_layout(load_config(args.shape_from)) if args.shape_from else None
    links = {"profile": "profile", "native": None}
    link = links[args.bandwidth_gbps] if args.bandwidth_gbps in links else float(args.bandwidth_gbps)
    print(f"{args.trace}: {trace.num_requests:,} requests; {args.hardware}, link {link}, priced as {args.shape_from}")
    print(f"{'variant':28}{'mix':24}{'cache':>6}{'hits':>8}{'+late':>8}{'collide':>9}{'stall s':>9}{'tok/s':>11}")
    for label, off, score_params in VARIANTS:
        for mix in ("topk/lru", "topk/least-stale", f"score{score_params}/lru", f"score{score_params}/least-stale"):
            for frac in args.cache_frac:
                with off():
                    stats = replay(trace, policy=f"{mix}/fetch/standard", cache_frac=frac, bandwidth_gbps=link,
                                   hardware=args.hardware, price_as=price_as)  # fmt: skip
                print(f"{label:28}{mix.replace(':cap=1000', ''):24}{frac:>6.0%}{stats.hit_rate:>8.1%}"
                      f"{stats.hit_rate_with_late:>8.1%}{stats.collision_rate:>9.2%}{stats.stall_s:>9.2f}"
                      f"{stats.tokens_per_s:>11,.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
