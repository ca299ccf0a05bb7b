"""The optional compiled build (setup.py, SPECMD_COMPILE=1): all of the engine compiled or none of it."""

from __future__ import annotations

import os

from specmd.compiled import MODULES, compiled_modules, is_compiled


def test_the_engine_modules_are_compiled_all_or_none() -> None:
    assert compiled_modules() in ([], list(MODULES))


def test_the_run_uses_the_build_it_expects() -> None:
    # `make test-compiled` sets SPECMD_EXPECT_COMPILED=1, so a failed or skipped build cannot pass as compiled.
    expected = os.environ.get("SPECMD_EXPECT_COMPILED", "0") == "1"
    assert is_compiled() == expected
