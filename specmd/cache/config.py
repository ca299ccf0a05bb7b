"""`CacheConfig`: the cache's capacity, policy mix, link and target hardware, checked when built.

Shared by live models (`OffloadOptions` extends it) and trace replay; it imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeGuard

from specmd.cache.hardware import DEFAULT_HARDWARE, HardwareProfile, get_disk, get_profile
from specmd.cache.layout import ExpertLayout
from specmd.cache.link import EmulatedLink
from specmd.cache.policies.spec import PolicyChoice, PolicySpec
from specmd.cache.sizes import parse_size

PROFILE = "profile"
STORAGES = ("ram", "disk")
"""The storage tiers a replay knows. The emulation reads each fetched expert over the disk link first with "disk",
and prices any other tier (a live model's registered ones too) as RAM."""


def is_number(value: object) -> TypeGuard[float]:
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
        storage: where every expert's full copy lives: "ram", or "disk" (a fetch reads it over the disk link).
        host_cache_frac: with storage "disk", a host-RAM tier between the disk and the cache holding this fraction
            of all routed-expert bytes (0 < f <= 1); None (and no `host_cache_bytes`) = no such tier.
        host_cache_bytes: the same as a byte count or a size such as "16GB"; give at most one of the two.
        host_eviction: the host tier's eviction policy (a registered name, 'name:k=v', or an object; LRU by
            default); it sees keys, sizes and the clock only, so it must not need routing or the future.
        disk: the drive a disk-tier fetch reads from: a `specmd.cache.hardware.DISKS` name, "profile" (the
            hardware profile's drive) or None (native speed: disk reads take no emulated time).
        draft_frac: the self-draft's fast memory for speculative decoding (a live model's draft, or a replay of a
            lookahead trace), as a fraction of every routed expert stored at the draft's precision, 0 < f <= 1;
            None (and no `draft_bytes`) = no draft.
        draft_bytes: the same as a byte count or size ("300MB"); give at most one of the two.
    """

    cache_frac: float | None = None
    cache_bytes: int | str | None = None
    policy: PolicySpec = field(default_factory=lambda: PolicySpec.parse(None))
    bandwidth_gbps: float | str | None = None
    link_latency_s: float | None = None
    hardware: str = DEFAULT_HARDWARE
    predictor: str | None = None
    storage: str = "ram"
    host_cache_frac: float | None = None
    host_cache_bytes: int | str | None = None
    host_eviction: PolicyChoice | str = "lru"
    disk: str | None = None
    draft_frac: float | None = None
    draft_bytes: int | str | None = None
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self._check_size("cache", required=True)
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
        self._check_lower_tiers()
        self._check_draft()

    def _check_size(self, prefix: str, required: bool = False) -> None:
        """Check the pair `{prefix}_frac` / `{prefix}_bytes` (exactly one given when `required`, else at most one)
        and turn a size given as text into its byte count."""
        frac_name, bytes_name = f"{prefix}_frac", f"{prefix}_bytes"
        frac, nbytes = getattr(self, frac_name), getattr(self, bytes_name)
        if (frac is not None and nbytes is not None) or (required and frac is None and nbytes is None):
            raise ValueError(
                f"give {'exactly' if required else 'at most'} one of {frac_name} and {bytes_name} (got "
                f"{frac_name}={frac!r}, {bytes_name}={nbytes!r})"
            )
        if frac is not None and not (is_number(frac) and 0 < frac <= 1):
            raise ValueError(f"{frac_name} must be a number with 0 < {frac_name} <= 1, got {frac!r}")
        if nbytes is not None:
            object.__setattr__(self, bytes_name, parse_size(nbytes, bytes_name))

    def _check_draft(self) -> None:
        self._check_size("draft")

    def _check_lower_tiers(self) -> None:
        """Check storage, the host tier and the disk; turn the host cache's size and policy into their types."""
        storages = self.storages()
        if self.storage not in storages:
            raise ValueError(f"storage {self.storage!r} is not available; available: {', '.join(storages)}")
        self._check_size("host_cache")
        if self.has_host_tier and self.storage != "disk":
            raise ValueError(
                "host_cache_frac and host_cache_bytes size a host-RAM tier between the disk and the cache: they need "
                f"storage='disk' (got storage={self.storage!r}, where every expert is in RAM already)"
            )
        choice = PolicyChoice.parse("eviction", self.host_eviction)
        policy = choice.build("eviction")
        if policy.needs_routing or getattr(policy, "needs_future", False):
            raise ValueError(
                f"host_eviction {choice.name!r} reads routing or the future, which the host tier does not see "
                "(it sees keys, sizes and the clock); use e.g. 'lru', 'lfu' or 'fld'"
            )
        object.__setattr__(self, "host_eviction", choice)
        if self.disk not in (None, PROFILE):
            get_disk(self.disk)  # type: ignore[arg-type]

    def storages(self) -> tuple[str, ...]:
        """The storage tiers `storage` may name (a live model's: those registered)."""
        return STORAGES

    @property
    def has_host_tier(self) -> bool:
        """Whether a host-RAM tier sits between the disk and the cache."""
        return self.host_cache_frac is not None or self.host_cache_bytes is not None

    @property
    def has_draft(self) -> bool:
        """Whether there is a self-draft for speculative decoding."""
        return self.draft_frac is not None or self.draft_bytes is not None

    def draft_capacity_bytes(self, layout: ExpertLayout) -> int:
        """The draft's capacity for `layout` (its experts at the draft precision); under one expert is an error."""
        one = layout.expert_bytes[layout.precision]
        total = layout.routed_experts * one
        capacity = int(self.draft_frac * total) if self.draft_frac is not None else int(self.draft_bytes)  # type: ignore[arg-type]
        if capacity < one:
            raise ValueError(
                f"the draft's budget ({capacity} B) holds less than one {layout.precision} expert ({one} B); "
                f"use draft_frac >= {one / total:.6g} or draft_bytes >= {one}"
            )
        return min(capacity, total)

    @property
    def profile(self) -> HardwareProfile:
        return get_profile(self.hardware)

    def link(self) -> EmulatedLink:
        """A fresh emulated link with this config's bandwidth and latency."""
        bandwidth = self.profile.link_bandwidth_gbps if self.bandwidth_gbps == PROFILE else self.bandwidth_gbps
        latency = self.profile.link_latency_s if self.link_latency_s is None else self.link_latency_s
        return EmulatedLink(bandwidth, latency)  # type: ignore[arg-type]

    def disk_link(self) -> EmulatedLink | None:
        """A fresh emulated disk-to-host link (with storage "disk"; None otherwise)."""
        if self.storage != "disk":
            return None
        if self.disk is None:
            return EmulatedLink(None)
        disk = get_disk(self.profile.disk if self.disk == PROFILE else self.disk)
        return EmulatedLink(disk.read_bandwidth_gbps, disk.read_latency_s)

    def capacity_bytes(self, layout: ExpertLayout) -> int:
        """The capacity this config gives `layout`'s experts; under one expert (the largest stored copy) is an error."""
        return _capacity(layout, self.cache_frac, self.cache_bytes, "cache")  # type: ignore[arg-type]

    def host_capacity_bytes(self, layout: ExpertLayout) -> int | None:
        """The host tier's capacity for `layout`'s experts (None: no host tier); under one expert is an error."""
        if not self.has_host_tier:
            return None
        return _capacity(layout, self.host_cache_frac, self.host_cache_bytes, "host_cache")  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        eviction: PolicyChoice = self.host_eviction  # type: ignore[assignment]
        host_eviction = {"name": eviction.name, "params": dict(eviction.params)}
        return {"version": self.version, **data, "policy": self.policy.to_dict(), "host_eviction": host_eviction}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        version = data.get("version", cls.version)
        if version != cls.version:
            raise ValueError(f"{cls.__name__} version {version} is not supported (this specmd reads {cls.version})")
        values = {k: v for k, v in data.items() if k != "version"}
        if isinstance(values.get("policy"), Mapping):
            values["policy"] = PolicySpec.from_dict(values["policy"])
        return cls(**values)


def _capacity(layout: ExpertLayout, frac: float | None, nbytes: int | None, prefix: str) -> int:
    """Bytes of `layout`'s experts a tier sized by `{prefix}_frac` or `{prefix}_bytes` holds (at most all of them)."""
    total, largest = layout.full_bytes, max(layout.expert_bytes.values())
    capacity = layout.bytes_of_fraction(frac) if nbytes is None else int(nbytes)  # type: ignore[arg-type]
    if capacity < largest:
        given = (
            f"{prefix}_bytes={nbytes}" if nbytes is not None else f"{prefix}_frac={frac} ({capacity} B of {total} B)"
        )
        raise ValueError(
            f"{given} holds less than one expert ({largest} B); use {prefix}_frac >= "
            f"{largest / total:.6g} or {prefix}_bytes >= {largest}"
        )
    return min(capacity, total)
