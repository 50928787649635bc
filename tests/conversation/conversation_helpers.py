"""Helpers of the conversation tests: in-process workers and the service on loopback."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from turnlog.api.server import grpc_server
from turnlog.auth.authenticator import Authenticator
from turnlog.auth.channel import credentialed_channel
from turnlog.auth.local import LocalSigningKey
from turnlog.auth.principal import DEFAULT_TENANT, Scope
from turnlog.auth.settings import AuthSettings
from turnlog.conversation.application import ConversationApplication
from turnlog.engine.v1 import engine_pb2_grpc
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.backend import EngineBackend
from turnlog.worker.scripted import Script, ScriptedEngine
from turnlog.worker.service import EngineServicer

__all__ = [
    "USER_SCOPES",
    "ScriptedWorker",
    "ServedApp",
    "conversation_stub",
    "engine_server",
    "error_reason",
    "scripted_worker_server",
    "served",
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


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The `ErrorInfo` reason of a failed call's status details ("" when none)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


#: The scopes of an ordinary caller (everything but `admin`).
USER_SCOPES = (Scope.READ, Scope.WRITE, Scope.HISTORY, Scope.IMPORT)


class ServedApp:
    """`turnlog serve`'s gRPC server over an app, on loopback, with its local signing key.

    `key` signs tokens this server accepts (`token`); `stub` opens a stub whose
    channel sends one.
    """

    def __init__(self, address: str, key: LocalSigningKey) -> None:
        self.address = address
        self.key = key

    def token(
        self,
        tenant: str = DEFAULT_TENANT,
        scopes: Sequence[Scope] = USER_SCOPES,
        *,
        ttl_s: float = 3600.0,
        subject: str = "test",
    ) -> str:
        """A token this server accepts: `tenant`, `scopes`, valid for `ttl_s`."""
        return self.key.mint_token(tenant, scopes, subject=subject, ttl_s=ttl_s)

    @contextlib.asynccontextmanager
    async def stub(
        self,
        tenant: str = DEFAULT_TENANT,
        scopes: Sequence[Scope] = USER_SCOPES,
        *,
        token: str | None = "",
    ) -> AsyncIterator[sgrpc.ConversationServiceStub]:
        """A stub sending a token of `tenant` with `scopes` (or `token`; None: no credential)."""
        credential = self.token(tenant, scopes) if token == "" else token
        async with credentialed_channel(self.address, credential) as channel:
            yield sgrpc.ConversationServiceStub(channel)


@contextlib.asynccontextmanager
async def served(
    app: ConversationApplication,
    *,
    auth: Callable[[Path], AuthSettings] = AuthSettings.local_default,
    **options: Any,
) -> AsyncIterator[ServedApp]:
    """`turnlog serve`'s own gRPC server over `app` (authentication and validation on).

    Args:
        app: the application served.
        auth: the authentication settings for a data folder (a fresh
            temporary one); they must include the local key.
        options: `grpc_server` options (rate limit, re-check interval).
    """
    with tempfile.TemporaryDirectory(prefix="turnlog-test-auth-") as data_dir:
        settings = auth(Path(data_dir))
        authenticator = Authenticator(settings)
        assert authenticator.local_key is not None
        server, _ = grpc_server(app, authenticator=authenticator, **options)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            yield ServedApp(f"127.0.0.1:{port}", authenticator.local_key)
        finally:
            await server.stop(0)
            await authenticator.aclose()


@contextlib.asynccontextmanager
async def conversation_stub(
    app: ConversationApplication,
) -> AsyncIterator[sgrpc.ConversationServiceStub]:
    """A stub of `turnlog serve`'s own gRPC server over `app`, on loopback.

    Authentication and validation run as in `turnlog serve`; the stub's
    channel sends a token of the default tenant with every scope but `admin`.
    """
    async with served(app) as serving, serving.stub() as stub:
        yield stub
