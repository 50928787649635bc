"""The `TurnMailbox` contract, on both adapters: PostgreSQL (two processes' worth) and in memory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import psycopg
import pytest

from turnlog.storage import InMemoryTurnMailbox, PostgresTurnMailbox, TurnMailbox


@contextlib.asynccontextmanager
async def _pair(kind: str, database_url: str) -> AsyncIterator[tuple[TurnMailbox, TurnMailbox]]:
    """Two replicas' mailboxes on one shared store."""
    if kind == "memory":
        shared = InMemoryTurnMailbox()
        first, second = shared.subscribe(), shared.subscribe()
        yield first, second
        await first.close()
        await second.close()
        return
    one = await PostgresTurnMailbox.open(database_url)
    two = await PostgresTurnMailbox.open(database_url)
    try:
        await asyncio.wait_for(one.listening.wait(), 10)
        await asyncio.wait_for(two.listening.wait(), 10)
        yield one, two
    finally:
        await one.close()
        await two.close()


@pytest.fixture(params=["postgres", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _notice_for(mailbox: TurnMailbox, turn_id: str) -> bool:
    """Whether a notice naming `turn_id` comes (the first wait after a connect says "everything")."""
    for _ in range(5):
        notice = await mailbox.wait(5.0)
        if turn_id in notice.turn_ids:
            return True
    return False


async def test_a_letter_is_taken_once_by_the_replica_that_asks_for_its_turn(
    kind: str, database_url: str
) -> None:
    async with _pair(kind, database_url) as (sender, receiver):
        big = "x" * 1_000_000  # far past a NOTIFY payload's 8,000 bytes
        first = await sender.post("turn-1", big)
        second = await sender.post("turn-1", "second")
        await sender.post("turn-2", "other turn")
        assert await _notice_for(receiver, "turn-1")
        taken = await receiver.take(["turn-1"])
        assert [(t.letter_id, t.turn_id, t.body) for t in taken] == [
            (first, "turn-1", big),
            (second, "turn-1", "second"),
        ]
        assert await receiver.take(["turn-1"]) == []
        assert await sender.take(["turn-1"]) == []
        assert [t.body for t in await sender.take(["turn-2", "turn-3"])] == ["other turn"]
        assert await receiver.take([]) == []


async def test_withdraw_and_expire_remove_letters_nobody_took(kind: str, database_url: str) -> None:
    async with _pair(kind, database_url) as (sender, receiver):
        kept = await sender.post("turn-1", "a")
        await sender.withdraw(kept)
        await sender.withdraw(kept)  # idempotent
        assert await receiver.take(["turn-1"]) == []
        await sender.post("turn-2", "b")
        assert await receiver.expire(3600) == 0
        await asyncio.sleep(0.05)
        assert await receiver.expire(0.01) == 1
        assert await receiver.take(["turn-2"]) == []


async def test_wait_times_out_into_a_poll_of_everything(kind: str, database_url: str) -> None:
    async with _pair(kind, database_url) as (_, receiver):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                while True:  # drain the notice of the connect
                    notice = await receiver.wait(0.1)
                    if notice.everything and not notice.turn_ids:
                        break
        notice = await receiver.wait(0.1)
        assert notice.everything
        assert not notice.turn_ids


async def test_the_postgres_listener_reconnects_after_its_session_is_killed(
    database_url: str,
) -> None:
    async with _pair("postgres", database_url) as (sender, receiver):
        assert isinstance(receiver, PostgresTurnMailbox)
        await receiver.wait(0.1)  # the connect's own notice
        dropped = receiver.backend_pid
        assert dropped is not None
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db:
            await db.execute("SELECT pg_terminate_backend(%s)", (dropped,))
        # The drop itself is reported as "look at everything" (a NOTIFY may be lost) ...
        drop_seen = await receiver.wait(10.0)
        assert drop_seen.everything
        await asyncio.wait_for(receiver.listening.wait(), 10)
        assert receiver.backend_pid not in (None, dropped)
        # ... and notifications flow again on the new session.
        await sender.post("turn-9", "after the drop")
        assert await _notice_for(receiver, "turn-9")
        assert [t.body for t in await receiver.take(["turn-9"])] == ["after the drop"]
