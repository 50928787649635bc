"""Fixtures of the SDK tests: the service's own gRPC server over a scripted worker, and a client.

`service` is `turnlog serve`'s gRPC server (authentication and validation
on) on loopback, over a real PostgreSQL database and an in-process scripted
worker; `client` is an `AsyncTurnlogClient` sending a token it accepts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from conversation_helpers import scripted_worker_server, served
from sdk_helpers import FIXED_NOW_US, SCRIPT, Service

from turnlog.conversation.application import ConversationApplication, ServiceDefaults
from turnlog.conversation.tools import builtin_tools
from turnlog.storage import PostgresEventStore
from turnlog.worker.client import EngineClient
from turnlog_client import AsyncTurnlogClient


@pytest.fixture
async def service(store: PostgresEventStore) -> AsyncIterator[Service]:
    async with (
        scripted_worker_server(SCRIPT) as worker,
        EngineClient([worker.target]) as engine,
    ):
        clock = lambda: FIXED_NOW_US  # noqa: E731
        app = ConversationApplication(
            store,
            engine,
            tools=builtin_tools(clock),
            defaults=ServiceDefaults(max_tool_round_trips=2, text_flush_interval_s=0.05),
            clock=clock,
        )
        try:
            async with served(app) as serving:
                yield Service(serving, app)
        finally:
            await app.shutdown()


@pytest.fixture
async def client(service: Service) -> AsyncIterator[AsyncTurnlogClient]:
    async with service.client() as opened:
        yield opened
