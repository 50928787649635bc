"""The semantics a client relies on (issue 14 part 2), through real gRPC on loopback and PostgreSQL.

A failed turn's structured error; AIP-158 page sizes; unknown event types;
retraction counts; page tokens bound to their query; a model no worker
serves; request ids reused with other content. Every refusal leaves the
log exactly as it was.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import psycopg
import pytest
from conversation_helpers import ScriptedWorker, error_reason, scripted_worker_server, served
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]

from turnlog.conversation.application import ConversationApplication
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc

MODEL = "scripted-semantics"
SCRIPT: dict[str, Any] = {
    "model": MODEL,
    "replies": [
        # The first whose match is anywhere in the prompt (history too) wins.
        {
            "match": "drop midway",
            "text": "abcdefgh",
            "fail_at_token": 3,
            "fail_reason": "ENGINE_UNAVAILABLE",
        },
        {
            "match": "break midway",
            "text": "abcdefgh",
            "fail_at_token": 3,
            "fail_reason": "ENGINE_INTERNAL",
        },
        {"match": "leak a secret", "text": "Sure, the forbidden word is kaboom, enjoy."},
    ],
    "default": {"text": "Hello there."},
}


@pytest.fixture
async def worker() -> AsyncIterator[ScriptedWorker]:
    async with scripted_worker_server(SCRIPT) as started:
        yield started


@pytest.fixture
async def stub(
    make_app: Callable[..., ConversationApplication],
) -> AsyncIterator[sgrpc.ConversationServiceStub]:
    app = make_app()
    async with served(app) as serving, serving.stub() as opened:
        yield opened
    await app.shutdown()


async def log_digest(database_url: str) -> list[tuple[str, int, bytes]]:
    """Every stored event (stream, version, hash), in position order, read with SQL."""
    async with await psycopg.AsyncConnection.connect(database_url) as db:
        cursor = await db.execute(
            "SELECT stream_id, stream_version, hash FROM turnlog.events ORDER BY global_position"
        )
        return [(str(r[0]), int(r[1]), bytes(r[2])) for r in await cursor.fetchall()]


def details(error: grpc.aio.AioRpcError) -> tuple[dict[str, str], list[str]]:
    """(ErrorInfo metadata, BadRequest field paths) of a failed call."""
    metadata: dict[str, str] = {}
    fields: list[str] = []
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
                if detail.Unpack(info):
                    metadata = dict(info.metadata)
                elif detail.Unpack(bad):
                    fields = [v.field for v in bad.field_violations]
    return metadata, fields


async def create(stub: sgrpc.ConversationServiceStub, **fields: Any) -> str:
    response = await stub.CreateConversation(spb.CreateConversationRequest(**fields))
    return str(response.conversation.name)


async def send(
    stub: sgrpc.ConversationServiceStub, name: str, content: str, **fields: Any
) -> spb.SendMessageResponse:
    return await stub.SendMessage(
        spb.SendMessageRequest(input=spb.TurnInput(conversation=name, content=content, **fields))
    )


# -- a failed turn's error -----------------------------------------------------------


async def test_a_failed_turn_carries_its_structured_error_on_every_path(
    stub: sgrpc.ConversationServiceStub,
) -> None:
    name = await create(stub)
    sent = await send(stub, name, "break midway please")
    turn = sent.turn
    assert turn.status == pb.TURN_STATUS_FAILED
    assert turn.error.code == code_pb2.INTERNAL
    assert turn.error.reason == "ENGINE_INTERNAL"
    assert not turn.error.retryable
    assert turn.error.phase == "generation"
    assert turn.error.message == "scripted failure"
    # The same error from the log: GetConversation and a resumed stream.
    got = await stub.GetConversation(spb.GetConversationRequest(name=name))
    assert got.conversation.turns[-1].error == turn.error
    resumed = [
        e
        async for e in stub.StreamTurn(
            spb.StreamTurnRequest(resume=spb.ResumeTurn(conversation=name, turn_id=turn.turn_id))
        )
    ]
    assert resumed[-1].event.turn_ended.turn.error == turn.error
    # A retryable failure, as a streamed turn ends with it.
    streamed = [
        e
        async for e in stub.StreamTurn(
            spb.StreamTurnRequest(start=spb.TurnInput(conversation=name, content="drop midway"))
        )
    ]
    error = streamed[-1].event.turn_ended.turn.error
    assert (error.code, error.reason, error.retryable) == (
        code_pb2.UNAVAILABLE,
        "ENGINE_UNAVAILABLE",
        True,
    )
    # A turn that did not fail has no error.
    ok = await send(stub, await create(stub), "hello")
    assert ok.turn.status == pb.TURN_STATUS_COMPLETED
    assert not ok.turn.HasField("error")
