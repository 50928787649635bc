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
from worker_processes import printed_token

from turnlog.v1 import conversation_pb2, conversation_service_pb2, conversation_service_pb2_grpc

SECRET_CONTENT = "zebra quartz 4111 private words"
LISTENING = re.compile(r"turnlog serving gRPC on (\S+:\d+)")
SPAWNED = re.compile(r"spawned engine worker (\d+) serving on")


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


def _stop(proc: subprocess.Popen[str], rest: list[str] | None = None) -> int:
    """SIGTERM; its exit code. The output not yet read goes into `rest`."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)  # drains and closes the pipe
    if rest is not None:
        rest.append(out or "")
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


def test_serve_spawns_its_own_worker_and_runs_a_turn(tmp_path: Path) -> None:
    """`--spawn-worker` (what `make serve` uses with a model) gives a working service alone."""
    script = tmp_path / "script.json"
    script.write_text('{"model": "scripted-demo", "default": {"text": "Hello from a child."}}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNLOG_")}
    env |= {"TURNLOG_DATA_DIR": str(tmp_path / "data"), "TURNLOG_LISTEN": "127.0.0.1:0"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "turnlog.cli",
            "serve",
            "--spawn-worker",
            f"--backend scripted --script {script}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = worker_pid = None
        printed = []
        for line in proc.stdout:
            printed.append(line)
            if spawned := SPAWNED.search(line):
                worker_pid = int(spawned.group(1))
            if match := LISTENING.search(line):
                address = match.group(1)
                break
        assert address is not None, "turnlog serve exited without listening"
        # Deny by default: the printed token is the way in.
        token = printed_token("".join(printed))
        credential = (("authorization", f"Bearer {token}"),)
        with grpc.insecure_channel(address) as channel:
            stub = conversation_service_pb2_grpc.ConversationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateConversation(
                    conversation_service_pb2.CreateConversationRequest(request_id="demo-1"),
                    timeout=30,
                )
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            created = stub.CreateConversation(
                conversation_service_pb2.CreateConversationRequest(request_id="demo-1"),
                timeout=30,
                metadata=credential,
            ).conversation
            sent = stub.SendMessage(
                conversation_service_pb2.SendMessageRequest(
                    input=conversation_service_pb2.TurnInput(
                        conversation=created.name, request_id="turn-1", content=SECRET_CONTENT
                    )
                ),
                timeout=60,
                metadata=credential,
            )
        assert sent.turn.status == conversation_pb2.TURN_STATUS_COMPLETED
        assert sent.assistant_message.content == "Hello from a child."
    finally:
        code = _stop(proc, printed)
    assert code == 0
    # At the default log level: the token only where it was printed, no content.
    output = "".join(printed)
    assert output.count(token) == 1
    assert SECRET_CONTENT not in output
    # The child worker went with the service.
    assert worker_pid is not None, "the service did not log its spawned worker"
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)


def test_migrate_command_applies_pending_migrations_once(fresh_database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNLOG_")}
    env["TURNLOG_DATABASE_URL"] = fresh_database_url

    def migrate() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "turnlog.cli", "migrate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout

    assert "0001_event_log" in migrate()
    again = migrate()
    assert "none pending" in again
    assert "0001_event_log" not in again


def _serve_exit(args: list[str], data_dir: Path) -> tuple[int, str]:
    """Runs `turnlog serve ARGS` that is expected to exit at once; (code, output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNLOG_")}
    env["TURNLOG_DATA_DIR"] = str(data_dir)
    done = subprocess.run(
        [sys.executable, "-m", "turnlog.cli", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr


def test_serve_refuses_a_non_loopback_address_without_authentication(tmp_path: Path) -> None:
    code, output = _serve_exit(["--listen", "0.0.0.0:0"], tmp_path / "data")
    assert code == 2
    assert "refusing to serve 0.0.0.0:0 without authentication" in output
    assert not (tmp_path / "data" / "postgres").exists()  # refused before anything started


def test_serve_insecure_is_explicit_and_loud(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNLOG_")}
    env |= {"TURNLOG_DATA_DIR": str(tmp_path / "data"), "TURNLOG_LISTEN": "127.0.0.1:0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "turnlog.cli", "serve", "--insecure"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        printed = []
        address = None
        for line in proc.stdout:
            printed.append(line)
            if match := LISTENING.search(line):
                address = match.group(1)
                break
        assert address is not None, "".join(printed)
        output = "".join(printed)
        assert "AUTHENTICATION IS OFF (--insecure)" in output
        assert "turnlog token" not in output
        with grpc.insecure_channel(address) as channel:
            stub = conversation_service_pb2_grpc.ConversationServiceStub(channel)
            listed = stub.ListConversations(
                conversation_service_pb2.ListConversationsRequest(), timeout=30
            )
        assert list(listed.conversations) == []
    finally:
        assert _stop(proc) == 0
