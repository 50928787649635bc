"""Helpers of the engine tests: worker subprocesses, raw streams.

One vLLM worker (tiny random-weight model, built per session) serves the
whole session; scripted workers are cheap and started per need. Workers are
subprocesses so that tests can kill them, and so that vLLM's and torch's
import-time warnings stay out of this process (warnings are errors here).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from turnlog.engine.v1 import engine_pb2, engine_pb2_grpc

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
VLLM_MAX_MODEL_LEN = 512

# Replies of the shared scripted worker; "slow" prompts give tests time to act mid-stream.
SCRIPT: dict[str, Any] = {
    "model": "scripted-test",
    "max_context_tokens": VLLM_MAX_MODEL_LEN,
    "replies": [
        {"match": "slow", "text": "s" * 400, "token_delay_ms": 5},
        {
            "match": "weather",
            "text": "Checking.",
            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
        },
        {
            "match": "fail-early",
            "text": "never",
            "fail_at_token": 0,
            "fail_reason": "ENGINE_UNAVAILABLE",
        },
        {
            "match": "fail-late",
            "text": "partial output",
            "fail_at_token": 3,
            "fail_reason": "ENGINE_UNAVAILABLE",
        },
    ],
    "default": {"text": "Hello from the scripted engine. " * 4},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class WorkerProcess:
    """A `turnlog worker` subprocess, logging to a file."""

    def __init__(self, args: list[str], log_path: Path, port: int | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> WorkerProcess:
        env = {**os.environ, **WORKER_ENV}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "turnlog.cli",
                    "worker",
                    *self.args,
                    "--listen",
                    self.target,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        marker = f"serving on port {self.port}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_tail()}")
            if marker in self.log_path.read_text(errors="replace"):
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"worker did not start in {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the worker and its children (vLLM's engine core)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (graceful drain) and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()


@dataclass(frozen=True)
class Backend:
    kind: str
    target: str


class RawStream:
    """A bare Generate stream, for tests that need to see every message."""

    def __init__(self, stub: engine_pb2_grpc.EngineServiceStub) -> None:
        self.call = stub.Generate()
        self._buffer: list[engine_pb2.GenerateResponse] = []

    async def start(self, start: engine_pb2.StartGeneration) -> None:
        await self.call.write(engine_pb2.GenerateRequest(start=start))

    async def cancel(self, request_id: str) -> None:
        await self.call.write(
            engine_pb2.GenerateRequest(cancel=engine_pb2.CancelGeneration(request_id=request_id))
        )

    async def read(self, timeout_s: float = 30.0) -> engine_pb2.GenerateResponse:
        """The next message; a delta_batch is split into single deltas."""
        if self._buffer:
            return self._buffer.pop(0)
        message = await asyncio.wait_for(self.call.read(), timeout_s)
        assert message is not grpc.aio.EOF, "stream ended unexpectedly"
        assert isinstance(message, engine_pb2.GenerateResponse)
        if message.HasField("delta_batch"):
            assert len(message.delta_batch.deltas) > 1
            self._buffer = [
                engine_pb2.GenerateResponse(delta=d) for d in message.delta_batch.deltas
            ]
            return self._buffer.pop(0)
        return message

    async def collect(
        self, request_ids: set[str], timeout_s: float = 60.0
    ) -> dict[str, list[engine_pb2.GenerateResponse]]:
        """Read until every named request got its done or error."""
        out: dict[str, list[engine_pb2.GenerateResponse]] = {rid: [] for rid in request_ids}
        open_ids = set(request_ids)
        deadline = time.monotonic() + timeout_s
        while open_ids:
            message = await self.read(max(deadline - time.monotonic(), 0.01))
            kind = message.WhichOneof("kind")
            rid = getattr(message, kind).request_id
            out.setdefault(rid, []).append(message)
            if kind in ("done", "error"):
                open_ids.discard(rid)
        return out


def request_id_of(message: engine_pb2.GenerateResponse) -> str:
    kind = message.WhichOneof("kind")
    rid: str = getattr(message, kind).request_id
    return rid


async def wait_idle(stub: engine_pb2_grpc.EngineServiceStub, timeout_s: float = 10.0) -> None:
    """Wait until GetLoad reports no running or waiting requests; fail otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = await stub.GetLoad(engine_pb2.GetLoadRequest())
        if load.running_requests == 0 and load.waiting_requests == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"worker still busy: {load}")
        await asyncio.sleep(0.05)
