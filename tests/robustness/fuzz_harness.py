"""The robustness tests' harness: the server under test, its log, and the Hypothesis budget.

Hypothesis budget: the `turnlog-fuzz` profile is derandomized with a fixed
number of examples per RPC, so CI runs the same cases every time in well
under a minute; `TURNLOG_FUZZ_EXAMPLES=N` runs N random examples per RPC
instead (failing examples are kept in `.hypothesis/`, which git ignores):

    TURNLOG_FUZZ_EXAMPLES=2000 pytest tests/robustness
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings

from turnlog.conversation.application import ConversationApplication
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb

FIXED_NOW_US = 1_700_000_000_000_000
CI_EXAMPLES = 75
FUZZ_EXAMPLES = int(os.environ.get("TURNLOG_FUZZ_EXAMPLES", "0"))

settings.register_profile(
    "turnlog-fuzz",
    max_examples=FUZZ_EXAMPLES or CI_EXAMPLES,
    derandomize=not FUZZ_EXAMPLES,
    database=None if not FUZZ_EXAMPLES else settings.default.database,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
FUZZ = settings.get_profile("turnlog-fuzz")
#: The per-test timeout of a fuzz test: the suite's 120 s, plus time for a long run.
FUZZ_TIMEOUT_S = 120 + FUZZ_EXAMPLES // 5

SCRIPT: dict[str, Any] = {
    "model": "scripted-robustness",
    "max_context_tokens": 1_000_000,
    "replies": [],
    "default": {"text": "Hello there."},
}


class LogRecords(logging.Handler):
    """Every record any logger of this process emits while installed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def problems(self) -> list[str]:
        """Records that a client's bad input must never cause: errors and tracebacks."""
        return [
            f"{r.name} {r.levelname}: {r.getMessage()[:300]}"
            for r in self.records
            if r.levelno >= logging.ERROR or r.exc_info is not None or r.exc_text
        ]


@dataclass(repr=False)
class Seed:
    """Known-good values the fuzzer mixes into its requests, to get past the first check."""

    active: str
    archived: str
    turn_id: str
    request_id: str
    positions: list[str] = field(default_factory=list)
    list_tokens: list[str] = field(default_factory=list)
    events_tokens: list[str] = field(default_factory=list)
    event_types: list[str] = field(default_factory=list)
    export: bytes = b""


@dataclass(repr=False)
class Serving:
    """The server under test, a channel to it and a view of its event log."""

    channel: grpc.aio.Channel
    app: ConversationApplication
    reader: psycopg.AsyncConnection[Any]
    seed: Seed
    log: LogRecords

    def __repr__(self) -> str:
        return "Serving(...)"

    async def event_log(self) -> list[tuple[Any, ...]]:
        """Every stored event, every column, as the database holds it."""
        cursor = await self.reader.execute(
            "SELECT global_position, transaction_id::text, stream_id, stream_version,"
            " event_id, type, data::text, metadata::text, recorded_at, prev_hash, hash"
            " FROM turnlog.events ORDER BY global_position"
        )
        return await cursor.fetchall()

    async def quiet(self) -> None:
        """Wait until no turn runs here, so that nothing writes between two examples."""
        while running := [t.task for t in self.app.running.turns.values() if t.task is not None]:
            await asyncio.gather(*running, return_exceptions=True)

    async def health(self) -> int:
        response = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        status: int = response.status
        return status


async def seed_data(stub: sgrpc.ConversationServiceStub) -> Seed:
    active = await stub.CreateConversation(
        spb.CreateConversationRequest(
            request_id="seed-active",
            conversation_id="seed-active",
            system_prompt="Be brief.",
            labels={"team": "fuzz"},
            tools=[pb.ToolDefinition(name="lookup", client_side=True)],
        )
    )
    name = active.conversation.name
    # A stream, not SendMessage: the conversation has a client-side tool.
    streamed = [
        r.event
        async for r in stub.StreamTurn(
            spb.StreamTurnRequest(
                start=spb.TurnInput(conversation=name, content="hi", request_id="t1")
            )
        )
    ]
    turn_id = streamed[-1].turn_ended.turn.turn_id
    archived = await stub.CreateConversation(
        spb.CreateConversationRequest(request_id="seed-archived", conversation_id="seed-archived")
    )
    await stub.ArchiveConversation(spb.ArchiveConversationRequest(name=archived.conversation.name))
    seed = Seed(
        active=name,
        archived=archived.conversation.name,
        turn_id=turn_id,
        request_id="t1",
    )
    events = await stub.ReadEvents(spb.ReadEventsRequest())
    seed.positions = [e.position for e in events.events]
    seed.event_types = sorted({e.type for e in events.events})
    for request in (
        spb.ReadEventsRequest(page_size=1),
        spb.ReadEventsRequest(conversation=name, page_size=1),
    ):
        page = await stub.ReadEvents(request)
        seed.events_tokens.append(page.next_page_token)
    listed = await stub.ListConversations(
        spb.ListConversationsRequest(page_size=1, show_archived=True)
    )
    seed.list_tokens.append(listed.next_page_token)
    parts = stub.ExportConversation(
        spb.ExportConversationRequest(name=name, format=hpb.EXPORT_FORMAT_JSONL)
    )
    seed.export = b"".join([p.data async for p in parts])
    # A token of the right alphabet whose content is hostile: the service must refuse it.
    seed.events_tokens.append(
        base64.urlsafe_b64encode(json.dumps({"c": "", "t": None, "a": "9" * 30}).encode())
        .decode()
        .rstrip("=")
    )
    return seed
