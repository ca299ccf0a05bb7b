"""Sweeps on a Ray cluster (`sweep(..., backend="ray")`): every replay one Ray task, the rows back to the driver.

Each trace goes into Ray's object store once (`ray.put`) and each worker process fetches and unpickles it once,
keeping the last few it used, so a trace crosses the network once per node and is decoded once per worker,
whatever the number of runs; the trace files need not exist on the cluster's nodes. The driver gets each finished
run's row and `sweep` appends it to the CSV as the local pool's are, so a cluster sweep resumes like a local one.
A worker that dies (killed, out of memory, its node lost) loses only its run: Ray runs it again, up to `RETRIES`
times; a run that raises is not retried and stops the sweep. specmd itself must be installed on every node, in
the driver's version. The policy plugins the driver loaded (`--plugin`) travel with the sweep's Ray job (its
`runtime_env`'s `py_modules`), so the cluster need not have them; a process already connected to Ray when it
sweeps has its own job, whose workers must find the plugins themselves (installed, or in its `runtime_env`).

Ray is the optional extra `specmd[ray]`, imported only here and only when a sweep asks for it.
"""

from __future__ import annotations

import importlib
import logging
import socket
import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from types import ModuleType
from typing import TYPE_CHECKING, Any

from specmd.cache.layout import ExpertLayout
from specmd.cache.policies.plugins import load_plugin, loaded_plugins
from specmd.sim.trace import Trace

if TYPE_CHECKING:
    from tqdm import tqdm

    from specmd.sim.sweep import Run

EXTRA = "specmd[ray]"
RETRIES = 3  # runs of a task whose worker died, after the first
CONNECT_TIMEOUT_S = 5.0  # to reach a cluster's address before handing it to Ray, which would retry for minutes
REFRESH_S = 0.25  # how often the driver collects finished rows and the progress bar reads the CPUs in use
HELD_TRACES = 4  # traces a worker process keeps decoded


class MissingExtraError(ImportError):
    """An optional extra that a chosen feature needs is not installed; the message names it."""


def import_ray() -> ModuleType:
    """The `ray` module, or a `MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise MissingExtraError(
            f"the ray backend needs Ray, which is not installed; install it with: pip install '{EXTRA}'"
        ) from exc


def check_address(address: str) -> None:
    """Refuse an address that is not a Ray address, or at which nothing answers, in seconds (Ray would retry)."""
    if address in ("auto", "local"):  # Ray's own: the cluster already running on this machine, or a new one
        return
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT, 'auto' or 'local'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ValueError(f"no Ray cluster answers at {address!r}: {exc}") from None


@contextmanager
def connected(address: str | None) -> Iterator[Cluster]:
    """The Ray cluster to sweep on: the one this process is already connected to (then `address` must be None),
    else the one at `address`, else the one `RAY_ADDRESS` names, else a new one on this machine. A connection
    made here is a Ray job that ships the loaded plugins to its workers; it is closed (and a cluster started here
    stopped) on leaving."""
    ray = import_ray()
    if ray.is_initialized():
        if address is not None:
            raise ValueError(f"this process is already connected to a Ray cluster; leave out the address {address!r}")
        yield Cluster(ray)
        return
    if address is not None:
        check_address(address)
    shipped = _plugin_packages(loaded_plugins())
    try:
        ray.init(
            address=address, logging_level=logging.WARNING, runtime_env={"py_modules": shipped} if shipped else None
        )
    except ConnectionError as exc:
        raise ValueError(f"cannot connect to the Ray cluster at {address or 'RAY_ADDRESS'}: {exc}") from None
    try:
        yield Cluster(ray)
    finally:
        ray.shutdown()


class Cluster:
    """Runs replays as Ray tasks on a connected cluster."""

    def __init__(self, ray: ModuleType) -> None:
        self.ray = ray

    def cpus_in_use(self) -> str:
        """'CPUs in use U/T': the cluster's CPUs that tasks hold now, of all it has."""
        total = self.ray.cluster_resources().get("CPU", 0.0)
        free = self.ray.available_resources().get("CPU", 0.0)
        return f"CPUs in use {total - free:g}/{total:g}"

    def execute(
        self, runs: Sequence[Run], shapes: Mapping[str, ExpertLayout], bar: tqdm | None = None
    ) -> Iterator[dict[str, Any]]:
        """Each run's row as it finishes, in any order. Closed early (Ctrl-C, a run that raised), it cancels the runs
        not finished, stopping their workers, and returns."""
        from specmd.sim.sweep import _trace

        ray = self.ray
        traces = {path: ray.put(_shippable(_trace(path))) for path in dict.fromkeys(run.trace for run in runs)}
        plugins = loaded_plugins()
        task = ray.remote(_replay).options(num_cpus=1, max_retries=RETRIES)
        # A trace's reference goes in a list, so that Ray hands the task the reference, not the decoded trace.
        pending = [task.remote(run, [traces[run.trace]], shapes.get(run.shape_from), plugins) for run in runs]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=REFRESH_S)
                failed: Exception | None = None
                for ref in ready:  # the rows of runs that finished beside a failed one still count
                    try:
                        row = ray.get(ref)
                    except Exception as exc:
                        failed = failed or exc
                        continue
                    yield row
                if failed is not None:
                    raise failed
                if bar is not None:
                    bar.set_postfix_str(self.cpus_in_use())
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise


def _shippable(trace: Trace) -> Trace:
    """`trace` without its replay view, which holds objects of the compiled engine (they do not unpickle); each
    worker builds the view once, for all its runs of the trace."""
    return replace(trace, _passes={})


def _plugin_packages(plugins: Sequence[str]) -> list[ModuleType]:
    """The top-level modules or packages of the plugins, to ship to the workers (specmd is there already)."""
    tops = dict.fromkeys(module.split(".")[0] for module in plugins)
    return [sys.modules[top] for top in tops if top != "specmd"]


_held: OrderedDict[str, Trace] = OrderedDict()  # in a worker: the traces it decoded last, by object id


def _fetch(ref: Any) -> Trace:
    """The trace of an object-store reference, decoded once per worker process while among its last few."""
    import ray

    key = ref.hex()
    trace = _held.pop(key, None)
    if trace is None:
        trace = ray.get(ref)
    _held[key] = trace
    while len(_held) > HELD_TRACES:
        _held.popitem(last=False)
    return trace


def _replay(run: Run, trace: list[Any], price_as: ExpertLayout | None, plugins: Sequence[str]) -> dict[str, Any]:
    """A Ray task: import the driver's plugins (as a pool worker does), then replay `run`; its CSV row."""
    from specmd.sim.sweep import replay_run

    for module in plugins:
        load_plugin(module)
    return replay_run(run, _fetch(trace[0]), price_as)
