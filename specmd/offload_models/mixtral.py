"""Mixtral (mistralai/Mixtral-8x7B) with its experts behind specmd's cache.

Its router keeps the top-k weights in fp32 while the hidden states may be bf16; the expert job
multiplies and casts as eager does, so that stays bit-identical.
"""

from transformers import MixtralForCausalLM

from specmd.offload_models.base import MoEArch, OffloadMixin
from specmd.offload_models.checkpoint import BLOCK_SPARSE_EXPERT_KEYS
from specmd.offload_models.routing import SoftmaxTopK


class OffloadMixtral(OffloadMixin, MixtralForCausalLM):
    """`MixtralForCausalLM` whose routed experts live in specmd's cache; see `OffloadMixin.from_pretrained`."""

    arch = MoEArch(
        model_type="mixtral",
        checkpoint=BLOCK_SPARSE_EXPERT_KEYS,
        num_experts_attr="num_local_experts",
        router_contract=SoftmaxTopK(renormalize=True, keep_fp32=True),
    )
