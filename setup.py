"""The packaging steps setup.cfg cannot express: `specmd-lm-eval.pth`, and the optional compiled engine.

`specmd-lm-eval.pth` lets the stock `lm_eval` command find specmd's `offload-hf` model (specmd/eval_tasks/hook.py).
A wheel installs the files at its root into site-packages, so the `build_pth` step puts the file there:
into `build_lib` for a regular wheel (`pip install .`, `pip wheel .`), and for an editable install
(PEP 660: `pip install -e .`), which does not pack `build_lib`, into the directory setuptools assembles
the editable wheel from (the `install_lib` it configures for the build steps).

With SPECMD_COMPILE=1 in the environment (and mypy installed), the modules `specmd/compiled.py` lists are
compiled with mypyc from the same Python source; by default specmd installs as pure Python (README,
"Compiled engine").
"""

import os
import runpy
from typing import ClassVar

from setuptools import Command, setup
from setuptools.command.build import build

PTH = "specmd-lm-eval.pth"
SOURCE = os.path.join("specmd", "eval_tasks", PTH)


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


def compiled_extensions() -> list:
    """The mypyc extension modules when SPECMD_COMPILE=1, else none."""
    flag = os.environ.get("SPECMD_COMPILE", "0")
    if flag not in ("0", "1"):
        raise SystemExit(f"SPECMD_COMPILE must be 0 or 1, got {flag!r}")
    if flag == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        raise SystemExit(
            "SPECMD_COMPILE=1 needs mypy where specmd is built: pip install mypy, then "
            "SPECMD_COMPILE=1 pip install --no-build-isolation ."
        ) from None

    modules = runpy.run_path(os.path.join("specmd", "compiled.py"))["MODULES"]
    return mypycify([name.replace(".", os.sep) + ".py" for name in modules], opt_level="3")


setup(cmdclass={"build": build_with_pth, "build_pth": build_pth}, ext_modules=compiled_extensions())
