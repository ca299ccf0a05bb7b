"""Precision formats for experts, chosen by registered name.

A format packs one expert's weights (the fused gate/up matrix and the down matrix) into a single
contiguous byte buffer, so the cache moves opaque bytes, and computes the expert from that buffer:
`unpack` turns the buffer (wherever it lives: host memory or an arena slot) into views, allocating
nothing the size of the weights, and `forward` runs the expert from those views.

Formats whose library is an optional extra (bitsandbytes, HQQ) import it only when used; a missing
library is a `MissingBackendError` that names the extra to install.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from specmd.quant import names

Weights = tuple[Any, ...]
"""What `unpack` returns and `forward` takes: views into the packed buffer and small metadata."""

Activation = Callable[[torch.Tensor], torch.Tensor]

QUANT_EXTRA = "pip install 'specmd[quant]'"


class MissingBackendError(ImportError):
    """A precision's library (an optional extra) is not installed."""


@dataclass(frozen=True)
class ExpertShape:
    """One routed expert: `hidden` -> 2 x `intermediate` (gate, up) -> `hidden` (down)."""

    hidden: int
    intermediate: int

    @property
    def params(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def matrices(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(rows, columns) of gate_up [2I, H] and down [H, I], in the nn.Linear [out, in] layout."""
        return (2 * self.intermediate, self.hidden), (self.hidden, self.intermediate)


class ExpertFormat(ABC):
    """How one expert is stored in bytes and run from them.

    Attributes:
        name: the registered precision name (what cache keys carry).
        bits: nominal bits per weight, scales and other metadata excluded (16, 8, 4, 3, 2).
        library: the optional library the format needs (None: torch alone).
        persist: whether packing is costly enough that packed copies are saved on disk.
    """

    name: str
    bits: float
    library: str | None = None
    persist: bool = False

    def params(self) -> dict[str, Any]:
        """Everything the packed bytes depend on besides the weights (names the persisted copies)."""
        return {"name": self.name}

    def check_backend(self) -> None:
        """Raise `MissingBackendError` (naming the extra to install) when the format's library is missing."""
        if self.library is not None:
            import_backend(self.library, self.name)

    @abstractmethod
    def nbytes(self, shape: ExpertShape) -> int:
        """Exact bytes of one packed expert (scales, zeros and alignment padding included)."""

    @abstractmethod
    def pack(self, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """One contiguous uint8 buffer of `nbytes` from gate_up [2I, H] (gate rows first) and down [H, I]."""

    @abstractmethod
    def unpack(self, buffer: torch.Tensor, shape: ExpertShape) -> Weights:
        """Views into `buffer` (wherever it lives) that `forward` computes from; allocates nothing big."""

    @abstractmethod
    def forward(self, x: torch.Tensor, weights: Weights, act_fn: Activation) -> torch.Tensor:
        """The expert applied to x [T, H]; returns [T, H] in x's dtype."""

    @abstractmethod
    def dequantize(self, weights: Weights, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights the format stands for, as (gate_up [2I, H], down [H, I]) in `dtype`."""


def import_backend(module: str, precision: str) -> ModuleType:
    """Import an optional backend library, or raise a `MissingBackendError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        distribution = module.split(".")[0]
        raise MissingBackendError(
            f"precision {precision!r} needs {distribution}, which is not installed; install it with: {QUANT_EXTRA}"
        ) from exc


class DenseFormat(ExpertFormat):
    """Plain matrices in one floating dtype; lossless when it is the model's own dtype."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        self.bits = 8 * self._itemsize

    def nbytes(self, shape: ExpertShape) -> int:
        return shape.params * self._itemsize

    def pack(self, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([gate_up.to(self.dtype).reshape(-1), down.to(self.dtype).reshape(-1)])
        return flat.view(torch.uint8)

    def unpack(self, buffer: torch.Tensor, shape: ExpertShape) -> Weights:
        h, i = shape.hidden, shape.intermediate
        values = buffer.view(self.dtype)
        return values[: 2 * i * h].view(2 * i, h), values[2 * i * h : 3 * i * h].view(h, i)

    def forward(self, x: torch.Tensor, weights: Weights, act_fn: Activation) -> torch.Tensor:
        # The same operations, in the same order, as transformers' eager experts: bit-identical output
        # when the format is the model's dtype. Another float format is cast to the model's dtype first.
        gate_up, down = weights
        if gate_up.dtype != x.dtype:
            gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [T, I] each
        return F.linear(act_fn(gate) * up, down)  # [T, H]

    def dequantize(self, weights: Weights, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = weights
        return gate_up.to(dtype), down.to(dtype)


# ---- packing several tensors into one buffer ---------------------------------------------------
ALIGN = 16  # bytes; every field starts here, so views of any dtype (up to 16-byte vectors) are aligned


@dataclass(frozen=True)
class Field:
    """One tensor inside a packed buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


class Layout:
    """Where each field of a packed expert lies in its buffer: in order, each aligned to `ALIGN` bytes.

    The total is padded to `ALIGN` too, so buffers stacked back to back (a layer's experts in one
    tensor) keep every field aligned.
    """

    def __init__(self, fields: Iterable[Field]) -> None:
        self.fields = tuple(fields)
        self.offsets: dict[str, int] = {}
        offset = 0
        for field in self.fields:
            self.offsets[field.name] = offset
            offset = _round_up(offset + field.nbytes, ALIGN)
        self.nbytes = max(offset, ALIGN)

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A zero-padded uint8 buffer holding `tensors` (one per field, cast to the field's dtype)."""
        buffer = torch.zeros(self.nbytes, dtype=torch.uint8)
        for field in self.fields:
            value = tensors[field.name].to(field.dtype).reshape(field.shape)
            start = self.offsets[field.name]
            buffer[start : start + field.nbytes].view(field.dtype).view(field.shape).copy_(value)
        return buffer

    def unpack(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of every field into `buffer` (uint8, `nbytes` long)."""
        if buffer.numel() != self.nbytes:
            raise ValueError(f"a packed expert of this format takes {self.nbytes} B, got a buffer of {buffer.numel()}")
        views = {}
        for field in self.fields:
            start = self.offsets[field.name]
            views[field.name] = buffer[start : start + field.nbytes].view(field.dtype).view(field.shape)
        return views


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class MatrixFormat(ExpertFormat):
    """A quantized format that packs each of the expert's two matrices on its own into one buffer.

    Subclasses say which fields one [rows, cols] matrix needs, how to quantize it, and how to run
    `x @ W.T` (and dequantize) from the views of those fields.
    """

    persist = True

    @abstractmethod
    def fields(self, rows: int, cols: int) -> list[Field]:
        """The fields of one quantized [rows, cols] matrix (names without prefix)."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The field values for `weight` [rows, cols] (float32, on the CPU)."""

    @abstractmethod
    def linear(self, x: torch.Tensor, matrix: Any) -> torch.Tensor:
        """x [T, cols] @ W.T -> [T, rows] in x's dtype, from what `matrix` returned."""

    @abstractmethod
    def dequantize_matrix(self, matrix: Any, dtype: torch.dtype) -> torch.Tensor:
        """W [rows, cols] in `dtype`."""

    def matrix(self, views: dict[str, torch.Tensor], rows: int, cols: int) -> Any:
        """What `linear` needs for one matrix, from its field views (default: the views themselves)."""
        return views

    def check_shape(self, rows: int, cols: int) -> None:
        """Raise ValueError when a [rows, cols] matrix cannot be stored in this format."""

    @lru_cache(maxsize=64)  # noqa: B019  (formats are registry singletons; shapes are few)
    def layout(self, shape: ExpertShape) -> Layout:
        """The byte layout of one expert of `shape`."""
        fields = []
        for prefix, (rows, cols) in zip(("gate_up", "down"), shape.matrices, strict=True):
            self.check_shape(rows, cols)
            fields += [Field(f"{prefix}.{f.name}", f.dtype, f.shape) for f in self.fields(rows, cols)]
        return Layout(fields)

    def nbytes(self, shape: ExpertShape) -> int:
        return self.layout(shape).nbytes

    def pack(self, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        shape = ExpertShape(hidden=gate_up.shape[1], intermediate=down.shape[1])
        values = {}
        for prefix, weight in (("gate_up", gate_up), ("down", down)):
            for name, value in self.quantize(weight.detach().to("cpu", torch.float32)).items():
                values[f"{prefix}.{name}"] = value
        return self.layout(shape).pack(values)

    def unpack(self, buffer: torch.Tensor, shape: ExpertShape) -> Weights:
        views = self.layout(shape).unpack(buffer)
        matrices = []
        for prefix, (rows, cols) in zip(("gate_up", "down"), shape.matrices, strict=True):
            own = {name.split(".", 1)[1]: view for name, view in views.items() if name.startswith(prefix + ".")}
            matrices.append(self.matrix(own, rows, cols))
        return tuple(matrices)

    def forward(self, x: torch.Tensor, weights: Weights, act_fn: Activation) -> torch.Tensor:
        gate_up, down = weights
        gate, up = self.linear(x, gate_up).chunk(2, dim=-1)  # [T, I] each
        return self.linear(act_fn(gate) * up, down)  # [T, H]

    def dequantize(self, weights: Weights, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = weights
        return self.dequantize_matrix(gate_up, dtype), self.dequantize_matrix(down, dtype)


# ---- the registry ------------------------------------------------------------------------------
_FORMATS: dict[str, ExpertFormat] = {}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def register_format(fmt: ExpertFormat, aliases: tuple[str, ...] = ()) -> ExpertFormat:
    """Make `fmt` available under `fmt.name` (and `aliases`, declared in `specmd.quant.names`)."""
    if fmt.name in _FORMATS:
        raise ValueError(f"precision {fmt.name!r} is already registered")
    names.declare(fmt.name, aliases)
    _FORMATS[fmt.name] = fmt
    return fmt


for _dtype, _name in _DTYPE_NAMES.items():
    register_format(DenseFormat(_name, _dtype))


def _builtin_formats() -> dict[str, ExpertFormat]:
    """The registry, with the formats of the optional libraries registered (their modules import lazily)."""
    from specmd.quant import bnb_formats, hqq_formats  # noqa: F401  (registers them)

    return _FORMATS


def canonical_name(name: str) -> str:
    """The registered name `name` stands for (an alias resolves to its format's name)."""
    canonical = names.canonical_precision(name)
    if canonical not in _builtin_formats():
        raise ValueError(f"precision {name!r} has no registered format; available: {names.available_names()}")
    return canonical


def get_format(name: str) -> ExpertFormat:
    """The format registered as `name` (or an alias of it); anything else is a ValueError listing them."""
    return _FORMATS[canonical_name(name)]


def registered_formats() -> list[ExpertFormat]:
    """Every registered format, in registration order."""
    return list(_builtin_formats().values())


def precision_of_dtype(dtype: torch.dtype) -> str:
    """The precision name of a floating dtype (bf16, fp16, fp32)."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"experts in {dtype} are not supported; supported dtypes: {', '.join(map(str, _DTYPE_NAMES))}")
    return _DTYPE_NAMES[dtype]
