"""Two `turnlog serve` processes on one database: a turn on one is cancelled and answered through the other.

tests/conversation/test_turn_control.py covers turn control's rules with
two replicas built in the test; this proves that `turnlog serve` itself
wires the turn mailbox (migration, listener, receiving loop), with the
processes, workers and database all real, and the scripted worker the
model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from serve_processes import ServeProcess
from worker_processes import WorkerProcess, start_scripted_worker

from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc

pytestmark = pytest.mark.timeout(120)

SCRIPT: dict[str, Any] = {
    "model": "scripted-replicas",
    "replies": [
        {"match": "ask the client", "tool_calls": [{"name": "lookup", "arguments": {"q": "x"}}]},
        {"match": "long", "text": "tick " * 1000, "token_delay_ms": 5},
    ],
    "default": {"text": "Fine."},
}


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[WorkerProcess]:
    started = start_scripted_worker(SCRIPT, tmp_path)
    yield started
    started.kill()


@pytest.fixture
def replicas(
    database_url: str, worker: WorkerProcess, tmp_path: Path
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    started = []
    try:
        for name in ("a", "b"):
            serve = ServeProcess(
                tmp_path / f"serve-{name}.log",
                tmp_path / f"data-{name}",
                database_url=database_url,
                worker=worker.target,
            )
            started.append(serve.start())
        yield started[0], started[1]
    finally:
        for serve in started:
            serve.stop()


async def _first(call: Any, kind: str) -> list[spb.TurnEvent]:
    seen = []
    async for response in call:
        seen.append(response.event)
        if response.event.WhichOneof("kind") == kind:
            break
    return seen


async def test_cancel_and_tool_results_reach_a_turn_on_the_other_process(
    replicas: tuple[ServeProcess, ServeProcess], database_url: str
) -> None:
    a, b = replicas
    async with a.channel() as channel_a, b.channel() as channel_b:
        on_a, on_b = (
            sgrpc.ConversationServiceStub(channel_a),
            sgrpc.ConversationServiceStub(channel_b),
        )
        created = await on_a.CreateConversation(
            spb.CreateConversationRequest(
                tools=[pb.ToolDefinition(name="lookup", client_side=True)],
                defaults=pb.TurnDefaults(max_tool_round_trips=1),
            ),
            timeout=10,
        )
        name = created.conversation.name

        stream = on_a.StreamTurn(
            spb.StreamTurnRequest(start=spb.TurnInput(conversation=name, content="ask the client")),
            timeout=60,
        )
        seen = await _first(stream, "tool_execution_started")
        call_id = seen[-1].tool_execution_started.call.call_id
        answered = await on_b.SubmitToolResults(
            spb.SubmitToolResultsRequest(
                conversation=name,
                turn_id=seen[-1].turn_id,
                results=[spb.ToolResult(call_id=call_id, result="found")],
            ),
            timeout=20,
        )
        assert list(answered.call_ids) == [call_id]
        rest = [r.event async for r in stream]
        assert rest[-1].turn_ended.turn.status == pb.TURN_STATUS_COMPLETED

        stream = on_a.StreamTurn(
            spb.StreamTurnRequest(start=spb.TurnInput(conversation=name, content="long")),
            timeout=60,
        )
        seen = await _first(stream, "text_delta")
        cancelled = await on_b.CancelTurn(
            spb.CancelTurnRequest(conversation=name, turn_id=seen[0].turn_id, reason="enough"),
            timeout=20,
        )
        assert cancelled.turn.status == pb.TURN_STATUS_CANCELLED
        rest = [r.event async for r in stream]
        assert rest[-1].turn_ended.turn.status == pb.TURN_STATUS_CANCELLED

    async with await psycopg.AsyncConnection.connect(database_url) as db:
        cursor = await db.execute(
            "SELECT type, count(*) FROM turnlog.events"
            " WHERE type IN ('ToolCallCompleted', 'TurnCancelled') GROUP BY type ORDER BY type"
        )
        assert await cursor.fetchall() == [("ToolCallCompleted", 1), ("TurnCancelled", 1)]
        cursor = await db.execute("SELECT count(*) FROM turnlog.turn_mailbox")
        assert await cursor.fetchone() == (0,)
    for serve in (a, b):
        assert "Traceback" not in serve.output()
