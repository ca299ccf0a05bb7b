"""Sweeps on Ray (`backend="ray"`): the local backend's rows exactly; a worker that dies loses only its run, and an
interrupted cluster sweep resumes with each row once; plugins reach the workers; a missing Ray or a bad address is
one clear error, before anything is written."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from specmd.cache.policies.plugins import load_plugin
from specmd.sim import sweep_ray
from specmd.sim.sweep import SweepGrid, read_results, sweep
from tests.plugins import write_plugin
from tests.sim.conftest import random_trace
from tests.test_cli_errors import assert_one_line, run_cli

POLICIES = ("none/lru/fetch/standard", "topk/least-stale/fetch/standard")
CRASHING = "none/crash-once-lru/fetch/standard"
CRASH_SOURCE = '''
"""LRU whose first eviction in any process kills that process, once: the marker file says it did."""

import os
import signal

from specmd.cache.policies import register_eviction
from specmd.cache.policies.eviction import LRU


@register_eviction("crash-once-lru")
class CrashOnceLRU(LRU):
    def choose_victim(self, candidates, now):
        try:
            open({marker!r}, "x").close()
        except FileExistsError:
            return super().choose_victim(candidates, now)
        os.kill(os.getpid(), signal.SIGKILL)
'''


def grid(traces: list[Path], **overrides) -> SweepGrid:  # type: ignore[no-untyped-def]
    values = {"traces": tuple(map(str, traces)), "policies": POLICIES, "cache_fracs": (0.1, 0.25),
              "bandwidths": (5.0,)}  # fmt: skip
    return SweepGrid(**(values | overrides))


def rows_of(path: Path) -> list[tuple]:
    return sorted(tuple(row.items()) for row in read_results(path))


@pytest.fixture
def traces(recorded: Path, tmp_path: Path) -> list[Path]:
    """Two traces: the tiny model's recording and a random one with router logits (top-k prefetch replays)."""
    return [recorded, random_trace(3, layers=4, experts=8, tokens=16, logits=True).save(tmp_path / "random.npz")]


def test_a_ray_sweep_writes_the_rows_of_the_local_backend(traces: list[Path], tmp_path: Path, ray_cluster: str) -> None:
    import ray

    ray.init(address=ray_cluster, logging_level=logging.WARNING)  # a caller connected to its cluster
    try:
        new = sweep(grid(traces), tmp_path / "ray.csv", progress=False, backend="ray")
        assert ray.is_initialized()  # the connection was the caller's: left open
        with pytest.raises(
            ValueError, match=f"already connected to a Ray cluster; leave out the address '{ray_cluster}'"
        ):
            sweep(
                grid(traces, policies=POLICIES[:1]),
                tmp_path / "r.csv",
                progress=False,
                backend="ray",
                address=ray_cluster,
            )
    finally:
        ray.shutdown()
    assert len(new) == len(grid(traces).runs()) == 2 * (4 + 2 + 1)
    sweep(grid(traces), tmp_path / "local.csv", jobs=1, progress=False)
    assert rows_of(tmp_path / "ray.csv") == rows_of(tmp_path / "local.csv")
    assert sweep(grid(traces), tmp_path / "ray.csv", progress=False, backend="ray") == []  # nothing to do: no Ray


@pytest.mark.usefixtures("fresh_plugins")
def test_a_lost_worker_loses_only_its_run_and_a_stopped_cluster_sweep_resumes_with_each_row_once(
    traces: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_cluster: str
) -> None:
    import ray

    marker = tmp_path / "crashed"
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path / "plugin", source=CRASH_SOURCE.format(marker=str(marker)),
                                                 module="specmd_test_crash")))  # fmt: skip
    load_plugin("specmd_test_crash")  # the sweep's Ray job ships it to the workers: it is installed nowhere
    crashing, out = grid(traces[:1], policies=(CRASHING, POLICIES[0])), tmp_path / "ray.csv"
    with monkeypatch.context() as no_retries:
        no_retries.setattr(sweep_ray, "RETRIES", 0)  # the lost run is not run again: the sweep stops
        with pytest.raises(ray.exceptions.WorkerCrashedError):
            sweep(crashing, out, progress=False, backend="ray", address=ray_cluster)
    finished = read_results(out)
    assert marker.exists() and len(finished) < len(crashing.runs())
    marker.unlink()  # the resumed sweep loses a worker again; Ray runs that run again
    resumed = sweep(crashing, out, progress=False, backend="ray", address=ray_cluster)
    assert marker.exists() and len(finished) + len(resumed) == len(crashing.runs())
    sweep(crashing, tmp_path / "local.csv", jobs=1, progress=False)  # the marker is there: no crash here
    assert rows_of(out) == rows_of(tmp_path / "local.csv")  # each row once


def test_without_ray_the_error_names_the_extra(recorded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    out = tmp_path / "r.csv"
    code, shown = run_cli(monkeypatch, "sweep", str(recorded), "--policy", POLICIES[0], "--cache-frac", "0.5",
                          "--backend", "ray", "--out", str(out))  # fmt: skip
    assert_one_line(code, shown, "needs Ray", "pip install 'specmd[ray]'")
    assert not out.exists()


def test_a_bad_address_is_refused_in_seconds_before_anything_is_written(recorded: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    command = [str(Path(sys.executable).with_name("specmd")), "sweep", str(recorded), "--policy", POLICIES[0],
               "--cache-frac", "0.5", "--backend", "ray", "--address", "127.0.0.1:1", "--out", str(out)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2 and "no Ray cluster answers at '127.0.0.1:1'" in run.stderr, run.stderr
    assert not out.exists()
    for address in ("localhost", "ray://:10001", "host:port"):
        with pytest.raises(ValueError, match="is not HOST:PORT, ray://HOST:PORT, 'auto' or 'local'"):
            sweep_ray.check_address(address)


def test_backend_and_address_from_a_grid_file_and_their_errors(recorded: Path, tmp_path: Path) -> None:
    toml = tmp_path / "grid.toml"
    toml.write_text(f'traces = ["{recorded}"]\npolicies = ["{POLICIES[0]}"]\ncache_frac = [0.5]\nbackend = "ray"\n'
                    'address = "auto"\n')  # fmt: skip
    loaded = SweepGrid.from_toml(toml)
    assert (loaded.backend, loaded.address) == ("ray", "auto")
    with pytest.raises(ValueError, match="unknown sweep backend 'dask'; the backends are local, ray"):
        SweepGrid.from_toml(toml, backend="dask")
    with pytest.raises(ValueError, match=r"a Ray address \('auto'\) is for the ray backend, not 'local'"):
        SweepGrid.from_toml(toml, backend="local")
    with pytest.raises(ValueError, match=r"jobs \(2\) is for the local backend; on ray each run takes one"):
        sweep(loaded, tmp_path / "r.csv", jobs=2, progress=False)
    assert not (tmp_path / "r.csv").exists()
