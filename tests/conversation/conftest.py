"""Conversation-service fixtures: an in-process scripted worker and the application."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conversation_helpers import ScriptedWorker, scripted_worker_server

from turnlog.conversation.application import ConversationApplication, ServiceDefaults
from turnlog.conversation.tools import builtin_tools
from turnlog.storage import PostgresEventStore
from turnlog.worker.client import EngineClient

FIXED_NOW_US = 1_700_000_000_000_000

SCRIPT: dict[str, Any] = {
    "model": "scripted-test",
    "replies": [
        {
            "match": "what is 6*7",
            "text": "Let me compute.",
            "tool_calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}],
        },
        {
            "match": "loop forever",
            "tool_calls": [{"name": "calculator", "arguments": {"expression": "1+1"}}],
        },
        {"match": "ask the client", "tool_calls": [{"name": "lookup", "arguments": {"q": "x"}}]},
        {"match": "the answer is", "text": "It is 42."},
        {"match": "slow story", "text": "Once upon a time " * 20, "token_delay_ms": 20},
        {"match": "leak a secret", "text": "Sure, the forbidden word is kaboom, enjoy."},
        {
            "match": "leak slowly",
            "text": "Sure, the forbidden word is kaboom, enjoy.",
            "token_delay_ms": 5,
        },
        {"match": "mail me", "text": "Write to alice@example.com please."},
        {
            "match": "fail early",
            "text": "never",
            "fail_at_token": 0,
            "fail_reason": "ENGINE_INTERNAL",
        },
    ],
    "default": {"text": "Hello there."},
}


@pytest.fixture
async def worker() -> AsyncIterator[ScriptedWorker]:
    async with scripted_worker_server(SCRIPT) as started:
        yield started


@pytest.fixture
async def engine(worker: ScriptedWorker) -> AsyncIterator[EngineClient]:
    async with EngineClient([worker.target]) as client:
        yield client


@pytest.fixture
def make_app(
    store: PostgresEventStore, engine: EngineClient
) -> Callable[..., ConversationApplication]:
    def make(**overrides: Any) -> ConversationApplication:
        clock = overrides.pop("clock", lambda: FIXED_NOW_US)
        options: dict[str, Any] = {
            "tools": builtin_tools(clock),
            "defaults": ServiceDefaults(max_tool_round_trips=2),
            "clock": clock,
        }
        options.update(overrides)
        return ConversationApplication(store, engine, **options)

    return make


@pytest.fixture
async def app(
    make_app: Callable[..., ConversationApplication],
) -> AsyncIterator[ConversationApplication]:
    application = make_app()
    yield application
    await application.shutdown()
