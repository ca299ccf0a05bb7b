"""Storage tiers below the cache: where every expert's full copy lives."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from tqdm.auto import tqdm

from specmd.cache.keys import ExpertKey
from specmd.quant.formats import ExpertFormat, ExpertShape

if TYPE_CHECKING:
    from specmd.quant.persist import QuantizedCopies

ExpertWeights = tuple[int, int, torch.Tensor, torch.Tensor]
"""(layer, expert, gate_up [2I, H], down [H, I]) as read from a checkpoint."""


class ExpertSource(Protocol):
    """Every routed expert of a checkpoint, read one at a time, layer by layer (an `ExpertCheckpoint`)."""

    layers: tuple[int, ...]
    num_experts: int

    def __iter__(self) -> Iterator[ExpertWeights]: ...

    def __len__(self) -> int: ...


class RamStore:
    """Every expert at every stored precision in host memory, one contiguous byte buffer per key.

    A layer's experts at one precision share one tensor [experts, bytes] (a buffer is one row), pinned
    when CUDA is present so host-to-device copies can run asynchronously. They are plain tensors held
    here, never parameters or buffers of a model.
    """

    def __init__(self, buffers: dict[ExpertKey, torch.Tensor]) -> None:
        self._buffers = buffers

    @classmethod
    def build(
        cls,
        experts: ExpertSource,
        formats: Sequence[ExpertFormat],
        shape: ExpertShape,
        *,
        pin: bool,
        progress: bool = True,
        copies: QuantizedCopies | None = None,
    ) -> RamStore:
        """Pack each expert of `experts` at each of `formats`.

        A format that `persist`s is read from `copies` when they hold it; otherwise it is packed from the
        checkpoint (quantized) and saved there. The checkpoint is not read when every format is on disk.
        """
        tables: dict[tuple[str, int], torch.Tensor] = {}  # (precision, layer) -> [experts, bytes]

        def table(fmt: ExpertFormat, layer: int, source: torch.Tensor | None = None) -> torch.Tensor:
            if source is not None and not pin:
                tables[(fmt.name, layer)] = source
            else:
                rows = torch.empty((experts.num_experts, fmt.nbytes(shape)), dtype=torch.uint8, pin_memory=pin)
                tables[(fmt.name, layer)] = rows if source is None else rows.copy_(source)
            return tables[(fmt.name, layer)]

        to_pack = []
        for fmt in formats:
            saved = copies.load(fmt) if copies is not None and fmt.persist else None
            if saved is None:
                to_pack.append(fmt)
                continue
            for layer, rows in saved.items():
                table(fmt, layer, rows)
        if to_pack:
            quantized = [fmt.name for fmt in to_pack if fmt.persist]
            what = f"quantizing experts to {', '.join(quantized)}" if quantized else "loading experts"
            rows_read = tqdm(experts, total=len(experts), desc=f"specmd: {what}", unit="expert", disable=not progress)
            for layer, expert, gate_up, down in rows_read:
                for fmt in to_pack:
                    rows = tables.get((fmt.name, layer))
                    if rows is None:
                        rows = table(fmt, layer)
                    rows[expert].copy_(fmt.pack(gate_up, down))
            if copies is not None:
                for fmt in to_pack:
                    if fmt.persist:
                        copies.save(fmt, {layer: tables[(fmt.name, layer)] for layer in experts.layers})
        buffers = {}
        for (precision, layer), rows in tables.items():
            for expert in range(experts.num_experts):
                buffers[ExpertKey(layer, expert, precision)] = rows[expert]
        return cls(buffers)

    def __getitem__(self, key: ExpertKey) -> torch.Tensor:
        return self._buffers[key]

    def __iter__(self) -> Iterator[ExpertKey]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)
