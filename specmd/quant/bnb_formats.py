"""bitsandbytes formats: int8 (row-wise absmax, LLM.int8 without outlier columns) and 4-bit NF4 / FP4.

The library is imported only when a format is used; `import bitsandbytes` alone takes seconds (it
imports torch._dynamo), and it is an optional extra.
"""

from __future__ import annotations

import logging
from importlib import metadata
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from specmd.quant.formats import Field, MatrixFormat, import_backend, register_format

BLOCKSIZE = 64  # 4-bit absmax block: bitsandbytes' default, and what QLoRA and transformers use


def _functional(precision: str) -> ModuleType:
    # On CPUs with AVX512-BF16 the import logs that an optional fused kernel package ("kernels") is
    # missing; bitsandbytes then uses its own CPU kernels, so the warning is noise for specmd users.
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return import_backend("bitsandbytes.functional", precision)
    finally:
        logger.setLevel(level)


class _BnbFormat(MatrixFormat):
    library = "bitsandbytes.functional"

    def __init__(self) -> None:
        self._bf: ModuleType | None = None

    @property
    def bf(self) -> ModuleType:
        """bitsandbytes.functional, imported on first use."""
        if self._bf is None:
            self._bf = _functional(self.name)
        return self._bf

    def check_backend(self) -> None:
        _functional(self.name)  # every time: a test may hide an installed library

    def params(self) -> dict[str, Any]:
        return super().params() | {"bitsandbytes": metadata.version("bitsandbytes")}


class Int8Format(_BnbFormat):
    """int8 weights with one fp32 absmax scale per output row (bitsandbytes' LLM.int8 storage, no outliers).

    Outlier columns (LLM.int8's mixed-precision decomposition) would make an expert's size depend on
    its data; a cache slot needs a fixed size, so every column is int8 (threshold 0).

    Bytes per [rows, cols] matrix: rows x cols + 4 x rows.
    """

    name = "int8"
    bits = 8

    def fields(self, rows: int, cols: int) -> list[Field]:
        return [Field("q", torch.int8, (rows, cols)), Field("scale", torch.float32, (rows,))]

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale, _ = self.bf.int8_vectorwise_quant(weight)  # [rows, cols] int8, [rows] fp32 absmax
        return {"q": q, "scale": scale}

    def linear(self, x: torch.Tensor, matrix: Any) -> torch.Tensor:
        # bitsandbytes' int8 kernel: activations are quantized per row to int8 too, multiplied in int32
        # (torch._int_mm on CPUs with AVX-512, cuBLASLt on CUDA) and rescaled. Measured here against
        # dequantizing to x's dtype then F.linear, it was 1.3-3.2x faster for an OLMoE-sized matrix at
        # 1 and 8 tokens, bf16 and fp32, because it never writes a full-size dequantized matrix (see
        # benchmarks/RESULTS.md). The cost is activation rounding (~0.5% RMS per matmul).
        xq, xscale, _ = self.bf.int8_vectorwise_quant(x.float())  # [T, cols] int8, [T] fp32
        return torch.ops.bitsandbytes.int8_scaled_mm.default(xq, matrix["q"], xscale, matrix["scale"], dtype=x.dtype)

    def dequantize_matrix(self, matrix: Any, dtype: torch.dtype) -> torch.Tensor:
        # q x absmax / 127, as bitsandbytes' int8_vectorwise_dequant, but straight in `dtype` (its op
        # goes through float32 and measured 20-40x slower than this here).
        return matrix["q"].to(dtype).mul_((matrix["scale"] / 127).to(dtype)[:, None])


class _Packed4(NamedTuple):
    q: torch.Tensor  # [ceil(rows x cols / 2)] uint8, two codes per byte
    absmax: torch.Tensor  # [ceil(rows x cols / BLOCKSIZE)] fp32
    shape: tuple[int, int]


class FourBitFormat(_BnbFormat):
    """bitsandbytes 4-bit: 16-value codebook (NF4 or FP4) per weight, one fp32 absmax per 64 weights.

    Bytes per [rows, cols] matrix: ceil(n / 2) + 4 x ceil(n / 64) for n = rows x cols (0.5625 B per weight).
    """

    bits = 4

    def __init__(self, name: str, quant_type: str) -> None:
        super().__init__()
        self.name = name
        self.quant_type = quant_type

    def params(self) -> dict[str, Any]:
        return super().params() | {"quant_type": self.quant_type, "blocksize": BLOCKSIZE}

    def fields(self, rows: int, cols: int) -> list[Field]:
        n = rows * cols
        return [Field("q", torch.uint8, (-(-n // 2),)), Field("absmax", torch.float32, (-(-n // BLOCKSIZE),))]

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, state = self.bf.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type=self.quant_type)
        return {"q": q.reshape(-1), "absmax": state.absmax}

    def matrix(self, views: dict[str, torch.Tensor], rows: int, cols: int) -> Any:
        return _Packed4(views["q"], views["absmax"], (rows, cols))

    def linear(self, x: torch.Tensor, matrix: Any) -> torch.Tensor:
        # Dequantize then F.linear. bitsandbytes' own matmul_4bit does exactly this on CPU for this
        # (portable) layout; its fused CPU kernel needs a machine-specific repacked layout and
        # bf16-only compute, which would tie cached bytes to one machine (see benchmarks/RESULTS.md).
        return F.linear(x, self.dequantize_matrix(matrix, x.dtype))

    def dequantize_matrix(self, matrix: Any, dtype: torch.dtype) -> torch.Tensor:
        # Blocks run over the flattened matrix, but bitsandbytes 0.50.2's CPU kernel assumes they lie
        # within rows: with fewer columns than BLOCKSIZE it reads the wrong absmax (a 4x error, tested).
        # Asking for BLOCKSIZE-wide rows makes both agree; the result is then viewed in the real shape.
        rows, cols = matrix.shape
        n = rows * cols
        flat = (n // BLOCKSIZE, BLOCKSIZE) if n % BLOCKSIZE == 0 else (1, n)
        state = self.bf.QuantState(
            absmax=matrix.absmax, shape=torch.Size(flat), dtype=dtype, blocksize=BLOCKSIZE, quant_type=self.quant_type
        )
        return self.bf.dequantize_4bit(matrix.q, state).view(rows, cols)


register_format(Int8Format())
register_format(FourBitFormat("nf4", "nf4"))
register_format(FourBitFormat("fp4", "fp4"))
