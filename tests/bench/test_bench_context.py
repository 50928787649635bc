"""bench/context.py runs: a smoke test of the program (--quick) on the session's vLLM worker.

It is given the session's worker (`--worker`), so no second vLLM engine
starts, and this test's own database (`--dsn`). No timing thresholds: only
the shape of the JSON and that what it measures is consistent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from worker_processes import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.vllm
@pytest.mark.timeout(400)
def test_quick_run_writes_figures_beside_the_first_turn(
    vllm_worker: WorkerProcess, fresh_database_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "context.json"
    run = subprocess.run(
        [sys.executable, "bench/context.py", "--quick", "--worker", vllm_worker.target,
         "--dsn", fresh_database_url, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=380,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ratios:" in run.stdout
    result = json.loads(out.read_text())
    assert result["settings"]["checkpoints"] == [1, 10]
    for side in ("stepped", "one_per_turn", "compact"):
        for turn in (1, 10):
            row = result["figures"][f"{side}_turn_{turn}"]
            assert row["prompt_tokens"] > 0
            assert row["ttft_ms"] > 0
            assert row["decide_ms"] > 0
        assert 0 <= result["figures"][f"{side}_prefix_cache_hit_rate"] <= 1
        turns = result["turns"][side]
        assert len(turns) == 12
        # The service's count is the engine's, turn after turn.
        assert all(t["prompt_tokens"] == t["engine_prompt_tokens"] for t in turns)
        assert all(t["prompt_tokens"] + 120 <= 1024 for t in turns)
        assert turns[-1]["left_out_turns"] > 0  # 12 long turns pass the context
        ratio = result["ratios"][f"{side}_prompt_tokens_turn_10_vs_turn_1"]
        assert ratio > 0
    assert "hit_rate_stepped_vs_one_per_turn" in result["ratios"]
    # Under compact, 12 long turns summarize old turns and later prompts hold the summary.
    compact = result["turns"]["compact"]
    assert result["figures"]["compact_compactions"] == sum(t["compacted"] for t in compact) > 0
    assert any(t["summary_in_prompt"] for t in compact)
