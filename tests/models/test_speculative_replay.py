"""Lookahead traces: recording the self-draft's chains, replaying speculative decoding from them exactly as it runs
live (fixed K and the governor, any capacity and policy, both file forms), sweeping it, and the refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from specmd import OffloadOLMoE, cli
from specmd.sim import record, replay
from specmd.sim.record import TraceRecorder
from specmd.sim.sweep import SweepGrid, read_results, sweep
from specmd.sim.trace import Trace, TraceError, load_trace

PROMPTS = (torch.tensor([[1, 5, 9, 13, 17, 3]]), torch.tensor([[2, 4, 6, 8]]))
NEW = 24
LOOKAHEAD = 3
WALL = {"wall_ttft_s", "wall_tokens_per_s"}


def load(path: Path, policy: str = "score/least-stale/fetch/standard", cache_frac: float = 0.25) -> OffloadOLMoE:
    return OffloadOLMoE.from_pretrained(
        path, cache_frac=cache_frac, bandwidth_gbps=5.0, policy=policy, progress=False, draft_frac=0.3,
        draft_precision="int2",
    )  # fmt: skip


@pytest.fixture(scope="module")
def recorded(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[torch.Tensor]]:
    """A lookahead trace of both prompts (K = 3), and the recording's outputs."""
    path = tmp_path_factory.mktemp("lookahead") / "la.jsonl"
    recorder_outputs = []
    with load(checkpoint) as model:
        recorder = TraceRecorder(model.trace_meta())
        with model.observe_routing(recorder):
            for prompt in PROMPTS:
                out = model.generate_lookahead(recorder, LOOKAHEAD, input_ids=prompt, max_new_tokens=NEW)
                recorder_outputs.append(out)
    recorder.trace().save(path)
    return path, recorder_outputs


def live(checkpoint: Path, speculative: int | str, policy: str, cache_frac: float) -> dict:
    with load(checkpoint, policy, cache_frac) as model:
        for prompt in PROMPTS:
            model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False, speculative=speculative)
        stats = model.cache_stats().to_dict()
    for name in WALL:
        del stats[name]
    return stats


def replayed(trace: Trace | Path, speculative: int | str, policy: str, cache_frac: float) -> dict:
    stats = replay(
        trace, policy=policy, cache_frac=cache_frac, bandwidth_gbps=5.0, speculative=speculative, draft_frac=0.3
    ).to_dict()
    for name in WALL:
        del stats[name]
    return stats


def test_recording_decodes_greedily_and_keeps_a_chain_per_position(checkpoint: Path, recorded: tuple) -> None:
    path, outputs = recorded
    with load(checkpoint) as model:
        for prompt, out in zip(PROMPTS, outputs, strict=True):
            assert torch.equal(out, model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False))
    trace = load_trace(path)
    assert trace.lookahead == LOOKAHEAD and trace.meta["draft"]["precision"] == "hqq2"
    layers = len(trace.layout.moe_layers)
    for seq in (0, 1):
        decode = sorted({e.token for e in trace.events if e.seq == seq and not e.prefill})
        chains = [c for c in trace.chains if c.seq == seq]
        assert [c.position for c in chains] == decode  # one chain per decode position, the last one empty
        for chain in chains:
            k = min(LOOKAHEAD, decode[-1] - chain.position)  # the drafts never run past the text's end
            assert chain.length == k and 0 <= chain.accepted <= k
            assert len(chain.draft) == k * layers and len(chain.verify) == (k + 1 if k else 0) * layers
    assert any(c.accepted < c.length for c in trace.chains)  # the int2 draft is wrong at times


@pytest.mark.parametrize("policy", ["score/least-stale/fetch/standard", "topk/lru/fetch/standard"])
@pytest.mark.parametrize("cache_frac", [0.1, 0.5])
def test_replay_reproduces_live_speculative_decoding_exactly(
    checkpoint: Path, recorded: tuple, policy: str, cache_frac: float
) -> None:
    trace = load_trace(recorded[0])
    for speculative in (0, 1, LOOKAHEAD, f"auto:{LOOKAHEAD}"):
        expected = live(checkpoint, speculative, policy, cache_frac)
        assert replayed(trace, speculative, policy, cache_frac) == expected, speculative
        if speculative:
            assert expected["drafted_tokens"] > 0 and expected["lookahead_prefetches_issued"] > 0


def test_the_binary_form_keeps_the_chains(recorded: tuple, tmp_path: Path) -> None:
    trace = load_trace(recorded[0])
    again = load_trace(trace.save(tmp_path / "la.npz"))
    assert again.chains == trace.chains and again.meta == trace.meta
    assert replayed(again, "auto:2", "none/lru/fetch/standard", 0.1) == replayed(
        trace, "auto:2", "none/lru/fetch/standard", 0.1
    )


def test_concatenated_lookahead_traces_replay_as_their_sequences(recorded: tuple) -> None:
    trace = load_trace(recorded[0])
    double = Trace.concat([trace, trace])
    assert len(double.chains) == 2 * len(trace.chains)
    single, twice = (replayed(t, 2, "none/lru/fetch/standard", 1.0) for t in (trace, double))
    assert twice["drafted_tokens"] == 2 * single["drafted_tokens"]


def test_a_sweep_compares_speculation_with_plain_decoding(recorded: tuple, tmp_path: Path) -> None:
    grid = SweepGrid(
        traces=(str(recorded[0]),), policies=("topk/lru/fetch/standard",), cache_fracs=(0.1,), bandwidths=(5.0,),
        baselines=False, speculate=(None, 2), draft_frac=0.3,
    )  # fmt: skip
    sweep(grid, tmp_path / "r.csv", jobs=1, progress=False)
    rows = {row["speculate"]: row for row in read_results(tmp_path / "r.csv")}
    assert set(rows) == {"", "2"} and rows["2"]["draft_frac"] == "0.3"
    assert int(rows[""]["drafted_tokens"]) == 0 and json.loads(rows["2"]["speculate_k"])
    expected = replayed(load_trace(recorded[0]), 2, "topk/lru/fetch/standard", 0.1)
    assert int(rows["2"]["drafted_tokens"]) == expected["drafted_tokens"]
    assert float(rows["2"]["tokens_per_s"]) == pytest.approx(expected["tokens_per_s"], rel=1e-12)


def test_speculative_replays_that_cannot_run_are_refused(checkpoint: Path, recorded: tuple, tmp_path: Path) -> None:
    trace = load_trace(recorded[0])
    with load(checkpoint) as model:
        record(model, PROMPTS[0], tmp_path / "plain.jsonl", max_new_tokens=4, do_sample=False)
    with pytest.raises(TraceError, match="records no self-draft lookahead"):
        replay(tmp_path / "plain.jsonl", cache_frac=0.5, speculative=1, draft_frac=1.0)
    with pytest.raises(ValueError, match="records chains of at most 3"):
        replay(trace, cache_frac=0.5, speculative="auto:4", draft_frac=1.0)
    with pytest.raises(ValueError, match="draft_frac"):
        replay(trace, cache_frac=0.5, speculative=1)
    with pytest.raises(ValueError, match="reads the future"):
        replay(trace, policy="none/belady/fetch/standard", cache_frac=0.5, speculative=1, draft_frac=1.0)
    no_draft = Trace({k: v for k, v in trace.meta.items() if k != "draft"}, trace.events, chains=trace.chains)
    with pytest.raises(TraceError, match="records no draft"):
        replay(no_draft, cache_frac=0.5, speculative=1, draft_frac=1.0)


def test_bad_chains_are_refused_naming_the_line(recorded: tuple, tmp_path: Path) -> None:
    lines = recorded[0].read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith('{"chain"'))
    chain = json.loads(lines[first])
    cases = {
        "accepts 9 drafts of 3": chain | {"chain": chain["chain"] | {"accepted": 9}},
        "outside": chain | {"draft": [chain["draft"][0] | {"token": 999}, *chain["draft"][1:]]},
        "no decode token there": {
            "chain": chain["chain"] | {"seq": 7},
            "draft": [event | {"seq": 7} for event in chain["draft"]],
            "verify": [event | {"seq": 7} for event in chain["verify"]],
        },
    }
    for message, bad in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join([*lines[:first], json.dumps(bad), *lines[first + 1 :]]) + "\n")
        with pytest.raises(TraceError, match=message):
            load_trace(path)
    path.write_text("\n".join([*lines[:first], lines[first], lines[1]]) + "\n")
    with pytest.raises(TraceError, match=f"bad.jsonl:{first + 2}: a routing line after a chain line"):
        load_trace(path)


def test_recording_refuses_what_it_cannot_record(checkpoint: Path, tmp_path: Path) -> None:
    with load(checkpoint) as model:
        with pytest.raises(ValueError, match="record its lookahead with lookahead=K"):
            record(model, PROMPTS[0], tmp_path / "t.jsonl", max_new_tokens=4, speculative=2)
        with pytest.raises(ValueError, match="records greedy decoding"):
            record(model, PROMPTS[0], tmp_path / "t.jsonl", lookahead=2, max_new_tokens=4, do_sample=True)
        with pytest.raises(ValueError, match="lookahead must be a whole number"):
            record(model, PROMPTS[0], tmp_path / "t.jsonl", lookahead=0, max_new_tokens=4)
        with model.observe_routing(TraceRecorder(model.trace_meta())), pytest.raises(RuntimeError, match="lookahead"):
            model.generate(input_ids=PROMPTS[0], max_new_tokens=4, do_sample=False, speculative=2)
        out = model.generate(input_ids=PROMPTS[0], max_new_tokens=4, do_sample=False, speculative=2)  # recovered
        assert out.shape == (1, PROMPTS[0].shape[1] + 4)
    no_draft = OffloadOLMoE.from_pretrained(checkpoint, cache_frac=0.5, progress=False)
    with no_draft as model, pytest.raises(ValueError, match="draft_frac"):
        record(model, PROMPTS[0], tmp_path / "t.jsonl", lookahead=2, max_new_tokens=4)
    assert not (tmp_path / "t.jsonl").exists()


def test_the_cli_records_replays_and_sweeps_speculation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("def f(x):\n")
    args = ["--prompts", "prompts.txt", "--max-new-tokens", "6", "--draft-frac", "0.5", "--json"]
    assert cli.main(["trace", "default", *args, "--lookahead", "2", "--out", "la.jsonl"]) == 0
    assert json.loads(capsys.readouterr().out)["trace"] == "la.jsonl"
    recorded = load_trace("la.jsonl")
    assert recorded.lookahead == 2 and [c.length for c in recorded.chains] == [2, 2, 2, 1, 0]
    assert cli.main(["replay", "la.jsonl", "--cache-frac", "0.1", "--speculate", "2", "--draft-frac", "0.5",
                     "--json"]) == 0  # fmt: skip
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["drafted_tokens"] > 0 and stats["decode_tokens"] == 5
    assert cli.main(["sweep", "la.jsonl", "--policy", "topk/lru/fetch/standard", "--cache-frac", "0.1",
                     "--speculate", "auto:2", "--no-baselines", "--out", "r.csv", "--json"]) == 0  # fmt: skip
    assert sorted(row["speculate"] for row in read_results("r.csv")) == ["", "auto:2"]
    assert cli.main(["replay", "la.jsonl", "--cache-frac", "0.1", "--speculate", "3"]) == 2
    assert "records chains of at most 2" in capsys.readouterr().err
    assert cli.main(["report", "r.csv", "--out", "report"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "+ speculate auto:2" in text and "### speculative decoding" in text
    row = next(line for line in text.splitlines() if line.startswith("| 10% | topk/lru + speculate auto:2 |"))
    assert row.split("|")[4].strip().endswith("x")  # its speed against the same mix decoding plainly


def test_a_plain_replay_of_a_lookahead_trace_is_that_of_its_own_routing(recorded: tuple) -> None:
    trace = load_trace(recorded[0])
    plain = replace(trace, chains=[], _passes={})
    assert plain.lookahead == 0
    assert replay(plain, cache_frac=0.5).to_dict() == replay(trace, cache_frac=0.5).to_dict()


def test_a_grid_file_sweeps_speculation_beside_plain_decoding(recorded: tuple, tmp_path: Path) -> None:
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(
        f'traces = ["{recorded[0]}"]\npolicies = ["none/lru/fetch/standard"]\ncache_frac = [0.5]\n'
        'speculate = ["off", 2, "auto:3"]\ndraft_frac = 0.3\nbaselines = false\n'
    )
    grid = SweepGrid.from_toml(grid_file)
    assert grid.speculate == (None, 2, "auto:3") and grid.draft_frac == 0.3
    assert sorted(str(run.speculate) for run in grid.runs()) == ["2", "None", "auto:3"]
    with pytest.raises(ValueError, match="speculative must be a whole number"):
        SweepGrid.from_toml(grid_file, speculate=("sometimes",))
