"""specmd runs no code of a checkpoint's own (its `auto_map`) unless the caller passes trust_remote_code=True.

transformers asks on a terminal when trust_remote_code is left unset; here that prompt answers "y", as a user
might, so any path that leaves the decision to transformers would import the checkpoint's module and leave
its marker file.
"""

from __future__ import annotations

import builtins
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from specmd import AutoOffloadForCausalLM, OffloadOLMoE, cli
from specmd.cli import options
from specmd.offload_models.info import load_config


class Trusted(Exception):
    """Raised where transformers would import the checkpoint's code: it was told to trust it."""


@pytest.fixture
def custom_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, list[str]]:
    """A checkpoint whose config, model and tokenizer are its own code, which writes a marker file when
    imported; the prompt transformers may show answers yes (its questions are listed)."""
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "IMPORTED"
    (folder / "marker.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    auto_map = {
        "AutoConfig": "marker.MarkerConfig",
        "AutoModelForCausalLM": "marker.MarkerModel",
        "AutoTokenizer": ["marker.MarkerTokenizer", None],
    }
    (folder / "config.json").write_text(json.dumps({"model_type": "specmd_marker", "auto_map": auto_map}))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": auto_map["AutoTokenizer"]}})
    )
    asked: list[str] = []

    def answer_yes(question: str = "") -> str:
        asked.append(question)
        return "y"

    monkeypatch.setattr(builtins, "input", answer_yes)
    return folder, marker, asked


def refused(load: Callable[[], object], marker: Path, asked: list[str]) -> None:
    """`load` fails, without asking and without importing the checkpoint's code."""
    with pytest.raises((ValueError, OSError)):
        load()
    assert not marker.exists(), "the checkpoint's code ran"
    assert asked == [], "transformers asked whether to run the checkpoint's code"


def test_the_prompt_would_run_the_code(
    custom_code: tuple[Path, Path, list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The premise: transformers left to decide (trust_remote_code unset) asks, and a yes runs the code."""
    from transformers import AutoConfig, dynamic_module_utils

    folder, marker, asked = custom_code
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not ~/.cache
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        with pytest.raises(AttributeError):  # the module has no MarkerConfig: it ran, then failed
            AutoConfig.from_pretrained(folder)
    finally:
        for name in [name for name in sys.modules if name.startswith("transformers_modules")]:
            del sys.modules[name]
    assert asked and marker.read_text() == "ran"


def test_loading_runs_no_checkpoint_code(custom_code: tuple[Path, Path, list[str]]) -> None:
    folder, marker, asked = custom_code
    refused(lambda: AutoOffloadForCausalLM.from_pretrained(folder, cache_frac=0.5, progress=False), marker, asked)
    refused(lambda: OffloadOLMoE.from_pretrained(folder, cache_frac=0.5, progress=False), marker, asked)
    load = AutoOffloadForCausalLM.from_pretrained
    for unset in (None, False, "yes", 1):  # only True itself trusts
        refused(lambda u=unset: load(folder, cache_frac=0.5, trust_remote_code=u, progress=False), marker, asked)
    refused(lambda: load_config(folder), marker, asked)
    refused(lambda: options.load_tokenizer(str(folder)), marker, asked)


@pytest.mark.parametrize(
    "args",
    [["info"], ["generate", "--prompt", "x"], ["routing-stats", "--text", __file__], ["demo"]],
)
def test_the_cli_runs_no_checkpoint_code(
    custom_code: tuple[Path, Path, list[str]], monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    folder, marker, asked = custom_code
    errors = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(cli, "err", errors)
    assert cli.main([args[0], str(folder), *args[1:]]) == 2
    assert len(errors.export_text().splitlines()) == 1
    assert not marker.exists() and asked == []


def test_lm_eval_runs_no_checkpoint_code_unless_asked(
    custom_code: tuple[Path, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lm_eval")
    from specmd.eval_tasks.model import OffloadHFLM
    from specmd.eval_tasks.run import evaluate

    folder, marker, asked = custom_code
    refused(lambda: OffloadHFLM(pretrained=str(folder), device="cpu"), marker, asked)
    refused(lambda: OffloadHFLM(pretrained=str(folder), device="cpu", trust_remote_code=None), marker, asked)
    refused(lambda: evaluate(str(folder), ["specmd_gsm8k"], device="cpu"), marker, asked)
    with pytest.raises(Trusted):
        with_trust_spy(monkeypatch, lambda: OffloadHFLM(pretrained=str(folder), device="cpu", trust_remote_code=True))


def with_trust_spy(monkeypatch: pytest.MonkeyPatch, load: Callable[[], object]) -> None:
    """Run `load` with transformers' loader of a checkpoint's code replaced by one that raises `Trusted`."""
    from transformers.models.auto import configuration_auto

    def spy(class_ref: str, *args: object, **kwargs: object) -> None:
        raise Trusted(class_ref)

    monkeypatch.setattr(configuration_auto, "get_class_from_dynamic_module", spy)
    load()


def test_trust_remote_code_true_is_passed_on(
    custom_code: tuple[Path, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _, asked = custom_code
    with pytest.raises(Trusted, match=r"marker\.MarkerConfig"):
        with_trust_spy(
            monkeypatch,
            lambda: AutoOffloadForCausalLM.from_pretrained(
                folder, cache_frac=0.5, trust_remote_code=True, progress=False
            ),
        )
    with pytest.raises(Trusted):
        with_trust_spy(
            monkeypatch,
            lambda: OffloadOLMoE.from_pretrained(folder, cache_frac=0.5, trust_remote_code=True, progress=False),
        )
    assert asked == []


def test_a_checkpoint_of_a_known_type_loads_without_its_code(
    checkpoint: Path, tmp_path: Path, custom_code: tuple[Path, Path, list[str]]
) -> None:
    """An auto_map beside a model type transformers knows: the model loads, the checkpoint's code never runs."""
    _, marker, asked = custom_code
    folder = tmp_path / "known"
    folder.mkdir()
    for file in checkpoint.iterdir():
        (folder / file.name).symlink_to(file)
    (folder / "config.json").unlink()
    config = json.loads((checkpoint / "config.json").read_text())
    (folder / "marker.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    auto_map = {"AutoConfig": "marker.MarkerConfig", "AutoModelForCausalLM": "marker.MarkerModel"}
    (folder / "config.json").write_text(json.dumps(config | {"auto_map": auto_map}))
    with AutoOffloadForCausalLM.from_pretrained(folder, cache_frac=0.5, progress=False) as model:
        assert type(model).__name__ == "OffloadOLMoE"
    assert not marker.exists() and asked == []
