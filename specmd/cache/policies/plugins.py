"""Policies from other packages: plugin modules whose import registers policies (`@register_eviction`, ...).

An installed distribution declares its module in the ``specmd.policies`` entry-point group::

    [project.entry-points."specmd.policies"]
    my_policies = "my_package.policies"

specmd imports every module of that group the first time a policy name is not found, and before it lists
the policies; `load_plugin` (the command line's ``--plugin MODULE``) imports a module that is not installed so.
A plugin that fails to import is one `PluginError` naming it.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points

ENTRY_POINT_GROUP = "specmd.policies"

_loaded: list[str] = []  # modules `load_plugin` imported, in order: a sweep's workers import them too
_entry_points_loaded = False


class PluginError(ImportError):
    """A policy plugin that cannot be imported; the message names it and says why."""


def _import(module: str, what: str) -> None:
    """Import `module`; any failure (a missing module, an error it raises) is a PluginError naming `what`, and
    the policies the module registered before it failed are forgotten (so importing it again fails the same way)."""
    from specmd.cache.policies.spec import _ALIASES, _REGISTRY

    before = {kind: (dict(_REGISTRY[kind]), dict(_ALIASES[kind])) for kind in _REGISTRY}
    try:
        importlib.import_module(module)
    except Exception as exc:
        for kind, (names, aliases) in before.items():
            _REGISTRY[kind].clear()
            _REGISTRY[kind].update(names)
            _ALIASES[kind].clear()
            _ALIASES[kind].update(aliases)
        why = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ModuleNotFoundError) and exc.name and f"{module}.".startswith(f"{exc.name}."):
            why = f"no module named {exc.name!r} on the Python path (install it, or add its folder to PYTHONPATH)"
        raise PluginError(f"{what} failed to import: {why}") from exc


def load_plugin(module: str) -> None:
    """Import the policy plugin `module` (a dotted module name), registering its policies."""
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise PluginError(f"policy plugin {module!r} is not a module name (e.g. my_policies or my_package.policies)")
    _import(module, f"policy plugin {module!r}")
    if module not in _loaded:
        _loaded.append(module)


def loaded_plugins() -> tuple[str, ...]:
    """The modules `load_plugin` imported in this process, in order."""
    return tuple(_loaded)


def _describe(entry: EntryPoint) -> str:
    dist = entry.dist
    source = f", from {dist.name} {dist.version}" if dist is not None else ""
    return f"policy plugin {entry.name!r} (entry point {entry.value!r} of {ENTRY_POINT_GROUP!r}{source})"


def load_entry_points() -> None:
    """Import every module of the ``specmd.policies`` entry-point group, once per process.

    A module that fails is a PluginError naming it and its distribution (and the next call tries again).
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True  # before importing: a plugin's own lookups must not load the group again
    try:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            _import(entry.module, _describe(entry))
    except PluginError:
        _entry_points_loaded = False
        raise
