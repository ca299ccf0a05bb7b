"""Expert weight formats: how one expert's weights are packed into bytes and computed from them.

The formats are the dense ones (bf16, fp16, fp32), bitsandbytes' int8, nf4 (alias int4) and fp4, and
HQQ's hqq8, hqq4, hqq3 and hqq2 (alias int2). Their names live in `specmd.quant.names`, which imports
no torch; the formats (and torch) load on first use of anything else here, and the quantization
libraries themselves only when a format that needs them is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_FROM_FORMATS = (
    "ExpertFormat",
    "ExpertShape",
    "MissingBackendError",
    "canonical_name",
    "get_format",
    "precision_of_dtype",
    "registered_formats",
)

__all__ = list(_FROM_FORMATS)


def __getattr__(name: str) -> Any:
    if name in _FROM_FORMATS:
        return getattr(import_module("specmd.quant.formats"), name)
    raise AttributeError(f"module 'specmd.quant' has no attribute {name!r}")
