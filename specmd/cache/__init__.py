"""The expert cache: engine (keys and bytes), manager (the per-layer algorithm), clock, link and metrics."""

from specmd.cache.clock import ModelShape, PassInfo, RooflineCompute
from specmd.cache.engine import ExpertCache
from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.link import EmulatedLink
from specmd.cache.manager import CacheManager
from specmd.cache.stats import CacheStats

__all__ = [
    "CacheManager",
    "CacheStats",
    "EmulatedLink",
    "ExpertCache",
    "ExpertKey",
    "ModelShape",
    "PassInfo",
    "RooflineCompute",
    "Tick",
]
