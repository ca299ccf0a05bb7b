"""Sweep throughput: the local process pool against a local Ray instance, on the same CPUs, side by side.

Two grids, each swept by both backends in alternating rounds (the CSV rows of the two are checked equal):

* a real grid: synthetic traces of OLMoE-1B-7B's shape (benchmarks/replay.py's) x eviction policies x
  capacities, plus the baselines; over 200 replays of tens of milliseconds each;
* a tiny grid: the same number of replays of a trace of one token, which take well under a millisecond, so
  a row's wall time is the backend's own cost per run: the difference is what Ray adds per task.

Prints rows/s per backend and round, Ray's start-up (ray.init, and the first sweep that starts its workers),
the per-task overhead, and from these the grid size at which a cluster of C CPUs pays: the rows n for which
n x t / c > start-up + n x (t + overhead) / C (t: one replay's CPU time here, c: this machine's CPUs; it
assumes the cluster's CPUs as fast as these and ignores the network).

    python benchmarks/sweep_backends.py [--tokens 64] [--traces 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import ray
from replay import synthetic  # benchmarks/replay.py: the script's folder is on sys.path

from specmd.compiled import is_compiled
from specmd.sim.sweep import SweepGrid, read_results, sweep

POLICIES = tuple(f"none/{e}/fetch/standard" for e in ("lru", "least-stale", "lfu", "lhu", "fld", "next-use"))
CACHE_FRACS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def timed_sweep(grid: SweepGrid, out: Path, backend: str, cpus: int) -> float:
    """Seconds to sweep `grid` into a new CSV `out` on `backend`."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    if backend == "ray":
        sweep(grid, out, progress=False, backend="ray")
    else:
        sweep(grid, out, progress=False, jobs=cpus)
    return time.perf_counter() - start


def rows_of(path: Path) -> list[tuple]:
    return sorted(tuple(row.items()) for row in read_results(path))


def compare(name: str, grid: SweepGrid, folder: Path, rounds: int, cpus: int) -> dict[str, list[float]]:
    """Alternate the backends for `rounds` rounds; print each round's rows/s; the seconds of each."""
    runs = len(grid.runs())
    seconds: dict[str, list[float]] = {"local": [], "ray": []}
    for number in range(1, rounds + 1):
        for backend in ("local", "ray"):
            seconds[backend].append(timed_sweep(grid, folder / f"{name}-{backend}.csv", backend, cpus))
            print(f"{name:5} round {number}  {backend:5}  {runs} rows in {seconds[backend][-1]:6.2f} s  "
                  f"{runs / seconds[backend][-1]:8.1f} rows/s", flush=True)  # fmt: skip
        assert rows_of(folder / f"{name}-local.csv") == rows_of(folder / f"{name}-ray.csv"), "the backends differ"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens of each real trace")
    parser.add_argument("--traces", type=int, default=4, help="real traces (seeds 0..N-1)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each backend")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        traces = [str(synthetic(args.tokens, seed=s).save(folder / f"t{s}.npz")) for s in range(args.traces)]
        real = SweepGrid(traces=tuple(traces), policies=POLICIES, cache_fracs=CACHE_FRACS, bandwidths=(5.0,))
        tiny_traces = [str(synthetic(1, seed=s).save(folder / f"tiny{s}.npz")) for s in range(args.traces)]
        tiny = SweepGrid(traces=tuple(tiny_traces), policies=POLICIES, cache_fracs=CACHE_FRACS, bandwidths=(5.0,))
        requests = len(real.runs()) * 16 * 8 * args.tokens
        print(f"engine: {'compiled (mypyc)' if is_compiled() else 'pure Python'}; {cpus} CPUs; local pool of "
              f"{cpus} processes against a local Ray instance of {cpus} CPUs; ray {ray.__version__}")  # fmt: skip
        print(f"real grid: {len(real.runs())} replays of {args.tokens} tokens x 16 layers x top-8 (about "
              f"{requests:,} requests in all); tiny grid: {len(tiny.runs())} replays of 1 token")  # fmt: skip
        start = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
        init_s = time.perf_counter() - start
        print(f"ray.init (a new local instance): {init_s:.2f} s")
        warm = SweepGrid(traces=(tiny_traces[0],), policies=POLICIES[:1], cache_fracs=(0.5,), baselines=False)
        first_s = timed_sweep(warm, folder / "w.csv", "ray", cpus)
        print(f"first Ray sweep (1 tiny run, its workers starting): {first_s:.2f} s")
        try:
            real_s = compare("real", real, folder, args.rounds, cpus)
            tiny_s = compare("tiny", tiny, folder, args.rounds, cpus)
        finally:
            ray.shutdown()
    best = {name: {b: min(s) for b, s in seconds.items()} for name, seconds in (("real", real_s), ("tiny", tiny_s))}
    runs = len(real.runs())
    print()
    print(f"{'grid':6}{'local rows/s':>14}{'ray rows/s':>12}{'ray/local':>11}   (best round of {args.rounds})")
    for name in ("real", "tiny"):
        local, on_ray = runs / best[name]["local"], runs / best[name]["ray"]
        print(f"{name:6}{local:>14.1f}{on_ray:>12.1f}{on_ray / local:>11.2f}")
    per_task = (best["tiny"]["ray"] - best["tiny"]["local"]) / runs * cpus  # CPU-seconds Ray adds per task
    replay = {name: best[name]["local"] / runs * cpus for name in ("real", "tiny")}  # CPU-seconds of one replay
    startup = init_s + first_s
    print(
        f"Ray's cost per task beyond the local pool's: {per_task * 1e3:.1f} ms of a CPU; one replay takes "
        f"{replay['real'] * 1e3:.0f} ms (real) and {replay['tiny'] * 1e3:.0f} ms (tiny) of a CPU in the pool"
    )
    print(f"Ray's start-up here: {startup:.1f} s (a new local instance and its first workers)")
    print(f"Grid size from which a cluster of C CPUs beats this machine's pool of {cpus}, with that start-up, "
          "the per-task cost above and this machine's speed per CPU:")  # fmt: skip
    print(f"{'C':>6}" + "".join(f"{name + ' replays':>16}" for name in replay))
    for cluster in (4, 16, 64, 256):
        gains = {name: t / cpus - (t + per_task) / cluster for name, t in replay.items()}  # seconds saved per row
        print(f"{cluster:>6}" + "".join(f"{math.ceil(startup / g) if g > 0 else 'never':>16}" for g in gains.values()))


if __name__ == "__main__":
    main()
