"""The host-RAM tier's live side: experts the host cache admits are read from disk into a host arena, and
copies into the fast tier take them from there.

`HostTier` is both the host `ExpertCache`'s listener (a key enters: take a block of the host arena and have
the transfer thread read the expert into it; a key leaves: free the block) and the `ExpertStore` the fast
tier's payload reads from (an expert the host tier holds is copied from its block, once its disk read has
landed; any other is read from the tier below, as the emulation's bypass does). The host arena is allocated
once (pinned on CUDA, so host-to-device copies are asynchronous DMA).

A copy out of a block counts as a reader of it; a block is freed only once no reader is left, so a key
that leaves the host tier while the transfer thread still copies it never has its bytes overwritten. A copy
that starts after its key left reads the tier below instead: the bytes are the same.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch

from specmd.cache.keys import ExpertKey
from specmd.cache.live.arena import SlotArena
from specmd.cache.live.copiers import Completion, Copier, CpuCopier
from specmd.cache.live.store import ExpertStore
from specmd.cache.live.watchdog import Ticket, TransferError, Watchdog


@dataclass
class _Block:
    handle: int
    ticket: Ticket
    view: torch.Tensor
    readers: int = 0
    gone: bool = False  # leaving the host tier, or moving: new copies read the tier below


class HostTier:
    """Experts of `store` held in a host `arena` as the host cache decides (see the module docstring)."""

    def __init__(self, store: ExpertStore, arena: SlotArena, watchdog: Watchdog, timeout_s: float) -> None:
        self.store = store
        self.arena = arena
        self.watchdog = watchdog
        self.timeout_s = timeout_s
        self._blocks: dict[ExpertKey, _Block] = {}
        self._changed = threading.Condition()  # guards readers and `gone`; notified when a reader finishes
        self._copier = CpuCopier()

    # ---- the host cache's listener ---------------------------------------------------------------
    def on_load(self, key: ExpertKey) -> None:
        held: list[_Block] = []  # the blocks a compaction may move: no copy reads them until it is done

        def settle() -> None:
            held.extend(self._blocks.values())
            self._hold(held)
            for block in held:
                block.ticket.wait(self.timeout_s)  # every block's own read lands before blocks move

        try:
            handle, moved = self.arena.acquire_compacting(self.store.nbytes(key), settle)
            handles = set(moved)
            for block in held:
                if block.handle in handles:
                    block.view = self.arena.view(block.handle)
        finally:
            self._release(held)
        view = self.arena.view(handle)
        label = f"expert {key.expert} of layer {key.layer} at {key.precision} (into host RAM)"
        ticket = self.watchdog.submit(partial(self.store.read_into, key, view, self._copier), label)
        self._blocks[key] = _Block(handle, ticket, view)

    def on_evict(self, key: ExpertKey) -> None:
        block = self._blocks.pop(key)
        self._quiesce([block])
        block.ticket.retire(self.timeout_s)  # no read may still land in the block once another key takes it
        self.arena.release(block.handle)

    def _hold(self, blocks: list[_Block]) -> None:
        """Wait until no copy reads `blocks`; copies that start meanwhile, and until `_release`, read the tier
        below."""
        with self._changed:
            for block in blocks:
                block.gone = True
            idle = self._changed.wait_for(lambda: not any(b.readers for b in blocks), self.timeout_s)
        if not idle:
            self._release(blocks)
            raise TransferError(f"a copy out of host RAM did not finish within {self.timeout_s:g} s")

    def _release(self, blocks: list[_Block]) -> None:
        with self._changed:
            for block in blocks:
                block.gone = False

    def _quiesce(self, blocks: Iterable[_Block]) -> None:
        """Wait until no copy reads `blocks` (new copies meanwhile read the tier below)."""
        held = list(blocks)
        self._hold(held)
        self._release(held)

    def reset(self) -> None:
        """Give up every expert (the cache is being rebuilt empty); safe to call again after an interruption."""
        self._quiesce(self._blocks.values())
        for block in self._blocks.values():
            block.ticket.retire(self.timeout_s)
        self._blocks.clear()
        self.arena.clear()

    # ---- the store the fast tier reads -----------------------------------------------------------
    @property
    def readers(self) -> int:
        """As many as the tier below reads at once."""
        return getattr(self.store, "readers", 1)

    def nbytes(self, key: ExpertKey) -> int:
        return self.store.nbytes(key)

    def read_into(self, key: ExpertKey, dst: torch.Tensor, copier: Copier) -> Completion:
        with self._changed:
            block = self._blocks.get(key)
            if block is not None and not block.gone:
                block.readers += 1
            else:
                block = None
        if block is None:
            return self.store.read_into(key, dst, copier)
        try:
            block.ticket.wait(self.timeout_s)  # its disk read, done here if the transfer thread has not started it
            completion = copier.copy(dst, block.view)
            completion.synchronize()  # the block may be reused once this reader leaves
            return completion
        finally:
            with self._changed:
                block.readers -= 1
                self._changed.notify_all()

    def close(self) -> None:
        self.store.close()


def check_host_memory(nbytes: int) -> None:
    """Refuse a host tier of `nbytes` larger than this machine's physical memory (where the system tells it)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return
    if nbytes > total:
        raise ValueError(
            f"the host-RAM tier (host_cache_frac or host_cache_bytes) would hold {nbytes} B of experts, more than this "
            f"machine's {total} B of memory; give a smaller host_cache_frac or host_cache_bytes"
        )
