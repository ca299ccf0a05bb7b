"""HQQ formats (half-quadratic quantization): 8, 4, 3 and 2 bits with a scale and zero per group of 64 weights.

HQQ needs no calibration data: it fits each group's zero point to the weights alone (`optimize=True`,
a few proximal iterations). Its quantizer defaults to `device="cuda"`; specmd always passes the device.
"""

from __future__ import annotations

from importlib import metadata
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from specmd.quant.formats import Field, MatrixFormat, import_backend, register_format

GROUP_SIZE = 64  # HQQ's default group (hqq.core.quantize.BaseQuantizeConfig)
META_DTYPE = torch.float16  # scale and zero; HQQ keeps them in its compute dtype (fp16 by default)
FP16_MAX = 65504.0
_PACKING = {8: ("8bit_u8", torch.uint8, 1), 4: ("4bit_u8", torch.uint8, 2), 3: ("3bit_32", torch.int32, 10),
            2: ("2bit_u8", torch.uint8, 4)}  # fmt: skip
"""nbits -> (HQQ's bit-packing name, packed dtype, groups per packed row)."""


class _Matrix(NamedTuple):
    q: torch.Tensor  # packed codes [packed rows, GROUP_SIZE]
    scale: torch.Tensor  # [groups] fp16
    zero: torch.Tensor  # [groups] fp16
    shape: tuple[int, int]


class HqqFormat(MatrixFormat):
    """HQQ at `nbits`: codes grouped 64 consecutive weights along each row (axis=1), fp16 scale and zero per group.

    Bytes per [rows, cols] matrix with g = rows x cols / 64 groups: 64 x g x nbits / 8 of codes (3-bit:
    10 codes per int32, g padded to a multiple of 10) + 4 x g of scale and zero.
    """

    library = "hqq.core.quantize"

    def __init__(self, nbits: int) -> None:
        self.nbits = nbits
        self.name = f"hqq{nbits}"
        self.bits = nbits
        self._packing, self._dtype, self._per_row = _PACKING[nbits]
        self._hqq: ModuleType | None = None

    @property
    def quantizer(self) -> Any:
        """hqq's `Quantizer`, imported on first use."""
        if self._hqq is None:
            self._hqq = import_backend(self.library, self.name)
        return self._hqq.Quantizer

    def params(self) -> dict[str, Any]:
        return super().params() | {
            "hqq": metadata.version("hqq"),
            "group_size": GROUP_SIZE,
            "axis": 1,
            "optimize": True,
            "round_zero": self.nbits == 4,
            "meta_dtype": str(META_DTYPE),
        }

    def check_shape(self, rows: int, cols: int) -> None:
        n = rows * cols
        groups = n // GROUP_SIZE
        # HQQ's 4- and 2-bit packing stacks 2 or 4 groups per row and drops a remainder.
        multiple = GROUP_SIZE * (self._per_row if self._dtype == torch.uint8 else 1)
        if n % multiple or not groups:
            raise ValueError(
                f"{self.name} stores matrices with a multiple of {multiple} weights; [{rows}, {cols}] is not"
            )

    def fields(self, rows: int, cols: int) -> list[Field]:
        groups = rows * cols // GROUP_SIZE
        packed_rows = -(-groups // self._per_row)
        return [
            Field("q", self._dtype, (packed_rows, GROUP_SIZE)),
            Field("scale", META_DTYPE, (groups,)),
            Field("zero", META_DTYPE, (groups,)),
        ]

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, meta = self.quantizer.quantize(
            weight,
            nbits=self.nbits,
            channel_wise=True,
            group_size=GROUP_SIZE,
            optimize=True,
            round_zero=self.nbits == 4,
            axis=1,
            bitpack=True,
            device=weight.device.type,  # HQQ's default is "cuda"
        )
        return {
            "q": q,
            "scale": meta["scale"].reshape(-1).clamp(-FP16_MAX, FP16_MAX),
            "zero": meta["zero"].reshape(-1).clamp(-FP16_MAX, FP16_MAX),
        }

    def matrix(self, views: dict[str, torch.Tensor], rows: int, cols: int) -> Any:
        return _Matrix(views["q"], views["scale"], views["zero"], (rows, cols))

    def linear(self, x: torch.Tensor, matrix: Any) -> torch.Tensor:
        # Dequantize then F.linear, as HQQLinear does off the GPU: HQQ's fused kernels (torchao, gemlite,
        # Marlin, BitBLAS) are CUDA-only, so on this machine there is no library kernel to compare.
        return F.linear(x, self.dequantize_matrix(matrix, x.dtype))

    def dequantize_matrix(self, matrix: Any, dtype: torch.dtype) -> torch.Tensor:
        # HQQ's own bit unpacking, then its formula (W_q - zero) * scale, done in place on the one
        # full-size temporary (Quantizer.dequantize allocates three).
        groups = matrix.scale.shape[0]
        codes = self.quantizer.unpack[self._packing](matrix.q, dtype=dtype)[:groups]  # [groups, GROUP_SIZE]
        # Cast the per-group metadata (1/64 of the weights) first: mixed-dtype in-place ops are several times slower.
        codes.sub_(matrix.zero.to(dtype)[:, None]).mul_(matrix.scale.to(dtype)[:, None])
        return codes.view(matrix.shape)


for _bits in (8, 4, 3, 2):
    register_format(HqqFormat(_bits))
