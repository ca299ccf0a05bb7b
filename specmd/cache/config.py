"""`CacheConfig`: the cache's capacity, policy mix, link and target hardware, checked when built.

Shared by live models (`OffloadOptions` extends it) and trace replay; it imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from specmd.cache.hardware import DEFAULT_HARDWARE, HardwareProfile, get_profile
from specmd.cache.layout import ExpertLayout
from specmd.cache.link import EmulatedLink
from specmd.cache.policies.spec import PolicySpec
from specmd.cache.sizes import parse_size

PROFILE = "profile"


def is_number(value: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class CacheConfig:
    """Settings of one expert cache.

    Attributes:
        cache_frac: fraction of all routed-expert bytes that fit in fast memory, 0 < f <= 1.
        cache_bytes: the same as a byte count (an int, or a size such as "3MB" or "6GiB"; kept as the int it
            stands for); give exactly one of the two.
        policy: the policy mix (`PolicySpec`, or its text / dict form).
        bandwidth_gbps: emulated host-to-device link in GB/s; None = native speed (transfers take no
            emulated time); "profile" = the hardware profile's link.
        link_latency_s: fixed emulated cost per transfer; None = the hardware profile's.
        hardware: profile whose compute peak and memory bandwidth price emulated compute time.
        predictor: where predicted router logits for prefetch come from (a live model's route predictor,
            or whose recorded predictions a replay uses); None = the default (a replay: as recorded).
    """

    cache_frac: float | None = None
    cache_bytes: int | str | None = None
    policy: PolicySpec = field(default_factory=lambda: PolicySpec.parse(None))
    bandwidth_gbps: float | str | None = None
    link_latency_s: float | None = None
    hardware: str = DEFAULT_HARDWARE
    predictor: str | None = None
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if (self.cache_frac is None) == (self.cache_bytes is None):
            raise ValueError(
                f"give exactly one of cache_frac and cache_bytes (got cache_frac={self.cache_frac!r}, "
                f"cache_bytes={self.cache_bytes!r})"
            )
        if self.cache_frac is not None and not (is_number(self.cache_frac) and 0 < self.cache_frac <= 1):
            raise ValueError(f"cache_frac must be a number with 0 < cache_frac <= 1, got {self.cache_frac!r}")
        if self.cache_bytes is not None:
            object.__setattr__(self, "cache_bytes", parse_size(self.cache_bytes, "cache_bytes"))
        object.__setattr__(self, "policy", PolicySpec.parse(self.policy))
        if not (self.bandwidth_gbps in (None, PROFILE) or (is_number(self.bandwidth_gbps) and self.bandwidth_gbps > 0)):
            raise ValueError(
                f"bandwidth_gbps must be a number > 0 (GB/s), None (native speed) or 'profile', "
                f"got {self.bandwidth_gbps!r}"
            )
        if self.link_latency_s is not None and not (is_number(self.link_latency_s) and self.link_latency_s >= 0):
            raise ValueError(f"link_latency_s must be a number >= 0 or None, got {self.link_latency_s!r}")
        get_profile(self.hardware)
        if self.predictor is not None and not (isinstance(self.predictor, str) and self.predictor):
            raise ValueError(f"predictor must be a route predictor's name or None, got {self.predictor!r}")

    @property
    def profile(self) -> HardwareProfile:
        return get_profile(self.hardware)

    def link(self) -> EmulatedLink:
        """A fresh emulated link with this config's bandwidth and latency."""
        bandwidth = self.profile.link_bandwidth_gbps if self.bandwidth_gbps == PROFILE else self.bandwidth_gbps
        latency = self.profile.link_latency_s if self.link_latency_s is None else self.link_latency_s
        return EmulatedLink(bandwidth, latency)  # type: ignore[arg-type]

    def capacity_bytes(self, layout: ExpertLayout) -> int:
        """The capacity this config gives `layout`'s experts; under one expert (the largest stored copy) is an error."""
        total, largest = layout.full_bytes, max(layout.expert_bytes.values())
        frac, nbytes = self.cache_frac, self.cache_bytes  # nbytes: an int since __post_init__
        capacity = layout.bytes_of_fraction(frac) if nbytes is None else int(nbytes)  # type: ignore[arg-type]
        if capacity < largest:
            given = (
                f"cache_bytes={self.cache_bytes}"
                if self.cache_bytes is not None
                else f"cache_frac={self.cache_frac} ({capacity} B of {total} B)"
            )
            raise ValueError(
                f"{given} holds less than one expert ({largest} B); use cache_frac >= "
                f"{largest / total:.6g} or cache_bytes >= {largest}"
            )
        return min(capacity, total)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"version": self.version, **data, "policy": self.policy.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        version = data.get("version", cls.version)
        if version != cls.version:
            raise ValueError(f"{cls.__name__} version {version} is not supported (this specmd reads {cls.version})")
        values = {k: v for k, v in data.items() if k != "version"}
        if isinstance(values.get("policy"), Mapping):
            values["policy"] = PolicySpec.from_dict(values["policy"])
        return cls(**values)
