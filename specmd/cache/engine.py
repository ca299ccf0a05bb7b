"""The expert cache engine: residency, pins and bytes over `ExpertKey`s; never a tensor.

The same engine runs live (a payload listener moves real tensors as keys enter and leave) and in
trace replay (no listener). It holds the capacity bound: resident bytes, transfers in flight included,
never exceed `capacity_bytes`, and a pinned or in-flight expert is never evicted.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

from specmd.cache.keys import START, ExpertKey, Tick
from specmd.cache.policies.base import EvictionPolicy


class Entry:
    """A resident (or arriving) expert copy.

    ``ready_at`` is the emulated time its transfer completes (it is in flight before then);
    ``prefetch_pass`` is the pass it was prefetched for, until a request of its layer in that pass uses it
    (0 otherwise: passes count from 1); ``disk_until`` is when the part of its transfer that reads the disk ends
    (0.0 when it read none).
    """

    __slots__ = ("disk_until", "nbytes", "pins", "prefetch_pass", "ready_at")

    def __init__(self, nbytes: int, ready_at: float, pins: int = 0, prefetch_pass: int = 0) -> None:
        self.nbytes = nbytes
        self.ready_at = ready_at
        self.pins = pins
        self.prefetch_pass = prefetch_pass
        self.disk_until = 0.0


class CacheListener(Protocol):
    """Receives the engine's residency changes (the live payload moves tensors on them)."""

    def on_load(self, key: ExpertKey) -> None: ...

    def on_evict(self, key: ExpertKey) -> None: ...


ANY_LAYER = 1 << 30
"""`make_room`'s default bound: experts of any layer may be evicted."""


class _Candidates:
    """Evictable keys at one instant: resident, unpinned, transfer complete, and not protected.

    With bounds set (a prefetch making room), an expert is protected unless its layer is at most `through`
    (computed by the pass) or beyond `beyond` (after the prefetch's target) and not itself an unused prefetch.
    The cache keeps one view and sets its instant and bounds at each `make_room`; it is valid during that call.
    """

    __slots__ = ("_beyond", "_entries", "_through", "_time")

    def __init__(self, entries: dict[ExpertKey, Entry], time_s: float) -> None:
        self._entries = entries
        self._time = time_s
        self._through = ANY_LAYER
        self._beyond = ANY_LAYER

    def allows(self, key: ExpertKey, entry: Entry) -> bool:
        """Whether resident `key` may be evicted now."""
        if entry.pins or entry.ready_at > self._time:
            return False
        layer = key.layer
        return layer <= self._through or (layer > self._beyond and not entry.prefetch_pass)

    def __contains__(self, key: object) -> bool:
        entry = self._entries.get(key)  # type: ignore[call-overload]
        return entry is not None and self.allows(key, entry)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[ExpertKey]:
        return (k for k, e in self._entries.items() if self.allows(k, e))


class ExpertCache:
    """Residency of expert copies under a byte capacity, with an eviction policy choosing victims.

    `sizes` maps a precision to the bytes of one expert stored at it; `catalog` lists every key that
    exists (used by `warm`).
    """

    def __init__(
        self,
        capacity_bytes: object,
        eviction: EvictionPolicy,
        sizes: Mapping[str, int],
        catalog: Sequence[ExpertKey] = (),
        listener: CacheListener | None = None,
    ) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive integer, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.eviction = eviction
        self.sizes = dict(sizes)
        self.catalog = tuple(catalog)
        self.listener = listener
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self._entries: dict[ExpertKey, Entry] = {}
        self._pinned_bytes = 0
        self._arrivals: list[tuple[float, ExpertKey]] = []  # heap of unpinned transfers that may be in flight
        self._candidates = _Candidates(self._entries, 0.0)  # one view, re-timed at each make_room
        self.last_tick = START

    # ---- queries -------------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: ExpertKey) -> Entry | None:
        """The entry of `key`, or None when it is not resident."""
        return self._entries.get(key)

    def resident(self) -> list[ExpertKey]:
        """Every resident key (in-flight ones included), in insertion order."""
        return list(self._entries)

    def ready_in_layer(self, layer: int, time_s: float) -> list[ExpertKey]:
        """Keys of `layer` resident with their data landed by `time_s`, at any precision."""
        return [k for k, e in self._entries.items() if k.layer == layer and e.ready_at <= time_s]

    def nbytes(self, key: ExpertKey) -> int:
        """Bytes of `key`'s copy at its precision."""
        return self.sizes[key.precision]

    def next_arrival(self, after: float) -> float | None:
        """The earliest completion time, later than `after`, of a transfer still in flight."""
        arrivals = self._arrivals
        while arrivals:
            ready_at, key = arrivals[0]
            entry = self._entries.get(key)
            if ready_at > after and entry is not None and entry.ready_at == ready_at:
                return ready_at
            heapq.heappop(arrivals)
        return None

    # ---- pins and accesses ---------------------------------------------------------------------
    def pin(self, key: ExpertKey) -> None:
        """Protect `key` from eviction until the matching `unpin`."""
        self.hold(self._entries[key])

    def unpin(self, key: ExpertKey) -> None:
        """Undo one `pin` of `key`."""
        entry = self._entries[key]
        if entry.pins <= 0:
            raise RuntimeError(f"unpin of {key} which is not pinned")
        self.release(entry)

    def hold(self, entry: Entry) -> None:
        """`pin` by the entry that `get` or `insert` returned (the hot path saves the lookup)."""
        if not entry.pins:
            self._pinned_bytes += entry.nbytes
        entry.pins += 1

    def release(self, entry: Entry) -> None:
        """`unpin` by the entry."""
        if entry.pins <= 0:
            raise RuntimeError("unpin of an expert which is not pinned")
        entry.pins -= 1
        if not entry.pins:
            self._pinned_bytes -= entry.nbytes

    def touch(self, key: ExpertKey, now: Tick) -> None:
        """Tell the eviction policy that resident `key` was requested."""
        self.last_tick = now
        self.eviction.on_access(key, now)

    # ---- admission and eviction ----------------------------------------------------------------
    def _unavailable_bytes(self, time_s: float) -> int:
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] <= time_s:  # emulated time never goes back: these have landed
            heapq.heappop(arrivals)
        in_flight = 0
        for ready_at, key in arrivals:
            entry = self._entries.get(key)
            if entry is not None and entry.ready_at == ready_at and ready_at > time_s and not entry.pins:
                in_flight += entry.nbytes
        return self._pinned_bytes + in_flight

    def make_room(
        self, nbytes: int, now: Tick, through_layer: int = ANY_LAYER, beyond_layer: int = ANY_LAYER
    ) -> list[ExpertKey] | None:
        """Evict (per policy) until `nbytes` more fit; return the evicted keys, or None if they cannot fit now.

        A prefetch passes bounds: it may evict experts of layers up to `through_layer` (those the pass has
        computed) and experts of layers after `beyond_layer` (its target) that are not unused prefetches
        themselves, nothing else. None leaves the cache untouched: pinned, in-flight and protected experts
        hold too many bytes.
        """
        self.last_tick = now
        excess = self.resident_bytes + nbytes - self.capacity_bytes
        if excess <= 0:
            return []
        time_s = now.time_s
        candidates = self._candidates
        candidates._time = time_s
        candidates._through = through_layer
        candidates._beyond = beyond_layer
        if through_layer >= ANY_LAYER:
            if self.resident_bytes - self._unavailable_bytes(time_s) < excess:
                return None
        elif not self._bounded_room_for(excess):
            return None
        entries, listener, eviction = self._entries, self.listener, self.eviction
        evicted: list[ExpertKey] = []
        while self.resident_bytes + nbytes > self.capacity_bytes:
            victim = eviction.choose_victim(candidates, now)
            entry = entries.get(victim)
            if entry is None or not candidates.allows(victim, entry):
                raise RuntimeError(
                    f"{type(self.eviction).__name__} chose {victim}, which is not evictable now "
                    "(not resident, pinned, in flight or protected from a prefetch)"
                )
            if listener is not None:
                listener.on_evict(victim)  # before removal, so the listener sees the entry it loses
            del entries[victim]
            self.resident_bytes -= entry.nbytes
            evicted.append(victim)
        return evicted

    def _bounded_room_for(self, excess: int) -> bool:
        """Whether the experts the candidates' bounds allow hold at least `excess` bytes (stops once they do)."""
        allows = self._candidates.allows
        room = 0
        for key, entry in self._entries.items():
            if allows(key, entry):
                room += entry.nbytes
                if room >= excess:
                    return True
        return False

    def insert(
        self,
        key: ExpertKey,
        now: Tick,
        ready_at: float,
        *,
        pinned: bool = False,
        prefetch_pass: int = 0,
    ) -> Entry:
        """Admit `key`, arriving at emulated time `ready_at`, and return its entry; room must have been made.

        `pinned` admits it pinned once; `prefetch_pass` marks a prefetch with the pass it is for.
        """
        nbytes = self.sizes[key.precision]
        if key in self._entries:
            raise RuntimeError(f"{key} is already resident")
        if self.resident_bytes + nbytes > self.capacity_bytes:
            raise RuntimeError(f"inserting {key} ({nbytes} B) would exceed the capacity; make room first")
        self.last_tick = now
        entry = self._entries[key] = Entry(nbytes, ready_at, 0, prefetch_pass)
        self.resident_bytes += nbytes
        if self.resident_bytes > self.peak_resident_bytes:
            self.peak_resident_bytes = self.resident_bytes
        if pinned:  # a pinned arrival is awaited by its own layer, never waited on to make room
            entry.pins = 1
            self._pinned_bytes += nbytes
        elif ready_at > now.time_s:
            heapq.heappush(self._arrivals, (ready_at, key))
        self.eviction.on_insert(key, now)
        if self.listener is not None:
            self.listener.on_load(key)
        return entry

    def hold_until(self, key: ExpertKey, time_s: float) -> None:
        """Keep resident `key` from eviction until emulated `time_s`, as if in flight (its bytes are being read out)."""
        entry = self._entries[key]
        if time_s > entry.ready_at:
            entry.ready_at = time_s
            if not entry.pins:
                heapq.heappush(self._arrivals, (time_s, key))

    def warm(self, keys: Iterable[ExpertKey] | None = None) -> int:
        """Preload `keys` (default: the catalog, layer by layer) while they fit without evicting.

        Warm copies are ready at once and are not counted as transfers. Returns how many were loaded.
        """
        loaded = 0
        for key in self.catalog if keys is None else keys:
            if key.precision not in self.sizes:
                raise ValueError(f"{key} has precision {key.precision!r}; this cache stores {sorted(self.sizes)}")
            if key in self._entries:
                continue
            if self.resident_bytes + self.sizes[key.precision] > self.capacity_bytes:
                continue
            self.insert(key, self.last_tick, ready_at=self.last_tick.time_s)
            loaded += 1
        return loaded

    def reset_peak(self) -> None:
        """Restart peak tracking from the bytes resident now."""
        self.peak_resident_bytes = self.resident_bytes
