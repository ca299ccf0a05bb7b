"""Storage tiers below the cache: where every expert's copy at each stored precision lives.

A tier is an `ExpertStore`: it reads one expert at one precision into a destination buffer (through the
copier that moves bytes to the cache's device), says how many bytes that copy has, and closes. Tiers
are chosen by name (`STORAGE_TIERS`); a new tier is a new class registered there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from tqdm.auto import tqdm

from specmd.cache.keys import ExpertKey
from specmd.cache.live.copiers import Completion, Copier
from specmd.cache.live.disk import DiskStore
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


class ExpertStore(Protocol):
    """What a storage tier offers the cache's live side. A tier may also say how many experts it reads at once
    usefully (`readers`, default 1): a model starts that many transfer threads."""

    def nbytes(self, key: ExpertKey) -> int:
        """Bytes of the copy `key` (its expert at its precision)."""
        ...

    def read_into(self, key: ExpertKey, dst: torch.Tensor, copier: Copier) -> Completion:
        """Issue the read of copy `key` into `dst` (uint8, `nbytes(key)` long) through `copier`."""
        ...

    def close(self) -> None:
        """Release what the tier holds (files, buffers); it is not read again."""
        ...


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

    def nbytes(self, key: ExpertKey) -> int:
        return self._buffers[key].numel()

    def read_into(self, key: ExpertKey, dst: torch.Tensor, copier: Copier) -> Completion:
        return copier.copy(dst, self._buffers[key])

    def close(self) -> None:
        self._buffers = {}

    def __getitem__(self, key: ExpertKey) -> torch.Tensor:
        """The host buffer of copy `key`."""
        return self._buffers[key]

    def __iter__(self) -> Iterator[ExpertKey]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)


StoreFactory = Callable[..., ExpertStore]
"""Builds a tier: (experts, formats, shape, *, pin, progress, copies) -> store (see `RamStore.build`)."""

STORAGE_TIERS: dict[str, StoreFactory] = {"ram": RamStore.build, "disk": DiskStore.build}


def open_store(
    storage: str,
    experts: ExpertSource,
    formats: Sequence[ExpertFormat],
    shape: ExpertShape,
    *,
    pin: bool,
    progress: bool = True,
    copies: QuantizedCopies | None = None,
) -> ExpertStore:
    """The storage tier registered as `storage`, holding every expert of `experts` at each of `formats`."""
    if storage not in STORAGE_TIERS:
        raise ValueError(f"storage {storage!r} is not available; available: {', '.join(STORAGE_TIERS)}")
    return STORAGE_TIERS[storage](experts, formats, shape, pin=pin, progress=progress, copies=copies)
