"""InMemoryEventStore against the EventStore contract, plus what only it can show."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from storage_contract import EventStoreContract, foreign_chain, new_event, take

from turnlog.errors import (
    DuplicateEventError,
    InvalidArgumentError,
    StorageUnavailableError,
    VersionConflictError,
)
from turnlog.storage import InMemoryEventStore
from turnlog.storage.hashchain import GENESIS_HASH, event_hash
from turnlog.storage.port import EventStore, ImportedEvent, NewEvent, RawJson, RecordedEvent


@pytest.fixture
async def store() -> AsyncIterator[InMemoryEventStore]:
    """A fresh, empty in-memory store (overrides the PostgreSQL one of conftest.py)."""
    async with InMemoryEventStore() as opened:
        yield opened


class TestInMemoryEventStore(EventStoreContract):
    """Runs the contract on a fresh in-memory store per test."""


def test_is_an_event_store() -> None:
    # The static check is mypy's (memory.py); this one fails loudly if the
    # port grows a method the adapter lacks.
    port_methods = {name for name in vars(EventStore) if not name.startswith("_")}
    assert port_methods <= set(dir(InMemoryEventStore))


async def settle(rounds: int = 10) -> None:
    """Lets every ready task run `rounds` times without letting any time pass for timers."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_a_waiting_subscriber_is_woken_by_the_append_itself(
    store: InMemoryEventStore,
) -> None:
    subscription = store.subscribe_all()
    stream_subscription = store.subscribe_stream("s")
    try:
        pending = asyncio.ensure_future(take(subscription, 1))
        pending_stream = asyncio.ensure_future(take(stream_subscription, 1))
        await settle()
        assert not pending.done()
        assert not pending_stream.done()
        await store.append("s", [new_event()], expected_version=0)
        # Only zero-delay steps of the loop: a timer (a poll) could not fire.
        await settle()
        assert pending.done()
        assert pending_stream.done()
        assert [e.stream_version for e in pending.result()] == [1]
        assert [e.stream_version for e in pending_stream.result()] == [1]
    finally:
        await subscription.aclose()
        await stream_subscription.aclose()


async def test_no_loss_no_duplicates_with_concurrent_writers() -> None:
    # A small page size makes subscribers page through catch-up and live
    # batches while the writers keep appending.
    async with InMemoryEventStore(page_size=3) as store:
        await store.append("w0", [new_event(n=-1)], expected_version=0)
        writers, appends = 8, 40
        per_writer = appends + len(range(0, appends, 3))  # every third append is two events
        everything = store.subscribe_all()
        one_stream = store.subscribe_stream("w3")
        try:
            first = await take(everything, 1)

            async def write(w: int) -> None:
                for i in range(appends):
                    batch = [new_event(n=i)] if i % 3 else [new_event(n=i), new_event(n=i)]
                    await store.append(f"w{w}", batch, expected_version=None)
                    await asyncio.sleep(0)

            async def collect() -> list[RecordedEvent]:
                return [*first, *await take(everything, writers * per_writer)]

            collector = asyncio.ensure_future(collect())
            stream_collector = asyncio.ensure_future(take(one_stream, per_writer))
            await asyncio.gather(*(write(w) for w in range(writers)))
            seen = await asyncio.wait_for(collector, 10)
            seen_stream = await asyncio.wait_for(stream_collector, 10)
        finally:
            await everything.aclose()
            await one_stream.aclose()

        page = await store.read_all(limit=10_000)
        assert page.reached_end
        assert [e.event_id for e in seen] == [e.event_id for e in page.events]
        assert len({e.event_id for e in seen}) == len(seen)
        positions = [e.position for e in seen]
        assert positions == sorted(positions)
        assert [e.stream_version for e in seen_stream] == list(range(1, per_writer + 1))
        for w in range(writers):
            assert (await store.verify(f"w{w}")).ok


async def test_closing_a_subscription_ends_it_cleanly(store: InMemoryEventStore) -> None:
    await store.append("s", [new_event(), new_event(), new_event()], expected_version=0)
    # Closed in the middle of a page.
    subscription = store.subscribe_stream("s")
    assert (await anext(subscription)).stream_version == 1
    await subscription.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(subscription)

    # Closed by cancelling the task that waits in it.
    received: list[RecordedEvent] = []

    async def consume() -> None:
        async with contextlib.aclosing(store.subscribe_all()) as events:
            async for event in events:
                received.append(event)

    consumer = asyncio.ensure_future(consume())
    await settle()
    assert len(received) == 3
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    # The store is unaffected: appends and new subscriptions work.
    await store.append("s", [new_event()], expected_version=3)
    again = store.subscribe_stream("s", after_version=3)
    try:
        assert [e.stream_version for e in await take(again, 1)] == [4]
    finally:
        await again.aclose()


async def test_closing_the_store_ends_live_subscriptions_and_refuses_calls() -> None:
    store = InMemoryEventStore()
    await store.append("s", [new_event()], expected_version=0)

    async def consume(events: AsyncIterator[RecordedEvent]) -> int:
        return len([event async for event in events])

    everything = asyncio.ensure_future(consume(store.subscribe_all()))
    one_stream = asyncio.ensure_future(consume(store.subscribe_stream("s")))
    await settle()
    assert not everything.done()
    await store.close()
    assert await asyncio.wait_for(everything, 5) == 1
    assert await asyncio.wait_for(one_stream, 5) == 1
    await store.close()  # idempotent
    with pytest.raises(StorageUnavailableError):
        await store.append("s", [new_event()], expected_version=1)
    with pytest.raises(StorageUnavailableError):
        await store.read_stream("s")
    with pytest.raises(StorageUnavailableError):
        await store.read_all()


async def test_one_transaction_per_append_and_increasing_positions(
    store: InMemoryEventStore,
) -> None:
    first = await store.append("a", [new_event(), new_event()], expected_version=0)
    second = await store.append("b", [new_event()], expected_version=0)
    imported = await store.import_events("c", foreign_chain("c", 2))
    assert imported.written == 2
    events = (await store.read_all()).events
    assert [e.transaction_id for e in events] == [1, 1, 2, 3, 3]
    assert [e.global_position for e in events] == [1, 2, 3, 4, 5]
    assert first.positions == (1, 2)
    assert second.positions == (3,)
    assert (await store.read_all(after=events[1].position)).events == events[2:]
    assert (await store.read_all(after=events[-1].position)).events == ()
    # Snapshots and failed writes take no transaction.
    await store.save_snapshot("a", kind="k", stream_version=2, state=b"x")
    with pytest.raises(VersionConflictError):
        await store.append("a", [new_event()], expected_version=0)
    await store.append("a", [new_event()], expected_version=2)
    assert (await store.read_stream("a"))[-1].position.transaction_id == 4


async def test_recorded_at_is_utc_microseconds_and_never_goes_back() -> None:
    start = datetime(2030, 1, 1, 12, 0, 0, 500_000, tzinfo=timezone(timedelta(hours=2)))
    readings = iter([start, start - timedelta(seconds=5), start + timedelta(microseconds=1)])
    async with InMemoryEventStore(clock=lambda: next(readings)) as store:
        results = [await store.append("s", [new_event()], expected_version=None) for _ in "abc"]
        times = [r.recorded_at for r in results]
        assert times == [start, start, start + timedelta(microseconds=1)]
        assert all(t.tzinfo is UTC for t in times)
        assert [e.recorded_at for e in await store.read_stream("s")] == times
        assert (await store.verify("s")).ok


async def test_recorded_at_is_not_earlier_than_imported_times() -> None:
    clock_time = datetime(2020, 1, 1, tzinfo=UTC)  # before foreign_chain's times
    async with InMemoryEventStore(clock=lambda: clock_time) as store:
        chain = foreign_chain("s", 2)
        await store.import_events("s", chain)
        appended = await store.append("s", [new_event()], expected_version=2)
        assert appended.recorded_at == chain[-1].recorded_at


async def test_reused_id_is_a_duplicate_before_a_version_conflict(
    store: InMemoryEventStore,
) -> None:
    event = new_event()
    await store.append("s", [event], expected_version=0)
    changed = NewEvent(event_id=event.event_id, type="Other", data={"n": 0})
    with pytest.raises(DuplicateEventError):
        await store.append("s", [changed], expected_version=5)
    # A single-event retry with any expected version returns the original.
    original = (await store.read_stream("s"))[0]
    for expected in (None, 0, 1, 7):
        retried = await store.append("s", [event], expected_version=expected)
        assert retried.positions == (original.global_position,)
        assert retried.recorded_at == original.recorded_at
    # The same ids in another order are not a retry.
    batch = [new_event(n=1), new_event(n=2)]
    await store.append("t", batch, expected_version=0)
    with pytest.raises(DuplicateEventError):
        await store.append("t", batch[::-1], expected_version=0)
    assert await store.stream_version("t") == 2


@pytest.mark.parametrize(
    "text",
    [
        "NaN",
        '{"x": Infinity}',
        '{"x": -Infinity}',
        '"\ud800"',  # a raw lone surrogate: not UTF-8
        "",
        "[1,]",
        '{"a":"line\nbreak"}',
    ],
)
async def test_json_that_postgresql_refuses_is_rejected(
    store: InMemoryEventStore, text: str
) -> None:
    with pytest.raises(InvalidArgumentError):
        await store.append(
            "s",
            [NewEvent(event_id=uuid.uuid4(), type="T", data=RawJson(text=text))],
            expected_version=None,
        )
    assert await store.stream_version("s") == 0


async def test_json_that_postgresql_accepts_is_stored(store: InMemoryEventStore) -> None:
    # PostgreSQL's json type checks escapes for syntax only: lone surrogates
    # and \u0000 escapes pass (checked against a server, PostgreSQL 18).
    texts = ['"\\ud83d\\ude00"', '"\\ud800"', '"\\ud800\\ud800"', "1e400", "-0", '{"\\u0000":null}']
    for text in texts:
        await store.append(
            "s",
            [NewEvent(event_id=uuid.uuid4(), type="T", data=RawJson(text=text))],
            expected_version=None,
        )
    assert [e.data_json for e in await store.read_stream("s")] == texts


def rechained(stream_id: str, chain: list[ImportedEvent]) -> list[ImportedEvent]:
    """`chain` with its links and hashes recomputed for `stream_id` (ids and content kept)."""
    out: list[ImportedEvent] = []
    prev = GENESIS_HASH
    for event in chain:
        digest = event_hash(
            prev_hash=prev,
            stream_id=stream_id,
            stream_version=event.stream_version,
            event_id=event.event_id,
            type=event.type,
            data_json=event.data_json,
            metadata_json=event.metadata_json,
            recorded_at=event.recorded_at,
        )
        out.append(dataclasses.replace(event, prev_hash=prev, hash=digest))
        prev = digest
    return out


async def test_import_rejects_invalid_json_and_reused_ids(store: InMemoryEventStore) -> None:
    chain = foreign_chain("s", 2)
    nan = [dataclasses.replace(chain[0], data_json='{"n":NaN}'), chain[1]]
    with pytest.raises(InvalidArgumentError):
        await store.import_events("s", rechained("s", nan))
    assert await store.read_stream("s") == ()
    await store.import_events("s", chain)
    # The same ids, chained for another stream, are duplicates there.
    with pytest.raises(DuplicateEventError):
        await store.import_events("t", rechained("t", chain))
    # So is an id repeated within one batch.
    twice = [chain[0], dataclasses.replace(chain[1], event_id=chain[0].event_id)]
    with pytest.raises(DuplicateEventError):
        await store.import_events("u", rechained("u", twice))
    assert await store.read_stream("t") == ()
    assert await store.read_stream("u") == ()
    assert await store.stream_version("s") == 2


@pytest.fixture
def store_built_outside_a_loop() -> InMemoryEventStore:
    """A store constructed where no event loop runs (a CLI builds it before asyncio.run)."""
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    return InMemoryEventStore()


async def test_a_store_can_be_built_outside_an_event_loop(
    store_built_outside_a_loop: InMemoryEventStore,
) -> None:
    store = store_built_outside_a_loop
    async with store:
        subscription = store.subscribe_stream("s")
        try:
            pending = asyncio.ensure_future(take(subscription, 1))
            await settle()
            await store.append("s", [new_event()], expected_version=0)
            assert [e.stream_version for e in await asyncio.wait_for(pending, 5)] == [1]
        finally:
            await subscription.aclose()
