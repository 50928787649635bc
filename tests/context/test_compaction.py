"""Compaction on a scripted worker: summaries as events, prompts rebuilt, crashes, the RPC.

The scripted worker (a test double: tokens are UTF-8 bytes, 1,024 of
context) answers the summary request with a fixed summary and every turn
with a ~170-character reply, so under `compact` a summary is due every few
turns. Real PostgreSQL and gRPC on loopback; the engine client records what
the service sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from context.conftest import RecordingEngine
from conversation_helpers import conversation_stub, scripted_worker_server

from turnlog.conversation import context, engine_io
from turnlog.conversation.application import (
    ConversationApplication,
    CreateConversation,
    TurnInput,
    TurnOptions,
)
from turnlog.conversation.tools import builtin_tools
from turnlog.domain import events as ev
from turnlog.domain.codec import decode_stored
from turnlog.domain.state import ConversationState, TurnStatus, evolve
from turnlog.engine.v1 import engine_pb2
from turnlog.eventlog import wall_clock_us
from turnlog.guardrails import BuiltinSettings, default_registry
from turnlog.history.regenerate import regenerate
from turnlog.history.transcript import GenerationRecord, build_transcript, render_transcript
from turnlog.storage import PostgresEventStore
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc

SYSTEM = "You are a patient assistant."
SUMMARY = "SUMMARY: we talked about the sea; write to alice@example.com for more."
REPLY = "The sea is old and deep. " * 7
SCRIPT: dict[str, Any] = {
    "model": "scripted-compact",
    "max_context_tokens": 1024,
    "replies": [
        {"match": "Summarize the conversation so far", "text": SUMMARY},
        {
            "match": "what is 6*7",
            "tool_calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}],
        },
    ],
    "default": {"text": REPLY},
}
# One tool round trip: the scripted reply to "what is 6*7" is a tool call whatever follows.
COMPACT = TurnOptions(
    context_policy=ev.ContextPolicy.COMPACT,
    sampling=ev.SamplingParams(max_tokens=200),
    max_tool_round_trips=1,
)


@contextlib.asynccontextmanager
async def scripted(script: dict[str, Any]) -> AsyncIterator[str]:
    async with scripted_worker_server(script) as worker:
        yield worker.target


def make_app(
    store: PostgresEventStore, engine: RecordingEngine, **kw: Any
) -> ConversationApplication:
    return ConversationApplication(store, engine, tools=builtin_tools(wall_clock_us), **kw)


async def new_conversation(app: ConversationApplication, cid: str) -> str:
    state = await app.create(
        CreateConversation(
            conversation_id=cid,
            system_prompt=SYSTEM,
            defaults=COMPACT,
            tools=(ev.ToolDefinition(name="calculator"),),
        )
    )
    return state.conversation_id


def is_summary_request(start: engine_pb2.StartGeneration) -> bool:
    return start.chat.messages[-1].content == context.SUMMARY_INSTRUCTION


async def test_compact_summarizes_the_oldest_turns_and_every_prompt_rebuilds(
    store: PostgresEventStore,
) -> None:
    async with scripted(SCRIPT) as target, RecordingEngine([target]) as engine:
        app = make_app(store, engine)
        try:
            cid = await new_conversation(app, "compact-1")
            for n in range(1, 13):
                content = "what is 6*7" if n % 4 == 0 else f"Turn {n}: tell me about the sea."
                result = await app.send(
                    TurnInput(conversation_id=cid, content=content, request_id=f"t{n}")
                )
                assert result.ended.turn.status is TurnStatus.COMPLETED, n
        finally:
            await app.shutdown()
    events = await store.read_stream(f"conversation-{cid}")
    transcript = build_transcript(events)
    state = transcript.state
    compactions = state.compactions
    assert len(compactions) >= 2
    # Each later summary folds in the one before; ranges move forward.
    for before, after in itertools.pairwise(compactions):
        assert after.previous_compaction_id == before.compaction_id
        assert after.first_version >= before.through_version
    for c in compactions:
        assert c.summarized_turns > 0
        assert c.summary_tokens > 0
        assert c.replaced_tokens > 0
        assert c.sampling.max_tokens == 160
        # The response guardrails ran on the summary: the address is redacted ...
        assert "alice@example.com" not in c.summary
        # ... and the decision is recorded in the unit that made the summary.
        turn = next(t for t in transcript.turns if t.turn_id == c.turn_id)
        decided = [s for s in turn.steps if isinstance(s, ev.GuardrailDecided)]
        assert any(
            d.guardrail == "pii_redaction" and d.verdict is ev.Verdict.MODIFY for d in decided
        )
    # Every prompt the model was given is rebuilt from the log, byte for byte.
    generations = [s for t in transcript.turns for s in t.steps if isinstance(s, GenerationRecord)]
    summaries = [s for s in engine.sent if is_summary_request(s)]
    sent = [s for s in engine.sent if not is_summary_request(s)]
    assert len(summaries) == len(compactions)
    assert len(sent) == len(generations)
    used = set()
    for generation, start in zip(generations, sent, strict=True):
        window = generation.context
        assert window is not None
        assert window.policy is ev.ContextPolicy.COMPACT
        rebuilt = generation.prompt()
        assert rebuilt.SerializeToString(deterministic=True) == start.chat.SerializeToString(
            deterministic=True
        )
        assert rebuilt.messages[0].role == engine_pb2.CHAT_ROLE_SYSTEM
        assert rebuilt.messages[0].content.startswith(SYSTEM)
        calls = {c.id for m in rebuilt.messages for c in m.tool_calls}
        results = {m.tool_call_id for m in rebuilt.messages if m.role == engine_pb2.CHAT_ROLE_TOOL}
        assert calls == results
        assert generation.usage.prompt_tokens == window.prompt_tokens
        assert window.prompt_tokens + window.max_tokens <= 1024
        if window.compaction_id:
            used.add(window.compaction_id)
            summary = state.compaction(window.compaction_id)
            assert summary is not None
            assert summary.summary in rebuilt.messages[0].content
            assert window.first_version >= summary.through_version
    assert used == {c.compaction_id for c in compactions}
    # The summary requests too, from the state before each compaction.
    befores = _states_before(events, ev.ContextCompacted)
    for (state_before, compacted), start in zip(befores, summaries, strict=True):
        assert engine_io.summary_prompt(state_before, compacted).SerializeToString(
            deterministic=True
        ) == start.chat.SerializeToString(deterministic=True)
    text = render_transcript(transcript)
    assert text.count("  compacted ") == len(compactions)
    assert "summary " + compactions[-1].compaction_id in text


def _states_before(events: list[Any], kind: type) -> list[tuple[ConversationState, Any]]:
    """(the state just before, the event) for every event of `kind` in a stored stream."""
    state = ConversationState()
    out = []
    for stored in events:
        event = decode_stored(stored)
        if isinstance(event, kind):
            out.append((state, event))
        state = evolve(state, event)
    return out


async def test_a_blocked_summary_falls_back_to_truncation(store: PostgresEventStore) -> None:
    script = {
        **SCRIPT,
        "replies": [{"match": "Summarize the conversation so far", "text": "kaboom"}],
    }
    async with scripted(script) as target, RecordingEngine([target]) as engine:
        app = make_app(
            store, engine, guardrails=default_registry(BuiltinSettings(blocked_terms=("kaboom",)))
        )
        try:
            cid = await new_conversation(app, "compact-blocked")
            for n in range(1, 7):
                result = await app.send(
                    TurnInput(conversation_id=cid, content=f"Turn {n}.", request_id=f"t{n}")
                )
                assert result.ended.turn.status is TurnStatus.COMPLETED, n
            state = await app.load(cid)
        finally:
            await app.shutdown()
    assert not state.compactions
    assert any(is_summary_request(s) for s in engine.sent)
    assert state.context_window is not None
    assert state.context_window.left_out_turns > 0
    assert state.context_window.compaction_id == ""
    events = await store.read_stream(f"conversation-{cid}")
    blocked = [e for e in events if e.type == "GuardrailDecided" and '"block"' in e.data_json]
    assert blocked


async def test_a_failing_summary_falls_back_to_truncation(store: PostgresEventStore) -> None:
    failing = {
        **SCRIPT,
        "replies": [
            {
                "match": "Summarize the conversation so far",
                "text": "never",
                "fail_at_token": 0,
                "fail_reason": "ENGINE_INTERNAL",
            }
        ],
    }
    async with scripted(failing) as target, RecordingEngine([target]) as engine:
        app = make_app(store, engine)
        try:
            cid = await new_conversation(app, "compact-failing")
            for n in range(1, 9):
                result = await app.send(
                    TurnInput(conversation_id=cid, content=f"Turn {n}.", request_id=f"t{n}")
                )
                assert result.ended.turn.status is TurnStatus.COMPLETED, n
            state = await app.load(cid)
        finally:
            await app.shutdown()
    assert sum(1 for s in engine.sent if is_summary_request(s)) >= 2
    assert not state.compactions
    assert state.context_window is not None
    assert state.context_window.left_out_turns > 0


async def test_a_crash_mid_compaction_is_closed_as_interrupted_and_the_conversation_goes_on(
    store: PostgresEventStore, database_url: str
) -> None:
    stall = {
        **SCRIPT,
        "replies": [
            {"match": "Summarize the conversation so far", "text": SUMMARY, "token_delay_ms": 2000}
        ],
    }
    async with scripted(stall) as slow, RecordingEngine([slow]) as engine:
        crashed_store = await PostgresEventStore.open(database_url)
        a = make_app(crashed_store, engine)
        cid = await new_conversation(a, "compact-crash")
        n = 0
        while not any(is_summary_request(s) for s in engine.sent):
            n += 1
            assert n < 10
            turn_id = await a.start_turn(
                TurnInput(conversation_id=cid, content=f"Turn {n}.", request_id=f"t{n}")
            )
            while not any(is_summary_request(s) for s in engine.sent):
                state = await a.load(cid)
                if state.open_turn is None:
                    break
                await asyncio.sleep(0.01)
        # The summary is being generated: this process dies (its store goes away).
        await crashed_store.close()
    async with scripted(SCRIPT) as target, RecordingEngine([target]) as engine:
        b = make_app(store, engine)
        try:
            assert await b.close_interrupted_turns() == [(cid, turn_id)]
            state = await b.load(cid)
            assert state.turns[-1].status is TurnStatus.INTERRUPTED
            assert not state.compactions  # nothing half-made
            result = await b.send(
                TurnInput(conversation_id=cid, content="Still there?", request_id="after")
            )
            assert result.ended.turn.status is TurnStatus.COMPLETED
            state = await b.load(cid)
            assert state.compactions  # the summary was due again, and made
            assert state.context_window is not None
            assert state.context_window.compaction_id == state.compactions[-1].compaction_id
        finally:
            await b.shutdown()
        with contextlib.suppress(Exception):
            await a.shutdown()


@pytest.fixture
async def grpc_service(
    store: PostgresEventStore,
) -> AsyncIterator[tuple[sgrpc.ConversationServiceStub, RecordingEngine]]:
    async with scripted(SCRIPT) as target, RecordingEngine([target]) as engine:
        app = make_app(store, engine)
        try:
            async with conversation_stub(app) as stub:
                yield stub, engine
        finally:
            await app.shutdown()


async def test_compact_conversation_over_grpc_and_streamed_compactions(
    grpc_service: tuple[sgrpc.ConversationServiceStub, RecordingEngine],
    store: PostgresEventStore,
) -> None:
    stub, _ = grpc_service
    created = await stub.CreateConversation(
        spb.CreateConversationRequest(request_id="c", system_prompt=SYSTEM)
    )
    name = created.conversation.name
    cid = name.removeprefix("conversations/")
    # Nothing to summarize: refused, nothing recorded.
    before = await store.read_stream(f"conversation-{cid}")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CompactConversation(spb.CompactConversationRequest(name=name, request_id="k0"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "NOTHING_TO_COMPACT" in str(refused.value.trailing_metadata())
    assert len(await store.read_stream(f"conversation-{cid}")) == len(before)
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.CompactConversation(spb.CompactConversationRequest(name="nope/x"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for n in range(2):
        await stub.SendMessage(
            spb.SendMessageRequest(
                input=spb.TurnInput(conversation=name, request_id=f"t{n}", content="Hello sea.")
            )
        )
    compacted = await stub.CompactConversation(
        spb.CompactConversationRequest(name=name, request_id="k1")
    )
    assert compacted.turn.status == pb.TURN_STATUS_COMPLETED
    assert compacted.turn.compaction_only
    assert compacted.compaction.summarized_turns == 2
    assert compacted.compaction.summary.startswith("SUMMARY: we talked about the sea")
    assert any(d.guardrail == "pii_redaction" for d in compacted.guardrail_decisions)
    again = await stub.CompactConversation(
        spb.CompactConversationRequest(name=name, request_id="k1")
    )
    assert again.compaction.compaction_id == compacted.compaction.compaction_id  # idempotent
    # The next compact turn's prompt holds the summary instead of the two turns.
    reply = await stub.SendMessage(
        spb.SendMessageRequest(
            input=spb.TurnInput(
                conversation=name,
                request_id="t-next",
                content="And then?",
                options=pb.TurnDefaults(context_policy=pb.CONTEXT_POLICY_COMPACT),
            )
        )
    )
    assert reply.turn.status == pb.TURN_STATUS_COMPLETED
    got = await stub.GetConversation(spb.GetConversationRequest(name=name))
    assert got.conversation.context_window.compaction_id == compacted.compaction.compaction_id
    # A streamed turn shows a compaction when one happens.
    seen: list[str | None] = []
    for n in range(8):
        seen = []
        request = spb.StreamTurnRequest(
            start=spb.TurnInput(
                conversation=name,
                request_id=f"s{n}",
                content=f"Stream {n}: more about the sea.",
                options=pb.TurnDefaults(context_policy=pb.CONTEXT_POLICY_COMPACT, max_tokens=200),
            )
        )
        async for item in stub.StreamTurn(request):
            seen.append(item.event.WhichOneof("kind"))
        if "context_compacted" in seen:
            break
    assert "context_compacted" in seen
    assert seen.index("context_compacted") < seen.index("assistant_message")


async def test_regenerate_reproduces_compactions_and_a_fork_keeps_them(
    grpc_service: tuple[sgrpc.ConversationServiceStub, RecordingEngine],
    store: PostgresEventStore,
) -> None:
    stub, engine = grpc_service
    created = await stub.CreateConversation(
        spb.CreateConversationRequest(
            request_id="c",
            system_prompt=SYSTEM,
            defaults=pb.TurnDefaults(context_policy=pb.CONTEXT_POLICY_COMPACT, max_tokens=200),
        )
    )
    name = created.conversation.name
    for n in range(6):
        await stub.SendMessage(
            spb.SendMessageRequest(
                input=spb.TurnInput(conversation=name, request_id=f"t{n}", content=f"Sea {n}.")
            )
        )
    await stub.CompactConversation(spb.CompactConversationRequest(name=name, request_id="k"))
    await stub.SendMessage(
        spb.SendMessageRequest(
            input=spb.TurnInput(conversation=name, request_id="t9", content="Go.")
        )
    )
    events = await store.read_stream(f"conversation-{name.removeprefix('conversations/')}")
    transcript = build_transcript(events)
    assert len(transcript.state.compactions) >= 2
    assert any(t.compaction_only for t in transcript.turns)
    # Regenerated turn by turn, compactions (and the on-demand one) included, all the same.
    report = await regenerate(
        events, engine=engine, guardrails=default_registry(), tools=builtin_tools(wall_clock_us)
    )
    assert report.all_same, [t.differences for t in report.turns]
    assert sum(len(t.regenerated.compactions) for t in report.turns if t.regenerated) == len(
        transcript.state.compactions
    )
    # A fork after the first compaction keeps it, and its next prompt holds it.
    first = transcript.state.compactions[0]
    at = (
        next(
            t.start_version
            for t in transcript.turns
            if t.turn_id != first.turn_id and t.start_version > first.through_version
        )
        - 1
    )
    forked = await stub.ForkConversation(
        spb.ForkConversationRequest(name=name, version=at, request_id="f")
    )
    fork = forked.conversation.name
    reply = await stub.SendMessage(
        spb.SendMessageRequest(
            input=spb.TurnInput(conversation=fork, request_id="f1", content="Hi.")
        )
    )
    assert reply.turn.status == pb.TURN_STATUS_COMPLETED
    fork_events = await store.read_stream(f"conversation-{fork.removeprefix('conversations/')}")
    fork_transcript = build_transcript(fork_events)
    fork_state = fork_transcript.state
    assert fork_state.compactions[0].summary == first.summary
    inherited = {c.compaction_id for c in fork_state.compactions if c.turn_id != reply.turn.turn_id}
    assert first.compaction_id in inherited
    generation = fork_transcript.turns[-1].generations[-1]
    assert generation.context is not None
    # The fork's next prompt holds an inherited summary, or a new one folded from one.
    used = fork_state.compaction(generation.context.compaction_id)
    assert used is not None
    assert used.compaction_id in inherited or used.previous_compaction_id in inherited
    rebuilt = generation.prompt()
    assert used.summary in rebuilt.messages[0].content
    assert rebuilt.SerializeToString(deterministic=True) == engine.sent[-1].chat.SerializeToString(
        deterministic=True
    )
