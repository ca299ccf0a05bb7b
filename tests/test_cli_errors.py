"""A user's mistake on the command line is one line on stderr and exit code 2, never a traceback; a bug still
raises with its traceback."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from specmd import cli
from specmd.cli import options
from specmd.offload_models.info import BUNDLED_CONFIGS

OLMOE = BUNDLED_CONFIGS / "olmoe-1b-7b" / "config.json"


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    """`specmd ARGS` in this process, on an 80-column stderr: the exit code and what stderr shows."""
    errors = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(cli, "out", Console(width=80, file=io.StringIO()))
    monkeypatch.setattr(cli, "err", errors)
    code = cli.main(list(args))
    return code, errors.export_text()


def assert_one_line(code: int, shown: str, *expected: str) -> None:
    assert code == 2
    lines = shown.splitlines()
    assert len(lines) == 1, shown
    assert lines[0].startswith("error: ") and "Traceback" not in shown
    for part in expected:
        assert part in lines[0], lines[0]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model or tokenizer load fails the test: the error must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded a model or tokenizer before checking the arguments")

    monkeypatch.setattr(options, "load_model", refuse)
    monkeypatch.setattr(options, "load_tokenizer", refuse)


def bad_config(folder: Path, **changes: object) -> Path:
    folder.mkdir(exist_ok=True)
    config = json.loads(OLMOE.read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---- the cases of the reliability issue, item 6 ------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["generate", "default", "--prompt", ""], ["argument --prompt", "at least one character", "''"]),
        (["sweep", "t.jsonl", "--policy", "config1", "--cache-frac", "0.1", "--out", "r.csv", "--jobs", "0"],
         ["specmd sweep: argument --jobs: must be a whole number >= 1, got '0'"]),
        (["eval", "--batch-size", "0"], ["specmd eval: argument --batch-size: must be a whole number >= 1, got '0'"]),
        (["trace", "default", "--prompts", "p.txt", "--out", "/no/such/folder/t.jsonl"],
         ["argument --out: cannot write /no/such/folder/t.jsonl: folder /no/such/folder does not exist"]),
        (["trace", "default", "--prompts", "p.txt", "--out", "t.txt"], ["use a .jsonl or .npz file"]),
        (["generate", "default", "--prompt", "x", "--out", "/no/such/folder/r.json"], ["folder /no/such/folder"]),
        (["sweep", "t.jsonl", "--policy", "config1", "--cache-frac", "0.1", "--out", "/no/such/folder/r.csv"],
         ["folder /no/such/folder does not exist"]),
        # every numeric option, defined once, refuses what it cannot mean
        (["generate", "default", "--prompt", "x", "--cache-frac", "0"],
         ["--cache-frac: must be a number with 0 < value <= 1"]),
        (["demo", "--cache-frac", "nan"], ["--cache-frac: must be a number with 0 < value <= 1, got 'nan'"]),
        (["demo", "--cache-bytes", "-1"], ["--cache-bytes: must be a positive whole number of bytes, or a size"]),
        (["demo", "--cache-bytes", "3 parsecs"], ["--cache-bytes: must be", "6GiB", "got '3 parsecs'"]),
        (["demo", "--max-new-tokens", "0"], ["--max-new-tokens: must be a whole number >= 1, got '0'"]),
        (["generate", "default", "--prompt", "x", "--max-new-tokens", "-1"], ["got '-1'"]),
        (["generate", "default", "--prompt", "x", "--bandwidth-gbps", "-5"],
         ["--bandwidth-gbps: must be a number > 0"]),
        (["routing-stats", "default", "--text", "t.txt", "--window", "0"], ["--window: must be a whole number >= 2"]),
        (["routing-stats", "default", "--text", "t.txt", "--max-tokens", "x"], ["--max-tokens: must be a whole"]),
        (["eval", "--limit", "-1"], ["specmd eval: argument --limit: must be a number > 0, got '-1'"]),
        (["eval", "--num-fewshot", "-1"], ["--num-fewshot: must be a whole number >= 0"]),
        (["eval", "--max-gen-toks", "0"], ["--max-gen-toks: must be a whole number >= 1"]),
        (["replay", "t.jsonl", "--policy", "config1", "--cache-frac", "0.1", "--link-latency-us", "-1"],
         ["--link-latency-us: must be a number >= 0"]),
        (["replay", "t.jsonl", "--policy", "config1", "--cache-frac", "0.1", "--experts-per-layer", "0"],
         ["--experts-per-layer: must be a whole number >= 1"]),
        (["sweep", "t.jsonl", "--policy", "config1", "--cache-frac", "0.1", "1.5", "--out", "r.csv"],
         ["--cache-frac: must be a number with 0 < value <= 1, got '1.5'"]),
        (["reproduce", "--out", "o", "--jobs", "0"], ["--jobs: must be a whole number >= 1"]),
        (["reproduce", "--out", "o", "--capacities", "0.05", "0"], ["--capacities: must be a number with 0 < value"]),
        (["reproduce", "--out", "o", "--links", "fast"], ["--links: must be a number > 0 of GB/s, 'native' or"]),
        (["generate", "default"], ["one of the arguments --prompt --prompts is required"]),
        (["generate", "default", "--prompt", "x", "--prompts", "p.txt"],
         ["argument --prompts: not allowed with argument --prompt"]),
        (["generate", "default", "--prompt", "x", "--temperature", "-1"], ["--temperature: must be a number >= 0"]),
        (["generate", "default", "--prompt", "x", "--temperature", "1", "--top-p", "0"],
         ["--top-p: must be a number with 0 < value <= 1, got '0'"]),
        (["generate", "default", "--prompt", "x", "--top-p", "0.9"], ["--top-p narrows sampling", "--temperature > 0"]),
        (["generate", "default", "--prompt", "x", "--seed", "1.5"], ["--seed: must be a whole number >= 0"]),
        (["generate", "default", "--prompt", "-", "--prompt", "-"], ["--prompt - reads all of standard input", "once"]),
        (["generate", "default", "--prompts", "/no/such/prompts.txt"], ["No such file", "/no/such/prompts.txt"]),
        (["no-such-command"], ["invalid choice: 'no-such-command'"]),
        (["generate", "default", "--prompt", "x", "--storage", "disk", "--disk", "floppy"],
         ["--disk: must be one of nvme3, nvme4, nvme5, sata, profile or native, got 'floppy'"]),
        (["demo", "--storage", "disk", "--host-cache-frac", "1.5"],
         ["--host-cache-frac: must be a number with 0 < value <= 1, got '1.5'"]),
        (["trace", "default", "--prompts", "p.txt", "--out", "t.jsonl", "--host-cache-bytes", "-5"],
         ["--host-cache-bytes: must be a positive whole number of bytes"]),
        (["replay", "t.jsonl", "--policy", "config1", "--cache-frac", "0.1", "--host-cache-frac", "0.5",
          "--host-cache-bytes", "1GB"], ["argument --host-cache-bytes: not allowed with argument --host-cache-frac"]),
        (["sweep", "t.jsonl", "--policy", "config1", "--cache-frac", "0.1", "--out", "r.csv", "--disk", "nvme9"],
         ["--disk: must be one of nvme3"]),
    ],
)  # fmt: skip
def test_a_bad_argument_is_one_line_before_anything_loads(
    monkeypatch: pytest.MonkeyPatch, no_model: None, args: list[str], expected: list[str]
) -> None:
    assert_one_line(*run_cli(monkeypatch, *args), *expected)


def test_info_on_a_config_value_of_the_wrong_type(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = bad_config(tmp_path / "typed", num_experts="sixteen")
    assert_one_line(
        *run_cli(monkeypatch, "info", str(folder)),
        f"{folder}: the config has a value of the wrong type: Field 'num_experts' expected int, got str",
    )
    assert_one_line(*run_cli(monkeypatch, "info", str(bad_config(tmp_path / "float", hidden_size=2.5))), "got float")


@pytest.mark.parametrize(
    ("field", "value"), [("num_experts", -4), ("num_experts_per_tok", 0), ("intermediate_size", -5), ("hidden_size", 0)]
)
def test_info_on_negative_expert_counts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, field: str, value: int
) -> None:
    folder = bad_config(tmp_path / "negative", **{field: value})
    assert_one_line(
        *run_cli(monkeypatch, "info", str(folder)), f"the config's {field} must be a whole number >= 1, got {value}"
    )


def test_a_model_with_bad_config_values_is_refused_before_loading(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, checkpoint: Path
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for file in checkpoint.iterdir():
        (folder / file.name).symlink_to(file)
    (folder / "config.json").unlink()
    config = json.loads((checkpoint / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_experts": "many"}))
    from specmd.offload_models.auto import AutoOffloadForCausalLM

    with pytest.raises(ValueError, match="Field 'num_experts' expected int, got str"):
        AutoOffloadForCausalLM.from_pretrained(folder, cache_frac=0.5, progress=False)
    (folder / "config.json").write_text(json.dumps(config | {"num_experts": -2}))
    with pytest.raises(ValueError, match="num_experts must be a whole number >= 1, got -2"):
        AutoOffloadForCausalLM.from_pretrained(folder, cache_frac=0.5, progress=False)


def test_an_unknown_eval_task_is_one_line_before_the_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval")
    from specmd.eval_tasks import model as eval_model

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded the model before checking the tasks")

    monkeypatch.setattr(eval_model.OffloadHFLM, "__init__", refuse)
    assert_one_line(
        *run_cli(monkeypatch, "eval", "--tasks", "specmd_gsm8k,bogus", "--limit", "1", "--device", "cpu"),
        "unknown lm_eval task 'bogus'",
        "specmd_gsm8k",
        "lm_eval ls tasks",
    )


def test_prompts_that_hold_no_tokens_are_refused(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('"def f():"\n""\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected a non-empty JSON string"):
        options.read_prompts(str(tmp_path / "p.jsonl"))

    def tokenizer(text: str, return_tensors: str) -> dict:
        import torch

        return {"input_ids": torch.zeros(1, len(text.strip()), dtype=torch.long)}

    assert len(options.encode_prompts(tokenizer, ["a", " b"])) == 2
    with pytest.raises(ValueError, match="the prompt ' ' encodes to no tokens"):
        options.encode_prompts(tokenizer, ["a", " "])


def test_a_message_with_brackets_and_newlines_prints_as_one_plain_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(args: object) -> int:
        raise ValueError("bad [bold]value[/bold] [int4]\nsecond line")

    monkeypatch.setattr(cli.models, "cmd_policies", fail)  # the parser is built at each `main`
    assert_one_line(*run_cli(monkeypatch, "policies"), "error: bad [bold]value[/bold] [int4] second line")


@pytest.mark.parametrize("bug", [RuntimeError("a bug"), KeyError("a bug"), TypeError("a bug")])
def test_an_internal_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, bug: Exception) -> None:
    def fail(args: object) -> int:
        raise bug

    monkeypatch.setattr(cli.models, "cmd_policies", fail)
    with pytest.raises(type(bug), match="a bug"):
        cli.main(["policies"])


def test_the_console_script_prints_one_line_on_a_narrow_terminal(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("specmd")
    env = os.environ | {"COLUMNS": "40"}
    folder = bad_config(tmp_path / "typed", num_experts_per_tok="eight")
    for args in (["info", str(folder)], ["sweep", "t.jsonl", "--out", "r.csv", "--jobs", "0"]):
        run = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=120, check=False)
        assert run.returncode == 2 and run.stdout == ""
        assert len(run.stderr.splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr


def test_ctrl_c_is_exit_130_without_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.models, "cmd_policies", interrupted)
    errors = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(cli, "err", errors)
    assert cli.main(["policies"]) == 130
    assert errors.export_text() == "interrupted\n"


MODEL_COMMANDS = ("demo", "generate", "trace", "routing-stats", "eval", "reproduce")


def test_every_model_loading_command_takes_device_and_dtype() -> None:
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in MODEL_COMMANDS:
        flags = {flag for action in commands.choices[name]._actions for flag in action.option_strings}
        assert "--device" in flags, name
        if name != "reproduce":  # reproduce loads the model as saved
            assert "--dtype" in flags, name


@pytest.mark.parametrize(
    "command", [["demo"], ["generate", "default", "--prompt", "x"], ["routing-stats", "default", "--text", "t.txt"]]
)
def test_a_device_torch_cannot_name_is_refused(
    monkeypatch: pytest.MonkeyPatch, no_model: None, command: list[str]
) -> None:
    code, shown = run_cli(monkeypatch, *command, "--device", "gpu0")
    assert_one_line(code, shown, "argument --device: must be cpu, cuda or cuda:N, got 'gpu0'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_before_anything_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    code, shown = run_cli(monkeypatch, "generate", "default", "--prompt", "x", "--device", "cuda")
    assert_one_line(code, shown, "cuda", "device_map='cpu'")


def test_a_hub_id_offline_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    from huggingface_hub import constants

    def unreachable(*args: object, **kwargs: object) -> None:
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    code, shown = run_cli(monkeypatch, "info", "someone/no-such-moe")
    assert time.perf_counter() - start < 5
    assert_one_line(code, shown, "someone/no-such-moe is not a local directory", "cannot be reached")


def test_version() -> None:
    from specmd import __version__
    from specmd.compiled import is_compiled

    run = subprocess.run([sys.executable, "-m", "specmd.cli", "--version"], capture_output=True, text=True, check=False)
    engine = "compiled" if is_compiled() else "pure Python"
    assert run.returncode == 0 and run.stdout.strip() == f"specmd {__version__} ({engine} engine)"


def test_shared_options_take_the_same_values_and_defaults_everywhere() -> None:
    """Each option several commands share is one definition: the same parser of values everywhere, and
    the same default wherever it takes one value (demo and reproduce default to the paper's hardware)."""
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    seen: dict[str, list[tuple[str, argparse.Action]]] = {}
    for name, parser in commands.choices.items():
        for action in parser._actions:
            for flag in action.option_strings:
                seen.setdefault(flag, []).append((name, action))
    types = {"--cache-frac": options.fraction, "--cache-bytes": options.byte_size, "--device": options.device_name,
             "--bandwidth-gbps": options.parse_bandwidth, "--max-new-tokens": options.positive_int}  # fmt: skip
    for flag, parse in types.items():
        assert len(seen[flag]) > 1 and all(action.type is parse for _, action in seen[flag]), flag
    links = {name: a.default for name, a in seen["--bandwidth-gbps"] if a.nargs is None}
    assert set(links.values()) == {options.PROFILE}, links
    hardware = {name: a.default for name, a in seen["--hardware"] if a.nargs is None}
    assert {h for n, h in hardware.items() if n not in ("demo", "reproduce")} == {"a100"}, hardware
    assert all(a.default is None for _, a in seen["--device"])
    assert len({tuple(a.choices or ()) for _, a in seen["--dtype"]}) == 1
