"""The semantics a client relies on (issue 14 part 2), through real gRPC on loopback and PostgreSQL.

A failed turn's structured error; AIP-158 page sizes; unknown event types;
retraction counts; page tokens bound to their query; a model no worker
serves; request ids reused with other content. Every refusal leaves the
log exactly as it was.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import psycopg
import pytest
from conversation_helpers import ScriptedWorker, error_reason, scripted_worker_server, served
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]

from turnlog import errors
from turnlog.api.messages import error_detail
from turnlog.conversation.application import ConversationApplication
from turnlog.guardrails import BuiltinSettings, default_registry
from turnlog.storage import NO_STREAM, NewEvent, PostgresEventStore
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb
from turnlog.worker.client import EngineClient

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
        {
            "match": "leak in french",
            "text": "Café 😀 déjà vu, le mot interdit est kaboom, voilà.",
            "token_delay_ms": 3,
        },
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


async def all_visible(store: PostgresEventStore, database_url: str) -> None:
    """Waits until reads of all streams see every stored event (they lag on a shared server)."""
    count = len(await log_digest(database_url))
    async with asyncio.timeout(30):
        while len((await store.read_all(limit=count + 1)).events) < count:  # noqa: ASYNC110 (polling the database)
            await asyncio.sleep(0.05)


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


def test_an_error_as_data_has_the_fields_of_its_status() -> None:
    detail = error_detail(
        errors.RequestIdReusedError("reused", metadata={"originalId": "t1", "phase": "start"})
    )
    assert (detail.code, detail.reason, detail.message) == (
        code_pb2.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
        "reused",
    )
    assert dict(detail.metadata) == {"originalId": "t1", "phase": "start"}
    assert (detail.retryable, detail.phase) == (False, "start")
    assert error_detail(errors.TurnInProgressError("busy")).retryable


# -- AIP-158 paging -----------------------------------------------------------------


async def test_a_page_size_above_the_maximum_is_coerced(
    stub: sgrpc.ConversationServiceStub, store: PostgresEventStore, database_url: str
) -> None:
    for _ in range(3):
        await create(stub)
    await all_visible(store, database_url)
    listed = await stub.ListConversations(spb.ListConversationsRequest(page_size=2**31 - 1))
    assert len(listed.conversations) == 3
    assert not listed.next_page_token
    # Coerced to the maximum (1,000 events), not refused and not "everything".
    many = [NewEvent(event_id=uuid.uuid4(), type="Filler", data={}) for _ in range(1001)]
    await store.append("conversation-many", many, expected_version=NO_STREAM)
    read = await stub.ReadEvents(
        spb.ReadEventsRequest(conversation="conversations/many", page_size=2**31 - 1)
    )
    assert len(read.events) == 1000
    assert read.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListConversations(spb.ListConversationsRequest(page_size=-1))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(refused.value)[1] == ["page_size"]


async def test_a_page_token_with_other_fields_is_refused_by_every_list_rpc(
    stub: sgrpc.ConversationServiceStub, store: PostgresEventStore, database_url: str
) -> None:
    for i in range(3):
        await create(stub, labels={"team": "a"}, request_id=f"c{i}")
    await all_visible(store, database_url)
    listing = spb.ListConversationsRequest(page_size=1, labels={"team": "a"})
    first = await stub.ListConversations(listing)
    assert first.next_page_token
    reading = spb.ReadEventsRequest(page_size=1, event_types=["ConversationCreated"])
    read = await stub.ReadEvents(reading)
    assert read.next_page_token
    # The same other fields, another page_size and view: fine.
    listing.page_token, listing.page_size = first.next_page_token, 5
    assert len((await stub.ListConversations(listing)).conversations) == 2
    reading.page_token, reading.page_size = read.next_page_token, 5
    reading.view = hpb.EVENT_VIEW_BOTH
    assert len((await stub.ReadEvents(reading)).events) == 2
    # ListTurns and ListMessages (their own scoped tokens) refuse alike.
    chat = await create(stub)
    for i in range(2):
        await send(stub, chat, f"hello {i}")
    turns = await stub.ListTurns(spb.ListTurnsRequest(conversation=chat, page_size=1))
    messages = await stub.ListMessages(spb.ListMessagesRequest(conversation=chat, page_size=1))
    assert turns.next_page_token
    assert messages.next_page_token
    elsewhere = await create(stub)
    # Another filter, another RPC's token, a forged one: INVALID_ARGUMENT on page_token.
    refused_requests: list[tuple[Any, Any]] = [
        (
            stub.ListTurns,
            spb.ListTurnsRequest(conversation=elsewhere, page_token=turns.next_page_token),
        ),
        (
            stub.ListMessages,
            spb.ListMessagesRequest(
                conversation=chat, newest_first=True, page_token=messages.next_page_token
            ),
        ),
        (stub.ListMessages, spb.ListMessagesRequest(conversation=chat, page_token="bm90LW91cnM")),
        (
            stub.ListConversations,
            spb.ListConversationsRequest(page_token=first.next_page_token, show_archived=True),
        ),
        (stub.ListConversations, spb.ListConversationsRequest(page_token=first.next_page_token)),
        (stub.ListConversations, spb.ListConversationsRequest(page_token=read.next_page_token)),
        (stub.ReadEvents, spb.ReadEventsRequest(page_token=read.next_page_token)),
        (
            stub.ReadEvents,
            spb.ReadEventsRequest(
                page_token=read.next_page_token, event_types=["ConversationCreated", "TurnStarted"]
            ),
        ),
        (stub.ReadEvents, spb.ReadEventsRequest(page_token=first.next_page_token)),
        (stub.ReadEvents, spb.ReadEventsRequest(page_token="bm90LW91cnM")),
    ]
    for call, request in refused_requests:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert error_reason(refused.value) == "INVALID_REQUEST", request
        assert details(refused.value) == (
            {"fields": "page_token", "retryable": "false"},
            ["page_token"],
        ), request


# -- event types ----------------------------------------------------------------------


async def test_an_unknown_event_type_is_refused_by_read_and_subscribe(
    stub: sgrpc.ConversationServiceStub, store: PostgresEventStore, database_url: str
) -> None:
    await create(stub)
    await all_visible(store, database_url)
    before = await log_digest(database_url)
    known = ["ConversationCreated", "TurnFailed"]
    read = await stub.ReadEvents(spb.ReadEventsRequest(event_types=known))
    assert [e.type for e in read.events] == ["ConversationCreated"]
    for types in (["TurnComplete"], ["ConversationCreated", "conversationcreated"]):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ReadEvents(spb.ReadEventsRequest(event_types=types))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(refused.value) == "INVALID_REQUEST"
        assert details(refused.value)[1] == [f"event_types[{len(types) - 1}]"]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.SubscribeEvents(spb.SubscribeEventsRequest(event_types=types)):
                pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details(refused.value)[1] == [f"event_types[{len(types) - 1}]"]
    assert await log_digest(database_url) == before


# -- retraction counts ----------------------------------------------------------------


async def test_a_retraction_counts_code_points_and_utf8_bytes(
    make_app: Callable[..., ConversationApplication],
) -> None:
    app = make_app(guardrails=default_registry(BuiltinSettings(blocked_terms=("kaboom",))))
    async with served(app) as serving, serving.stub() as stub:
        name = await create(stub)
        events = [
            r.event
            async for r in stub.StreamTurn(
                spb.StreamTurnRequest(
                    start=spb.TurnInput(conversation=name, content="leak in french")
                )
            )
        ]
    await app.shutdown()
    [at] = [i for i, e in enumerate(events) if e.HasField("retraction")]
    shown = "".join(e.text_delta.text for e in events[:at] if e.HasField("text_delta"))
    # Non-ASCII was shown: one code point of 2 bytes (é), one of 4 (the emoji).
    assert "é" in shown
    assert "😀" in shown
    assert "kaboom" not in shown
    retraction = events[at].retraction
    assert retraction.retracted_chars == len(shown)  # code points
    assert retraction.retracted_utf8_bytes == len(shown.encode())
    assert retraction.retracted_utf8_bytes > retraction.retracted_chars
    assert events[-1].turn_ended.turn.status == pb.TURN_STATUS_BLOCKED
    # Read back from the log (a resume), the same counts.
    async with served(app) as serving, serving.stub() as stub:
        resumed = [
            r.event
            async for r in stub.StreamTurn(
                spb.StreamTurnRequest(
                    resume=spb.ResumeTurn(conversation=name, turn_id=events[0].turn_id)
                )
            )
        ]
    assert [e.retraction for e in resumed if e.HasField("retraction")] == [retraction]


# -- the model a turn runs on ------------------------------------------------------------


async def recorded_models(store: PostgresEventStore, name: str) -> list[tuple[str, str]]:
    """(type, model) of the generation events recorded in a conversation."""
    events = await store.read_stream(f"conversation-{name.partition('/')[2]}")
    return [
        (e.type, str(e.data["model"]))
        for e in events
        if e.type in ("GenerationStarted", "GenerationCompleted")
    ]


async def test_a_model_no_worker_serves_is_refused_before_anything_is_recorded(
    stub: sgrpc.ConversationServiceStub, database_url: str
) -> None:
    name = await create(stub)
    # A conversation default no worker serves is accepted at create (workers
    # come and go), and refused when a turn would run on it.
    other = await create(stub, defaults=pb.TurnDefaults(model="gpt-nothing"))
    before = await log_digest(database_url)
    attempts: list[tuple[str, Any]] = [
        (name, pb.TurnDefaults(model="gpt-nothing")),
        (other, pb.TurnDefaults()),
    ]
    for conversation, options in attempts:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send(stub, conversation, "hello", options=options)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(refused.value) == "MODEL_NOT_SERVED"
        metadata, _ = details(refused.value)
        assert metadata["model"] == "gpt-nothing"
        assert metadata["servedModels"] == MODEL
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.StreamTurn(
                spb.StreamTurnRequest(
                    start=spb.TurnInput(conversation=conversation, content="hi", options=options)
                )
            ):
                pass
        assert error_reason(refused.value) == "MODEL_NOT_SERVED"
    assert await log_digest(database_url) == before
    # The served model, named or not, runs; the log records the model that generated.
    for ran in (name, other):
        sent = await send(stub, ran, "hello", options=pb.TurnDefaults(model=MODEL))
        assert sent.turn.status == pb.TURN_STATUS_COMPLETED


async def test_the_log_records_the_model_that_generated(
    stub: sgrpc.ConversationServiceStub, store: PostgresEventStore
) -> None:
    name = await create(stub)
    await send(stub, name, "hello")  # no model named: whatever the worker serves
    await send(stub, name, "hello again", options=pb.TurnDefaults(model=MODEL))
    assert (
        await recorded_models(store, name)
        == [
            ("GenerationStarted", MODEL),
            ("GenerationCompleted", MODEL),
        ]
        * 2
    )


async def test_a_turn_is_routed_to_a_worker_serving_its_model(
    store: PostgresEventStore,
) -> None:
    scripts = [
        {"model": f"model-{x}", "default": {"text": f"Answered by {x}."}} for x in ("a", "b")
    ]
    async with (
        scripted_worker_server(scripts[0]) as a,
        scripted_worker_server(scripts[1]) as b,
        EngineClient([a.target, b.target], load_poll_interval_s=0) as engine,
    ):
        app = ConversationApplication(store, engine)
        async with served(app) as serving, serving.stub() as stub:
            for model in ("model-b", "model-a", "model-b"):
                name = await create(stub, defaults=pb.TurnDefaults(model=model))
                sent = await send(stub, name, "who are you?")
                assert sent.assistant_message.content == f"Answered by {model[-1]}."
                assert {m for _, m in await recorded_models(store, name)} == {model}
            # None named: the first served model by name, recorded as such.
            name = await create(stub)
            assert (await send(stub, name, "hi")).assistant_message.content == "Answered by a."
            assert {m for _, m in await recorded_models(store, name)} == {"model-a"}
        await app.shutdown()


# -- request ids reused with other content ----------------------------------------------


async def refused_as_reused(call: Any, original_id: str) -> None:
    """`call` fails ALREADY_EXISTS REQUEST_ID_REUSED naming `original_id`."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(refused.value) == "REQUEST_ID_REUSED"
    assert details(refused.value)[0]["originalId"] == original_id


async def test_create_conversation_refuses_a_reused_request_id(
    stub: sgrpc.ConversationServiceStub, database_url: str
) -> None:
    settings: dict[str, Any] = {
        "request_id": "create-1",
        "system_prompt": "Be brief.",
        "labels": {"team": "a"},
        "defaults": pb.TurnDefaults(temperature=0.5),
    }
    name = await create(stub, **settings)
    cid = name.partition("/")[2]
    await send(stub, name, "hello")  # what happens after the create is no content of it
    before = await log_digest(database_url)
    assert await create(stub, **settings) == name  # an exact retry
    for change in (
        {"system_prompt": "Be long."},
        {"labels": {"team": "b"}},
        {"defaults": pb.TurnDefaults(temperature=0.7)},
        {"guardrail_profile": "default"},
    ):
        await refused_as_reused(
            stub.CreateConversation(spb.CreateConversationRequest(**{**settings, **change})), cid
        )
    assert await log_digest(database_url) == before


async def test_a_turn_refuses_a_reused_request_id(
    stub: sgrpc.ConversationServiceStub, database_url: str
) -> None:
    name = await create(stub)
    first = await send(stub, name, "hello", request_id="turn-1")
    turn_id = first.turn.turn_id
    before = await log_digest(database_url)
    retried = await send(stub, name, "hello", request_id="turn-1")
    assert retried.turn.turn_id == turn_id
    streamed = [
        r.event
        async for r in stub.StreamTurn(
            spb.StreamTurnRequest(
                start=spb.TurnInput(conversation=name, content="hello", request_id="turn-1")
            )
        )
    ]
    assert streamed[-1].turn_ended.turn.turn_id == turn_id
    await refused_as_reused(send(stub, name, "goodbye", request_id="turn-1"), turn_id)
    await refused_as_reused(
        send(stub, name, "hello", request_id="turn-1", options=pb.TurnDefaults(temperature=1.5)),
        turn_id,
    )

    async def stream_other() -> None:
        async for _ in stub.StreamTurn(
            spb.StreamTurnRequest(
                start=spb.TurnInput(conversation=name, content="bye", request_id="turn-1")
            )
        ):
            pass

    await refused_as_reused(stream_other(), turn_id)
    # A compaction is another kind of request.
    await refused_as_reused(
        stub.CompactConversation(spb.CompactConversationRequest(name=name, request_id="turn-1")),
        turn_id,
    )
    assert await log_digest(database_url) == before


async def test_a_fork_refuses_a_reused_request_id(
    stub: sgrpc.ConversationServiceStub, database_url: str
) -> None:
    source = await create(stub)
    other = await create(stub)
    await send(stub, source, "hello")
    forked = await stub.ForkConversation(
        spb.ForkConversationRequest(name=source, request_id="fork-1")
    )
    fork_name = forked.conversation.name
    fork_id = fork_name.partition("/")[2]
    # The source moves on; a retry (no version named) is still the same fork.
    await send(stub, source, "hello again")
    before = await log_digest(database_url)
    retried = await stub.ForkConversation(
        spb.ForkConversationRequest(name=source, request_id="fork-1")
    )
    assert retried.conversation == forked.conversation
    assert retried.prefix_version == forked.prefix_version
    named = await stub.ForkConversation(
        spb.ForkConversationRequest(
            name=source, request_id="fork-1", version=forked.conversation.fork_origin.version
        )
    )
    assert named.conversation.name == fork_name
    for request in (
        spb.ForkConversationRequest(name=other, request_id="fork-1"),
        spb.ForkConversationRequest(name=source, request_id="fork-1", version=1),
    ):
        await refused_as_reused(stub.ForkConversation(request), fork_id)
    assert await log_digest(database_url) == before


async def test_converse_rejects_a_reused_request_id_and_an_unserved_model_as_actions(
    stub: sgrpc.ConversationServiceStub, database_url: str
) -> None:
    name = await create(stub)
    first = await send(stub, name, "hello", request_id="conv-1")
    before = await log_digest(database_url)
    requests = [
        spb.ConverseRequest(
            user_message=spb.TurnInput(conversation=name, content="other", request_id="conv-1")
        ),
        spb.ConverseRequest(
            user_message=spb.TurnInput(
                conversation=name, content="hi", options=pb.TurnDefaults(model="gpt-nothing")
            )
        ),
    ]
    call = stub.Converse(iter(requests))
    rejected = []
    async for response in call:
        assert response.HasField("action_rejected")
        rejected.append(response.action_rejected)
        if len(rejected) == len(requests):
            call.cancel()
            break
    reused, unserved = rejected
    assert (reused.action_index, reused.error.reason) == (1, "REQUEST_ID_REUSED")
    assert reused.error.code == code_pb2.ALREADY_EXISTS
    assert reused.error.metadata["originalId"] == first.turn.turn_id
    assert (unserved.action_index, unserved.error.reason) == (2, "MODEL_NOT_SERVED")
    assert unserved.error.code == code_pb2.FAILED_PRECONDITION
    assert dict(unserved.error.metadata) == {"model": "gpt-nothing", "servedModels": MODEL}
    assert await log_digest(database_url) == before
