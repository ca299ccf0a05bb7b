"""The speculation governor: K within bounds, plain steps first, and never a K that measures slower per token
than plain decoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specmd.cache.governor import (
    PLAIN_PROBES,
    AmortizationGovernor,
    Counters,
    FixedK,
    VerifyOutcome,
    check_speculative,
)
from tests.cache.conftest import make_manager


def governor(k_max: int = 4) -> AmortizationGovernor:
    target = make_manager(layers=(0, 1), num_experts=8, top_k=2)
    draft = make_manager(layers=(0, 1), num_experts=8, top_k=2, expert_bytes=250)
    return AmortizationGovernor(target, draft, k_max)


def step(gov: AmortizationGovernor, k: int, kept: int, seconds: float, at: float = 0.0) -> None:
    before = Counters(at, 0.0, 0, 0)
    after = Counters(at + seconds, 0.1 * seconds * k, 4 + 2 * k, 2 + k)
    gov.update(VerifyOutcome(k, kept, before, after))


def test_settings() -> None:
    assert check_speculative("auto") == 8 and check_speculative("auto:3") == 3 and check_speculative(2) is None
    for bad in ("auto:0", "auto:x", "fast", -1, True, 1.5, None):
        with pytest.raises(ValueError, match="speculative"):
            check_speculative(bad)
    assert FixedK(4).choose(2, 10) == 2 and FixedK(4).choose(9, 10) == 4


def test_expected_tokens() -> None:
    gov = governor()
    assert gov.acceptance == pytest.approx(0.7)
    assert gov.expected_tokens(0) == 1.0
    assert gov.expected_tokens(2) == pytest.approx(1 + 0.7 + 0.49)


@settings(max_examples=60, deadline=None)
@given(
    plain_s=st.floats(0.01, 1.0),
    costs=st.lists(st.floats(0.01, 5.0), min_size=4, max_size=4),
    accepted=st.lists(st.integers(0, 4), min_size=4, max_size=4),
    limit=st.integers(0, 6),
)
def test_chosen_k_is_never_slower_than_plain(
    plain_s: float, costs: list[float], accepted: list[int], limit: int
) -> None:
    """Plain steps come first; once every K has run, the chosen one yields at least plain decoding's tokens/s by
    the measurements, and it stays within 0..min(K_max, limit)."""
    gov = governor(k_max=4)
    for _ in range(PLAIN_PROBES):
        assert gov.choose(6, 10) == 0
        step(gov, 0, 0, plain_s)
    for k, (seconds, kept) in enumerate(zip(costs, accepted, strict=True), start=1):
        step(gov, k, min(kept, k), seconds)
    k = gov.choose(limit, 10)
    assert 0 <= k <= min(4, limit)
    assert gov.expected_tokens(k) / gov.cost(k, 10) >= 1.0 / gov.cost(0, 10)


def test_it_speculates_when_drafts_pay_and_stops_when_they_do_not() -> None:
    gov = governor(k_max=4)
    for _ in range(PLAIN_PROBES):
        step(gov, gov.choose(4, 10), 0, 1.0)
    for _ in range(20):  # every draft kept, a step costs little more than a plain one
        k = gov.choose(4, 10)
        step(gov, k, k, 1.0 + 0.1 * k)
    assert gov.choose(4, 10) == 4
    for _ in range(40):  # now every draft is rejected
        k = gov.choose(4, 10)
        step(gov, k, 0, 1.0 + 0.1 * k)
        if not k:
            break
    assert gov.choose(4, 10) == 0
