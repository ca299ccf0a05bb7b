"""specmd: run Mixture-of-Experts models with a fraction of their experts in fast memory, and compare
the policies that manage that memory."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from specmd.compiled import warn_stale

try:
    __version__ = version("specmd")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

warn_stale()  # a compiled module built in place must not silently run instead of an edited .py file

# Model classes pull in transformers (seconds to import); load them on first use only.
_LAZY = {
    "OffloadOLMoE": "specmd.offload_models.olmoe",
    "OffloadMixtral": "specmd.offload_models.mixtral",
    "OffloadQwen": "specmd.offload_models.qwen",
    "OffloadPhi": "specmd.offload_models.phi",
    "AutoOffloadForCausalLM": "specmd.offload_models.auto",
    "default_model_path": "specmd.default_model",
    "CacheStats": "specmd.cache.stats",
    "PolicySpec": "specmd.cache.policies.spec",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'specmd' has no attribute {name!r}")
