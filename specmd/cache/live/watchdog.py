"""The watchdog: a background thread that carries out expert transfers as the manager issues them.

The manager decides on the emulated clock which transfers start and what they evict (so counters are
deterministic); the watchdog performs the real copies in issue order, off the main thread, so they overlap
compute. With several threads (`threads`; the disk tier uses `READ_EXPERTS`) as many copies run at once,
each started in issue order, so a drive that needs queue depth gets reads of several experts. A copy the
main thread needs before the watchdog has reached it is done by the main thread itself (so a busy machine's
thread scheduling never delays compute), and an evicted expert's copy that has not started is cancelled.
Every wait is bounded (`timeout_s`): a copy that hangs is a `TransferError` naming the expert, never a hang.
An error in the thread is kept and raised on the main thread at the next wait or check, once.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable

from specmd.cache.live.copiers import Completion

Transfer = Callable[[], Completion]
"""One expert's transfer: reads it from its storage tier into its slot and returns the issued copy."""

DEFAULT_TIMEOUT_S = 300.0
"""How long a wait on one expert's copy may take before it is an error (generous: a copy takes milliseconds)."""

_PENDING, _RUNNING, _DONE, _CANCELLED = range(4)


class TransferError(RuntimeError):
    """An expert's copy failed or did not finish in time."""


class Ticket:
    """One issued transfer of the expert `label`, claimed by whichever thread gets to it first."""

    __slots__ = ("_completion", "_done", "_error", "_failures", "_label", "_lock", "_state", "_transfer")

    def __init__(self, transfer: Transfer, failures: list[TransferError], label: str) -> None:
        self._transfer, self._failures, self._label = transfer, failures, label
        self._lock = threading.Lock()
        self._state = _PENDING
        self._done = threading.Event()
        self._completion: Completion | None = None
        self._error: TransferError | None = None

    def run(self) -> None:
        """Perform the copy unless another thread has claimed it or it was cancelled."""
        with self._lock:
            if self._state != _PENDING:
                return
            self._state = _RUNNING
        where = threading.current_thread().name
        try:
            self._completion = self._transfer()
        except BaseException as exc:
            error = TransferError(f"the copy of {self._label} failed on thread {where!r}: {exc!r}")
            error.__cause__ = exc
            self._error = error
            if where != threading.main_thread().name:
                self._failures.append(error)  # raised on the main thread at its next check or wait
            if not isinstance(exc, Exception):
                raise  # an interrupt stays an interrupt
        finally:
            self._state = _DONE
            self._done.set()

    def _await(self, timeout_s: float, what: str) -> None:
        if not self._done.wait(timeout_s):
            raise TransferError(f"the copy of {self._label} did not finish within {timeout_s:g} s ({what})")

    def wait(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Return once the data can be used, doing the copy here if no thread has started it."""
        self.run()
        self._await(timeout_s, "waited on to compute it")
        if self._error is not None:
            raise self._error
        assert self._completion is not None
        self._completion.wait()

    def retire(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """The destination is being given up: cancel the copy if it has not started, else let it finish."""
        with self._lock:
            if self._state == _PENDING:
                self._state = _CANCELLED
                self._done.set()
                return
        self._await(
            timeout_s, "waited on to reuse its slot: the model cannot run until it does; close it and load it again"
        )


_STOP = None


def _drain(jobs: queue.SimpleQueue) -> None:
    while (ticket := jobs.get()) is not _STOP:
        ticket.run()


class Watchdog:
    """Owns the transfer threads (`threads` of them); `stop` (or garbage collection of the model, via its
    finalizer) ends them."""

    def __init__(self, name: str = "specmd-watchdog", threads: int = 1) -> None:
        if not (isinstance(threads, int) and threads >= 1):
            raise ValueError(f"a watchdog needs at least one thread, got {threads!r}")
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._failures: list[TransferError] = []
        names = [name] if threads == 1 else [f"{name}-{i}" for i in range(threads)]
        self._threads = [threading.Thread(target=_drain, args=(self._jobs,), name=n, daemon=True) for n in names]
        for thread in self._threads:
            thread.start()

    def submit(self, transfer: Transfer, label: str) -> Ticket:
        """Queue `transfer` of the expert `label` (how errors name it)."""
        if not all(thread.is_alive() for thread in self._threads):
            raise RuntimeError("the specmd watchdog is stopped (the model was closed)")
        ticket = Ticket(transfer, self._failures, label)
        self._jobs.put(ticket)
        return ticket

    def check(self) -> None:
        """Raise, on the calling (main) thread, the first error a copy hit in the thread since the last check."""
        if self._failures:
            error = self._failures[0]
            self._failures.clear()
            raise error

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Finish the queued copies and end the threads; False, with a warning, if a copy runs on after `timeout_s`."""
        alive = [thread for thread in self._threads if thread.is_alive()]
        for _ in alive:
            self._jobs.put(_STOP)  # each thread takes one and ends
        for thread in alive:
            thread.join(timeout_s)
        if any(thread.is_alive() for thread in self._threads):
            warnings.warn(
                f"the specmd transfer thread is still in a copy after {timeout_s:g} s; it is a daemon thread and ends "
                "with the process",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        return True
