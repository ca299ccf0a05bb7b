"""A tiny third-party policy plugin, written out by tests: a module whose import registers an eviction policy,
optionally declared in the ``specmd.policies`` entry-point group as an installed distribution declares it."""

from __future__ import annotations

from pathlib import Path

MODULE = "specmd_test_mru"
POLICY = "plugin-mru"
MIX = f"none/{POLICY}/fetch/standard"
FAIL = "SPECMD_TEST_MRU_FAIL"  # set in the environment: the policy raises a ValueError when it evicts

SOURCE = f'''
"""A specmd policy plugin for the tests."""

import os

from specmd.cache.policies import EvictionPolicy, register_eviction


@register_eviction("{POLICY}", "pmru")
class MostRecentlyUsed(EvictionPolicy):
    """Most recently used: evicts the expert requested or
    loaded last.

    A test plugin's policy; this paragraph is not its description.
    """

    def __init__(self, spare: int = 0) -> None:
        self.spare = spare
        self._order: dict = {{}}

    def on_access(self, key, now):
        self._order.pop(key, None)
        self._order[key] = None

    def on_insert(self, key, now):
        self._order[key] = None

    def choose_victim(self, candidates, now):
        if os.environ.get("{FAIL}"):
            raise ValueError("plugin-mru was told to fail")
        for key in reversed(self._order):
            if key in candidates:
                del self._order[key]
                return key
        raise LookupError("plugin-mru found no evictable expert")
'''


def write_plugin(folder: Path, *, entry_point: bool = False, source: str = SOURCE, module: str = MODULE) -> Path:
    """`module`.py in `folder`; with `entry_point`, also the .dist-info an installed distribution declaring it in
    the ``specmd.policies`` group has (what importlib.metadata reads). Returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(source)
    if entry_point:
        info = folder / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[specmd.policies]\nmru = {module}\n")
    return folder
