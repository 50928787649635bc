"""bench/engine.py runs: a smoke test of the program, no timing thresholds.

`--quick --worker` drives the session's vLLM worker (`vllm_worker`) and starts
no engine of its own, so only the grpc and grpc_held sides run; the
in-process and vLLM HTTP sides need engines of their own and come only from
a full run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from json_shape import assert_paired, assert_positive
from worker_processes import WORKER_ENV, WorkerProcess

ROOT = Path(__file__).resolve().parents[2]

# (300 s: the first vLLM test of a session also waits for the session worker to start)
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

ROW_KEYS = {
    "concurrency",
    "requests",
    "output_tokens",
    "tokens_per_s",
    "ttft_median_ms",
    "runs_tokens_per_s",
    "runs_ttft_median_ms",
}


def test_quick_run_on_the_session_worker_writes_figures_and_paired_ratios(
    vllm_worker: WorkerProcess, tmp_path: Path
) -> None:
    out = tmp_path / "engine.json"
    run = subprocess.run(
        [sys.executable, "bench/engine.py", "--quick", "--worker", vllm_worker.target,
         "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, **WORKER_ENV},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "paired ratios" in run.stdout
    result = json.loads(out.read_text())
    settings = result["settings"]
    reps, levels = settings["reps"], settings["concurrency"]
    assert reps >= 2
    assert levels
    assert settings["sides"] == ["grpc", "grpc_held"]
    for side in settings["sides"]:
        rows = result["results"][side]
        assert [r["concurrency"] for r in rows] == levels, side
        for row in rows:
            assert set(row) == ROW_KEYS, (side, row)
            assert row["output_tokens"] == row["requests"] * settings["max_tokens"], (side, row)
            figures = [row["tokens_per_s"], row["ttft_median_ms"], *row["runs_tokens_per_s"],
                       *row["runs_ttft_median_ms"]]  # fmt: skip
            assert_positive((side, row), *figures)
            assert len(row["runs_tokens_per_s"]) == reps, (side, row)
    assert set(result["ratios"]) == {f"grpc_held_vs_grpc_{c}" for c in levels}
    for name, ratio in result["ratios"].items():
        assert_paired(name, ratio, reps)
