"""Bad input: one clear error naming the value and what is allowed; nothing loaded, no thread left."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from specmd import AutoOffloadForCausalLM, OffloadOLMoE
from specmd.offload_models.checkpoint import CheckpointError
from tests.conftest import EXPERT_BYTES


def load(path: Path, **kwargs):  # type: ignore[no-untyped-def]
    return OffloadOLMoE.from_pretrained(path, progress=False, **kwargs)


@pytest.mark.parametrize("value", [0, -0.1, 1.5, "0.05", True, float("nan"), None])
def test_cache_frac_must_be_a_number_in_0_1(checkpoint: Path, value: object) -> None:
    match = "exactly one of cache_frac and cache_bytes" if value is None else "cache_frac must be a number"
    with pytest.raises(ValueError, match=match):
        load(checkpoint, cache_frac=value)


def test_exactly_one_of_cache_frac_and_cache_bytes(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of cache_frac and cache_bytes"):
        load(checkpoint, cache_frac=0.5, cache_bytes=10**6)


@pytest.mark.parametrize("value", [0, -1, 2.5, "0.5B", "3 parsecs", True])
def test_cache_bytes_must_be_a_positive_size(checkpoint: Path, value: object) -> None:
    with pytest.raises(ValueError, match=r"cache_bytes must be a positive whole number of bytes, or a size such as"):
        load(checkpoint, cache_bytes=value)


def test_capacity_below_one_expert_names_the_smallest_legal_one(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=rf"less than one expert \({EXPERT_BYTES} B\).*cache_bytes >= {EXPERT_BYTES}"):
        load(checkpoint, cache_bytes=EXPERT_BYTES - 1)
    with pytest.raises(ValueError, match=r"cache_frac=0\.01 "):
        load(checkpoint, cache_frac=0.01)


@pytest.mark.parametrize(
    ("policy", "listed"),
    [
        ("topk/mru/fetch/standard", "valid eviction policies: lru, least-stale \\(ls\\)"),
        ("psychic/lru/fetch/standard", "valid prefetch policies: none, topk"),
        ("none/lru/guess/standard", "valid miss policies: fetch"),
        ("none/lru/fetch/teleport", "valid routing policies: standard \\(stnd\\)"),
        ("lru", "must have 4 parts"),
        ("topk:depth=2/lru/fetch/standard", "no parameter 'depth'; its parameters: overfetch"),
        ("topk:overfetch=0/lru/fetch/standard", "overfetch must be a finite number in \\(0, 1000000\\]"),
        ({"evict": "lru"}, "unknown part 'evict'"),
    ],
)
def test_bad_policies_list_what_is_valid(checkpoint: Path, policy: object, listed: str) -> None:
    with pytest.raises(ValueError, match=listed):
        load(checkpoint, cache_frac=0.5, policy=policy)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bandwidth_gbps": -5}, "bandwidth_gbps must be a number > 0"),
        ({"storage": "tape"}, "storage 'tape' is not available; available: ram, disk"),
        ({"expert_precisions": ("int4", "nf4")}, r"names the precision 'nf4' twice \(int4, nf4\)"),
        ({"expert_precisions": ("bf17",)}, r"unknown precision 'bf17'; available: bf16, fp16, fp32, int8, nf4"),
        ({"expert_precisions": ()}, "expert_precisions must name at least one precision"),
        ({"hardware": "abacus"}, "unknown hardware profile .abacus.; available: a100, rtx4090"),
        ({"compute_time": "guessed"}, "compute_time must be one of profile, measured"),
    ],
)
def test_other_settings(checkpoint: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load(checkpoint, cache_frac=0.5, **kwargs)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_a_dense_model_is_refused(llama: Path) -> None:
    with pytest.raises(ValueError, match="OffloadOLMoE loads 'olmoe' checkpoints; this one is 'llama'"):
        load(llama, cache_frac=0.5)
    with pytest.raises(ValueError, match="model type 'llama' is not supported by specmd; supported: olmoe"):
        AutoOffloadForCausalLM.from_pretrained(llama, cache_frac=0.5)


def test_auto_loads_olmoe(checkpoint: Path) -> None:
    with AutoOffloadForCausalLM.from_pretrained(checkpoint, cache_frac=0.5, progress=False) as model:
        assert isinstance(model, OffloadOLMoE)


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def test_missing_weights_file(checkpoint: Path, tmp_path: Path) -> None:
    path = copy_of(checkpoint, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds no model\.safetensors"):
        load(path, cache_frac=0.5)


def test_missing_shard(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = copy_of(checkpoints["sharded"], tmp_path)
    next(path.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint file .* is missing"):
        load(path, cache_frac=0.5)


def test_truncated_weights_file(checkpoint: Path, tmp_path: Path) -> None:
    path = copy_of(checkpoint, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load(path, cache_frac=0.5)


def rewrite_without(path: Path, dropped: str) -> None:
    tensors = load_file(path / "model.safetensors")
    del tensors[dropped]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_expert_weights(checkpoint: Path, tmp_path: Path) -> None:
    path = copy_of(checkpoint, tmp_path)
    rewrite_without(path, "model.layers.2.mlp.experts.5.up_proj.weight")
    with pytest.raises(CheckpointError, match="no weights for expert 5 of layer 2"):
        load(path, cache_frac=0.5)


def test_missing_dense_weights(checkpoint: Path, tmp_path: Path) -> None:
    path = copy_of(checkpoint, tmp_path)
    rewrite_without(path, "model.layers.1.self_attn.q_proj.weight")
    with pytest.raises(CheckpointError, match=r"lacks 1 weight.*model\.layers\.1\.self_attn\.q_proj\.weight"):
        load(path, cache_frac=0.5)


def rewrite(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


DOWN = "model.layers.1.mlp.experts.3.down_proj.weight"  # [hidden 32, intermediate 16]


SHAPE_ERROR = r"down_proj.weight has shape \[{}\], expected \[32, 16\]"
EXTRA = "model.layers.0.mlp.experts.16.up_proj.weight"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda t: t.update({DOWN: t[DOWN].T.contiguous()}), SHAPE_ERROR.format("16, 32")),  # transposed
        (lambda t: t.update({DOWN: torch.zeros(15, 32)}), SHAPE_ERROR.format("15, 32")),
        (lambda t: t.update({EXTRA: torch.zeros(16, 32)}), "experts.16.up_proj.weight is expert 16, but the config "
         "has 16 experts per layer"),
        (lambda t: t.update({DOWN: t[DOWN].half()}), r"down_proj.weight is F16, but .* is F32"),
    ],
)  # fmt: skip
def test_expert_tensors_are_checked_by_shape_and_dtype(checkpoint: Path, tmp_path: Path, change, error: str) -> None:  # type: ignore[no-untyped-def]
    path = copy_of(checkpoint, tmp_path)
    rewrite(path, change)
    with pytest.raises(CheckpointError, match=error) as raised:
        load(path, cache_frac=0.5)
    assert str(path) in str(raised.value)


def test_a_fused_tensor_with_too_few_experts(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = copy_of(checkpoints["fused"], tmp_path)
    name = "model.layers.2.mlp.experts.gate_up_proj"
    rewrite(path, lambda t: t.update({name: t[name][:15].contiguous()}))
    with pytest.raises(CheckpointError, match=r"gate_up_proj has shape \[15, 32, 32\], expected \[16, 32, 32\]"):
        load(path, cache_frac=0.5)
