"""`OffloadOptions`: how an offloaded model manages its experts, validated before anything loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specmd.cache.config import CacheConfig, is_number
from specmd.cache.layout import ExpertLayout
from specmd.cache.live.store import STORAGE_TIERS
from specmd.cache.live.watchdog import DEFAULT_TIMEOUT_S
from specmd.cache.sizes import parse_size
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
        draft_frac: the self-draft's fast memory for speculative decoding, as a fraction of every routed expert
            stored at `draft_precision`, 0 < f <= 1; None (and no `draft_bytes`) = no draft.
        draft_bytes: the same as a byte count or size ("300MB"); give at most one of the two.
        draft_precision: the stored precision the draft's experts compute at (default int4 = nf4); it is stored
            beside `expert_precisions`.
    """

    compute_time: str = "profile"
    expert_precisions: tuple[str, ...] | None = None
    shape_from: str | None = None
    transfer_timeout_s: float = DEFAULT_TIMEOUT_S
    progress: bool = True
    draft_frac: float | None = None
    draft_bytes: int | str | None = None
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
        self._check_draft()

    def _check_draft(self) -> None:
        if self.draft_frac is not None and self.draft_bytes is not None:
            raise ValueError(
                f"give at most one of draft_frac and draft_bytes (got draft_frac={self.draft_frac!r}, "
                f"draft_bytes={self.draft_bytes!r})"
            )
        if self.draft_frac is not None and not (is_number(self.draft_frac) and 0 < self.draft_frac <= 1):
            raise ValueError(f"draft_frac must be a number with 0 < draft_frac <= 1, got {self.draft_frac!r}")
        if self.draft_bytes is not None:
            object.__setattr__(self, "draft_bytes", parse_size(self.draft_bytes, "draft_bytes"))
        precision = canonical_name(self.draft_precision)
        if self.has_draft:
            get_format(precision).check_backend()
        object.__setattr__(self, "draft_precision", precision)

    @property
    def has_draft(self) -> bool:
        """Whether the model gets a self-draft for speculative decoding."""
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
