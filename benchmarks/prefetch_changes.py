"""What each of the prefetch rules changes, measured by switching it off in turn on one trace.

The rules (issue 19, item 3): a prefetch evicts only experts of layers the pass has computed ("left only");
queued prefetches start while the next layer's attention computes ("link works during attention"); score
prefetch takes at most 2 x top-k experts per token ("score cap"). Each row replays the same trace with all
rules on ("all rules") or one switched off. Switching a rule off patches the engine for this process only,
so this script runs the pure-Python engine.

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
def left_only_off() -> Iterator[None]:
    make_room = ExpertCache.make_room
    ExpertCache.make_room = lambda self, nbytes, now, through_layer=ANY_LAYER: make_room(self, nbytes, now)  # type: ignore[method-assign]
    try:
        yield
    finally:
        ExpertCache.make_room = make_room  # type: ignore[method-assign]


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
    ("left only: off", left_only_off, ""),
    ("link during attention: off", attention_pump_off, ""),
    ("score cap: off", nothing_off, ":cap=1000"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--shape-from", help="price the trace as this model's (e.g. olmoe-1b-7b)")
    parser.add_argument("--hardware", default="a100")
    parser.add_argument("--bandwidth-gbps", default="profile", help="GB/s, or 'profile' (default)")
    parser.add_argument("--cache-frac", type=float, nargs="+", default=[0.05, 0.25])
    args = parser.parse_args()
    if is_compiled():
        raise SystemExit("this script switches rules off by patching the engine: run it on the pure-Python build")
    trace = load_trace(args.trace)
    price_as = expert_layout(load_config(args.shape_from)) if args.shape_from else None
    link = args.bandwidth_gbps if args.bandwidth_gbps == "profile" else float(args.bandwidth_gbps)
    print(f"{args.trace}: {trace.num_requests:,} requests; {args.hardware}, link {link}, priced as {args.shape_from}")
    print(f"{'variant':28}{'mix':24}{'cache':>6}{'hits':>8}{'+late':>8}{'collide':>9}{'stall s':>9}{'tok/s':>8}")
    for label, off, score_params in VARIANTS:
        for mix in ("topk/lru", "topk/least-stale", f"score{score_params}/lru", f"score{score_params}/least-stale"):
            for frac in args.cache_frac:
                with off():
                    stats = replay(trace, policy=f"{mix}/fetch/standard", cache_frac=frac, bandwidth_gbps=link,
                                   hardware=args.hardware, price_as=price_as)  # fmt: skip
                print(f"{label:28}{mix.replace(':cap=1000', ''):24}{frac:>6.0%}{stats.hit_rate:>8.1%}"
                      f"{stats.hit_rate_with_late:>8.1%}{stats.collision_rate:>9.2%}{stats.stall_s:>9.2f}"
                      f"{stats.tokens_per_s:>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
