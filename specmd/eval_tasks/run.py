"""`specmd eval`: lm_eval's `simple_evaluate` on the `offload-hf` model with specmd's defaults.

The same evaluation as ``lm_eval --model offload-hf --include_path <TASK_DIR> ...``: the same model class,
tasks and results dict (scores under `results`, cache metrics under `config.specmd.tasks`), with the
paper's setting as defaults (5% cache, 5 GB/s link, the default policy) and the offline fixtures as data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specmd.cache.hardware import DEFAULT_HARDWARE
from specmd.eval_tasks import MODEL_NAME, TASK_DIR
from specmd.eval_tasks.data import FIXTURES, data_root

DEFAULT_TASKS = ("specmd",)  # the tag of specmd_gsm8k, specmd_truthfulqa_gen, specmd_nq_open


def evaluate(
    model: str = "default",
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    data: str = FIXTURES,
    cache_frac: float | None = 0.05,
    cache_bytes: int | None = None,
    policy: str | None = None,
    bandwidth_gbps: float | None = 5.0,
    hardware: str = DEFAULT_HARDWARE,
    shape_from: str | None = None,
    expert_precisions: tuple[str, ...] | None = None,
    storage: str = "ram",
    host_cache_frac: float | None = None,
    host_cache_bytes: int | None = None,
    host_eviction: str = "lru",
    disk: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    batch_size: int = 1,
    limit: float | None = None,
    num_fewshot: int | None = None,
    max_gen_toks: int | None = None,
    log_samples: bool = False,
    progress: bool = True,
    speculate: int | str | None = None,
    draft_frac: float | None = None,
    draft_precision: str = "int4",
) -> dict[str, Any] | None:
    """Evaluate `model` (a checkpoint, hub id or "default") on lm_eval `tasks`; lm_eval's results dict.

    `data` is where specmd's tasks read documents: "fixtures", "hub" or a JSONL directory (`data.py`); the
    cache settings are `from_pretrained`'s; `speculate` decodes the generation requests speculatively with a
    self-draft of `draft_frac` at `draft_precision` (one request at a time: `batch_size` 1). No code of the
    checkpoint's own runs (`trust_remote_code=False`).
    In a data-parallel launch (`ranks`) every rank calls it; rank 0 gets the results of all, the others None.
    """
    check_inputs(model, data)
    import lm_eval
    import torch

    import specmd.eval_tasks.model  # noqa: F401  (registers `offload-hf` even where the .pth hook is not installed)

    model_args: dict[str, Any] = {
        "pretrained": model,
        "cache_frac": None if cache_bytes is not None else cache_frac,
        "cache_bytes": cache_bytes,
        "bandwidth_gbps": bandwidth_gbps,
        "hardware": hardware,
        "shape_from": shape_from,
        "expert_precisions": expert_precisions,
        "storage": storage,
        "host_cache_frac": host_cache_frac,
        "host_cache_bytes": host_cache_bytes,
        "host_eviction": host_eviction,
        "disk": disk,
        "dtype": dtype,
        "progress": progress,
        "trust_remote_code": False,
    }
    if policy is not None:
        model_args["policy"] = policy
    if speculate is not None:
        model_args |= {"speculate": speculate, "draft_frac": draft_frac, "draft_precision": draft_precision}
    results = lm_eval.simple_evaluate(
        model=MODEL_NAME,
        model_args=model_args,
        tasks=list(tasks),
        task_manager=_task_manager(tasks, {"specmd_data": data}),
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        batch_size=batch_size,
        limit=limit,
        num_fewshot=num_fewshot,
        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks is not None else None,
        log_samples=log_samples,
    )
    return None if results is None else dict(results)  # lm_eval returns results on rank 0 only


def check_inputs(model: str, data: str) -> None:
    """Fail now, not after the model has loaded, on a bad data source or a missing or bad model config."""
    from specmd.default_model import default_model_path
    from specmd.offload_models.checkpoint import read_config

    data_root(data)
    read_config(default_model_path() if model == "default" else model)


def _task_manager(tasks: Sequence[str], metadata: dict[str, Any]) -> Any:
    """specmd's tasks, and lm_eval's own only when asked for one (indexing them all takes seconds)."""
    from lm_eval.tasks import TaskManager

    ours = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=metadata)
    if all(ours.match_tasks([name]) for name in tasks):
        return ours
    manager = TaskManager(include_path=str(TASK_DIR), metadata=metadata)
    # lm_eval would find out with a KeyError once the model has loaded; a name is a task, group, tag or YAML file
    unknown = [name for name in tasks if name not in manager.all_tasks and not Path(name).expanduser().is_file()]
    if unknown:
        raise ValueError(
            f"unknown lm_eval task {unknown[0]!r}: not a task, group or tag of lm_eval's or specmd's "
            f"({', '.join(ours.all_tasks)}), nor a task YAML file; `lm_eval ls tasks` lists them all"
        )
    return manager
