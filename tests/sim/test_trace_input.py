"""Hostile and malformed traces: every reader refuses them at load time with one `TraceError` naming the file and
the line, row or field; headers and command-line values are checked the same way; memory stays bounded."""

from __future__ import annotations

import io
import json
import re
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from specmd import cli
from specmd.sim import Trace, TraceError, TraceEvent, load_trace, replay
from tests.sim.conftest import random_trace

GOOD = {"seq": 0, "token": 0, "layer": 0, "experts": [1, 2]}
HEADER = {"experts_per_layer": 8, "expert_bytes": 10, "moe_layers": [0, 1], "num_layers": 2}


def write(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def refused(path: Path, error: str, **overrides: Any) -> str:
    """Load `path`; it must fail with one TraceError whose one-line message names the file and holds `error`."""
    with pytest.raises(TraceError) as raised:
        load_trace(path, **overrides)
    message = str(raised.value)
    assert message.startswith(str(path)) and error in message, message
    assert "\n" not in message and len(message) < 600, message
    return message


# ---- JSON Lines -------------------------------------------------------------------------------------------
def row(**changes: object) -> dict[str, object]:
    return GOOD | changes


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ([{"meta": HEADER}, row(layer=5)], ":2: layer 5 is not one of the header's moe_layers [0, 1]"),
        ([{"meta": {"num_layers": 2}}, row(layer=2)], ":2: layer 2 is not below the header's num_layers=2"),
        ([{"meta": HEADER}, row(experts=[1, 8])], ":2: routes to expert 8, but layers have 8 experts"),
        ([row(experts=[70000])], ":1: 'experts' must be an integer in [0, 65536), got 70000"),
        ([row(seq=2**70)], ":1: 'seq' must be an integer in [0, 2**63), got 1180591620717411303424"),
        ([row(token=True)], ":1: 'token' must be an integer in [0, 2**63), got True"),
        (['{"seq": 0, "token": 0, "layer": 0, "experts": [1, 2], "weights": [NaN, 0.5]}'], ":1: 'weights' must be"),
        (['{"seq": 0, "token": 0, "layer": 0, "experts": [1], "weights": [Infinity]}'], ":1: 'weights' must be"),
        ([row(weights=[1e400, 1])], ":1: 'weights' must be finite numbers"),
        ([row(weights=[10**400, 1])], ":1: 'weights' must be finite numbers"),
        (['{"seq": 0, "token": 0, "layer": 0, "experts": [1], "logits": [0, -Infinity, 1]}'], ":1: 'logits' must be"),
        ([row(next_logits=[0.5, 1e999, 0.1])], ":1: 'next_logits' must be finite numbers"),
        ([row(logits=[0.5, "x", 0.1])], ":1: 'logits' must be finite numbers"),
        ([{"meta": HEADER}, row(logits=[0.0] * 7)], ":2: 'logits' has 7 values, but layers have 8 experts"),
        ([row(logits=[0.0] * 4), row(token=1, logits=[0.0] * 5)], ":2: 'logits' has 5 values, but earlier rows' 4"),
        ([row(logits=[0.0] * 2)], ":1: routes to expert 2, but its logits cover 2 experts"),
        (
            [{"meta": HEADER}, row(predictions=[{"passes_ahead": 0, "layer": 3, "logits": [0.0] * 8}])],
            ":2: a prediction's layer 3 is not one of the header's moe_layers",
        ),
        (
            [{"meta": HEADER}, row(predictions=[{"passes_ahead": 0, "layer": 1, "logits": [0.0] * 3}])],
            ":2: a prediction's 'logits' has 3 values, but layers have 8 experts",
        ),
        (
            [row(predictions=[{"passes_ahead": 0, "layer": 1, "logits": [1e999]}])],
            ":1: a prediction's 'logits' must be finite numbers",
        ),
        ([row(predictions=[5])], ":1: 'predictions' must be a list of"),
        ([row(token=1), row(token=1)], ":2: sequence 0 goes back"),
    ],
)
def test_rows_the_header_does_not_allow_name_the_line(tmp_path: Path, lines: list[object], error: str) -> None:
    refused(write(tmp_path / "bad.jsonl", lines), error)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"[" * 200_000, ":2: not valid JSON (nested too deeply)"),
        (b'{"seq": 0, "token": 1, "layer": 0, "experts": [' + b"7" * 5000 + b"]}", ":2: not valid JSON (an integer"),
        (b"\xff\xfe\x00\x81garbage\x00", ":2: not UTF-8 text"),
        (bytes(range(128, 256)), ":2: not UTF-8 text (byte 0x80 at column 1)"),
        (b'{"seq": 0, "token": 1, "layer": 0, "experts": [1]} trailing', ":2: not valid JSON (Extra data)"),
    ],
)
def test_hostile_lines_give_one_line_errors(tmp_path: Path, line: bytes, error: str) -> None:
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + line + b"\n")
    refused(path, error)


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path: Path) -> None:
    path = tmp_path / "windows.jsonl"
    lines = [json.dumps({"meta": HEADER}), json.dumps(GOOD), json.dumps(row(token=1, layer=1))]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    assert len(load_trace(path).events) == 2


# ---- headers, from the file and from the command line ------------------------------------------------------
def _shape(layers: int) -> dict[str, object]:
    return {"num_layers": layers, "hidden_size": 8, "kv_dim": 8, "dense_params": [1] * layers, "head_params": 1,
            "expert_params": 1, "dtype_bytes": 2}  # fmt: skip


@pytest.mark.parametrize("suffix", [".jsonl", ".npz"])
@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"experts_per_layer": "64"}, "header: experts_per_layer must be an integer >= 1, got '64'"),
        ({"experts_per_layer": 64.0}, "header: experts_per_layer must be an integer >= 1, got 64.0"),
        ({"experts_per_layer": 10**9}, "header: experts_per_layer=1000000000 is beyond what specmd supports (65536)"),
        ({"moe_layers": "0,1,2"}, "header: moe_layers must be a non-empty list of layer indices, got '0,1,2'"),
        ({"moe_layers": [0, 1, 9]}, "header: moe_layers must be ascending distinct indices below num_layers=3"),
        ({"num_layers": 2}, "header: moe_layers must be ascending distinct indices below num_layers=2"),
        ({"shape": {"num_layers": 3}}, "header: the model shape lacks 'dense_params'"),
        ({"shape": _shape(5)}, "header: the model shape has 5 layers, the layout 3"),
        ({"expert_bytes": 0}, "header: expert_bytes['bf16'] must be an integer >= 1, got 0"),
        ({"expert_bytes": -5}, "header: expert_bytes['bf16'] must be an integer >= 1, got -5"),
        ({"expert_bytes": {"bf16": 100, "int8": 1.5}}, "header: expert_bytes['int8'] must be an integer >= 1"),
        ({"top_k": "2"}, "header: top_k must be an integer >= 1, got '2'"),
        ({"full_expert_bytes": 0}, "header: full_expert_bytes must be an integer >= 1, got 0"),
        ({"precision": {"bf16": 1}}, "header: precision must be a precision name, got {'bf16': 1}"),
        ({"top_k": 7}, "header: top_k=7 is more than the 6 experts per layer"),
        ({"moe_layers": [0, 1, 2], "num_layers": 3, "experts_per_layer": 65536 * 32}, "is beyond what specmd supports"),
        (
            {"moe_layers": list(range(64)), "num_layers": 64, "experts_per_layer": 65536},
            "header: 64 MoE layers of 65536 experts are 4194304 routed experts, beyond what specmd supports",
        ),
    ],
)
def test_bad_headers_are_refused_when_loaded(tmp_path: Path, suffix: str, change: dict, error: str) -> None:  # type: ignore[type-arg]
    trace = random_trace(0)
    meta = trace.meta | {"moe_layers": [0, 1, 2], "num_layers": 3} | change
    path = Trace(meta, trace.events).save(tmp_path / f"bad{suffix}")
    refused(path, error)


@pytest.mark.parametrize("suffix", [".jsonl", ".npz"])
@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"experts_per_layer": "64"}, "header: experts_per_layer must be an integer >= 1, got '64'"),
        ({"experts_per_layer": 10**9}, "experts_per_layer=1000000000 is beyond what specmd supports"),
        ({"experts_per_layer": 4}, "routes to expert 4, but layers have 4 experts"),
        ({"expert_bytes": 0}, "expert_bytes must be a positive whole number of bytes, or a size such as"),
        ({"expert_bytes": "-1MB"}, "expert_bytes must be a positive whole number of bytes, or a size such as"),
        ({"top_k": 0}, "header: top_k must be an integer >= 1, got 0"),
    ],
)
def test_command_line_values_are_checked_when_loaded(tmp_path: Path, suffix: str, overrides: dict, error: str) -> None:  # type: ignore[type-arg]
    path = random_trace(0).save(tmp_path / f"t{suffix}")
    refused(path, error, **overrides)


def test_the_replay_command_reports_a_bad_value_and_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused by the argument parser or, at the latest, when the trace loads: one line, exit status 2."""
    path = random_trace(0).save(tmp_path / "t.npz")
    console = Console(width=300, record=True, file=io.StringIO())
    monkeypatch.setattr(cli, "err", console)
    assert cli.main(["replay", str(path), "--cache-frac", "0.5", "--expert-bytes", "0", "--policy", "config4"]) == 2
    shown = console.export_text()
    assert re.search(r"expert[-_]bytes.* must be a positive whole number of bytes.*, got '?0", shown), shown
    assert shown.count("\n") == 1, shown


def test_a_foreign_trace_without_sizes_still_has_its_other_fields_checked(tmp_path: Path) -> None:
    path = write(tmp_path / "foreign.jsonl", [{"meta": {"moe_layers": "0"}}, GOOD])
    refused(path, ":1: header: moe_layers must be a non-empty list of layer indices, got '0'")
    path = write(tmp_path / "foreign.jsonl", [{"meta": {"moe_layers": [0]}}, GOOD, row(layer=1)])
    refused(path, ":3: layer 1 is not one of the header's moe_layers [0]")


# ---- traces built in memory ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("events", "meta", "error"),
    [
        ([TraceEvent(0, 0, 0, (1, 5))], {}, "sequence 0 token 0 layer 0: routes to expert 5, but layers have 3"),
        ([TraceEvent(0, 0, 0, (1, -1))], {}, "sequence 0 token 0 layer 0: 'experts' must be an integer in [0, 3)"),
        ([TraceEvent(0, 0, 4, (1, 2))], {"moe_layers": [0, 1], "num_layers": 2}, "layer 4 is not one of the header's"),
        ([TraceEvent(0, 0, 0, (1,), logits=[0.0] * 2)], {}, "'logits' has 2 values, but layers have 3 experts"),
        ([], {}, "the trace has no routing rows"),
        ([TraceEvent(0, 0, 0, (1, 2))], {"top_k": 0}, "header: top_k must be an integer >= 1, got 0"),
    ],
)
def test_a_trace_built_in_memory_is_checked_before_it_replays(events: list, meta: dict, error: str) -> None:  # type: ignore[type-arg]
    trace = Trace({"experts_per_layer": 3, "expert_bytes": 10} | meta, events)
    with pytest.raises(TraceError) as raised:
        replay(trace, policy="none/lru/fetch/standard", cache_frac=0.5)
    assert str(raised.value).startswith("<memory>: ") and error in str(raised.value)


# ---- the binary form -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_npz(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    trace = random_trace(0, logits=True)
    trace = Trace(trace.meta | {"moe_layers": [0, 1, 2], "num_layers": 3}, trace.events)
    path = trace.save(tmp_path_factory.mktemp("npz") / "good.npz")
    with np.load(path) as npz:
        return {name: npz[name] for name in npz.files}


def _swap(values: np.ndarray, i: int, j: int) -> np.ndarray:
    values = values.copy()
    values[[i, j]] = values[[j, i]]
    return values


def _set(values: np.ndarray, index: int, value: object) -> np.ndarray:
    values = values.copy()
    values[index] = value
    return values


NPZ_CASES: list[tuple[str, Any, str]] = [
    # (what, arrays -> changes (None removes an array), error)
    ("missing", lambda a: {"seq": None}, "missing arrays ['seq']"),
    ("missing mask", lambda a: {"has_logits": None}, "'logits' comes without 'has_logits'"),
    ("short", lambda a: {"seq": a["seq"][:-1]}, "'token' has 36 rows, but 'seq' has 35"),
    ("long", lambda a: {"prefill": np.append(a["prefill"], 1)}, "'prefill' has 37 rows, but 'seq' has 36"),
    ("float", lambda a: {"seq": a["seq"].astype(np.float64)}, "'seq' must hold integers, not float64"),
    ("2-d", lambda a: {"experts": a["experts"].reshape(-1, 1)}, "'experts' must be 1-dimensional, not shape (72, 1)"),
    ("1-d", lambda a: {"logits": a["logits"][:, 0]}, "'logits' must be 2-dimensional, not shape (36,)"),
    ("str", lambda a: {"layer": a["layer"].astype(str)}, "'layer' must hold integers, not <U"),
    ("mask", lambda a: {"has_logits": a["has_logits"].astype(np.int8)}, "'has_logits' must hold booleans, not int8"),
    ("negative", lambda a: {"experts": _set(a["experts"], 0, -1)}, "'experts' holds -1 at row 0"),
    ("too big", lambda a: {"experts": _set(a["experts"], 3, 6)}, "routes to expert 6, but layers have 6 experts"),
    ("twice", lambda a: {"experts": _set(a["experts"], 1, a["experts"][0])}, "row 0 lists an expert twice"),
    ("layers shifted", lambda a: {"layer": a["layer"] + 10}, "layer 10 is not one of the header's moe_layers"),
    ("negative seq", lambda a: {"seq": _set(a["seq"], 4, -2)}, "'seq' holds -2 at row 4"),
    ("unsorted", lambda a: {"token": _swap(a["token"], 0, 5)}, "row 1 (sequence 0, token 0, layer 1) goes back"),
    ("duplicate", lambda a: {"layer": _set(a["layer"], 1, 0)}, "row 1 (sequence 0, token 0, layer 0) goes back"),
    ("prefill", lambda a: {"prefill": _set(a["prefill"], 2, 7)}, "'prefill' holds 7 at row 2; it is -1, 0 or 1"),
    ("offsets", lambda a: {"offsets": _set(a["offsets"], -1, 80)}, "'offsets' must rise from 0 to 72"),
    ("offsets start", lambda a: {"offsets": _set(a["offsets"], 0, 1)}, "'offsets' must rise from 0 to 72"),
    ("empty row", lambda a: {"offsets": _set(a["offsets"], 1, 0)}, "'offsets' must rise from 0 to 72"),
    ("weights", lambda a: {"weights": a["weights"][:-1]}, "'weights' has 71 values for 72 experts"),
    ("nan weight", lambda a: {"weights": _set(a["weights"], 5, np.nan)}, "'weights' must be finite"),
    ("inf logit", lambda a: {"logits": _set(a["logits"], 2, np.inf)}, "'logits' row 2 must be finite"),
    ("width", lambda a: {"logits": a["logits"][:, :5]}, "'logits' rows have 5 values, but layers have 6 experts"),
    ("pred width", lambda a: {"pred_logits": a["pred_logits"][:, :4]}, "'pred_logits' rows have 4 values"),
    ("pred layer", lambda a: {"pred_layer": a["pred_layer"] + 3}, "'pred_layer' holds 4"),
    ("pred offsets", lambda a: {"pred_offsets": a["pred_offsets"][:-1]}, "'pred_offsets' has 36 values; 36 rows"),
    ("pred missing", lambda a: {"pred_layer": None}, "'pred_offsets' comes without 'pred_layer'"),
    (
        "zero events",
        lambda a: (
            {k: v[:0] for k, v in a.items() if k != "meta"}
            | {"offsets": a["offsets"][:1], "pred_offsets": a["offsets"][:1]}
        ),
        "the trace has no routing rows",
    ),
    ("meta number", lambda a: {"meta": np.array(5)}, "'meta' must hold the header as JSON text"),
    ("meta json", lambda a: {"meta": np.array("{x")}, "'meta' is not valid JSON"),
    ("meta list", lambda a: {"meta": np.array("[1, 2]")}, "'meta' must be a JSON object"),
    ("meta deep", lambda a: {"meta": np.array("[" * 100_000)}, "'meta' is not valid JSON"),
]


@pytest.mark.parametrize(("what", "changes", "error"), NPZ_CASES, ids=[c[0] for c in NPZ_CASES])
def test_malformed_npz_name_the_file_and_the_field(
    tmp_path: Path, good_npz: dict[str, np.ndarray], what: str, changes: Any, error: str
) -> None:
    arrays = dict(good_npz)
    for name, value in changes(good_npz).items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    refused(path, error)


def test_the_unchanged_npz_loads(tmp_path: Path, good_npz: dict[str, np.ndarray]) -> None:
    np.savez(tmp_path / "good.npz", **good_npz)
    trace = load_trace(tmp_path / "good.npz")
    assert [(e.seq, e.token, e.layer, e.experts) for e in trace.events] == [
        (e.seq, e.token, e.layer, e.experts) for e in random_trace(0, logits=True).events
    ]


def test_npz_members_other_than_the_known_ones_are_never_read(tmp_path: Path, good_npz: dict[str, np.ndarray]) -> None:
    """A small file may hold a huge array of zeros: loading reads only the arrays it knows."""
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, **good_npz, junk=np.zeros(50_000_000, dtype=np.int64))  # 400 MB unpacked
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        load_trace(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"{peak:,} bytes"


def test_a_known_npz_member_of_the_wrong_length_is_refused_before_it_is_read(
    tmp_path: Path, good_npz: dict[str, np.ndarray]
) -> None:
    path = tmp_path / "long.npz"
    np.savez_compressed(path, **(good_npz | {"token": np.zeros(50_000_000, dtype=np.int64)}))
    tracemalloc.start()
    try:
        refused(path, "'token' has 50000000 rows, but 'seq' has 36")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"{peak:,} bytes"


def test_a_renamed_npy_or_a_pickle_is_not_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "one.npz"
    with path.open("wb") as out:
        np.save(out, np.arange(3))
    refused(path, "not a readable .npz trace")
    with path.open("wb") as out:
        np.savez(out, seq=np.array([object()], dtype=object))
    refused(path, "'seq' must hold integers, not object")  # never unpickled


# ---- memory ----------------------------------------------------------------------------------------------------
def test_jsonl_is_read_a_line_at_a_time(tmp_path: Path) -> None:
    """Peak memory while loading is the events kept plus about one line, not the file held whole (or twice)."""
    path = tmp_path / "big.jsonl"
    trace = random_trace(0, layers=4, experts=64, top_k=4, tokens=1000, logits=True)
    Trace(trace.meta, [TraceEvent(e.seq, e.token, e.layer, e.experts, logits=e.logits) for e in trace.events]).save(
        path
    )
    size = path.stat().st_size
    longest = max(len(line) for line in path.read_bytes().splitlines())
    tracemalloc.start()
    try:
        loaded = load_trace(path)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(loaded.events) == 4000 and size > 5_000_000
    assert peak - kept < 256 * 1024 + 8 * longest, f"peak {peak:,}, kept {kept:,}, file {size:,} bytes"
