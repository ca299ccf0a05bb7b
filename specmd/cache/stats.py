"""Cache metrics: plain counters while running, and `CacheStats`, the snapshot users read.

Definitions (DESIGN §5): a *request* is one distinct (pass, layer, expert) the routing asks for. A
*hit* is resident and ready at request time; a *late prefetch* is in flight then (compute stalls for the
rest); a *miss* is neither. `hit_rate` = hits / requests; `hit_rate_with_late` = (hits + late
prefetches) / requests, as papers that count in-flight prefetches as hits report it. A *collision miss*
is a miss on an expert evicted earlier in the same forward pass (`collision_rate` = collision misses /
requests, the SpecMD paper's figure); by cause, the evicted expert was either a prefetch for this pass
not yet used (`collision_misses_prefetched`) or an expert resident from an earlier pass
(`collision_misses_stale`). Prefetch *precision* = prefetched experts requested in their target layer /
prefetches issued; *recall* = requests served by a prefetch / requests. *Stall* is emulated time compute waited on
transfers. *TTFT* is the emulated time of a prefill pass (mean over prefills); *tokens/s* is decode
tokens / decode emulated time; the wall-clock versions sit beside them.

With experts on disk, every transfer into the cache (demand fetch or prefetch) first finds the expert's
bytes in host RAM: a *host hit* when the host-RAM tier holds them, a *host miss* when they are read from
disk (`disk_bytes_read`; with no host tier every transfer reads the disk and neither is counted).
`host_hit_rate` = host hits / (host hits + host misses); `host_evictions` count the host tier's own.
*Disk stall* (`disk_stall_s`) is the part of `stall_s` compute waited on an expert whose bytes were still
being read from disk.

Speculative decoding (`generate(speculative=...)`) adds: *drafted* / *accepted* tokens (`acceptance_rate` =
accepted / drafted), *verify passes* (the target's decode passes; `tokens_per_verify` = decode tokens / verify
passes), the draft's emulated time (counted in decode time, so tokens/s is tokens over everything decoding
took), *lookahead* prefetches (experts the draft's routing predicted for the verify pass) issued, used (requested
in their layer of that pass) and late (still in flight then), the K chosen for each verify pass, and the
draft's own fast memory (`draft_capacity_bytes`, `draft_peak_resident_bytes`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from specmd.cache.keys import rebuilt


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


@dataclass(slots=True)
class LayerCounters:
    """Counters of one MoE layer."""

    layer: int
    requests: int = 0
    hits: int = 0
    late_prefetches: int = 0
    misses: int = 0
    collision_misses: int = 0
    collision_misses_prefetched: int = 0
    prefetches_issued: int = 0
    prefetches_used: int = 0
    evictions: int = 0
    drops: int = 0
    substitutions: int = 0
    bytes_transferred: int = 0
    stall_s: float = 0.0
    host_hits: int = 0
    host_misses: int = 0
    host_evictions: int = 0
    disk_bytes_read: int = 0
    disk_stall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["hit_rate"] = _ratio(self.hits, self.requests)
        data["hit_rate_with_late"] = _ratio(self.hits + self.late_prefetches, self.requests)
        data["collision_rate"] = _ratio(self.collision_misses, self.requests)
        data["collision_misses_stale"] = self.collision_misses - self.collision_misses_prefetched
        data["prefetch_precision"] = _ratio(self.prefetches_used, self.prefetches_issued)
        data["prefetch_recall"] = _ratio(self.prefetches_used, self.requests)
        data["host_hit_rate"] = _ratio(self.host_hits, self.host_hits + self.host_misses)
        return data


_SUMMED = [f.name for f in fields(LayerCounters) if f.name != "layer"]


@dataclass(frozen=True)
class CacheStats:
    """The metrics of a live run or a replay, with the same fields either way (see module docstring).

    Per-layer counters are in `per_layer`, one dict per MoE layer, ordered by layer.
    """

    requests: int
    hits: int
    late_prefetches: int
    misses: int
    collision_misses: int
    collision_misses_prefetched: int
    collision_misses_stale: int
    collision_rate: float
    hit_rate: float
    hit_rate_with_late: float
    prefetches_issued: int
    prefetches_used: int
    prefetch_precision: float
    prefetch_recall: float
    evictions: int
    drops: int
    substitutions: int
    bytes_transferred: int
    fetches_by_precision: dict[str, int]
    stall_s: float
    ttft_s: float
    tokens_per_s: float
    wall_ttft_s: float
    wall_tokens_per_s: float
    prefill_passes: int
    decode_passes: int
    decode_tokens: int
    emulated_time_s: float
    peak_resident_bytes: int
    capacity_bytes: int
    host_hits: int = 0
    host_misses: int = 0
    host_hit_rate: float = 0.0
    host_evictions: int = 0
    disk_bytes_read: int = 0
    disk_stall_s: float = 0.0
    peak_host_resident_bytes: int = 0
    host_capacity_bytes: int = 0
    per_layer: list[dict[str, Any]] = field(default_factory=list)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float = 0.0
    verify_passes: int = 0
    tokens_per_verify: float = 0.0
    draft_time_s: float = 0.0
    lookahead_prefetches_issued: int = 0
    lookahead_prefetches_used: int = 0
    lookahead_prefetches_late: int = 0
    speculate_k: list[int] = field(default_factory=list)
    draft_capacity_bytes: int = 0
    draft_peak_resident_bytes: int = 0

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return rebuilt(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


@dataclass(slots=True)
class SpeculationCounters:
    """Counters of speculative decoding (all zero when it is off)."""

    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0
    draft_s: float = 0.0
    draft_wall_s: float = 0.0
    lookahead_issued: int = 0
    lookahead_used: int = 0
    lookahead_late: int = 0
    k_chosen: list[int] = field(default_factory=list)


_SPECULATION = (
    ("drafted", "drafted_tokens"), ("accepted", "accepted_tokens"), ("verify_passes", "verify_passes"),
    ("draft_s", "draft_time_s"), ("lookahead_issued", "lookahead_prefetches_issued"),
    ("lookahead_used", "lookahead_prefetches_used"), ("lookahead_late", "lookahead_prefetches_late"),
)  # fmt: skip
"""`SpeculationCounters`' summed fields and the `CacheStats` fields that report them."""


class StatsRecorder:
    """Accumulates counters per MoE layer and per pass; `snapshot` turns them into `CacheStats`."""

    def __init__(self, layers: Iterable[int]) -> None:
        self._layer_ids = tuple(layers)
        self.reset()

    def reset(self) -> None:
        self.layers = {layer: LayerCounters(layer) for layer in self._layer_ids}
        self.fetches_by_precision: Counter[str] = Counter()
        self.prefill_passes = 0
        self.prefill_s = 0.0
        self.prefill_wall_s = 0.0
        self.decode_passes = 0
        self.decode_tokens = 0
        self.decode_s = 0.0
        self.decode_wall_s = 0.0
        self.speculation = SpeculationCounters()

    def record_draft(self, emulated_s: float, wall_s: float) -> None:
        """Time the draft's passes took before a verify pass: decode time, as the draft runs to decode."""
        self.speculation.draft_s += emulated_s
        self.speculation.draft_wall_s += wall_s
        self.decode_s += emulated_s
        self.decode_wall_s += wall_s

    def record_verify(self, k: int, accepted: int) -> None:
        """A verify pass of `k` drafted tokens, `accepted` of them kept (each a decode token beyond the pass's own)."""
        spec = self.speculation
        spec.verify_passes += 1
        spec.drafted += k
        spec.accepted += accepted
        spec.k_chosen.append(k)
        self.decode_tokens += accepted

    def record_pass(self, prefill: bool, sequences: int, emulated_s: float, wall_s: float) -> None:
        if prefill:
            self.prefill_passes += 1
            self.prefill_s += emulated_s
            self.prefill_wall_s += wall_s
        else:
            self.decode_passes += 1
            self.decode_tokens += sequences
            self.decode_s += emulated_s
            self.decode_wall_s += wall_s

    def snapshot(
        self,
        peak_resident_bytes: int,
        capacity_bytes: int,
        peak_host_bytes: int = 0,
        host_capacity_bytes: int = 0,
        draft_capacity_bytes: int = 0,
        draft_peak_bytes: int = 0,
    ) -> CacheStats:
        spec = self.speculation
        per_layer = [self.layers[layer] for layer in self._layer_ids]
        total = {name: sum(getattr(c, name) for c in per_layer) for name in _SUMMED}
        return CacheStats(
            **total,
            hit_rate=_ratio(total["hits"], total["requests"]),
            hit_rate_with_late=_ratio(total["hits"] + total["late_prefetches"], total["requests"]),
            collision_rate=_ratio(total["collision_misses"], total["requests"]),
            collision_misses_stale=total["collision_misses"] - total["collision_misses_prefetched"],
            prefetch_precision=_ratio(total["prefetches_used"], total["prefetches_issued"]),
            prefetch_recall=_ratio(total["prefetches_used"], total["requests"]),
            fetches_by_precision=dict(self.fetches_by_precision),
            ttft_s=_ratio(self.prefill_s, self.prefill_passes),
            tokens_per_s=_ratio(self.decode_tokens, self.decode_s),
            wall_ttft_s=_ratio(self.prefill_wall_s, self.prefill_passes),
            wall_tokens_per_s=_ratio(self.decode_tokens, self.decode_wall_s),
            prefill_passes=self.prefill_passes,
            decode_passes=self.decode_passes,
            decode_tokens=self.decode_tokens,
            emulated_time_s=self.prefill_s + self.decode_s,
            peak_resident_bytes=peak_resident_bytes,
            capacity_bytes=capacity_bytes,
            host_hit_rate=_ratio(total["host_hits"], total["host_hits"] + total["host_misses"]),
            peak_host_resident_bytes=peak_host_bytes,
            host_capacity_bytes=host_capacity_bytes,
            per_layer=[c.to_dict() for c in per_layer],
            **{stat: getattr(spec, counter) for counter, stat in _SPECULATION},
            acceptance_rate=_ratio(spec.accepted, spec.drafted),
            tokens_per_verify=_ratio(self.decode_tokens, spec.verify_passes),
            speculate_k=list(spec.k_chosen),
            draft_capacity_bytes=draft_capacity_bytes,
            draft_peak_resident_bytes=draft_peak_bytes,
        )


def combine(parts: Sequence[CacheStats]) -> CacheStats:
    """The metrics of several caches that ran side by side (data-parallel ranks) as one `CacheStats`.

    Counters (requests, hits, bytes, passes, ... and every per-layer counter) are summed and every rate is
    recomputed from the sums: `hit_rate` is all hits / all requests, `ttft_s` all prefill time / all
    prefills, `tokens_per_s` all decode tokens / all decode time (a rate per cache, not the ranks' summed
    throughput). `peak_resident_bytes`, `capacity_bytes` and their host-tier and draft counterparts are each
    cache's own: the largest of the parts; the K chosen per verify pass are the parts' lists one after another.
    Each part's prefill and decode times are recovered from its rates, so times agree to float rounding.
    """
    if not parts:
        raise ValueError("combine needs at least one CacheStats")
    recorder = StatsRecorder(sorted({layer["layer"] for part in parts for layer in part.per_layer}))
    for part in parts:
        for layer in part.per_layer:
            counters = recorder.layers[layer["layer"]]
            for name in _SUMMED:
                setattr(counters, name, getattr(counters, name) + layer[name])
        recorder.fetches_by_precision.update(part.fetches_by_precision)
        recorder.prefill_passes += part.prefill_passes
        recorder.prefill_s += part.ttft_s * part.prefill_passes
        recorder.prefill_wall_s += part.wall_ttft_s * part.prefill_passes
        recorder.decode_passes += part.decode_passes
        recorder.decode_tokens += part.decode_tokens
        recorder.decode_s += _ratio(part.decode_tokens, part.tokens_per_s)
        recorder.decode_wall_s += _ratio(part.decode_tokens, part.wall_tokens_per_s)
        spec = recorder.speculation
        for counter, stat in _SPECULATION:
            setattr(spec, counter, getattr(spec, counter) + getattr(part, stat))
        spec.k_chosen.extend(part.speculate_k)
    return recorder.snapshot(
        max(part.peak_resident_bytes for part in parts),
        max(part.capacity_bytes for part in parts),
        max(part.peak_host_resident_bytes for part in parts),
        max(part.host_capacity_bytes for part in parts),
        max(part.draft_capacity_bytes for part in parts),
        max(part.draft_peak_resident_bytes for part in parts),
    )
