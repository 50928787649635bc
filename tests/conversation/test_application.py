"""The application layer against real PostgreSQL and an in-process scripted worker."""

from __future__ import annotations

import pytest

from turnlog import errors
from turnlog.conversation.application import (
    ConversationApplication,
    CreateConversation,
    ListQuery,
    TurnInput,
    TurnOptions,
)
from turnlog.conversation.projection import (
    Retraction,
    TextPiece,
    ToolCallPiece,
    ToolStarted,
    TurnEnded,
)
from turnlog.domain import events as ev
from turnlog.domain.state import TurnStatus
from turnlog.eventlog import stream_id
from turnlog.storage import PostgresEventStore


async def _conversation(app: ConversationApplication, **kw: object) -> str:
    state = await app.create(CreateConversation(request_id="c-1", system_prompt="Be brief.", **kw))  # type: ignore[arg-type]
    return state.conversation_id


async def test_a_turn_without_tools_is_two_appends_and_reads_back(
    app: ConversationApplication, store: PostgresEventStore
) -> None:
    cid = await _conversation(app)
    result = await app.send(TurnInput(conversation_id=cid, content="hi", request_id="r-1"))
    assert result.ended.turn.status is TurnStatus.COMPLETED
    assert result.assistant_message is not None
    assert result.assistant_message.text == "Hello there."
    events = await store.read_stream(stream_id(cid))
    types = [e.type for e in events]
    assert types[:3] == ["ConversationCreated", "TurnStarted", "MessageAppended"]
    assert types[-1] == "TurnCompleted"
    # two commits for the turn: the batch boundaries are visible as recorded_at groups
    batches = {e.recorded_at for e in events[1:]}
    assert len(batches) == 2
    assert (await store.verify(stream_id(cid))).ok
    # sequences are gapless, and the text pieces add up to the message
    assert [u.sequence for u in result.updates] == list(range(1, len(result.updates) + 1))
    text = "".join(u.payload.text for u in result.updates if isinstance(u.payload, TextPiece))
    assert text == "Hello there."


async def test_concurrent_different_sends_fail_fast(app: ConversationApplication) -> None:
    cid = await _conversation(app)
    slow = await app.start_turn(
        TurnInput(conversation_id=cid, content="slow story", request_id="a")
    )
    with pytest.raises(errors.TurnInProgressError):
        await app.start_turn(TurnInput(conversation_id=cid, content="hi", request_id="b"))
    [u async for u in app.watch(cid, slow)]
    done = await app.send(TurnInput(conversation_id=cid, content="hi", request_id="b"))
    assert done.ended.turn.status is TurnStatus.COMPLETED


async def test_create_is_idempotent_and_list_pages(app: ConversationApplication) -> None:
    a = await app.create(CreateConversation(request_id="x", labels=(("team", "a"),)))
    again = await app.create(CreateConversation(request_id="x", labels=(("team", "a"),)))
    assert a.conversation_id == again.conversation_id
    b = await app.create(CreateConversation(request_id="y"))
    page, token = await app.list_conversations(ListQuery(page_size=1))
    assert len(page) == 1
    assert token
    page2, token2 = await app.list_conversations(ListQuery(page_size=1, page_token=token))
    assert {page[0].conversation_id, page2[0].conversation_id} == {
        a.conversation_id,
        b.conversation_id,
    }
    assert token2 == ""
    labelled, _ = await app.list_conversations(ListQuery(labels=(("team", "a"),)))
    assert [s.conversation_id for s in labelled] == [a.conversation_id]
    await app.archive(b.conversation_id)
    active, _ = await app.list_conversations(ListQuery())
    assert [s.conversation_id for s in active] == [a.conversation_id]


async def test_archive_conflict_and_not_found(app: ConversationApplication) -> None:
    cid = await _conversation(app)
    with pytest.raises(errors.VersionConflictError) as info:
        await app.archive(cid, expected_version=7)
    assert info.value.actual_version == 1
    with pytest.raises(errors.NotFoundError):
        await app.archive("nope")


async def test_server_tool_loop_and_round_trip_cap(app: ConversationApplication) -> None:
    tools = (ev.ToolDefinition(name="calculator"),)
    cid = await _conversation(app, tools=tools)
    result = await app.send(TurnInput(conversation_id=cid, content="what is 6*7", request_id="t"))
    # the scripted model asks for the calculator again and again: capped at 2 round trips
    executions = result.tool_executions
    assert executions
    assert executions[0].result == '{"result": 42}'
    assert any(isinstance(u.payload, ev.ToolRoundLimitReached) for u in result.updates)
    assert result.ended.turn.tool_round_limit_reached
    assert len(executions) == 2
    capped = await app.send(
        TurnInput(
            conversation_id=cid,
            content="loop forever",
            request_id="u",
            options=TurnOptions(max_tool_round_trips=0),
        )
    )
    assert capped.tool_executions == []
    assert capped.ended.turn.tool_round_limit_reached


async def test_generated_tool_calls_stream_before_their_message_and_replay_identically(
    app: ConversationApplication, make_app: object
) -> None:
    tools = (ev.ToolDefinition(name="calculator"),)
    cid = await _conversation(app, tools=tools)
    result = await app.send(TurnInput(conversation_id=cid, content="what is 6*7", request_id="t"))
    payloads = [u.payload for u in result.updates]
    pieces = [i for i, p in enumerate(payloads) if isinstance(p, ToolCallPiece)]
    assert pieces
    for i in pieces:
        piece = payloads[i]
        assert isinstance(piece, ToolCallPiece)
        message = payloads[i + 1]
        assert isinstance(message, ev.GenerationCompleted)
        assert piece.call in message.tool_calls
    # Every executed call was streamed as generated first.
    for i, started in enumerate(payloads):
        if isinstance(started, ToolStarted):
            assert any(
                isinstance(p, ToolCallPiece) and p.call == started.call for p in payloads[:i]
            )
    # A replica with no live state numbers the same updates from the log.
    other = make_app()  # type: ignore[operator]
    replayed = [u async for u in other.watch(cid, result.ended.turn.turn_id)]
    assert replayed == list(result.updates)


async def test_resume_mid_turn_and_after_end_from_the_log(
    app: ConversationApplication, make_app: object, store: PostgresEventStore
) -> None:
    cid = await _conversation(app)
    turn_id = await app.start_turn(
        TurnInput(conversation_id=cid, content="slow story", request_id="s")
    )
    seen = []
    async for update in app.watch(cid, turn_id):
        seen.append(update)
        if len(seen) == 5:
            break
    # another replica (no live state) resumes from the log after sequence 5
    other = make_app()  # type: ignore[operator]
    rest = [u async for u in other.watch(cid, turn_id, after_sequence=5)]
    full = [u async for u in app.watch(cid, turn_id)]
    assert seen + rest == full
    assert isinstance(full[-1].payload, TurnEnded)
    from_log = [u async for u in other.watch(cid, turn_id)]
    assert from_log == full


async def test_cancel_mid_stream_records_cancellation(
    app: ConversationApplication, store: PostgresEventStore
) -> None:
    cid = await _conversation(app)
    turn_id = await app.start_turn(
        TurnInput(conversation_id=cid, content="slow story", request_id="c")
    )
    updates = []
    async for update in app.watch(cid, turn_id):
        updates.append(update)
        if isinstance(update.payload, TextPiece) and len(updates) > 4:
            await app.cancel_turn(cid, turn_id, "user pressed stop")
    assert isinstance(updates[-1].payload, TurnEnded)
    assert updates[-1].payload.turn.status is TurnStatus.CANCELLED
    state = await app.load(cid)
    assert state.open_turn is None
    # the conversation continues
    after = await app.send(TurnInput(conversation_id=cid, content="hi", request_id="d"))
    assert after.ended.turn.status is TurnStatus.COMPLETED


async def test_guardrail_blocks_response_with_retraction(
    make_app: object, store: PostgresEventStore
) -> None:
    from turnlog.guardrails import BuiltinSettings, default_registry

    app = make_app(guardrails=default_registry(BuiltinSettings(blocked_terms=("kaboom",))))  # type: ignore[operator]
    cid = (await app.create(CreateConversation(request_id="g"))).conversation_id
    # Streamed a token at a time, the harmless prefix is shown before the
    # blocked term arrives; then it is retracted (docs/guardrails.md).
    turn_id = await app.start_turn(
        TurnInput(conversation_id=cid, content="leak slowly", request_id="1")
    )
    payloads = [u.payload async for u in app.watch(cid, turn_id)]
    [retracted] = [p for p in payloads if isinstance(p, Retraction)]
    at = payloads.index(retracted)
    retraction = retracted.event
    shown = "".join(p.text for p in payloads[:at] if isinstance(p, TextPiece))
    assert shown  # something was shown, so something had to be retracted
    assert "Sure, the forbidden word is kaboom, enjoy.".startswith(shown)
    assert "kaboom" not in shown
    assert (retraction.start, retraction.end) == (0, len(shown))
    assert not any(isinstance(p, TextPiece) for p in payloads[at:])
    assert isinstance(payloads[-1], TurnEnded)
    assert payloads[-1].turn.status is TurnStatus.BLOCKED
    # The log says the same: the retraction, the block, no assistant text.
    events = await store.read_stream(stream_id(cid))
    types = [e.type for e in events]
    [recorded] = [e for e in events if e.type == "TextRetracted"]
    assert (recorded.data["start"], recorded.data["end"]) == (0, len(shown))
    assert types[-1] == "TurnBlocked"
    assert types.index("TextRetracted") < types.index("TurnBlocked")
    assert "GenerationCompleted" not in types
    state = await app.load(cid)
    assert [m.role for m in state.messages] == [ev.Role.USER]
    blocked_request = await app.send(
        TurnInput(conversation_id=cid, content="say kaboom", request_id="2")
    )
    assert blocked_request.ended.turn.status is TurnStatus.BLOCKED
    assert not any(isinstance(u.payload, TextPiece) for u in blocked_request.updates)


async def test_guardrail_modifies_request_and_response(app: ConversationApplication) -> None:
    cid = await _conversation(app)
    result = await app.send(
        TurnInput(conversation_id=cid, content="mail me at bob@example.org", request_id="m")
    )
    assert result.assistant_message is not None
    assert result.assistant_message.text == "Write to [EMAIL] please."
    verdicts = {(d.stage, d.verdict) for d in result.decisions}
    assert (ev.GuardrailStage.SANITIZE_REQUEST, ev.Verdict.MODIFY) in verdicts
    assert (ev.GuardrailStage.SANITIZE_RESPONSE, ev.Verdict.MODIFY) in verdicts
    state = await app.load(cid)
    assert "bob@example.org" not in state.messages[0].content


async def test_engine_failure_records_turn_failed(app: ConversationApplication) -> None:
    cid = await _conversation(app)
    result = await app.send(TurnInput(conversation_id=cid, content="fail early", request_id="f"))
    assert result.ended.turn.status is TurnStatus.FAILED
    assert "ENGINE_INTERNAL" in result.ended.turn.outcome_reason
