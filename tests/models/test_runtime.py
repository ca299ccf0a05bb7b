"""Behaviour of a live offloaded model: counters, determinism, capacity, threads."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest
import torch

from specmd import OffloadOLMoE
from specmd.cache.keys import ExpertKey
from tests.conftest import EXPERT_BYTES, TOTAL_EXPERT_BYTES

PROMPT = torch.tensor([[5, 17, 33, 8, 91, 2, 40, 40, 12, 7, 66, 3]])


def load(path: Path, **kwargs) -> OffloadOLMoE:  # type: ignore[no-untyped-def]
    kwargs.setdefault("bandwidth_gbps", 5.0)
    return OffloadOLMoE.from_pretrained(path, progress=False, **kwargs)


def generate(model: OffloadOLMoE, ids: torch.Tensor = PROMPT, tokens: int = 8) -> torch.Tensor:
    return model.generate(input_ids=ids, max_new_tokens=tokens, do_sample=False)


def watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("specmd") and t.is_alive()]


def test_cache_starts_cold_and_a_full_cache_hits_everything_the_second_time(checkpoint: Path) -> None:
    with load(checkpoint, cache_frac=1.0) as model:
        assert model.expert_cache.resident() == []
        generate(model)
        first = model.cache_stats()
        assert first.misses > 0 and first.hit_rate < 1.0
        model.reset_cache_stats()
        generate(model)
        second = model.cache_stats()
        assert second.hit_rate == 1.0 and second.misses == 0 and second.bytes_transferred == 0


def test_counters_are_identical_across_runs_with_prefetch(checkpoint: Path) -> None:
    def counters() -> dict:
        with load(checkpoint, cache_frac=0.05, policy="topk:overfetch=2/least-stale/fetch/standard") as model:
            generate(model)
            stats = model.cache_stats().to_dict()
        del stats["wall_ttft_s"], stats["wall_tokens_per_s"]
        return stats

    first = counters()
    assert first["prefetches_issued"] > 0 and first["late_prefetches"] + first["hits"] > 0
    assert counters() == first


def test_stats_fields_and_per_layer(checkpoint: Path) -> None:
    with load(checkpoint, cache_frac=0.25) as model:
        generate(model, tokens=5)
        stats = model.cache_stats()
        assert stats.prefill_passes == 1 and stats.decode_passes == 4 and stats.decode_tokens == 4
        assert [layer["layer"] for layer in stats.per_layer] == [0, 1, 2, 3]
        assert sum(layer["requests"] for layer in stats.per_layer) == stats.requests
        assert stats.ttft_s > 0 and stats.tokens_per_s > 0 and stats.wall_ttft_s > 0
        assert stats.capacity_bytes == model.expert_cache.capacity_bytes == int(0.25 * TOTAL_EXPERT_BYTES)
        assert 0 < stats.peak_resident_bytes <= stats.capacity_bytes
        assert set(stats.to_dict()) >= {"hit_rate", "collision_misses", "stall_s", "per_layer", "bytes_transferred"}


def test_capacity_bound_and_pins_hold_at_every_instant(checkpoint: Path) -> None:
    with load(checkpoint, cache_bytes=3 * EXPERT_BYTES, policy="topk:overfetch=3/lru/fetch/standard") as model:
        cache = model.expert_cache
        payload = cache.listener
        seen = {"loads": 0, "evictions": 0}
        load_original, evict_original = payload.on_load, payload.on_evict

        def on_load(key: ExpertKey) -> None:
            assert cache.resident_bytes <= cache.capacity_bytes
            seen["loads"] += 1
            load_original(key)

        def on_evict(key: ExpertKey) -> None:
            entry = cache.get(key)
            assert entry is not None and entry.pins == 0, f"{key} evicted while pinned"
            seen["evictions"] += 1
            evict_original(key)

        payload.on_load, payload.on_evict = on_load, on_evict
        generate(model)
        assert seen["loads"] > 10 and seen["evictions"] > 10
        assert model.cache_stats().prefetches_issued > 0  # watchdog transfers were checked too
        assert model.expert_cache.peak_resident_bytes <= 3 * EXPERT_BYTES


def test_arena_slots_track_residency_exactly(checkpoint: Path) -> None:
    with load(checkpoint, cache_bytes=5 * EXPERT_BYTES, policy="topk:overfetch=2/ls/fetch/standard") as model:
        arena = model.expert_cache.listener.arena
        assert arena.num_slots == 5
        generate(model)
        assert arena.free_slots == arena.num_slots - len(model.expert_cache)


def test_warm_preloads_and_counts_no_transfer(checkpoint: Path) -> None:
    with load(checkpoint, cache_frac=1.0) as model:
        assert model.expert_cache.warm() == 64
        generate(model)
        stats = model.cache_stats()
        assert stats.hit_rate == 1.0 and stats.bytes_transferred == 0


def test_pad_tokens_request_no_experts(checkpoint: Path) -> None:
    ids = torch.tensor([[0, 0, 0, 0, 0, 0, 14, 9]])
    with load(checkpoint, cache_frac=1.0) as model, torch.no_grad():
        model(ids, attention_mask=(ids != 0).long())
        padded = model.cache_stats().requests
        model.reset_cache_stats()
        model(ids[:, -2:])
        assert model.cache_stats().requests == padded


def test_an_error_inside_a_pass_releases_its_pins(checkpoint: Path) -> None:
    with load(checkpoint, cache_frac=0.25) as model, torch.no_grad():
        with pytest.raises(IndexError):
            model(torch.tensor([[5, 1000]]))  # token id beyond the vocabulary fails inside the pass
        assert not any(model.expert_cache.get(k).pins for k in model.expert_cache.resident())
        model(PROMPT)  # and the model still runs


def test_close_stops_the_watchdog_and_the_model(checkpoint: Path) -> None:
    before = len(watchdogs())
    model = load(checkpoint, cache_frac=0.25)
    assert len(watchdogs()) == before + 1
    model.close()
    assert len(watchdogs()) == before
    with pytest.raises(RuntimeError, match="no expert cache"):
        model(PROMPT)
    model.close()  # idempotent


def test_garbage_collection_stops_the_watchdog(checkpoint: Path) -> None:
    before = len(watchdogs())
    model = load(checkpoint, cache_frac=0.25)
    generate(model, tokens=2)
    del model
    gc.collect()
    assert len(watchdogs()) == before


def test_transfer_errors_surface_on_the_main_thread_naming_the_expert(checkpoint: Path) -> None:
    with load(checkpoint, cache_frac=0.25) as model:
        payload = model.expert_cache.listener
        # Sources with no data: the copy itself fails (in whichever thread runs it first).
        payload.store._buffers = {k: torch.empty_like(v, device="meta") for k, v in payload.store._buffers.items()}
        with pytest.raises(RuntimeError, match=r"the copy of expert \d+ of layer \d+ at fp32 failed on thread") as err:
            generate(model, tokens=2)
        assert "the model can run again" in str(err.value.__notes__)


def test_save_pretrained_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    with load(checkpoint, cache_frac=0.25) as model, pytest.raises(NotImplementedError, match="no expert weights"):
        model.save_pretrained(tmp_path)


def test_measured_compute_time_runs(checkpoint: Path) -> None:
    with load(checkpoint, cache_frac=0.25, compute_time="measured") as model:
        generate(model, tokens=3)
        assert model.cache_stats().ttft_s > 0
