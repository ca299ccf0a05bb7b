"""Replay drives the same engine as a live run: it reproduces live counters exactly, and the bounds hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specmd import OffloadOLMoE
from specmd.cache.policies.spec import catalog
from specmd.sim import load_trace, replay
from tests.conftest import EXPERT_BYTES
from tests.sim.conftest import live_run, random_trace, without_wall

RUNS = [
    ("none/lru/fetch/standard", {"cache_frac": 0.25}, 5.0),
    ("none/least-stale/fetch/standard", {"cache_frac": 0.05}, 5.0),
    ("topk/lru/fetch/standard", {"cache_frac": 0.25}, 0.5),
    ("topk/least-stale/fetch/standard", {"cache_frac": 0.05}, 5.0),
    ("topk:overfetch=2/ls/fetch/standard", {"cache_bytes": EXPERT_BYTES}, 16.0),
    ("topk:overfetch=2/lru/fetch/standard", {"cache_frac": 0.25}, None),
    ("topk/least-stale/fetch/standard", {"cache_frac": 1.0}, 5.0),
]


@pytest.mark.parametrize(("policy", "size", "bandwidth"), RUNS)
def test_replay_reproduces_the_live_run_exactly(checkpoint: Path, tmp_path: Path, policy, size, bandwidth) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "trace.jsonl"
    live = live_run(checkpoint, path, policy=policy, bandwidth_gbps=bandwidth, **size)
    assert live["requests"] > 0
    replayed = without_wall(replay(path, policy=policy, bandwidth_gbps=bandwidth, **size).to_dict())
    assert replayed == live
    load_trace(path).save(tmp_path / "trace.npz")  # the binary form replays identically
    from_npz = without_wall(replay(tmp_path / "trace.npz", policy=policy, bandwidth_gbps=bandwidth, **size).to_dict())
    assert from_npz == live


DISK_RUNS = [
    ("none/lru/fetch/standard", {"cache_frac": 0.05}, 5.0, {"disk": "sata"}),
    ("topk/least-stale/fetch/standard", {"cache_frac": 0.05}, 5.0, {"host_cache_frac": 0.3, "disk": "nvme3"}),
    ("topk:overfetch=2/lru/fetch/standard", {"cache_bytes": EXPERT_BYTES}, 16.0,
     {"host_cache_bytes": 3 * EXPERT_BYTES, "host_eviction": "lfu", "disk": "nvme5"}),
    ("none/least-stale/fetch/standard", {"cache_frac": 0.25}, None, {"host_cache_frac": 0.5, "disk": None}),
]  # fmt: skip


@pytest.mark.parametrize(("policy", "size", "bandwidth", "lower"), DISK_RUNS)
def test_replay_reproduces_a_live_disk_tier_run_exactly(
    checkpoint: Path, tmp_path: Path, policy, size, bandwidth, lower
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "trace.jsonl"
    live = live_run(checkpoint, path, policy=policy, bandwidth_gbps=bandwidth, storage="disk", **size, **lower)
    assert live["disk_bytes_read"] > 0
    if "host_cache_frac" in lower or "host_cache_bytes" in lower:
        assert live["host_hits"] > 0 and live["host_misses"] > 0
    replayed = replay(path, policy=policy, bandwidth_gbps=bandwidth, storage="disk", **size, **lower)
    assert without_wall(replayed.to_dict()) == live


def test_replay_wall_fields_are_zero_and_runs_are_deterministic(recorded: Path) -> None:
    first = replay(recorded, policy="topk/ls/fetch/standard", cache_frac=0.1)
    assert first.wall_ttft_s == 0.0 and first.wall_tokens_per_s == 0.0
    assert replay(recorded, policy="topk/ls/fetch/standard", cache_frac=0.1) == first


ONLINE = [name for kind, name, _, _ in catalog() if kind == "eviction" and name != "belady"]


@pytest.mark.parametrize("cache_frac", [0.05, 0.1, 0.25, 0.5])
def test_belady_bounds_every_online_policy_on_a_recorded_trace(recorded: Path, cache_frac: float) -> None:
    best = replay(recorded, policy="none/belady/fetch/standard", cache_frac=cache_frac).hit_rate
    for eviction in ONLINE:
        assert best >= replay(recorded, policy=f"none/{eviction}/fetch/standard", cache_frac=cache_frac).hit_rate


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.integers(1, 18), bandwidth=st.sampled_from([None, 1e-6, 1.0]))
def test_belady_bounds_every_online_policy_on_random_traces(seed: int, capacity: int, bandwidth) -> None:  # type: ignore[no-untyped-def]
    trace = random_trace(seed)
    kwargs = {"cache_bytes": 100 * capacity, "bandwidth_gbps": bandwidth}
    best = replay(trace, policy="none/belady/fetch/standard", **kwargs)
    for eviction in ONLINE:
        assert best.hit_rate >= replay(trace, policy=f"none/{eviction}/fetch/standard", **kwargs).hit_rate


def test_oracle_prefetch_never_wastes_a_transfer(recorded: Path) -> None:
    stats = replay(recorded, policy="oracle/lru/fetch/standard", cache_frac=0.5, bandwidth_gbps=None)
    assert stats.prefetches_issued > 0 and stats.prefetch_precision == 1.0
    topk = replay(recorded, policy="topk/lru/fetch/standard", cache_frac=0.5, bandwidth_gbps=None)
    assert stats.hit_rate >= topk.hit_rate


def test_bounds_are_refused_live(checkpoint: Path) -> None:
    for policy in ("none/belady/fetch/standard", "oracle/lru/fetch/standard"):
        with pytest.raises(ValueError, match="runs only in trace replay"):
            OffloadOLMoE.from_pretrained(checkpoint, cache_frac=0.5, policy=policy, progress=False)


def test_bandwidth_defaults_to_the_profile_link(recorded: Path) -> None:
    profile = replay(recorded, policy="none/lru/fetch/standard", cache_frac=0.25, hardware="rtx4090")
    explicit = replay(
        recorded, policy="none/lru/fetch/standard", cache_frac=0.25, hardware="rtx4090", bandwidth_gbps=25
    )
    slow = replay(recorded, policy="none/lru/fetch/standard", cache_frac=0.25, hardware="a100")  # 5 GB/s
    assert profile == explicit and slow.stall_s > profile.stall_s
    native = replay(recorded, policy="none/lru/fetch/standard", cache_frac=0.25, bandwidth_gbps=None)
    assert native.stall_s == 0.0 and native.hit_rate == profile.hit_rate


def test_replay_imports_no_torch(recorded: Path) -> None:
    code = (
        "import sys; from specmd.sim import replay; "
        f"s = replay({str(recorded)!r}, policy='topk/ls/fetch/standard', cache_frac=0.25); "
        "assert s.requests > 0; assert 'torch' not in sys.modules, 'replay imported torch'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
