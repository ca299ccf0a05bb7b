"""Every architecture through the one mixin: lossless against stock transformers at every capacity, from
every checkpoint layout, and what is particular to each (Qwen's dense layers and shared expert, Phi's
two-expert sparsemixer, Mixtral's fp32 routing weights).

Tiny random models are saved with `save_pretrained` and loaded back with `from_pretrained`, as users do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PhimoeConfig,
    PhimoeForCausalLM,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from specmd import AutoOffloadForCausalLM, OffloadMixtral, OffloadOLMoE, OffloadPhi, OffloadQwen
from specmd.cache.policies.prefetch import TopK
from specmd.offload_models.info import model_info

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
EXPERT_BYTES = 3 * 32 * 16 * 4  # fp32, every architecture below
PROMPT = torch.tensor([[5, 17, 33, 8, 91, 2, 40, 40, 12, 7, 66, 3]])
BATCH = torch.tensor([[0, 0, 0, 0, 14, 9, 27, 81], [11, 52, 3, 3, 70, 18, 6, 44]])  # left padding (pad id 0)
BATCH_MASK = (BATCH != 0).long()


@dataclass(frozen=True)
class Arch:
    """One architecture under test: its stock class, its offloaded class, a tiny config."""

    stock: type[PreTrainedModel]
    offload: type
    config: Any
    moe_layers: list[int]
    top_k: int
    router: str = "gate"
    fp32_router_weights: bool = False


ARCHS = {
    "olmoe": Arch(
        OlmoeForCausalLM, OffloadOLMoE, OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=4), [0, 1, 2, 3], 4
    ),
    "mixtral": Arch(
        MixtralForCausalLM,
        OffloadMixtral,
        MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2),
        [0, 1, 2, 3],
        2,
        fp32_router_weights=True,
    ),
    "qwen2_moe": Arch(  # a dense first layer, a shared expert, and a dense MLP wider than an expert
        Qwen2MoeForCausalLM,
        OffloadQwen,
        Qwen2MoeConfig(
            **(COMMON | {"intermediate_size": 48}),
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=4,
            mlp_only_layers=[0],
        ),
        [1, 2, 3],
        4,
    ),
    "phimoe": Arch(
        PhimoeForCausalLM,
        OffloadPhi,
        PhimoeConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2),
        [0, 1, 2, 3],
        2,
        router="router",
    ),
}
CAPACITIES = {"all": {"cache_frac": 1.0}, "quarter": {"cache_frac": 0.25}, "one-expert": {"cache_bytes": EXPERT_BYTES}}
POLICIES = {"no-prefetch": "none/lru/fetch/standard", "prefetch": "topk:overfetch=2/ls/fetch/standard"}


@dataclass
class Built:
    name: str
    arch: Arch
    paths: dict[str, Path]
    stock: PreTrainedModel
    reference: dict[str, torch.Tensor]


def greedy(model: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)


def save_layouts(model: PreTrainedModel, root: Path) -> dict[str, Path]:
    """The hub's per-expert layout, the fused layout, and small shards (one layer's experts over several files)."""
    paths = {name: root / name for name in ("legacy", "fused", "sharded")}
    model.save_pretrained(paths["legacy"])
    model.save_pretrained(paths["fused"], save_original_format=False)
    model.save_pretrained(paths["sharded"], max_shard_size="20KB")
    return paths


@pytest.fixture(scope="module", params=list(ARCHS))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    arch = ARCHS[request.param]
    torch.manual_seed(0)
    paths = save_layouts(arch.stock(arch.config).eval(), tmp_path_factory.mktemp(request.param))
    # The reference reads the per-expert layout: stock eager on mmapped fused tensors differs from itself by ~1e-7
    # (it slices experts at unaligned file offsets), while specmd always computes from aligned copies.
    stock = arch.stock.from_pretrained(paths["legacy"], experts_implementation="eager").eval()
    with torch.no_grad():
        reference = {
            "logits": stock(PROMPT).logits,
            "tokens": greedy(stock, PROMPT),
            "batch_logits": stock(BATCH, attention_mask=BATCH_MASK).logits,
            "batch_tokens": greedy(stock, BATCH, BATCH_MASK),
        }
    return Built(request.param, arch, paths, stock, reference)


def load(path: Path, **kwargs: Any) -> Any:
    kwargs.setdefault("bandwidth_gbps", 5.0)
    return AutoOffloadForCausalLM.from_pretrained(path, progress=False, **kwargs)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("capacity", CAPACITIES)
def test_bit_identical_to_stock_eager(built: Built, capacity: str, policy: str) -> None:
    ref = built.reference
    with load(built.paths["legacy"], policy=POLICIES[policy], **CAPACITIES[capacity]) as model, torch.no_grad():
        assert type(model) is built.arch.offload
        assert torch.equal(model(PROMPT).logits, ref["logits"])
        assert torch.equal(greedy(model, PROMPT), ref["tokens"])
        real = BATCH_MASK.bool()  # pad positions hold no prediction anyone reads
        assert torch.equal(model(BATCH, attention_mask=BATCH_MASK).logits[real], ref["batch_logits"][real])
        assert torch.equal(greedy(model, BATCH, BATCH_MASK), ref["batch_tokens"])
        stats = model.cache_stats()
        assert stats.requests > 0 and stats.peak_resident_bytes <= stats.capacity_bytes
        assert [layer["layer"] for layer in stats.per_layer] == built.arch.moe_layers
        if policy == "prefetch" and capacity != "all":
            assert stats.prefetches_issued > 0


@pytest.mark.parametrize("layout", ["fused", "sharded"])
def test_every_checkpoint_layout(built: Built, layout: str) -> None:
    with load(built.paths[layout], cache_frac=0.25, policy=POLICIES["prefetch"]) as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, built.reference["logits"])
        assert torch.equal(greedy(model, PROMPT), built.reference["tokens"])


@pytest.mark.parametrize("layout", ["legacy", "fused", "sharded"])
@pytest.mark.parametrize("capacity", ["all", "one-expert"])
def test_disk_tier_is_bit_identical_from_every_layout(built: Built, layout: str, capacity: str) -> None:
    ref = built.reference
    kwargs = CAPACITIES[capacity] | {"policy": POLICIES["prefetch"], "storage": "disk"}
    with load(built.paths[layout], **kwargs) as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref["logits"])
        assert torch.equal(greedy(model, PROMPT), ref["tokens"])
        real = BATCH_MASK.bool()
        assert torch.equal(model(BATCH, attention_mask=BATCH_MASK).logits[real], ref["batch_logits"][real])


def test_disk_tier_bf16_from_fp32_files(built: Built) -> None:
    bf16 = torch.bfloat16
    stock = built.arch.stock.from_pretrained(built.paths["fused"], experts_implementation="eager", dtype=bf16)
    disk = load(built.paths["fused"], cache_bytes=EXPERT_BYTES // 2, dtype=bf16, storage="disk")
    with disk as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)


def test_bf16_is_bit_identical_too(built: Built) -> None:
    bf16 = torch.bfloat16
    stock = built.arch.stock.from_pretrained(built.paths["legacy"], experts_implementation="eager", dtype=bf16)
    with load(built.paths["legacy"], cache_bytes=EXPERT_BYTES // 2, dtype=bf16) as model, torch.no_grad():
        assert model.expert_cache.sizes == {"bf16": EXPERT_BYTES // 2}
        seen = []
        router = getattr(model.model.layers[built.arch.moe_layers[0]].mlp, built.arch.router)
        handle = router.register_forward_hook(lambda _m, _i, out: seen.append(out[1].dtype))
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
        handle.remove()
        assert torch.equal(greedy(model, PROMPT), greedy(stock, PROMPT))
        # Mixtral's router keeps top-k weights in fp32 beside bf16 hidden states; the others cast them.
        assert seen == [torch.float32 if built.arch.fp32_router_weights else torch.bfloat16]


def test_close_to_the_default_grouped_mm(built: Built) -> None:
    default = built.arch.stock.from_pretrained(built.paths["legacy"])  # experts_implementation="grouped_mm"
    with load(built.paths["legacy"], cache_frac=0.25) as model, torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, default(PROMPT).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(greedy(model, PROMPT), greedy(default, PROMPT))


class RecordingTopK(TopK):
    """Top-k prefetch that keeps every prediction it is given."""

    def __init__(self) -> None:
        super().__init__(overfetch=1.0)
        self.routes: list[Any] = []

    def on_route(self, route: Any, now: Any) -> Any:
        self.routes.append(route)
        return super().on_route(route, now)


def test_prefetch_predicts_with_the_next_moe_layers_native_router(built: Built) -> None:
    recorder = RecordingTopK()
    with load(built.paths["legacy"], cache_frac=0.25, policy={"prefetch": recorder}) as model, torch.no_grad():
        layers = built.arch.moe_layers
        routers = {i: getattr(model.model.layers[i].mlp, built.arch.router) for i in layers}
        inputs: dict[int, torch.Tensor] = {}
        hooks = [r.register_forward_hook(lambda _m, a, _o, i=i: inputs.update({i: a[0]})) for i, r in routers.items()]
        model(PROMPT)
        for hook in hooks:
            hook.remove()
        assert [route.layer for route in recorder.routes] == layers[1:]  # the next *MoE* layer, dense ones skipped
        for (layer, following), route in zip(pairwise(layers), recorder.routes, strict=True):
            assert route.top_k == built.arch.top_k
            native_logits, _, _ = routers[following](inputs[layer])  # [T, E]
            assert torch.equal(torch.tensor(route.logits, dtype=native_logits.dtype), native_logits)


def test_expert_weights_are_not_parameters_or_buffers(built: Built) -> None:
    with load(built.paths["legacy"], cache_frac=0.25) as model:
        assert not [name for name in model.state_dict() if ".experts." in name]
        experts = len(built.arch.moe_layers) * 8 * 3 * 32 * 16
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in built.stock.parameters()) - experts
        assert model.expert_cache.capacity_bytes == int(0.25 * len(built.arch.moe_layers) * 8 * EXPERT_BYTES)


def test_info_from_the_config_agrees_with_the_loaded_model(built: Built) -> None:
    info = model_info(built.arch.config)
    assert (info.model_type, info.offload_class) == (built.name, built.arch.offload.__name__)
    assert list(info.moe_layers) == built.arch.moe_layers and info.top_k == built.arch.top_k
    fp32 = next(p for p in info.precisions if p.precision == "fp32")
    with load(built.paths["legacy"], cache_frac=0.25) as model:
        assert model.expert_cache.sizes == {"fp32": fp32.bytes_per_expert}
        assert model.expert_cache.capacity_bytes == fp32.capacities[-1].bytes  # the 25% column


# ---- what is particular to one architecture ---------------------------------------------------------
def test_qwen_keeps_dense_layers_and_the_shared_expert_resident(tmp_path: Path) -> None:
    arch = ARCHS["qwen2_moe"]
    torch.manual_seed(0)
    arch.stock(arch.config).save_pretrained(tmp_path)
    with load(tmp_path, cache_frac=1.0) as model:
        assert model.expert_cache.warm() == 3 * 8  # layers 1-3 only: layer 0 has no routed experts
        assert {key.layer for key in model.expert_cache.resident()} == {1, 2, 3}
        dense = model.model.layers[0].mlp
        assert not hasattr(dense, "experts") and dense.gate_proj.weight.shape == (48, 32)
        state = model.state_dict()
        for layer in (1, 2, 3):
            shared = f"model.layers.{layer}.mlp.shared_expert"
            assert state[f"{shared}.gate_proj.weight"].shape == (24, 32)
            assert state[f"{shared}_gate.weight"].shape == (1, 32)


def test_a_checkpoint_without_moe_layers_is_refused(tmp_path: Path) -> None:
    arch = ARCHS["qwen2_moe"]
    config = copy.deepcopy(arch.config)
    config.mlp_only_layers = [0, 1, 2, 3]
    arch.stock(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="this qwen2_moe checkpoint has no MoE layers"):
        load(tmp_path, cache_frac=0.5)


def test_qwen_prefetch_skips_dense_layers(tmp_path: Path) -> None:
    """With `decoder_sparse_step=2` layers 1 and 3 are sparse: layer 1 prefetches for layer 3."""
    arch = ARCHS["qwen2_moe"]
    config = copy.deepcopy(arch.config)
    config.mlp_only_layers, config.decoder_sparse_step = [], 2
    torch.manual_seed(0)
    arch.stock(config).save_pretrained(tmp_path)
    stock = arch.stock.from_pretrained(tmp_path, experts_implementation="eager")
    recorder = RecordingTopK()
    with load(tmp_path, cache_frac=0.5, policy={"prefetch": recorder}) as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
        assert torch.equal(greedy(model, PROMPT), greedy(stock, PROMPT))
        assert {route.layer for route in recorder.routes} == {3}
        per_layer = {layer["layer"]: layer for layer in model.cache_stats().per_layer}
        assert set(per_layer) == {1, 3} and per_layer[3]["prefetches_issued"] > 0


@pytest.mark.parametrize("built", ["phimoe"], indirect=True)
def test_phi_routes_two_experts_with_unnormalised_weights(built: Built) -> None:
    with load(built.paths["legacy"], cache_frac=0.25) as model, torch.no_grad():
        router = model.model.layers[0].mlp.router
        assert type(router).__name__ == "PhimoeTopKRouter"  # the native sparsemixer router, untouched
        seen = []
        handle = router.register_forward_hook(lambda _m, _i, out: seen.append(out))
        assert torch.equal(model(PROMPT).logits, built.reference["logits"])
        handle.remove()
        _, weights, experts = seen[0]
        assert experts.shape == weights.shape == (PROMPT.numel(), 2)
        assert (weights.sum(dim=-1) > 1.0 + 1e-3).any()  # not renormalised to 1, as sparsemixer leaves them
    # sparsemixer picks two experts whatever the config's num_experts_per_tok says.
    assert OffloadPhi.arch.top_k(PhimoeConfig(**COMMON, num_experts_per_tok=4)) == 2


def test_auto_knows_every_architecture_and_lists_them_when_refusing() -> None:
    for model_type, arch in ARCHS.items():
        assert AutoOffloadForCausalLM.class_for(model_type) is arch.offload
    with pytest.raises(ValueError, match="supported: olmoe, mixtral, qwen2_moe, phimoe"):
        AutoOffloadForCausalLM.class_for("deepseek_v3")


def test_a_class_refuses_another_architecture(built: Built) -> None:
    other = OffloadMixtral if built.name != "mixtral" else OffloadQwen
    with pytest.raises(ValueError, match=f"loads '{other.arch.model_type}' checkpoints; this one is '{built.name}'"):
        other.from_pretrained(built.paths["legacy"], cache_frac=0.5, progress=False)


@pytest.mark.parametrize("policy", ["none/lru/fetch/standard", "topk/least-stale/fetch/standard"])
def test_traces_record_and_replay_exactly(built: Built, tmp_path: Path, policy: str) -> None:
    from specmd.sim import load_trace, record, replay

    with load(built.paths["legacy"], cache_frac=0.25, policy=policy) as model:
        record(model, PROMPT, tmp_path / "t.jsonl", max_new_tokens=5, do_sample=False)
        live = model.cache_stats().to_dict()
    trace = load_trace(tmp_path / "t.jsonl")
    assert trace.layout.moe_layers == tuple(built.arch.moe_layers)
    assert {len(e.experts) for e in trace.events} == {built.arch.top_k}
    replayed = replay(trace, policy=policy, cache_frac=0.25, bandwidth_gbps=5.0).to_dict()
    wall = ("wall_ttft_s", "wall_tokens_per_s")
    assert {k: v for k, v in replayed.items() if k not in wall} == {k: v for k, v in live.items() if k not in wall}


def test_cache_aware_routing_at_lam_0_is_bit_identical_or_refused(built: Built) -> None:
    policy = "none/lru/fetch/cache-aware:lam=0"
    if built.arch.offload is OffloadPhi:  # sparsemixer cannot re-select from biased logits
        with pytest.raises(ValueError, match="cannot do"):
            load(built.paths["legacy"], cache_frac=0.25, policy=policy)
        return
    with load(built.paths["legacy"], cache_frac=0.25, policy=policy) as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, built.reference["logits"])
        assert torch.equal(greedy(model, PROMPT), built.reference["tokens"])
