"""Data-parallel lm_eval: every rank its own model and cache, the cache metrics summed over ranks.

`accelerate launch --multi_gpu --num_processes N -m lm_eval --model offload-hf ...` (or `torchrun`, or `specmd
eval --num-processes N`) starts N processes; lm_eval gives each rank every N-th document and gathers the
scores to rank 0, which writes the results. Each rank's cache counts its own requests; rank 0 reports, per
task, their sum (`stats.combine`: counters summed, rates recomputed from the sums) with every rank's own
figures beside it under `per_rank`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from specmd.cache.stats import CacheStats, combine

TaskStats = dict[str, dict[str, Any]]  # task name -> {"request_type", "lm_eval_requests", every CacheStats field}
_STATS_FIELDS = [f.name for f in fields(CacheStats)]


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank among `launched_processes()`; 0 without a launcher."""
    return int(os.environ.get("RANK", "0"))


def use_cpu_ranks_without_gpus() -> None:
    """Ranks launched where torch sees no GPU run on the CPU, over gloo.

    accelerate makes CPU ranks only when told to (``ACCELERATE_USE_CPU``, which its `--cpu` launcher sets while
    starting a single process); without it each rank would evaluate every document alone. Call before
    `HFLM.__init__` builds its `Accelerator`.
    """
    import torch

    if launched_processes() > 1 and not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"


def run_ranks(processes: int, device: str, module_args: Sequence[str]) -> int:
    """Run `python -m <module_args>` as `processes` ranks under torch's launcher (`torchrun --standalone`, on a
    free port); its exit code. `device` "cuda": rank r on cuda:r (needs as many GPUs); "cpu": CPU processes
    over gloo, the cores shared out among them unless OMP_NUM_THREADS says otherwise.
    """
    env = dict(os.environ)
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    elif device != "cuda":
        raise ValueError(
            f"--device {device} names one GPU, but each of the {processes} processes takes its own (rank r "
            "runs on cuda:r): pass --device cuda or --device cpu"
        )
    else:
        import torch

        visible = torch.cuda.device_count()
        if visible < processes:
            raise ValueError(
                f"--num-processes {processes} needs {processes} GPUs, one per rank; torch sees {visible}: "
                f"pass at most {visible}, or --device cpu"
            )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run([*launcher, "-m", *module_args], env=env, check=False).returncode


def aggregate(per_rank: list[TaskStats]) -> TaskStats:
    """Per task, the ranks' metrics combined, `lm_eval_requests` summed, and each rank's own under `per_rank`."""
    names = list(dict.fromkeys(name for stats in per_rank for name in stats))
    tasks: TaskStats = {}
    for name in names:
        ran = [(index, stats[name]) for index, stats in enumerate(per_rank) if name in stats]
        total = combine([CacheStats(**{key: stats[key] for key in _STATS_FIELDS}) for _, stats in ran])
        tasks[name] = {
            "request_type": ran[0][1]["request_type"],
            "lm_eval_requests": sum(stats["lm_eval_requests"] for _, stats in ran),
            **total.to_dict(),
            "per_rank": [{"rank": index, **stats} for index, stats in ran],
        }
    return tasks
