"""Which modules the compiled build turns into extension modules, and whether this install has them.

A build (`pip install .`) compiles these modules with mypyc from the same source where it can (setup.py), so live
runs and replays execute the same code either way (benchmarks/RESULTS.md has the speed-up). An extension module
built in place in a checkout (`make test-compiled`) that is older than its .py file shadows the edit: importing
specmd warns (`warn_stale`).
"""

from __future__ import annotations

import glob
import importlib
import os
import warnings
from collections.abc import Iterable
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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder holding the specmd package


def stale_extensions(modules: Iterable[str] = MODULES, root: str = ROOT) -> list[str]:
    """The extension files of `modules` under `root` older than the .py file beside them, which they shadow.

    Only in a checkout (an in-place build), not where an installer put specmd (its .dist-info is beside it): an
    installer writes the files of a wheel in any order. Looks at the files only (nothing is imported), so
    importing specmd stays cheap.
    """
    if glob.glob(os.path.join(glob.escape(root), "specmd-*.dist-info")):
        return []
    stale = []
    for name in modules:
        stem = os.path.join(root, *name.split("."))
        if not os.path.exists(stem + ".py"):
            continue
        for suffix in EXTENSION_SUFFIXES:
            if os.path.exists(stem + suffix) and os.path.getmtime(stem + ".py") > os.path.getmtime(stem + suffix):
                stale.append(stem + suffix)
    return stale


def warn_stale() -> None:
    """Warn, once per process, when an extension module built in place is older than the .py file it shadows."""
    stale = stale_extensions()
    if stale:
        warnings.warn(
            f"{len(stale)} of specmd's compiled modules are older than their .py files and run instead of them "
            f"({stale[0]}, ...): rebuild them (SPECMD_COMPILE=1 python setup.py build_ext --inplace) or remove "
            "them (make clean-compiled)",
            RuntimeWarning,
            stacklevel=2,
        )
