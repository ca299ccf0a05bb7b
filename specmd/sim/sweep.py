"""Sweeps: replay traces x capacities x bandwidths x hardware x policy mixes, one tidy row per run.

Runs go to a CSV file as they finish; running the same sweep again skips rows already there, so an
interrupted sweep resumes. Every sweep adds the baselines: Belady (offline-optimal eviction, no
prefetch) at each setting, and an unbounded cache (cache_frac=1.0) per trace, link and hardware. Every run
is checked before any starts: a mix the trace cannot replay (config3's lookahead and config4's cache-aware
routing run live only) or a cache under one expert is refused, and nothing is written.

Each row lands whole: one write of one complete line, then fsync, with Ctrl-C held off meanwhile, so a
crash (kill -9, a full disk) can tear only the row being written. Reading finds such a torn last row (no
line end, a field missing, a number or JSON cut short): `read_results` leaves it out and a resumed sweep cuts
it off, each with a one-line notice, so it runs again. Ctrl-C stops a parallel sweep at once: the runs in
flight are dropped, their workers terminated, and `SweepInterrupted` says how far it got.

The runs go to a local process pool (backend "local", the default) or to a Ray cluster (backend "ray",
`specmd.sim.sweep_ray`); either way this process writes the rows, so the CSV is the same and resumes the same.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from itertools import product
from pathlib import Path
from typing import Any, get_type_hints

from tqdm.auto import tqdm

from specmd import __version__
from specmd.cache import config as cache_config
from specmd.cache.governor import check_speculative
from specmd.cache.hardware import DEFAULT_HARDWARE
from specmd.cache.layout import ExpertLayout
from specmd.cache.policies.plugins import load_plugin, loaded_plugins
from specmd.cache.policies.spec import PolicySpec, configuration_names
from specmd.cache.stats import CacheStats
from specmd.sim.replay import check_replay, run_trace
from specmd.sim.speculate import check_speculative_replay
from specmd.sim.trace import Trace, load_trace

BELADY = "none/belady/fetch/standard"
UNBOUNDED = "none/lru/fetch/standard"
NATIVE = "native"
PLAIN = "off"  # a grid's speculate value for plain decoding
BACKENDS = ("local", "ray")

KEY_COLUMNS = ["trace_sha256", "policy", "cache_frac", "bandwidth_gbps", "hardware", "shape_from",
               "storage", "host_cache_frac", "disk", "host_eviction", "speculate", "draft_frac"]  # fmt: skip
STAT_COLUMNS = [f.name for f in fields(CacheStats)]
COLUMNS = [
    "trace", *KEY_COLUMNS, "baseline", "prefetch", "eviction", "miss", "routing", "specmd_version", *STAT_COLUMNS,
]  # fmt: skip
# How each typed column reads back; a value that does not is a damaged (torn) row.
_NUMBERS = {int: int, float: float}
PARSERS: dict[str, Callable[[str], Any]] = {"cache_frac": float} | {
    name: _NUMBERS.get(kind, json.loads) for name, kind in get_type_hints(CacheStats).items() if name in STAT_COLUMNS
}
log = logging.getLogger(__name__)
# Forked workers inherit the loaded traces; elsewhere (spawn) each worker loads them itself.
START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a sweep: `done` of its `total` runs are in the CSV `path`; the same sweep again resumes."""

    def __init__(self, path: Path, done: int, total: int) -> None:
        super().__init__(f"{path}: {done} of {total} runs done")
        self.path, self.done, self.total = path, done, total


def _bandwidth(value: Any) -> float | str | None:
    """A bandwidth as the grid writes it: a number, "profile", or "native" (None)."""
    if value in (None, NATIVE):
        return None
    if value == cache_config.PROFILE:
        return value
    return float(value)


def _bandwidth_label(value: float | str | None) -> str:
    return NATIVE if value is None else str(value)


@dataclass(frozen=True)
class Lower:
    """Where a run's experts live below the cache: in RAM, or on `disk` (a disk profile, "profile" or None: native)
    through a host-RAM tier of `host_cache_frac` (None: none) evicting by `host_eviction`."""

    storage: str = "ram"
    host_cache_frac: float | None = None
    disk: str | None = None
    host_eviction: str = "lru"

    def settings(self) -> dict[str, Any]:
        """The `CacheConfig` keywords."""
        return {"storage": self.storage, "host_cache_frac": self.host_cache_frac, "disk": self.disk,
                "host_eviction": self.host_eviction}  # fmt: skip

    def columns(self) -> dict[str, str]:
        """The CSV's columns for it ("" where a setting does not apply)."""
        if self.storage == "ram":
            return {"storage": "ram", "host_cache_frac": "", "disk": "", "host_eviction": ""}
        host = self.host_cache_frac is not None
        return {"storage": self.storage, "host_cache_frac": str(float(self.host_cache_frac)) if host else "",
                "disk": _bandwidth_label(self.disk), "host_eviction": self.host_eviction if host else ""}  # fmt: skip


@dataclass(frozen=True)
class SweepGrid:
    """What to sweep: every combination of the lists below (plus the baselines, unless turned off).

    Attributes:
        traces: trace files (.jsonl or .npz).
        policies: policy mixes, 'prefetch/eviction/miss/routing'.
        cache_fracs: cache capacities as fractions of all expert bytes.
        bandwidths: link bandwidths in GB/s, "profile" (the hardware's link) or "native"/None.
        hardware: hardware profile names.
        shape_from: models to price the traces as ("" = as recorded); `sweep` is given their layouts.
        baselines: add Belady and the unbounded cache.
        backend: where the runs go: "local" (a process pool) or "ray" (a Ray cluster).
        address: the Ray cluster's address (None: `RAY_ADDRESS`, else a new local one); only for "ray".
        storage: where every expert lives, "ram" or "disk" (then each of `host_cache_fracs` x `disks` is a setting).
        host_cache_fracs: host-RAM tiers between the disk and the cache, as fractions of all expert bytes (None: none).
        disks: disk profiles the disk is priced as ("profile": the hardware's drive; "native"/None: no emulated time).
        host_eviction: the host tier's eviction policy.
        speculate: speculative decoding settings (K, "auto" or "auto:K_max"; None: plain decoding), each replayed
            from lookahead traces (`specmd.sim.speculate`); the baselines decode plainly.
        draft_frac: the self-draft's budget of the speculative runs, as a fraction of its experts.
    """

    traces: tuple[str, ...]
    policies: tuple[str, ...]
    cache_fracs: tuple[float, ...]
    bandwidths: tuple[float | str | None, ...] = (cache_config.PROFILE,)
    hardware: tuple[str, ...] = (DEFAULT_HARDWARE,)
    shape_from: tuple[str, ...] = ("",)
    baselines: bool = True
    backend: str = "local"
    address: str | None = None
    storage: str = "ram"
    host_cache_fracs: tuple[float | None, ...] = (None,)
    disks: tuple[str | None, ...] = (cache_config.PROFILE,)
    host_eviction: str = "lru"
    speculate: tuple[int | str | None, ...] = (None,)
    draft_frac: float = 1.0

    def __post_init__(self) -> None:
        for name in ("traces", "policies", "cache_fracs", "bandwidths", "hardware", "shape_from", "host_cache_fracs",
                     "disks", "speculate"):  # fmt: skip
            if not getattr(self, name):
                raise ValueError(f"a sweep needs at least one value of {name}")
        object.__setattr__(self, "bandwidths", tuple(_bandwidth(b) for b in self.bandwidths))
        object.__setattr__(self, "disks", tuple(_bandwidth(d) if d in (None, NATIVE) else d for d in self.disks))
        canonical = tuple(str(PolicySpec.parse(p)) for p in self.policies)  # fails now on a bad name
        object.__setattr__(self, "policies", canonical)
        for frac, bandwidth, hardware, lower in (
            (f, b, h, low) for f in self.cache_fracs for b in self.bandwidths for h in self.hardware
            for low in self.lowers()
        ):  # fmt: skip
            cache_config.CacheConfig(cache_frac=frac, bandwidth_gbps=bandwidth, hardware=hardware, **lower.settings())
        for setting in self.speculate:
            if setting is not None:
                check_speculative(setting)
        cache_config.CacheConfig(cache_frac=1.0, draft_frac=self.draft_frac)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown sweep backend {self.backend!r}; the backends are {', '.join(BACKENDS)}")
        if self.address is not None and self.backend != "ray":
            raise ValueError(f"a Ray address ({self.address!r}) is for the ray backend, not {self.backend!r}")

    def lowers(self) -> list[Lower]:
        """Each setting of the tiers below the cache the grid sweeps."""
        if self.storage != "disk":
            if self.host_cache_fracs != (None,):
                cache_config.CacheConfig(cache_frac=1.0, storage=self.storage, host_cache_frac=self.host_cache_fracs[0])
            return [Lower(self.storage)]
        return [Lower("disk", h, d, self.host_eviction) for h in self.host_cache_fracs for d in self.disks]

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Any) -> SweepGrid:
        """Read a grid file (keys: traces, policies, cache_frac, bandwidth_gbps, hardware, shape_from, baselines,
        backend, address, storage, host_cache_frac, disk, host_eviction, speculate, draft_frac; speculate "off" is
        plain decoding); `overrides` (the fields' names) replace what the file says."""
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
        known = {"traces", "policies", "cache_frac", "bandwidth_gbps", "hardware", "shape_from", "baselines",
                 "backend", "address", "storage", "host_cache_frac", "disk", "host_eviction", "speculate",
                 "draft_frac"}  # fmt: skip
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key {unknown[0]!r}; a grid has {', '.join(sorted(known))}")
        values = {
            "traces": data.get("traces", ()),
            "policies": data.get("policies", ()),
            "cache_fracs": data.get("cache_frac", ()),
            "bandwidths": data.get("bandwidth_gbps", (cache_config.PROFILE,)),
            "hardware": data.get("hardware", (DEFAULT_HARDWARE,)),
            "shape_from": data.get("shape_from", ("",)),
            "baselines": data.get("baselines", True),
            "backend": data.get("backend", "local"),
            "address": data.get("address"),
            "storage": data.get("storage", "ram"),
            "host_cache_fracs": data.get("host_cache_frac", (None,)),
            "disks": data.get("disk", (cache_config.PROFILE,)),
            "host_eviction": data.get("host_eviction", "lru"),
            "speculate": [None if s == PLAIN else s for s in data.get("speculate", (None,))],
            "draft_frac": data.get("draft_frac", 1.0),
        }
        values.update({k: v for k, v in overrides.items() if v})
        return cls(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in values.items()})

    def runs(self) -> list[Run]:
        """Every run of the grid, baselines included, without duplicates."""
        runs: dict[tuple, Run] = {}
        settings = [(p, f, "", k) for k in self.speculate for p in self.policies for f in self.cache_fracs]
        if self.baselines:
            settings += [(BELADY, f, "belady", None) for f in self.cache_fracs]
            settings.append((UNBOUNDED, 1.0, "unbounded", None))
        for trace, hardware, bandwidth, shape, lower in product(
            self.traces, self.hardware, self.bandwidths, self.shape_from, self.lowers()
        ):
            for policy, frac, baseline, k in settings:
                draft = None if k is None else self.draft_frac
                run = Run(trace, policy, frac, bandwidth, hardware, shape, baseline, lower, k, draft)
                runs.setdefault(run.key, run)
        return list(runs.values())


@dataclass(frozen=True)
class Run:
    """One replay of a sweep."""

    trace: str
    policy: str
    cache_frac: float
    bandwidth_gbps: float | str | None
    hardware: str
    shape_from: str = ""
    baseline: str = field(default="", compare=False)
    lower: Lower = Lower()
    speculate: int | str | None = None
    draft_frac: float | None = None

    @property
    def key(self) -> tuple:
        return (self.trace, *_row_key(self.columns("")))

    def columns(self, trace_sha256: str) -> dict[str, Any]:
        """The run's `KEY_COLUMNS`, as its row writes them."""
        return {"trace_sha256": trace_sha256, "policy": self.policy, "cache_frac": float(self.cache_frac),
                "bandwidth_gbps": _bandwidth_label(self.bandwidth_gbps), "hardware": self.hardware,
                "shape_from": self.shape_from, **self.lower.columns(),
                "speculate": "" if self.speculate is None else str(self.speculate),
                "draft_frac": "" if self.draft_frac is None else str(float(self.draft_frac))}  # fmt: skip


_TRACES: dict[str, Trace] = {}  # loaded once in the parent; forked workers inherit them


def _trace(path: str) -> Trace:
    if path not in _TRACES:
        trace = load_trace(path)
        trace.passes()  # build the replay view before workers fork
        _TRACES[path] = trace
    return _TRACES[path]


def run_one(run: Run, price_as: ExpertLayout | None = None) -> dict[str, Any]:
    """Replay one run (its trace priced as `price_as`'s model when given, for `run.shape_from`); its CSV row."""
    return replay_run(run, _trace(run.trace), price_as)


def replay_run(run: Run, trace: Trace, price_as: ExpertLayout | None = None) -> dict[str, Any]:
    """`run_one` with the trace of `run.trace` given (a Ray worker has it from the object store)."""
    config = cache_config.CacheConfig(
        cache_frac=run.cache_frac, policy=run.policy, bandwidth_gbps=run.bandwidth_gbps, hardware=run.hardware,
        draft_frac=run.draft_frac, **run.lower.settings(),
    )  # fmt: skip
    stats = run_trace(trace, config, price_as, run.speculate).to_dict()
    for name in ("per_layer", "fetches_by_precision", "speculate_k"):
        stats[name] = json.dumps(stats[name])
    spec = config.policy
    return {
        "trace": run.trace,
        **run.columns(trace.sha256),
        "policy": str(spec),
        "baseline": run.baseline,
        **{kind: str(getattr(spec, kind)) for kind in ("prefetch", "eviction", "miss", "routing")},
        "specmd_version": __version__,
        **stats,
    }


def read_results(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a results CSV (as text). A torn last row (a write cut short) is left out, with a notice."""
    rows, torn = _scan(Path(path))
    if torn:  # not 0: a torn header holds no row
        log.warning("%s: left out its last row, torn by an interrupted write (a resumed sweep runs it again)", path)
    return rows


def _scan(path: Path) -> tuple[list[dict[str, str]], int | None]:
    """The whole rows of the results CSV `path`, and the byte offset where a torn last row starts (None: none).

    A row is one line (`_ResultsFile`). Only the last can be torn, a crash tearing at most the row being written:
    a damaged row before it is a ValueError, as is a header other than `COLUMNS`. A file with no header yet
    (empty, or a torn header) has no rows.
    """
    raw = path.read_bytes()
    header = _line(COLUMNS)
    other = f"{path} has other columns than this specmd writes ({__version__}); sweep into a new file"
    end = raw.rfind(b"\n") + 1  # where the last complete line ends
    if end == 0:  # not even the header's line is whole
        if not header.startswith(raw):
            raise ValueError(other)
        return [], (0 if raw else None)
    lines = io.BytesIO(raw[:end])
    first = next(lines)
    if _record(first) != COLUMNS:
        raise ValueError(other)
    rows: list[dict[str, str]] = []
    offset, damaged = len(first), None  # damaged: (line number, offset, why) of a damaged row
    for number, line in enumerate(lines, start=2):
        if damaged is not None:
            raise ValueError(f"{path}, line {damaged[0]}: a damaged row ({damaged[2]}); delete it and run again")
        record = _record(line)
        why = "not one CSV record" if record is None else _damage(record)
        if why:
            damaged = (number, offset, why)
        else:
            rows.append(dict(zip(COLUMNS, record, strict=True)))  # type: ignore[arg-type]
        offset += len(line)
    if damaged is not None:  # the last row is whole as a line, not as a row: a write cut short, then ended
        return rows, damaged[1]
    return rows, (end if end < len(raw) else None)


def _record(line: bytes) -> list[str] | None:
    """The one CSV record of a line; None when it is not one (cut inside a quote, not UTF-8, ...)."""
    try:
        records = list(csv.reader([line.decode("utf-8")]))
    except (csv.Error, UnicodeDecodeError):
        return None
    return records[0] if len(records) == 1 else None


def _damage(record: list[str]) -> str | None:
    """What is wrong with a CSV record of a results row; None when it is whole."""
    if len(record) != len(COLUMNS):
        return f"{len(record)} fields of {len(COLUMNS)}"
    for name, value in zip(COLUMNS, record, strict=True):
        parse = PARSERS.get(name)
        if parse is not None:
            try:
                parse(value)
            except ValueError:
                return f"{name} is {value[:40]!r}"
    return None


def _line(values: Sequence[Any]) -> bytes:
    """One CSV line, as `csv` writes it (its line end included)."""
    text = io.StringIO()
    csv.writer(text).writerow(values)
    return text.getvalue().encode("utf-8")


def _repair(path: Path) -> list[dict[str, str]]:
    """The whole rows of the results CSV `path`, after cutting off a torn last row (with a notice)."""
    rows, torn = _scan(path)
    if torn is not None:
        with path.open("r+b") as handle:
            handle.truncate(torn)
            os.fsync(handle.fileno())
        if torn:
            log.warning("%s: cut off its last row, torn by an interrupted write; that run runs again", path)
    return rows


@contextmanager
def _sigint_held() -> Iterator[None]:
    """Inside, Ctrl-C waits: it is raised on leaving, so what is inside (a row's write) finishes first.

    Only the main thread can move the handler; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)


class _ResultsFile:
    """Appends rows to a results CSV so that each lands whole: a row is one write of one complete line, then
    fsync; a write that fails part way (a full disk) is cut back off. A new or empty file gets the header."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self.fd).st_size == 0:
            self._append(_line(COLUMNS))

    def write(self, row: Mapping[str, Any]) -> None:
        line = _line([row[name] for name in COLUMNS])
        if line.count(b"\n") != 1:
            raise ValueError(f"a results row must be one line; this one has a line break: {line[:200]!r}")
        self._append(line)

    def _append(self, data: bytes) -> None:
        start = os.fstat(self.fd).st_size
        left = memoryview(data)
        try:
            while left:
                left = left[os.write(self.fd, left) :]
            os.fsync(self.fd)
        except OSError:
            with suppress(OSError):
                os.ftruncate(self.fd, start)  # the part of the row that was written
            raise

    def close(self) -> None:
        os.close(self.fd)


def _row_key(row: Mapping[str, Any]) -> tuple:
    return tuple(str(row[c]) if c != "cache_frac" else float(row[c]) for c in KEY_COLUMNS)


def sweep(
    grid: SweepGrid,
    out: str | os.PathLike[str],
    *,
    jobs: int | None = None,
    progress: bool = True,
    shapes: Mapping[str, ExpertLayout] | None = None,
    backend: str | None = None,
    address: str | None = None,
) -> list[dict[str, Any]]:
    """Run every run of `grid` not already in the CSV `out`, appending a row as each finishes.

    Returns the new rows. `backend` and `address` replace the grid's (`SweepGrid.backend`, `.address`). On the
    local backend `jobs` worker processes (default: one per core) share the work; on "ray" every run is a task
    on the cluster's CPUs (`specmd.sim.sweep_ray`). `shapes` gives the layout of each model the grid's
    `shape_from` names (`specmd.offload_models.info.expert_layout`).
    """
    if backend is not None or address is not None:
        grid = replace(grid, backend=backend or grid.backend, address=address or grid.address)
    if grid.backend != "local" and jobs is not None:
        raise ValueError(f"jobs ({jobs}) is for the local backend; on {grid.backend} each run takes one cluster CPU")
    shapes = dict(shapes or {})
    unknown = sorted(name for name in grid.shape_from if name and name not in shapes)
    if unknown:
        raise ValueError(f"the grid prices traces as {unknown}, whose layouts `shapes` does not give")
    target = Path(out)
    done = {_row_key(row) for row in _repair(target)} if target.exists() else set()
    runs, todo = grid.runs(), []
    for run in runs:
        trace = _trace(run.trace)  # also checks every trace up front
        if _row_key(run.columns(trace.sha256)) not in done:
            todo.append(run)
    _refuse_unreplayable(todo, shapes)
    new_rows: list[dict[str, Any]] = []
    with _executor(grid.backend if todo else "local", grid.address, jobs, shapes) as execute:  # connects first
        results = _ResultsFile(target)
        bar = tqdm(total=len(todo), desc="specmd sweep", unit="run", disable=not progress)
        try:
            with closing(execute(todo, bar)) as finished:  # closing it stops the workers
                for row in finished:
                    with _sigint_held():  # a row is written whole and counted, or neither
                        results.write(row)
                        new_rows.append(row)
                        bar.update()
        except KeyboardInterrupt:
            raise SweepInterrupted(target, len(runs) - len(todo) + len(new_rows), len(runs)) from None
        finally:
            bar.close()
            results.close()
    return new_rows


Execute = Callable[[Sequence["Run"], tqdm], Iterator[dict[str, Any]]]


@contextmanager
def _executor(
    backend: str, address: str | None, jobs: int | None, shapes: Mapping[str, ExpertLayout]
) -> Iterator[Execute]:
    """What runs a sweep's runs on `backend`, yielding each one's row as it finishes. Ray's is connected before
    anything is written, so a cluster that cannot be reached leaves the CSV as it was (with no work, none is)."""
    if backend == "local":
        yield lambda runs, bar: _execute(runs, jobs, shapes)
        return
    from specmd.sim import sweep_ray

    with sweep_ray.connected(address) as cluster:
        yield lambda runs, bar: cluster.execute(runs, shapes, bar)


def _refuse_unreplayable(runs: Sequence[Run], shapes: Mapping[str, ExpertLayout]) -> None:
    """Refuse, before any run starts, a sweep with a run that cannot replay: a mix that runs live only (cache-aware
    routing, prefetch further ahead than the trace records: config3 and config4), a cache under one expert, ...

    Each mix is checked once per trace and shape, at its smallest capacity (the one a too-small cache fails at).
    """
    smallest: dict[tuple[str, str, str, Lower, int | str | None, float | None], float] = {}
    for run in runs:
        key = (run.trace, run.policy, run.shape_from, run.lower, run.speculate, run.draft_frac)
        smallest[key] = min(smallest.get(key, run.cache_frac), run.cache_frac)
    for (path, policy, shape, lower, speculate, draft_frac), frac in smallest.items():
        try:
            config = cache_config.CacheConfig(
                cache_frac=frac, policy=PolicySpec.parse(policy), draft_frac=draft_frac, **lower.settings()
            )
            check_replay(_trace(path), config, shapes.get(shape))
            if speculate is not None:
                check_speculative_replay(_trace(path), config, speculate)
        except ValueError as exc:
            names = configuration_names(policy)
            label = f"{policy} ({', '.join(names)})" if names else policy
            raise ValueError(f"the sweep cannot replay {label} on {path}, so no run started: {exc}") from None


def _start_worker(plugins: Sequence[str]) -> None:
    """A worker imports the policy plugins the parent loaded (`--plugin`), and leaves Ctrl-C to the parent, which
    stops it (a terminal sends it to the whole group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for module in plugins:
        load_plugin(module)


def _execute(runs: Sequence[Run], jobs: int | None, shapes: Mapping[str, ExpertLayout]) -> Iterator[dict[str, Any]]:
    """Each run's row as it finishes, in `jobs` processes. Closed early (Ctrl-C, an error), it drops the runs not
    finished and terminates the workers, returning at once."""
    workers = min(jobs or os.cpu_count() or 1, len(runs))
    if workers <= 1:
        for run in runs:
            yield run_one(run, shapes.get(run.shape_from))
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context(START_METHOD),
        initializer=_start_worker,
        initargs=(loaded_plugins(),),
    )
    try:
        futures = [pool.submit(run_one, run, shapes.get(run.shape_from)) for run in runs]
        for future in as_completed(futures):
            yield future.result()
    except BaseException:
        _stop(pool)
        raise
    finally:
        pool.shutdown(wait=True)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Drop the runs not started, terminate the workers (dropping the runs in flight), and wait for both."""
    processes = list((pool._processes or {}).values())  # before shutdown forgets them
    manager = pool._executor_manager_thread
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()
    if manager is not None:
        manager.join()
