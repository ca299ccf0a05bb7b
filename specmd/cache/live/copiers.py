"""Real copies of expert bytes into fast memory: synchronous on the CPU, on a copy stream with CUDA."""

from __future__ import annotations

from typing import Protocol

import torch


class Completion(Protocol):
    """A copy that has been issued; `wait` makes its data safe to read by the next computation."""

    def wait(self) -> None: ...

    def synchronize(self) -> None:
        """Block the calling thread until the copy has landed, so its source may be reused."""
        ...


class _Done:
    def wait(self) -> None:
        return None

    def synchronize(self) -> None:
        return None


DONE: Completion = _Done()


class Copier(Protocol):
    """Copies `src` into `dst` (both uint8 buffers of one expert), returning when the copy is issued."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Completion: ...


class CpuCopier:
    """Host-to-host copies (the CPU path): synchronous, so they are done when `copy` returns."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Completion:
        dst.copy_(src)
        return DONE


class _CudaCompletion:
    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def wait(self) -> None:
        # The compute stream waits on the GPU; the host never blocks.
        torch.cuda.current_stream(self._event.device).wait_event(self._event)

    def synchronize(self) -> None:
        self._event.synchronize()


class CudaCopier:
    """Host-to-device copies on a dedicated stream, so transfers overlap compute.

    Sources are pinned host buffers: only pinned memory lets `non_blocking=True` become a real
    asynchronous DMA; from pageable memory the copy would block the host.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._stream = torch.cuda.Stream(device=device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Completion:
        # The destination slot may still be read by kernels queued on the compute stream.
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return _CudaCompletion(event)


def copier_for(device: torch.device) -> Copier:
    """The copier that moves experts into memory on `device`."""
    if device.type == "cuda" and torch.cuda.is_available():
        return CudaCopier(device)
    return CpuCopier()
