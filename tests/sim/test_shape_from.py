"""Emulating a real model on a small model's routing: --shape-from prices experts and compute as that model's."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from specmd import OffloadOLMoE
from specmd.offload_models.info import expert_layout, load_config
from specmd.sim import load_trace, replay
from specmd.sim.sweep import SweepGrid, read_results, sweep
from tests.conftest import TOTAL_EXPERT_BYTES
from tests.sim.conftest import PROMPT, live_run, without_wall

OLMOE_BF16 = 3 * 2048 * 1024 * 2  # one OLMoE-1B-7B expert


@pytest.fixture(scope="module")
def olmoe():  # type: ignore[no-untyped-def]
    return expert_layout(load_config("olmoe-1b-7b"))


def test_a_layout_priced_like_a_model_keeps_its_routing_and_takes_the_models_sizes(recorded: Path, olmoe) -> None:  # type: ignore[no-untyped-def]
    own = load_trace(recorded).layout
    priced = own.priced_like(olmoe)
    assert (priced.num_layers, priced.moe_layers, priced.experts_per_layer, priced.top_k) == (4, (0, 1, 2, 3), 16, 4)
    assert dict(priced.expert_bytes) == {"fp32": OLMOE_BF16}  # the tiny model's full precision priced as OLMoE's
    assert (priced.full_precision, priced.full_expert_bytes) == ("fp32", OLMOE_BF16)
    stored = replace(own, expert_bytes={"fp32": 6144, "int8": 1600}).priced_like(olmoe)
    assert dict(stored.expert_bytes) == {"fp32": OLMOE_BF16, "int8": olmoe.expert_bytes["int8"]}
    assert priced.shape.dense_params == (olmoe.shape.dense_params[0],) * 4
    assert priced.shape.head_params == olmoe.shape.head_params and priced.shape.dtype_bytes == 2


def test_replay_priced_as_olmoe_moves_olmoe_sized_experts_on_olmoe_compute(recorded: Path, olmoe) -> None:  # type: ignore[no-untyped-def]
    own = replay(recorded, policy="none/lru/fetch/standard", cache_frac=0.25, bandwidth_gbps=5.0)
    priced = replay(recorded, policy="none/lru/fetch/standard", cache_frac=0.25, bandwidth_gbps=5.0, price_as=olmoe)
    assert priced.requests == own.requests and priced.misses == own.misses  # 16 experts fit either way
    assert priced.bytes_transferred == priced.misses * OLMOE_BF16
    assert priced.capacity_bytes == int(0.25 * 64 * OLMOE_BF16)  # the fraction counts OLMoE's bf16 experts
    assert priced.ttft_s > 100 * own.ttft_s


def test_an_expert_bytes_override_prices_the_fraction_too(recorded: Path) -> None:
    trace = load_trace(recorded, expert_bytes=OLMOE_BF16)  # failed before: full bytes stayed the header's
    stats = replay(trace, policy="none/lru/fetch/standard", cache_frac=0.05, bandwidth_gbps=5.0)
    assert stats.capacity_bytes == int(0.05 * 64 * OLMOE_BF16) and stats.bytes_transferred % OLMOE_BF16 == 0
    everything = replay(recorded, policy="none/lru/fetch/standard", cache_frac=1.0)
    beyond = replay(recorded, policy="none/lru/fetch/standard", cache_bytes=10 * TOTAL_EXPERT_BYTES)
    assert beyond.capacity_bytes == TOTAL_EXPERT_BYTES and beyond.hit_rate == everything.hit_rate


def test_sizes_are_taken_as_people_write_them(recorded: Path) -> None:
    base = [sys.executable, "-m", "specmd.cli", "replay", str(recorded), "--policy", "none/lru/fetch/standard"]
    run = subprocess.run([*base, "--expert-bytes", "12.582912MB", "--cache-bytes", "0.5GiB", "--json"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)["stats"]
    assert stats["capacity_bytes"] == 2**29 and stats["bytes_transferred"] % OLMOE_BF16 == 0
    assert replay(recorded, policy="none/lru/fetch/standard", cache_bytes="0.5GiB").capacity_bytes == min(
        2**29, TOTAL_EXPERT_BYTES
    )


def test_the_replay_command_takes_shape_from_and_refuses_two_prices(recorded: Path) -> None:
    base = [sys.executable, "-m", "specmd.cli", "replay", str(recorded), "--cache-frac", "0.05", "--json"]
    run = subprocess.run([*base, "--shape-from", "olmoe-1b-7b"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["stats"]["capacity_bytes"] == int(0.05 * 64 * OLMOE_BF16)
    both = subprocess.run([*base, "--shape-from", "olmoe-1b-7b", "--expert-bytes", "10"], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert both.returncode == 2 and "not both" in both.stderr


def test_a_live_model_priced_as_olmoe_stays_lossless_and_replays_exactly(
    checkpoint: Path, stock, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    settings = {"policy": "topk/least-stale/fetch/standard", "cache_frac": 0.25, "bandwidth_gbps": 5.0}
    with OffloadOLMoE.from_pretrained(checkpoint, shape_from="olmoe-1b-7b", progress=False, **settings) as model:
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
        assert model.expert_cache.capacity_bytes == int(0.25 * 64 * OLMOE_BF16)
        assert model.trace_meta()["priced_as"] == "olmoe-1b-7b"
    live = live_run(checkpoint, tmp_path / "t.jsonl", shape_from="olmoe-1b-7b", **settings)
    assert live["bytes_transferred"] % OLMOE_BF16 == 0
    assert without_wall(replay(tmp_path / "t.jsonl", **settings).to_dict()) == live


def test_a_sweep_prices_traces_as_each_model_it_names(recorded: Path, olmoe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    grid = SweepGrid(traces=(str(recorded),), policies=("none/lru/fetch/standard",), cache_fracs=(0.25,),
                     shape_from=("", "olmoe-1b-7b"), baselines=False)  # fmt: skip
    with pytest.raises(ValueError, match="whose layouts `shapes` does not give"):
        sweep(grid, tmp_path / "r.csv", jobs=1, progress=False)
    sweep(grid, tmp_path / "r.csv", jobs=1, progress=False, shapes={"olmoe-1b-7b": olmoe})
    rows = {row["shape_from"]: row for row in read_results(tmp_path / "r.csv")}
    assert set(rows) == {"", "olmoe-1b-7b"}
    assert int(rows["olmoe-1b-7b"]["bytes_transferred"]) == int(rows["olmoe-1b-7b"]["misses"]) * OLMOE_BF16
