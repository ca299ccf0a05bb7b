"""Policy mixes written as text, dicts or objects; configs round-trip through dicts."""

from __future__ import annotations

import json

import pytest

from specmd.cache.layout import ExpertLayout
from specmd.cache.policies import DEFAULT_POLICY, PolicySpec
from specmd.cache.policies.eviction import LRU
from specmd.cache.policies.prefetch import TopK
from specmd.offload_models.options import OffloadOptions


def test_every_written_form_means_the_same_mix() -> None:
    forms = [
        "topk:overfetch=1.5/ls/fetch/stnd",
        " TopK:overfetch=1.5 /least-stale/fetch/standard",
        {"prefetch": ("topk", {"overfetch": 1.5}), "eviction": "ls"},
        {"prefetch": {"name": "topk", "params": {"overfetch": 1.5}}, "eviction": "least-stale", "miss": "fetch"},
    ]
    specs = [PolicySpec.parse(form) for form in forms]
    assert all(spec == specs[0] for spec in specs)
    assert str(specs[0]) == "topk:overfetch=1.5/least-stale/fetch/standard"


def test_default_and_build_make_fresh_objects() -> None:
    spec = PolicySpec.parse(None)
    assert str(spec) == DEFAULT_POLICY
    first, second = spec.build(), spec.build()
    assert first.eviction is not second.eviction  # each cache gets its own stateful policy
    assert isinstance(first.prefetch, TopK) and first.prefetch.overfetch == 1.0


def test_policy_objects_are_used_as_given() -> None:
    mine = LRU()
    spec = PolicySpec.parse({"eviction": mine})
    assert spec.eviction.name == "lru"
    assert spec.build().eviction is mine


def test_spec_round_trips_through_json() -> None:
    spec = PolicySpec.parse("topk:overfetch=2/lru/fetch/standard")
    assert PolicySpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="policy spec version 99 is not supported"):
        PolicySpec.from_dict(spec.to_dict() | {"version": 99})


def test_offload_options_round_trip_and_validate() -> None:
    options = OffloadOptions(
        cache_frac=0.05, policy="none/ls/fetch/standard", bandwidth_gbps=5, expert_precisions="fp32"
    )
    assert options.expert_precisions == ("fp32",)
    data = json.loads(json.dumps(options.to_dict()))
    assert data["policy"]["eviction"]["name"] == "least-stale"
    assert OffloadOptions.from_dict(data) == options
    with pytest.raises(ValueError, match="OffloadOptions version 2 is not supported"):
        OffloadOptions.from_dict(data | {"version": 2})


def test_capacity_from_a_fraction_or_bytes() -> None:
    layout = ExpertLayout(  # ten experts of 100 bytes: 1000 bytes in all
        num_layers=1, moe_layers=(0,), experts_per_layer=10, top_k=1,
        precision="fp32", expert_bytes={"fp32": 100}, full_precision="fp32", full_expert_bytes=100,
    )  # fmt: skip
    assert OffloadOptions(cache_frac=0.25).capacity_bytes(layout) == 250
    assert OffloadOptions(cache_bytes=5000).capacity_bytes(layout) == 1000  # at most all
    with pytest.raises(ValueError, match=r"use cache_frac >= 0\.1 or cache_bytes >= 100"):
        OffloadOptions(cache_frac=0.05).capacity_bytes(layout)


def test_parameters_in_text_may_be_tuples() -> None:
    spec = PolicySpec.parse("none/lru/cascade:thresholds=(0.3,0.2)/standard")
    assert spec.miss.params == (("thresholds", (0.3, 0.2)),)
    assert spec.build().miss.thresholds == (0.3, 0.2)
