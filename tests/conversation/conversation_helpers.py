"""Helpers of the conversation tests: an in-process scripted worker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from turnlog.engine.v1 import engine_pb2_grpc
from turnlog.worker.scripted import Script, ScriptedEngine
from turnlog.worker.service import EngineServicer

__all__ = ["ScriptedWorker", "scripted_worker_server"]


class ScriptedWorker:
    """An in-process scripted EngineService on loopback."""

    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server = server
        self.target = f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def scripted_worker_server(script: dict[str, Any]) -> AsyncIterator[ScriptedWorker]:
    """An in-process scripted worker with `script`, on a free loopback port."""
    server = grpc.aio.server()
    engine_pb2_grpc.add_EngineServiceServicer_to_server(
        EngineServicer(ScriptedEngine(Script.from_json(script))), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield ScriptedWorker(server, port)
    finally:
        await server.stop(0)
