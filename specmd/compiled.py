"""Which modules the optional compiled build turns into extension modules, and whether this install has them.

`SPECMD_COMPILE=1 pip install .` (with mypy installed) compiles these modules with mypyc from the same
source, so live runs and replays execute the same code either way (benchmarks/RESULTS.md has the speed-up).
"""

from __future__ import annotations

import importlib
from importlib.machinery import EXTENSION_SUFFIXES

MODULES = (
    "specmd.cache.keys",
    "specmd.cache.clock",
    "specmd.cache.stats",
    "specmd.cache.link",
    "specmd.cache.engine",
    "specmd.cache.manager",
    "specmd.cache.policies.base",
    "specmd.cache.policies.eviction",
    "specmd.cache.policies.miss",
    "specmd.cache.policies.prefetch",
)


def compiled_modules() -> list[str]:
    """The modules of `MODULES` that were loaded from compiled extension modules."""
    return [name for name in MODULES if str(importlib.import_module(name).__file__).endswith(tuple(EXTENSION_SUFFIXES))]


def is_compiled() -> bool:
    """True when the engine and policies run compiled; a partial build (some modules only) is an error."""
    compiled = compiled_modules()
    if compiled and len(compiled) != len(MODULES):
        missing = sorted(set(MODULES) - set(compiled))
        raise RuntimeError(f"a partial compiled build: {missing} are pure Python; rebuild or remove the extensions")
    return bool(compiled)
