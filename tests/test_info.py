"""`specmd info`: the four real models' expert figures from their configs alone (the bundled configs)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from specmd import cli
from specmd.offload_models.info import BUNDLED_CONFIGS, CAPACITY_FRACTIONS, load_config, model_info

CONFIGS = BUNDLED_CONFIGS
# name: (model_type, layers, experts per layer, top-k, bf16 bytes per expert, published total parameters)
REAL_MODELS = {
    "olmoe-1b-7b": ("olmoe", 16, 64, 8, 3 * 2048 * 1024 * 2, 6.9e9),
    "mixtral-8x7b": ("mixtral", 32, 8, 2, 3 * 4096 * 14336 * 2, 46.7e9),
    "qwen1.5-moe-a2.7b": ("qwen2_moe", 24, 60, 4, 3 * 2048 * 1408 * 2, 14.3e9),
    "phi-3.5-moe": ("phimoe", 32, 16, 2, 3 * 4096 * 6400 * 2, 41.9e9),
}


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_models_from_their_configs(name: str) -> None:
    model_type, layers, experts, top_k, expert_bytes, published = REAL_MODELS[name]
    info = model_info(load_config(CONFIGS / name))
    assert (info.model_type, info.num_layers) == (model_type, layers)
    assert (info.experts_per_layer, info.top_k) == (experts, top_k)
    assert info.moe_layers == tuple(range(layers))  # all four models are sparse in every layer
    assert info.stored_precision == "bf16"
    sizes = {p.precision: p for p in info.precisions}
    assert {"bf16", "fp16", "fp32"} <= set(sizes)
    assert sizes["bf16"].bytes_per_expert == sizes["fp16"].bytes_per_expert == expert_bytes
    assert sizes["fp32"].bytes_per_expert == 2 * expert_bytes
    routed = layers * experts
    assert info.routed_experts == routed and sizes["bf16"].total_bytes == routed * expert_bytes
    # Routed experts are most of each model, and the rest (attention, embeddings, shared experts) under 2B weights.
    assert 0 < published - routed * info.expert_params < 2e9
    # A cache fraction counts every expert at full precision (the stored bf16), whatever precision fills it.
    assert info.full_precision == "bf16"
    for p in info.precisions:
        assert [c.cache_frac for c in p.capacities] == list(CAPACITY_FRACTIONS)
        for c in p.capacities:
            assert c.bytes == int(c.cache_frac * sizes["bf16"].total_bytes)
            assert c.experts == min(c.bytes // p.bytes_per_expert, routed)


def test_the_papers_anchors() -> None:
    """OLMoE-1B-7B at 5% is ~0.6 GB of bf16 experts; Mixtral-8x7B's experts need ~90 GB."""
    olmoe = model_info(load_config(CONFIGS / "olmoe-1b-7b")).precisions[0]
    assert olmoe.precision == "bf16" and round(olmoe.capacities[1].bytes / 1e9, 1) == 0.6
    assert olmoe.capacities[1].experts == 51  # of 1024
    mixtral = model_info(load_config(CONFIGS / "mixtral-8x7b")).precisions[0]
    assert 88e9 < mixtral.total_bytes < 91e9
    assert [c.experts for c in mixtral.capacities] == [2, 12, 64]  # 1%, 5%, 25% of 256


@pytest.mark.parametrize("name", REAL_MODELS)
def test_other_weights_and_routed_experts_make_the_published_size(name: str) -> None:
    published = REAL_MODELS[name][-1]
    info = model_info(load_config(CONFIGS / name))
    counted = info.dense_bytes // 2 + info.routed_experts * info.expert_params  # bf16: 2 bytes a weight
    assert abs(counted - published) / published < 0.02


def test_memory_needs_match_a_real_model() -> None:
    """The bundled model, loaded by stock transformers: its non-expert weights' bytes, and the KV cache a
    forward pass of 37 tokens leaves, are what `info` says."""
    import torch
    from transformers import AutoModelForCausalLM

    from specmd import default_model_path

    model = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    info = model_info(load_config(default_model_path()), kv_tokens=37)
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp.experts." not in n)
    assert info.dense_bytes == dense
    with torch.no_grad():
        cache = model(torch.arange(37)[None] % 100, use_cache=True).past_key_values
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert info.kv_bytes_per_token * 37 == kv
    for need, frac in zip(info.device, CAPACITY_FRACTIONS, strict=True):
        assert need.cache_frac == frac and need.kv_bytes == kv and need.dense_bytes == dense
        assert need.total_bytes == need.cache_bytes + dense + kv
        assert need.cache_bytes == info.precisions[0].capacities[CAPACITY_FRACTIONS.index(frac)].bytes


def test_a_config_file_and_its_directory_agree() -> None:
    folder = CONFIGS / "qwen1.5-moe-a2.7b"
    assert model_info(load_config(folder / "config.json")) == model_info(load_config(folder))


def specmd(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("specmd")
    env = os.environ | {"COLUMNS": "200"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def test_console_script_json() -> None:
    run = specmd("info", str(CONFIGS / "mixtral-8x7b"), "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["model_type"], result["offload_class"], result["top_k"]) == ("mixtral", "OffloadMixtral", 2)
    assert result["routed_experts"] == 256 and len(result["moe_layers"]) == 32
    bf16 = next(p for p in result["precisions"] if p["precision"] == "bf16")
    assert bf16["bytes_per_expert"] == 352_321_536 and bf16["total_bytes"] == 256 * 352_321_536
    assert [c["experts"] for c in bf16["capacities"]] == [2, 12, 64]


def test_device_memory_for_the_capacity_and_context_asked_for() -> None:
    run = specmd("info", "mixtral-8x7b", "--cache-frac", "0.05", "0.5", "--kv-tokens", "4096", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    total = 256 * 352_321_536
    kv = 4096 * 2 * 32 * 8 * 128 * 2  # tokens x (keys, values) x layers x kv heads x head dim x bf16
    assert [d["cache_bytes"] for d in result["device"]] == [int(0.05 * total), int(0.5 * total)]
    for need in result["device"]:
        assert need["kv_tokens"] == 4096 and need["kv_bytes"] == kv == 4096 * result["kv_bytes_per_token"]
        assert need["total_bytes"] == need["cache_bytes"] + result["dense_bytes"] + kv
    assert [c["cache_frac"] for c in result["precisions"][0]["capacities"]] == [0.05, 0.5]


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    shown = Console(width=200, record=True, file=io.StringIO())
    errors = Console(width=200, record=True, file=io.StringIO())
    monkeypatch.setattr(cli, "out", shown)
    monkeypatch.setattr(cli, "err", errors)
    code = cli.main(list(args))
    return code, shown.export_text(), errors.export_text()


def test_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out = tmp_path / "info.json"
    code, shown, _ = run_cli(monkeypatch, "info", str(CONFIGS / "olmoe-1b-7b"), "--out", str(out))
    assert code == 0
    assert "16 of 16 layers are MoE; 64 experts per layer, top-8; 1024 routed experts" in shown
    assert "bf16 (stored)" in shown and "12.58 MB" in shown and "12.88 GB" in shown
    assert "644.25 MB: 51 experts" in shown  # 5%
    assert "fast memory at batch 1 with 1,000 tokens of context" in shown
    assert "953.42 MB" in shown and "131.07 MB per 1,000 tokens" in shown and "1.73 GB" in shown  # 5%: the total
    assert json.loads(out.read_text())["routed_experts"] == 1024


def test_default_means_the_bundled_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from specmd import default_model

    monkeypatch.setattr(default_model, "default_model_path", lambda: CONFIGS / "phi-3.5-moe")
    code, shown, _ = run_cli(monkeypatch, "info", "default")
    assert code == 0 and "loads as OffloadPhi" in shown


def test_table_names_dense_layers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = json.loads((CONFIGS / "qwen1.5-moe-a2.7b" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"mlp_only_layers": [0, 5]}))
    code, shown, _ = run_cli(monkeypatch, "info", str(tmp_path))
    assert code == 0 and "22 of 24 layers are MoE (dense: 0, 5)" in shown


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "llama"}, "model type 'llama' is not supported by specmd; supported: olmoe, mixtral"),
        (None, "no such file or directory"),
    ],
)
def test_bad_input(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: dict | None, message: str) -> None:
    path = tmp_path / "config.json"
    if config is not None:
        path.write_text(json.dumps(config))
    code, _, errors = run_cli(monkeypatch, "info", str(path))
    assert code == 2 and message in errors


def test_a_fractional_percentage_is_not_rounded_away(monkeypatch: pytest.MonkeyPatch) -> None:
    code, shown, _ = run_cli(monkeypatch, "info", "olmoe-1b-7b", "--cache-frac", "0.025", "0.005")
    assert code == 0 and "2.5% cache" in shown and "0.5% cache" in shown
