"""Cache policies, chosen by registered name (see `specmd policies`)."""

from specmd.cache.policies import eviction, miss, prefetch, routing  # noqa: F401  (registers the policies)
from specmd.cache.policies.base import (
    EvictionPolicy,
    Fetch,
    MissPolicy,
    PrefetchPolicy,
    RoutePrediction,
    RoutingPolicy,
)
from specmd.cache.policies.plugins import PluginError, load_plugin
from specmd.cache.policies.spec import (
    DEFAULT_POLICY,
    Policies,
    PolicyChoice,
    PolicySpec,
    catalog,
    register_eviction,
    register_miss,
    register_prefetch,
    register_routing,
)

__all__ = [
    "DEFAULT_POLICY",
    "EvictionPolicy",
    "Fetch",
    "MissPolicy",
    "PluginError",
    "Policies",
    "PolicyChoice",
    "PolicySpec",
    "PrefetchPolicy",
    "RoutePrediction",
    "RoutingPolicy",
    "catalog",
    "load_plugin",
    "register_eviction",
    "register_miss",
    "register_prefetch",
    "register_routing",
]
