"""Turn control from any connection on any replica (docs/conversation.md, "Turn control").

Two replicas share one PostgreSQL database, each as `turnlog serve` builds
it: its own event store, replica lock, turn mailbox (`PostgresTurnMailbox`),
application and gRPC server on loopback. A turn runs on replica A; the
cancel or the client tool result comes to replica B on another connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
from conversation_helpers import ServedApp, error_reason, scripted_worker_server, served

from turnlog.conversation.application import ConversationApplication, ServiceDefaults
from turnlog.domain import events as ev
from turnlog.domain.codec import decode_stored
from turnlog.eventlog import stream_id
from turnlog.storage import PostgresEventStore, PostgresReplicaLock, PostgresTurnMailbox
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.client import EngineClient

SCRIPT: dict[str, Any] = {
    "model": "scripted-test",
    "replies": [
        {"match": "ask the client", "tool_calls": [{"name": "lookup", "arguments": {"q": "x"}}]},
        {"match": "long story", "text": "Once upon a time " * 400, "token_delay_ms": 20},
    ],
    "default": {"text": "Hello there."},
}


@dataclass
class Replica:
    app: ConversationApplication
    served: ServedApp
    store: PostgresEventStore
    mailbox: PostgresTurnMailbox


@contextlib.asynccontextmanager
async def replica(
    database_url: str, engine: EngineClient, name: str, **defaults: Any
) -> AsyncIterator[Replica]:
    """One `turnlog serve` replica on the shared database (as `api.server.run_server` wires it)."""
    async with contextlib.AsyncExitStack() as stack:
        store = await PostgresEventStore.open(database_url, max_size=8, poll_interval=0.2)
        stack.push_async_callback(store.close)
        lock = await PostgresReplicaLock.open(database_url, name)
        stack.push_async_callback(lock.close)
        mailbox = await PostgresTurnMailbox.open(database_url)
        stack.push_async_callback(mailbox.close)
        app = ConversationApplication(
            store,
            engine,
            ownership=lock,
            mailbox=mailbox,
            defaults=ServiceDefaults(max_tool_round_trips=1, **defaults),
        )
        stack.push_async_callback(app.shutdown)
        serving = await stack.enter_async_context(served(app))
        yield Replica(app=app, served=serving, store=store, mailbox=mailbox)


@pytest.fixture
async def engine() -> AsyncIterator[EngineClient]:
    async with (
        scripted_worker_server(SCRIPT) as worker,
        EngineClient([worker.target]) as client,
    ):
        yield client


@pytest.fixture
async def replicas(
    database_url: str, engine: EngineClient
) -> AsyncIterator[tuple[Replica, Replica]]:
    async with (
        replica(database_url, engine, "replica-a") as a,
        replica(database_url, engine, "replica-b") as b,
    ):
        yield a, b


async def _conversation(stub: sgrpc.ConversationServiceStub, *, client_tool: bool = False) -> str:
    tools = [pb.ToolDefinition(name="lookup", client_side=True)] if client_tool else []
    created = await stub.CreateConversation(spb.CreateConversationRequest(tools=tools))
    return created.conversation.name


async def _events(store: PostgresEventStore, name: str) -> list[ev.Event]:
    cid = name.removeprefix("conversations/")
    return [decode_stored(r) for r in await store.read_stream(stream_id(cid))]


async def _mailbox_rows(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as db:
        cursor = await db.execute("SELECT count(*) FROM turnlog.turn_mailbox")
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])


async def _start_stream(
    stub: sgrpc.ConversationServiceStub, name: str, content: str, until: str
) -> tuple[Any, list[spb.TurnEvent]]:
    """Starts a StreamTurn and reads until an event of kind `until`."""
    call = stub.StreamTurn(
        spb.StreamTurnRequest(start=spb.TurnInput(conversation=name, content=content))
    )
    seen: list[spb.TurnEvent] = []
    async for response in call:
        seen.append(response.event)
        if response.event.WhichOneof("kind") == until:
            break
    return call, seen


async def _rest(call: Any) -> list[spb.TurnEvent]:
    return [r.event async for r in call]


async def test_a_turn_on_replica_a_is_cancelled_from_replica_b(
    replicas: tuple[Replica, Replica], database_url: str
) -> None:
    a, b = replicas
    async with a.served.stub() as on_a, b.served.stub() as on_b:
        name = await _conversation(on_a)
        stream, seen = await _start_stream(on_a, name, "long story", "text_delta")
        turn_id = seen[0].turn_id
        assert a.app.running.get(name.removeprefix("conversations/"), turn_id) is not None
        assert b.app.running.get(name.removeprefix("conversations/"), turn_id) is None
        cancelled = await on_b.CancelTurn(
            spb.CancelTurnRequest(conversation=name, turn_id=turn_id, reason="stop it"),
            timeout=20,
        )
        assert cancelled.turn.status == pb.TURN_STATUS_CANCELLED
        rest = await _rest(stream)
        assert rest[-1].turn_ended.turn.status == pb.TURN_STATUS_CANCELLED
        assert cancelled.conversation_version == rest[-1].turn_ended.conversation_version
        # A retry (a lost reply) gets the same answer, and records nothing.
        again = await on_b.CancelTurn(
            spb.CancelTurnRequest(conversation=name, turn_id=turn_id), timeout=20
        )
        assert again == cancelled
    events = await _events(a.store, name)
    [ended] = [e for e in events if isinstance(e, ev.TurnCancelled)]
    assert ended.reason == "stop it"
    assert len(events) == cancelled.conversation_version
    text = "".join(e.text_delta.text for e in seen + rest if e.HasField("text_delta"))
    assert len(text) < len("Once upon a time " * 400)
    assert await _mailbox_rows(database_url) == 0


async def test_a_client_tool_of_a_streamed_turn_is_answered_from_replica_b(
    replicas: tuple[Replica, Replica], database_url: str
) -> None:
    a, b = replicas
    async with a.served.stub() as on_a, b.served.stub() as on_b:
        name = await _conversation(on_a, client_tool=True)
        stream, seen = await _start_stream(on_a, name, "ask the client", "tool_execution_started")
        started = seen[-1].tool_execution_started
        assert started.client_side
        turn_id, call_id = seen[-1].turn_id, started.call.call_id
        request = spb.SubmitToolResultsRequest(
            conversation=name,
            turn_id=turn_id,
            results=[spb.ToolResult(call_id=call_id, result='{"found": 1}')],
        )
        answered = await on_b.SubmitToolResults(request, timeout=20)
        assert list(answered.call_ids) == [call_id]
        # Recorded by the time the answer came.
        recorded = [e for e in await _events(b.store, name) if isinstance(e, ev.ToolCallCompleted)]
        assert [(e.call_id, e.result) for e in recorded] == [(call_id, '{"found": 1}')]
        rest = await _rest(stream)
        [finished] = [e for e in rest if e.HasField("tool_execution_finished")]
        assert finished.tool_execution_finished.execution.result == '{"found": 1}'
        assert rest[-1].turn_ended.turn.status == pb.TURN_STATUS_COMPLETED
        before = await _events(a.store, name)
        # The same result again: OK, nothing recorded twice (on either replica).
        for stub in (on_a, on_b):
            assert list((await stub.SubmitToolResults(request, timeout=20)).call_ids) == [call_id]
        # Another result for the answered call, or a call never made: refused, nothing recorded.
        for result in (
            spb.ToolResult(call_id=call_id, result="something else"),
            spb.ToolResult(call_id=call_id, error="it failed"),
            spb.ToolResult(call_id="no-such-call", result="x"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await on_b.SubmitToolResults(
                    spb.SubmitToolResultsRequest(
                        conversation=name, turn_id=turn_id, results=[result]
                    ),
                    timeout=20,
                )
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_reason(raised.value) == "TOOL_CALL_NOT_AWAITED"
        assert await _events(a.store, name) == before
    assert await _mailbox_rows(database_url) == 0


async def test_a_result_for_a_call_not_awaited_changes_nothing_while_the_turn_waits(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with a.served.stub() as on_a, b.served.stub() as on_b:
        name = await _conversation(on_a, client_tool=True)
        stream, seen = await _start_stream(on_a, name, "ask the client", "tool_execution_started")
        turn_id, call_id = seen[-1].turn_id, seen[-1].tool_execution_started.call.call_id
        before = await _events(a.store, name)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            # One good result and one for a call the turn does not await: all or nothing.
            await on_b.SubmitToolResults(
                spb.SubmitToolResultsRequest(
                    conversation=name,
                    turn_id=turn_id,
                    results=[
                        spb.ToolResult(call_id=call_id, result="ok"),
                        spb.ToolResult(call_id="other", result="no"),
                    ],
                ),
                timeout=20,
            )
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(raised.value) == "TOOL_CALL_NOT_AWAITED"
        await asyncio.sleep(0.3)
        assert await _events(a.store, name) == before
        # The turn still waits, and takes the right answer.
        await on_b.SubmitToolResults(
            spb.SubmitToolResultsRequest(
                conversation=name,
                turn_id=turn_id,
                results=[spb.ToolResult(turn_id=turn_id, call_id=call_id, result="ok")],
            ),
            timeout=20,
        )
        rest = await _rest(stream)
        assert rest[-1].turn_ended.turn.status == pb.TURN_STATUS_COMPLETED


async def test_unknown_and_other_tenants_turns_are_not_found(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with a.served.stub("tenant-a") as owner, b.served.stub("tenant-b") as stranger:
        name = await _conversation(owner, client_tool=True)
        stream, seen = await _start_stream(owner, name, "ask the client", "tool_execution_started")
        turn_id, call_id = seen[-1].turn_id, seen[-1].tool_execution_started.call.call_id
        before = await _events(a.store, name)
        attempts = [
            (stranger.CancelTurn, spb.CancelTurnRequest(conversation=name, turn_id=turn_id)),
            (
                stranger.SubmitToolResults,
                spb.SubmitToolResultsRequest(
                    conversation=name,
                    turn_id=turn_id,
                    results=[spb.ToolResult(call_id=call_id, result="x")],
                ),
            ),
            (owner.CancelTurn, spb.CancelTurnRequest(conversation=name, turn_id="no-such-turn")),
            (
                owner.CancelTurn,
                spb.CancelTurnRequest(conversation="conversations/nope", turn_id=turn_id),
            ),
        ]
        for rpc, request in attempts:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await rpc(request, timeout=20)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND, request
        # Nothing reached the turn: it still awaits its tool, and the log is as it was.
        await asyncio.sleep(0.5)
        assert a.app.running.get(name.removeprefix("conversations/"), turn_id) is not None
        assert await _events(a.store, name) == before
        # The owner's cancel still works (from B), while the tool is awaited.
        cancelled = await owner.CancelTurn(
            spb.CancelTurnRequest(conversation=name, turn_id=turn_id), timeout=20
        )
        assert cancelled.turn.status == pb.TURN_STATUS_CANCELLED
        assert (await _rest(stream))[-1].turn_ended.turn.status == pb.TURN_STATUS_CANCELLED


async def test_send_message_is_refused_when_the_conversation_has_client_tools(
    replicas: tuple[Replica, Replica],
) -> None:
    a, _ = replicas
    async with a.served.stub() as stub:
        name = await _conversation(stub, client_tool=True)
        before = await _events(a.store, name)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.SendMessage(
                spb.SendMessageRequest(input=spb.TurnInput(conversation=name, content="hi")),
                timeout=20,
            )
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(raised.value) == "CLIENT_TOOLS_NEED_STREAM"
        assert await _events(a.store, name) == before


async def test_an_unanswered_client_tool_fails_the_turn_after_the_timeout(
    database_url: str, engine: EngineClient
) -> None:
    async with (
        replica(database_url, engine, "replica-t", client_tool_timeout_s=0.5) as a,
        a.served.stub() as stub,
    ):
        name = await _conversation(stub, client_tool=True)
        stream, seen = await _start_stream(stub, name, "ask the client", "tool_execution_started")
        call_id = seen[-1].tool_execution_started.call.call_id
        rest = await asyncio.wait_for(_rest(stream), 10)
        ended = rest[-1].turn_ended.turn
        assert ended.status == pb.TURN_STATUS_FAILED
        assert "CLIENT_TOOL_TIMEOUT" in ended.outcome_reason
        assert ended.error.reason == "CLIENT_TOOL_TIMEOUT"
        assert ended.error.metadata["callId"] == seen[-1].tool_execution_started.call.call_id
        [finished] = [e for e in rest if e.HasField("tool_execution_finished")]
        assert finished.tool_execution_finished.execution.error
        # The log is consistent: the call has its outcome, the turn its end,
        # and the conversation takes the next turn.
        events = await _events(a.store, name)
        assert [type(e) for e in events if isinstance(e, ev.ToolCallFailed | ev.TurnFailed)] == [
            ev.ToolCallFailed,
            ev.TurnFailed,
        ]
        failed = next(e for e in events if isinstance(e, ev.ToolCallFailed))
        assert failed.call_id == call_id
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.SubmitToolResults(
                spb.SubmitToolResultsRequest(
                    conversation=name,
                    turn_id=seen[0].turn_id,
                    results=[spb.ToolResult(call_id=call_id, result="late")],
                ),
                timeout=20,
            )
        assert error_reason(raised.value) == "TOOL_CALL_NOT_AWAITED"
        # (The scripted model calls the tool again: this turn times out too.)
        _, next_turn = await _start_stream(stub, name, "hello", "turn_ended")
        assert next_turn[-1].turn_id != seen[0].turn_id
        assert next_turn[-1].turn_ended.turn.status == pb.TURN_STATUS_FAILED


async def test_converse_answers_a_refused_action_and_goes_on(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with a.served.stub() as stub, b.served.stub() as on_b:
        name = await _conversation(stub)
        other = await _conversation(stub)
        await stub.ArchiveConversation(spb.ArchiveConversationRequest(name=other))
        call = stub.Converse(timeout=60)
        await call.write(
            spb.ConverseRequest(user_message=spb.TurnInput(conversation=name, content="long story"))
        )
        first = await call.read()
        turn_id = first.event.turn_id
        refused = [
            # 2: a user message while the turn runs
            spb.ConverseRequest(user_message=spb.TurnInput(conversation=name, content="hi")),
            # 3: a result for a call the turn does not await
            spb.ConverseRequest(
                tool_result=spb.ToolResult(turn_id=turn_id, call_id="nope", result="x")
            ),
            # 4: a turn on an archived conversation
            spb.ConverseRequest(user_message=spb.TurnInput(conversation=other, content="hi")),
            # 5: a stale expected version
            spb.ConverseRequest(
                user_message=spb.TurnInput(conversation=name, content="hi", expected_version=1)
            ),
        ]
        for request in refused:
            await call.write(request)
        rejected: dict[int, spb.ActionRejected] = {}
        events = [first.event]
        while len(rejected) < len(refused):
            response = await call.read()
            if response.HasField("action_rejected"):
                rejected[response.action_rejected.action_index] = response.action_rejected
            else:
                events.append(response.event)
        assert {i: (r.error.code, r.error.reason) for i, r in rejected.items()} == {
            2: (grpc.StatusCode.FAILED_PRECONDITION.value[0], "TURN_IN_PROGRESS"),
            3: (grpc.StatusCode.FAILED_PRECONDITION.value[0], "TOOL_CALL_NOT_AWAITED"),
            4: (grpc.StatusCode.FAILED_PRECONDITION.value[0], "CONVERSATION_ARCHIVED"),
            5: (grpc.StatusCode.ABORTED.value[0], "VERSION_CONFLICT"),
        }
        assert rejected[2].error.retryable
        assert rejected[3].turn_id == turn_id
        assert rejected[3].error.metadata["callId"] == "nope"
        # The running turn was not affected: it runs to its end (cancelled from
        # another connection on the other replica, so it ends soon).
        assert a.app.running.get(name.removeprefix("conversations/"), turn_id) is not None
        await on_b.CancelTurn(spb.CancelTurnRequest(conversation=name, turn_id=turn_id), timeout=20)
        while events[-1].WhichOneof("kind") != "turn_ended":
            events.append((await call.read()).event)
        assert events[-1].turn_ended.turn.status == pb.TURN_STATUS_CANCELLED
        # 6: cancelling the ended turn is refused; 7: the next message runs.
        await call.write(spb.ConverseRequest(cancel=spb.CancelTurn(turn_id=turn_id)))
        response = await call.read()
        assert response.action_rejected.action_index == 6
        assert response.action_rejected.error.reason == "TURN_NOT_RUNNING"
        await call.write(
            spb.ConverseRequest(user_message=spb.TurnInput(conversation=name, content="hi"))
        )
        await call.done_writing()
        rest = [r async for r in call]
        assert all(r.HasField("event") for r in rest)
        assert rest[-1].event.turn_ended.turn.status == pb.TURN_STATUS_COMPLETED
        assert await call.code() == grpc.StatusCode.OK


async def test_a_dropped_listening_connection_recovers(
    replicas: tuple[Replica, Replica], database_url: str
) -> None:
    a, b = replicas
    # Only a notification can be this quick: the fallback poll is made slow.
    a.app.control.poll_interval_s = 30.0
    await asyncio.wait_for(a.mailbox.listening.wait(), 10)
    dropped = a.mailbox.backend_pid
    assert dropped is not None
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db:
        await db.execute("SELECT pg_terminate_backend(%s)", (dropped,))
    for _ in range(200):  # the listener reconnects (backoff from 50 ms)
        if a.mailbox.backend_pid not in (None, dropped) and a.mailbox.listening.is_set():
            break
        await asyncio.sleep(0.05)
    assert a.mailbox.backend_pid not in (None, dropped)
    # Let the receiver take its look after the reconnect (and wait 30 s again).
    await asyncio.sleep(0.5)
    async with a.served.stub() as on_a, b.served.stub() as on_b:
        name = await _conversation(on_a)
        stream, seen = await _start_stream(on_a, name, "long story", "text_delta")
        cancelled = await on_b.CancelTurn(
            spb.CancelTurnRequest(conversation=name, turn_id=seen[0].turn_id), timeout=5
        )
        assert cancelled.turn.status == pb.TURN_STATUS_CANCELLED
        await _rest(stream)


async def test_two_different_results_racing_for_one_call_record_one(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with a.served.stub() as on_a, b.served.stub() as on_b:
        name = await _conversation(on_a, client_tool=True)
        stream, seen = await _start_stream(on_a, name, "ask the client", "tool_execution_started")
        turn_id, call_id = seen[-1].turn_id, seen[-1].tool_execution_started.call.call_id

        async def submit(stub: sgrpc.ConversationServiceStub, result: str) -> str:
            try:
                await stub.SubmitToolResults(
                    spb.SubmitToolResultsRequest(
                        conversation=name,
                        turn_id=turn_id,
                        results=[spb.ToolResult(call_id=call_id, result=result)],
                    ),
                    timeout=20,
                )
            except grpc.aio.AioRpcError as e:
                return error_reason(e)
            return "OK"

        outcomes = await asyncio.gather(submit(on_a, "from a"), submit(on_b, "from b"))
        assert sorted(outcomes) == ["OK", "TOOL_CALL_NOT_AWAITED"]
        await _rest(stream)
    recorded = [e for e in await _events(a.store, name) if isinstance(e, ev.ToolCallCompleted)]
    winner = "from a" if outcomes[0] == "OK" else "from b"
    assert [e.result for e in recorded] == [winner]


async def test_a_lost_notification_only_delays_the_letter(
    replicas: tuple[Replica, Replica], monkeypatch: pytest.MonkeyPatch
) -> None:
    from turnlog.storage import mailbox_postgres

    a, b = replicas
    # Replica B's letters now go without their NOTIFY: only A's poll finds them.
    monkeypatch.setattr(
        mailbox_postgres,
        "_POST",
        "INSERT INTO turnlog.turn_mailbox (turn_id, body) VALUES (%s, %s) RETURNING letter_id, %s",
    )
    a.app.control.poll_interval_s = 0.5
    async with a.served.stub() as on_a, b.served.stub() as on_b:
        name = await _conversation(on_a)
        stream, seen = await _start_stream(on_a, name, "long story", "text_delta")
        cancelled = await on_b.CancelTurn(
            spb.CancelTurnRequest(conversation=name, turn_id=seen[0].turn_id), timeout=20
        )
        assert cancelled.turn.status == pb.TURN_STATUS_CANCELLED
        await _rest(stream)


async def test_a_lost_notification_is_found_while_other_notices_keep_coming(
    replicas: tuple[Replica, Replica], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poll runs every interval, not only after an interval with no notice at all."""
    from turnlog.storage import mailbox_postgres

    a, b = replicas
    monkeypatch.setattr(
        mailbox_postgres,
        "_POST",
        "INSERT INTO turnlog.turn_mailbox (turn_id, body) VALUES (%s, %s) RETURNING letter_id, %s",
    )
    a.app.control.poll_interval_s = 0.5

    async def chatter() -> None:  # notices for a turn nobody runs, more often than the poll
        async with await psycopg.AsyncConnection.connect(store_url(a.store), autocommit=True) as c:
            while True:
                await c.execute("SELECT pg_notify('turnlog_turn_control', 'someone-else')")
                await asyncio.sleep(0.1)

    noise = asyncio.create_task(chatter())
    try:
        async with a.served.stub() as on_a, b.served.stub() as on_b:
            name = await _conversation(on_a)
            stream, seen = await _start_stream(on_a, name, "long story", "text_delta")
            cancelled = await on_b.CancelTurn(
                spb.CancelTurnRequest(conversation=name, turn_id=seen[0].turn_id), timeout=20
            )
            assert cancelled.turn.status == pb.TURN_STATUS_CANCELLED
            await _rest(stream)
    finally:
        noise.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await noise


async def test_replicas_sharing_an_in_memory_mailbox(
    store: PostgresEventStore, engine: EngineClient
) -> None:
    """The in-memory adapter carries cancels and results between apps of one process alike."""
    from turnlog.conversation.application import CreateConversation, ToolResultInput, TurnInput
    from turnlog.conversation.projection import ToolStarted, TurnEnded
    from turnlog.storage import InMemoryTurnMailbox

    shared = InMemoryTurnMailbox()
    # Two tool rounds: the scripted model numbers each generation's calls
    # afresh, so the second round's call has the first one's id.
    defaults = ServiceDefaults(max_tool_round_trips=2)
    a = ConversationApplication(
        store, engine, mailbox=shared.subscribe(), instance="mem-a", defaults=defaults
    )
    other_store = await PostgresEventStore.open(store_url(store), poll_interval=0.2)
    b = ConversationApplication(
        other_store, engine, mailbox=shared.subscribe(), instance="mem-b", defaults=defaults
    )
    try:
        state = await a.create(
            CreateConversation(tools=(ev.ToolDefinition(name="lookup", client_side=True),))
        )
        cid = state.conversation_id
        turn_id = await a.start_turn(TurnInput(conversation_id=cid, content="ask the client"))
        calls = []
        async for update in a.watch(cid, turn_id):
            if isinstance(update.payload, ToolStarted):
                call_id = update.payload.call.call_id
                calls.append(call_id)
                answered = await b.submit_tool_results(
                    cid, turn_id, [ToolResultInput(call_id=call_id, result="r")], timeout_s=10
                )
                assert answered == [call_id]
            if isinstance(update.payload, TurnEnded):
                assert update.payload.turn.status.value == "completed", update.payload.turn
        assert len(calls) == 2
        second = await a.start_turn(TurnInput(conversation_id=cid, content="long story"))
        ended = await b.cancel_and_wait(cid, second, "enough", timeout_s=10)
        assert ended.turn.status.value == "cancelled"
        assert len(shared) == 0
    finally:
        await a.shutdown()
        await b.shutdown()
        await other_store.close()


def store_url(store: PostgresEventStore) -> str:
    conninfo = store._pool.conninfo
    assert isinstance(conninfo, str)
    return conninfo
