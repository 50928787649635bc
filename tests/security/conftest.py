"""Security-test fixtures: the service as `turnlog serve` builds it, over a scripted worker.

Its authentication is the real one (the local signing key of a temporary
data folder); `ServedApp.token` mints tokens it accepts, and
`ServedApp.key.sign` any token a test needs refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from conversation_helpers import ServedApp, scripted_worker_server, served

from turnlog.conversation.application import ConversationApplication, ServiceDefaults
from turnlog.storage import PostgresEventStore
from turnlog.worker.client import EngineClient

SCRIPT: dict[str, Any] = {
    "model": "scripted-test",
    "replies": [{"match": "slow story", "text": "Once upon a time " * 40, "token_delay_ms": 25}],
    "default": {"text": "Hello there."},
}


@pytest.fixture
async def app(store: PostgresEventStore) -> AsyncIterator[ConversationApplication]:
    async with (
        scripted_worker_server(SCRIPT) as worker,
        EngineClient([worker.target]) as engine,
    ):
        application = ConversationApplication(
            store, engine, defaults=ServiceDefaults(max_tool_round_trips=2)
        )
        yield application
        await application.shutdown()


@pytest.fixture
async def service(app: ConversationApplication) -> AsyncIterator[ServedApp]:
    """The served app; live streams re-check their credential every 0.2 s."""
    async with served(app, recheck_interval_s=0.2) as serving:
        yield serving
