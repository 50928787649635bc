"""Managing a conversation over real gRPC on loopback: update, unarchive, the lists, a bounded Get.

The worker records every `StartGeneration` it is sent, so each update is
checked where it matters: in what the next turn asks the engine for.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import psycopg
import pytest
from conversation.conftest import SCRIPT
from conversation_helpers import ServedApp, engine_server, error_reason, served
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from turnlog.conversation.application import ConversationApplication
from turnlog.conversation.tools import builtin_tools
from turnlog.engine.v1 import engine_pb2
from turnlog.eventlog import wall_clock_us
from turnlog.storage import PostgresEventStore
from turnlog.storage.migrations import migrate
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb
from turnlog.worker.client import EngineClient
from turnlog.worker.scripted import Script, ScriptedEngine
from turnlog.worker.service import RequestProgress

Stub = sgrpc.ConversationServiceStub


class RecordingEngine(ScriptedEngine):
    """The scripted worker, keeping every generation request it receives."""

    def __init__(self) -> None:
        super().__init__(Script.from_json(SCRIPT))
        self.starts: list[engine_pb2.StartGeneration] = []

    async def generate(
        self,
        start: engine_pb2.StartGeneration,
        *,
        engine_request_id: str,
        progress: RequestProgress,
    ) -> AsyncIterator[Any]:
        self.starts.append(start)
        async for event in super().generate(
            start, engine_request_id=engine_request_id, progress=progress
        ):
            yield event


@pytest.fixture
async def recording() -> AsyncIterator[tuple[RecordingEngine, str]]:
    engine = RecordingEngine()
    async with engine_server(engine) as target:
        yield engine, target


@pytest.fixture
async def service(
    store: PostgresEventStore, recording: tuple[RecordingEngine, str]
) -> AsyncIterator[ServedApp]:
    async with EngineClient([recording[1]]) as client:
        app = ConversationApplication(store, client, tools=builtin_tools(wall_clock_us))
        try:
            async with served(app) as serving:
                yield serving
        finally:
            await app.shutdown()


@pytest.fixture
async def stub(service: ServedApp) -> AsyncIterator[Stub]:
    async with service.stub() as opened:
        yield opened


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def create(stub: Stub, request_id: str = "c", **fields: Any) -> str:
    created = await stub.CreateConversation(
        spb.CreateConversationRequest(request_id=request_id, **fields)
    )
    return str(created.conversation.name)


async def send(stub: Stub, name: str, content: str, request_id: str) -> spb.SendMessageResponse:
    return await stub.SendMessage(
        spb.SendMessageRequest(
            input=spb.TurnInput(conversation=name, content=content, request_id=request_id)
        )
    )


async def events(stub: Stub, name: str) -> list[hpb.LogEvent]:
    page = await stub.ReadEvents(
        spb.ReadEventsRequest(conversation=name, view=hpb.EVENT_VIEW_BOTH, page_size=1000)
    )
    return list(page.events)


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [v.field for v in bad.field_violations]
    return found


def metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return dict(info.metadata)
    return {}


async def listed(
    stub: Stub, request: spb.ListConversationsRequest, *, until: Callable[[list[str]], bool]
) -> list[pb.Conversation]:
    """ListConversations until `until(names)` holds (10 s at most).

    The list catches up from the log only as far as every transaction of the
    database server has ended (`read_all` stops at the snapshot's xmin), so
    on a busy shared server it may lag a moment behind a commit.
    """
    deadline = time.monotonic() + 10
    while True:
        found = list((await stub.ListConversations(request)).conversations)
        if until([c.name for c in found]) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


# -- UpdateConversation -------------------------------------------------------------


async def test_each_setting_changes_what_the_next_turn_uses(
    stub: Stub, recording: tuple[RecordingEngine, str]
) -> None:
    engine = recording[0]
    name = await create(stub, system_prompt="Be brief.", labels={"team": "a"})
    await send(stub, name, "hello", "t1")
    assert engine.starts[-1].chat.messages[0].content == "Be brief."
    assert not engine.starts[-1].chat.tools

    updates = [
        (pb.Conversation(name=name, system_prompt="Be verbose."), "system_prompt"),
        (pb.Conversation(name=name, tools=[pb.ToolDefinition(name="calculator")]), "tools"),
        (
            pb.Conversation(name=name, defaults=pb.TurnDefaults(temperature=0.25, max_tokens=7)),
            "defaults",
        ),
        (pb.Conversation(name=name, labels={"team": "b", "env": "prod"}), "labels"),
    ]
    before = len(await events(stub, name))
    for n, (conversation, path) in enumerate(updates, start=1):
        updated = await stub.UpdateConversation(
            spb.UpdateConversationRequest(
                conversation=conversation, update_mask=mask(path), request_id=f"u{n}"
            )
        )
        # One event per change, typed, naming the setting replaced.
        log = await events(stub, name)
        assert len(log) == before + n
        assert log[-1].type == "ConversationUpdated"
        assert list(log[-1].conversation_updated.fields) == [path]
        assert updated.conversation.version == log[-1].version

    await send(stub, name, "hello again", "t2")
    start = engine.starts[-1]
    assert start.chat.messages[0].role == engine_pb2.CHAT_ROLE_SYSTEM
    assert start.chat.messages[0].content == "Be verbose."
    assert [t.name for t in start.chat.tools] == ["calculator"]
    assert start.sampling.temperature == pytest.approx(0.25)
    assert start.sampling.max_tokens == 7
    got = (await stub.GetConversation(spb.GetConversationRequest(name=name))).conversation
    assert dict(got.labels) == {"team": "b", "env": "prod"}
    assert got.system_prompt == "Be verbose."
    assert got.defaults.temperature == pytest.approx(0.25)
    # The tools came back completed from the server's registry.
    assert got.tools[0].description
    prod = await listed(
        stub,
        spb.ListConversationsRequest(labels={"env": "prod"}, page_size=10),
        until=lambda names: name in names,
    )
    assert [c.name for c in prod] == [name]
    assert prod[0].version == got.version
    assert prod[0].turn_count == 2
    assert prod[0].system_prompt == "Be verbose."
    old = await stub.ListConversations(spb.ListConversationsRequest(labels={"team": "a"}))
    assert not old.conversations


async def test_the_guardrail_profile_changes_what_the_next_turn_applies(stub: Stub) -> None:
    name = await create(stub)
    redacted = await send(stub, name, "mail me", "t1")
    assert "alice@example.com" not in redacted.assistant_message.content
    await stub.UpdateConversation(
        spb.UpdateConversationRequest(
            conversation=pb.Conversation(name=name, guardrail_profile="none"),
            update_mask=mask("guardrail_profile"),
        )
    )
    as_generated = await send(stub, name, "mail me", "t2")
    assert as_generated.assistant_message.content == "Write to alice@example.com please."


async def test_a_change_of_nothing_records_nothing(stub: Stub) -> None:
    name = await create(stub, system_prompt="Be brief.", labels={"a": "1"})
    before = await events(stub, name)
    same = await stub.UpdateConversation(
        spb.UpdateConversationRequest(
            conversation=pb.Conversation(name=name, system_prompt="Be brief.", labels={"a": "1"}),
            update_mask=mask("system_prompt", "labels"),
        )
    )
    assert same.conversation.version == before[-1].version
    # Fields the mask does not name are not read: this changes nothing either.
    await stub.UpdateConversation(
        spb.UpdateConversationRequest(
            conversation=pb.Conversation(name=name, system_prompt="ignored", labels={"a": "1"}),
            update_mask=mask("labels"),
        )
    )
    assert await events(stub, name) == before


async def test_a_retry_returns_the_first_result_and_a_reused_id_is_refused(stub: Stub) -> None:
    name = await create(stub)
    request = spb.UpdateConversationRequest(
        conversation=pb.Conversation(name=name, system_prompt="One."),
        update_mask=mask("system_prompt"),
        request_id="same",
    )
    first = await stub.UpdateConversation(request)
    # Another change lands in between; the retry still answers as the first call did.
    await stub.UpdateConversation(
        spb.UpdateConversationRequest(
            conversation=pb.Conversation(name=name, labels={"x": "y"}), update_mask=mask("labels")
        )
    )
    again = await stub.UpdateConversation(request)
    assert again.conversation == first.conversation
    log = await events(stub, name)
    assert [e.type for e in log].count("ConversationUpdated") == 2

    other = spb.UpdateConversationRequest(
        conversation=pb.Conversation(name=name, system_prompt="Two."),
        update_mask=mask("system_prompt"),
        request_id="same",
    )
    error = await refused(stub.UpdateConversation(other))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(error) == "REQUEST_ID_REUSED"
    first_event = next(e for e in log if e.type == "ConversationUpdated")
    assert metadata(error)["originalId"] == first_event.event_id
    assert await events(stub, name) == log


async def test_expected_version(stub: Stub) -> None:
    name = await create(stub)
    request = spb.UpdateConversationRequest(
        conversation=pb.Conversation(name=name, system_prompt="New."),
        update_mask=mask("system_prompt"),
        expected_version=7,
    )
    error = await refused(stub.UpdateConversation(request))
    assert error.code() == grpc.StatusCode.ABORTED
    assert error_reason(error) == "VERSION_CONFLICT"
    assert metadata(error)["actualVersion"] == "1"
    request.expected_version = 1
    updated = await stub.UpdateConversation(request)
    assert updated.conversation.version == 2


@pytest.mark.parametrize(
    ("paths", "field"),
    [
        ((), "update_mask"),
        (("model",), "update_mask"),
        (("system_prompt", "messages"), "update_mask"),
    ],
)
async def test_an_empty_mask_or_an_unknown_path_is_invalid(
    stub: Stub, paths: tuple[str, ...], field: str
) -> None:
    name = await create(stub)
    before = await events(stub, name)
    error = await refused(
        stub.UpdateConversation(
            spb.UpdateConversationRequest(
                conversation=pb.Conversation(name=name, system_prompt="x"),
                update_mask=mask(*paths),
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "INVALID_REQUEST"
    assert bad_fields(error) == [field]
    assert await events(stub, name) == before


async def test_the_limits_of_create_apply(stub: Stub) -> None:
    name = await create(stub)
    before = await events(stub, name)
    cases = [
        (
            pb.Conversation(
                name=name, tools=[pb.ToolDefinition(name="t"), pb.ToolDefinition(name="t")]
            ),
            "tools",
            "conversation.tools[1].name",
        ),
        (
            pb.Conversation(name=name, labels={"k": "v" * 300}),
            "labels",
            "conversation.labels[k]",
        ),
        (
            pb.Conversation(name=name, defaults=pb.TurnDefaults(temperature=3.0)),
            "defaults",
            "conversation.defaults.temperature",
        ),
        (
            pb.Conversation(name=name, defaults=pb.TurnDefaults(strict_max_tokens=True)),
            "defaults",
            "conversation.defaults.strict_max_tokens",
        ),
        (pb.Conversation(labels={"a": "b"}), "labels", "conversation.name"),
    ]
    for conversation, path, field in cases:
        error = await refused(
            stub.UpdateConversation(
                spb.UpdateConversationRequest(conversation=conversation, update_mask=mask(path))
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in bad_fields(error)
    # Output-only fields are ignored (AIP-203), even ones that would be invalid input.
    ignored = pb.Conversation(name=name, labels={"ok": "yes"}, version=-5, message_count=-1)
    ignored.turns.add().start_time.seconds = -(2**62)
    await stub.UpdateConversation(
        spb.UpdateConversationRequest(conversation=ignored, update_mask=mask("labels"))
    )
    assert len(await events(stub, name)) == len(before) + 1


async def test_a_server_tool_or_profile_that_does_not_exist_is_invalid(stub: Stub) -> None:
    name = await create(stub)
    before = await events(stub, name)
    for conversation, path in [
        (pb.Conversation(name=name, guardrail_profile="nope"), "guardrail_profile"),
        (pb.Conversation(name=name, tools=[pb.ToolDefinition(name="no_such_tool")]), "tools"),
    ]:
        error = await refused(
            stub.UpdateConversation(
                spb.UpdateConversationRequest(conversation=conversation, update_mask=mask(path))
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, path
    assert await events(stub, name) == before
    # Settings the mask does not name are not read, not even checked against the registry.
    await stub.UpdateConversation(
        spb.UpdateConversationRequest(
            conversation=pb.Conversation(
                name=name,
                labels={"read": "yes"},
                guardrail_profile="nope",
                tools=[pb.ToolDefinition(name="no_such_tool")],
            ),
            update_mask=mask("labels"),
        )
    )
    assert len(await events(stub, name)) == len(before) + 1


async def test_new_settings_pass_the_request_guardrails(stub: Stub) -> None:
    """As in create: a field a sanitize guardrail would change is refused, not rewritten."""
    name = await create(stub)
    before = await events(stub, name)
    for conversation, path, field in [
        (
            pb.Conversation(name=name, system_prompt="Mail bob@example.com."),
            "system_prompt",
            "conversation.system_prompt",
        ),
        (
            pb.Conversation(name=name, labels={"owner": "bob@example.com"}),
            "labels",
            "conversation.labels",
        ),
    ]:
        error = await refused(
            stub.UpdateConversation(
                spb.UpdateConversationRequest(conversation=conversation, update_mask=mask(path))
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(error) == "FIELD_REFUSED_BY_GUARDRAIL"
        assert metadata(error)["field"] == field
        assert "bob@example.com" not in (error.details() or "")
    assert await events(stub, name) == before
    # Under the "none" profile the same prompt is recorded as given.
    await stub.UpdateConversation(
        spb.UpdateConversationRequest(
            conversation=pb.Conversation(
                name=name, guardrail_profile="none", system_prompt="Mail bob@example.com."
            ),
            update_mask=mask("guardrail_profile", "system_prompt"),
        )
    )


async def test_another_tenants_conversation_is_not_found(service: ServedApp, stub: Stub) -> None:
    name = await create(stub)
    before = await events(stub, name)
    async with service.stub("tenant-b") as other:
        calls = [
            other.UpdateConversation(
                spb.UpdateConversationRequest(
                    conversation=pb.Conversation(name=name, system_prompt="mine now"),
                    update_mask=mask("system_prompt"),
                )
            ),
            other.UnarchiveConversation(spb.UnarchiveConversationRequest(name=name)),
            other.ListTurns(spb.ListTurnsRequest(conversation=name)),
            other.ListMessages(spb.ListMessagesRequest(conversation=name)),
        ]
        for call in calls:
            error = await refused(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert error_reason(error) == "NOT_FOUND"
    assert await events(stub, name) == before


async def test_an_update_waits_for_a_running_turn_which_keeps_its_settings(
    stub: Stub, recording: tuple[RecordingEngine, str]
) -> None:
    engine = recording[0]
    name = await create(stub, system_prompt="Old.")
    turn = stub.StreamTurn(
        spb.StreamTurnRequest(
            start=spb.TurnInput(conversation=name, content="slow story", request_id="t1")
        )
    )
    await turn.read()  # started
    update = spb.UpdateConversationRequest(
        conversation=pb.Conversation(name=name, system_prompt="New."),
        update_mask=mask("system_prompt"),
    )
    error = await refused(stub.UpdateConversation(update))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "TURN_IN_PROGRESS"
    rest = [r.event async for r in turn]
    assert rest[-1].turn_ended.turn.status == pb.TURN_STATUS_COMPLETED
    assert engine.starts[-1].chat.messages[0].content == "Old."
    await stub.UpdateConversation(update)
    await send(stub, name, "hello", "t2")
    assert engine.starts[-1].chat.messages[0].content == "New."


async def test_an_archived_conversation_may_be_updated(stub: Stub) -> None:
    name = await create(stub)
    await stub.ArchiveConversation(spb.ArchiveConversationRequest(name=name))
    updated = await stub.UpdateConversation(
        spb.UpdateConversationRequest(
            conversation=pb.Conversation(name=name, labels={"kept": "yes"}),
            update_mask=mask("labels"),
        )
    )
    assert updated.conversation.state == pb.CONVERSATION_STATE_ARCHIVED
    assert dict(updated.conversation.labels) == {"kept": "yes"}


# -- UnarchiveConversation ---------------------------------------------------------------


async def test_unarchive_then_a_turn_runs(stub: Stub) -> None:
    name = await create(stub)
    active = await stub.UnarchiveConversation(spb.UnarchiveConversationRequest(name=name))
    assert active.conversation.version == 1  # an active one: nothing recorded
    shown = await listed(stub, spb.ListConversationsRequest(), until=lambda names: name in names)
    assert name in [c.name for c in shown]
    await stub.ArchiveConversation(spb.ArchiveConversationRequest(name=name))
    error = await refused(send(stub, name, "hello", "t1"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    hidden = await listed(
        stub, spb.ListConversationsRequest(), until=lambda names: name not in names
    )
    assert name not in [c.name for c in hidden]

    conflict = await refused(
        stub.UnarchiveConversation(spb.UnarchiveConversationRequest(name=name, expected_version=1))
    )
    assert conflict.code() == grpc.StatusCode.ABORTED
    unarchived = await stub.UnarchiveConversation(
        spb.UnarchiveConversationRequest(name=name, expected_version=2)
    )
    assert unarchived.conversation.state == pb.CONVERSATION_STATE_ACTIVE
    assert unarchived.conversation.version == 3
    again = await stub.UnarchiveConversation(spb.UnarchiveConversationRequest(name=name))
    assert again.conversation.version == 3
    log = await events(stub, name)
    assert [e.type for e in log] == [
        "ConversationCreated",
        "ConversationArchived",
        "ConversationUnarchived",
    ]
    assert log[-1].conversation_unarchived.unarchived_at_us > 0
    sent = await send(stub, name, "hello", "t1")
    assert sent.turn.status == pb.TURN_STATUS_COMPLETED
    shown = await listed(stub, spb.ListConversationsRequest(), until=lambda names: name in names)
    assert name in [c.name for c in shown]


# -- ListTurns, ListMessages, GetConversation --------------------------------------------


async def _conversation_with_turns(stub: Stub, turns: int, request_id: str = "c") -> str:
    name = await create(stub, request_id, system_prompt="Be brief.")
    for n in range(turns):
        await send(stub, name, f"message {n}", f"t{n}")
    return name


async def test_list_turns_pages_through_every_turn(stub: Stub) -> None:
    name = await _conversation_with_turns(stub, 7)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListTurns(
            spb.ListTurnsRequest(conversation=name, page_size=3, page_token=token)
        )
        assert page.total_size == 7
        seen += [t.turn_id for t in page.turns]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    got = await stub.GetConversation(spb.GetConversationRequest(name=name, turn_limit=1000))
    assert seen == [t.turn_id for t in got.conversation.turns]
    assert len(set(seen)) == 7
    # 0 is the default (50); above 500 is read as 500; negative is invalid.
    for size in (0, 501, 2**31 - 1):
        page = await stub.ListTurns(spb.ListTurnsRequest(conversation=name, page_size=size))
        assert len(page.turns) == 7
        assert not page.next_page_token
    error = await refused(stub.ListTurns(spb.ListTurnsRequest(conversation=name, page_size=-1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(error) == ["page_size"]


async def test_list_messages_pages_both_ways_with_no_gap_or_repeat(stub: Stub) -> None:
    name = await _conversation_with_turns(stub, 5)

    async def every(newest_first: bool, size: int) -> list[spb.ListMessagesResponse]:
        pages, token = [], ""
        while True:
            page = await stub.ListMessages(
                spb.ListMessagesRequest(
                    conversation=name,
                    page_size=size,
                    page_token=token,
                    newest_first=newest_first,
                )
            )
            pages.append(page)
            token = page.next_page_token
            if not token:
                return pages

    oldest = await every(False, 4)
    ids = [m.message_id for p in oldest for m in p.messages]
    assert (
        len(ids) == len(set(ids)) == 11 == oldest[0].total_size
    )  # system + 5 turns of (user, reply)
    assert oldest[0].messages[0].role == pb.ROLE_SYSTEM
    assert oldest[0].messages[0].content == "Be brief."
    newest = await every(True, 3)
    assert [m.message_id for p in newest for m in p.messages] == ids[::-1]
    assert newest[-1].messages[-1].role == pb.ROLE_SYSTEM

    # A page taken, then the conversation grows: the rest continues with no gap or repeat.
    first = await stub.ListMessages(spb.ListMessagesRequest(conversation=name, page_size=4))
    back = await stub.ListMessages(
        spb.ListMessagesRequest(conversation=name, page_size=4, newest_first=True)
    )
    await send(stub, name, "one more", "t-more")
    rest = await stub.ListMessages(
        spb.ListMessagesRequest(conversation=name, page_size=1000, page_token=first.next_page_token)
    )
    assert [m.message_id for m in [*first.messages, *rest.messages]][:11] == ids
    assert rest.total_size == 13
    rest_back = await stub.ListMessages(
        spb.ListMessagesRequest(
            conversation=name, page_size=1000, newest_first=True, page_token=back.next_page_token
        )
    )
    assert [m.message_id for m in [*back.messages, *rest_back.messages]] == ids[::-1]


async def test_list_messages_of_one_turn(stub: Stub) -> None:
    name = await _conversation_with_turns(stub, 3)
    turns = await stub.ListTurns(spb.ListTurnsRequest(conversation=name))
    second = turns.turns[1].turn_id
    page = await stub.ListMessages(spb.ListMessagesRequest(conversation=name, turn_id=second))
    assert page.total_size == 2
    assert [m.role for m in page.messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT]
    assert {m.turn_id for m in page.messages} == {second}
    assert page.messages[0].content == "message 1"
    error = await refused(
        stub.ListMessages(spb.ListMessagesRequest(conversation=name, turn_id="no-such-turn"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_a_page_token_is_refused_with_other_fields(stub: Stub) -> None:
    name = await _conversation_with_turns(stub, 3)
    other = await _conversation_with_turns(stub, 0, "other")
    turns = await stub.ListTurns(spb.ListTurnsRequest(conversation=name))
    page = await stub.ListMessages(spb.ListMessagesRequest(conversation=name, page_size=2))
    turn_page = await stub.ListTurns(spb.ListTurnsRequest(conversation=name, page_size=1))
    token = page.next_page_token
    misuses = [
        stub.ListMessages(spb.ListMessagesRequest(conversation=other, page_token=token)),
        stub.ListMessages(
            spb.ListMessagesRequest(conversation=name, page_token=token, newest_first=True)
        ),
        stub.ListMessages(
            spb.ListMessagesRequest(
                conversation=name, page_token=token, turn_id=turns.turns[0].turn_id
            )
        ),
        stub.ListTurns(
            spb.ListTurnsRequest(conversation=other, page_token=turn_page.next_page_token)
        ),
        stub.ListMessages(spb.ListMessagesRequest(conversation=name, page_token="bm90LWpzb24")),
    ]
    for call in misuses:
        error = await refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(error) == ["page_token"]
    # page_size may change between pages.
    more = await stub.ListMessages(
        spb.ListMessagesRequest(conversation=name, page_token=token, page_size=100)
    )
    assert len(more.messages) == 5


async def test_get_conversation_is_bounded_and_counts_everything(stub: Stub) -> None:
    name = await _conversation_with_turns(stub, 4)
    got = (
        await stub.GetConversation(
            spb.GetConversationRequest(name=name, message_limit=3, turn_limit=2)
        )
    ).conversation
    assert got.message_count == 9
    assert got.turn_count == 4
    assert [m.role for m in got.messages] == [
        pb.ROLE_SYSTEM,
        pb.ROLE_ASSISTANT,
        pb.ROLE_USER,
        pb.ROLE_ASSISTANT,
    ]
    everything = await stub.ListMessages(spb.ListMessagesRequest(conversation=name))
    assert list(got.messages[1:]) == list(everything.messages[-3:])
    all_turns = await stub.ListTurns(spb.ListTurnsRequest(conversation=name))
    assert list(got.turns) == list(all_turns.turns[-2:])
    # Defaults (100) hold all of this one; above 1000 is coerced; negative is invalid.
    for limit in (0, 5000):
        whole = (
            await stub.GetConversation(
                spb.GetConversationRequest(name=name, message_limit=limit, turn_limit=limit)
            )
        ).conversation
        assert len(whole.messages) == 9
        assert len(whole.turns) == 4
    error = await refused(
        stub.GetConversation(spb.GetConversationRequest(name=name, message_limit=-1))
    )
    assert bad_fields(error) == ["message_limit"]
    # Without a system prompt there is no system message; the counts are in the list too.
    bare = await create(stub, "bare")
    await send(stub, bare, "hi", "b1")
    got_bare = (await stub.GetConversation(spb.GetConversationRequest(name=bare))).conversation
    assert [m.role for m in got_bare.messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT]
    assert got_bare.message_count == 2
    both = await listed(
        stub, spb.ListConversationsRequest(), until=lambda names: {name, bare} <= set(names)
    )
    counts = {c.name: (c.message_count, c.turn_count, len(c.messages)) for c in both}
    assert counts == {name: (9, 4, 0), bare: (2, 1, 0)}


# -- history: typed events, verification, export and import ------------------------------


async def _managed_conversation(stub: Stub) -> str:
    """A conversation with every new event: updated, turns under each setting, archived, back."""
    name = await create(stub, "history", system_prompt="First.", labels={"a": "1"})
    await send(stub, name, "hello", "t1")
    await stub.UpdateConversation(
        spb.UpdateConversationRequest(
            conversation=pb.Conversation(
                name=name,
                system_prompt="Second.",
                labels={"b": "2"},
                defaults=pb.TurnDefaults(model="", temperature=0.5, max_tool_round_trips=1),
            ),
            update_mask=mask("system_prompt", "labels", "defaults"),
            request_id="u1",
        )
    )
    await send(stub, name, "hello", "t2")
    await stub.ArchiveConversation(spb.ArchiveConversationRequest(name=name))
    await stub.UnarchiveConversation(spb.UnarchiveConversationRequest(name=name))
    await send(stub, name, "hello", "t3")
    return name


async def test_the_new_events_are_typed_verified_exported_and_imported(
    stub: Stub, fresh_database_url: str
) -> None:
    name = await _managed_conversation(stub)
    log = await events(stub, name)
    updated = next(e for e in log if e.type == "ConversationUpdated")
    typed = updated.conversation_updated
    assert list(typed.fields) == ["defaults", "labels", "system_prompt"]
    assert typed.system_prompt == "Second."
    assert dict(typed.labels) == {"b": "2"}
    assert typed.sampling.temperature == 0.5
    assert typed.max_tool_round_trips == 1
    assert not typed.HasField("context_policy")
    assert typed.request_id == "u1"
    # The stored JSON mirrors the typed message (labels an object, as in ConversationCreated).
    assert '"labels":{"b":"2"}' in updated.data_json.replace(" ", "")
    assert any(e.WhichOneof("event") == "conversation_unarchived" for e in log)

    verified = await stub.VerifyConversation(spb.VerifyConversationRequest(name=name))
    assert verified.intact, verified
    assert verified.events_checked == len(log)

    exported = b"".join(
        [
            r.data
            async for r in stub.ExportConversation(
                spb.ExportConversationRequest(name=name, format=hpb.EXPORT_FORMAT_JSONL)
            )
        ]
    )
    got = (await stub.GetConversation(spb.GetConversationRequest(name=name))).conversation
    async with await psycopg.AsyncConnection.connect(fresh_database_url, autocommit=True) as c:
        await c.execute("DROP SCHEMA IF EXISTS turnlog CASCADE")
    await migrate(fresh_database_url)
    other_store = await PostgresEventStore.open(fresh_database_url)
    other_app = ConversationApplication(other_store, None)
    try:
        async with served(other_app) as other_service, other_service.stub() as other:

            async def parts() -> AsyncIterator[spb.ImportConversationRequest]:
                yield spb.ImportConversationRequest(data=exported)

            imported = await other.ImportConversation(parts())
            assert imported.events_written == len(log)
            again = await other.GetConversation(spb.GetConversationRequest(name=name))
            assert again.conversation == got
            assert again.conversation.system_prompt == "Second."
            assert again.conversation.state == pb.CONVERSATION_STATE_ACTIVE
            checked = await other.VerifyConversation(spb.VerifyConversationRequest(name=name))
            assert checked.intact
    finally:
        await other_app.shutdown()
        await other_store.close()

    atif = json.loads(
        b"".join(
            [
                r.data
                async for r in stub.ExportConversation(
                    spb.ExportConversationRequest(name=name, format=hpb.EXPORT_FORMAT_ATIF)
                )
            ]
        )
    )
    systems = [s["message"] for s in atif["steps"] if s["source"] == "system"]
    assert systems == ["First.", "Second."]
    conversation = atif["extra"]["conversation"]
    assert "archived" not in conversation  # unarchived since
    assert [u["fields"] for u in conversation["updates"]] == [
        ["defaults", "labels", "system_prompt"]
    ]


async def test_a_fork_before_an_update_has_the_old_settings(stub: Stub) -> None:
    name = await _managed_conversation(stub)
    log = await events(stub, name)
    before_update = next(e.version for e in log if e.type == "ConversationUpdated") - 1
    fork = await stub.ForkConversation(
        spb.ForkConversationRequest(name=name, version=before_update, request_id="f")
    )
    assert fork.conversation.system_prompt == "First."
    assert dict(fork.conversation.labels) == {"a": "1"}
    at = await stub.GetConversation(
        spb.GetConversationRequest(name=name, version=before_update + 1)
    )
    assert at.conversation.system_prompt == "Second."
