"""Imports run one way: quant < cache < {offload_models, sim} < eval_tasks < cli (DESIGN §2).

Policies import nothing above `cache`, and nothing in `cache/` outside its torch side (`cache/live/`)
imports torch or the libraries that load it, so the engine and replay stay torch-free.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import specmd

PACKAGE = Path(specmd.__file__).parent
RANK = {"": 0, "default_model": 0, "compiled": 0, "tensorfiles": 0, "quant": 0, "cache": 1, "offload_models": 2,
        "sim": 2, "eval_tasks": 3, "cli": 4}  # fmt: skip
TORCH_SIDE = ("torch", "transformers", "bitsandbytes", "hqq", "accelerate", "safetensors")


def imported(source: str, module: str) -> list[str]:
    """Every module `source` (the text of `module`) imports, anywhere in it, absolute names."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                parent = module.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            names.append(base)
    return names


def part(module: str) -> str:
    """The layer a specmd module belongs to: its first component below `specmd` ('' for the package root)."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else ""


def violations(module: str, source: str) -> list[str]:
    """Imports of `module` that break the layering."""
    found = []
    own = part(module)
    for target in imported(source, module):
        top = target.split(".")[0]
        engine_side = module.startswith("specmd.cache") and not module.startswith("specmd.cache.live")
        if engine_side and (top in TORCH_SIDE or target.startswith("specmd.cache.live")):
            found.append(f"{module} imports {target}: only cache/live may touch torch")
        above = target.startswith("specmd.") and part(target) != "cache"
        if module.startswith("specmd.cache.policies") and above and not target.startswith("specmd.quant.names"):
            found.append(f"{module} imports {target}: policies import nothing above cache")
        if top != "specmd" or target == "specmd":
            continue
        other = part(target)
        if RANK[other] > RANK[own] or (RANK[other] == RANK[own] and other != own and RANK[own] > 0):
            found.append(f"{module} imports {target}: {own or 'specmd'} may not import {other}")
    return found


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts).removesuffix(".__init__")
        found.append((name, path))
    return found


def test_every_module_imports_only_below_itself() -> None:
    assert len(modules()) > 50
    problems = [v for name, path in modules() for v in violations(name, path.read_text())]
    assert problems == []


@pytest.mark.parametrize(
    ("module", "source", "complaint"),
    [
        ("specmd.quant.persist", "from specmd.offload_models.auto import AutoOffloadForCausalLM", "quant may not"),
        ("specmd.cache.manager", "def f():\n    import torch", "only cache/live may touch torch"),
        ("specmd.cache.engine", "from specmd.cache.live.store import RamStore", "only cache/live"),
        ("specmd.sim.replay", "from specmd.offload_models import base", "sim may not import offload_models"),
        ("specmd.cache.policies.miss", "from specmd.sim.trace import Trace", "policies import nothing above cache"),
        ("specmd.offload_models.runtime", "from ..sim import trace", "offload_models may not import sim"),
    ],
)
def test_the_check_catches_an_upward_import(module: str, source: str, complaint: str) -> None:
    assert any(complaint in v for v in violations(module, source))


def test_engine_policies_and_replay_load_no_torch() -> None:
    code = (
        "import sys; import specmd.cache.factory, specmd.cache.policies, specmd.sim.replay, specmd.sim.sweep, "
        "specmd.quant.names; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
