"""Experts on disk (`specmd.cache.tiers`): the disk link, the host-RAM tier and their counters, on hand-worked
timelines, and the host tier's capacity bound as a property.

Defaults: 1000-byte experts, a 1 GB/s host-to-device link (1 us per transfer), a 0.5 GB/s disk (2 us per read),
0.5 us per expert computed, no dense or head compute time.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specmd.cache.config import CacheConfig
from specmd.cache.factory import build_manager
from specmd.cache.layout import ExpertLayout
from tests.cache.conftest import DECODE, PREFILL, make_manager, run_pass

US = 1e-6


def test_without_a_host_tier_every_transfer_reads_the_disk_first() -> None:
    m = make_manager(disk_gbps=0.5)
    run_pass(m, {0: {0: 1, 1: 1}}, info=PREFILL)
    s = m.snapshot()
    # e0: disk [0, 2], link [2, 3]; e1: disk [2, 4], link [4, 5] (the disk read overlaps e0's copy).
    # Compute waits 0 -> 3 (2 of it on the disk), runs to 3.5, waits to 5 (0.5 on the disk), runs to 5.5.
    assert (s.misses, s.host_hits, s.host_misses, s.host_evictions) == (2, 0, 0, 0)
    assert s.disk_bytes_read == 2000 and s.bytes_transferred == 2000
    assert s.stall_s == pytest.approx(4.5 * US)
    assert s.disk_stall_s == pytest.approx(2.5 * US)
    assert s.ttft_s == pytest.approx(5.5 * US)
    assert (s.host_capacity_bytes, s.peak_host_resident_bytes) == (0, 0)


def test_the_host_tier_serves_experts_the_cache_evicted_without_the_disk() -> None:
    m = make_manager(capacity_experts=1, layers=(0,), top_k=1, disk_gbps=0.5, host_capacity_experts=2)
    per_pass = []
    for i, expert in enumerate([0, 1, 0, 2, 1]):
        run_pass(m, {0: {expert: 1}}, info=PREFILL if i == 0 else DECODE)
        s = m.snapshot()
        per_pass.append((s.host_hits, s.host_misses, s.host_evictions, s.disk_bytes_read))
    # e0, e1: read from disk into the host tier. e0 again: a host hit (link only). e2: the host tier is full and
    # evicts its least recently used, e1 (e0 was used at pass 3). e1 again: read from disk, evicting e0.
    assert per_pass == [(0, 1, 0, 1000), (0, 2, 0, 2000), (1, 2, 0, 2000), (1, 3, 1, 3000), (1, 4, 2, 4000)]
    s = m.snapshot()
    assert (s.requests, s.misses, s.host_hit_rate) == (5, 5, 0.2)
    # Each host miss stalls 3 us (2 on the disk), the host hit 1 us (none on the disk).
    assert s.stall_s == pytest.approx(13 * US)
    assert s.disk_stall_s == pytest.approx(8 * US)
    assert s.emulated_time_s == pytest.approx(5 * 0.5 * US + 13 * US)
    assert (s.host_capacity_bytes, s.peak_host_resident_bytes) == (2000, 2000)
    assert s.per_layer[0]["host_hits"] == 1 and s.per_layer[0]["disk_stall_s"] == pytest.approx(8 * US)
    assert sorted(k.expert for k in m.path.host.resident()) == [1, 2]  # type: ignore[union-attr]


def test_an_expert_being_copied_out_of_the_host_tier_is_not_evicted_from_it() -> None:
    # Both experts of the layer are read while the host tier holds one: the second read cannot evict the first
    # (its copy to the device runs until 3 us), so it goes past the host tier.
    m = make_manager(disk_gbps=0.5, host_capacity_experts=1, layers=(0,))
    run_pass(m, {0: {0: 1, 1: 1}}, info=PREFILL)
    s = m.snapshot()
    assert (s.host_misses, s.host_evictions, s.disk_bytes_read) == (2, 0, 2000)
    assert [k.expert for k in m.path.host.resident()] == [0]  # type: ignore[union-attr]
    assert s.stall_s == pytest.approx(4.5 * US)  # the same timeline as with no host tier


def test_a_prefetch_starts_when_the_disk_is_free_and_its_copy_follows_the_read() -> None:
    # topk prefetches layer 1's two experts; a transfer starts at an event of the timeline when its first link (here
    # the disk: neither expert is in host RAM) is free, as a prefetch over the link alone does.
    m = make_manager("topk/lru/fetch/standard", capacity_experts=4, disk_gbps=0.5, host_capacity_experts=4)
    predicted = {0: [[0.0, 0.0, 9.0, 8.0, 0.0, 0.0, 0.0, 0.0]]}
    run_pass(m, {0: {0: 1, 1: 1}, 1: {2: 1, 3: 1}}, predicted, info=PREFILL)
    s = m.snapshot()
    # Demand: e0 disk [0, 2] link [2, 3], e1 disk [2, 4] link [4, 5]; layer 0 computes to 5.5. The disk is busy
    # until 4, so the first prefetch (e2) starts when layer 0 ends: disk [5.5, 7.5] link [7.5, 8.5]; e3 is still
    # queued when layer 1 starts, so it is dropped and missed: disk [7.5, 9.5] link [9.5, 10.5]. Layer 1 waits
    # for e2 until 8.5 (2 of 3 us on the disk), computes to 9, waits for e3 until 10.5 (0.5 on the disk), ends at 11.
    assert (s.prefetches_issued, s.late_prefetches, s.prefetches_used, s.misses) == (1, 1, 1, 3)
    assert (s.host_misses, s.disk_bytes_read) == (4, 4000)
    assert s.ttft_s == pytest.approx(11 * US)
    assert s.stall_s == pytest.approx((3 + 1.5 + 3 + 1.5) * US)
    assert s.disk_stall_s == pytest.approx((2 + 0.5 + 2 + 0.5) * US)


LAYOUT = ExpertLayout(
    num_layers=2, moe_layers=(0, 1), experts_per_layer=6, top_k=2, precision="bf16",
    expert_bytes={"bf16": 100}, full_precision="bf16", full_expert_bytes=100,
)  # fmt: skip

requests = st.dictionaries(st.integers(0, 5), st.integers(1, 3), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(
    passes=st.lists(st.tuples(requests, requests), min_size=1, max_size=8),
    cache=st.integers(1, 12),
    host=st.integers(1, 12),
    policy=st.sampled_from(["none/lru/fetch/standard", "topk:overfetch=2/least-stale/fetch/standard"]),
    host_eviction=st.sampled_from(["lru", "lfu", "fld"]),
    disk=st.sampled_from(["nvme3", "sata", None]),
)
def test_the_host_tier_never_holds_more_than_its_capacity(passes, cache, host, policy, host_eviction, disk) -> None:  # type: ignore[no-untyped-def]
    config = CacheConfig(
        cache_bytes=cache * 100, policy=policy, bandwidth_gbps=1e-6, storage="disk", host_cache_bytes=host * 100,
        host_eviction=host_eviction, disk=disk,
    )  # fmt: skip
    m = build_manager(LAYOUT, config)
    tier = m.path.host  # type: ignore[union-attr]
    assert tier is not None and tier.capacity_bytes == min(host, 12) * 100
    for i, (first, second) in enumerate(passes):
        m.begin_pass(PREFILL if i == 0 else DECODE)
        for layer, asked in ((0, first), (1, second)):
            ahead = m.prediction_targets(layer)
            m.run_layer(layer, asked, {ahead[0]: [[1.0] * 6]} if ahead else None)
            assert tier.resident_bytes <= tier.capacity_bytes
        m.end_pass()
    s = m.snapshot()
    assert s.peak_host_resident_bytes <= s.host_capacity_bytes
    assert s.host_hits + s.host_misses == s.misses + s.prefetches_issued  # every transfer asked the host tier
    assert s.disk_bytes_read == 100 * s.host_misses
    assert 0 <= s.disk_stall_s <= s.stall_s + 1e-12


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"host_cache_frac": 1.5}, r"host_cache_frac must be a number with 0 < host_cache_frac <= 1, got 1\.5"),
        ({"host_cache_frac": -0.1}, r"host_cache_frac must be .* got -0\.1"),
        ({"host_cache_bytes": -5}, r"host_cache_bytes must be .* got -5"),
        ({"host_cache_frac": 0.5, "host_cache_bytes": "1GB"}, r"at most one of host_cache_frac and host_cache_bytes"),
        ({"host_cache_frac": 0.5, "storage": "ram"}, r"need storage='disk' \(got storage='ram'"),
        ({"disk": "floppy"}, r"unknown disk profile 'floppy'; available: nvme3, nvme4, nvme5, sata"),
        ({"host_eviction": "belady"}, r"host_eviction 'belady' reads routing or the future"),
        ({"host_eviction": "nope"}, r"nope"),
        ({"storage": "tape"}, r"storage 'tape' is not available; available: ram, disk"),
    ],
)
def test_bad_lower_tier_settings_are_one_clear_error(settings_, message) -> None:  # type: ignore[no-untyped-def]
    given_ = {"storage": "disk", **settings_}
    with pytest.raises(ValueError, match=message):
        CacheConfig(cache_frac=0.5, **given_)


def test_a_host_tier_under_one_expert_is_refused_and_an_oversized_one_holds_every_expert() -> None:
    with pytest.raises(ValueError, match=r"host_cache_bytes=50 holds less than one expert \(100 B\)"):
        CacheConfig(cache_frac=0.5, storage="disk", host_cache_bytes=50).host_capacity_bytes(LAYOUT)
    assert CacheConfig(cache_frac=0.5, storage="disk", host_cache_bytes="1GB").host_capacity_bytes(LAYOUT) == 1200


def test_the_disk_profile_prices_reads_and_round_trips_through_to_dict() -> None:
    config = CacheConfig(cache_frac=0.5, storage="disk", disk="profile", host_cache_frac=0.25, host_eviction="lfu")
    link = config.disk_link()
    assert link is not None and link.bandwidth_gbps == 7.45  # the a100 profile's drive: nvme4
    assert CacheConfig.from_dict(config.to_dict()) == config
    assert CacheConfig(cache_frac=0.5).disk_link() is None  # experts in RAM: no disk


def test_a_config_copied_with_replace_keeps_its_host_eviction_policy() -> None:
    config = CacheConfig(cache_frac=0.1, storage="disk", host_cache_frac=0.5, host_eviction="lfu")
    copy = replace(config, cache_frac=0.2)  # a draft's options are built this way
    assert (copy.host_eviction.name, copy.cache_frac) == ("lfu", 0.2)
