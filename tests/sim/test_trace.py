"""The trace format: what is recorded, how passes are rebuilt, and errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specmd import OffloadOLMoE
from specmd.sim import Trace, TraceError, TraceEvent, load_trace, record, replay
from tests.sim.conftest import PROMPT, TOKENS, random_trace


def test_recorded_trace_holds_the_format_and_the_model(recorded: Path) -> None:
    lines = recorded.read_text().splitlines()
    header = json.loads(lines[0])["meta"]
    assert header["format"] == "specmd-trace" and header["version"] == 1
    assert (header["experts_per_layer"], header["top_k"], header["moe_layers"]) == (16, 4, [0, 1, 2, 3])
    assert header["expert_bytes"] == {"fp32": 3 * 32 * 16 * 4} and header["shape"]["num_layers"] == 4
    first = json.loads(lines[1])
    assert {"seq", "token", "layer", "experts", "weights", "logits", "next_logits", "prefill"} <= set(first)
    assert len(first["experts"]) == 4 and len(first["logits"]) == 16 and len(first["next_logits"]) == 16
    trace = load_trace(recorded)
    prompt_len = PROMPT.shape[1]
    assert len(trace.events) == (prompt_len + TOKENS - 1) * 4
    assert all(e.next_logits is None for e in trace.events if e.layer == 3)
    passes = trace.passes()
    assert len(passes) == TOKENS  # the prefill, then one pass per decode step
    assert passes[0].info.prefill and passes[0].info.tokens == prompt_len
    assert [p.info.context for p in passes[1:3]] == [prompt_len + 1, prompt_len + 2]


def test_logits_and_weights_match_the_router(checkpoint: Path, tmp_path: Path) -> None:
    with OffloadOLMoE.from_pretrained(checkpoint, cache_frac=1.0, progress=False) as model, torch.no_grad():
        record(model, PROMPT, tmp_path / "t.jsonl", max_new_tokens=1)
        out = model(PROMPT, output_router_logits=True)
    events = [e for e in load_trace(tmp_path / "t.jsonl").events if e.layer == 2]
    logits = out.router_logits[2]  # [T, E], recorded by transformers from the native router
    assert torch.equal(torch.tensor([e.logits for e in events]), logits)
    probs = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probs, 4, dim=-1)
    assert [list(e.experts) for e in events] == top.indices.tolist()
    assert torch.equal(torch.tensor([e.weights for e in events]), top.values)


def test_record_returns_generate_output_and_skips_pad_tokens(checkpoint: Path, tmp_path: Path) -> None:
    batch = torch.tensor([[0, 0, 0, 14, 9, 27], [11, 52, 3, 70, 18, 6]])
    mask = (batch != 0).long()
    with OffloadOLMoE.from_pretrained(checkpoint, cache_frac=0.5, progress=False) as model:
        out = record(model, batch, tmp_path / "b.jsonl", attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert torch.equal(out, model.generate(batch, attention_mask=mask, max_new_tokens=3, do_sample=False))
    trace = load_trace(tmp_path / "b.jsonl")
    per_seq = {seq: {e.token for e in trace.events if e.seq == seq} for seq in (0, 1)}
    assert per_seq == {0: set(range(5)), 1: set(range(8))}  # 3 + 2 and 6 + 2 real positions


def test_passes_without_prefill_flags_are_one_per_token() -> None:
    events = [TraceEvent(0, t, layer, (t % 3,)) for t in range(4) for layer in (0, 1)]
    trace = Trace({"experts_per_layer": 3, "expert_bytes": 10}, events)
    assert [p.info.tokens for p in trace.passes()] == [1, 1, 1, 1]
    assert trace.passes()[0].info.prefill and not trace.passes()[1].info.prefill


def write(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_a_foreign_trace_replays_with_meta_from_the_command_line(tmp_path: Path) -> None:
    lines = [
        {"seq": 0, "token": t, "layer": layer, "experts": [t % 4, (t + 1) % 4]} for t in range(6) for layer in (0, 1)
    ]
    path = write(tmp_path / "foreign.jsonl", lines)
    with pytest.raises(TraceError, match="no expert_bytes; pass --expert-bytes"):
        replay(path, policy="none/lru/fetch/standard", cache_frac=0.5)
    with pytest.raises(TraceError, match="no experts_per_layer; pass --experts-per-layer"):
        replay(load_trace(path, expert_bytes=1000), policy="none/lru/fetch/standard", cache_frac=0.5)
    trace = load_trace(path, experts_per_layer=4, expert_bytes=1000)
    for policy in ("none/lru/fetch/standard", "oracle/ls/fetch/standard"):
        assert replay(trace, policy=policy, cache_frac=0.5).requests == 24
    with pytest.raises(TraceError, match="does not record \\('next_logits'\\)"):
        replay(trace, policy="topk/lru/fetch/standard", cache_frac=0.5)


GOOD = {"seq": 0, "token": 0, "layer": 0, "experts": [1, 2]}


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ([GOOD, "{not json"], ":2: not valid JSON"),
        ([GOOD, {"seq": 0, "token": 1, "experts": [1]}], ":2: missing 'layer'"),
        ([{"seq": 0, "token": 0, "layer": 0, "experts": ["a"]}], ":1: 'experts' must be an integer in [0, 65536)"),
        ([{"seq": 0, "token": 0, "layer": 0, "experts": [3, 3]}], ":1: 'experts' lists an expert twice"),
        ([{"seq": 0, "token": 0, "layer": 0, "experts": [1], "weights": [0.5, 0.5]}], ":1: 'weights' has 2 values"),
        ([{"seq": 0, "token": 0, "layer": 0, "experts": []}], ":1: 'experts' must be a non-empty list"),
        ([GOOD, {"meta": {}}], ":2: a 'meta' header may only be the first line"),
        ([{"seq": 0, "token": 3, "layer": 0, "experts": [1]}, GOOD], ":2: sequence 0 goes back"),
        ([GOOD, {"seq": -1, "token": 0, "layer": 0, "experts": [1]}], ":2: 'seq' must be an integer in [0, 2**63)"),
        ([{"meta": {"experts_per_layer": 2}}, GOOD], "routes to expert 2, but layers have 2 experts"),
        ([], "has no routing rows"),
    ],
)
def test_malformed_traces_name_the_line(tmp_path: Path, lines: list[object], error: str) -> None:
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TraceError) as raised:
        load_trace(path)
    message = str(raised.value)
    assert message.startswith(str(path)) and error in message  # ":N: ..." errors name the line


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "missing.jsonl")
    (tmp_path / "trace.csv").write_text("x")
    with pytest.raises(TraceError, match=r"a trace is a \.jsonl or \.npz file"):
        load_trace(tmp_path / "trace.csv")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match=r"not a readable \.npz trace"):
        load_trace(tmp_path / "broken.npz")


def test_jsonl_and_npz_hold_the_same_events(recorded: Path, tmp_path: Path) -> None:
    trace = load_trace(recorded)
    again = load_trace(trace.save(tmp_path / "copy.npz"))
    assert again.events == trace.events and again.meta == trace.meta
    assert load_trace(again.save(tmp_path / "copy.jsonl")).events == trace.events
    assert (tmp_path / "copy.npz").stat().st_size < recorded.stat().st_size / 3


@pytest.mark.parametrize("suffix", [".jsonl", ".npz"])
def test_a_loaded_trace_keeps_router_logits_compactly(tmp_path: Path, suffix: str) -> None:
    """Big traces fit in memory: a 64-expert logit row costs about its 512 bytes, not ~2 KB of float objects."""
    import tracemalloc

    import numpy as np

    rows = np.random.default_rng(0).standard_normal((1000, 64)).astype(np.float32).tolist()  # as a model records
    events = [
        TraceEvent(0, token, layer, (1, 2), logits=tuple(rows[token * 4 + layer]))
        for token in range(250)
        for layer in range(4)
    ]
    path = Trace({"experts_per_layer": 64, "expert_bytes": 100}, events).save(tmp_path / f"t{suffix}")
    tracemalloc.start()
    try:
        loaded = load_trace(path)
        per_event = tracemalloc.get_traced_memory()[0] / len(loaded.events)
    finally:
        tracemalloc.stop()
    assert [list(e.logits) for e in loaded.events] == rows  # exactly the values written
    assert per_event < 1200, f"{per_event:.0f} bytes per event"


def test_a_prompt_logged_as_many_rows_at_token_0_is_the_prefill(tmp_path: Path) -> None:
    prompt = [{"seq": 0, "token": 0, "layer": layer, "experts": [p, p + 1]} for p in range(3) for layer in (0, 1)]
    decode = [{"seq": 0, "token": t, "layer": layer, "experts": [t, 5]} for t in (1, 2) for layer in (0, 1)]
    path = write(tmp_path / "third-party.jsonl", [{"meta": {"experts_per_layer": 8, "expert_bytes": 10}}, *prompt,
                                                  *decode])  # fmt: skip
    trace = load_trace(path)
    passes = trace.passes()
    assert [(p.info.prefill, p.info.tokens, p.info.context) for p in passes] == [(True, 3, 3), (False, 1, 4),
                                                                                 (False, 1, 5)]  # fmt: skip
    assert passes[0].layers[0].requests == {0: 1, 1: 2, 2: 2, 3: 1}
    assert [e.token for e in trace.events if e.layer == 0] == [0, 1, 2, 3, 4]
    assert replay(trace, policy="none/lru/fetch/standard", cache_frac=0.5).requests == 2 * 4 + 2 * 2 * 2


def test_a_trace_shows_as_one_line_of_what_it_holds(recorded: Path, checkpoint: Path) -> None:
    trace = load_trace(recorded)
    passes, requests = len(trace.passes()), trace.num_requests
    assert repr(trace) == (
        f"Trace({recorded}: {checkpoint}, 1 sequence, {passes} passes, {requests:,} requests, "
        f"4 MoE layers x 16 experts, top-4, sha256={trace.sha256[:12]})"
    )
    both = Trace.concat([trace, trace])
    assert f": {checkpoint}, 2 sequences, {2 * passes} passes, {2 * requests:,} requests, 4 MoE" in repr(both)
    big = Trace(trace.meta, trace.events * 200)  # the same tokens again and again: one sequence, as many passes
    assert len(repr(big)) < 300 and str(big) == repr(big)
    assert "model not recorded" in repr(random_trace(0)) and "sha256=-" in repr(random_trace(0))
