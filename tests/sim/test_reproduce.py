"""`specmd reproduce`: every claim of the paper tested on a trace, with numbers, figures and a verdict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specmd.sim import Trace, load_trace
from specmd.sim.reproduce import (
    DEPENDS,
    NOT_REPRODUCED,
    REPRODUCED,
    QualityPoint,
    Setting,
    _frontier,
    _verdict,
    findings,
    run_replays,
    write_report,
)

VERDICTS = {REPRODUCED, NOT_REPRODUCED, DEPENDS}


def ran(row: str) -> bool:
    """A Table 2 row with measured TTFTs (not dashes)."""
    return row.split("|")[2].strip() != "-"


@pytest.fixture(scope="module")
def replayed(recorded: Path):  # type: ignore[no-untyped-def]
    setting = Setting(capacities=(0.1, 0.25, 0.5), hardware="a100", links=("profile", 25.0))
    return setting, run_replays(load_trace(recorded), setting, jobs=1)


def test_every_claim_gets_numbers_and_a_verdict(replayed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    setting, results = replayed
    assert set(results) == set(setting.mixes())
    found = findings(results, setting)
    assert len(found) == 10 and {f.verdict for f in found} <= VERDICTS
    table1 = next(f for f in found if f.claim.startswith("Table 1"))
    assert table1.verdict == DEPENDS and "config3, config4 need a live run" in table1.condition
    files = write_report(found, results, setting, tmp_path, sources=["tiny.jsonl"])
    report = (tmp_path / "report.md").read_text()
    assert all(f.claim in report for f in found) and "![" in report
    assert all(path.exists() for path in files)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["replays"]) == len(setting.mixes()) and len(data["findings"]) == 10


def test_live_configurations_complete_tables_1_and_2(replayed) -> None:  # type: ignore[no-untyped-def]
    setting, results = replayed
    stand_in = results[("config1", 0.25, "profile")]  # any stats: the tables only read them
    live = {name: stand_in for name in ("config3", "config3+ls", "config4", "config4+ls")}
    found = {f.claim.split(" ")[1]: f for f in findings(results, setting, live) if f.claim.startswith("Table")}
    assert found["1"].verdict in (REPRODUCED, NOT_REPRODUCED) and found["1"].condition == ""
    assert all(ran(row) for row in found["2:"].table[2:]) and len(found["2:"].table) == 2 + 4


def test_verdicts_name_where_a_claim_holds() -> None:
    assert _verdict([True, True], ["a", "b"]) == (REPRODUCED, "")
    assert _verdict([False, False], ["a", "b"]) == (NOT_REPRODUCED, "")
    assert _verdict([True, False], ["with a", "with b"]) == (DEPENDS, "holds with a; not with b")


def test_fetch_priority_on_the_frontier_or_not() -> None:
    points = [QualityPoint("fetch (lossless)", 10.0, 2.0), QualityPoint("fetch-priority", 10.1, 1.5),
              QualityPoint("drop", 12.0, 1.0)]  # fmt: skip
    assert _frontier(points).verdict == REPRODUCED
    points.append(QualityPoint("all int8", 10.0, 1.4))  # as good and faster: Fetch-Priority is dominated
    assert _frontier(points).verdict == NOT_REPRODUCED


def test_traces_of_one_model_concatenate(recorded: Path, tmp_path: Path) -> None:
    trace = load_trace(recorded)
    both = Trace.concat([trace, trace])
    assert len(both.events) == 2 * len(trace.events) and both.num_requests == 2 * trace.num_requests
    assert {e.seq for e in both.events} == {0, 1}


def test_the_command_records_replays_runs_live_and_reports(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"def f(x):\\n    "\n"import os\\n"\n')
    out = tmp_path / "report"
    command = [sys.executable, "-m", "specmd.cli", "reproduce", "--model", "default", "--prompts", str(prompts),
               "--max-new-tokens", "2", "--out", str(out), "--no-quality", "--capacities", "0.05", "0.25",
               "--jobs", "1", "--json"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert {f["verdict"] for f in result["findings"]} <= VERDICTS
    table2 = next(f for f in result["findings"] if f["claim"].startswith("Table 2"))
    assert all(ran(row) for row in table2["table"][2:]) and len(table2["table"]) == 2 + 4  # 3 and 4 ran live
    assert (out / "report.md").exists() and (out / "trace.npz").exists()
