"""Policy names: the registry, and `PolicySpec`, a policy mix written as text, a dict or objects.

A mix is written in the paper's Table 1 order, ``prefetch/eviction/miss/routing``, e.g.
``"topk:overfetch=1.5/least-stale/fetch/standard"``; parameters follow a part's name after ``:``.
"""

from __future__ import annotations

import ast
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from specmd.cache.policies.base import EvictionPolicy, MissPolicy, PrefetchPolicy, RoutingPolicy
from specmd.cache.policies.plugins import load_entry_points
from specmd.quant.names import canonical_precision

KINDS = ("prefetch", "eviction", "miss", "routing")
_BASES: dict[str, type] = {
    "prefetch": PrefetchPolicy,
    "eviction": EvictionPolicy,
    "miss": MissPolicy,
    "routing": RoutingPolicy,
}
_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
_ALIASES: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}

DEFAULT_POLICY = "topk/least-stale/fetch/standard"

# Named mixes: the SpecMD paper's Table 1 configurations (notes/specmd-paper.md), each also under the name of
# the system it stands for (Table 2's baselines).
NAMED_MIXES: dict[str, tuple[str, str]] = {
    "config1": (
        "topk/lru/fetch/standard",
        "Table 1 config 1 (Eliseev & Mazur 2023, mixtral-offloading): next-layer top-k prefetch, LRU, fetch",
    ),
    "config2": (
        "score/score/substitute/standard",
        "Table 1 config 2 (Zhu et al. 2025): score prefetch, score-based eviction, substitute on a miss",
    ),
    "config3": (
        "lookahead/lhu/cascade/standard",
        "Table 1 config 3 (HOBBIT, Tang et al. 2024): multi-layer prefetch, LHU, precision cascade",
    ),
    "config4": (
        "none/lru/fetch/cache-aware",
        "Table 1 config 4 (MixtureCache, Skliar et al. 2025): no prefetch, LRU, cache-aware routing",
    ),
    "config5": ("score/least-stale/fetch/standard", "Table 1 config 5 (SpecMD): score prefetch, Least-Stale, fetch"),
}
SYSTEM_NAMES = {"eliseev23": "config1", "zhu25": "config2", "hobbit24": "config3", "mixturecache25": "config4"}
LEAST_STALE_SUFFIX = "+ls"


def named_mix(name: str) -> str | None:
    """The mix a configuration name stands for ('config5', 'hobbit24+ls', ...), or None."""
    base = name.strip().lower()
    least_stale = base.endswith(LEAST_STALE_SUFFIX)
    if least_stale:
        base = base[: -len(LEAST_STALE_SUFFIX)]
    base = SYSTEM_NAMES.get(base, base)
    if base not in NAMED_MIXES:
        return None
    mix = NAMED_MIXES[base][0]
    if least_stale:
        prefetch, _, miss, routing = mix.split("/")
        mix = f"{prefetch}/least-stale/{miss}/{routing}"
    return mix


T = TypeVar("T", bound=type)


def register(kind: str, name: str, *aliases: str) -> Callable[[T], T]:
    """Class decorator: make a policy class available under `name` (and `aliases`) for its kind."""

    def decorate(cls: T) -> T:
        if not issubclass(cls, _BASES[kind]):
            raise TypeError(f"{cls.__name__} must subclass {_BASES[kind].__name__} to be a {kind} policy")
        for label in (name, *aliases):
            if label in _REGISTRY[kind] or label in _ALIASES[kind]:
                raise ValueError(f"{kind} policy name {label!r} is already registered")
        _REGISTRY[kind][name] = cls
        for alias in aliases:
            _ALIASES[kind][alias] = name
        return cls

    return decorate


def register_prefetch(name: str, *aliases: str) -> Callable[[T], T]:
    return register("prefetch", name, *aliases)


def register_eviction(name: str, *aliases: str) -> Callable[[T], T]:
    return register("eviction", name, *aliases)


def register_miss(name: str, *aliases: str) -> Callable[[T], T]:
    return register("miss", name, *aliases)


def register_routing(name: str, *aliases: str) -> Callable[[T], T]:
    return register("routing", name, *aliases)


def names(kind: str) -> list[str]:
    """Registered names of `kind`, each with its aliases in brackets (as error messages list them)."""
    listed = []
    for name in _REGISTRY[kind]:
        aliases = [a for a, target in _ALIASES[kind].items() if target == name]
        listed.append(f"{name} ({', '.join(aliases)})" if aliases else name)
    return listed


def _docstring(cls: type) -> str:
    """`cls`'s docstring; a class compiled with mypyc keeps none, so its module's source file gives it."""
    doc = inspect.getdoc(cls)
    if doc:
        return doc
    compiled = Path(getattr(sys.modules.get(cls.__module__), "__file__", None) or "")
    try:  # miss.cpython-311-x86_64-linux-gnu.so was built from miss.py, beside it
        tree = ast.parse(compiled.with_name(compiled.name.split(".")[0] + ".py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return ""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return ast.get_docstring(node) or ""
    return ""


def description(cls: type) -> str:
    """The first paragraph of `cls`'s docstring, as one line."""
    paragraph = _docstring(cls).split("\n\n")[0]
    return " ".join(paragraph.split())


def parameters(kind: str, name: str) -> dict[str, Any]:
    """The parameters of the `kind` policy `name` (or an alias) with their defaults (`inspect.Parameter.empty`
    for one without)."""
    cls = _REGISTRY[kind][canonical_name(kind, name)]
    return {p.name: p.default for p in inspect.signature(cls).parameters.values() if p.name != "self"}


def catalog() -> list[tuple[str, str, tuple[str, ...], str]]:
    """(kind, name, aliases, description) of every registered policy (plugins' included: the entry-point group is
    loaded first) and named configuration; a policy's description is its docstring's first paragraph."""
    load_entry_points()
    rows = []
    for kind in KINDS:
        for name, cls in _REGISTRY[kind].items():
            aliases = tuple(a for a, target in _ALIASES[kind].items() if target == name)
            rows.append((kind, name, aliases, description(cls)))
    for name, (mix, text) in NAMED_MIXES.items():
        systems = [system for system, config in SYSTEM_NAMES.items() if config == name]
        listed = tuple(label + suffix for label in (name, *systems) for suffix in ("", LEAST_STALE_SUFFIX))[1:]
        rows.append(("config", name, listed, f"{mix}: {text}"))
    return rows


def configuration_names(mix: str) -> list[str]:
    """The configuration names that stand for the mix `mix` (as `str(PolicySpec)` writes it), e.g. config3 and
    hobbit24 for 'lookahead/lhu/cascade/standard'."""
    labels = [*NAMED_MIXES, *SYSTEM_NAMES]
    labels += [label + LEAST_STALE_SUFFIX for label in labels]
    return [label for label in labels if str(PolicySpec.parse(label)) == mix]


def canonical_name(kind: str, name: str) -> str:
    """Resolve an alias; a name that is not registered is a ValueError listing the valid ones.

    A name not found loads the plugins of the ``specmd.policies`` entry-point group (once), then looks again.
    """
    if kind not in _REGISTRY:
        raise ValueError(f"unknown policy kind {kind!r}; the kinds are {', '.join(KINDS)}")
    if not isinstance(name, str):
        raise ValueError(f"a {kind} policy name must be a string, got {name!r}")
    key = name.strip().lower()
    if key not in _REGISTRY[kind] and key not in _ALIASES[kind]:
        load_entry_points()  # perhaps a plugin's policy
    if key in _REGISTRY[kind]:
        return key
    if key in _ALIASES[kind]:
        return _ALIASES[kind][key]
    raise ValueError(f"unknown {kind} policy {name!r}; valid {kind} policies: {', '.join(names(kind))}")


def _precisions(value: Any, where: str) -> tuple[str, ...]:
    """A precision parameter's names with aliases resolved (one name stands for a list of one)."""
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not names:
        raise ValueError(f"{where} must be a precision name or a list of them, got {value!r}")
    try:
        return tuple(canonical_precision(name) for name in names)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def create(kind: str, name: str, params: Mapping[str, Any] | None = None) -> Any:
    """A new policy object of `kind` registered as `name`, built with `params`.

    Parameters a policy class lists in `precision_params` name precisions: their aliases (int4, int2) are
    resolved here, so policies compare names as the store holds them.
    """
    cls = _REGISTRY[kind][canonical_name(kind, name)]
    params = dict(params or {})
    allowed = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(map(str, set(params) - set(allowed)))
    if unknown:
        raise ValueError(
            f"{kind} policy {name!r} has no parameter {unknown[0]!r}; "
            f"its parameters: {', '.join(allowed) if allowed else 'none'}"
        )
    for param in getattr(cls, "precision_params", ()):
        if param in params:
            params[param] = _precisions(params[param], f"{kind} policy {name!r} parameter {param!r}")
    return cls(**params)


def _split_arguments(text: str) -> list[str]:
    """Split 'a=1,b=(0.3,0.2)' on the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


_CLOSING = {"(": ")", "[": "]"}
_MAX_DEPTH = 16  # brackets within brackets a parameter value may hold


def _depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        deepest = max(deepest, depth)
    return deepest


def _literal(text: str) -> Any:
    """A parameter value: a Python literal, a bracketed list of values (bare names allowed), else the text."""
    if _depth(text) > _MAX_DEPTH:
        raise ValueError(f"policy parameter value {text[:40]!r}... nests brackets more than {_MAX_DEPTH} deep")
    try:
        with warnings.catch_warnings():  # text like "1abc" is not a literal, and not worth a SyntaxWarning
            warnings.simplefilter("ignore", SyntaxWarning)
            return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # not a literal (or a hostile one)
        if len(text) >= 2 and _CLOSING.get(text[0]) == text[-1]:
            return tuple(_literal(item.strip()) for item in _split_arguments(text[1:-1]) if item.strip())
        return text


def _is_params(value: object) -> bool:
    return isinstance(value, Mapping) and all(isinstance(key, str) for key in value)


@dataclass(frozen=True)
class PolicyChoice:
    """One part of a mix: a registered name with parameters, or a ready policy object."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    instance: Any = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params)

    @classmethod
    def parse(cls, kind: str, value: Any) -> PolicyChoice:
        """Read a part given as 'name', 'name:k=v,...', (name, params), {'name', 'params'}, an object, or a
        `PolicyChoice` already read (returned as it is)."""
        if isinstance(value, PolicyChoice):
            return value
        if isinstance(value, _BASES[kind]):
            label = next((n for n, c in _REGISTRY[kind].items() if c is type(value)), type(value).__name__)
            return cls(name=label, instance=value)
        if isinstance(value, str):
            name, _, arg_text = value.partition(":")
            params: dict[str, Any] = {}
            for item in filter(None, (a.strip() for a in _split_arguments(arg_text))):
                key, eq, raw = item.partition("=")
                if not eq:
                    raise ValueError(f"{kind} policy parameter {item!r} must look like name=value")
                params[key.strip()] = _literal(raw.strip())
        elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and _is_params(value[1]):
            name, params = value[0], dict(value[1])
        elif isinstance(value, Mapping) and "name" in value and _is_params(value.get("params") or {}):
            name, params = value["name"], dict(value.get("params") or {})
        else:
            raise ValueError(
                f"{kind} policy {value!r} is not a name, 'name:k=v', (name, params), "
                f"{{'name': ..., 'params': ...}} or a {_BASES[kind].__name__} object"
            )
        choice = cls(name=canonical_name(kind, name), params=tuple(sorted(params.items())))
        create(kind, choice.name, params)  # fail now, before any model loads, on bad parameters
        return choice

    def build(self, kind: str) -> Any:
        return self.instance if self.instance is not None else create(kind, self.name, dict(self.params))


@dataclass(frozen=True)
class Policies:
    """Live policy objects for one cache."""

    prefetch: PrefetchPolicy
    eviction: EvictionPolicy
    miss: MissPolicy
    routing: RoutingPolicy


@dataclass(frozen=True)
class PolicySpec:
    """A full policy mix: which prefetch, eviction, miss and routing policy, with parameters.

    Attributes:
        prefetch: what to load ahead of a layer (`specmd policies` lists the names).
        eviction: which resident expert leaves when room is needed.
        miss: what a miss does (fetch, and later lower precisions, drop, substitute).
        routing: whether routing may lean toward resident experts.
    """

    prefetch: PolicyChoice
    eviction: PolicyChoice
    miss: PolicyChoice
    routing: PolicyChoice
    version: ClassVar[int] = 1

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | PolicySpec | None) -> PolicySpec:
        """Read a mix from 'prefetch/eviction/miss/routing', a dict of parts, or a PolicySpec."""
        if isinstance(value, PolicySpec):
            return value
        if value is None:
            value = DEFAULT_POLICY
        if isinstance(value, str):
            value = named_mix(value) or value
            parts = value.split("/")
            if len(parts) != len(KINDS):
                names = ", ".join([*NAMED_MIXES, *SYSTEM_NAMES])
                raise ValueError(
                    f"policy {value!r} must have {len(KINDS)} parts, 'prefetch/eviction/miss/routing' "
                    f"(e.g. {DEFAULT_POLICY!r}), or name a configuration: {names} (each also with '+ls')"
                )
            given: Mapping[str, Any] = dict(zip(KINDS, parts, strict=True))
        elif isinstance(value, Mapping):
            unknown = sorted(map(str, set(value) - set(KINDS)))
            if unknown:
                raise ValueError(f"policy dict has unknown part {unknown[0]!r}; the parts are {', '.join(KINDS)}")
            given = value
        else:
            raise ValueError(f"policy must be a 'prefetch/eviction/miss/routing' string or a dict, got {value!r}")
        defaults = dict(zip(KINDS, DEFAULT_POLICY.split("/"), strict=True))
        return cls(**{kind: PolicyChoice.parse(kind, given.get(kind, defaults[kind])) for kind in KINDS})

    def __str__(self) -> str:
        return "/".join(str(getattr(self, kind)) for kind in KINDS)

    def build(self) -> Policies:
        """New policy objects (policy objects passed in are used as they are: one cache each)."""
        return Policies(**{kind: getattr(self, kind).build(kind) for kind in KINDS})

    def to_dict(self) -> dict[str, Any]:
        parts = {kind: {"name": getattr(self, kind).name, "params": dict(getattr(self, kind).params)} for kind in KINDS}
        return {"version": self.version, **parts}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicySpec:
        version = data.get("version", cls.version)
        if version != cls.version:
            raise ValueError(f"policy spec version {version} is not supported (this specmd reads {cls.version})")
        return cls.parse({kind: data[kind] for kind in KINDS if kind in data})
