"""Helpers of the conversation tests: in-process workers and the service on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from turnlog.api.server import grpc_server
from turnlog.conversation.application import ConversationApplication
from turnlog.engine.v1 import engine_pb2_grpc
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.backend import EngineBackend
from turnlog.worker.scripted import Script, ScriptedEngine
from turnlog.worker.service import EngineServicer

__all__ = [
    "ScriptedWorker",
    "conversation_stub",
    "engine_server",
    "scripted_worker_server",
]


class ScriptedWorker:
    """An in-process scripted EngineService on loopback."""

    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server = server
        self.target = f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def _engine_worker(engine: EngineBackend) -> AsyncIterator[ScriptedWorker]:
    server = grpc.aio.server()
    engine_pb2_grpc.add_EngineServiceServicer_to_server(EngineServicer(engine), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield ScriptedWorker(server, port)
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def scripted_worker_server(script: dict[str, Any]) -> AsyncIterator[ScriptedWorker]:
    """An in-process scripted worker with `script`, on a free loopback port."""
    async with _engine_worker(ScriptedEngine(Script.from_json(script))) as worker:
        yield worker


@contextlib.asynccontextmanager
async def engine_server(engine: EngineBackend) -> AsyncIterator[str]:
    """An in-process EngineService over `engine` (a test's own backend); yields its target."""
    async with _engine_worker(engine) as worker:
        yield worker.target


@contextlib.asynccontextmanager
async def conversation_stub(
    app: ConversationApplication,
) -> AsyncIterator[sgrpc.ConversationServiceStub]:
    """A stub of `turnlog serve`'s own gRPC server over `app` (validation included), on loopback."""
    server, _ = grpc_server(app)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield sgrpc.ConversationServiceStub(channel)
    finally:
        await server.stop(0)
