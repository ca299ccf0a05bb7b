"""`OffloadOptions`: how an offloaded model manages its experts, validated before anything loads."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from specmd.cache.policies.spec import PolicySpec
from specmd.quant.formats import get_format
from specmd.sim.hardware import DEFAULT_HARDWARE, get_profile

STORAGES = ("ram",)
COMPUTE_TIMES = ("profile", "measured")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class OffloadOptions:
    """Settings of an offloaded model's expert cache.

    Attributes:
        cache_frac: fraction of all routed-expert bytes that fit in fast memory, 0 < f <= 1.
        cache_bytes: the same as a byte count; give exactly one of the two.
        policy: the policy mix (`PolicySpec`, or its text / dict form).
        bandwidth_gbps: emulated host-to-device link in GB/s; None = native speed, no emulation.
        link_latency_s: fixed emulated cost per transfer; None = the hardware profile's.
        hardware: profile whose compute peak and memory bandwidth price emulated compute time.
        compute_time: "profile" (deterministic, from `hardware`) or "measured" (this machine's wall time).
        expert_precisions: precisions the store holds, first = the one requests use; None = the model's dtype.
        storage: where full expert copies live ("ram").
        progress: show a progress bar while experts load.
    """

    cache_frac: float | None = None
    cache_bytes: int | None = None
    policy: PolicySpec = field(default_factory=lambda: PolicySpec.parse(None))
    bandwidth_gbps: float | None = None
    link_latency_s: float | None = None
    hardware: str = DEFAULT_HARDWARE
    compute_time: str = "profile"
    expert_precisions: tuple[str, ...] | None = None
    storage: str = "ram"
    progress: bool = True
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if (self.cache_frac is None) == (self.cache_bytes is None):
            raise ValueError(
                f"give exactly one of cache_frac and cache_bytes (got cache_frac={self.cache_frac!r}, "
                f"cache_bytes={self.cache_bytes!r})"
            )
        if self.cache_frac is not None and not (_is_number(self.cache_frac) and 0 < self.cache_frac <= 1):
            raise ValueError(f"cache_frac must be a number with 0 < cache_frac <= 1, got {self.cache_frac!r}")
        if self.cache_bytes is not None and not (
            isinstance(self.cache_bytes, int) and not isinstance(self.cache_bytes, bool) and self.cache_bytes > 0
        ):
            raise ValueError(f"cache_bytes must be a positive integer, got {self.cache_bytes!r}")
        object.__setattr__(self, "policy", PolicySpec.parse(self.policy))
        if self.bandwidth_gbps is not None and not (_is_number(self.bandwidth_gbps) and self.bandwidth_gbps > 0):
            raise ValueError(f"bandwidth_gbps must be a number > 0 (GB/s) or None, got {self.bandwidth_gbps!r}")
        if self.link_latency_s is not None and not (_is_number(self.link_latency_s) and self.link_latency_s >= 0):
            raise ValueError(f"link_latency_s must be a number >= 0 or None, got {self.link_latency_s!r}")
        get_profile(self.hardware)
        if self.compute_time not in COMPUTE_TIMES:
            raise ValueError(f"compute_time must be one of {', '.join(COMPUTE_TIMES)}, got {self.compute_time!r}")
        if self.expert_precisions is not None:
            precisions = (
                (self.expert_precisions,) if isinstance(self.expert_precisions, str) else self.expert_precisions
            )
            precisions = tuple(precisions)
            if not precisions:
                raise ValueError("expert_precisions must name at least one precision")
            for name in precisions:
                get_format(name)
            object.__setattr__(self, "expert_precisions", precisions)
        if self.storage not in STORAGES:
            raise ValueError(f"storage {self.storage!r} is not available; available: {', '.join(STORAGES)}")

    def capacity_bytes(self, total_bytes: int, expert_bytes: int) -> int:
        """The cache capacity for a model whose routed experts take `total_bytes`, one `expert_bytes`."""
        capacity = self.cache_bytes if self.cache_bytes is not None else int(self.cache_frac * total_bytes)
        if capacity < expert_bytes:
            given = (
                f"cache_bytes={self.cache_bytes}"
                if self.cache_bytes is not None
                else f"cache_frac={self.cache_frac} ({capacity} B of {total_bytes} B)"
            )
            raise ValueError(
                f"{given} holds less than one expert ({expert_bytes} B); use cache_frac >= "
                f"{expert_bytes / total_bytes:.6g} or cache_bytes >= {expert_bytes}"
            )
        return min(capacity, total_bytes)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["policy"] = self.policy.to_dict()
        data["expert_precisions"] = None if self.expert_precisions is None else list(self.expert_precisions)
        return {"version": self.version, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OffloadOptions:
        version = data.get("version", cls.version)
        if version != cls.version:
            raise ValueError(f"offload options version {version} is not supported (this specmd reads {cls.version})")
        values = {k: v for k, v in data.items() if k != "version"}
        if isinstance(values.get("policy"), Mapping):
            values["policy"] = PolicySpec.from_dict(values["policy"])
        if values.get("expert_precisions") is not None:
            values["expert_precisions"] = tuple(values["expert_precisions"])
        return cls(**values)
