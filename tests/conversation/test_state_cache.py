"""The application's per-conversation state cache: tail reads, staleness, time travel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from turnlog.conversation.application import (
    ConversationApplication,
    CreateConversation,
    ServiceDefaults,
    TurnInput,
)
from turnlog.domain.state import TurnStatus
from turnlog.eventlog import stream_id
from turnlog.storage import PostgresEventStore


class _Spy:
    """Records the store's snapshot loads and stream reads (from_version)."""

    def __init__(self, store: PostgresEventStore, monkeypatch: Any) -> None:
        self.snapshots = 0
        self.reads: list[int] = []
        load_snapshot, read_stream = store.load_snapshot, store.read_stream

        async def spy_load_snapshot(*args: Any, **kwargs: Any) -> Any:
            self.snapshots += 1
            return await load_snapshot(*args, **kwargs)

        async def spy_read_stream(sid: str, **kwargs: Any) -> Any:
            self.reads.append(kwargs.get("from_version", 1))
            return await read_stream(sid, **kwargs)

        monkeypatch.setattr(store, "load_snapshot", spy_load_snapshot)
        monkeypatch.setattr(store, "read_stream", spy_read_stream)

    def reset(self) -> None:
        self.snapshots = 0
        self.reads = []


async def _conversation(app: ConversationApplication, request_id: str = "c-1") -> str:
    state = await app.create(CreateConversation(request_id=request_id, system_prompt="Be brief."))
    return state.conversation_id


async def test_a_cached_load_reads_only_the_tail(
    app: ConversationApplication, store: PostgresEventStore, monkeypatch: Any
) -> None:
    cid = await _conversation(app)
    await app.send(TurnInput(conversation_id=cid, content="hi", request_id="r-1"))
    version = len(await store.read_stream(stream_id(cid)))
    spy = _Spy(store, monkeypatch)
    state = await app.load(cid)
    assert state.version == version
    assert spy.snapshots == 0
    assert spy.reads == [version + 1]  # one read, of nothing: the turn's appends were cached
    spy.reset()
    await app.send(TurnInput(conversation_id=cid, content="again", request_id="r-2"))
    assert spy.snapshots == 0
    assert spy.reads == []  # start_turn read nothing: its cached state is the log's
    # The cached state equals a full fold from the log.
    fresh = ConversationApplication(store, None)
    assert await app.load(cid) == await fresh.load(cid)


async def test_a_cache_behind_the_log_is_caught_up_by_the_tail_read(
    make_app: Callable[..., ConversationApplication], store: PostgresEventStore
) -> None:
    one, other = make_app(), make_app()
    try:
        cid = await _conversation(one)
        await one.load(cid)
        # Another replica runs a turn: `one`'s cached state is now behind.
        await other.send(TurnInput(conversation_id=cid, content="hi", request_id="r-1"))
        state = await one.load(cid)
        assert state == await ConversationApplication(store, None).load(cid)
        assert [t.request_id for t in state.turns] == ["r-1"]
        # The same request on `one` finds the other's turn (idempotency holds).
        result = await one.send(TurnInput(conversation_id=cid, content="hi", request_id="r-1"))
        assert result.ended.turn.turn_id == state.turns[0].turn_id
    finally:
        await one.shutdown()
        await other.shutdown()


async def test_a_turn_started_on_a_stale_cache_conflicts_then_reads_the_log(
    make_app: Callable[..., ConversationApplication],
    store: PostgresEventStore,
    monkeypatch: Any,
) -> None:
    one, other = make_app(), make_app()
    try:
        cid = await _conversation(one)
        await one.send(TurnInput(conversation_id=cid, content="hi", request_id="r-1"))
        # Another replica runs the next turn: `one`'s cached state is behind.
        await other.send(TurnInput(conversation_id=cid, content="there", request_id="r-2"))
        behind = one.repository.states[cid].version
        spy = _Spy(store, monkeypatch)
        result = await one.send(TurnInput(conversation_id=cid, content="again", request_id="r-3"))
        assert result.ended.turn.status is TurnStatus.COMPLETED
        # The first try read nothing and appended at the cached version; the
        # conflict dropped the cached state, and the retry read the log.
        assert behind < len(await store.read_stream(stream_id(cid))) - 1
        assert spy.reads[0] == 1
        state = await one.load(cid)
        assert [t.request_id for t in state.turns] == ["r-1", "r-2", "r-3"]
        assert (await store.verify(stream_id(cid))).ok
        # A refusal is decided on the log, never on a stale cache: `other`'s
        # cache misses r-3 and so thinks the conversation is idle, and it
        # finds the turn by its request id after reading the log.
        again = await other.send(TurnInput(conversation_id=cid, content="again", request_id="r-3"))
        assert again.ended.turn.turn_id == result.ended.turn.turn_id
    finally:
        await one.shutdown()
        await other.shutdown()


async def test_a_wrong_cached_state_conflicts_then_reloads_and_retries(
    app: ConversationApplication, store: PostgresEventStore
) -> None:
    cid = await _conversation(app)
    true_state = await app.load(cid)
    # A cache entry ahead of the log (as after the log was restored from a
    # backup): the tail read finds nothing, the append names a version the
    # stream is not at → conflict → the entry is dropped, reloaded, retried.
    app.repository.states[cid] = replace(true_state, version=true_state.version + 5)
    result = await app.send(TurnInput(conversation_id=cid, content="hi", request_id="r-1"))
    assert result.ended.turn.status is TurnStatus.COMPLETED
    events = await store.read_stream(stream_id(cid))
    assert [e.stream_version for e in events] == list(range(1, len(events) + 1))
    assert (await store.verify(stream_id(cid))).ok
    assert app.repository.states[cid].version == len(events)
    assert await app.load(cid) == await ConversationApplication(store, None).load(cid)


async def test_time_travel_with_a_cache(
    app: ConversationApplication, store: PostgresEventStore
) -> None:
    cid = await _conversation(app)
    await app.send(TurnInput(conversation_id=cid, content="one", request_id="r-1"))
    middle = (await app.load(cid)).version
    await app.send(TurnInput(conversation_id=cid, content="two", request_id="r-2"))
    latest = await app.load(cid)
    uncached = ConversationApplication(store, None, defaults=ServiceDefaults(state_cache_size=0))
    for version in (1, 2, middle, middle + 1, latest.version):
        got = await app.load(cid, version=version)
        assert got.version == version
        assert got == await uncached.load(cid, version=version)
    # Loading an old version never moves the cached state back.
    assert app.repository.states[cid] == latest
    assert await app.load(cid) == latest
    assert not uncached.repository.states


async def test_the_cache_is_bounded(
    make_app: Callable[..., ConversationApplication], store: PostgresEventStore
) -> None:
    app = make_app(defaults=ServiceDefaults(state_cache_size=2))
    cids = [await _conversation(app, f"c-{i}") for i in range(3)]
    assert list(app.repository.states) == cids[1:]
    await app.load(cids[1])  # most recently used now
    await app.load(cids[0])  # evicts cids[2]
    assert list(app.repository.states) == [cids[1], cids[0]]
    await app.shutdown()
