"""The watchdog: a background thread that carries out expert transfers as the manager issues them.

The manager decides on the emulated clock which transfers start and what they evict (so counters are
deterministic); the watchdog performs the real copies in issue order, off the main thread, so they
overlap compute. An error in the thread is kept and raised on the main thread at the next wait or check.
"""

from __future__ import annotations

import queue
import threading

import torch

from specmd.cache.transfer import Completion, CpuCopier, CudaCopier


class Ticket:
    """One issued copy; `wait` returns once its data can be used (raising the copy's error, if any)."""

    __slots__ = ("_completion", "_error", "_issued")

    def __init__(self) -> None:
        self._issued = threading.Event()
        self._completion: Completion | None = None
        self._error: BaseException | None = None

    def wait(self) -> None:
        self._issued.wait()
        if self._error is not None:
            raise RuntimeError("an expert transfer failed in the specmd watchdog thread") from self._error
        assert self._completion is not None
        self._completion.wait()


_STOP = None


def _drain(jobs: queue.SimpleQueue, copier: CpuCopier | CudaCopier, failures: list[BaseException]) -> None:
    while (job := jobs.get()) is not _STOP:
        ticket, dst, src = job
        try:
            ticket._completion = copier.copy(dst, src)
        except BaseException as exc:
            ticket._error = exc
            failures.append(exc)
        finally:
            ticket._issued.set()


class Watchdog:
    """Owns the transfer thread; `stop` (or garbage collection of the model, via its finalizer) ends it."""

    def __init__(self, copier: CpuCopier | CudaCopier, name: str = "specmd-watchdog") -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._failures: list[BaseException] = []
        self._thread = threading.Thread(
            target=_drain, args=(self._jobs, copier, self._failures), name=name, daemon=True
        )
        self._thread.start()

    def submit(self, dst: torch.Tensor, src: torch.Tensor) -> Ticket:
        """Queue a copy of `src` into `dst`."""
        if not self._thread.is_alive():
            raise RuntimeError("the specmd watchdog is stopped (the model was closed)")
        ticket = Ticket()
        self._jobs.put((ticket, dst, src))
        return ticket

    def check(self) -> None:
        """Raise the first error a copy hit, on the calling (main) thread."""
        if self._failures:
            raise RuntimeError("an expert transfer failed in the specmd watchdog thread") from self._failures[0]

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued copies and end the thread."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join(timeout)
