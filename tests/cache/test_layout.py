"""The expert layout: one contract between live models and trace headers, checked where it is read."""

from __future__ import annotations

import subprocess
import sys

import pytest

from specmd.cache.clock import ModelShape
from specmd.cache.layout import ExpertLayout
from specmd.cache.policies.spec import PolicySpec

SHAPE = ModelShape(
    num_layers=4, hidden_size=32, kv_dim=32, dense_params=(10, 10, 10, 10), head_params=5, expert_params=96,
    dtype_bytes=4,
)  # fmt: skip
HEADER = {
    "num_layers": 4,
    "moe_layers": [1, 3],
    "experts_per_layer": 8,
    "top_k": 2,
    "precision": "int8",
    "expert_bytes": {"int8": 120, "fp32": 384},
    "full_precision": "fp32",
    "full_expert_bytes": 384,
    "shape": SHAPE.to_dict(),
}


def test_header_round_trip_and_derived_sizes() -> None:
    layout = ExpertLayout.from_header(HEADER)
    assert layout.to_header() == HEADER
    assert layout.routed_experts == 16 and layout.full_bytes == 16 * 384
    assert layout.bytes_of_fraction(0.25) == 4 * 384  # counted at full precision, whatever is stored
    assert layout.catalog()[:2] == [(1, 0, "int8"), (1, 1, "int8")] and len(layout.catalog()) == 16


def test_a_bare_header_takes_defaults() -> None:
    layout = ExpertLayout.from_header(
        {"num_layers": 2, "moe_layers": [0, 1], "experts_per_layer": 4, "top_k": 1, "expert_bytes": 100}
    )
    assert (layout.precision, dict(layout.expert_bytes), layout.full_precision, layout.full_expert_bytes) == (
        "bf16", {"bf16": 100}, "bf16", 100,
    )  # fmt: skip
    assert layout.shape is None


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"experts_per_layer": "8"}, "experts_per_layer must be an integer >= 1, got '8'"),
        ({"experts_per_layer": 10**9}, "beyond what specmd supports"),
        ({"moe_layers": "1,3"}, "moe_layers must be a non-empty list"),
        ({"moe_layers": [3, 1]}, "ascending distinct indices"),
        ({"moe_layers": [1, 4]}, "below num_layers=4"),
        ({"top_k": 9}, "top_k=9 is more than the 8 experts"),
        ({"expert_bytes": {"int8": 0, "fp32": 384}}, "expert_bytes['int8'] must be an integer >= 1, got 0"),
        ({"expert_bytes": {"fp32": -5}}, "expert_bytes['fp32'] must be an integer >= 1, got -5"),
        ({"expert_bytes": {"fp32": 384}}, "precision 'int8' is not among the stored ones"),
        ({"full_expert_bytes": -1}, "full_expert_bytes must be an integer >= 1"),
        ({"shape": {"num_layers": 4}}, "the model shape lacks 'dense_params'"),
        ({"shape": {**SHAPE.to_dict(), "hidden_size": "32"}}, "hidden_size must be an integer"),
        ({"shape": {**SHAPE.to_dict(), "dense_params": [1, 2]}}, "dense_params has 2 entries"),
        ({"num_layers": None}, "the header gives no num_layers"),
    ],
)
def test_bad_headers_are_refused_with_the_field_named(change: dict, error: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError) as raised:
        ExpertLayout.from_header(HEADER | change)
    assert error in str(raised.value)


def test_precision_parameters_resolve_aliases_when_a_spec_is_parsed() -> None:
    miss = PolicySpec.parse("none/lru/fetch-priority:fallback=int4/standard").build().miss
    assert miss.fallback == ("nf4",)  # one name stands for a list of one, never its characters
    assert PolicySpec.parse("none/lru/fetch-priority:fallback=(int8,int2)/standard").build().miss.fallback == (
        "int8", "hqq2",
    )  # fmt: skip
    with pytest.raises(ValueError, match="parameter 'fallback': unknown precision 'int9'"):
        PolicySpec.parse("none/lru/fetch-priority:fallback=int9/standard")
    with pytest.raises(ValueError, match="must be a precision name or a list of them"):
        PolicySpec.parse("none/lru/fetch-priority:fallback=5/standard")


def test_precision_names_load_no_torch() -> None:
    code = (
        "import sys; from specmd.cache.policies.spec import PolicySpec; "
        "PolicySpec.parse('none/lhu/fetch-priority:fallback=int2/standard').build(); "
        "assert 'torch' not in sys.modules"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
