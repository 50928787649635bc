"""The SDK's turns against a live service: resume after a cut, client tool callbacks, the blocking client."""

from __future__ import annotations

import asyncio
import json

import pytest
from sdk_helpers import Service
from tcp_proxy import TcpProxy

from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog_client import (
    NO_RETRY,
    AsyncTurnlogClient,
    FailedPrecondition,
    TurnlogClient,
    Unavailable,
)

pytestmark = pytest.mark.timeout(90)


def _sequences(events: list[spb.TurnEvent]) -> list[int]:
    return [e.sequence for e in events]


async def test_stream_turn_resumes_after_the_proxy_cuts_mid_turn(
    service: Service, client: AsyncTurnlogClient
) -> None:
    conversation = await client.create_conversation(system_prompt="Tell stories.")
    async with TcpProxy(service.address) as proxy, service.client(proxy.address) as cut_client:
        stream = cut_client.stream_turn(conversation.name, "slow story")
        seen: list[spb.TurnEvent] = []
        async for event in stream:
            seen.append(event)
            if sum(e.HasField("text_delta") for e in seen) == 5 and not proxy.connections > 1:
                proxy.cut()
                asyncio.get_running_loop().call_later(0.3, proxy.restore)
        assert proxy.connections >= 2, "the stream never reconnected"
    assert stream.resumes >= 1
    # The same turn read uncut, from its start, straight from the service.
    uncut = [e async for e in client.resume_turn(conversation.name, stream.turn_id)]
    assert _sequences(seen) == list(range(1, len(seen) + 1)), "a gap or a duplicate"
    assert [e.SerializeToString() for e in seen] == [e.SerializeToString() for e in uncut]
    assert seen[-1].turn_ended.turn.status == pb.TURN_STATUS_COMPLETED
    text = "".join(e.text_delta.text for e in seen if e.HasField("text_delta"))
    assert text == "once upon a time " * 15


async def test_a_cut_stream_fails_unavailable_without_retries(service: Service) -> None:
    async with (
        service.client() as setup,
        TcpProxy(service.address) as proxy,
        service.client(proxy.address, retry=NO_RETRY) as cut_client,
    ):
        conversation = await setup.create_conversation()
        stream = cut_client.stream_turn(conversation.name, "slow story")

        async def read() -> None:
            async for event in stream:
                if event.HasField("text_delta"):
                    proxy.cut()

        with pytest.raises(Unavailable) as caught:
            await read()
        assert caught.value.retryable
        assert stream.last_sequence >= 2
        # What it missed is still there to resume, on the service.
        rest = [
            e
            async for e in setup.resume_turn(
                conversation.name, stream.turn_id, stream.last_sequence
            )
        ]
        assert rest[0].sequence == stream.last_sequence + 1
        assert rest[-1].HasField("turn_ended")


async def test_converse_answers_client_side_tools_with_callbacks(
    client: AsyncTurnlogClient,
) -> None:
    conversation = await client.create_conversation(
        tools=[
            pb.ToolDefinition(
                name="lookup",
                client_side=True,
                parameters_json_schema='{"type": "object"}',
            )
        ],
        defaults=pb.TurnDefaults(max_tool_round_trips=1),
    )
    calls: list[pb.ToolCall] = []

    async def lookup(call: pb.ToolCall) -> str:
        calls.append(call)
        return "found " + json.loads(call.arguments_json)["q"]

    turn = client.converse(conversation.name, "ask the client", tools={"lookup": lookup})
    events = [event async for event in turn]
    kinds = [e.WhichOneof("kind") for e in events]
    assert [c.name for c in calls] == ["lookup"]
    assert turn.tool_calls_answered == 1
    [finished] = [
        e.tool_execution_finished for e in events if e.HasField("tool_execution_finished")
    ]
    assert finished.execution.result == "found x"
    assert finished.execution.call.call_id == calls[0].call_id
    assert kinds.index("tool_execution_started") < kinds.index("tool_execution_finished")
    assert kinds[-1] == "turn_ended"
    # The result is in the log: the tool message of the conversation.
    folded = await client.get_conversation(conversation.name)
    assert [m.content for m in folded.messages if m.role == pb.ROLE_TOOL] == ["found x"]


async def test_the_blocking_client_runs_sync_callbacks_and_reports_their_errors(
    service: Service,
) -> None:
    # The service runs on this test's event loop: the blocking client runs in
    # a thread of its own, as it would in a program without asyncio.
    await asyncio.to_thread(_blocking_session, service)


def _blocking_session(service: Service) -> None:
    seen_threads: list[str] = []

    def lookup(call: pb.ToolCall) -> str:
        import threading

        seen_threads.append(threading.current_thread().name)
        raise LookupError("no such record")

    with TurnlogClient(service.address, token=service.served.token()) as client:
        conversation = client.create_conversation(
            tools=[pb.ToolDefinition(name="lookup", client_side=True)],
            defaults=pb.TurnDefaults(max_tool_round_trips=1),
        )
        turn = client.converse(conversation.name, "ask the client", tools={"lookup": lookup})
        events = list(turn)
        assert turn.turn_id == events[0].turn_id
        [finished] = [e for e in events if e.HasField("tool_execution_finished")]
        assert finished.tool_execution_finished.execution.error == "LookupError: no such record"
        # A sync callback runs off the client's event loop thread.
        assert seen_threads == ["asyncio_0"] or seen_threads[0] != "turnlog-client"
        # (A turn on that conversation would call the client-side tool again:
        # the scripted model matches the whole prompt.)
        conversation = client.create_conversation()
        sent = client.send_message(conversation.name, "hi")
        assert sent.assistant_message.content == "Hello there."
        stream = client.stream_turn(conversation.name, "slow story")
        streamed = list(stream)
        assert stream.last_sequence == streamed[-1].sequence == len(streamed)


async def test_converse_cancel_ends_the_turn_cancelled(client: AsyncTurnlogClient) -> None:
    conversation = await client.create_conversation()
    turn = client.converse(conversation.name, "slow story")
    deltas = 0
    async for event in turn:
        if event.HasField("text_delta"):
            deltas += 1
            if deltas == 2:
                await turn.cancel("user pressed Ctrl-C")
    assert turn.ended is not None
    assert turn.ended.turn.status == pb.TURN_STATUS_CANCELLED


async def test_a_second_message_while_a_turn_runs_is_refused_as_an_error(
    client: AsyncTurnlogClient,
) -> None:
    conversation = await client.create_conversation()
    first = client.converse(conversation.name, "slow story")
    await anext(first)
    second = client.converse(conversation.name, "hi")
    with pytest.raises(FailedPrecondition) as caught:
        await anext(second)
    assert caught.value.reason
    await first.cancel()
    _ = [e async for e in first]


async def test_cancel_turn_from_another_connection_ends_a_streamed_turn(
    client: AsyncTurnlogClient, service: Service
) -> None:
    conversation = await client.create_conversation()
    stream = client.stream_turn(conversation.name, "slow story")
    async with service.client() as other:
        async for event in stream:
            if event.HasField("text_delta"):
                cancelled = await other.cancel_turn(
                    conversation.name, event.turn_id, reason="enough"
                )
                break
        rest = [e async for e in stream]
    assert cancelled.turn.status == pb.TURN_STATUS_CANCELLED
    assert rest[-1].turn_ended.turn.status == pb.TURN_STATUS_CANCELLED
    # Cancelling again answers the ended turn as it is (a retry after a lost reply).
    again = await client.cancel_turn(conversation.name, stream.turn_id)
    assert again.turn.status == pb.TURN_STATUS_CANCELLED


async def test_submit_tool_results_answers_a_streamed_turns_client_tool(
    client: AsyncTurnlogClient,
) -> None:
    conversation = await client.create_conversation(
        tools=[pb.ToolDefinition(name="lookup", client_side=True)],
        defaults=pb.TurnDefaults(max_tool_round_trips=1),
    )
    stream = client.stream_turn(conversation.name, "ask the client")
    answered: list[str] = []
    async for event in stream:
        started = event.tool_execution_started
        if event.HasField("tool_execution_started") and started.client_side:
            result = spb.ToolResult(call_id=started.call.call_id, result="from afar")
            response = await client.submit_tool_results(conversation.name, event.turn_id, [result])
            answered.extend(response.call_ids)
            # The same answer again is harmless.
            await client.submit_tool_results(conversation.name, event.turn_id, [result])
    assert answered
    assert stream.ended is not None
    folded = await client.get_conversation(conversation.name)
    assert [m.content for m in folded.messages if m.role == pb.ROLE_TOOL] == ["from afar"]


async def test_a_cut_converse_turn_is_read_to_its_end_over_stream_turn(
    service: Service, client: AsyncTurnlogClient
) -> None:
    """A broken Converse cancels its turn on the service (docs/conversation.md): the
    SDK reads the rest of it over StreamTurn, so the caller sees it end, not an error."""
    conversation = await client.create_conversation(
        tools=[pb.ToolDefinition(name="lookup", client_side=True)],
        defaults=pb.TurnDefaults(max_tool_round_trips=1),
    )
    calls: list[pb.ToolCall] = []
    async with TcpProxy(service.address) as proxy, service.client(proxy.address) as cut_client:

        async def lookup(call: pb.ToolCall) -> str:
            # The connection dies while the tool runs.
            calls.append(call)
            proxy.cut()
            asyncio.get_running_loop().call_later(0.3, proxy.restore)
            return "found it"

        turn = cut_client.converse(conversation.name, "ask the client", tools={"lookup": lookup})
        events = [event async for event in turn]
    assert turn.resumes == 1
    assert [c.name for c in calls] == ["lookup"], "the tool ran once"
    assert _sequences(events) == list(range(1, len(events) + 1)), "a gap or a duplicate"
    uncut = [e async for e in client.resume_turn(conversation.name, turn.turn_id)]
    assert [e.SerializeToString() for e in events] == [e.SerializeToString() for e in uncut]
    ended = events[-1].turn_ended.turn
    assert ended.status == pb.TURN_STATUS_CANCELLED
    assert "disconnected" in ended.outcome_reason
