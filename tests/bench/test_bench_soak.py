"""bench/soak.py --quick: the short soak of CI (about 30 s), judged by counts.

A small mixed load (turns, streams cancelled and resumed, subscriptions
opening and closing, reads, channels replaced) on one `turnlog serve`. After
the load drains, serve must hold no client connection and no running turn,
and its file descriptors (database connections aside: the pool grows and
shrinks by itself) and threads must be back within a small constant of the
reading before the load. RSS is held only to a generous bound; its slope
over a short run is noise, so it is not judged here (the 10-minute run of
docs/benchmarks.md judges it). No timing thresholds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

OPERATIONS = {"send", "stream", "stream_resume", "subscribe", "read_events", "get", "list",
              "archive", "create"}  # fmt: skip
FD_TOLERANCE = 8
THREAD_TOLERANCE = 4
DATABASE_CONNECTIONS_MAX = 22  # serve's pool (20), its listener and its replica lock
RSS_GROWTH_BOUND_MIB = 256


@pytest.mark.timeout(240)
def test_short_soak_leaves_no_connection_turn_fd_or_thread_behind(
    fresh_database_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "bench/soak.py", "--quick", "--dsn", fresh_database_url,
         "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )  # fmt: skip
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["leaks"] == [], run.stdout[-3000:]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # The load ran: every kind of operation, connections replaced, live events.
    load = result["load"]
    assert set(load["operations"]) == OPERATIONS, load
    assert all(count > 0 for count in load["operations"].values()), load
    assert load["errors"] == {}, load["error_examples"]
    assert load["turns"] > 0
    assert load["channels_opened"] > result["settings"]["channels"]
    assert load["long_subscription_events"] > 0
    assert result["connections"]["client_max_during_load"] > 0

    before, after = result["readings"]["before"], result["readings"]["after"]
    assert after["client_connections"] == 0
    assert after["turns_running"] == 0
    assert after["non_database_fds"] <= before["non_database_fds"] + FD_TOLERANCE
    assert after["threads"] <= before["threads"] + THREAD_TOLERANCE
    assert result["connections"]["database_max"] <= DATABASE_CONNECTIONS_MAX
    assert after["rss_kib"] < before["rss_kib"] + RSS_GROWTH_BOUND_MIB * 1024
    assert len(result["samples"]) >= 3
