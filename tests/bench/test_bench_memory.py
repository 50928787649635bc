"""bench/memory.py runs: a smoke test of the program (--quick), no timing or size thresholds.

50 streams and 50 subscriptions instead of 1,000 each; the figures are
meaningless at that size, the shape and the counts are not: every call the
program says it held open was open on serve when it read serve.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STATES = ["started", "idle", "streams", "streams_and_subscriptions", "closed"]
STATE_KEYS = {
    "state", "rss_kib", "rss_mib", "rss_kib_samples", "fds", "threads", "client_connections",
    "worker_connections", "database_connections", "turns_running", "worker_rss_kib",
    "serve_cpu_percent", "database_xacts_per_s",
}  # fmt: skip
COSTS = {"kib_per_stream", "kib_per_subscription", "retained_kib_after_close"}


@pytest.mark.timeout(180)
def test_quick_run_holds_every_stream_and_subscription_open_and_reports_rss_per_state(
    fresh_database_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "memory.json"
    run = subprocess.run(
        [sys.executable, "bench/memory.py", "--quick", "--dsn", fresh_database_url,
         "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "per stream:" in run.stdout
    result = json.loads(out.read_text())
    settings = result["settings"]
    n, m = settings["streams"], settings["subscriptions"]
    assert (n, m) == (50, 50)
    assert settings["serve_env"] == {
        "TURNLOG_TENANT_MAX_RUNNING_TURNS": str(n + 16),
        "TURNLOG_TENANT_REQUESTS_PER_S": "0",
    }
    channels = settings["channels"]
    # Spread: no channel carries more than --per-channel calls.
    assert channels["streams"] * settings["per_channel"] >= n > 1
    assert channels["subscriptions"] * settings["per_channel"] >= m

    states = {s["state"]: s for s in result["states"]}
    assert [s["state"] for s in result["states"]] == STATES
    for name, state in states.items():
        assert set(state) - {"open_streams", "open_subscriptions"} == STATE_KEYS, name
        assert len(state["rss_kib_samples"]) == settings["samples"], name
        assert min(state["rss_kib_samples"]) <= state["rss_kib"] <= max(state["rss_kib_samples"])
        for key in ("rss_kib", "fds", "threads", "worker_rss_kib"):
            assert state[key] > 0, (name, key)
        assert state["worker_connections"] >= 1, name

    # Each channel is a connection of its own, and every held call was open.
    held, both = states["streams"], states["streams_and_subscriptions"]
    assert (held["open_streams"], held["open_subscriptions"]) == (n, 0)
    assert held["turns_running"] == n
    assert held["client_connections"] == channels["streams"]
    assert (both["open_streams"], both["open_subscriptions"]) == (n, m)
    assert both["turns_running"] == n
    assert both["client_connections"] == channels["streams"] + channels["subscriptions"]
    for name in ("idle", "closed"):
        assert states[name]["client_connections"] == 0, name
        assert states[name]["turns_running"] == 0, name

    assert set(result["costs"]) == COSTS
    for key, value in result["costs"].items():
        assert isinstance(value, int | float), (key, value)
        assert math.isfinite(value), (key, value)
    assert result["costs"]["kib_per_stream"] == round(
        (held["rss_kib"] - states["idle"]["rss_kib"]) / n, 2
    )
