"""The tiers below the cache when experts live on disk: the disk link and an optional host-RAM cache.

A transfer into the cache (a demand fetch or a prefetch) first needs the expert's bytes in host RAM. When
the host tier holds them (a *host hit*) they go straight onto the host-to-device link. Otherwise (a *host
miss*) they are read over the disk link, into the host tier when its eviction policy can make room there,
and then go onto the host-to-device link once the read ends. Both links carry one transfer at a time, in
issue order, so the disk read of one expert overlaps the host-to-device copy of the one before.

The host tier is a second `ExpertCache` (its own capacity and eviction policy) over the same keys; an
expert it holds stays there, protected from its eviction, until its copy to the device ends (`hold_until`).
When every host entry is busy the read bypasses the host tier. Every decision follows the emulated clock,
so a replay makes the same ones as the live run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from specmd.cache.engine import ExpertCache
from specmd.cache.keys import ExpertKey, Tick
from specmd.cache.link import EmulatedLink
from specmd.cache.stats import LayerCounters


class Counts(Protocol):
    """Where a transfer's host and disk counts go: a layer's counters, or a layer's tally while it is served."""

    host_hits: int
    host_misses: int
    disk_bytes_read: int


class DiskPath:
    """Moves an expert's bytes from disk (through the host tier `host`, if any) onto the host-to-device `link`."""

    def __init__(self, link: EmulatedLink, disk: EmulatedLink, host: ExpertCache | None) -> None:
        self.link = link
        self.disk = disk
        self.host = host

    def free_at(self, key: ExpertKey) -> float:
        """When the first link a transfer of `key` would use is free: host-to-device for a host hit, else the disk."""
        host = self.host
        return self.link.busy_until if host is not None and key in host else self.disk.busy_until

    def transfer(
        self, key: ExpertKey, nbytes: int, tick: Tick, counts: Counts, layers: Mapping[int, LayerCounters]
    ) -> tuple[float, float]:
        """Schedule `key`'s bytes (`nbytes`) into the cache from `tick`'s time; return when they land and when their
        disk read ends (0.0 for a host hit whose bytes had landed in host RAM). The host tier's evictions are
        counted in `layers` (per MoE layer)."""
        begin, link, host = tick.time_s, self.link, self.host
        if host is not None:
            entry = host.get(key)
            if entry is not None:
                counts.host_hits += 1
                host.touch(key, tick)
                in_host = entry.ready_at
                finish = link.schedule(nbytes, in_host if in_host > begin else begin)
                host.hold_until(key, finish)
                return finish, in_host if in_host > begin else 0.0
            counts.host_misses += 1
        read = self.disk.schedule(nbytes, begin)
        counts.disk_bytes_read += nbytes
        finish = link.schedule(nbytes, read)
        if host is not None:
            evicted = host.make_room(nbytes, tick)
            if evicted is not None:  # None: every host entry is busy; the read goes past the host tier
                for victim in evicted:
                    layers[victim.layer].host_evictions += 1
                host.insert(key, tick, read)
                host.hold_until(key, finish)
        return finish, read

    def reset_peak(self) -> None:
        """Restart the host tier's peak tracking from the bytes resident now."""
        if self.host is not None:
            self.host.reset_peak()
