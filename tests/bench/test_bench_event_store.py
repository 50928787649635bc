"""bench/event_store.py runs: a smoke test of the program (--quick), no timing thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from json_shape import assert_paired

ROOT = Path(__file__).resolve().parents[2]

SCENARIOS = {
    "append_1",
    "append_4",
    "append_16",
    "plain_insert_16",
    "eventsourcing_16",
    "append_16_one_stream",
    "append_16_batch10",
    "read_one_stream_raw",
    "read_one_stream_decoded",
    "read_all_streams_raw",
}
RATIOS = {"append_16_vs_plain_insert", "append_16_vs_eventsourcing"}


@pytest.mark.timeout(120)
def test_quick_run_writes_positive_figures_and_paired_ratios(
    fresh_database_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "event_store.json"
    run = subprocess.run(
        [sys.executable, "bench/event_store.py", "--quick", "--dsn", fresh_database_url,
         "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "paired ratios" in run.stdout
    assert "EXCLUSIVE MODE" in run.stdout
    result = json.loads(out.read_text())
    reps = result["repetitions"]
    assert reps == 2
    assert set(result["events_per_second"]) == SCENARIOS
    for name in SCENARIOS:
        assert result["events_per_second"][name] > 0, name
        assert len(result["runs"][name]) == reps, name
        assert all(v > 0 for v in result["runs"][name]), name
    assert set(result["ratios"]) == RATIOS
    for name, ratio in result["ratios"].items():
        assert_paired(name, ratio, reps)
    # The baselines write the same events as the store's 16 writers.
    counts = result["events_per_scenario"]
    assert counts["eventsourcing_16"] == counts["plain_insert_16"] == counts["append_16"]
    assert counts["append_16"] == result["events_per_run"]
    assert "EXCLUSIVE MODE" in result["notes"]["eventsourcing_16"]
