"""The issue's Done-when, end to end: a real vLLM CPU worker, real gRPC, real PostgreSQL.

A client creates a conversation with the built-in calculator and the
"default" guardrail profile, streams a turn in which the model makes one tool
call, and every step is read back from the log. The tiny model has random
weights, so its first generation is forced into a well-formed hermes
`<tool_call>` by structured output (`first_generation_regex`); the second
generation is unconstrained and ends the loop with text.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conversation_helpers import conversation_stub
from worker_processes import WorkerProcess

from turnlog.conversation.application import ConversationApplication
from turnlog.conversation.tools import builtin_tools
from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.eventlog import stream_id, wall_clock_us
from turnlog.storage import PostgresEventStore
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.client import EngineClient

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

TOOL_CALL_REGEX = (
    r'<tool_call>\n\{"name": "calculator", "arguments": '
    r'\{"expression": "[1-9] \* [1-9]"\}\}\n</tool_call>'
)


@pytest.fixture
async def vllm_stub(
    store: PostgresEventStore, vllm_worker: WorkerProcess
) -> AsyncIterator[sgrpc.ConversationServiceStub]:
    """ConversationService over loopback gRPC, generating on the session's vLLM worker."""
    async with EngineClient([vllm_worker.target]) as engine:
        app = ConversationApplication(store, engine, tools=builtin_tools(wall_clock_us))
        try:
            async with conversation_stub(app) as stub:
                yield stub
        finally:
            await app.shutdown()


async def test_streamed_turn_with_a_forced_tool_call_is_recorded_step_by_step(
    vllm_stub: sgrpc.ConversationServiceStub, store: PostgresEventStore
) -> None:
    created = await vllm_stub.CreateConversation(
        spb.CreateConversationRequest(
            request_id="e2e",
            system_prompt="You are a calculator assistant.",
            tools=[pb.ToolDefinition(name="calculator")],
            guardrail_profile="default",
            defaults=pb.TurnDefaults(temperature=0, max_tokens=96, max_tool_round_trips=1),
        )
    )
    name = created.conversation.name
    cid = name.removeprefix("conversations/")
    request = spb.StreamTurnRequest(
        start=spb.TurnInput(
            conversation=name,
            # The address is PII: the request guardrail redacts it (a MODIFY decision).
            content="What is 6 * 7? Send it to alice@example.com",
            request_id="t1",
            options=pb.TurnDefaults(first_generation_regex=TOOL_CALL_REGEX),
        )
    )
    streamed = [r.event async for r in vllm_stub.StreamTurn(request, timeout=240)]

    # -- what the client saw ---------------------------------------------------
    kinds = [e.WhichOneof("kind") for e in streamed]
    assert [e.sequence for e in streamed] == list(range(1, len(streamed) + 1))
    assert kinds[0] == "turn_started"
    assert kinds[-1] == "turn_ended"
    assert "guardrail_decision" in kinds
    assert "tool_round_limit_reached" not in kinds
    turn = streamed[-1].turn_ended.turn
    assert turn.status == pb.TURN_STATUS_COMPLETED
    started = [e.tool_execution_started for e in streamed if e.HasField("tool_execution_started")]
    finished = [
        e.tool_execution_finished for e in streamed if e.HasField("tool_execution_finished")
    ]
    assert len(started) == len(finished) == 1
    assert started[0].call.name == "calculator"
    # The generated call was streamed (whole: workers parse calls at the end
    # of a generation) before the message that carries it.
    deltas = [i for i, k in enumerate(kinds) if k == "tool_call_delta"]
    assert len(deltas) == 1
    assert streamed[deltas[0]].tool_call_delta.call == started[0].call
    assert kinds[deltas[0] + 1] == "assistant_message"
    assert not started[0].client_side
    arguments = json.loads(started[0].call.arguments_json)
    a, b = (int(x) for x in arguments["expression"].split(" * "))
    assert json.loads(finished[0].execution.result) == {"result": a * b}
    assistant = [e.assistant_message for e in streamed if e.HasField("assistant_message")]
    assert len(assistant) == 2  # the tool-call generation, then the answer after the tool
    assert assistant[0].tool_calls
    assert not assistant[1].tool_calls

    # -- every step read back from the log --------------------------------------
    recorded = await store.read_stream(stream_id(cid))
    assert [r.stream_version for r in recorded] == list(range(1, len(recorded) + 1))
    events: list[Any] = [codec.decode(r.type, r.data) for r in recorded]
    types = [type(e).__name__ for e in events]
    assert types[0] == "ConversationCreated"
    assert types[-1] == "TurnCompleted"
    turn_events = events[1:]
    assert {e.turn_id for e in turn_events} == {turn.turn_id}
    order = [
        t
        for t in types
        if t
        in {
            "TurnStarted",
            "MessageAppended",
            "GenerationStarted",
            "GenerationCompleted",
            "ToolCallRequested",
            "ToolCallCompleted",
            "TurnCompleted",
        }
    ]
    assert order == [
        "TurnStarted",
        "MessageAppended",
        "GenerationStarted",
        "GenerationCompleted",
        "ToolCallRequested",
        "ToolCallCompleted",
        "GenerationStarted",
        "GenerationCompleted",
        "TurnCompleted",
    ]
    user = next(e for e in events if isinstance(e, ev.MessageAppended))
    assert "alice@example.com" not in user.content  # the log keeps the redacted text
    decisions = [e for e in events if isinstance(e, ev.GuardrailDecided)]
    assert any(
        d.stage is ev.GuardrailStage.SANITIZE_REQUEST and d.verdict is ev.Verdict.MODIFY
        for d in decisions
    )
    assert len(decisions) == kinds.count("guardrail_decision")
    generations = [e for e in events if isinstance(e, ev.GenerationStarted)]
    assert generations[0].sampling.regex == TOOL_CALL_REGEX
    assert generations[1].sampling.regex is None  # the constraint covers the first only
    completions = [e for e in events if isinstance(e, ev.GenerationCompleted)]
    assert completions[0].finish_reason is ev.FinishReason.TOOL_CALLS
    assert completions[0].usage.completion_tokens > 0
    assert completions[1].text
    assert not completions[1].tool_calls
    requested = next(e for e in events if isinstance(e, ev.ToolCallRequested))
    assert requested.call == completions[0].tool_calls[0]
    assert requested.call.call_id == started[0].call.call_id
    result = next(e for e in events if isinstance(e, ev.ToolCallCompleted))
    assert (result.call_id, result.result) == (requested.call.call_id, finished[0].execution.result)
    assert (await store.verify(stream_id(cid))).ok

    got = await vllm_stub.GetConversation(spb.GetConversationRequest(name=name))
    assert got.conversation.version == len(recorded)
    assert [m.role for m in got.conversation.messages][-3:] == [
        pb.ROLE_ASSISTANT,
        pb.ROLE_TOOL,
        pb.ROLE_ASSISTANT,
    ]
