"""Precision names: the one table of names and aliases every part of specmd resolves through.

It imports no torch, so a policy mix naming precisions is checked (and its aliases resolved) wherever
it is parsed, trace replay included. The formats themselves (`specmd.quant.formats`) register under
these names; a format added by a user declares its name here when it registers.
"""

from __future__ import annotations

_NAMES: dict[str, None] = dict.fromkeys(("bf16", "fp16", "fp32", "int8", "nf4", "fp4", "hqq8", "hqq4", "hqq3", "hqq2"))
_ALIASES: dict[str, str] = {"int4": "nf4", "int2": "hqq2"}


def declare(name: str, aliases: tuple[str, ...] = ()) -> None:
    """Make `name` (and `aliases`, standing for it) a precision name; declaring a known name again is a no-op."""
    for alias in aliases:
        if _ALIASES.get(alias, name) != name or alias in _NAMES:
            raise ValueError(f"precision alias {alias!r} already stands for {_ALIASES.get(alias, alias)!r}")
    if name in _ALIASES:
        raise ValueError(f"precision {name!r} is already an alias of {_ALIASES[name]!r}")
    _NAMES.setdefault(name)
    _ALIASES.update(dict.fromkeys(aliases, name))


def available_names() -> str:
    """Every precision name, aliases in brackets after the name they stand for."""
    listed = []
    for name in _NAMES:
        aliases = [alias for alias, target in _ALIASES.items() if target == name]
        listed.append(f"{name} ({', '.join(aliases)})" if aliases else name)
    return ", ".join(listed)


def canonical_precision(name: object) -> str:
    """The precision `name` stands for (an alias resolves to its name); anything else is a ValueError."""
    if isinstance(name, str):
        if name in _NAMES:
            return name
        if name in _ALIASES:
            return _ALIASES[name]
    raise ValueError(f"unknown precision {name!r}; available: {available_names()}")
