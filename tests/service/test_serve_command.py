"""`turnlog serve` as the README runs it: embedded database, no configuration."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

LISTENING = re.compile(r"turnlog serving gRPC on (\S+:\d+)")


def _start(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNLOG_")}
    env |= {"TURNLOG_DATA_DIR": str(data_dir), "TURNLOG_LISTEN": "127.0.0.1:0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "turnlog.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if match := LISTENING.search(line):
            return proc, match.group(1)
    proc.communicate(timeout=10)
    pytest.fail("turnlog serve exited without listening:\n" + "".join(seen))


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return int(response.status)


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)  # drains and closes the pipe
    return proc.returncode


def test_serve_starts_embedded_postgres_reports_healthy_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "turnlog-data"
    proc, address = _start(data_dir)
    try:
        assert _health(address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        code = _stop(proc)
    assert code == 0
    # The embedded server's data folder persists for the next start.
    assert any((data_dir / "postgres").iterdir())

    proc, address = _start(data_dir)
    try:
        assert _health(address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert _stop(proc) == 0
