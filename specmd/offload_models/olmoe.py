"""OLMoE (allenai/OLMoE-1B-7B) with its experts behind specmd's cache."""

from transformers import OlmoeForCausalLM

from specmd.offload_models.base import MoEArch, OffloadMixin
from specmd.offload_models.checkpoint import ExpertKeyPatterns

EXPERTS = "model.layers.{layer}.mlp.experts"


class OffloadOLMoE(OffloadMixin, OlmoeForCausalLM):
    """`OlmoeForCausalLM` whose routed experts live in specmd's cache; see `OffloadMixin.from_pretrained`."""

    arch = MoEArch(
        model_type="olmoe",
        checkpoint=ExpertKeyPatterns(
            gate=EXPERTS + ".{expert}.gate_proj.weight",
            up=EXPERTS + ".{expert}.up_proj.weight",
            down=EXPERTS + ".{expert}.down_proj.weight",
            gate_up=EXPERTS + ".gate_up_proj",
            down_fused=EXPERTS + ".down_proj",
        ),
    )
