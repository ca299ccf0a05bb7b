"""`ExpertLayout`: what the cache knows of a model's routed experts, the contract between a live model and a trace.

A live model builds its layout from its config; a trace carries the same facts in its header
(`to_header` / `from_header`), so replay sizes and prices the cache exactly as the live run did. It
imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from specmd.cache.clock import ModelShape
from specmd.cache.keys import ExpertKey

MAX_EXPERTS_PER_LAYER = 1 << 16
"""A bound far above any published MoE (hundreds of experts per layer), so a corrupt header fails early."""
MAX_ROUTED_EXPERTS = 1 << 20
"""The most routed experts in all (MoE layers x experts per layer; the largest published MoE have about 15,000): a
cache keeps a key for each."""

HEADER_FIELDS = (
    "num_layers",
    "moe_layers",
    "experts_per_layer",
    "top_k",
    "precision",
    "expert_bytes",
    "full_precision",
    "full_expert_bytes",
    "shape",
)


def _count(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class ExpertLayout:
    """The routed experts of one model, as the cache sees them.

    Attributes:
        num_layers: decoder layers, MoE or dense.
        moe_layers: the decoder layers with routed experts, ascending.
        experts_per_layer: routed experts in each MoE layer.
        top_k: experts each token is routed to.
        precision: the stored precision requests use (the first the store holds).
        expert_bytes: bytes of one expert at each stored precision, `precision` among them.
        full_precision: the precision a cache fraction counts experts at (the model's own dtype).
        full_expert_bytes: bytes of one expert at `full_precision`.
        shape: the model's shape, which prices emulated compute; None: compute takes no emulated time.
    """

    num_layers: int
    moe_layers: tuple[int, ...]
    experts_per_layer: int
    top_k: int
    precision: str
    expert_bytes: Mapping[str, int]
    full_precision: str
    full_expert_bytes: int
    shape: ModelShape | None = field(default=None)

    def __post_init__(self) -> None:
        _count(self.num_layers, "num_layers")
        _count(self.experts_per_layer, "experts_per_layer")
        if self.experts_per_layer > MAX_EXPERTS_PER_LAYER:
            raise ValueError(
                f"experts_per_layer={self.experts_per_layer} is beyond what specmd supports ({MAX_EXPERTS_PER_LAYER})"
            )
        _count(self.top_k, "top_k")
        if self.top_k > self.experts_per_layer:
            raise ValueError(f"top_k={self.top_k} is more than the {self.experts_per_layer} experts per layer")
        layers = self.moe_layers
        if not isinstance(layers, tuple | list) or not layers:
            raise ValueError(f"moe_layers must be a non-empty list of layer indices, got {layers!r}")
        for layer in layers:
            _count(layer, "a MoE layer index", minimum=0)
        if list(layers) != sorted(set(layers)) or layers[-1] >= self.num_layers:
            raise ValueError(
                f"moe_layers must be ascending distinct indices below num_layers={self.num_layers}, got {list(layers)}"
            )
        object.__setattr__(self, "moe_layers", tuple(layers))
        routed = len(layers) * self.experts_per_layer
        if routed > MAX_ROUTED_EXPERTS:
            raise ValueError(
                f"{len(layers)} MoE layers of {self.experts_per_layer} experts are {routed} routed experts, "
                f"beyond what specmd supports ({MAX_ROUTED_EXPERTS})"
            )
        if not isinstance(self.expert_bytes, Mapping) or not self.expert_bytes:
            raise ValueError(f"expert_bytes must map each stored precision to bytes, got {self.expert_bytes!r}")
        for name, nbytes in self.expert_bytes.items():
            if not isinstance(name, str):
                raise ValueError(f"expert_bytes keys must be precision names, got {name!r}")
            _count(nbytes, f"expert_bytes[{name!r}]")
        object.__setattr__(self, "expert_bytes", dict(self.expert_bytes))
        if not isinstance(self.precision, str):
            raise ValueError(f"precision must be a precision name, got {self.precision!r}")
        if self.precision not in self.expert_bytes:
            raise ValueError(f"precision {self.precision!r} is not among the stored ones: {sorted(self.expert_bytes)}")
        if not isinstance(self.full_precision, str):
            raise ValueError(f"full_precision must be a precision name, got {self.full_precision!r}")
        _count(self.full_expert_bytes, "full_expert_bytes")
        if self.shape is not None and self.shape.num_layers != self.num_layers:
            raise ValueError(f"the model shape has {self.shape.num_layers} layers, the layout {self.num_layers}")

    # ---- derived -------------------------------------------------------------------------------
    @property
    def routed_experts(self) -> int:
        """Routed experts in the whole model."""
        return len(self.moe_layers) * self.experts_per_layer

    @property
    def full_bytes(self) -> int:
        """Every routed expert at full precision: what `cache_frac` is a fraction of."""
        return self.routed_experts * self.full_expert_bytes

    def bytes_of_fraction(self, cache_frac: float) -> int:
        """The capacity a cache of `cache_frac` of the experts (counted at full precision) has, rounded down.

        The fast memory a fraction stands for does not grow when experts are stored at lower precisions.
        """
        return int(cache_frac * self.full_bytes)

    def priced_like(self, model: ExpertLayout) -> ExpertLayout:
        """This layout's routing structure (layers, experts, top-k: what a trace records) priced as `model`'s.

        An expert at this layout's full precision weighs what one of `model`'s weighs at its full precision, and
        at any other precision what one of `model`'s weighs at that precision; a cache fraction counts them at
        `model`'s full precision; every decoder layer computes like `model`'s average decoder layer and the head
        like `model`'s head. `model` must carry its shape and store this layout's other precisions.
        """
        if model.shape is None:
            raise ValueError("pricing a layout like a model needs that model's shape")
        sizes = dict(model.expert_bytes) | {self.full_precision: model.full_expert_bytes}
        missing = sorted(set(self.expert_bytes) - set(sizes))
        if missing:
            stored = sorted(model.expert_bytes)
            raise ValueError(f"the model to price like does not store {missing}; it stores {stored}")
        target = model.shape
        dense = round(sum(target.dense_params) / target.num_layers)
        shape = ModelShape(
            num_layers=self.num_layers,
            hidden_size=target.hidden_size,
            kv_dim=target.kv_dim,
            dense_params=(dense,) * self.num_layers,
            head_params=target.head_params,
            expert_params=target.expert_params,
            dtype_bytes=target.dtype_bytes,
        )
        return replace(
            self,
            expert_bytes={name: sizes[name] for name in self.expert_bytes},
            full_expert_bytes=model.full_expert_bytes,
            shape=shape,
        )

    def catalog(self) -> list[ExpertKey]:
        """Every expert at the precision requests use, layer by layer."""
        return [ExpertKey(layer, e, self.precision) for layer in self.moe_layers for e in range(self.experts_per_layer)]

    # ---- trace headers ------------------------------------------------------------------------
    def to_header(self) -> dict[str, Any]:
        """The layout as a trace header's fields (JSON-ready)."""
        return {
            "num_layers": self.num_layers,
            "moe_layers": list(self.moe_layers),
            "experts_per_layer": self.experts_per_layer,
            "top_k": self.top_k,
            "precision": self.precision,
            "expert_bytes": dict(self.expert_bytes),
            "full_precision": self.full_precision,
            "full_expert_bytes": self.full_expert_bytes,
            "shape": None if self.shape is None else self.shape.to_dict(),
        }

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> ExpertLayout:
        """Read a trace header's layout fields; a missing or ill-typed one is a ValueError naming it.

        `expert_bytes` may be one integer (the bytes at `precision`, default "bf16"); `full_precision` and
        `full_expert_bytes` default to `precision` and its bytes.
        """
        missing = [name for name in ("num_layers", "moe_layers", "experts_per_layer", "top_k", "expert_bytes")
                   if header.get(name) is None]  # fmt: skip
        if missing:
            raise ValueError(f"the header gives no {missing[0]}")
        precision = header.get("precision") or "bf16"
        if not isinstance(precision, str):
            raise ValueError(f"precision must be a precision name, got {precision!r}")
        sizes = header["expert_bytes"]
        if not isinstance(sizes, Mapping):
            sizes = {precision: sizes}
        shape = header.get("shape")
        if shape is not None:
            shape = ModelShape.from_dict(shape)
        full_bytes = header.get("full_expert_bytes")
        return cls(
            num_layers=header["num_layers"],
            moe_layers=tuple(header["moe_layers"]) if isinstance(header["moe_layers"], list) else header["moe_layers"],
            experts_per_layer=header["experts_per_layer"],
            top_k=header["top_k"],
            precision=precision,
            expert_bytes=sizes,
            full_precision=header.get("full_precision") or precision,
            full_expert_bytes=sizes.get(precision) if full_bytes is None else full_bytes,
            shape=shape,
        )
