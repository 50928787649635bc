"""Fixtures of the robustness tests: `turnlog serve`'s own gRPC server over a scripted worker.

The server is built by `turnlog.api.server.grpc_server`, the function
`turnlog serve` uses, so every interceptor and service it registers is the
one under test. No vLLM engine is ever started here. The budget and the
long run: fuzz_harness.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from conversation_helpers import USER_SCOPES
from fuzz_harness import FIXED_NOW_US, SCRIPT, LogRecords, Serving, seed_data
from grpc_health.v1 import health_pb2

from turnlog.api.server import grpc_server
from turnlog.auth.authenticator import Authenticator
from turnlog.auth.channel import credentialed_channel
from turnlog.auth.settings import AuthSettings
from turnlog.conversation.application import ConversationApplication, ServiceDefaults
from turnlog.conversation.tools import builtin_tools
from turnlog.engine.v1 import engine_pb2_grpc
from turnlog.storage import PostgresEventStore
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.client import EngineClient
from turnlog.worker.scripted import Script, ScriptedEngine
from turnlog.worker.service import EngineServicer


@pytest.fixture
def server_log() -> Iterator[LogRecords]:
    handler = LogRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@pytest.fixture
async def serving(
    store: PostgresEventStore, database_url: str, server_log: LogRecords, tmp_path: Path
) -> AsyncIterator[Serving]:
    worker = grpc.aio.server()
    engine_pb2_grpc.add_EngineServiceServicer_to_server(
        EngineServicer(ScriptedEngine(Script.from_json(SCRIPT))), worker
    )
    worker_port = worker.add_insecure_port("127.0.0.1:0")
    await worker.start()
    async with EngineClient([f"127.0.0.1:{worker_port}"]) as engine:
        clock = lambda: FIXED_NOW_US  # noqa: E731
        app = ConversationApplication(
            store,
            engine,
            tools=builtin_tools(clock),
            defaults=ServiceDefaults(max_tool_round_trips=2),
            clock=clock,
        )
        authenticator = Authenticator(AuthSettings.local_default(tmp_path / "data"))
        assert authenticator.local_key is not None
        token = authenticator.local_key.mint_token(subject="fuzz", scopes=USER_SCOPES, ttl_s=3600)
        server, health = grpc_server(app, authenticator=authenticator)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        try:
            async with (
                credentialed_channel(f"127.0.0.1:{port}", token) as channel,
                await psycopg.AsyncConnection.connect(database_url, autocommit=True) as reader,
            ):
                seed = await seed_data(sgrpc.ConversationServiceStub(channel))
                server_log.records.clear()
                yield Serving(channel, app, reader, seed, server_log)
        finally:
            await server.stop(0)
            await authenticator.aclose()
            await app.shutdown()
    await worker.stop(0)
