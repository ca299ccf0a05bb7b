"""OLMoE (allenai/OLMoE-1B-7B) with its experts behind specmd's cache."""

from transformers import OlmoeForCausalLM

from specmd.offload_models.base import MoEArch, OffloadMixin
from specmd.offload_models.checkpoint import MLP_EXPERT_KEYS


class OffloadOLMoE(OffloadMixin, OlmoeForCausalLM):
    """`OlmoeForCausalLM` whose routed experts live in specmd's cache; see `OffloadMixin.from_pretrained`."""

    arch = MoEArch(model_type="olmoe", checkpoint=MLP_EXPERT_KEYS)
