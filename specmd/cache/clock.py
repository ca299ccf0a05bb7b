"""Time: the emulated clock's compute side (a roofline of the target machine) and the wall clock.

Policy decisions follow emulated time, so counters do not depend on how fast this machine is or how
threads interleave. Compute time per layer comes from a roofline over the model's shape
(FLOPs / peak, bytes / memory bandwidth); `None` in place of a compute model means "as measured here".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from specmd.cache.keys import rebuilt

WallClock = Callable[[], float]
wall_clock: WallClock = time.perf_counter  # the only place under cache/ that reads real time


@dataclass(frozen=True)
class ModelShape:
    """What the compute model needs to know of a model; replay reads it from a trace's header.

    Attributes:
        num_layers: decoder layers, MoE or dense.
        hidden_size: width of the residual stream.
        kv_dim: key (= value) width per token per layer (kv heads x head dim).
        dense_params: per decoder layer, every weight except the routed experts (attention, norms,
            router, dense or shared MLP).
        head_params: weights of the final norm and the LM head.
        expert_params: weights of one routed expert.
        dtype_bytes: bytes per non-expert weight and activation element.
    """

    num_layers: int
    hidden_size: int
    kv_dim: int
    dense_params: tuple[int, ...]
    head_params: int
    expert_params: int
    dtype_bytes: int

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return rebuilt(self)

    def __post_init__(self) -> None:
        self.check(asdict(self))

    @classmethod
    def check(cls, data: Mapping[str, Any]) -> None:
        """Raise a ValueError naming the first field of `data` (the fields as `to_dict` writes them) that is wrong."""
        for name in ("num_layers", "hidden_size", "kv_dim", "head_params", "expert_params", "dtype_bytes"):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"model shape: {name} must be an integer >= 0, got {value!r}")
        dense = data["dense_params"]
        if not isinstance(dense, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in dense
        ):
            raise ValueError(f"model shape: dense_params must be integers >= 0, got {dense!r}")
        if len(dense) != data["num_layers"]:
            raise ValueError(f"dense_params has {len(dense)} entries; expected one per layer ({data['num_layers']})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"dense_params": list(self.dense_params)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelShape:
        """Read `to_dict`'s form; a missing or unknown field is a ValueError naming it."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, Mapping):
            raise ValueError(f"a model shape must be an object with {', '.join(names)}, got {data!r}")
        missing, unknown = sorted(set(names) - set(data)), sorted(set(data) - set(names))
        if missing or unknown:
            problem = f"lacks {missing[0]!r}" if missing else f"has an unknown field {unknown[0]!r}"
            raise ValueError(f"the model shape {problem}; its fields are {', '.join(names)}")
        cls.check(data)  # before construction: a compiled build checks the field types first, less helpfully
        return cls(**{**data, "dense_params": tuple(data["dense_params"])})


@dataclass(frozen=True)
class PassInfo:
    """One forward pass as the compute model sees it (pad tokens excluded).

    Attributes:
        sequences: sequences of the batch with new tokens in this pass.
        tokens: new tokens computed in this pass.
        attended: sum over those tokens of how many positions each attends to.
        context: sum over those sequences of their length after this pass (KV entries read per layer).
        prefill: whether the pass starts its sequences (no earlier positions cached).
    """

    sequences: int
    tokens: int
    attended: int
    context: int
    prefill: bool

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return rebuilt(self)

    @classmethod
    def for_sequences(cls, past: list[int], new: list[int]) -> PassInfo:
        """Build from each sequence's cached length before the pass and its new tokens. A sequence with
        no new tokens (a finished row of a batch, all padding in this pass) takes no part in it."""
        rows = [(p, n) for p, n in zip(past, new, strict=True) if n]
        return cls(
            sequences=len(rows),
            tokens=sum(n for _, n in rows),
            attended=sum(n * p + n * (n + 1) // 2 for p, n in rows),
            context=sum(p + n for p, n in rows),
            prefill=not any(past),
        )


class ComputeModel(Protocol):
    """Emulated compute time of the parts of a forward pass."""

    def dense_s(self, layer: int, step: PassInfo) -> float:
        """Everything of decoder layer `layer` except its routed experts."""
        ...

    def expert_s(self, nbytes: int, tokens: int) -> float:
        """One routed expert (weights `nbytes` long) applied to `tokens` tokens."""
        ...

    def head_s(self, step: PassInfo) -> float:
        """The final norm and LM head."""
        ...


class RooflineCompute:
    """Compute time on a target machine: each kernel takes max(FLOPs / peak, bytes / memory bandwidth), and each
    decoder layer a fixed `layer_overhead_s` on top per pass (what a calibrated profile adds, see
    `specmd.cache.hardware.calibrate`)."""

    def __init__(
        self, shape: ModelShape, peak_flops: float, memory_bandwidth: float, layer_overhead_s: float = 0.0
    ) -> None:
        if peak_flops <= 0 or memory_bandwidth <= 0:
            raise ValueError(f"peak_flops and memory_bandwidth must be > 0, got {peak_flops}, {memory_bandwidth}")
        if not layer_overhead_s >= 0:
            raise ValueError(f"layer_overhead_s must be >= 0, got {layer_overhead_s}")
        self.shape = shape
        self._flops = float(peak_flops)
        self._bandwidth = float(memory_bandwidth)
        self._overhead = float(layer_overhead_s)

    def _roofline(self, flops: float, nbytes: float) -> float:
        return max(flops / self._flops, nbytes / self._bandwidth)

    def dense_s(self, layer: int, step: PassInfo) -> float:
        """Attention, norms, router and any dense MLP of one decoder layer, and the layer's fixed overhead."""
        s = self.shape
        params = s.dense_params[layer]
        flops = 2.0 * step.tokens * params + 4.0 * s.hidden_size * step.attended
        nbytes = (params + 2.0 * s.kv_dim * step.context) * s.dtype_bytes
        return self._roofline(flops, nbytes) + self._overhead

    def expert_s(self, nbytes: int, tokens: int) -> float:
        """One routed expert applied to `tokens` tokens, its weights `nbytes` long."""
        return self._roofline(2.0 * tokens * self.shape.expert_params, nbytes)

    def head_s(self, step: PassInfo) -> float:
        """Final norm and LM head for the last position of each sequence."""
        s = self.shape
        return self._roofline(2.0 * step.sequences * s.head_params, s.head_params * s.dtype_bytes)


class ZeroCompute:
    """Compute that takes no time: for traces that do not say what model they came from."""

    def dense_s(self, layer: int, step: PassInfo) -> float:
        return 0.0

    def expert_s(self, nbytes: int, tokens: int) -> float:
        return 0.0

    def head_s(self, step: PassInfo) -> float:
        return 0.0
