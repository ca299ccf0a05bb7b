"""Offloaded MoE models: one shared mixin, one small file per architecture."""

from specmd.offload_models.auto import AutoOffloadForCausalLM
from specmd.offload_models.base import MoEArch, OffloadMixin
from specmd.offload_models.mixtral import OffloadMixtral
from specmd.offload_models.olmoe import OffloadOLMoE
from specmd.offload_models.options import OffloadOptions
from specmd.offload_models.phi import OffloadPhi
from specmd.offload_models.qwen import OffloadQwen

__all__ = [
    "AutoOffloadForCausalLM",
    "MoEArch",
    "OffloadMixin",
    "OffloadMixtral",
    "OffloadOLMoE",
    "OffloadOptions",
    "OffloadPhi",
    "OffloadQwen",
]
