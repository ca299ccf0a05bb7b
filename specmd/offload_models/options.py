"""`OffloadOptions`: how an offloaded model manages its experts, validated before anything loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specmd.cache.config import CacheConfig
from specmd.quant.formats import get_format

STORAGES = ("ram",)
COMPUTE_TIMES = ("profile", "measured")


@dataclass(frozen=True)
class OffloadOptions(CacheConfig):
    """Settings of an offloaded model: its `CacheConfig` plus how experts are stored and timed.

    Attributes (beyond `CacheConfig`'s):
        compute_time: "profile" (deterministic, from `hardware`) or "measured" (this machine's wall time).
        expert_precisions: precisions the store holds, first = the one requests use; None = the model's dtype.
        storage: where full expert copies live ("ram").
        progress: show a progress bar while experts load.
    """

    compute_time: str = "profile"
    expert_precisions: tuple[str, ...] | None = None
    storage: str = "ram"
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compute_time not in COMPUTE_TIMES:
            raise ValueError(f"compute_time must be one of {', '.join(COMPUTE_TIMES)}, got {self.compute_time!r}")
        if self.expert_precisions is not None:
            given = self.expert_precisions
            precisions = (given,) if isinstance(given, str) else tuple(given)
            if not precisions:
                raise ValueError("expert_precisions must name at least one precision")
            for name in precisions:
                get_format(name)
            object.__setattr__(self, "expert_precisions", precisions)
        if self.storage not in STORAGES:
            raise ValueError(f"storage {self.storage!r} is not available; available: {', '.join(STORAGES)}")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["expert_precisions"] = None if self.expert_precisions is None else list(self.expert_precisions)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> OffloadOptions:
        values = dict(data)
        if values.get("expert_precisions") is not None:
            values["expert_precisions"] = tuple(values["expert_precisions"])
        return super().from_dict(values)
