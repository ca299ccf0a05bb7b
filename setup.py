"""The packaging steps setup.cfg cannot express: `specmd-lm-eval.pth`, and the compiled engine.

`specmd-lm-eval.pth` lets the stock `lm_eval` command find specmd's `offload-hf` model (specmd/eval_tasks/hook.py).
A wheel installs the files at its root into site-packages, so the `build_pth` step puts the file there:
into `build_lib` for a regular wheel (`pip install .`, `pip wheel .`), and for an editable install
(PEP 660: `pip install -e .`), which does not pack `build_lib`, into the directory setuptools assembles
the editable wheel from (the `install_lib` it configures for the build steps).

The compiled engine: a build (`pip install .`, `pip wheel .`) compiles the modules `specmd/compiled.py` lists
with mypyc (mypy is a build requirement) from the same Python source. Where it cannot (no mypy, no C compiler,
a compile that fails), it prints one line saying why and builds pure Python. SPECMD_COMPILE chooses:
unset, compiled where possible; 1, compiled or the build fails (CI's `make test-compiled`); 0, pure Python.
An editable install (`pip install -e .`, `make install`) stays pure Python unless SPECMD_COMPILE=1, since
extension modules built in place would shadow the .py files a developer edits (README, "Compiled engine").
"""

import os
import runpy
import shlex
import shutil
import sys
import sysconfig
from typing import ClassVar

from setuptools import Command, Extension, setup
from setuptools.command.build import build
from setuptools.command.build_ext import build_ext

PTH = "specmd-lm-eval.pth"
SOURCE = os.path.join("specmd", "eval_tasks", PTH)
# The setup.py commands that build the package; the others (egg_info, dist_info, sdist, ...) need no engine.
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}
EDITABLE = {"editable_wheel", "develop"}


class build_pth(Command):
    """Copy `specmd-lm-eval.pth` to the root of the wheel being built."""

    description = f"put {PTH} at the root of the wheel"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False  # setuptools sets it for PEP 660 builds

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def run(self) -> None:
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(SOURCE, os.path.join(root, PTH), preserve_mode=False)

    def get_source_files(self) -> list[str]:
        return [SOURCE]

    def get_outputs(self) -> list[str]:
        return [] if self.editable_mode else [os.path.join(self.build_lib, PTH)]


class build_with_pth(build):
    sub_commands: ClassVar[list[tuple[str, object]]] = [*build.sub_commands, ("build_pth", None)]


def notice(why: str) -> None:
    """The one line a build that falls back to pure Python prints (pip shows it with -v)."""
    print(f"specmd: building the pure-Python engine: {why}", file=sys.stderr, flush=True)


class build_ext_or_pure(build_ext):
    """Builds the compiled engine; when `optional` and a compile fails, removes what it built and builds pure Python
    (so an install is never half compiled: `specmd.compiled.is_compiled` refuses a partial build)."""

    optional = False

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # distutils' CompileError, LinkError, CCompilerError; a compiler that is missing
            if not self.optional:
                raise
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            self.distribution.ext_modules = self.extensions = []
            notice(f"compiling it failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")


def compile_mode(environ: dict[str, str]) -> str:
    """SPECMD_COMPILE's choice: "auto" (unset), "1" or "0"."""
    flag = environ.get("SPECMD_COMPILE", "auto")
    if flag not in ("auto", "0", "1"):
        raise SystemExit(f"SPECMD_COMPILE must be 0 or 1 (or unset: compiled where possible), got {flag!r}")
    return flag


def missing_compiler(environ: dict[str, str]) -> str | None:
    """Why no C compiler can build extension modules here (the one distutils would call), or None."""
    command = environ.get("CC") or sysconfig.get_config_var("CC")
    if not command:  # not a Unix toolchain (MSVC): let the compile itself find out
        return None
    program = shlex.split(command)[0]
    return None if shutil.which(program) else f"no C compiler ({program!r} not found)"


def compiled_extensions(commands: list[str], environ: dict[str, str]) -> list[Extension]:
    """The mypyc extension modules for a build, or none (pure Python) with a notice saying why."""
    mode = compile_mode(environ)
    if mode == "0" or not BUILDS & set(commands):
        return []
    required = mode == "1"
    if not required and EDITABLE & set(commands):
        notice("an editable install runs the .py files you edit (SPECMD_COMPILE=1 compiles it in place)")
        return []
    why = missing_compiler(environ)
    if why:
        if required:
            raise SystemExit(f"SPECMD_COMPILE=1 needs a C compiler: {why}")
        notice(why)
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if required:
            raise SystemExit(
                "SPECMD_COMPILE=1 needs mypy where specmd is built: pip install mypy, then "
                "SPECMD_COMPILE=1 pip install --no-build-isolation ."
            ) from None
        notice("mypy (mypyc) is not installed where specmd is built")
        return []
    build_ext_or_pure.optional = not required
    modules = runpy.run_path(os.path.join("specmd", "compiled.py"))["MODULES"]
    try:
        return mypycify([name.replace(".", os.sep) + ".py" for name in modules], opt_level="3")
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error it cannot compile
        if required:
            raise
        notice(f"mypyc could not compile it ({type(exc).__name__}: {exc})")
        return []


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import its functions
    setup(
        cmdclass={"build": build_with_pth, "build_pth": build_pth, "build_ext": build_ext_or_pure},
        ext_modules=compiled_extensions(sys.argv[1:], dict(os.environ)),
    )
