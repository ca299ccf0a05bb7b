"""The optional compiled build (setup.py, SPECMD_COMPILE=1): all of the engine compiled or none of it."""

from __future__ import annotations

import os
import pickle
import runpy
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from specmd.cache.clock import ModelShape, PassInfo
from specmd.cache.stats import StatsRecorder
from specmd.compiled import MODULES, compiled_modules, is_compiled, stale_extensions


def test_the_engine_modules_are_compiled_all_or_none() -> None:
    assert compiled_modules() in ([], list(MODULES))


def test_the_engine_s_frozen_records_pickle_compiled_or_not() -> None:
    """Results and pass records cross process boundaries (sweep workers, Ray, data-parallel ranks); mypyc's
    frozen dataclasses cannot be unpickled field by field, so they rebuild through their constructors."""
    recorder = StatsRecorder([0, 1])
    recorder.record_verify(3, 2)
    stats = recorder.snapshot(10, 20)
    shape = ModelShape(2, 8, 4, (10, 10), 5, 3, 2)
    for record in (PassInfo.for_sequences([3, 0], [2, 1]), shape, stats):
        assert pickle.loads(pickle.dumps(record)) == record


def test_the_run_uses_the_build_it_expects() -> None:
    # `make test-compiled` sets SPECMD_EXPECT_COMPILED=1, so a failed or skipped build cannot pass as compiled.
    expected = os.environ.get("SPECMD_EXPECT_COMPILED", "0") == "1"
    assert is_compiled() == expected


# The build's choice between the compiled and the pure-Python engine (setup.py); a real wheel build takes minutes
# (README, "Compiled engine", has the command and its result), so these test the decisions and the fallback.
SETUP = runpy.run_path(str(Path(__file__).parents[1] / "setup.py"), run_name="specmd_setup")  # setup() not run
NO_COMPILER = {"CC": "/nonexistent/cc"}


def notices(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_a_build_without_a_c_compiler_is_pure_python_with_a_one_line_notice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert SETUP["compiled_extensions"](["bdist_wheel", "--dist-dir", "dist"], NO_COMPILER) == []
    assert notices(capsys) == ["specmd: building the pure-Python engine: no C compiler ('/nonexistent/cc' not found)"]
    with pytest.raises(SystemExit, match="SPECMD_COMPILE=1 needs a C compiler: no C compiler"):
        SETUP["compiled_extensions"](["bdist_wheel"], NO_COMPILER | {"SPECMD_COMPILE": "1"})


def test_a_build_without_mypy_is_pure_python_with_a_one_line_notice(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mypyc.build", None)  # `from mypyc.build import ...` fails
    assert SETUP["compiled_extensions"](["build"], {}) == []
    assert notices(capsys) == [
        "specmd: building the pure-Python engine: mypy (mypyc) is not installed where specmd is built"
    ]
    with pytest.raises(SystemExit, match="SPECMD_COMPILE=1 needs mypy where specmd is built"):
        SETUP["compiled_extensions"](["build"], {"SPECMD_COMPILE": "1"})


def test_what_compiles_when(capsys: pytest.CaptureFixture[str]) -> None:
    extensions = SETUP["compiled_extensions"]
    assert extensions(["egg_info"], NO_COMPILER) == []  # metadata needs no engine: no notice, no compile
    assert extensions(["bdist_wheel"], NO_COMPILER | {"SPECMD_COMPILE": "0"}) == []  # forced pure: no notice
    assert notices(capsys) == []
    assert extensions(["editable_wheel"], NO_COMPILER) == []  # a checkout runs the .py files its developer edits
    assert notices(capsys) == [
        "specmd: building the pure-Python engine: an editable install runs the .py files you edit "
        "(SPECMD_COMPILE=1 compiles it in place)"
    ]
    with pytest.raises(SystemExit, match=r"SPECMD_COMPILE must be 0 or 1 .* got 'yes'"):
        extensions(["build"], {"SPECMD_COMPILE": "yes"})


@pytest.mark.parametrize("optional", [True, False])
def test_a_compile_that_fails_leaves_no_extension_and_builds_pure_python_unless_required(
    optional: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from setuptools import Distribution, Extension

    monkeypatch.chdir(tmp_path)
    Path("good.c").write_text(
        '#include <Python.h>\nstatic struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "good"};\n'
        "PyMODINIT_FUNC PyInit_good(void) { return PyModule_Create(&m); }\n"
    )
    Path("broken.c").write_text("this is not C\n")
    dist = Distribution(
        {"name": "x", "ext_modules": [Extension("good", ["good.c"]), Extension("broken", ["broken.c"])]}
    )
    command = SETUP["build_ext_or_pure"](dist)
    command.optional, command.build_lib, command.build_temp = optional, "lib", "tmp"
    command.ensure_finalized()
    if not optional:
        with pytest.raises(Exception, match=r"broken\.c"):
            command.run()
        return
    command.run()
    assert not list(Path("lib").rglob("*.so")) and dist.ext_modules == []  # `good` was built, then removed
    assert notices(capsys)[-1].startswith("specmd: building the pure-Python engine: compiling it failed (CompileError")


def test_an_extension_older_than_its_source_in_a_checkout_is_reported(tmp_path: Path) -> None:
    source = tmp_path / "pkg" / "mod.py"
    source.parent.mkdir()
    source.write_text("")
    built = tmp_path / "pkg" / f"mod{EXTENSION_SUFFIXES[0]}"
    built.write_bytes(b"")
    os.utime(source, (1000, 1000))
    os.utime(built, (2000, 2000))
    assert stale_extensions(["pkg.mod"], str(tmp_path)) == []
    os.utime(source, (3000, 3000))  # edited after the build
    assert stale_extensions(["pkg.mod"], str(tmp_path)) == [str(built)]
    (tmp_path / "specmd-0.1.0.dist-info").mkdir()  # installed from a wheel, whose files come in any order
    assert stale_extensions(["pkg.mod"], str(tmp_path)) == []
