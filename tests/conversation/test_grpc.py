"""ConversationService over real gRPC on loopback: the adapter and the error table."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from conversation_helpers import conversation_stub
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from turnlog.conversation.application import ConversationApplication
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc


@pytest.fixture
async def stub(app: ConversationApplication) -> AsyncIterator[sgrpc.ConversationServiceStub]:
    async with conversation_stub(app) as served:
        yield served


def _details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return info, fields


async def test_create_send_stream_resume_get(stub: sgrpc.ConversationServiceStub) -> None:
    created = await stub.CreateConversation(
        spb.CreateConversationRequest(request_id="c", system_prompt="Be brief.")
    )
    name = created.conversation.name
    sent = await stub.SendMessage(
        spb.SendMessageRequest(input=spb.TurnInput(conversation=name, content="hi", request_id="1"))
    )
    assert sent.turn.status == pb.TURN_STATUS_COMPLETED
    assert sent.assistant_message.content == "Hello there."
    start = spb.StreamTurnRequest(
        start=spb.TurnInput(conversation=name, content="slow story", request_id="2")
    )
    seen = []
    async for response in stub.StreamTurn(start):
        seen.append(response.event)
        if len(seen) == 4:
            break  # disconnect mid-turn
    turn_id = seen[0].turn_id
    resume = spb.StreamTurnRequest(
        resume=spb.ResumeTurn(conversation=name, turn_id=turn_id, after_sequence=4)
    )
    rest = [r.event async for r in stub.StreamTurn(resume)]
    events = seen + rest
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].WhichOneof("kind") == "turn_ended"
    text = "".join(e.text_delta.text for e in events if e.WhichOneof("kind") == "text_delta")
    assert text == "Once upon a time " * 20
    again = [r.event async for r in stub.StreamTurn(resume)]
    assert again == rest  # after the end, from the log: nothing lost, nothing repeated
    got = await stub.GetConversation(spb.GetConversationRequest(name=name))
    assert got.conversation.version == events[-1].turn_ended.conversation_version
    assert [t.status for t in got.conversation.turns] == [pb.TURN_STATUS_COMPLETED] * 2
    at_one = await stub.GetConversation(spb.GetConversationRequest(name=name, version=1))
    assert not at_one.conversation.turns


async def test_validation_errors_carry_bad_request(stub: sgrpc.ConversationServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SendMessage(
            spb.SendMessageRequest(input=spb.TurnInput(conversation="nope", content=""))
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error_info, fields = _details(info.value)
    assert error_info.domain == "turnlog.dev"
    assert error_info.reason == "INVALID_REQUEST"
    assert set(fields) == {"input.conversation", "input.content"}


async def test_not_found_and_version_conflict(stub: sgrpc.ConversationServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetConversation(spb.GetConversationRequest(name="conversations/missing"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    created = await stub.CreateConversation(spb.CreateConversationRequest(request_id="v"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ArchiveConversation(
            spb.ArchiveConversationRequest(name=created.conversation.name, expected_version=5)
        )
    assert info.value.code() == grpc.StatusCode.ABORTED
    error_info, _ = _details(info.value)
    assert error_info.metadata["actualVersion"] == "1"
    assert error_info.metadata["retryable"] == "false"
    archived = await stub.ArchiveConversation(
        spb.ArchiveConversationRequest(name=created.conversation.name, expected_version=1)
    )
    assert archived.conversation.state == pb.CONVERSATION_STATE_ARCHIVED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SendMessage(
            spb.SendMessageRequest(
                input=spb.TurnInput(conversation=created.conversation.name, content="hi")
            )
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_converse_cancel_aborts_the_turn(stub: sgrpc.ConversationServiceStub) -> None:
    created = await stub.CreateConversation(spb.CreateConversationRequest(request_id="cv"))
    call = stub.Converse()
    await call.write(
        spb.ConverseRequest(
            user_message=spb.TurnInput(
                conversation=created.conversation.name, content="slow story", request_id="x"
            )
        )
    )
    events: list[spb.TurnEvent] = []
    async for response in call:
        events.append(response.event)
        kinds = [e.WhichOneof("kind") for e in events]
        if kinds[-1] == "text_delta" and kinds.count("text_delta") == 3:
            await call.write(
                spb.ConverseRequest(cancel=spb.CancelTurn(turn_id=response.event.turn_id))
            )
        if kinds[-1] == "turn_ended":
            await call.done_writing()
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds.count("text_delta") >= 3  # the cancel was sent mid-turn
    assert kinds.count("turn_ended") == 1
    assert kinds[-1] == "turn_ended"
    assert events[-1].turn_ended.turn.status == pb.TURN_STATUS_CANCELLED
    text = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
    assert len(text) < len("Once upon a time " * 20)


async def test_converse_client_side_tool(stub: sgrpc.ConversationServiceStub) -> None:
    created = await stub.CreateConversation(
        spb.CreateConversationRequest(
            request_id="ct",
            tools=[pb.ToolDefinition(name="lookup", client_side=True)],
            defaults=pb.TurnDefaults(max_tool_round_trips=1),
        )
    )
    call = stub.Converse()
    await call.write(
        spb.ConverseRequest(
            user_message=spb.TurnInput(
                conversation=created.conversation.name, content="ask the client", request_id="q"
            )
        )
    )
    by_kind: dict[str, list[spb.TurnEvent]] = {}
    order: list[str] = []
    async for response in call:
        event = response.event
        kind = event.WhichOneof("kind")
        by_kind.setdefault(kind, []).append(event)
        order.append(kind)
        if kind == "tool_execution_started":
            await call.write(
                spb.ConverseRequest(
                    tool_result=spb.ToolResult(
                        turn_id=event.turn_id,
                        call_id=event.tool_execution_started.call.call_id,
                        result="found",
                    )
                )
            )
        if kind == "turn_ended":
            await call.done_writing()
    [started] = by_kind["tool_execution_started"]
    [finished] = by_kind["tool_execution_finished"]
    [ended] = by_kind["turn_ended"]
    assert started.tool_execution_started.client_side
    assert started.tool_execution_started.call.name == "lookup"
    assert finished.tool_execution_finished.execution.result == "found"
    assert ended.turn_ended.turn.tool_round_limit_reached
    assert order.index("tool_execution_started") < order.index("tool_execution_finished")
    assert order[-1] == "turn_ended"
