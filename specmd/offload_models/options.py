"""`OffloadOptions`: how an offloaded model manages its experts, validated before anything loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specmd.cache.config import CacheConfig, is_number
from specmd.cache.live.store import STORAGE_TIERS
from specmd.cache.live.watchdog import DEFAULT_TIMEOUT_S
from specmd.offload_models.predictors import check_predictor
from specmd.quant import canonical_name, get_format

COMPUTE_TIMES = ("profile", "measured")


@dataclass(frozen=True)
class OffloadOptions(CacheConfig):
    """Settings of an offloaded model: its `CacheConfig` plus how experts are stored and timed.

    `storage` (a `CacheConfig` field) names the storage tier holding every expert's copies: "ram" (host memory) or
    "disk" (read from the checkpoint's files, or persisted quantized copies, on demand; `specmd.cache.live.disk`).

    Attributes (beyond `CacheConfig`'s):
        compute_time: "profile" (deterministic, from `hardware`) or "measured" (this machine's wall time).
        expert_precisions: precisions the store holds, each expert at every one; the first is the one
            requests use, the others are there for miss policies. None = the model's own dtype (lossless).
            Aliases resolve to the format's name (int4 -> nf4, int2 -> hqq2).
        shape_from: price the experts and compute as this model's in the emulation (a config.json, a checkpoint
            directory, a hub id or a bundled config's name); None = as this model's own.
        transfer_timeout_s: the longest wait on one expert's copy before it is an error naming the expert.
        progress: show a progress bar while experts load.
        draft_precision: the stored precision the draft's experts compute at (default int4 = nf4); it is stored
            beside `expert_precisions`.
    """

    compute_time: str = "profile"
    expert_precisions: tuple[str, ...] | None = None
    shape_from: str | None = None
    transfer_timeout_s: float = DEFAULT_TIMEOUT_S
    progress: bool = True
    draft_precision: str = "int4"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compute_time not in COMPUTE_TIMES:
            raise ValueError(f"compute_time must be one of {', '.join(COMPUTE_TIMES)}, got {self.compute_time!r}")
        if self.expert_precisions is not None:
            given = self.expert_precisions
            if isinstance(given, str):
                precisions: tuple = (given,)
            elif isinstance(given, list | tuple):
                precisions = tuple(given)
            else:
                raise ValueError(f"expert_precisions must be a precision name or a tuple of them, got {given!r}")
            if not precisions:
                raise ValueError("expert_precisions must name at least one precision")
            names = tuple(canonical_name(name) for name in precisions)
            for name in names:
                if names.count(name) > 1:
                    same = ", ".join(p for p, n in zip(precisions, names, strict=True) if n == name)
                    raise ValueError(f"expert_precisions={given!r} names the precision {name!r} twice ({same})")
                get_format(name).check_backend()
            object.__setattr__(self, "expert_precisions", names)
        if self.predictor is not None:
            check_predictor(self.predictor)
        if self.shape_from is not None and not (isinstance(self.shape_from, str) and self.shape_from):
            raise ValueError(f"shape_from must name a model's config, got {self.shape_from!r}")
        if not (is_number(self.transfer_timeout_s) and self.transfer_timeout_s > 0):
            raise ValueError(f"transfer_timeout_s must be a number of seconds > 0, got {self.transfer_timeout_s!r}")

    def _check_draft(self) -> None:
        super()._check_draft()
        precision = canonical_name(self.draft_precision)
        if self.has_draft:
            get_format(precision).check_backend()
        object.__setattr__(self, "draft_precision", precision)

    def storages(self) -> tuple[str, ...]:
        """The registered storage tiers (`specmd.cache.live.store.STORAGE_TIERS`)."""
        return tuple(STORAGE_TIERS)

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
