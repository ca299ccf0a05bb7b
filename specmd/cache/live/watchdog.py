"""The watchdog: a background thread that carries out expert transfers as the manager issues them.

The manager decides on the emulated clock which transfers start and what they evict (so counters are
deterministic); the watchdog performs the real copies in issue order, off the main thread, so they
overlap compute. A copy the main thread needs before the watchdog has reached it is done by the main
thread itself (so a busy machine's thread scheduling never delays compute), and an evicted expert's
copy that has not started is cancelled. An error in the thread is kept and raised on the main thread
at the next wait or check.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from specmd.cache.live.copiers import Completion

Transfer = Callable[[], Completion]
"""One expert's transfer: reads it from its storage tier into its slot and returns the issued copy."""

_PENDING, _RUNNING, _DONE, _CANCELLED = range(4)


class Ticket:
    """One issued transfer, claimed by whichever thread gets to it first."""

    __slots__ = ("_completion", "_done", "_error", "_failures", "_lock", "_state", "_transfer")

    def __init__(self, transfer: Transfer, failures: list[BaseException]) -> None:
        self._transfer, self._failures = transfer, failures
        self._lock = threading.Lock()
        self._state = _PENDING
        self._done = threading.Event()
        self._completion: Completion | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        """Perform the copy unless another thread has claimed it or it was cancelled."""
        with self._lock:
            if self._state != _PENDING:
                return
            self._state = _RUNNING
        try:
            self._completion = self._transfer()
        except BaseException as exc:
            self._error = exc
            self._failures.append(exc)
        finally:
            self._state = _DONE
            self._done.set()

    def wait(self) -> None:
        """Return once the data can be used, doing the copy here if no thread has started it."""
        self.run()
        self._done.wait()
        if self._error is not None:
            raise RuntimeError("an expert transfer failed in the specmd watchdog thread") from self._error
        assert self._completion is not None
        self._completion.wait()

    def retire(self) -> None:
        """The destination is being given up: cancel the copy if it has not started, else let it finish."""
        with self._lock:
            if self._state == _PENDING:
                self._state = _CANCELLED
                self._done.set()
                return
        self._done.wait()


_STOP = None


def _drain(jobs: queue.SimpleQueue) -> None:
    while (ticket := jobs.get()) is not _STOP:
        ticket.run()


class Watchdog:
    """Owns the transfer thread; `stop` (or garbage collection of the model, via its finalizer) ends it."""

    def __init__(self, name: str = "specmd-watchdog") -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._failures: list[BaseException] = []
        self._thread = threading.Thread(target=_drain, args=(self._jobs,), name=name, daemon=True)
        self._thread.start()

    def submit(self, transfer: Transfer) -> Ticket:
        """Queue `transfer`."""
        if not self._thread.is_alive():
            raise RuntimeError("the specmd watchdog is stopped (the model was closed)")
        ticket = Ticket(transfer, self._failures)
        self._jobs.put(ticket)
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
