"""bench/history.py runs: a smoke test of the program (--quick), no timing thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from json_shape import assert_paired

ROOT = Path(__file__).resolve().parents[2]

FIGURES = {
    "fold_read": "ms",
    "fold_decode": "ms",
    "fold_fold": "ms",
    "fold_total": "ms",
    "fold_total_rate": "events/s",
    "verify_total": "ms",
    "snapshot_load": "ms",
    "plain_select_parse": "ms",
    "grpc_read_events_one": "events/s",
    "history_read_events_one": "events/s",
    "store_read_stream_one": "events/s",
    "grpc_read_events_all": "events/s",
    "history_read_events_all": "events/s",
    "grpc_subscribe_catch_up_all": "events/s",
    "history_subscribe_catch_up_all": "events/s",
    "store_read_all": "events/s",
    "export_in_process_conversations": "conversations/s",
    "export_rpc_conversations": "conversations/s",
    "export_plain_query_conversations": "conversations/s",
    "export_rpc_bytes": "MB/s",
    "tenant_read_all": "events/s",
    "tenant_baseline_read_all": "events/s",
    "tenant_subscribe_catch_up": "events/s",
    "tenant_baseline_subscribe_catch_up": "events/s",
}
RATIOS = {
    "fold_vs_plain_parse",
    "snapshot_load_vs_fold",
    "read_events_one_vs_read_stream",
    "read_events_all_vs_read_all",
    "read_events_stream_vs_read_all",
    "export_in_process_vs_plain_query",
    "export_rpc_vs_plain_query",
    "verify_vs_plain_parse",
    "subscribe_rpc_vs_in_process",
    "tenant_read_all_vs_unfiltered",
    "tenant_subscribe_vs_unfiltered",
}


@pytest.mark.timeout(300)
def test_quick_run_writes_positive_figures_and_ratios(
    fresh_database_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "history.json"
    run = subprocess.run(
        [sys.executable, "bench/history.py", "--quick", "--dsn", fresh_database_url,
         "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ratios:" in run.stdout
    result = json.loads(out.read_text())
    figures = result["figures"]
    for name, unit in FIGURES.items():
        assert figures[name]["unit"] == unit, name
        assert figures[name]["median"] > 0, name
        assert figures[name]["runs"], name
        assert all(v > 0 for v in figures[name]["runs"]), name
    assert set(result["ratios"]) == RATIOS, result["ratios"]
    for name, ratio in result["ratios"].items():
        assert_paired(name, ratio, result["settings"]["reps"])
    assert result["fold"]["events"] == result["settings"]["fold_events"]
    assert result["export"]["verified_exports"] == result["settings"]["conversations"]
    tenants = result["tenants"]
    assert tenants["tenants"] == 100
    assert tenants["events"] == tenants["tenants"] * tenants["events_per_tenant"]
    assert len(tenants["measured_tenants"]) == 10
    assert tenants["events_per_measured_tenant"] == tenants["events_per_tenant"]
