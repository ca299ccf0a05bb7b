"""Qwen1.5-MoE (Qwen/Qwen1.5-MoE-A2.7B, transformers' `qwen2_moe`) with its experts behind specmd's cache.

The shared expert and its sigmoid gate are ordinary dense weights of the sparse block and stay resident;
only the routed experts are cached. Dense decoder layers have no experts and are skipped.
"""

from transformers import PretrainedConfig, Qwen2MoeForCausalLM

from specmd.offload_models.base import MoEArch, OffloadMixin
from specmd.offload_models.checkpoint import MLP_EXPERT_KEYS


def sparse_layers(config: PretrainedConfig) -> list[int]:
    """The layers `Qwen2MoeDecoderLayer` builds a sparse block for."""
    return [
        i
        for i in range(config.num_hidden_layers)
        if i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
    ]


class OffloadQwen(OffloadMixin, Qwen2MoeForCausalLM):
    """`Qwen2MoeForCausalLM` whose routed experts live in specmd's cache; see `OffloadMixin.from_pretrained`."""

    arch = MoEArch(
        model_type="qwen2_moe",
        checkpoint=MLP_EXPERT_KEYS,
        intermediate_attr="moe_intermediate_size",
        moe_layers=sparse_layers,
    )
