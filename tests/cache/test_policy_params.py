"""Policy parameters: every value is either refused when a spec is parsed, naming the policy, the parameter, the
value and the allowed range, or accepted and then runs (hypothesis, over every registered policy)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specmd.cache.keys import START
from specmd.cache.policies import PolicySpec
from specmd.cache.policies.miss import Cascade, FetchPriority
from specmd.cache.policies.prefetch import TopK
from specmd.cache.policies.spec import _REGISTRY, KINDS
from specmd.sim import Trace, replay
from specmd.sim.trace import NEXT_LAYER
from tests.sim.conftest import random_trace

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("part", "error"),
    [
        (("topk", "overfetch", 1e308), "topk overfetch must be a finite number in (0, 1000000], got 1e+308"),
        (("topk", "overfetch", 0), "topk overfetch must be a finite number in (0, 1000000], got 0"),
        (("topk", "overfetch", True), "topk overfetch must be a finite number in (0, 1000000], got True"),
        (("topk", "overfetch", 10**400), "topk overfetch must be a finite number in (0, 1000000]"),
        (("score", "percentile", NAN), "score percentile must be a finite number in (0, 100], got nan"),
        (("score", "cap", INF), "score cap must be a finite number in (0, 1000000], got inf"),
        (("lookahead", "depth", 1e12), "lookahead depth must be an integer in [1, 64], got 1000000000000.0"),
        (("lookahead", "depth", 10**12), "lookahead depth must be an integer in [1, 64], got 1000000000000"),
        (("lookahead", "overfetch", -1), "lookahead overfetch must be a finite number in (0, 1000000]"),
        (("substitute", "tolerance", NAN), "substitute tolerance must be a finite number >= 0, got nan"),
        (("substitute", "tolerance", -0.1), "substitute tolerance must be a finite number >= 0, got -0.1"),
        (("cascade", "thresholds", (NAN, 0.1)), "cascade thresholds must be a finite number, got nan"),
        (("cascade", "thresholds", ()), "cascade thresholds must be a number or a non-empty list of numbers"),
        (("cascade", "thresholds", (0.1, 0.2)), "cascade thresholds must be in decreasing order"),
        (("cascade", "thresholds", {1: 2}), "cascade thresholds must be a number or a non-empty list"),
        (("fetch-priority", "percentile", NAN), "fetch-priority percentile must be a finite number in [0, 100]"),
        (("fetch-priority", "fallback", 5), "parameter 'fallback' must be a precision name or a list of them"),
        (("drop", "rank", 1), "drop rank must be an integer in [2, 65536], got 1"),
        (("drop", "rank", 10**21), "drop rank must be an integer in [2, 65536], got 1000000000000000000000"),
        (("drop", "rank", 3.0), "drop rank must be an integer in [2, 65536], got 3.0"),
        (("cache-aware", "lam", NAN), "cache-aware lam must be a finite number in [0, 1000000], got nan"),
        (("cache-aware", "lam", 1e308), "cache-aware lam must be a finite number in [0, 1000000]"),
        (("least-stale", "order", ["cyclic"]), "least-stale order must be one of cyclic, layer"),
    ],
)
def test_out_of_range_parameters_are_refused_when_parsed(part: tuple[str, str, object], error: str) -> None:
    name, param, value = part
    kind = next(kind for kind in KINDS if name in _REGISTRY[kind])
    with pytest.raises(ValueError) as raised:
        PolicySpec.parse({kind: (name, {param: value})})
    assert error in str(raised.value)


def test_text_values_are_refused_the_same_way() -> None:
    for text, error in [
        ("topk:overfetch=1e999/lru/fetch/standard", "got inf"),  # a literal that overflows to inf
        ("score:percentile=nan/lru/fetch/standard", "got 'nan'"),
        ("lookahead:depth=1e12/lru/fetch/standard", "got 1000000000000.0"),
        ("none/lru/drop:rank={[1]: 2}/standard", "got '{[1]: 2}'"),  # not a literal: the text
        ("none/lru/drop:rank=" + "-" * 100_000 + "1/standard", "drop rank must be an integer"),
        ("none/lru/drop:rank=1" + "+1" * 100_000 + "/standard", "drop rank must be an integer"),
    ]:
        with pytest.raises(ValueError, match="must be") as raised:
            PolicySpec.parse(text)
        assert error in str(raised.value)


def test_a_lone_value_is_a_list_of_one() -> None:
    assert PolicySpec.parse("none/lru/cascade:thresholds=5/standard").build().miss.thresholds == (5.0,)
    assert Cascade(0.3).thresholds == (0.3,)
    assert FetchPriority(fallback="int8").fallback == ("int8",)  # never its characters
    assert TopK(2).overfetch == 2.0


def test_bad_names_and_parameter_keys_are_value_errors() -> None:
    for value, error in [
        ({"miss": {"name": 5}}, "a miss policy name must be a string, got 5"),
        ({"miss": {"name": ["fetch"]}}, "a miss policy name must be a string"),
        ({"miss": ("drop", {1: 2})}, "is not a name, 'name:k=v'"),
        ({"miss": ("drop", [1, 2])}, "is not a name, 'name:k=v'"),
        ({"miss": {"name": "drop", "params": 5}}, "is not a name, 'name:k=v'"),
        ({1: "lru", "x": "lru"}, "policy dict has unknown part '1'"),
    ]:
        with pytest.raises(ValueError) as raised:
            PolicySpec.parse(value)  # type: ignore[arg-type]
        assert error in str(raised.value)


# ---- every registered policy, every parameter -------------------------------------------------------------
EXTREME = [NAN, INF, -INF, 1e308, -1e308, 10**400, 1e6 + 1, 65537]
SPECIAL = [0, 1, 2, 3, 64, 65, 100, 101, 65536, 1e6, -0.0, -1, 0.5, 1e-300]
OTHERS = [True, False, None, "", "int8", "int4", "nf4", "int2", "hqq2", "bf16", "fp32", "int9", "cyclic", "layer"]
NUMBERS = st.one_of(  # each branch about as likely: huge, NaN, inf, negative and bool come often
    st.sampled_from(EXTREME),
    st.sampled_from(SPECIAL),
    st.floats(),
    st.floats(0, 2),
    st.integers(-5, 200),
    st.integers(-(2**80), 2**80),
)
NAMES = st.one_of(st.sampled_from(OTHERS), st.text(max_size=6))
JUNK = st.one_of(
    NAMES,
    st.lists(st.one_of(NUMBERS, NAMES), max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=2), NUMBERS, max_size=2),
)


def _values(default: object) -> st.SearchStrategy[object]:
    """Values for a parameter, mostly of its default's kind (numbers, lists of numbers or names), some junk."""
    if isinstance(default, int | float) and not isinstance(default, bool):
        return st.one_of(NUMBERS, NUMBERS, NUMBERS, JUNK)
    if isinstance(default, tuple) and all(isinstance(v, int | float) for v in default):
        decreasing = st.lists(NUMBERS, min_size=1, max_size=4).map(lambda v: tuple(sorted(v, reverse=True)))
        return st.one_of(NUMBERS, decreasing, decreasing, st.lists(NUMBERS, max_size=4).map(tuple), JUNK)
    return st.one_of(NAMES, NAMES, st.lists(NAMES, max_size=3).map(tuple), NUMBERS, JUNK)


POLICIES = [(kind, name) for kind in KINDS for name in _REGISTRY[kind]]
PRECISION_BYTES = {"bf16": 100, "int8": 50, "nf4": 28, "hqq2": 16}


def _trace() -> Trace:
    trace = random_trace(3, logits=True)  # logits for substitute, next_logits and other predictions for prefetch
    return Trace(trace.meta | {"expert_bytes": PRECISION_BYTES}, trace.events)


def _parameters(kind: str, name: str) -> list[tuple[str, object]]:
    parameters = inspect.signature(_REGISTRY[kind][name]).parameters.values()
    return [(p.name, p.default) for p in parameters if p.name != "self"]


def _parse_or_run(kind: str, name: str, params: dict[str, Any], bandwidth: float | None) -> None:
    """Refused with a ValueError when parsed, or accepted and then runs to the end."""
    try:
        spec = PolicySpec.parse({kind: (name, params)})
    except ValueError:
        return  # refused when parsed: the documented outcome for a bad value
    policies = spec.build()
    if kind == "routing":  # a replay keeps the recorded routing: run the policy as a live model would
        for step in range(20):
            offsets = policies.routing.bias(step % 3, [0, 2, 5], 0.5 + step % 4, START) or {}
            assert all(math.isfinite(v) for v in offsets.values())
        return
    trace = _trace()
    predictor = trace.predictor if policies.prefetch.depth > 1 else NEXT_LAYER  # next_logits look one layer ahead
    stats = replay(trace, policy=spec, cache_frac=0.3, bandwidth_gbps=bandwidth, predictor=predictor)
    assert stats.requests == trace.num_requests  # ran to the end


@pytest.mark.parametrize(("kind", "name"), POLICIES, ids=[f"{k}-{n}" for k, n in POLICIES])
def test_every_parameter_at_every_edge_value(kind: str, name: str) -> None:
    for param, _ in _parameters(kind, name):
        for value in [*EXTREME, *SPECIAL, *OTHERS, (), (0.5,), (NAN,), (INF, 0.1), ("int8", "int4"), {"a": 1}]:
            _parse_or_run(kind, name, {param: value}, bandwidth=5e-6)


@pytest.mark.parametrize(("kind", "name"), POLICIES, ids=[f"{k}-{n}" for k, n in POLICIES])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_parameter_value_is_refused_at_parse_time_or_runs(kind: str, name: str, data: st.DataObject) -> None:
    params: dict[str, Any] = {}
    for param, default in _parameters(kind, name):
        if data.draw(st.integers(0, 3), label=f"give {param}"):  # 3 in 4 give it
            params[param] = data.draw(_values(default), label=param)
    bandwidth = data.draw(st.sampled_from([None, 5e-6]), label="bandwidth_gbps")  # 5 KB/s: an expert is 20 ms
    _parse_or_run(kind, name, params, bandwidth)
