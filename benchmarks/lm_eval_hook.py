"""What the `specmd-lm-eval.pth` hook costs a Python process that never uses lm_eval.

Three figures: running the .pth line (once per interpreter start), the idle finder's cost per later import,
and `python -c pass` with the file in the user site directory versus the same directory without it
(interleaved runs; needs an interpreter with the user site enabled, i.e. not a venv).
"""

from __future__ import annotations

import argparse
import os
import shutil
import site
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

PTH = Path(__file__).resolve().parents[1] / "specmd" / "eval_tasks" / "specmd-lm-eval.pth"


def line_cost(number: int) -> float:
    """Seconds to run the .pth line (compile included, as site.py does), the finder removed each time."""
    line = PTH.read_text().splitlines()[-1]

    def once() -> None:
        exec(line, {})
        del sys.meta_path[0]

    return timeit.timeit(once, number=number) / number


def finder_cost(number: int) -> float:
    """Seconds the idle finder adds to one import that misses sys.modules."""
    exec(PTH.read_text().splitlines()[-1], {})
    finder = sys.meta_path.pop(0)
    return timeit.timeit(lambda: finder.find_spec("numpy.core"), number=number) / number


def startup(runs: int) -> dict[str, list[float]]:
    """Wall seconds of `python -c pass`, user site with and without the .pth, interleaved."""
    times: dict[str, list[float]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as base:
        env = os.environ | {"PYTHONUSERBASE": base}
        user_site = Path(
            subprocess.run(
                [sys.executable, "-c", "import site; print(site.getusersitepackages())"],
                env=env, capture_output=True, text=True, check=True,
            ).stdout.strip()
        )  # fmt: skip
        user_site.mkdir(parents=True)
        for _ in range(runs):
            for mode in ("without", "with"):
                if mode == "with":
                    shutil.copy(PTH, user_site / PTH.name)
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
                times[mode].append(time.perf_counter() - start)
                (user_site / PTH.name).unlink(missing_ok=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=60, help="interpreter starts per variant")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    print(f"run the .pth line once:            {line_cost(2000) * 1e6:8.1f} us")
    print(f"idle finder, per later import:     {finder_cost(200_000) * 1e9:8.1f} ns")
    if not site.ENABLE_USER_SITE:
        print("python -c pass: skipped (user site disabled, e.g. in a venv)")
        return
    for mode, values in startup(args.runs).items():
        print(
            f"python -c pass, {mode:7s} the .pth: median {statistics.median(values) * 1e3:6.1f} ms, "
            f"min {min(values) * 1e3:6.1f} ms ({len(values)} runs)"
        )


if __name__ == "__main__":
    main()
