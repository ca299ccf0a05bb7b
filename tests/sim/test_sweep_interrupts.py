"""Sweeps survive what clusters do to them: a torn last row (kill -9, a full disk) is found and run again, never
counted as done; Ctrl-C stops a sweep at once, keeps every finished row and says how to resume."""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specmd.sim import sweep as sweep_module
from specmd.sim.report import report
from specmd.sim.sweep import COLUMNS, SweepGrid, SweepInterrupted, read_results, sweep
from tests.sim.conftest import random_trace

POLICIES = ("none/lru/fetch/standard", "none/least-stale/fetch/standard")


def grid(trace: Path, **overrides) -> SweepGrid:  # type: ignore[no-untyped-def]
    values = {"traces": (str(trace),), "policies": POLICIES, "cache_fracs": (0.1, 0.25), "bandwidths": (5.0,)}
    return SweepGrid(**(values | overrides))


def keys(path: Path) -> list[tuple]:
    return sorted(sweep_module._row_key(row) for row in read_results(path))


@pytest.fixture
def finished(recorded: Path, tmp_path: Path) -> Path:
    """A whole sweep of the recorded trace: 4 runs, 2 Belady baselines and the unbounded cache."""
    path = tmp_path / "whole.csv"
    sweep(grid(recorded), path, jobs=1, progress=False)
    assert len(read_results(path)) == 7
    return path


def torn_copies(finished: Path, tmp_path: Path) -> dict[str, Path]:
    """The finished results with their last row damaged as a crash leaves it, each in its own file."""
    raw = finished.read_bytes()
    last = raw.rstrip(b"\r\n").rfind(b"\n") + 1  # where the last row starts
    row = raw[last:]
    fields = next(csv.reader([row.decode()]))
    number, per_layer = COLUMNS.index("requests"), COLUMNS.index("per_layer")

    def line(values: list[str]) -> bytes:
        text = io.StringIO()
        csv.writer(text).writerow(values)
        return text.getvalue().encode()

    variants = {
        "cut mid-line": raw[:-200],
        "cut before its line end": raw[:-2],
        "cut inside a quoted field": raw[: last + row.index(b'"') + 5],
        "a field short, with a line end": raw[:last] + line(fields[:-1]),
        "a number cut short, with a line end": raw[:last] + line([*fields[:number], "12e", *fields[number + 1 :]]),
        "per_layer cut short, with a line end": raw[:last]
        + line([*fields[:per_layer], fields[per_layer][:30], *fields[per_layer + 1 :]]),
        "a line end inside a quote": raw[:last] + row[: row.rfind(b"[")] + b"[{\r\n",
    }
    paths = {}
    for name, data in variants.items():
        path = tmp_path / (name.replace(" ", "-").replace(",", "") + ".csv")
        path.write_bytes(data)
        paths[name] = path
    return paths


def test_a_torn_last_row_is_left_out_then_run_again(
    recorded: Path, finished: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole = keys(finished)
    for name, path in torn_copies(finished, tmp_path).items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="specmd.sim.sweep"):
            assert len(read_results(path)) == 6, name  # never counted as done
        assert [r.getMessage() for r in caplog.records] == [
            f"{path}: left out its last row, torn by an interrupted write (a resumed sweep runs it again)"
        ], name
        files = report(path, tmp_path / f"report-{path.stem}")  # a report does not crash on it
        assert "From `" in files[0].read_text() and "6 runs" in files[0].read_text()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="specmd.sim.sweep"):
            new = sweep(grid(recorded), path, jobs=1, progress=False)
        assert len(new) == 1, name  # the torn run, again
        assert [r.getMessage() for r in caplog.records] == [
            f"{path}: cut off its last row, torn by an interrupted write; that run runs again"
        ], name
        assert keys(path) == whole, name  # each run exactly once
        assert path.read_bytes().endswith(b"\r\n") and sweep(grid(recorded), path, jobs=1, progress=False) == []


def test_a_torn_or_missing_header_starts_the_file_again(recorded: Path, finished: Path, tmp_path: Path) -> None:
    header = finished.read_bytes().split(b"\n")[0] + b"\n"
    for data in (b"", header[:30], header[:-2], header):
        path = tmp_path / "r.csv"
        path.write_bytes(data)
        assert read_results(path) == []
        assert len(sweep(grid(recorded), path, jobs=1, progress=False)) == 7
        assert keys(path) == keys(finished)
    path.write_bytes(b"trace,policy\r\nx,y\r\n")
    with pytest.raises(ValueError, match="other columns"):
        read_results(path)


def test_a_damaged_row_before_the_last_is_an_error(finished: Path, tmp_path: Path) -> None:
    lines = finished.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3][:100] + b"\r\n"
    path = tmp_path / "r.csv"
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=rf"{path}, line 4: a damaged row \(\d+ fields of {len(COLUMNS)}\)"):
        read_results(path)
    with pytest.raises(ValueError, match="line 4: a damaged row"):
        report(path, tmp_path / "report")


def test_a_write_that_fails_part_way_is_cut_back(
    recorded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the row being written is taken back off, so the file stays whole rows."""
    path = tmp_path / "r.csv"
    sweep(grid(recorded, cache_fracs=(0.1,), policies=POLICIES[:1]), path, jobs=1, progress=False)
    before = path.read_bytes()
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        if len(data) > 100:  # a row: half of it lands, then the disk is full
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(sweep_module.os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        sweep(grid(recorded), path, jobs=1, progress=False)
    assert path.read_bytes() == before
    monkeypatch.undo()
    assert len(sweep(grid(recorded), path, jobs=1, progress=False)) == 7 - 3  # less lru@10%, Belady, unbounded
    assert len(keys(path)) == 7


def test_ctrl_c_during_a_write_waits_for_the_row(
    recorded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a row is written: the row lands whole and is counted, then the sweep stops."""
    path = tmp_path / "r.csv"
    real_fsync, rows = os.fsync, []

    def fsync_then_ctrl_c(fd: int) -> None:
        real_fsync(fd)
        rows.append(fd)
        if len(rows) == 3:  # the header, then two rows
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(sweep_module.os, "fsync", fsync_then_ctrl_c)
    with pytest.raises(SweepInterrupted) as stop:
        sweep(grid(recorded), path, jobs=1, progress=False)
    assert (stop.value.done, stop.value.total, stop.value.path) == (2, 7, path)
    assert len(read_results(path)) == 2 and path.read_bytes().endswith(b"\r\n")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_between_runs_keeps_the_finished_rows(
    recorded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.csv"
    real_run, started = sweep_module.run_one, []

    def run_then_ctrl_c(*args, **kwargs):  # type: ignore[no-untyped-def]
        started.append(1)
        if len(started) == 4:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_one", run_then_ctrl_c)
    with pytest.raises(SweepInterrupted) as stop:
        sweep(grid(recorded), path, jobs=1, progress=False)
    assert stop.value.done == 3 and len(read_results(path)) == 3
    monkeypatch.undo()
    assert len(sweep(grid(recorded), path, jobs=1, progress=False)) == 4
    assert len(keys(path)) == len(set(keys(path))) == 7


def test_ctrl_c_stops_a_parallel_sweep_at_once_and_it_resumes(tmp_path: Path) -> None:
    """`specmd sweep` in 2 processes, Ctrl-C from a terminal (the whole process group), then the same command."""
    trace = random_trace(0, layers=8, experts=32, top_k=4, tokens=1000).save(tmp_path / "trace.npz")
    out = tmp_path / "r.csv"
    args = ["sweep", str(trace), "--policy", POLICIES[0], "--policy", POLICIES[1], "--cache-frac", "0.05", "0.1",
            "0.2", "0.3", "--bandwidth-gbps", "5", "native", "--jobs", "2", "--out", str(out)]  # fmt: skip
    exe = str(Path(sys.executable).with_name("specmd"))
    env = os.environ | {"COLUMNS": "200"}
    process = subprocess.Popen(
        [exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while (not out.exists() or out.read_bytes().count(b"\n") < 3) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    sent = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the sweep and its workers
    stdout, stderr = process.communicate(timeout=60)
    took = time.monotonic() - sent
    assert process.returncode == 130, stderr
    assert took < 5, f"took {took:.1f} s to stop"
    assert "Traceback" not in stderr and stdout == ""
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, stderr
    done = len(read_results(out))
    assert 2 <= done < 26 and out.read_bytes().endswith(b"\r\n")
    assert lines[0].startswith(f"interrupted: {done} of 26 runs are in {out}; run the same command again to resume: ")
    command = shlex.split(lines[0].split("resume: ", 1)[1])
    assert command == ["specmd", *args]
    again = subprocess.run([exe, *command[1:]], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert f"{26 - done} new runs of 26" in again.stdout
    rows = keys(out)
    assert len(rows) == len(set(rows)) == 26
