"""Long-conversation fixtures: the service over loopback gRPC on the session's vLLM worker.

The worker runs the tiny random-weight model at a 1,024-token context
(`VLLM_MAX_MODEL_LEN`), so a few turns with long replies pass the context.
`RecordingEngine` keeps every engine request the service sent, so tests
compare the prompts the model was given with the prompts rebuilt from the log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from conversation_helpers import conversation_stub
from worker_processes import WorkerProcess

from turnlog.conversation.application import ConversationApplication
from turnlog.conversation.tools import builtin_tools
from turnlog.engine.v1 import engine_pb2
from turnlog.eventlog import wall_clock_us
from turnlog.storage import PostgresEventStore
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.client import EngineClient, PooledRequestStream


class RecordingEngine(EngineClient):
    """An `EngineClient` that keeps a copy of every generation request it sends."""

    def __init__(self, targets: list[str]) -> None:
        super().__init__(targets)
        self.sent: list[engine_pb2.StartGeneration] = []

    def generate(
        self,
        start: engine_pb2.StartGeneration,
        *,
        affinity_key: str | None = None,
        model: str = "",
    ) -> PooledRequestStream:
        copy = engine_pb2.StartGeneration()
        copy.CopyFrom(start)
        self.sent.append(copy)
        return super().generate(start, affinity_key=affinity_key, model=model)


@dataclass
class Service:
    stub: sgrpc.ConversationServiceStub
    app: ConversationApplication
    engine: RecordingEngine
    store: PostgresEventStore


@pytest.fixture
async def service(store: PostgresEventStore, vllm_worker: WorkerProcess) -> AsyncIterator[Service]:
    async with RecordingEngine([vllm_worker.target]) as engine:
        app = ConversationApplication(store, engine, tools=builtin_tools(wall_clock_us))
        try:
            async with conversation_stub(app) as stub:
                yield Service(stub, app, engine, store)
        finally:
            await app.shutdown()
