"""Models whose experts are stored at several precisions: quality against full precision, what the capacity
means, the mixed-size arena under real tensors, persisted quantized copies, and live == replay."""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import OlmoeForCausalLM

from specmd import OffloadOLMoE, default_model_path
from specmd.cache.engine import ExpertCache
from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.live.arena import SlotArena
from specmd.cache.live.copiers import CpuCopier
from specmd.cache.live.host import HostTier
from specmd.cache.live.payload import LivePayload
from specmd.cache.live.store import RamStore
from specmd.cache.live.watchdog import Watchdog
from specmd.cache.policies.spec import PolicySpec
from specmd.eval_tasks.quality import expert_errors, logits_agreement, perplexity, precision_quality
from specmd.offload_models.checkpoint import MLP_EXPERT_KEYS, ExpertCheckpoint, checkpoint_files
from specmd.offload_models.info import load_config, model_info
from specmd.quant import get_format
from specmd.quant.formats import ExpertShape, MatrixFormat
from specmd.sim import record, replay
from tests.conftest import EXPERT_BYTES, TOTAL_EXPERT_BYTES
from tests.quant.conftest import TRAINED, Trained, cache_dir_at

TINY_SHAPE = ExpertShape(hidden=32, intermediate=16)
EXPERTS = TRAINED["num_hidden_layers"] * TRAINED["num_experts"]
TRAINED_FP32_BYTES = 3 * 64 * 64 * 4


def load(path: Path, **kwargs):  # type: ignore[no-untyped-def]
    return OffloadOLMoE.from_pretrained(path, progress=False, **kwargs)


def store_of(model: OffloadOLMoE) -> RamStore:
    return model.expert_cache.listener.store


# ---- quality ----------------------------------------------------------------------------------------
def test_trained_fixture_learned_its_text(trained: Trained) -> None:
    assert trained.loss < 1.2  # from 4.2 at random init; the source's entropy is 0.90 nats


@pytest.fixture(scope="module")
def quality(trained: Trained, quant_cache: Path) -> dict[str, object]:
    with cache_dir_at(quant_cache):
        return {p: precision_quality(trained.path, (p,), trained.eval_ids) for p in ("int8", "int4", "int2")}


def test_kl_from_full_precision_is_small_and_ordered(quality: dict) -> None:
    kl = {p: q.agreement.kl for p, q in quality.items()}
    # Measured 1.2e-5, 1.6e-4 and 4.7e-3 nats: each halving of bits costs about 10x.
    assert 0 < kl["int8"] < kl["int4"] < kl["int2"] < 0.05
    assert kl["int8"] < 1e-4 and kl["int4"] < 1e-3
    assert quality["int8"].agreement.top1 == 1.0 and quality["int4"].agreement.top1 >= 0.95
    assert quality["int2"].agreement.top1 >= 0.9
    assert quality["int8"].expert_precisions == ("int8",) and quality["int2"].expert_precisions == ("hqq2",)
    for q in quality.values():  # the trained model is far better than chance (64 tokens) at every precision
        assert q.reference_perplexity < 4 and q.perplexity < 4


def test_quality_helpers(trained: Trained, quant_cache: Path) -> None:
    errors = expert_errors(trained.path, "int4")
    assert len(errors) == EXPERTS and all(0.05 < e < 0.12 for e in errors.values())
    assert all(e == 0.0 for e in expert_errors(trained.path, "fp32").values())
    with load(trained.path, cache_frac=1.0) as model:
        same = logits_agreement(model, model, trained.eval_ids)
        assert same.kl == 0.0 and same.top1 == 1.0 and same.positions == trained.eval_ids.numel()
        ids = trained.eval_ids[:1]
        loss = model(input_ids=ids, labels=ids).loss.item()
        assert perplexity(model, ids) == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-5)
        mask = torch.ones_like(ids)
        mask[0, :10] = 0
        assert perplexity(model, ids, attention_mask=mask) != perplexity(model, ids)


# ---- precisions in a live model ------------------------------------------------------------------------
def test_three_precisions_generate_and_requests_use_the_first(trained: Trained) -> None:
    prompt = trained.eval_ids[:1, :12]
    kwargs = dict(cache_frac=0.3, bandwidth_gbps=5.0, policy="topk/lru/fetch/standard")
    with load(trained.path, expert_precisions=("int8",), **kwargs) as alone:
        expected = alone.generate(prompt, max_new_tokens=8, do_sample=False)
    with load(trained.path, expert_precisions=("int8", "int4", "int2"), **kwargs) as model:
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
        cache = model.expert_cache
        assert cache.sizes == {p: get_format(p).nbytes(ExpertShape(64, 64)) for p in ("int8", "nf4", "hqq2")}
        assert cache.capacity_bytes == int(0.3 * EXPERTS * TRAINED_FP32_BYTES)  # counted at full precision
        assert len(store_of(model)) == 3 * EXPERTS  # every expert at every precision
        stats = model.cache_stats()
        assert set(stats.fetches_by_precision) == {"int8"} and stats.peak_resident_bytes <= cache.capacity_bytes
        assert model.trace_meta()["full_expert_bytes"] == TRAINED_FP32_BYTES
    assert torch.equal(out, expected)


def test_int4_alone_runs_every_expert_at_int4(trained: Trained) -> None:
    with load(trained.path, cache_frac=0.1, expert_precisions="int4") as model:
        assert model.offload_options.expert_precisions == ("nf4",)
        nf4 = get_format("nf4").nbytes(ExpertShape(64, 64))
        assert model.expert_cache.sizes == {"nf4": nf4}
        # 10% of the experts' fp32 bytes holds 11 of the 16 experts at int4 (0.14 of fp32 each)
        assert model.expert_cache.capacity_bytes == int(0.1 * EXPERTS * TRAINED_FP32_BYTES)
        assert model.expert_cache.capacity_bytes // nf4 == 11
        model.generate(trained.eval_ids[:1, :8], max_new_tokens=4, do_sample=False)
        assert set(model.cache_stats().fetches_by_precision) == {"nf4"}


def test_full_precision_first_stays_bit_identical(checkpoint: Path, stock: OlmoeForCausalLM) -> None:
    ids = torch.tensor([[5, 17, 33, 8, 91, 2, 40, 40, 12, 7]])
    with load(checkpoint, cache_frac=0.1, expert_precisions=("fp32", "int8", "hqq2")) as model, torch.no_grad():
        assert torch.equal(model(ids).logits, stock(ids).logits)


def test_another_float_precision_casts(checkpoint: Path, stock: OlmoeForCausalLM) -> None:
    ids = torch.tensor([[5, 17, 33, 8, 91, 2, 40, 40, 12, 7]])
    with load(checkpoint, cache_frac=0.5, expert_precisions="bf16") as model, torch.no_grad():
        logits, expected = model(ids).logits, stock(ids).logits
    assert logits.dtype == torch.float32 and not torch.equal(logits, expected)
    assert torch.allclose(logits, expected, atol=1e-3)


def test_capacity_must_hold_the_largest_stored_expert(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=rf"less than one expert \({EXPERT_BYTES} B\)"):
        load(checkpoint, cache_bytes=EXPERT_BYTES - 1, expert_precisions=("int2", "fp32"))
    with load(checkpoint, cache_bytes=EXPERT_BYTES - 1, expert_precisions="int2") as model:
        assert model.expert_cache.capacity_bytes == EXPERT_BYTES - 1 < TOTAL_EXPERT_BYTES


def test_info_counts_capacity_at_full_precision() -> None:
    olmoe = model_info(load_config("olmoe-1b-7b"))
    sizes = {p.precision: p for p in olmoe.precisions}
    assert olmoe.full_precision == "bf16"
    assert sizes["nf4"].capacities[1].bytes == sizes["bf16"].capacities[1].bytes == 644_245_094
    assert [sizes[p].capacities[1].experts for p in ("bf16", "int8", "nf4", "hqq2")] == [51, 102, 182, 327]


# ---- the arena with several size classes, under real tensors -------------------------------------------
MIXED = ("fp32", "int8", "hqq2")


def mixed_store(checkpoint: Path) -> tuple[dict[str, Any], RamStore, dict[str, int], int, SlotArena]:
    """The tiny model's experts at three precisions in RAM: formats, store, bytes per precision, a capacity of
    three fp32 experts' room and an arena for it (mixed sizes fragment it)."""
    formats = {p: get_format(p) for p in MIXED}
    experts = ExpertCheckpoint(checkpoint_files(checkpoint), MLP_EXPERT_KEYS, range(4), 16, TINY_SHAPE)
    store = RamStore.build(experts, list(formats.values()), TINY_SHAPE, pin=False, progress=False)
    sizes = {p: fmt.nbytes(TINY_SHAPE) for p, fmt in formats.items()}
    capacity = 3 * sizes["fp32"] + 100
    return formats, store, sizes, capacity, SlotArena(capacity, sizes.values(), torch.device("cpu"))


def random_requests(cache: ExpertCache, sizes: dict[str, int]) -> Iterator[ExpertKey]:
    """Random experts at random precisions made resident (LRU room) one after another; yields each."""
    rng = random.Random(0)
    for step in range(1, 400):
        key = ExpertKey(rng.randrange(4), rng.randrange(16), rng.choice(MIXED))
        tick = Tick(step, step, key.layer, float(step))
        if key not in cache:
            assert cache.make_room(sizes[key.precision], tick) is not None
            cache.insert(key, tick, ready_at=float(step))
        else:
            cache.touch(key, tick)
        yield key


def test_mixed_precisions_through_engine_payload_and_arena(checkpoint: Path) -> None:
    """Random requests at three precisions through the engine (LRU) into a compacting arena: every expert
    computes exactly as straight from the store, resident bytes never exceed the capacity."""
    formats, store, sizes, capacity, arena = mixed_store(checkpoint)
    watchdog = Watchdog()
    try:
        payload = LivePayload(store, arena, watchdog, CpuCopier(), formats, TINY_SHAPE)
        lru = PolicySpec.parse("none/lru/fetch/standard").build().eviction
        cache = ExpertCache(capacity, lru, sizes, listener=payload)
        x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))

        class Job:
            def compute(self, expert: int, weights: object, fmt: object) -> None:
                self.out = fmt.forward(x, weights, F.silu)  # type: ignore[attr-defined]

        for key in random_requests(cache, sizes):
            job = Job()
            payload.compute(key, job, key.expert)
            fmt = formats[key.precision]
            assert torch.equal(job.out, fmt.forward(x, fmt.unpack(store[key], TINY_SHAPE), F.silu))
            assert cache.resident_bytes <= capacity and len(arena) == len(cache)
        assert arena.compactions > 0  # the mix fragmented the arena and compaction placed the rest
    finally:
        watchdog.stop()


def test_mixed_precisions_through_a_host_tier_that_compacts(checkpoint: Path) -> None:
    """A host-RAM tier holding experts at three precisions compacts its arena as it fills; every copy out of it
    gives exactly the expert's stored bytes."""
    _, store, sizes, capacity, arena = mixed_store(checkpoint)
    watchdog = Watchdog()
    try:
        host = HostTier(store, arena, watchdog, timeout_s=30.0)
        lru = PolicySpec.parse("none/lru/fetch/standard").build().eviction
        cache = ExpertCache(capacity, lru, sizes, listener=host)
        for key in random_requests(cache, sizes):
            copied = torch.empty(sizes[key.precision], dtype=torch.uint8)
            host.read_into(key, copied, CpuCopier()).synchronize()
            assert torch.equal(copied, store[key].reshape(-1).view(torch.uint8)), key
            assert cache.resident_bytes <= capacity and len(arena) == len(cache)
        assert arena.compactions > 0  # the mix fragmented the host arena and compaction placed the rest
    finally:
        watchdog.stop()


# ---- persisted quantized copies ------------------------------------------------------------------------
@pytest.fixture
def quantizations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The precision of every expert quantized from now on."""
    calls: list[str] = []
    pack = MatrixFormat.pack

    def counting(self, gate_up, down):  # type: ignore[no-untyped-def]
        calls.append(self.name)
        return pack(self, gate_up, down)

    monkeypatch.setattr(MatrixFormat, "pack", counting)
    return calls


def buffers(model: OffloadOLMoE) -> dict[ExpertKey, torch.Tensor]:
    store = store_of(model)
    return {key: store[key].clone() for key in store}


def test_persisted_copies_reload_bit_identically_without_quantizing(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quantizations: list[str], capsys
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SPECMD_CACHE_DIR", str(tmp_path / "cache"))
    precisions = ("fp32", "int8", "int2")
    with OffloadOLMoE.from_pretrained(trained.path, cache_frac=0.5, expert_precisions=precisions) as model:
        first = buffers(model)
    assert sorted(quantizations) == sorted(["int8", "hqq2"] * EXPERTS)
    assert "specmd: quantizing experts to int8, hqq2" in capsys.readouterr().err  # the progress bar
    saved = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "quant").iterdir() if p.is_dir())
    assert saved == ["hqq2", "int8"]  # fp32 is the checkpoint itself: nothing to save

    quantizations.clear()
    with load(trained.path, cache_frac=0.5, expert_precisions=precisions) as model:
        second = buffers(model)
    assert quantizations == []
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    # A checkpoint saved again with the same content keeps its copies (they are keyed by content).
    copy = tmp_path / "copy"
    shutil.copytree(trained.path, copy)
    with load(copy, cache_frac=0.5, expert_precisions=("int2",)) as model:
        assert quantizations == [] and all(torch.equal(store_of(model)[k], first[k]) for k in store_of(model))


def test_a_changed_checkpoint_is_quantized_again(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quantizations: list[str]
) -> None:
    monkeypatch.setenv("SPECMD_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "ckpt"
    shutil.copytree(trained.path, path)
    with load(path, cache_frac=0.5, expert_precisions="int4") as model:
        before = buffers(model)
    assert len(quantizations) == EXPERTS

    weights = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    weights[name] = weights[name] * 1.5
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    quantizations.clear()
    with load(path, cache_frac=0.5, expert_precisions="int4") as model:
        after = buffers(model)
    assert len(quantizations) == EXPERTS  # new content, new copies
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed == [ExpertKey(1, 3, "nf4")]
    trained_shape = ExpertShape(TRAINED["hidden_size"], TRAINED["intermediate_size"])
    for _, expert, gate_up, down in ExpertCheckpoint(checkpoint_files(path), MLP_EXPERT_KEYS, [1], 8, trained_shape):
        if expert == 3:  # the new copy is the new weights quantized
            assert torch.equal(after[ExpertKey(1, 3, "nf4")], get_format("nf4").pack(gate_up, down))


def test_a_damaged_copy_is_quantized_again(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quantizations: list[str]
) -> None:
    monkeypatch.setenv("SPECMD_CACHE_DIR", str(tmp_path))
    with load(trained.path, cache_frac=0.5, expert_precisions="hqq4") as model:
        first = buffers(model)
    assert len(quantizations) == EXPERTS
    quantizations.clear()
    manifest = next((tmp_path / "quant").glob("hqq4-*/manifest.json"))
    (manifest.parent / "layer-1.safetensors").write_bytes(b"truncated")
    with load(trained.path, cache_frac=0.5, expert_precisions="hqq4") as model:
        assert len(quantizations) == EXPERTS
        assert all(torch.equal(first[k], v) for k, v in buffers(model).items())
    assert json.loads(manifest.read_text())["key"]["format"]["name"] == "hqq4"


def test_flipped_bytes_in_a_saved_copy_are_caught_and_quantized_again(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quantizations: list[str]
) -> None:
    monkeypatch.setenv("SPECMD_CACHE_DIR", str(tmp_path))
    with load(trained.path, cache_frac=0.5, expert_precisions="int8") as model:
        first = buffers(model)
    quantizations.clear()
    layer = next((tmp_path / "quant").glob("int8-*/layer-1.safetensors"))
    saved = load_file(layer)
    saved["experts"][3, 17] ^= 0xFF  # one flipped byte; the file stays well formed
    save_file(saved, layer)
    with pytest.warns(UserWarning, match="experts of layer 1 .* are damaged"):
        model = load(trained.path, cache_frac=0.5, expert_precisions="int8")
    with model:
        assert len(quantizations) == EXPERTS
        assert all(torch.equal(first[k], v) for k, v in buffers(model).items())


# ---- live == replay -------------------------------------------------------------------------------------
@pytest.mark.parametrize("precisions", [("int4",), ("int2", "fp32")])
def test_replay_reproduces_a_quantized_live_run(trained: Trained, tmp_path: Path, precisions: tuple) -> None:
    kwargs = dict(policy="none/lru/fetch/standard", cache_frac=0.2, bandwidth_gbps=5.0)
    with load(trained.path, expert_precisions=precisions, **kwargs) as model:
        record(model, trained.eval_ids[:1, :10], tmp_path / "trace.jsonl", max_new_tokens=6, do_sample=False)
        live = model.cache_stats().to_dict()
    replayed = replay(tmp_path / "trace.jsonl", **kwargs).to_dict()
    drop = re.compile("^wall_")
    assert {k: v for k, v in replayed.items() if not drop.match(k)} == {
        k: v for k, v in live.items() if not drop.match(k)
    }


# ---- command line ----------------------------------------------------------------------------------------
def test_cli_precisions_option(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from specmd import cli

    args = cli.build_parser().parse_args(["generate", str(checkpoint), "--prompt", "x", "--precisions", "int8,int2"])
    with cli._load(args, args.policy) as model:
        assert model.offload_options.expert_precisions == ("int8", "hqq2")
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)
    errors = []
    monkeypatch.setattr(cli.err, "print", lambda text, **_: errors.append(text))
    # the tiny checkpoint has no tokenizer (transformers makes an empty one, which encodes "x" to no tokens)
    tokenizer = cli.options.load_tokenizer
    monkeypatch.setattr(cli.options, "load_tokenizer", lambda path: tokenizer(str(default_model_path())))
    assert cli.main(["generate", str(checkpoint), "--prompt", "x", "--precisions", "int2"]) == 2
    assert "needs hqq, which is not installed; install it with: pip install 'specmd[quant]'" in errors[0]
