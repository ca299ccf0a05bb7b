"""`stats.combine`: the metrics of caches run side by side (data-parallel ranks) equal those of one recorder that
saw every rank's events: counters summed, rates recomputed from the sums."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specmd.cache.stats import _SUMMED, CacheStats, StatsRecorder, combine

LAYERS = (1, 3, 4)
COUNTS = [name for name in _SUMMED if name != "stall_s"]

times = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=2.0))  # emulated times: 0 or >= 1 us
passes = st.lists(st.tuples(st.booleans(), st.integers(1, 4), times, times), max_size=6)
layer_events = st.fixed_dictionaries(
    {"counts": st.fixed_dictionaries({name: st.integers(0, 50) for name in COUNTS}), "stall_s": times}
)
rank = st.tuples(
    st.fixed_dictionaries({layer: layer_events for layer in LAYERS}),
    passes,
    st.dictionaries(st.sampled_from(["bf16", "int8"]), st.integers(1, 9), max_size=2),
    st.integers(0, 10**6),
)


def feed(recorder: StatsRecorder, events: tuple) -> None:
    layers, steps, fetches, _ = events
    for layer, event in layers.items():
        counters = recorder.layers[layer]
        for name, value in event["counts"].items():
            setattr(counters, name, getattr(counters, name) + value)
        counters.stall_s += event["stall_s"]
    for step in steps:
        recorder.record_pass(*step)
    recorder.fetches_by_precision.update(fetches)


def snapshot(events: tuple) -> CacheStats:
    recorder = StatsRecorder(LAYERS)
    feed(recorder, events)
    return recorder.snapshot(peak_resident_bytes=events[3], capacity_bytes=10**6)


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name == "per_layer":
            for mine, theirs in zip(got[name], value, strict=True):
                assert_same(mine, theirs)
        elif isinstance(value, float):
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
        else:
            assert got[name] == value, name


@settings(max_examples=80, deadline=None)
@given(st.lists(rank, min_size=1, max_size=4))
def test_combined_ranks_equal_one_recorder_of_all_their_events(ranks: list[tuple]) -> None:
    everything = StatsRecorder(LAYERS)
    for events in ranks:
        feed(everything, events)
    want = everything.snapshot(max(events[3] for events in ranks), 10**6)
    got = combine([snapshot(events) for events in ranks])
    assert_same(got.to_dict(), want.to_dict())


def test_rates_are_recomputed_from_the_sums_not_averaged() -> None:
    busy, idle = StatsRecorder([0]), StatsRecorder([0])
    busy.layers[0].requests, busy.layers[0].hits = 90, 90
    idle.layers[0].requests, idle.layers[0].hits = 10, 0
    total = combine([busy.snapshot(0, 1), idle.snapshot(0, 1)])
    assert (total.requests, total.hits, total.hit_rate) == (100, 90, 0.9)  # the mean of 1.0 and 0.0 would be 0.5
    assert total.per_layer[0]["hit_rate"] == 0.9


def test_nothing_to_combine_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        combine([])


def test_host_tier_peaks_are_the_largest_rank_and_its_rate_is_recomputed() -> None:
    near, far = StatsRecorder([0]), StatsRecorder([0])
    near.layers[0].host_hits, near.layers[0].host_misses = 9, 1
    far.layers[0].host_hits, far.layers[0].host_misses = 1, 9
    total = combine([near.snapshot(0, 1, peak_host_bytes=70, host_capacity_bytes=100), far.snapshot(0, 1, 90, 100)])
    assert (total.host_hits, total.host_misses, total.host_hit_rate) == (10, 10, 0.5)
    assert (total.peak_host_resident_bytes, total.host_capacity_bytes) == (90, 100)


def test_speculation_counters_are_summed_and_its_rates_recomputed() -> None:
    ranks = [StatsRecorder([0]), StatsRecorder([0])]
    for recorder, (drafted, accepted, ks) in zip(ranks, [(8, 8, [4, 4]), (8, 0, [8])], strict=True):
        recorder.record_pass(False, 2 * len(ks), 1.0, 1.0)
        spec = recorder.speculation
        spec.drafted, spec.accepted, spec.verify_passes, spec.k_chosen = drafted, accepted, len(ks), ks
    total = combine([recorder.snapshot(0, 1, draft_capacity_bytes=5) for recorder in ranks])
    assert (total.drafted_tokens, total.accepted_tokens, total.acceptance_rate) == (16, 8, 0.5)
    assert (total.verify_passes, total.speculate_k, total.draft_capacity_bytes) == (3, [4, 4, 8], 5)
