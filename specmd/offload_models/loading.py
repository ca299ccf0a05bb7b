"""Which of transformers' `from_pretrained` keywords an offloaded model runs, checked before anything loads.

specmd puts every non-expert weight whole on one device (cpu, or one CUDA device) and keeps the routed experts
in its own cache. A keyword that would place, quantize, split or re-read the weights another way is refused
with one `ValueError` naming it and what to use instead; every other keyword goes to transformers unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's device-map planners
ONE_DEVICE = "pass device_map=None or 'cpu', one CUDA device ('cuda:0'), or {'': device}"
FAST_MEMORY = "limit fast memory with specmd's cache_frac or cache_bytes"
NOT_TESTED = "specmd does not support it (its expert cache is not tested with it)"
ONE_PROCESS = "specmd runs one model in one process on one device (no tensor or pipeline parallelism)"

# Keywords refused whenever given a value other than None or False (what lm_eval passes when unused).
REFUSED: dict[str, str] = {
    "max_memory": f"the non-expert weights go whole to one device; {FAST_MEMORY}",
    "offload_folder": f"specmd offloads no weights to disk through accelerate; {FAST_MEMORY}",
    "offload_buffers": f"specmd offloads no weights through accelerate; {FAST_MEMORY}",
    "quantization_config": "specmd keeps the non-expert weights unquantized; quantize the experts with "
    "expert_precisions, e.g. ('int8',), ('nf4',) or ('hqq4',)",
    "gguf_file": "specmd reads the experts from safetensors files; load a safetensors checkpoint",
    "state_dict": "specmd reads the experts from the checkpoint's safetensors files; pass the checkpoint's path",
    "experts_implementation": "specmd runs the routed experts itself, through its cache",
    "key_mapping": "specmd finds the experts by the hub's key names or the fused layout's; save the checkpoint "
    "under those names",
    "distributed_config": ONE_PROCESS,
    "tp_plan": ONE_PROCESS,
    "tp_size": ONE_PROCESS,
    "device_mesh": ONE_PROCESS,
    "use_kernels": NOT_TESTED,
    "kernel_config": NOT_TESTED,
    "fusion_config": NOT_TESTED,
}

# The keywords of transformers' `from_pretrained` that an offloaded model runs as transformers does (which ignores
# low_cpu_mem_usage and offload_state_dict now); the rest of those it reads are refused above, internal, or of
# features specmd does not run (PEFT adapters, hub kernels). tests/models/test_loading.py checks both lists.
SUPPORTED = (
    "attn_implementation", "cache_dir", "device_map", "disable_mmap", "dtype", "force_download", "local_files_only",
    "low_cpu_mem_usage", "offload_state_dict", "proxies", "revision", "subfolder", "token", "torch_dtype",
    "trust_remote_code", "use_safetensors", "variant", "weights_only",
)  # fmt: skip


def check_loading_keywords(kwargs: Mapping[str, Any]) -> None:
    """Refuse every transformers loading keyword in `kwargs` that specmd does not run correctly (one ValueError)."""
    check_device_map(kwargs.get("device_map"))
    for name, instead in REFUSED.items():
        value = kwargs.get(name)
        if value is not None and value is not False:
            raise ValueError(f"{name}={_short(value)} is not supported: {instead}")
    if kwargs.get("use_safetensors") is False:
        raise ValueError("use_safetensors=False is not supported: specmd reads the experts from safetensors files")


def check_device_map(device_map: Any) -> None:
    """Refuse a `device_map` that does not put every weight on one available cpu or CUDA device: a planner
    ('auto', ...), disk, meta, several devices or an unavailable one is a ValueError naming the value."""
    if device_map is None:
        return
    shown = _short(device_map)
    if isinstance(device_map, str) and device_map in STRATEGIES:
        raise ValueError(
            f"device_map={shown} is not supported: accelerate may split the model across devices, CPU and disk, "
            f"which specmd does not run; {ONE_DEVICE}. {FAST_MEMORY}"
        )
    values = list(device_map.values()) if isinstance(device_map, Mapping) else [device_map]
    if not values:
        raise ValueError(f"device_map={shown} names no device; {ONE_DEVICE}")
    devices = {_device(value, shown) for value in values}
    if len(devices) > 1:
        raise ValueError(
            f"device_map={shown} splits the model across {', '.join(sorted(map(str, devices)))}, which specmd "
            f"does not run; {ONE_DEVICE}. {FAST_MEMORY}"
        )


def _device(value: object, shown: str) -> torch.device:
    """One device_map entry as a device specmd runs on; `shown` is the whole device_map, for the error."""
    if value == "disk":
        raise ValueError(
            f"device_map={shown} offloads weights to disk, which specmd does not run; {ONE_DEVICE}. {FAST_MEMORY}"
        )
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        device = torch.device("cuda", value)  # an accelerator index, as transformers reads it
    elif isinstance(value, torch.device):
        device = value
    else:
        try:
            device = torch.device(value)  # type: ignore[call-overload]
        except (RuntimeError, TypeError):
            raise ValueError(f"device_map={shown} names {value!r}, which is not a device; {ONE_DEVICE}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device_map={shown} names {device}; specmd runs on 'cpu' or a CUDA device: {ONE_DEVICE}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device_map={shown} names {device}, but CUDA is not available here (torch {torch.__version__}); "
            "pass device_map='cpu'"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device_map={shown} names {device}, but there are {torch.cuda.device_count()} CUDA device(s) here"
        )
    return device


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"<{type(value).__name__}>"
