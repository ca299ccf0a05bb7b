"""Every precision format: round-trip error within stated bounds, exact byte sizes, views into the buffer,
the forward from the packed form, the registry, and the error when an optional library is missing."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from specmd.eval_tasks.quality import relative_error
from specmd.quant import MissingBackendError, canonical_name, get_format, registered_formats
from specmd.quant.formats import ExpertShape

ROOT = Path(__file__).resolve().parents[2]
QUANTIZED = ["int8", "nf4", "fp4", "hqq8", "hqq4", "hqq3", "hqq2"]
DENSE = ["bf16", "fp16", "fp32"]
SHAPE = ExpertShape(hidden=256, intermediate=128)
SIGMA = 0.02  # weights ~ N(0, 0.02^2), transformers' init; errors are relative, so the scale only matters for fp16

# Relative RMS weight error ||W - Q(W)|| / ||W|| for Gaussian weights, with the bound each format must meet.
# A uniform quantizer with step d errs by d / sqrt(12) RMS.
# * HQQ b bits, groups of 64 min-max scaled: d = range / (2^b - 1), and the expected range of 64 Gaussian
#   samples is 4.65 sigma, so the error is 4.65 / (2^b - 1) / sqrt(12): 0.0053, 0.090, 0.192, 0.447 for
#   8, 4, 3, 2 bits. HQQ's zero-point fit only lowers it; the bound allows 5% over the min-max figure.
# * int8, one absmax per row of 128 or 256 weights: d = 2 absmax / 254 with absmax < 3.5 sigma, so < 0.008.
# * NF4 / FP4 (16 levels, absmax per 64): NF4 places its levels at normal quantiles (QLoRA reports ~0.09 on
#   Gaussians), FP4's are exponent-spaced and coarser near the block max (~0.12); bounds 0.10 and 0.13.
# * bf16 / fp16 round to 8 / 11 significant bits: RMS relative error 2^-8 / sqrt(12) = 0.0011 and
#   2^-11 / sqrt(12) = 0.00014 (up to 2x for values just above a power of two); fp32 is exact.
HQQ_MINMAX = {bits: 4.65 / (2**bits - 1) / math.sqrt(12) for bits in (8, 4, 3, 2)}
BOUNDS = {
    "fp32": 0.0,
    "bf16": 2 * 2**-8 / math.sqrt(12),
    "fp16": 2 * 2**-11 / math.sqrt(12),
    "int8": 0.008,
    "nf4": 0.10,
    "fp4": 0.13,
    **{f"hqq{bits}": 1.05 * error for bits, error in HQQ_MINMAX.items()},
}


@pytest.fixture(scope="module")
def expert() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(2 * SHAPE.intermediate, SHAPE.hidden) * SIGMA, torch.randn(
        SHAPE.hidden, SHAPE.intermediate
    ) * SIGMA


@pytest.fixture(scope="module")
def packed(expert: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: get_format(name).pack(*expert) for name in DENSE + QUANTIZED}


def test_every_format_is_registered() -> None:
    assert [fmt.name for fmt in registered_formats()] == DENSE + QUANTIZED


@pytest.mark.parametrize("name", DENSE + QUANTIZED)
def test_round_trip_error_within_its_bound(name: str, expert: tuple[torch.Tensor, torch.Tensor]) -> None:
    error = relative_error(name, *expert)
    assert error <= BOUNDS[name]
    if name in QUANTIZED:
        assert error > BOUNDS[name] / 3  # really quantized: within a factor of 3 of the analysis


def test_fewer_bits_err_more(expert: tuple[torch.Tensor, torch.Tensor]) -> None:
    errors = [relative_error(name, *expert) for name in ("hqq8", "int8", "hqq4", "nf4", "hqq3", "hqq2")]
    assert errors[2:] == sorted(errors[2:]) and max(errors[:2]) < min(errors[2:])


def closed_form_bytes(name: str, shape: ExpertShape) -> int:
    """Bytes of one expert, from each format's documented storage (no padding: real shapes are aligned)."""
    total = 0
    for rows, cols in shape.matrices:
        n, groups = rows * cols, rows * cols // 64
        if name in DENSE:
            total += n * {"fp32": 4, "bf16": 2, "fp16": 2}[name]
        elif name == "int8":
            total += n + 4 * rows  # int8 codes, fp32 absmax per row
        elif name in ("nf4", "fp4"):
            total += n // 2 + 4 * groups  # two codes per byte, fp32 absmax per 64
        elif name == "hqq3":
            total += math.ceil(groups / 10) * 64 * 4 + 2 * 2 * groups  # 10 codes per int32, fp16 scale and zero
        else:
            total += n * int(name[3:]) // 8 + 2 * 2 * groups
    return total


REAL_SHAPES = {  # hidden, expert intermediate
    "olmoe-1b-7b": ExpertShape(2048, 1024),
    "mixtral-8x7b": ExpertShape(4096, 14336),
    "qwen1.5-moe-a2.7b": ExpertShape(2048, 1408),
    "phi-3.5-moe": ExpertShape(4096, 6400),
}


@pytest.mark.parametrize("name", DENSE + QUANTIZED)
def test_bytes_are_exact(name: str, packed: dict[str, torch.Tensor]) -> None:
    fmt = get_format(name)
    assert packed[name].dtype == torch.uint8 and packed[name].dim() == 1
    assert packed[name].numel() == fmt.nbytes(SHAPE) == closed_form_bytes(name, SHAPE)
    for shape in REAL_SHAPES.values():
        assert fmt.nbytes(shape) == closed_form_bytes(name, shape)


def test_the_sizes_people_quote() -> None:
    """OLMoE's expert: 12.58 MB bf16, 6.31 MB int8, 3.54 MB nf4 (0.28x), 1.97 MB hqq2 (0.16x)."""
    olmoe = REAL_SHAPES["olmoe-1b-7b"]
    assert get_format("bf16").nbytes(olmoe) == 12_582_912
    assert get_format("int8").nbytes(olmoe) == 6_307_840
    assert get_format("int4").nbytes(olmoe) == 3_538_944 == round(0.28125 * 12_582_912)
    assert get_format("int2").nbytes(olmoe) == 1_966_080 == round(0.15625 * 12_582_912)


def tensors_of(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, tuple | list):
        return [t for item in value for t in tensors_of(item)]
    return []


@pytest.mark.parametrize("name", DENSE + QUANTIZED)
def test_unpack_views_the_buffer_wherever_it_lives(name: str, packed: dict[str, torch.Tensor]) -> None:
    fmt, buffer = get_format(name), packed[name]
    arena = torch.zeros(buffer.numel() + 192, dtype=torch.uint8)
    slot = arena[64 : 64 + buffer.numel()]  # an arena slot: a view at an offset into a bigger buffer
    slot.copy_(buffer)
    weights = fmt.unpack(slot, SHAPE)
    views = tensors_of(weights)
    assert views
    start, end = slot.data_ptr(), slot.data_ptr() + slot.numel()
    for view in views:  # every tensor is a view into the slot: nothing was allocated or copied
        assert view.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
        assert start <= view.data_ptr() and view.data_ptr() + view.numel() * view.element_size() <= end
    for moved, original in zip(fmt.dequantize(weights), fmt.dequantize(fmt.unpack(buffer, SHAPE)), strict=True):
        assert torch.equal(moved, original)


def reference_forward(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("tokens", [1, 7])
def test_forward_is_the_dequantized_expert(name: str, tokens: int, packed: dict[str, torch.Tensor]) -> None:
    fmt = get_format(name)
    weights = fmt.unpack(packed[name], SHAPE)
    x = torch.randn(tokens, SHAPE.hidden, generator=torch.Generator().manual_seed(tokens))
    out = fmt.forward(x, weights, F.silu)
    expected = reference_forward(*fmt.dequantize(weights), x)
    relative = ((out - expected).norm() / expected.norm()).item()
    # Dequantize-then-matmul formats compute exactly this; int8's kernel also rounds activations to
    # int8 per token (step absmax/127, ~0.5% RMS per matmul).
    assert relative < (0.02 if name == "int8" else 1e-5)
    assert out.shape == (tokens, SHAPE.hidden) and out.dtype == x.dtype


@pytest.mark.parametrize("name", [*QUANTIZED, "fp32"])
def test_forward_keeps_the_activation_dtype(name: str, packed: dict[str, torch.Tensor]) -> None:
    fmt = get_format(name)
    x = torch.randn(3, SHAPE.hidden).bfloat16()
    out = fmt.forward(x, fmt.unpack(packed[name], SHAPE), F.silu)
    expected = reference_forward(*fmt.dequantize(fmt.unpack(packed[name], SHAPE)), x.float())
    assert out.dtype == torch.bfloat16
    assert ((out.float() - expected).norm() / expected.norm()).item() < 0.03


def test_aliases_and_names() -> None:
    assert get_format("int4") is get_format("nf4") and canonical_name("int4") == "nf4"
    assert get_format("int2") is get_format("hqq2") and canonical_name("int2") == "hqq2"
    with pytest.raises(
        ValueError, match=re.escape("unknown precision 'int3'; available: bf16, fp16, fp32, int8, nf4 (int4), fp4")
    ):
        get_format("int3")
    with pytest.raises(ValueError, match="unknown precision"):
        get_format(["int8"])  # type: ignore[arg-type]


def test_a_shape_a_format_cannot_store_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"hqq2 stores matrices with a multiple of 256 weights; \[20, 10\] is not"):
        get_format("hqq2").nbytes(ExpertShape(hidden=10, intermediate=10))


BNB = ["bitsandbytes", "bitsandbytes.functional"]
HQQ = ["hqq", "hqq.core", "hqq.core.quantize"]


@pytest.mark.parametrize(
    ("name", "hidden", "library"),
    [
        ("int8", BNB, "bitsandbytes"),
        ("int4", BNB, "bitsandbytes"),
        ("hqq4", HQQ, "hqq"),
        ("int2", HQQ, "hqq"),
    ],
)
def test_a_missing_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, checkpoint: Path, name: str, hidden: list[str], library: str
) -> None:
    from specmd import OffloadOLMoE

    for module in hidden:
        monkeypatch.setitem(sys.modules, module, None)  # what an absent library looks like to `import`
    message = rf"precision '{canonical_name(name)}' needs {library}, which is not installed; install it with: "
    message += re.escape("pip install 'specmd[quant]'")
    with pytest.raises(MissingBackendError, match=message):
        get_format(name).check_backend()
    with pytest.raises(MissingBackendError, match=message):  # checked before anything loads
        OffloadOLMoE.from_pretrained(checkpoint, cache_frac=0.5, expert_precisions=("fp32", name), progress=False)


def test_quantization_libraries_are_optional_extras_that_the_tests_install() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith(("bitsandbytes", "hqq"))]
    extras = project["optional-dependencies"]
    assert {d.split(">")[0].split("=")[0] for d in extras["quant"]} == {"bitsandbytes", "hqq"}
    assert "specmd[quant]" in extras["test"]  # `make test` installs .[test], so CI runs these tests
    assert "'.[test]'" in (ROOT / "Makefile").read_text()


def test_quantization_libraries_are_imported_only_in_specmd_quant() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+(bitsandbytes|hqq)\b|import_module\(\s*['\"](bitsandbytes|hqq)", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "specmd").rglob("*.py")
        if path.parent.name != "quant" and pattern.search(path.read_text())
    ]
    assert offenders == []
