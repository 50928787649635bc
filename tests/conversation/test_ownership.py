"""Crash recovery with several replicas: liveness locks (turnlog.storage.replica_lock).

Two `ConversationApplication`s on one database play two replicas, each with
its own lock connection (named "a" and "b"); the scripted worker and store
come from the fixtures in conftest.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from conversation_helpers import ScriptedWorker, scripted_worker_server

from turnlog import errors
from turnlog.conversation.application import ConversationApplication, CreateConversation, TurnInput
from turnlog.conversation.options import TurnOptions
from turnlog.domain import events as ev
from turnlog.domain.state import TurnStatus
from turnlog.eventlog import stream_id
from turnlog.storage import PostgresEventStore
from turnlog.storage.replica_lock import LOCK_CLASS_ID, PostgresReplicaLock, lock_key

pytestmark = pytest.mark.timeout(60)

SLOW = "take a while"  # this module's worker streams the reply for ~1 s
LONG = "keep going"  # ... and this one for ~12 s


@pytest.fixture
async def worker() -> AsyncIterator[ScriptedWorker]:
    """Overrides conftest's scripted worker: one reply slow enough to overlap, but short."""
    script = {
        "model": "scripted-test",
        "replies": [
            {"match": SLOW, "text": "tick " * 5, "token_delay_ms": 40},
            {"match": LONG, "text": "tick " * 60, "token_delay_ms": 40},
        ],
        "default": {"text": "Hello there."},
    }
    async with scripted_worker_server(script) as started:
        yield started


class Replicas:
    """Replicas A and B (own lock connections, shared store and worker)."""

    def __init__(self, make: Callable[..., ConversationApplication], url: str) -> None:
        self._make = make
        self._url = url
        self.apps: list[ConversationApplication] = []

    async def start(self, name: str) -> ConversationApplication:
        ownership = await PostgresReplicaLock.open(self._url, name)
        app = self._make(ownership=ownership)
        self.apps.append(app)
        return app

    async def close(self) -> None:
        for app in self.apps:
            await app.shutdown()
            assert app.ownership is not None
            await app.ownership.close()


@pytest.fixture
async def replicas(
    make_app: Callable[..., ConversationApplication], database_url: str
) -> AsyncIterator[Replicas]:
    made = Replicas(make_app, database_url)
    yield made
    await made.close()


async def new_conversation(app: ConversationApplication, request_id: str = "c") -> str:
    return (await app.create(CreateConversation(request_id=request_id))).conversation_id


async def wait_open(app: ConversationApplication, cid: str) -> str:
    for _ in range(100):
        state = await app.load(cid)
        if state.open_turn is not None:
            return state.open_turn.turn_id
        await asyncio.sleep(0.01)
    raise AssertionError("the turn never opened")


async def test_recovery_leaves_a_turn_a_live_replica_runs(replicas: Replicas) -> None:
    a = await replicas.start("a")
    b = await replicas.start("b")
    cid = await new_conversation(a)
    turn_id = await a.start_turn(TurnInput(conversation_id=cid, content=SLOW, request_id="t1"))
    await wait_open(a, cid)

    assert await b.close_interrupted_turns() == []

    updates = [u async for u in a.watch(cid, turn_id)]
    assert updates[-1].is_last
    state = await b.load(cid)
    assert state.open_turn is None
    assert state.turns[-1].status is TurnStatus.COMPLETED
    # No lock to wait for: B runs the next turn at once.
    result = await b.send(TurnInput(conversation_id=cid, content="hi", request_id="t2"))
    assert result.ended.turn.status is TurnStatus.COMPLETED


async def test_racing_starts_on_two_replicas_start_one_turn(
    replicas: Replicas, store: PostgresEventStore
) -> None:
    a = await replicas.start("a")
    b = await replicas.start("b")
    cid = await new_conversation(a)
    await b.load(cid)  # both hold the same cached state: both try to append
    outcomes = await asyncio.gather(
        a.start_turn(TurnInput(conversation_id=cid, content=SLOW, request_id="a1")),
        b.start_turn(TurnInput(conversation_id=cid, content=SLOW, request_id="b1")),
        return_exceptions=True,
    )
    started = [o for o in outcomes if isinstance(o, str)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(started) == 1
    assert len(refused) == 1
    assert isinstance(refused[0], errors.TurnInProgressError)
    # While it runs, the other replica fails fast too.
    with pytest.raises(errors.TurnInProgressError):
        await b.start_turn(TurnInput(conversation_id=cid, content="hi", request_id="b2"))
    owner = a if outcomes[0] == started[0] else b
    updates = [u async for u in owner.watch(cid, started[0])]
    assert updates[-1].is_last
    events = await store.read_stream(stream_id(cid))
    assert [e.type for e in events].count("TurnStarted") == 1


async def test_recovery_never_takes_a_turn_being_started_here(
    replicas: Replicas, store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await replicas.start("a")
    cid = await new_conversation(a)
    append = store.append
    recovered: list[list[tuple[str, str]]] = []

    async def append_then_recover(stream: str, events: Any, **kwargs: Any) -> Any:
        result = await append(stream, events, **kwargs)
        if events[0].type == "TurnStarted":
            # Committed, and the turn's task not made yet: still not an orphan.
            recovered.append(await a.close_interrupted_turns())
        return result

    monkeypatch.setattr(store, "append", append_then_recover)
    result = await a.send(TurnInput(conversation_id=cid, content="hi", request_id="t1"))
    assert recovered == [[]]
    assert result.ended.turn.status is TurnStatus.COMPLETED


async def lock_freed_at(database_url: str, pid: int, instance: str) -> float:
    """When (monotonic) the session `pid` no longer holds `instance`'s replica lock."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        for _ in range(500):
            cursor = await admin.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s"
                " AND classid = %s AND objid = %s AND objsubid = 2",
                (pid, LOCK_CLASS_ID, lock_key(instance) & 0xFFFFFFFF),
            )
            row = await cursor.fetchone()
            assert row is not None
            if row[0] == 0:
                return time.monotonic()
            await asyncio.sleep(0.01)
    raise AssertionError("the lock was never freed")


async def test_killed_lock_session_lets_periodic_recovery_take_over(
    replicas: Replicas, database_url: str
) -> None:
    a = await replicas.start("a")
    b = await replicas.start("b")
    cid = await new_conversation(a)
    # A's turn would run ~12 s on its own: only B's recovery can end it sooner.
    turn_id = await a.start_turn(TurnInput(conversation_id=cid, content=LONG, request_id="t1"))
    await wait_open(a, cid)
    live = a.running.turns[turn_id]
    assert live.task is not None
    assert a.ownership is not None
    pid = a.ownership.backend_pid
    assert pid is not None
    b.start_recovery(0.2, jitter=0.1)
    # Kill A's lock session (what a crash of A, or a network cut, does to it).
    with psycopg.connect(database_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    freed = await lock_freed_at(database_url, pid, "a")
    # B's next recovery round (every 0.2 ± 0.02 s) interrupts the turn.
    while True:
        events = await b.store.read_stream(stream_id(cid))
        types = [e.type for e in events]
        if "TurnInterrupted" in types:
            break
        assert time.monotonic() - freed < 1.0, (
            f"no TurnInterrupted 1 s after A's lock was freed: {types}"
        )
        await asyncio.sleep(0.02)
    terminal = [e for e in events if e.type.startswith("Turn") and e.type != "TurnStarted"]
    assert [(e.type, e.data["turn_id"], e.metadata.actor) for e in terminal] == [
        ("TurnInterrupted", turn_id, "b")
    ]
    # A's turn ends on its next append (a conflict), long before its reply would.
    await asyncio.wait_for(asyncio.gather(live.task, return_exceptions=True), 5)
    state = await b.load(cid)
    assert state.open_turn is None
    assert state.turns[-1].status is TurnStatus.INTERRUPTED
    events = await b.store.read_stream(stream_id(cid))
    terminal = [e for e in events if e.type.startswith("Turn") and e.type != "TurnStarted"]
    assert [e.type for e in terminal] == ["TurnInterrupted"]  # A's end was refused
    # The conversation goes on, on B (a short reply: LONG is in its prompt too).
    short = TurnOptions(sampling=ev.SamplingParams(max_tokens=3))
    result = await b.send(
        TurnInput(conversation_id=cid, content="hi", request_id="t2", options=short)
    )
    assert result.ended.turn.status is TurnStatus.COMPLETED


async def test_orphan_of_a_dead_replica_is_interrupted_and_its_end_conflicts(
    replicas: Replicas, database_url: str
) -> None:
    a = await replicas.start("a")
    b = await replicas.start("b")
    cid = await new_conversation(a)
    turn_id = await a.start_turn(TurnInput(conversation_id=cid, content=SLOW, request_id="t1"))
    await wait_open(a, cid)
    assert a.ownership is not None
    # A's lock session dies mid-turn; B recovers before A's turn can end.
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (a.ownership.backend_pid,))
    for _ in range(50):  # the backend exits asynchronously
        closed = await b.close_interrupted_turns()
        if closed:
            break
        await asyncio.sleep(0.02)
    assert closed == [(cid, turn_id)]
    # A's turn must not be reported completed: its watchers get the conflict.
    with pytest.raises(errors.VersionConflictError):
        async for _ in a.watch(cid, turn_id):
            pass
    state = await b.load(cid)
    assert state.turns[-1].status is TurnStatus.INTERRUPTED
    # A reconnects its lock session (its lock had been lost) and works again.
    assert await a.ownership.check() is True
    result = await a.send(TurnInput(conversation_id=cid, content="hi", request_id="t2"))
    assert result.ended.turn.status is TurnStatus.COMPLETED


async def test_reconnect_retakes_the_replica_lock(replicas: Replicas, database_url: str) -> None:
    a = await replicas.start("a")
    b = await replicas.start("b")
    assert a.ownership is not None
    assert b.ownership is not None
    assert await b.ownership.claim_orphan("a") is None  # A is alive
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (a.ownership.backend_pid,))
    await asyncio.sleep(0.2)
    # A is gone as far as the database knows: B may take its lock...
    gone = await b.ownership.claim_orphan("a")
    assert gone is not None
    await b.ownership.release(gone)
    # ...until A notices, reconnects and takes it again.
    assert await a.ownership.check() is True
    assert await a.ownership.check() is False
    assert await b.ownership.claim_orphan("a") is None
    # Its own turns are the replica's to judge (it knows what runs here).
    own = await a.ownership.claim_orphan("a")
    assert own is not None
    await a.ownership.release(own)


async def test_one_instance_name_one_live_replica(database_url: str) -> None:
    async with await PostgresReplicaLock.open(database_url, "same") as first:
        with pytest.raises(errors.AlreadyExistsError):
            await PostgresReplicaLock.open(database_url, "same", take_timeout=0.3)
        assert first.backend_pid is not None
    # Once the first is gone, the name is free again.
    async with await PostgresReplicaLock.open(database_url, "same", take_timeout=0.3):
        pass


async def test_recovery_is_one_query_over_many_closed_turns(
    replicas: Replicas,
    store: PostgresEventStore,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = await replicas.start("a")
    b = await replicas.start("b")
    cids = [await new_conversation(a, f"c{i}") for i in range(4)]
    for n in range(5):
        await asyncio.gather(
            *(
                a.send(TurnInput(conversation_id=cid, content="hi", request_id=f"r{n}"))
                for cid in cids
            )
        )
    # One orphan: a TurnStarted of A that no task runs (A is alive, say, and
    # lost the task); only A's own recovery may close it while A lives.
    victim = cids[2]
    version = (await a.load(victim)).version
    started = ev.TurnStarted(turn_id="orphan", request_id="orphan", started_at_us=1)
    await store.append(
        stream_id(victim),
        [a.repository.new_event("22222222-2222-2222-2222-222222222222", started)],
        expected_version=version,
    )

    calls: list[Any] = []
    original_latest = store.latest_events_of_types

    async def no_scan(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("recovery must not scan the log")

    async def latest(*args: Any, **kwargs: Any) -> Any:
        found = await original_latest(*args, **kwargs)
        calls.append([e.stream_id for e in found])
        return found

    monkeypatch.setattr(store, "read_all", no_scan)
    monkeypatch.setattr(store, "subscribe_all", no_scan)
    monkeypatch.setattr(store, "latest_events_of_types", latest)
    assert await b.close_interrupted_turns() == []  # A is alive: left alone
    assert a.ownership is not None
    pid = a.ownership.backend_pid
    assert pid is not None
    await a.ownership.close()  # A dies
    # The server frees a closed session's lock a moment later, not at once.
    await lock_freed_at(database_url, pid, "a")
    assert await b.close_interrupted_turns() == [(victim, "orphan")]
    # The query returned the one open conversation, not 20 closed turns.
    assert calls == [[stream_id(victim)], [stream_id(victim)]]
    state = await b.load(victim)
    assert state.open_turn is None
    assert state.turns[-1].status is TurnStatus.INTERRUPTED
    assert await b.close_interrupted_turns() == []
    assert (await store.verify(stream_id(victim))).ok


async def test_a_replica_closes_its_own_orphans(
    replicas: Replicas, store: PostgresEventStore
) -> None:
    a = await replicas.start("a")
    b = await replicas.start("b")
    cid = await new_conversation(a)
    version = (await a.load(cid)).version
    started = ev.TurnStarted(turn_id="lost", request_id="lost", started_at_us=1)
    await store.append(
        stream_id(cid),
        [a.repository.new_event("33333333-3333-3333-3333-333333333333", started)],
        expected_version=version,
    )
    assert await b.close_interrupted_turns() == []  # A's, and A is alive
    assert await a.close_interrupted_turns() == [(cid, "lost")]  # not running in A


def test_lock_key_is_stable_and_namespaced() -> None:
    assert lock_key("abc") == lock_key("abc")
    assert lock_key("abc") != lock_key("abd")
    assert -(2**31) <= lock_key("abc") < 2**31
    assert LOCK_CLASS_ID == 0x7472
