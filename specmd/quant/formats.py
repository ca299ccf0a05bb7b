"""Precision formats for experts, chosen by registered name.

A format packs one expert's weights (the fused gate/up matrix and the down matrix) into a single
contiguous byte buffer, so the cache moves opaque bytes, and computes the expert from that buffer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Weights = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ExpertShape:
    """One routed expert: `hidden` -> 2 x `intermediate` (gate, up) -> `hidden` (down)."""

    hidden: int
    intermediate: int

    @property
    def params(self) -> int:
        return 3 * self.hidden * self.intermediate


class ExpertFormat(ABC):
    """How one expert is stored in bytes and run from them."""

    name: str

    @abstractmethod
    def nbytes(self, shape: ExpertShape) -> int:
        """Exact bytes of one packed expert."""

    @abstractmethod
    def pack(self, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """One contiguous uint8 buffer from gate_up [2I, H] (gate rows first) and down [H, I]."""

    @abstractmethod
    def unpack(self, buffer: torch.Tensor, shape: ExpertShape) -> Weights:
        """Views into `buffer` (wherever it lives) that `forward` computes from."""

    @abstractmethod
    def forward(
        self, x: torch.Tensor, weights: Weights, act_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The expert applied to x [T, H]; returns [T, H]."""


class DenseFormat(ExpertFormat):
    """Plain matrices in one floating dtype; lossless when it is the model's own dtype."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype
        self._itemsize = torch.empty((), dtype=dtype).element_size()

    def nbytes(self, shape: ExpertShape) -> int:
        return shape.params * self._itemsize

    def pack(self, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([gate_up.to(self.dtype).reshape(-1), down.to(self.dtype).reshape(-1)])
        return flat.view(torch.uint8)

    def unpack(self, buffer: torch.Tensor, shape: ExpertShape) -> Weights:
        h, i = shape.hidden, shape.intermediate
        values = buffer.view(self.dtype)
        return values[: 2 * i * h].view(2 * i, h), values[2 * i * h : 3 * i * h].view(h, i)

    def forward(
        self, x: torch.Tensor, weights: Weights, act_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        # The same operations, in the same order, as transformers' eager experts: bit-identical output.
        gate_up, down = weights
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [T, I] each
        return F.linear(act_fn(gate) * up, down)  # [T, H]


_FORMATS: dict[str, ExpertFormat] = {}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_PLANNED = ("int8", "nf4", "fp4", "hqq8", "hqq4", "hqq3", "hqq2", "int4", "int2")


def register_format(fmt: ExpertFormat) -> ExpertFormat:
    """Make `fmt` available under `fmt.name`."""
    if fmt.name in _FORMATS:
        raise ValueError(f"precision {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


for _dtype, _name in _DTYPE_NAMES.items():
    register_format(DenseFormat(_name, _dtype))


def get_format(name: str) -> ExpertFormat:
    """The format registered as `name`; anything else is a ValueError listing the available ones."""
    if name in _FORMATS:
        return _FORMATS[name]
    available = ", ".join(_FORMATS)
    if name in _PLANNED:
        raise ValueError(f"precision {name!r} is not available in this version of specmd; available: {available}")
    raise ValueError(f"unknown precision {name!r}; available: {available}")


def registered_formats() -> list[ExpertFormat]:
    """Every registered format, in registration order."""
    return list(_FORMATS.values())


def precision_of_dtype(dtype: torch.dtype) -> str:
    """The precision name of a floating dtype (bf16, fp16, fp32)."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"experts in {dtype} are not supported; supported dtypes: {', '.join(map(str, _DTYPE_NAMES))}")
    return _DTYPE_NAMES[dtype]
