"""Route predictors: a live model's predictor is recorded in its trace and replays exactly, whichever it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specmd import OffloadOLMoE
from specmd.sim import TraceError, load_trace, replay
from tests.sim.conftest import live_run, without_wall

SETTING = {"policy": "topk:overfetch=2/lru/fetch/standard", "cache_frac": 0.5, "bandwidth_gbps": 5.0}


@pytest.fixture(scope="module")
def next_token(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # type: ignore[type-arg]
    path = tmp_path_factory.mktemp("next-token") / "trace.jsonl"
    return path, live_run(checkpoint, path, predictor="next-token", **SETTING)


def test_the_next_token_predictor_prefetches_for_the_next_pass_and_is_recorded(next_token) -> None:  # type: ignore[no-untyped-def]
    path, live = next_token
    trace = load_trace(path)
    assert trace.predictor == "next-token" and trace.meta["predictor"] == "next-token"
    predicting = [e for e in trace.events if e.predictions]
    # One token per pass predicts: the prefill's last position and each decode token, at every MoE layer.
    assert len(predicting) == len(trace.passes()) * len(trace.layout.moe_layers)
    assert all(
        (ahead, layer) == (1, e.layer) and len(row) == 16 for e in predicting for ahead, layer, row in e.predictions
    )
    assert live["prefetches_issued"] > 0 and live["prefetches_used"] > 0


def test_a_next_token_run_replays_exactly_from_both_trace_forms(next_token, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, live = next_token
    assert without_wall(replay(path, **SETTING).to_dict()) == live
    load_trace(path).save(tmp_path / "trace.npz")
    assert without_wall(replay(tmp_path / "trace.npz", **SETTING).to_dict()) == live


def test_a_trace_replays_either_predictor_it_records(next_token, checkpoint: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = next_token
    as_next_layer = replay(path, predictor="next-layer", **SETTING)
    reference = tmp_path / "next-layer.jsonl"
    assert without_wall(as_next_layer.to_dict()) == live_run(checkpoint, reference, **SETTING)
    with pytest.raises(TraceError, match="records predictions of 'next-layer' and 'next-token', not of 'bogus'"):
        replay(path, predictor="bogus", **SETTING)


def test_traces_without_a_predictor_header_replay_the_next_layer_router(recorded: Path, tmp_path: Path) -> None:
    lines = recorded.read_text().splitlines()
    header = json.loads(lines[0])
    del header["meta"]["predictor"]
    old = tmp_path / "old.jsonl"
    old.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    assert load_trace(old).predictor == "next-layer"
    assert replay(old, **SETTING) == replay(recorded, **SETTING)


def test_an_unknown_predictor_is_refused_before_anything_loads(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="unknown route predictor 'bogus'; available: next-layer, next-token"):
        OffloadOLMoE.from_pretrained(checkpoint, cache_frac=0.25, predictor="bogus", progress=False)
