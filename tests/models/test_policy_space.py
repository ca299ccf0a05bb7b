"""The full policy space live: every combination runs, lossy policies change outputs only through their
documented mechanism, cache-aware routing reduces to standard at lam=0, and lossless mixes replay exactly."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import OlmoeForCausalLM

from specmd import OffloadOLMoE
from specmd.cache.keys import ExpertKey
from specmd.cache.policies.spec import NAMED_MIXES, SYSTEM_NAMES, catalog
from specmd.sim import record, replay
from tests.conftest import EXPERT_BYTES

REPLAY_ONLY = {"oracle", "belady"}
NAMES = {kind: [n for k, n, _, _ in catalog() if k == kind and n not in REPLAY_ONLY] for kind in
         ("prefetch", "eviction", "miss", "routing")}  # fmt: skip
PROMPT = torch.tensor([[5, 17, 33, 8, 91, 2, 40, 40, 12, 7, 66, 3]])


def load(path: Path, **kwargs) -> OffloadOLMoE:  # type: ignore[no-untyped-def]
    kwargs.setdefault("bandwidth_gbps", 5.0)
    return OffloadOLMoE.from_pretrained(path, progress=False, **kwargs)


@pytest.mark.parametrize(("miss", "routing"), list(itertools.product(NAMES["miss"], NAMES["routing"])))
def test_every_combination_runs_live_at_5_percent(checkpoint: Path, miss: str, routing: str) -> None:
    for prefetch, eviction in itertools.product(NAMES["prefetch"], NAMES["eviction"]):
        policy = f"{prefetch}/{eviction}/{miss}/{routing}"
        with load(checkpoint, cache_frac=0.05, policy=policy) as model:
            cache = model.expert_cache
            loads = cache.listener.on_load

            def checked(key: ExpertKey, loads=loads, cache=cache) -> None:  # type: ignore[no-untyped-def]
                assert cache.resident_bytes <= cache.capacity_bytes
                loads(key)

            cache.listener.on_load = checked
            model.generate(PROMPT, max_new_tokens=3, do_sample=False)
            stats = model.cache_stats()
        assert stats.requests > 0, policy
        assert stats.hits + stats.late_prefetches + stats.misses == stats.requests, policy
        assert stats.peak_resident_bytes <= stats.capacity_bytes, policy


@pytest.fixture(scope="module")
def layer0(stock: OlmoeForCausalLM) -> dict:
    """One token's layer-0 MoE input, routing and the stock expert weights."""
    block = stock.model.layers[0].mlp
    seen = {}
    hook = block.register_forward_pre_hook(lambda _m, args: seen.update(h=args[0].reshape(-1, 32)))
    with torch.no_grad():
        stock(PROMPT[:, :1])
        _, weights, index = block.gate(seen["h"])
    hook.remove()
    experts = block.experts
    return {"h": seen["h"], "weights": weights[0], "index": index[0].tolist(), "experts": experts}


def expert_out(layer0: dict, expert: int, weight: torch.Tensor) -> torch.Tensor:
    """Eager's computation of one expert on the token, weighted."""
    experts = layer0["experts"]
    gate, up = F.linear(layer0["h"], experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[expert]) * weight


def layer0_output(model: OffloadOLMoE) -> torch.Tensor:
    seen = {}
    block = model.model.layers[0].mlp
    hook = block.register_forward_hook(lambda _m, _a, out: seen.update(y=out.reshape(-1, 32)))
    with torch.no_grad():
        model(PROMPT[:, :1])
    hook.remove()
    return seen["y"]


def accumulate(parts: dict[int, torch.Tensor]) -> torch.Tensor:
    """Sum per-routed-expert outputs in ascending expert order, as eager and specmd do."""
    final = torch.zeros(1, 32)
    for expert in sorted(parts):
        final = final + parts[expert]
    return final


def test_drop_removes_exactly_the_dropped_experts_contribution(checkpoint: Path, layer0: dict) -> None:
    first, *others = layer0["index"]  # rank order: others are ranks 2, 3, 4
    with load(checkpoint, cache_bytes=4 * EXPERT_BYTES, policy="none/lru/drop:rank=2/standard") as model:
        got = layer0_output(model)  # cold cache: every expert misses; only the first choice is fetched
        assert model.cache_stats().per_layer[0]["drops"] == len(others)
    expected = accumulate({first: expert_out(layer0, first, layer0["weights"][0])})
    assert torch.equal(got, expected)


def test_substitute_runs_the_missing_experts_tokens_through_the_substitute(checkpoint: Path, layer0: dict) -> None:
    first, *others = layer0["index"]
    stand_in = next(e for e in range(16) if e not in layer0["index"])
    policy = "none/lru/substitute:tolerance=1.0/standard"
    with load(checkpoint, cache_bytes=2 * EXPERT_BYTES, policy=policy) as model:
        model.expert_cache.warm([ExpertKey(0, stand_in, "fp32")])
        got = layer0_output(model)
        assert model.cache_stats().per_layer[0]["substitutions"] == len(others)
    parts = {first: expert_out(layer0, first, layer0["weights"][0])}
    for rank, expert in enumerate(others, start=1):
        parts[expert] = expert_out(layer0, stand_in, layer0["weights"][rank])  # the stand-in's weights
    assert torch.equal(got, accumulate(parts))


def test_cache_aware_routing_at_lam_0_is_standard_routing(checkpoint: Path, stock: OlmoeForCausalLM) -> None:
    with load(checkpoint, cache_frac=0.25, policy="topk/lru/fetch/cache-aware:lam=0") as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
        tokens = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, stock.generate(PROMPT, max_new_tokens=6, do_sample=False))


def test_cache_aware_routing_leans_toward_resident_experts(checkpoint: Path) -> None:
    rates = {}
    for routing in ("standard", "cache-aware:lam=50"):
        with load(checkpoint, cache_frac=0.25, policy=f"none/lru/fetch/{routing}") as model:
            model.generate(PROMPT, max_new_tokens=8, do_sample=False)
            rates[routing] = model.cache_stats().hit_rate
    assert rates["cache-aware:lam=50"] > rates["standard"] + 0.2


LOSSLESS = [
    f"{prefetch}/{eviction}/fetch/standard"
    for prefetch in ("none", "topk", "score", "lookahead:depth=1")
    for eviction in NAMES["eviction"]
]


@pytest.mark.parametrize("policy", LOSSLESS)
def test_live_equals_replay_for_every_lossless_mix(checkpoint: Path, tmp_path: Path, policy: str) -> None:
    with load(checkpoint, cache_frac=0.1, policy=policy) as model:
        record(model, PROMPT, tmp_path / "t.jsonl", max_new_tokens=5, do_sample=False)
        live = model.cache_stats().to_dict()
    replayed = replay(tmp_path / "t.jsonl", policy=policy, cache_frac=0.1, bandwidth_gbps=5.0).to_dict()
    for stats in (live, replayed):
        del stats["wall_ttft_s"], stats["wall_tokens_per_s"]
    assert replayed == live


@pytest.mark.parametrize("name", [*NAMED_MIXES, *SYSTEM_NAMES, *(f"{n}+ls" for n in NAMED_MIXES)])
def test_named_configurations_run_live(checkpoint: Path, name: str) -> None:
    with load(checkpoint, cache_frac=0.1, policy=name) as model:
        model.generate(PROMPT, max_new_tokens=2, do_sample=False)
        assert model.cache_stats().requests > 0
        if name.endswith("+ls"):
            assert model.offload_options.policy.eviction.name == "least-stale"


def test_a_lower_precision_fetch_computes_with_that_precisions_weights(
    checkpoint: Path, layer0: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from specmd.quant.formats import ExpertShape, get_format

    monkeypatch.setenv("SPECMD_CACHE_DIR", str(tmp_path))
    policy = "none/lru/fetch-lowest-bit/standard"
    with load(checkpoint, cache_frac=0.5, policy=policy, expert_precisions=("fp32", "int8")) as model:
        got = layer0_output(model)  # cold cache: every expert is fetched at int8, the smallest copy
        assert model.cache_stats().fetches_by_precision == {"int8": 4 * len(layer0["index"])}
    fmt, experts = get_format("int8"), layer0["experts"]
    parts = {}
    for rank, expert in enumerate(layer0["index"]):
        weights = fmt.unpack(fmt.pack(experts.gate_up_proj[expert], experts.down_proj[expert]), ExpertShape(32, 16))
        parts[expert] = fmt.forward(layer0["h"], weights, experts.act_fn) * layer0["weights"][rank]
    assert torch.equal(got, accumulate(parts))


@pytest.mark.parametrize("miss", ["fetch-lowest-bit", "fetch-priority", "cascade:thresholds=(0.3,0.2)"])
@pytest.mark.parametrize("eviction", ["lhu", "least-stale"])
def test_precision_policies_run_over_several_stored_precisions(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, miss: str, eviction: str
) -> None:
    monkeypatch.setenv("SPECMD_CACHE_DIR", str(tmp_path))
    precisions = ("fp32", "int8", "int4", "int2")
    with load(checkpoint, cache_frac=0.1, policy=f"topk/{eviction}/{miss}/standard", expert_precisions=precisions) as m:
        m.generate(PROMPT, max_new_tokens=4, do_sample=False)
        stats = m.cache_stats()
    assert stats.hits + stats.late_prefetches + stats.misses == stats.requests
    assert set(stats.fetches_by_precision) - {"fp32"}, "a precision policy fetched nothing below full precision"
    assert stats.peak_resident_bytes <= stats.capacity_bytes
