"""The `specmd-lm-eval.pth` hook: idle at startup, registers `offload-hf` with lm_eval, ships in every install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PTH = REPO / "specmd" / "eval_tasks" / "specmd-lm-eval.pth"

PROBE = """
import site, sys
site.addsitedir(sys.argv[1])  # a site directory holding the .pth, as site-packages does
site.addsitedir(sys.argv[1])  # processed twice (venvs can list site-packages twice): still one finder
finders = [f for f in sys.meta_path if type(f).__name__ == "SpecmdLmEvalHook"]
assert len(finders) == 1, sys.meta_path
assert not {"specmd", "lm_eval", "torch"} & set(sys.modules), "the hook imported at startup"
from lm_eval.api.registry import get_model, model_registry
assert len(model_registry) == 0  # lm_eval fills it on the first lookup, importing lm_eval.models
assert get_model("hf").__name__ == "HFLM"
assert model_registry._objs["offload-hf"] == "specmd.eval_tasks.model:OffloadHFLM"  # lazy: nothing loaded yet
assert "specmd.eval_tasks.model" not in sys.modules
print("ok")
"""


def test_pth_registers_offload_hf_lazily_beside_the_builtin_models(tmp_path: Path, offline_env: dict[str, str]) -> None:
    shutil.copy(PTH, tmp_path / PTH.name)
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, env=offline_env, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


BUILD = """
import sys
from setuptools import build_meta
print(getattr(build_meta, sys.argv[1])(sys.argv[2]))
"""


def test_wheel_and_editable_install_put_the_pth_in_site_packages(tmp_path: Path) -> None:
    """What pip installs from `pip install .` (a wheel) and `pip install -e .` (an editable wheel, PEP 660)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "setup.py", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "specmd", source / "specmd", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    built = []
    for hook in ("build_wheel", "build_editable"):  # as pip runs them: each in a fresh process
        run = subprocess.run(
            [sys.executable, "-c", BUILD, hook, str(out)], cwd=source, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-3000:]
        built.append(out / run.stdout.split()[-1])
    wheel, editable = built
    with zipfile.ZipFile(wheel) as built:
        names = set(built.namelist())
        assert built.read(PTH.name) == PTH.read_bytes()
        record = built.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
    assert f"{PTH.name}," in record  # so `pip uninstall` removes it
    assert "specmd/eval_tasks/tasks/specmd_gsm8k_100.yaml" in names  # package data: tasks and fixtures
    assert "specmd/eval_tasks/fixtures/nq_open/validation.jsonl" in names
    with zipfile.ZipFile(editable) as built:
        assert built.read(PTH.name) == PTH.read_bytes()
        assert any(name.startswith("__editable__") and name.endswith(".pth") for name in built.namelist())
