"""What a model's routed experts weigh and how it computes, from its config alone: the figures `specmd info`
prints, and the layout `--shape-from` prices a trace with.

No weights are read, so the real models' sizes can be checked before anything is downloaded. The configs
of the four models the SpecMD paper studies ship with specmd (`BUNDLED_CONFIGS`: olmoe-1b-7b, mixtral-8x7b,
qwen1.5-moe-a2.7b, phi-3.5-moe), so they can be named without a download.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from specmd.cache.clock import ModelShape
from specmd.cache.layout import ExpertLayout
from specmd.default_model import BUNDLED_CONFIGS, bundled_configs
from specmd.offload_models.auto import AutoOffloadForCausalLM
from specmd.offload_models.checkpoint import read_config
from specmd.quant.formats import ExpertFormat, ExpertShape, get_format, precision_of_dtype, registered_formats

CAPACITY_FRACTIONS = (0.01, 0.05, 0.25)
KV_TOKENS = 1000  # the KV cache is quoted per this many tokens at batch 1


@dataclass(frozen=True)
class Capacity:
    """A cache of `cache_frac` of all routed-expert bytes at full precision: its `bytes`, and how many whole
    `experts` of one precision fit in it."""

    cache_frac: float
    bytes: int
    experts: int


@dataclass(frozen=True)
class DeviceMemory:
    """What fast memory a run with a cache of `cache_frac` needs at batch 1: the cache's `cache_bytes`, the
    non-expert weights (`dense_bytes`) and the KV cache of `kv_tokens` tokens (`kv_bytes`); activations and the
    framework's own buffers come on top."""

    cache_frac: float
    cache_bytes: int
    dense_bytes: int
    kv_tokens: int
    kv_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.cache_bytes + self.dense_bytes + self.kv_bytes


@dataclass(frozen=True)
class PrecisionSizes:
    """Expert sizes at one precision: one expert, all of them, and how many fit in each of `CAPACITY_FRACTIONS`."""

    precision: str
    bytes_per_expert: int
    total_bytes: int
    capacities: tuple[Capacity, ...]


@dataclass(frozen=True)
class ModelInfo:
    """A MoE model's shape as specmd sees it.

    Attributes:
        model_type, offload_class: the config's model type and the class that loads it.
        num_layers: decoder layers; moe_layers: those with routed experts (the rest are dense).
        experts_per_layer, top_k: routed experts per MoE layer and experts each token uses.
        hidden_size, expert_intermediate_size, expert_params: one routed expert's shape and weights.
        stored_precision: the precision the config says the weights are stored in (None: not said).
        full_precision: what a cache fraction counts: the stored precision, which a model loads in by default
            (torch's default dtype, fp32, when the config does not say).
        precisions: sizes at every precision specmd knows; a precision's `total_bytes` is also the host RAM
            that storing every expert at it takes (`storage="ram"`; storing several precisions takes their sum).
        dense_bytes: every weight but the routed experts (embeddings, attention, norms, routers, dense and
            shared MLPs, LM head) at full precision: these stay in fast memory.
        kv_bytes_per_token: the KV cache of one token at batch 1 (keys and values of every layer).
        device: fast memory needed with a cache of each of `CAPACITY_FRACTIONS` (or the fractions asked for).
    """

    model_type: str
    offload_class: str
    num_layers: int
    moe_layers: tuple[int, ...]
    experts_per_layer: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    expert_params: int
    stored_precision: str | None
    full_precision: str
    precisions: tuple[PrecisionSizes, ...]
    dense_bytes: int
    kv_bytes_per_token: int
    device: tuple[DeviceMemory, ...]

    @property
    def routed_experts(self) -> int:
        """Routed experts in the whole model."""
        return len(self.moe_layers) * self.experts_per_layer

    def to_dict(self) -> dict[str, Any]:
        device = [asdict(d) | {"total_bytes": d.total_bytes} for d in self.device]
        return asdict(self) | {"routed_experts": self.routed_experts, "device": device}


def load_config(model_or_config: str | os.PathLike[str]) -> PretrainedConfig:
    """The config of a checkpoint directory, a config.json file, a bundled config's name or a hub id (no weights
    are read, and no code of the checkpoint's runs)."""
    text = str(model_or_config)
    path = Path(text).expanduser()
    if not path.exists() and text in bundled_configs():
        path = BUNDLED_CONFIGS / text
    if not path.exists() and (path.is_absolute() or text.startswith((".", "~")) or path.suffix == ".json"):
        # transformers would take it for a hub id and complain about the id's form
        raise FileNotFoundError(
            f"{text}: no such file or directory (give a checkpoint directory, a config.json, a hub id or one of "
            f"the bundled configs: {', '.join(bundled_configs())})"
        )
    return read_config(path if path.exists() else text)


def full_precision(config: PretrainedConfig) -> str:
    """The precision a model of `config` loads in by default: its config's dtype (torch's default when unsaid)."""
    dtype = getattr(config, "dtype", None)
    try:
        return precision_of_dtype(dtype) if dtype is not None else precision_of_dtype(torch.get_default_dtype())
    except ValueError:
        return precision_of_dtype(torch.get_default_dtype())


def _meta_model(config: PretrainedConfig) -> Any:
    """The offloaded model of `config` on the meta device: built without memory or weights (no routed experts)."""
    cls = AutoOffloadForCausalLM.class_for(getattr(config, "model_type", None))
    config = copy.deepcopy(config)
    config._experts_implementation = None  # a stock choice (e.g. eager, for comparisons) that specmd's experts replace
    with torch.device("meta"):
        return cls(config)


def model_shape(config: PretrainedConfig, model: Any = None) -> ModelShape:
    """The compute shape of a model of `config` (what the roofline prices), counted on the meta device (`model`,
    when already built there)."""
    model = model if model is not None else _meta_model(config)
    shape = model._model_shape(type(model).arch.expert_shape(config))
    return replace(shape, dtype_bytes=int(get_format(full_precision(config)).bits) // 8)  # as the checkpoint runs


def expert_layout(config: PretrainedConfig, precisions: tuple[str, ...] | None = None) -> ExpertLayout:
    """The expert layout of a model of `config` with its compute shape: what `--shape-from` prices a trace as.

    Its experts are stored at `precisions` (default: its own dtype first, then every other precision that can
    store them, so any trace's precisions can be priced).
    """
    cls = AutoOffloadForCausalLM.class_for(getattr(config, "model_type", None))
    cls.arch.check(config)
    full = full_precision(config)
    if precisions is None:
        shape = cls.arch.expert_shape(config)
        precisions = (full, *(fmt.name for fmt in registered_formats() if fmt.name != full and _stores(fmt, shape)))
    return cls.arch.layout(config, precisions, full, model_shape(config))


def _stores(fmt: ExpertFormat, shape: ExpertShape) -> bool:
    try:
        fmt.nbytes(shape)
    except ValueError:  # a shape the format cannot store
        return False
    return True


def model_info(
    config: PretrainedConfig, fractions: tuple[float, ...] = CAPACITY_FRACTIONS, kv_tokens: int = KV_TOKENS
) -> ModelInfo:
    """Expert counts and sizes of the model `config` describes, and the memory a run needs with caches of
    `fractions` and `kv_tokens` tokens of context; an unsupported model type is a ValueError."""
    cls = AutoOffloadForCausalLM.class_for(getattr(config, "model_type", None))
    arch = cls.arch
    arch.check(config)
    shape = arch.expert_shape(config)
    dtype = getattr(config, "dtype", None)
    try:
        stored = precision_of_dtype(dtype) if dtype is not None else None
    except ValueError:
        stored = None
    full = full_precision(config)
    layout = arch.layout(config, (full,), full)
    count = layout.routed_experts
    capacities_bytes = [(frac, layout.bytes_of_fraction(frac)) for frac in fractions]
    precisions = []
    for fmt in registered_formats():
        if not _stores(fmt, shape):
            continue
        one = fmt.nbytes(shape)
        capacities = tuple(Capacity(frac, nbytes, min(nbytes // one, count)) for frac, nbytes in capacities_bytes)
        precisions.append(PrecisionSizes(fmt.name, one, count * one, capacities))
    model = _meta_model(config)
    compute = model_shape(config, model)
    dense = sum(p.numel() for p in model.parameters()) * compute.dtype_bytes  # tied weights count once
    kv_per_token = 2 * compute.num_layers * compute.kv_dim * compute.dtype_bytes
    device = tuple(
        DeviceMemory(frac, nbytes, dense, kv_tokens, kv_tokens * kv_per_token) for frac, nbytes in capacities_bytes
    )
    return ModelInfo(
        model_type=config.model_type,
        offload_class=cls.__name__,
        num_layers=layout.num_layers,
        moe_layers=layout.moe_layers,
        experts_per_layer=layout.experts_per_layer,
        top_k=layout.top_k,
        hidden_size=shape.hidden,
        expert_intermediate_size=shape.intermediate,
        expert_params=shape.params,
        stored_precision=stored,
        full_precision=full,
        precisions=tuple(precisions),
        dense_bytes=dense,
        kv_bytes_per_token=kv_per_token,
        device=device,
    )
