"""How a turn starts and what it commits: the prestarted engine request, the text flushes.

Real PostgreSQL and an in-process scripted worker whose replies stream
slowly enough to tell "sent early" and "cancelled" from "ran to its end".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from conversation_helpers import ScriptedWorker, scripted_worker_server

from turnlog import errors
from turnlog.conversation.application import ConversationApplication, CreateConversation, TurnInput
from turnlog.domain.state import TurnStatus
from turnlog.engine.v1 import engine_pb2, engine_pb2_grpc
from turnlog.eventlog import stream_id
from turnlog.storage import PostgresEventStore

pytestmark = pytest.mark.timeout(60)

MEDIUM = "tell a medium story"  # ~0.8 s of streaming: longer than the 0.25 s flush interval
LONG = "tell a long story"  # ~3 s of streaming


@pytest.fixture
async def worker() -> AsyncIterator[ScriptedWorker]:
    """Overrides conftest's scripted worker with slow replies."""
    script = {
        "model": "scripted-test",
        "replies": [
            {"match": MEDIUM, "text": "tick " * 40, "token_delay_ms": 20},
            {"match": LONG, "text": "tock " * 150, "token_delay_ms": 20},
        ],
        "default": {"text": "Hello there."},
    }
    async with scripted_worker_server(script) as started:
        yield started


@pytest.fixture
async def engine_load(worker: ScriptedWorker) -> AsyncIterator[Callable[[], Any]]:
    """Requests running (or waiting) in the worker, from its GetLoad."""
    async with grpc.aio.insecure_channel(worker.target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)

        async def running() -> int:
            load = await stub.GetLoad(engine_pb2.GetLoadRequest(), timeout=5)
            return int(load.running_requests + load.waiting_requests)

        yield running


async def _conversation(app: ConversationApplication) -> str:
    state = await app.create(CreateConversation(request_id="c-1", system_prompt="Be brief."))
    return state.conversation_id


async def _load_when(
    engine_load: Callable[[], Any], wanted: Callable[[int], bool], timeout_s: float
) -> tuple[int, float]:
    """Polls the worker's load until `wanted(load)` or the timeout; (load, seconds waited)."""
    started = time.monotonic()
    while True:
        running: int = await engine_load()
        waited = time.monotonic() - started
        if wanted(running) or waited > timeout_s:
            return running, waited
        await asyncio.sleep(0.01)


def _commits(events: list[Any], turn_start_version: int) -> list[list[str]]:
    """The event types of each append of a turn (one `recorded_at` per commit)."""
    batches: dict[Any, list[str]] = {}
    for e in events:
        if e.stream_version >= turn_start_version:
            batches.setdefault(e.recorded_at, []).append(e.type)
    return list(batches.values())


async def test_a_unary_turn_is_two_commits_however_long_it_streams(
    app: ConversationApplication, store: PostgresEventStore
) -> None:
    cid = await _conversation(app)
    start = (await app.load(cid)).version + 1
    result = await app.send(TurnInput(conversation_id=cid, content=MEDIUM, request_id="r-1"))
    assert result.ended.turn.status is TurnStatus.COMPLETED
    commits = _commits(await store.read_stream(stream_id(cid)), start)
    # Nobody was shown the text live, so no commit carries it before the end.
    assert len(commits) == 2
    assert commits[0][0] == "TurnStarted"
    assert "TextStreamed" in commits[1]
    assert commits[1][-1] == "TurnCompleted"


async def test_a_streamed_turn_records_its_text_while_it_streams(
    app: ConversationApplication, store: PostgresEventStore
) -> None:
    cid = await _conversation(app)
    start = (await app.load(cid)).version + 1
    turn_id = await app.start_turn(TurnInput(conversation_id=cid, content=MEDIUM, request_id="s"))
    updates = [u async for u in app.watch(cid, turn_id)]
    assert updates[-1].is_last
    commits = _commits(await store.read_stream(stream_id(cid)), start)
    # A client saw the text live: it is recorded every flush interval, so a
    # resume on another replica (which reads the log) lags by one interval.
    middle = commits[1:-1]
    assert middle, f"no commit between the start and the end: {commits}"
    for types in middle:
        assert "TextStreamed" in types
        assert not [t for t in types if t.startswith("Turn") or t == "GenerationCompleted"]


async def test_the_engine_request_is_sent_before_turn_started_commits(
    app: ConversationApplication,
    store: PostgresEventStore,
    engine_load: Callable[[], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cid = await _conversation(app)
    append = store.append
    seen_running: list[int] = []

    async def observing_append(stream: str, events: Any, **kwargs: Any) -> Any:
        if events[0].type == "TurnStarted":
            # The worker already has the request while TurnStarted is not
            # yet committed: wait (bounded) for it to show up.
            running, _ = await _load_when(engine_load, lambda n: n > 0, timeout_s=2)
            seen_running.append(running)
        return await append(stream, events, **kwargs)

    monkeypatch.setattr(store, "append", observing_append)
    result = await app.send(TurnInput(conversation_id=cid, content=MEDIUM, request_id="r-1"))
    assert result.ended.turn.status is TurnStatus.COMPLETED
    assert seen_running == [1]
    # Nothing it produced was lost or doubled by reading it late.
    assert result.assistant_message is not None
    assert result.assistant_message.text == "tick " * 40


async def test_a_start_that_cannot_commit_cancels_the_prestarted_request(
    app: ConversationApplication,
    store: PostgresEventStore,
    engine_load: Callable[[], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cid = await _conversation(app)
    append = store.append
    before = await store.read_stream(stream_id(cid))

    async def failing_append(stream: str, events: Any, **kwargs: Any) -> Any:
        if events[0].type == "TurnStarted":
            # Give the prestarted request time to reach the worker first.
            await _load_when(engine_load, lambda n: n > 0, timeout_s=2)
            raise errors.StorageUnavailableError("the database went away")
        return await append(stream, events, **kwargs)

    monkeypatch.setattr(store, "append", failing_append)
    with pytest.raises(errors.StorageUnavailableError):
        await app.send(TurnInput(conversation_id=cid, content=LONG, request_id="r-1"))
    # The ~3 s reply is aborted in the worker at once, not left to run out.
    running, waited = await _load_when(engine_load, lambda n: n == 0, timeout_s=1.5)
    assert running == 0, f"the prestarted request still runs after {waited:.1f} s"
    # The log is unchanged, and the conversation takes the next turn.
    assert await store.read_stream(stream_id(cid)) == before
    monkeypatch.setattr(store, "append", append)
    result = await app.send(TurnInput(conversation_id=cid, content="hi", request_id="r-2"))
    assert result.ended.turn.status is TurnStatus.COMPLETED


async def test_a_unary_turn_gets_its_text_in_fewer_larger_pieces(
    app: ConversationApplication, store: PostgresEventStore
) -> None:
    # No response guardrails: they re-cut the text (holding back what may
    # be the start of an email address, say), and the pieces here should be
    # the worker's deltas.
    created = await app.create(CreateConversation(request_id="c-1", guardrail_profile="none"))
    cid = created.conversation_id
    unary = await app.send(TurnInput(conversation_id=cid, content=MEDIUM, request_id="u"))
    turn_id = await app.start_turn(TurnInput(conversation_id=cid, content=MEDIUM, request_id="s"))
    streamed = [u async for u in app.watch(cid, turn_id)]
    assert unary.assistant_message is not None
    assert unary.assistant_message.text == "tick " * 40
    pieces: dict[str, list[str]] = {}
    for event in await store.read_stream(stream_id(cid)):
        if event.type == "TextStreamed":
            data = event.data
            pieces.setdefault(data["turn_id"], []).extend(data["pieces"])
    unary_pieces, streamed_pieces = pieces[unary.ended.turn.turn_id], pieces[turn_id]
    assert "".join(unary_pieces) == "".join(streamed_pieces) == "tick " * 40
    # Nobody streams the unary turn: the worker held its text up to
    # `unwatched_delta_interval_s` (50 ms) per piece; the streamed turn got
    # every piece as it came (one per 20 ms token here).
    assert len(streamed_pieces) >= 30
    assert len(unary_pieces) < len(streamed_pieces) / 2
    assert streamed[-1].is_last
