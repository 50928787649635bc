"""bench/control.py runs: a smoke test of the program (--reps 2), no timing thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from json_shape import assert_paired, assert_positive

ROOT = Path(__file__).resolve().parents[2]

SUMMARY = {"median_ms", "p90_ms", "runs_ms"}
#: Each kind of control call: the same-replica and other-replica call latencies,
#: and the other replica's letter delivery (post -> applied by the turn's replica).
SIDES = {"same", "other", "other_delivery"}


def _assert_summary(where: str, figure: dict[str, Any], runs: int) -> None:
    """A median and p90 of `runs` positive runs, between the runs' extremes."""
    assert set(figure) == SUMMARY, (where, figure)
    values = figure["runs_ms"]
    assert len(values) == runs, (where, figure)
    assert_positive(where, figure["median_ms"], figure["p90_ms"], *values)
    assert min(values) <= figure["median_ms"] <= figure["p90_ms"] <= max(values), (where, figure)


@pytest.mark.timeout(300)
def test_a_tiny_run_writes_both_paths_and_their_paired_ratios(
    fresh_database_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "control.json"
    run = subprocess.run(
        [sys.executable, "bench/control.py", "--reps", "2", "--lost-reps", "1",
         "--dsn", fresh_database_url, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "paired ratios" in run.stdout
    result = json.loads(out.read_text())
    settings, results = result["settings"], result["results"]
    assert (settings["reps"], settings["lost_reps"]) == (2, 1)
    assert settings["database"] == "dsn"

    assert set(results) == {"cancel", "tool_results", "lost_notify_cancel"}
    for kind in ("cancel", "tool_results"):
        assert set(results[kind]) == SIDES, kind
        for side in SIDES:
            _assert_summary(f"{kind} {side}", results[kind][side], 2)
    lost = results["lost_notify_cancel"]
    assert set(lost) == {"other", "other_delivery"}
    for side, figure in lost.items():
        _assert_summary(f"lost {side}", figure, 1)

    assert set(result["ratios"]) == {"cancel_other_vs_same", "tool_results_other_vs_same"}
    for name, ratio in result["ratios"].items():
        assert_paired(name, ratio, 2)
    # The paths were the ones named: no letter for a call on the turn's own
    # replica, one per call on another; and none left behind.
    assert result["letters_posted"] == {
        "cancel": {"same": 0, "other": 2},
        "tool_results": {"same": 0, "other": 2},
        "lost_notify_cancel": {"other": 1},
    }
    assert result["letters_left"] == 0
