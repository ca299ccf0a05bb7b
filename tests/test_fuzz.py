"""Fuzzing the inputs users hand specmd: JSON Lines and .npz traces, and policy strings (hypothesis).

Whatever the input, the outcome is one of two: it is accepted (and then a loaded trace replays to the end, a
parsed policy builds), or it is refused with the documented error (`TraceError` for traces, `ValueError` for
policies), never another exception, never a hang. The module runs in well under a minute.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from specmd.cache.policies import PolicySpec
from specmd.cache.policies.spec import _REGISTRY, KINDS, NAMED_MIXES
from specmd.sim import Trace, TraceError, load_trace, replay
from tests.sim.conftest import random_trace

FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=5),  # far above any example's time: a slow one is a bug
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same inputs on every run: CI stays deterministic, the seed is in the code
)

EXPERTS = 6


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


def load_or_refuse(path: Path, **overrides: Any) -> None:
    """Load `path`: a TraceError, or a trace that (with its sizes known) replays every request."""
    try:
        trace = load_trace(path, **overrides)
    except TraceError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc), str(exc)
        event("refused")
        return
    if trace.meta.get("experts_per_layer") is None or trace.meta.get("expert_bytes") is None:
        event("loaded, no sizes")
        return  # a replay asks for them on the command line
    event("loaded and replayed")
    stats = replay(trace, policy="none/lru/fetch/standard", cache_frac=0.5)
    assert stats.requests == trace.num_requests


# ---- JSON Lines -----------------------------------------------------------------------------------------------
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10),
    st.integers(-(2**70), 2**70),
    st.floats(),  # NaN and infinities: json.dumps writes NaN, Infinity
    st.text(max_size=4),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
ROW_KEYS = ["seq", "token", "layer", "experts", "weights", "logits", "next_logits", "prefill", "predictions"]
META_KEYS = ["experts_per_layer", "expert_bytes", "moe_layers", "num_layers", "top_k", "precision", "shape",
             "full_precision", "full_expert_bytes", "predictor"]  # fmt: skip
HOSTILE_LINES = [b"[" * 100_000, b"{" * 5000, b"1" * 5000, b"\xff\xfe\x00", b'{"seq": 1e999}', b"NaN", b"\x00" * 10]


def _good_rows() -> list[dict[str, Any]]:
    rows = []
    for token in range(3):
        for layer in range(2):
            experts = [(token + layer) % EXPERTS, (token + layer + 1) % EXPERTS]
            logits = [float(e == experts[0]) * 2 + float(e == experts[1]) for e in range(EXPERTS)]
            row = {"seq": 0, "token": token, "layer": layer, "experts": experts, "weights": [0.6, 0.4]}
            rows.append(row | {"logits": logits, "prefill": token == 0})
    return rows


@st.composite
def jsonl_files(draw: st.DrawFn) -> bytes:
    """A trace file: a (maybe mutated) header, good rows with some mutated, hostile lines, byte-level edits."""
    lines: list[bytes] = []
    if draw(st.integers(0, 3)):  # 3 in 4 have a header
        meta: dict[str, Any] = {"experts_per_layer": EXPERTS, "expert_bytes": 100, "moe_layers": [0, 1],
                                "num_layers": 2, "top_k": 2}  # fmt: skip
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
            key = draw(st.sampled_from(META_KEYS))
            if draw(st.booleans()):
                meta[key] = draw(JSON_VALUES)
            else:
                meta.pop(key, None)
        lines.append(json.dumps({"meta": meta}).encode())
    for row in _good_rows()[: draw(st.integers(0, 6))]:
        if draw(st.integers(0, 5)) == 0:  # 1 in 6 rows mutated
            key = draw(st.sampled_from([*ROW_KEYS, "extra"]))
            row = dict(row)
            if draw(st.booleans()):
                row[key] = draw(JSON_VALUES)
            else:
                row.pop(key, None)
        lines.append(json.dumps(row).encode())
    for _ in range(draw(st.sampled_from([0, 0, 0, 1]))):
        extra = draw(st.one_of(st.sampled_from(HOSTILE_LINES), st.binary(max_size=20), JSON_VALUES.map(json.dumps)))
        lines.insert(draw(st.integers(0, len(lines))), extra if isinstance(extra, bytes) else extra.encode())
    data = bytearray(b"\n".join(lines) + b"\n")
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # byte-level edits
        at = draw(st.integers(0, len(data)))
        data[at : at + draw(st.integers(0, 3))] = draw(st.binary(max_size=3))
    return bytes(data)


@FUZZ
@given(
    data=jsonl_files(),
    experts=st.sampled_from([None, None, None, 6, 4, 10**9, "6"]),
    nbytes=st.sampled_from([None, None, 100, 0]),
)
def test_any_jsonl_loads_or_is_refused(scratch: Path, data: bytes, experts: Any, nbytes: Any) -> None:
    """With the values the command line may add (good and bad ones)."""
    path = scratch / "fuzz.jsonl"
    path.write_bytes(data)
    load_or_refuse(path, experts_per_layer=experts, expert_bytes=nbytes)


# ---- .npz -----------------------------------------------------------------------------------------------------
def _good_arrays() -> dict[str, np.ndarray]:
    """The arrays of a small trace with every member (weights, logits, predictions) in the binary form."""
    trace = random_trace(0, layers=2, experts=EXPERTS, tokens=4, logits=True)
    trace = Trace(trace.meta | {"moe_layers": [0, 1], "num_layers": 2}, trace.events)
    with tempfile.TemporaryDirectory() as folder, np.load(trace.save(Path(folder) / "good.npz")) as npz:
        return {name: npz[name] for name in npz.files}


GOOD_ARRAYS = _good_arrays()
DTYPES = [np.int8, np.int64, np.uint64, np.float32, np.float64, np.bool_, np.str_]
EXTREMES = [-1, 0, 1, 5, 6, 7, 2**31, -(2**40), np.nan, np.inf]


@st.composite
def npz_arrays(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """The good trace's arrays with some removed, replaced, resized, retyped or given extreme values."""
    arrays = dict(GOOD_ARRAYS)
    names = sorted(arrays)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([*names, "junk"]))
        action = draw(st.sampled_from(["drop", "random", "resize", "retype", "poke", "meta"]))
        current = arrays.get(name, np.zeros(3, dtype=np.int64))
        if action == "drop":
            arrays.pop(name, None)
        elif action == "random":
            shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
            dtype = draw(st.sampled_from(DTYPES))
            arrays[name] = np.full(shape, draw(st.integers(-2, 8))).astype(dtype)  # -1 as uint64 wraps around
        elif action == "resize" and current.ndim:
            size = draw(st.integers(0, len(current) + 2))
            arrays[name] = np.resize(current, (size, *current.shape[1:]))
        elif action == "retype":
            dtype = draw(st.sampled_from(DTYPES))
            with contextlib.suppress(ValueError, OverflowError), np.errstate(invalid="ignore"):  # text: left as is
                arrays[name] = current.astype(dtype)
        elif action == "poke" and current.size and current.dtype.kind in "iuf":
            with np.errstate(invalid="ignore"):  # NaN as an integer: any value will do
                poked = current.astype(np.float64 if current.dtype.kind == "f" else np.int64)
            poked.flat[draw(st.integers(0, current.size - 1))] = draw(
                st.sampled_from([e for e in EXTREMES if current.dtype.kind == "f" or isinstance(e, int)])
            )
            arrays[name] = poked
        elif action == "meta":
            meta = json.loads(str(GOOD_ARRAYS["meta"]))
            meta[draw(st.sampled_from(META_KEYS))] = draw(JSON_VALUES)
            arrays["meta"] = np.array(json.dumps(meta))
    return arrays


@FUZZ
@given(arrays=npz_arrays(), compressed=st.booleans())
def test_any_npz_loads_or_is_refused(scratch: Path, arrays: dict[str, np.ndarray], compressed: bool) -> None:
    path = scratch / "fuzz.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    load_or_refuse(path)


@FUZZ
@given(cut=st.integers(0, 4000), noise=st.binary(max_size=64), at=st.integers(0, 4000))
def test_any_damaged_npz_file_loads_or_is_refused(scratch: Path, cut: int, noise: bytes, at: int) -> None:
    good = scratch / "good.npz"
    if not good.exists():
        np.savez_compressed(good, **GOOD_ARRAYS)
    data = bytearray(good.read_bytes())
    data[at : at + len(noise)] = noise
    path = scratch / "damaged.npz"
    path.write_bytes(bytes(data[: len(data) - cut]) if cut < len(data) else b"")
    load_or_refuse(path)


# ---- policy strings ---------------------------------------------------------------------------------------------
NAMES = sorted({name for kind in KINDS for name in _REGISTRY[kind]} | set(NAMED_MIXES) | {"ls", "stnd", "min"})
PARAMS = ["overfetch", "percentile", "cap", "depth", "rank", "tolerance", "thresholds", "fallback", "lam", "order"]
SYMBOLS = ["/", ":", "=", ",", "(", ")", "[", "]", "{", "}", "'", '"', "-", ".", " ", "+ls"]
LITERALS = ["0", "1", "2", "64", "1e999", "1e308", "nan", "inf", "True", "None", "int8", "int4", "10**9", "9" * 40]
TOKENS = [*NAMES, *PARAMS, *SYMBOLS, *LITERALS]


@st.composite
def policy_parts(draw: st.DrawFn, kind: str) -> str:
    """A registered name of `kind`, maybe with parameters of its own set to literal text."""
    name = draw(st.sampled_from(sorted(_REGISTRY[kind])))
    own = [p for p in inspect.signature(_REGISTRY[kind][name]).parameters if p != "self"]
    if not own or draw(st.booleans()):
        return name
    items = st.tuples(st.sampled_from([*own, *PARAMS]), st.lists(st.sampled_from(LITERALS + SYMBOLS), max_size=4))
    chosen = draw(st.lists(items, min_size=1, max_size=2))
    return name + ":" + ",".join(f"{param}={''.join(value)}" for param, value in chosen)


POLICY_TEXT = st.one_of(
    st.tuples(*(policy_parts(kind) for kind in KINDS)).map("/".join),
    st.tuples(*(policy_parts(kind) for kind in KINDS)).map("/".join),
    st.lists(st.sampled_from(TOKENS), max_size=14).map("".join),
    st.text(max_size=30),
    st.builds(
        lambda parts: "/".join(parts),
        st.lists(st.lists(st.sampled_from(TOKENS), max_size=6).map("".join), min_size=4, max_size=4),
    ),
)


@settings(FUZZ, max_examples=1000)
@given(text=POLICY_TEXT)
def test_any_policy_string_parses_or_is_refused(text: str) -> None:
    try:
        spec = PolicySpec.parse(text)
    except ValueError:
        event("refused")
        return
    event("parsed")
    spec.build()  # a parsed spec builds its policies
    assert PolicySpec.from_dict(spec.to_dict()) == spec


@settings(FUZZ, max_examples=300)
@given(value=JSON_VALUES)
def test_any_policy_value_parses_or_is_refused(value: Any) -> None:
    """Dicts and other values in place of a policy (what a config file may hold)."""
    for candidate in (value, {"miss": value}, {"prefetch": {"name": "topk", "params": value}}):
        try:
            PolicySpec.parse(candidate)
        except ValueError:
            continue
