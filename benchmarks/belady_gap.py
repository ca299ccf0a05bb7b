"""How much of the gap to Belady each eviction policy closes, per capacity, without and with top-k prefetch.

For each trace (recorded beforehand with `specmd trace`; this script records nothing), replays LRU, LFU,
FLD, Least-Stale, next-use and next-use's frequency estimate alone (`next-use:window=0`) at each
capacity, and prints hit rates and the share of the gap closed:

    closed = (hit(X) - max(hit(LRU), hit(LFU))) / (hit(Belady) - max(hit(LRU), hit(LFU)))

with Belady `none/belady/fetch/standard` (no prefetch: the bound for eviction alone), and X, LRU and LFU
under the same prefetch: none; top-k on an ideal link (transfers take no time); top-k on the a100
profile's 5 GB/s link. A share is "-" where Belady is not above max(LRU, LFU) (top-k prefetch on an
ideal link alone can beat eviction-only Belady). For the prefetch settings a second share is printed
against `topk/belady` on the same link: Belady's rule with the same prefetcher, a clairvoyant reference
(not a proven bound: with prefetch, evicting the farthest next use is not always optimal).

It also prints, per prompt, how strongly the decode routing loops (the best lag and its reuse share), the
regularity next-use's loop estimate exploits.

    python benchmarks/belady_gap.py TRACE [TRACE ...] [--cache-frac 0.05 0.1 0.25 0.5] [--extra EVICTION ...]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from specmd.compiled import is_compiled
from specmd.sim import load_trace, replay
from specmd.sim.trace import Trace

EVICTIONS = ("lru", "lfu", "fld", "least-stale", "next-use", "next-use:window=0")
SETTINGS = (  # (title, prefetch, link in GB/s or None for an ideal link)
    ("no prefetch", "none", None),
    ("top-k prefetch, ideal link", "topk", None),
    ("top-k prefetch, 5 GB/s link (a100)", "topk", 5.0),
)
TARGET_FRACS = (0.1, 0.25, 0.5)
TARGET = 0.30


def closed(hit: float, floor: float, bound: float) -> float | None:
    """The share of the gap from `floor` to `bound` that `hit` closes; None when `bound` is not above `floor`."""
    return (hit - floor) / (bound - floor) if bound > floor else None


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0%}"


def gap_table(trace: Trace, evictions: Sequence[str], fracs: Sequence[float]) -> dict[str, dict[float, float | None]]:
    """Print the tables for one trace; return next-use's share per capacity, per setting and reference."""
    belady = {f: replay(trace, policy="none/belady/fetch/standard", cache_frac=f, bandwidth_gbps=None).hit_rate
              for f in fracs}  # fmt: skip
    shares: dict[str, dict[float, float | None]] = {}
    widths = [max(len(e), 7) + 2 for e in (*evictions, "Belady")]

    def row(first: str, cells: Sequence[str]) -> str:
        return f"{first:>5} " + "".join(f"{cell:>{w}}" for cell, w in zip(cells, widths, strict=False))

    for title, prefetch, link in SETTINGS:
        hits = {
            (e, f): replay(trace, policy=f"{prefetch}/{e}/fetch/standard", cache_frac=f, bandwidth_gbps=link).hit_rate
            for e in evictions
            for f in fracs
        }
        floor = {f: max(hits[("lru", f)], hits[("lfu", f)]) for f in fracs}
        print(f"\n{title}: hit rate, and below it the share of the gap between max(LRU, LFU) and Belady closed")
        print(row("cache", [*evictions, "Belady"]))
        for f in fracs:
            print(row(f"{f:.0%}", [f"{hits[(e, f)]:.1%}" for e in evictions] + [f"{belady[f]:.1%}"]))
            print(row("", [share(closed(hits[(e, f)], floor[f], belady[f])) for e in evictions]))
        shares[f"{title}, against Belady"] = {f: closed(hits[("next-use", f)], floor[f], belady[f]) for f in fracs}
        if prefetch == "none":
            continue
        reference = {f: replay(trace, policy=f"{prefetch}/belady/fetch/standard", cache_frac=f,
                               bandwidth_gbps=link).hit_rate for f in fracs}  # fmt: skip
        print(f"share closed against {prefetch}/belady on the same link (hit rate in the last column):")
        for f in fracs:
            print(row(f"{f:.0%}", [share(closed(hits[(e, f)], floor[f], reference[f])) for e in evictions]
                      + [f"{reference[f]:.1%}"]))  # fmt: skip
        shares[f"{title}, against {prefetch}/belady"] = {
            f: closed(hits[("next-use", f)], floor[f], reference[f]) for f in fracs
        }
    return shares


def loops(trace: Trace, longest: int = 48) -> list[tuple[int, float]]:
    """Per sequence (prompt), its decode passes' best lag T and the share of a pass's requests (per layer) that
    the pass T earlier made: how strongly its routing loops."""
    sequences: list[list[dict[int, set[int]]]] = []
    for replay_pass in trace.passes():
        if replay_pass.info.prefill:
            sequences.append([])
        elif sequences:
            sequences[-1].append({step.layer: set(step.requests) for step in replay_pass.layers})
    best = []
    for decode in sequences:
        scores = []
        for lag in range(1, min(longest, len(decode) - 1) + 1):
            reused = sum(len(p[layer] & decode[i - lag].get(layer, set())) for i, p in enumerate(decode[lag:], lag)
                         for layer in p)  # fmt: skip
            total = sum(len(p[layer]) for p in decode[lag:] for layer in p)
            scores.append((reused / total if total else 0.0, -lag))
        share_, lag = max(scores) if scores else (0.0, 0)
        best.append((-lag, share_))
    return best


def verdict(by_frac: dict[float, float | None]) -> str:
    """Whether next-use closes the target share at the target capacities."""
    parts = []
    for f in TARGET_FRACS:
        if f not in by_frac:
            continue
        value = by_frac[f]
        parts.append(f"{f:.0%} " + ("no gap" if value is None else "met" if value >= TARGET else "short"))
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+", help="traces recorded with `specmd trace` (.jsonl or .npz)")
    parser.add_argument("--cache-frac", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--extra", nargs="*", default=[], help="more eviction policies to compare (specs)")
    args = parser.parse_args(argv)
    evictions = (*EVICTIONS, *args.extra)
    print(f"engine: {'compiled' if is_compiled() else 'pure Python'}")
    for path in args.traces:
        start = time.perf_counter()
        trace = load_trace(path)
        passes = trace.passes()
        print(f"\n=== {path}: sha256 {trace.sha256[:16]}..., {len(passes):,} passes, {trace.num_requests:,} requests")
        found = loops(trace)
        print("loops: per prompt, the best lag T (passes) and the share of a decode pass's experts the pass T earlier")
        print("also used: " + ", ".join(f"T={lag} {reuse:.0%}" for lag, reuse in found))
        shares = gap_table(trace, evictions, args.cache_frac)
        print(f"\nnext-use, share of the gap closed (target >= {TARGET:.0%} at 10%, 25%, 50%):")
        for title, by_frac in shares.items():
            cells = ", ".join(f"{f:.0%} {share(v)}" for f, v in by_frac.items())
            print(f"  {title}: {cells} ({verdict(by_frac)})")
        print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
