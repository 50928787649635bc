"""Helpers of the engine tests: the shared script, raw streams.

Worker subprocesses (`WorkerProcess`) live in tests/worker_processes.py,
shared with the conversation tests.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc
from worker_processes import VLLM_MAX_MODEL_LEN, WorkerProcess

from turnlog.engine.v1 import engine_pb2, engine_pb2_grpc

__all__ = [
    "ENDLESS_TOKENS",
    "ENDLESS_TOKEN_DELAY_MS",
    "SCRIPT",
    "Backend",
    "RawStream",
    "WorkerProcess",
    "request_id_of",
    "wait_idle",
]

# Replies of the shared scripted worker; "slow" prompts give tests time to act
# mid-stream; "endless" ones outlast any abort deadline: ENDLESS_TOKENS of them
# take 12 s on their own (tests/engine/test_faults.py checks the pace).
ENDLESS_TOKENS = 480
ENDLESS_TOKEN_DELAY_MS = 25
SCRIPT: dict[str, Any] = {
    "model": "scripted-test",
    "max_context_tokens": VLLM_MAX_MODEL_LEN,
    "replies": [
        {"match": "slow", "text": "s" * 400, "token_delay_ms": 5},
        {"match": "endless", "text": "e" * 400, "token_delay_ms": ENDLESS_TOKEN_DELAY_MS},
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
