"""Moving expert bytes: the emulated host->device link, and the real copies (CPU, or a CUDA copy stream).

torch is imported only by the copiers, so trace replay (which uses the link alone) never loads it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

from mypy_extensions import mypyc_attr

if TYPE_CHECKING:
    import torch


class EmulatedLink:
    """A host->device link that carries one transfer at a time, in issue order (FIFO).

    Each transfer takes ``latency_s + nbytes / bandwidth``; ``bandwidth_gbps`` is in GB/s (1e9 bytes/s).
    ``bandwidth_gbps=None`` means native speed: transfers take no emulated time.
    """

    def __init__(self, bandwidth_gbps: float | None, latency_s: float = 0.0) -> None:
        if bandwidth_gbps is not None and not (isinstance(bandwidth_gbps, int | float) and bandwidth_gbps > 0):
            raise ValueError(f"bandwidth_gbps must be a number > 0 or None, got {bandwidth_gbps!r}")
        if not (isinstance(latency_s, int | float) and math.isfinite(latency_s) and latency_s >= 0):
            raise ValueError(f"link latency must be a number >= 0 seconds, got {latency_s!r}")
        self.bandwidth_gbps = None if bandwidth_gbps is None else float(bandwidth_gbps)
        self.latency_s = float(latency_s) if bandwidth_gbps is not None else 0.0
        self.bytes_per_s = None if bandwidth_gbps is None else float(bandwidth_gbps) * 1e9
        self.busy_until = 0.0

    def schedule(self, nbytes: int, now: float) -> float:
        """Queue a transfer issued at `now`; return the emulated time it finishes."""
        start = now if now > self.busy_until else self.busy_until
        finish = start if self.bytes_per_s is None else start + (self.latency_s + nbytes / self.bytes_per_s)
        self.busy_until = finish
        return finish


class Completion(Protocol):
    """A copy that has been issued; `wait` makes its data safe to read by the next computation."""

    def wait(self) -> None: ...


class _Done:
    def wait(self) -> None:
        return None


DONE: Completion = _Done()


@mypyc_attr(allow_interpreted_subclasses=True)
class CpuCopier:
    """Host-to-host copies (the CPU path): synchronous, so they are done when `copy` returns."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Completion:
        dst.copy_(src)
        return DONE


class _CudaCompletion:
    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def wait(self) -> None:
        import torch

        # The compute stream waits on the GPU; the host never blocks.
        torch.cuda.current_stream(self._event.device).wait_event(self._event)


class CudaCopier:
    """Host-to-device copies on a dedicated stream, so transfers overlap compute.

    Sources are pinned host buffers: only pinned memory lets `non_blocking=True` become a real
    asynchronous DMA; from pageable memory the copy would block the host.
    """

    def __init__(self, device: torch.device) -> None:
        import torch

        self._device = device
        self._stream = torch.cuda.Stream(device=device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Completion:
        import torch

        # The destination slot may still be read by kernels queued on the compute stream.
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return _CudaCompletion(event)


def copier_for(device: torch.device) -> CpuCopier | CudaCopier:
    """The copier that moves experts into memory on `device`."""
    import torch

    if device.type == "cuda" and torch.cuda.is_available():
        return CudaCopier(device)
    return CpuCopier()
