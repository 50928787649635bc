"""bench/turns.py runs: a smoke test of the program, no timing thresholds.

`--quick --worker` runs every phase at tiny sizes on the session's vLLM
worker (`vllm_worker`): it starts no engine and no vLLM HTTP server of its
own, so the vllm_http sides, the ratios against them and the worker's CPU
column come only from a full run. The authentication phase runs on scripted
workers of its own, as the scripted phase does.
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

from turnlog.conversation.options import ServiceDefaults

ROOT = Path(__file__).resolve().parents[2]

# (300 s: the first vLLM test of a session also waits for the session worker to start)
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

SCRIPTED_ROW = {"side", "profile", "concurrency", "turns", "turns_per_s", "runs_turns_per_s",
                "p50_ms", "p99_ms"}  # fmt: skip
#: A row of the authentication phase: a scripted row with its mode, each run's p99,
#: and the CPU per turn of the side's service and of the client.
AUTH_ROW = SCRIPTED_ROW | {"mode", "runs_p99_ms", "serve_cpu_ms_per_turn",
                           "bench_cpu_ms_per_turn"}  # fmt: skip
#: The paired ratios of each mode and level in the authentication phase.
AUTH_RATIOS = ("turns_per_s_ratio", "p99_ratio", "serve_cpu_ratio", "bench_cpu_ratio")
VLLM_ROW = {"side", "mode", "concurrency", "turns", "output_tokens", "tokens_per_s",
            "runs_tokens_per_s", "p50_ms", "p99_ms"}  # fmt: skip
#: Database counters per turn that are exact even with --quick's short settle time.
EXACT_COUNTERS = ("append_xacts_per_turn", "write_xacts_per_turn", "wal_bytes_per_turn")
#: The sides of a --worker run (no vllm_http sides), service profile "none".
VLLM_SIDES = ["worker_direct_stream", "service_stream_none", "worker_direct_unary",
              "service_unary_none"]  # fmt: skip


def test_quick_run_on_the_session_worker_writes_figures_and_paired_ratios(
    vllm_worker: WorkerProcess, fresh_database_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "turns.json"
    run = subprocess.run(
        [sys.executable, "bench/turns.py", "--quick", "--worker", vllm_worker.target,
         "--dsn", fresh_database_url, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, **WORKER_ENV},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "paired ratios" in run.stdout
    result = json.loads(out.read_text())
    settings, results, ratios = result["settings"], result["results"], result["ratios"]
    # The direct unary side holds deltas as long as the service does.
    assert settings["unary_delta_interval_s"] == ServiceDefaults().unwatched_delta_interval_s
    assert settings["vllm_http"] is False

    scripted = results["scripted"]
    (level,), (profile,), reps = settings["levels"], ["none"], settings["reps"]
    assert [(r["side"], r["profile"], r["concurrency"]) for r in scripted["rows"]] == [
        ("direct", profile, level), ("service", profile, level)]  # fmt: skip
    for row in scripted["rows"]:
        assert set(row) == SCRIPTED_ROW, row
        assert len(row["runs_turns_per_s"]) == reps, row
        assert_positive(row, row["turns"], row["turns_per_s"], *row["runs_turns_per_s"],
                        row["p50_ms"], row["p99_ms"])  # fmt: skip
    (added,) = scripted["added"]
    assert_paired("added", added["turns_per_s_ratio"], reps)
    (commits,) = scripted["commits"]
    assert_positive(commits, commits["turns"], *(commits[k] for k in EXACT_COUNTERS))
    for key, value in commits.items():
        if key == "profile" or (key == "wal_fsyncs_per_turn" and value is None):
            continue  # (no pg_stat_io before PostgreSQL 16)
        assert_positive((key, commits), abs(value) + 1)  # a finite number

    auth, auth_reps = results["auth"], settings["auth_reps"]
    (auth_level,), modes = settings["auth_levels"], ["unary", "stream"]
    assert settings["auth_modes"] == modes
    assert auth["profile"] == settings["auth_profile"] == "none"
    # The sides differ: a call without a token is refused by one, answered by the other.
    assert auth["without_token"] == {"auth": "UNAUTHENTICATED", "noauth": "OK"}
    assert [(r["mode"], r["concurrency"], r["side"]) for r in auth["rows"]] == [
        (m, auth_level, side) for m in modes for side in ("auth", "noauth")]  # fmt: skip
    for row in auth["rows"]:
        assert set(row) == AUTH_ROW, row
        assert row["profile"] == "none", row
        assert len(row["runs_turns_per_s"]) == len(row["runs_p99_ms"]) == auth_reps, row
        assert_positive(row, row["turns"], row["turns_per_s"], *row["runs_turns_per_s"],
                        row["p50_ms"], row["p99_ms"], *row["runs_p99_ms"],
                        row["serve_cpu_ms_per_turn"], row["bench_cpu_ms_per_turn"])  # fmt: skip
    # The same work on both sides of a mode: the same turns.
    assert len({r["turns"] for r in auth["rows"]}) == 1, auth["rows"]
    assert [(x["mode"], x["concurrency"]) for x in auth["compared"]] == [
        (m, auth_level) for m in modes]  # fmt: skip
    for x in auth["compared"]:
        assert set(x) == {"mode", "concurrency", *AUTH_RATIOS}, x
        name = f"{x['mode']}_{x['concurrency']}"
        for key in AUTH_RATIOS:
            assert_paired(f"{name} {key}", x[key], auth_reps)
        assert ratios[f"auth_vs_noauth_turns_{name}"] == x["turns_per_s_ratio"]
        assert ratios[f"auth_vs_noauth_p99_{name}"] == x["p99_ratio"]

    vllm_reps, (c,) = settings["vllm_reps"], settings["vllm_concurrency"]
    rows = {r["side"]: r for r in results["vllm"]}
    assert list(rows) == VLLM_SIDES
    for side, row in rows.items():
        assert set(row) == VLLM_ROW, row
        assert row["mode"] == ("unary" if "unary" in side else "stream"), row
        assert row["concurrency"] == c, row
        assert len(row["runs_tokens_per_s"]) == vllm_reps, row
        assert_positive(row, row["turns"], row["output_tokens"], row["tokens_per_s"],
                        *row["runs_tokens_per_s"], row["p50_ms"], row["p99_ms"])  # fmt: skip
    # The same work on every side: the same turns and tokens.
    assert len({(r["turns"], r["output_tokens"]) for r in rows.values()}) == 1, rows

    service_sides = ["service_stream_none", "service_unary_none"]
    for name in ("vllm_service_stages", "vllm_service_appends_per_turn", "vllm_service_turns"):
        assert list(results[name]) == service_sides, name
    for side in service_sides:
        assert results["vllm_service_turns"][side] == rows[side]["turns"]
        stages = results["vllm_service_stages"][side]
        for stage in ("begin_append", "first_token", "generation", "end_append", "turn"):
            assert stages[stage]["count"] > 0, (side, stage)
            assert_positive((side, stage), stages[stage]["mean_ms"], stages[stage]["ms_per_turn"])
        appends = results["vllm_service_appends_per_turn"][side]
        assert_positive(side, appends["begin"], appends["end"])
    client = results["vllm_client_stages"]
    assert set(client) == {"worker_direct_stream", "worker_direct_unary", "service_stream_none"}
    for side, values in client.items():
        assert set(values) == {"first_token", "generation"}, side
        assert_positive(side, *(v["mean_ms"] for v in values.values()))
    cpu = results["vllm_cpu_ms_per_1k_tokens"]
    assert list(cpu) == VLLM_SIDES
    for side, row in cpu.items():
        assert {"bench", "serve", "total"} <= set(row), (side, row)
        assert_positive((side, row), row["total"], *(v + 1 for v in row.values()))

    assert set(ratios) == {
        f"service_vs_direct_turns_{profile}_{level}",
        *(f"auth_vs_noauth_{what}_{m}_{auth_level}" for what in ("turns", "p99") for m in modes),
        f"vllm_stream_service_vs_worker_direct_{c}",
        f"vllm_unary_service_vs_worker_direct_{c}",
        f"vllm_service_unary_vs_stream_{c}",
    }
    for name, ratio in ratios.items():
        if name.startswith("service_vs_direct"):
            assert_paired(name, ratio, reps)
        elif name.startswith("auth_vs_noauth"):
            assert_paired(name, ratio, auth_reps)
        else:
            assert_paired(name, ratio, vllm_reps)
