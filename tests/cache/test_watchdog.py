"""The watchdog thread: copies in issue order, stolen by the main thread when needed first, cancelled on eviction."""

from __future__ import annotations

import threading
from functools import partial

import pytest
import torch

from specmd.cache.live.copiers import DONE, CpuCopier
from specmd.cache.live.watchdog import Watchdog


class GatedCopier(CpuCopier):
    """Blocks the watchdog thread inside its first copy until released."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.threads: list[str] = []

    def copy(self, dst, src):  # type: ignore[no-untyped-def]
        self.threads.append(threading.current_thread().name)
        if len(self.threads) == 1:
            self.started.set()
            self.release.wait(5)
        dst.copy_(src)
        return DONE


def test_the_main_thread_does_a_copy_the_watchdog_has_not_reached() -> None:
    copier = GatedCopier()
    watchdog = Watchdog()
    try:
        first = watchdog.submit(partial(copier.copy, torch.zeros(4), torch.ones(4)), "expert 0")
        copier.started.wait(5)  # the watchdog is stuck inside the first copy
        dst = torch.zeros(4)
        second = watchdog.submit(partial(copier.copy, dst, torch.full((4,), 2.0)), "expert 0")
        second.wait()  # returns without the watchdog: the main thread copied
        assert torch.equal(dst, torch.full((4,), 2.0))
        assert copier.threads == ["specmd-watchdog", threading.current_thread().name]
        copier.release.set()
        first.wait()
    finally:
        copier.release.set()
        watchdog.stop()


def test_retiring_a_pending_copy_cancels_it() -> None:
    copier = GatedCopier()
    watchdog = Watchdog()
    try:
        watchdog.submit(partial(copier.copy, torch.zeros(4), torch.ones(4)), "expert 0")
        copier.started.wait(5)
        dst = torch.zeros(4)
        watchdog.submit(partial(copier.copy, dst, torch.ones(4)), "expert 0").retire()
        copier.release.set()
        watchdog.stop()
        assert torch.equal(dst, torch.zeros(4))  # never written: its slot may belong to another expert now
        assert len(copier.threads) == 1
    finally:
        copier.release.set()
        watchdog.stop()


def test_copy_errors_reach_the_waiter_and_the_check() -> None:
    watchdog = Watchdog()
    try:
        ticket = watchdog.submit(partial(CpuCopier().copy, torch.zeros(4), torch.empty(4, device="meta")), "expert 0")
        watchdog.stop()  # the thread runs every queued copy before it ends
        failed = "the copy of expert 0 failed on thread 'specmd-watchdog'"
        with pytest.raises(RuntimeError, match=failed):
            ticket.wait()
        with pytest.raises(RuntimeError, match=failed):
            watchdog.check()
        watchdog.check()  # reported once: the model may run on
    finally:
        watchdog.stop()


def test_a_stopped_watchdog_takes_no_more_copies() -> None:
    watchdog = Watchdog()
    watchdog.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        watchdog.submit(partial(CpuCopier().copy, torch.zeros(1), torch.zeros(1)), "expert 0")


def test_several_threads_run_as_many_copies_at_once_and_all_stop() -> None:
    together = threading.Barrier(3, timeout=5)  # passes only when three copies are in flight at the same time

    def copy() -> object:
        together.wait()
        return DONE

    watchdog = Watchdog(threads=3)
    tickets = [watchdog.submit(copy, f"expert {i}") for i in range(3)]
    for ticket in tickets:
        ticket._await(5, "test")  # not wait(): that would run a pending copy on this thread
    watchdog.check()
    assert watchdog.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("specmd-watchdog")]
    with pytest.raises(ValueError, match="at least one thread, got 0"):
        Watchdog(threads=0)
