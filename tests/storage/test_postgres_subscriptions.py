"""Subscriptions across processes' connections, and across killed backends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import psycopg

from turnlog.storage.port import NewEvent, RecordedEvent
from turnlog.storage.postgres import PostgresEventStore


def new_event(n: int) -> NewEvent:
    return NewEvent(event_id=uuid.uuid4(), type="Happened", data={"n": n})


async def take(iterator: AsyncIterator[RecordedEvent], count: int) -> list[RecordedEvent]:
    return [await anext(iterator) for _ in range(count)]


def kill_other_backends(url: str) -> int:
    """Terminates every other connection to this test's database; returns how many."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


async def test_subscriber_in_another_store_is_woken_by_notify(database_url: str) -> None:
    # The subscriber polls only every 60 s: delivery within seconds proves the
    # coalesced NOTIFY reaches other processes' (here: other pools') listeners.
    async with (
        await PostgresEventStore.open(database_url, poll_interval=60) as reader,
        await PostgresEventStore.open(database_url) as writer,
    ):
        subscription = reader.subscribe_all()
        try:
            pending = asyncio.ensure_future(take(subscription, 3))
            await asyncio.sleep(0.3)  # let the subscriber catch up and wait
            for n in range(3):
                await writer.append("s", [new_event(n)], expected_version=n)
            events = await asyncio.wait_for(pending, 10)
            assert [e.stream_version for e in events] == [1, 2, 3]
        finally:
            await subscription.aclose()


async def test_subscription_survives_killed_connections(database_url: str) -> None:
    async with (
        await PostgresEventStore.open(database_url, poll_interval=60) as reader,
        await PostgresEventStore.open(database_url) as writer,
    ):
        all_events = reader.subscribe_all()
        one_stream = reader.subscribe_stream("s1")
        try:
            expected: list[uuid.UUID] = []
            version = {"s0": 0, "s1": 0}
            got_all: list[RecordedEvent] = []
            got_stream: list[RecordedEvent] = []
            for round_ in range(3):
                batch = [new_event(round_ * 10 + i) for i in range(10)]
                for i, event in enumerate(batch):
                    stream = f"s{i % 2}"
                    await writer.append(stream, [event], expected_version=version[stream])
                    version[stream] += 1
                    expected.append(event.event_id)
                got_all += await asyncio.wait_for(take(all_events, 5), 10)
                # Kill mid-stream: the reader's pool, its listener and the writer's pool.
                assert kill_other_backends(database_url) >= 3
                got_all += await asyncio.wait_for(take(all_events, 5), 10)
                got_stream += await asyncio.wait_for(take(one_stream, 5), 10)
            assert [e.event_id for e in got_all] == expected
            assert [e.stream_version for e in got_stream] == list(range(1, 16))
            # And live delivery still works after the kills (listener reconnected).
            pending = asyncio.ensure_future(take(all_events, 1))
            await asyncio.sleep(0.3)
            late = new_event(99)
            await writer.append("s9", [late], expected_version=0)
            (live,) = await asyncio.wait_for(pending, 10)
            assert live.event_id == late.event_id
        finally:
            await all_events.aclose()
            await one_stream.aclose()
