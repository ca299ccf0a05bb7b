"""Storage tiers below the cache: where every expert's full copy lives."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from specmd.cache.keys import ExpertKey
from specmd.quant.formats import ExpertFormat

ExpertWeights = tuple[int, int, torch.Tensor, torch.Tensor]
"""(layer, expert, gate_up [2I, H], down [H, I]) as read from a checkpoint."""


class RamStore:
    """Every expert at every stored precision in host memory, one contiguous byte buffer per key.

    Buffers are pinned when CUDA is present, so host-to-device copies can run asynchronously.
    They are plain tensors held here, never parameters or buffers of a model.
    """

    def __init__(self, buffers: dict[ExpertKey, torch.Tensor]) -> None:
        self._buffers = buffers

    @classmethod
    def build(
        cls,
        experts: Iterable[ExpertWeights],
        formats: Sequence[ExpertFormat],
        *,
        pin: bool,
        total: int | None = None,
        progress: bool = True,
    ) -> RamStore:
        """Pack each expert read from `experts` at each of `formats`."""
        buffers: dict[ExpertKey, torch.Tensor] = {}
        rows = tqdm(experts, total=total, desc="specmd: loading experts", unit="expert", disable=not progress)
        for layer, expert, gate_up, down in rows:
            for fmt in formats:
                packed = fmt.pack(gate_up, down)
                if pin:
                    pinned = torch.empty(packed.numel(), dtype=torch.uint8, pin_memory=True)
                    packed = pinned.copy_(packed)
                buffers[ExpertKey(layer, expert, fmt.name)] = packed
        return cls(buffers)

    def __getitem__(self, key: ExpertKey) -> torch.Tensor:
        return self._buffers[key]

    def __iter__(self) -> Iterator[ExpertKey]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)
