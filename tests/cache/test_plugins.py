"""Policies from other packages: an installed plugin's policies are found by name, a module loads by name, and a
plugin that fails to import is one error naming it (and registers nothing)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from specmd.cache.policies import PolicySpec, catalog
from specmd.cache.policies.plugins import PluginError, load_entry_points, load_plugin, loaded_plugins
from specmd.cache.policies.spec import _REGISTRY, parameters
from tests.plugins import MIX, MODULE, POLICY, write_plugin

pytestmark = pytest.mark.usefixtures("fresh_plugins")


def test_an_installed_plugin_loads_when_its_policy_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path, entry_point=True)))
    assert MODULE not in sys.modules  # nothing imports a plugin before a name needs it
    assert str(PolicySpec.parse(MIX)) == MIX
    assert MODULE in sys.modules
    assert str(PolicySpec.parse("none/pmru:spare=2/fetch/standard").eviction) == f"{POLICY}:spare=2"
    assert loaded_plugins() == ()  # the entry point, not `load_plugin`


def test_listing_policies_loads_installed_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path, entry_point=True)))
    rows = {(kind, name): (aliases, text) for kind, name, aliases, text in catalog()}
    assert rows[("eviction", POLICY)] == (("pmru",), "Most recently used: evicts the expert requested or loaded last.")
    assert parameters("eviction", "pmru") == {"spare": 0}


def test_a_module_loads_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path)))  # no entry point: only --plugin finds it
    with pytest.raises(ValueError, match=f"unknown eviction policy '{POLICY}'"):
        PolicySpec.parse(MIX)
    load_plugin(MODULE)
    load_plugin(MODULE)  # again: nothing more happens
    assert loaded_plugins() == (MODULE,)
    assert POLICY in _REGISTRY["eviction"] and str(PolicySpec.parse(MIX)) == MIX


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("specmd_test_absent", "policy plugin 'specmd_test_absent' failed to import: no module named "
         "'specmd_test_absent' on the Python path (install it, or add its folder to PYTHONPATH)"),
        ("specmd_test_absent.policies", "no module named 'specmd_test_absent' on the Python path"),
        ("not a module", "policy plugin 'not a module' is not a module name"),
        ("", "policy plugin '' is not a module name"),
    ],
)  # fmt: skip
def test_a_module_that_is_not_there_is_one_error_naming_it(module: str, message: str) -> None:
    with pytest.raises(PluginError, match=re.escape(message)):
        load_plugin(module)
    assert loaded_plugins() == ()


BROKEN = f'''
from specmd.cache.policies import register_eviction
from specmd.cache.policies.eviction import LRU

register_eviction("{POLICY}")(type("Early", (LRU,), {{}}))
import specmd_test_no_such_dependency
'''


def test_a_plugin_that_fails_to_import_registers_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path, entry_point=True, source=BROKEN)))
    expected = (
        rf"^policy plugin 'mru' \(entry point '{MODULE}' of 'specmd.policies', from {MODULE} 0.1\) failed to "
        "import: ModuleNotFoundError: No module named 'specmd_test_no_such_dependency'$"
    )
    for _ in range(2):  # the same error each time: what it registered before failing is forgotten
        with pytest.raises(PluginError, match=expected):
            PolicySpec.parse("none/no-such-policy/fetch/standard")
        assert POLICY not in _REGISTRY["eviction"]
    with pytest.raises(PluginError, match="policy plugin 'mru'"):
        catalog()
    with pytest.raises(PluginError, match=f"policy plugin '{MODULE}' failed to import: ModuleNotFoundError"):
        load_plugin(MODULE)


def test_an_error_a_plugin_raises_is_named_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path, source="raise RuntimeError('no GPU here')\n")))
    with pytest.raises(PluginError, match=f"^policy plugin '{MODULE}' failed to import: RuntimeError: no GPU here$"):
        load_plugin(MODULE)


def test_known_names_never_load_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path, entry_point=True, source=BROKEN)))
    PolicySpec.parse("config5")  # a broken plugin stays out of the way of built-in names
    with pytest.raises(PluginError):
        load_entry_points()
