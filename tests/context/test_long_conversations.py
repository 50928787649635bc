"""Long conversations on the vLLM CPU worker at a 1,024-token context: nothing dies at the limit.

Each test talks to the real service over loopback gRPC, generating on the
session's vLLM worker (tiny random-weight model: replies run to max_tokens,
which makes them long), with real PostgreSQL. The prompts the service sent
are recorded at the engine client and compared with the prompts rebuilt from
the log.

`TURNLOG_CONTEXT_TURNS=200 pytest tests/context` runs the long variant (CI
runs 60 turns).
"""

from __future__ import annotations

import itertools
import os

import grpc
import pytest
from context.conftest import Service
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from turnlog.conversation import context, engine_io
from turnlog.conversation.tools import builtin_tools
from turnlog.domain import events as ev
from turnlog.domain.codec import decode_stored as replayed_event
from turnlog.domain.state import ConversationState, evolve
from turnlog.engine.v1 import engine_pb2
from turnlog.eventlog import wall_clock_us
from turnlog.guardrails import default_registry
from turnlog.history.regenerate import regenerate
from turnlog.history.transcript import build_transcript, render_transcript
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

TURNS = int(os.environ.get("TURNLOG_CONTEXT_TURNS", "60"))
SYSTEM = "You are a patient assistant. Keep every answer on topic."
TOOL_CALL_REGEX = (
    r'<tool_call>\n\{"name": "calculator", "arguments": '
    r'\{"expression": "[1-9] \* [1-9]"\}\}\n</tool_call>'
)


def error_info(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, dict(info.metadata)
    raise AssertionError("no ErrorInfo")


async def create(
    service: Service, rid: str, policy: int = pb.CONTEXT_POLICY_UNSPECIFIED, **defaults: object
) -> str:
    options = pb.TurnDefaults(temperature=0.8, seed=7, max_tokens=120, **defaults)  # type: ignore[arg-type]
    if policy:
        options.context_policy = policy  # type: ignore[assignment]
    created = await service.stub.CreateConversation(
        spb.CreateConversationRequest(
            request_id=rid,
            system_prompt=SYSTEM,
            tools=[pb.ToolDefinition(name="calculator")],
            defaults=options,
        )
    )
    return created.conversation.name


async def send(
    service: Service, name: str, n: int, content: str = "", **options: object
) -> spb.SendMessageResponse:
    return await service.stub.SendMessage(
        spb.SendMessageRequest(
            input=spb.TurnInput(
                conversation=name,
                request_id=f"t{n}",
                content=content or f"Turn {n}: tell me more about the history of the sea.",
                options=pb.TurnDefaults(**options),  # type: ignore[arg-type]
            )
        )
    )


async def stream_of(service: Service, name: str) -> list:  # type: ignore[type-arg]
    return await service.store.read_stream(f"conversation-{name.removeprefix('conversations/')}")


def check_prompt_integrity(prompt: engine_pb2.ChatPrompt) -> None:
    """The system prompt leads; every tool call has its result and every result its call."""
    assert prompt.messages[0].role == engine_pb2.CHAT_ROLE_SYSTEM
    assert prompt.messages[0].content == SYSTEM
    calls = {c.id for m in prompt.messages for c in m.tool_calls}
    results = {m.tool_call_id for m in prompt.messages if m.role == engine_pb2.CHAT_ROLE_TOOL}
    assert calls == results


async def test_a_long_conversation_with_tool_calls_never_fails_under_truncate(
    service: Service,
) -> None:
    name = await create(service, "long-truncate")  # the service default policy: truncate
    for n in range(1, TURNS + 1):
        options = {"first_generation_regex": TOOL_CALL_REGEX} if n % 6 == 0 else {}
        reply = await send(service, name, n, **options)
        assert reply.turn.status == pb.TURN_STATUS_COMPLETED, (n, reply.turn.outcome_reason)

    events = await stream_of(service, name)
    transcript = build_transcript(events)
    generations = [g for t in transcript.turns for g in t.generations]
    assert len(generations) == len(service.engine.sent)
    tool_turns = [t for t in transcript.turns if t.tool_outcomes]
    assert len(tool_turns) == TURNS // 6
    firsts = []
    for generation, sent in zip(generations, service.engine.sent, strict=True):
        window = generation.context
        assert window is not None
        assert window.policy is ev.ContextPolicy.TRUNCATE
        # The log rebuilds exactly the prompt the model was given ...
        rebuilt = generation.prompt()
        assert rebuilt.SerializeToString(deterministic=True) == sent.chat.SerializeToString(
            deterministic=True
        )
        check_prompt_integrity(rebuilt)
        # ... and the service's count is the engine's own, to the token.
        assert generation.usage.prompt_tokens == window.prompt_tokens
        assert window.prompt_tokens + window.max_tokens <= 1024
        assert sent.sampling.max_tokens == window.max_tokens
        firsts.append(window.first_version)
    # The window moved (old turns were left out) and in steps, not every turn.
    assert generations[-1].context is not None
    assert generations[-1].context.left_out_turns > 0
    moves = sum(1 for a, b in itertools.pairwise(firsts) if a != b)
    assert 0 < moves <= len(firsts) // 3
    assert firsts == sorted(firsts)
    # Each message was counted by the worker once (cached), not once per turn.
    counter = service.app._turn_deps.tokens  # type: ignore[union-attr]
    assert counter.counted <= len(transcript.state.messages) + TURNS
    # The window is visible on the conversation, and replay shows every one.
    got = await service.stub.GetConversation(spb.GetConversationRequest(name=name))
    assert got.conversation.context_window.left_out_turns == generations[-1].context.left_out_turns
    assert got.conversation.context_window.policy == pb.CONTEXT_POLICY_TRUNCATE
    text = render_transcript(transcript)
    assert text.count("    context: truncate, ") == len(generations)


async def test_a_message_too_long_for_any_window_is_refused_and_the_log_is_unchanged(
    service: Service,
) -> None:
    name = await create(service, "too-long")
    await send(service, name, 1)
    before = await stream_of(service, name)
    sent = len(service.engine.sent)
    huge = " ".join(f"word{i}" for i in range(1500))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(service, name, 2, content=huge)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, metadata = error_info(caught.value)
    assert reason == "CONTEXT_LENGTH_EXCEEDED"
    assert int(metadata["promptTokens"]) > 1024 - 16
    assert metadata["maxContextTokens"] == "1024"
    assert len(await stream_of(service, name)) == len(before)
    assert len(service.engine.sent) == sent  # nothing was generated
    # The conversation goes on.
    after = await send(service, name, 3)
    assert after.turn.status == pb.TURN_STATUS_COMPLETED


async def test_disabled_refuses_before_generating_with_the_counts(service: Service) -> None:
    name = await create(service, "disabled", policy=pb.CONTEXT_POLICY_DISABLED)
    n = 0
    while True:  # turns until one no longer fits
        n += 1
        sent = len(service.engine.sent)
        before = len(await stream_of(service, name))
        try:
            reply = await send(service, name, n)
        except grpc.aio.AioRpcError as e:
            refused = e
            break
        assert reply.turn.status == pb.TURN_STATUS_COMPLETED
        assert n < 20
    assert n >= 2
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    reason, metadata = error_info(refused)
    assert reason == "CONTEXT_EXHAUSTED"
    assert metadata["policy"] == "disabled"
    assert int(metadata["promptTokens"]) + int(metadata["maxTokens"]) > 1024
    assert len(service.engine.sent) == sent
    assert len(await stream_of(service, name)) == before
    # A turn that asks for truncation revives it.
    reply = await send(service, name, 99, context_policy=pb.CONTEXT_POLICY_TRUNCATE)
    assert reply.turn.status == pb.TURN_STATUS_COMPLETED


async def test_max_tokens_beyond_the_room_is_clamped_and_recorded_unless_strict(
    service: Service,
) -> None:
    name = await create(service, "clamp")
    reply = await send(service, name, 1, max_tokens=5000)
    assert reply.turn.status == pb.TURN_STATUS_COMPLETED
    assert reply.turn.finish_reason == pb.FINISH_REASON_LENGTH  # ran into the clamp
    window = build_transcript(await stream_of(service, name)).turns[0].generations[0].context
    assert window is not None
    assert window.requested_max_tokens == 5000
    assert window.prompt_tokens + window.max_tokens == 1024
    assert reply.turn.usage.completion_tokens == window.max_tokens
    before = len(await stream_of(service, name))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(service, name, 2, max_tokens=5000, strict_max_tokens=True)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, metadata = error_info(caught.value)
    assert reason == "CONTEXT_LENGTH_EXCEEDED"
    assert metadata["maxTokens"] == "5000"
    assert len(await stream_of(service, name)) == before


async def test_windows_replay_regenerate_and_survive_a_fork(service: Service) -> None:
    name = await create(service, "regen")
    for n in range(1, 11):
        options = {"first_generation_regex": TOOL_CALL_REGEX} if n == 4 else {}
        assert (await send(service, name, n, **options)).turn.status == pb.TURN_STATUS_COMPLETED
    events = await stream_of(service, name)
    transcript = build_transcript(events)
    assert transcript.turns[-1].generations[-1].context.left_out_turns > 0  # type: ignore[union-attr]
    report = await regenerate(
        events,
        engine=service.engine,
        guardrails=default_registry(),
        tools=builtin_tools(wall_clock_us),
    )
    assert report.all_same, [t.differences for t in report.turns]
    assert len([t for t in report.turns if not t.skipped]) == 10
    # A fork keeps its parent's windows up to the fork point and goes on from there.
    at = transcript.turns[8].start_version - 1
    forked = await service.stub.ForkConversation(
        spb.ForkConversationRequest(name=name, version=at, request_id="f")
    )
    fork_name = forked.conversation.name
    source_window = build_transcript(events, at=at).state.context_window
    assert source_window is not None
    assert source_window.left_out_turns > 0
    assert forked.conversation.context_window.left_out_turns == source_window.left_out_turns
    assert forked.conversation.context_window.prompt_tokens == source_window.prompt_tokens
    reply = await send(service, fork_name, 100)
    assert reply.turn.status == pb.TURN_STATUS_COMPLETED
    fork_turn = build_transcript(await stream_of(service, fork_name)).turns[-1]
    window = fork_turn.generations[0].context
    assert window is not None
    assert window.left_out_turns >= source_window.left_out_turns
    rebuilt = fork_turn.generations[0].prompt()
    check_prompt_integrity(rebuilt)
    assert rebuilt.SerializeToString(deterministic=True) == service.engine.sent[
        -1
    ].chat.SerializeToString(deterministic=True)


async def test_a_long_conversation_with_tool_calls_never_fails_under_compact(
    service: Service,
) -> None:
    turns = TURNS
    name = await create(service, "long-compact", policy=pb.CONTEXT_POLICY_COMPACT)
    for n in range(1, turns + 1):
        options = {"first_generation_regex": TOOL_CALL_REGEX} if n % 6 == 0 else {}
        reply = await send(service, name, n, **options)
        assert reply.turn.status == pb.TURN_STATUS_COMPLETED, (n, reply.turn.outcome_reason)
    compacted = await service.stub.CompactConversation(
        spb.CompactConversationRequest(name=name, request_id="on-demand")
    )
    assert compacted.turn.status == pb.TURN_STATUS_COMPLETED
    reply = await send(service, name, turns + 1)
    assert reply.turn.status == pb.TURN_STATUS_COMPLETED

    events = await stream_of(service, name)
    transcript = build_transcript(events)
    state = transcript.state
    assert len(state.compactions) >= 2
    assert state.compactions[-1].compaction_id == compacted.compaction.compaction_id
    instruction = context.SUMMARY_INSTRUCTION
    summaries = [s for s in service.engine.sent if s.chat.messages[-1].content == instruction]
    sent = [s for s in service.engine.sent if s.chat.messages[-1].content != instruction]
    generations = [g for t in transcript.turns for g in t.generations]
    assert len(generations) == len(sent)
    assert len(summaries) >= len(state.compactions)
    used = set()
    for generation, start in zip(generations, sent, strict=True):
        window = generation.context
        assert window is not None
        rebuilt = generation.prompt()
        assert rebuilt.SerializeToString(deterministic=True) == start.chat.SerializeToString(
            deterministic=True
        )
        # The system prompt leads every prompt (the summary, if any, after it in the
        # same message); every tool call is with its result.
        assert rebuilt.messages[0].role == engine_pb2.CHAT_ROLE_SYSTEM
        assert rebuilt.messages[0].content.startswith(SYSTEM)
        calls = {c.id for m in rebuilt.messages for c in m.tool_calls}
        results = {m.tool_call_id for m in rebuilt.messages if m.role == engine_pb2.CHAT_ROLE_TOOL}
        assert calls == results
        assert generation.usage.prompt_tokens == window.prompt_tokens
        assert window.prompt_tokens + window.max_tokens <= 1024
        used.add(window.compaction_id)
    assert used - {""}  # later prompts held summaries
    # Each summary's prompt is rebuilt from the log too (the state just before it).
    folded = ConversationState()
    prompts = []
    for stored in events:
        event = replayed_event(stored)
        if isinstance(event, ev.ContextCompacted):
            prompts.append(engine_io.summary_prompt(folded, event))
        folded = evolve(folded, event)
    wire = {s.chat.SerializeToString(deterministic=True) for s in summaries}
    for prompt in prompts:
        assert prompt.SerializeToString(deterministic=True) in wire
    text = render_transcript(transcript)
    assert text.count("  compacted ") == len(state.compactions)
