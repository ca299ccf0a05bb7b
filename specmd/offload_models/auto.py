"""`AutoOffloadForCausalLM`: picks the offloaded class from a checkpoint's `model_type`."""

from __future__ import annotations

import os
from typing import Any

from specmd.offload_models.checkpoint import HUB_KEYWORDS, read_config
from specmd.offload_models.mixtral import OffloadMixtral
from specmd.offload_models.olmoe import OffloadOLMoE
from specmd.offload_models.phi import OffloadPhi
from specmd.offload_models.qwen import OffloadQwen

OFFLOAD_CLASSES: dict[str, type] = {
    cls.arch.model_type: cls for cls in (OffloadOLMoE, OffloadMixtral, OffloadQwen, OffloadPhi)
}


class AutoOffloadForCausalLM:
    """Loads any supported MoE checkpoint into its offloaded class."""

    @classmethod
    def class_for(cls, model_type: str | None) -> type:
        """The offloaded class for `model_type`; an unsupported one is a ValueError listing the supported."""
        if model_type not in OFFLOAD_CLASSES:
            raise ValueError(
                f"model type {model_type!r} is not supported by specmd; supported: {', '.join(OFFLOAD_CLASSES)}"
            )
        return OFFLOAD_CLASSES[model_type]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Read the checkpoint's config, then load it with the matching class's `from_pretrained`.

        The checkpoint's own code runs only with `trust_remote_code=True` (`OffloadMixin.from_pretrained`).
        """
        hub = {k: kwargs[k] for k in HUB_KEYWORDS if kwargs.get(k) is not None}
        trust = kwargs.get("trust_remote_code")
        config = kwargs.pop("config", None) or read_config(
            pretrained_model_name_or_path, trust_remote_code=trust, **hub
        )
        offload_cls = cls.class_for(getattr(config, "model_type", None))
        return offload_cls.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
