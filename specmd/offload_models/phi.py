"""Phi-3.5-MoE (microsoft/Phi-3.5-MoE-instruct, transformers' `phimoe`) with its experts behind specmd's cache.

Its router (`.router`) runs sparsemixer: always two experts per token, weights not normalised. The
native router is called as is; only the experts module is replaced.
"""

from transformers import PhimoeForCausalLM

from specmd.offload_models.base import MoEArch, OffloadMixin
from specmd.offload_models.checkpoint import BLOCK_SPARSE_EXPERT_KEYS


class OffloadPhi(OffloadMixin, PhimoeForCausalLM):
    """`PhimoeForCausalLM` whose routed experts live in specmd's cache; see `OffloadMixin.from_pretrained`."""

    arch = MoEArch(
        model_type="phimoe",
        checkpoint=BLOCK_SPARSE_EXPERT_KEYS,
        router_attr="router",
        num_experts_attr="num_local_experts",
        fixed_top_k=2,  # sparsemixer ignores num_experts_per_tok
        router_contract=None,  # sparsemixer's thresholded choice cannot be re-run on biased logits
    )
