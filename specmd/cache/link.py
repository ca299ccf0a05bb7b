"""The emulated host->device link: transfer times on the emulated clock (no bytes move here)."""

from __future__ import annotations

import math


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
