# ruff: noqa: F811  (pytest fixtures imported from tests/conversation/conftest.py)
"""Checkpoints: a sparse, filtered subscription to all conversations resumes without rescanning.

In memory, the rules under any log and page size; over gRPC and a real
PostgreSQL server, the messages a follower sees and resuming from them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any
from unittest import mock

import pytest
from conversation.conftest import (  # noqa: F401 (fixtures)
    app,
    engine,
    make_app,
    worker,
)
from conversation_helpers import conversation_stub
from hypothesis import given, settings
from hypothesis import strategies as st

from turnlog.conversation.application import ConversationApplication
from turnlog.history import service as history_service
from turnlog.history.service import CaughtUp, Checkpoint, EventQuery, HistoryService
from turnlog.storage import (
    NO_STREAM,
    START_POSITION,
    EventPage,
    EventStore,
    InMemoryEventStore,
    NewEvent,
    Position,
    RecordedEvent,
)
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc

Stub = sgrpc.ConversationServiceStub
Item = tuple[RecordedEvent, ...] | CaughtUp | Checkpoint


def event(kind: str) -> NewEvent:
    return NewEvent(event_id=uuid.uuid4(), type=kind, data={"kind": kind})


class ReadsCounted(InMemoryEventStore):
    """An in-memory store that records where each all-stream read started."""

    def __init__(self) -> None:
        super().__init__()
        self.read_after: list[Position] = []

    async def read_all(self, *, after: Position = START_POSITION, **kwargs: Any) -> EventPage:
        self.read_after.append(after)
        return await super().read_all(after=after, **kwargs)


async def until_caught_up(subscription: AsyncIterator[Item]) -> tuple[list[Item], CaughtUp]:
    items: list[Item] = []
    async for item in subscription:
        if isinstance(item, CaughtUp):
            return items, item
        items.append(item)
    raise AssertionError("the subscription ended")


def position_of(item: Item) -> Position:
    if isinstance(item, CaughtUp | Checkpoint):
        return item.position
    return item[-1].position


STREAMS = ["conversation-a", "conversation-b", "other"]


@settings(max_examples=60, deadline=None)
@given(
    log=st.lists(st.tuples(st.sampled_from(STREAMS), st.sampled_from("AB")), max_size=40),
    filtered=st.booleans(),
    page=st.integers(1, 7),
)
async def test_catch_up_checkpoints_are_safe_to_resume_after_and_skip_the_scanned(
    log: list[tuple[str, str]], filtered: bool, page: int
) -> None:
    store = ReadsCounted()
    for sid, kind in log:
        await store.append(sid, [event(kind)], expected_version=None)
    everything = (await store.read_all(limit=1000)).events
    types = frozenset("A") if filtered else None
    wanted = [
        e
        for e in everything
        if e.stream_id.startswith("conversation-") and (types is None or e.type in types)
    ]
    history = HistoryService(store)
    query = EventQuery(types=types)
    with mock.patch.object(history_service, "_READ_BATCH", page):
        subscription = history.subscribe(query)
        items, caught_up = await until_caught_up(subscription)
        await subscription.aclose()  # type: ignore[attr-defined]
        checkpoints = [i for i in items if isinstance(i, Checkpoint)]
        sent = [e for i in items if not isinstance(i, Checkpoint) for e in i]
        assert sent == wanted
        # Every message moves on: a checkpoint is past the events before it,
        # and the events after it are past it.
        positions = [position_of(i) for i in items]
        assert positions == sorted(set(positions))
        assert all(p <= caught_up.position for p in positions)
        if not filtered:
            assert not checkpoints  # only filtered subscriptions get them
        else:
            # One after each store page that ends with an event not sent,
            # but the page that finds the end (CaughtUp follows it). A full
            # last page does not know it is the last: the empty one after it
            # finds the end.
            pages = [everything[i : i + page] for i in range(0, len(everything), page)]
            if pages and len(pages[-1]) < page:
                pages.pop()
            sent_positions = {e.position for e in sent}
            expected = [p[-1].position for p in pages if p[-1].position not in sent_positions]
            assert [c.position for c in checkpoints] == expected
        # Resuming after a checkpoint sends the rest, once, and reads nothing before it.
        for checkpoint in checkpoints:
            store.read_after.clear()
            resumed = history.subscribe(EventQuery(types=types, after_position=checkpoint.position))
            again, _ = await until_caught_up(resumed)
            await resumed.aclose()  # type: ignore[attr-defined]
            assert [e for i in again if not isinstance(i, Checkpoint) for e in i] == [
                e for e in wanted if e.position > checkpoint.position
            ]
            assert min(store.read_after) == checkpoint.position


async def next_item(subscription: AsyncIterator[Item]) -> Item:
    return await asyncio.wait_for(anext(subscription), 5)


async def test_a_live_filtered_subscription_sends_a_checkpoint_when_the_log_moved_on() -> None:
    store = InMemoryEventStore()
    before = asyncio.all_tasks()
    history = HistoryService(store, checkpoint_after=0.05)
    subscription = history.subscribe(EventQuery(types=frozenset({"Wanted"})))
    assert await next_item(subscription) == CaughtUp(position=START_POSITION)
    await store.append("conversation-a", [event("Other") for _ in range(20)], expected_version=None)
    last_other = (await store.read_all()).events[-1]
    checkpoint = await next_item(subscription)
    assert checkpoint == Checkpoint(position=last_other.position)
    await store.append("conversation-b", [event("Wanted")], expected_version=None)
    wanted = (await store.read_all()).events[-1]
    batch = await next_item(subscription)
    assert isinstance(batch, tuple)
    assert [e.event_id for e in batch] == [wanted.event_id]
    # Events of streams that are not conversations move the checkpoint all
    # the same (the log read passes them).
    await store.append("other", [event("Wanted")], expected_version=None)
    assert await next_item(subscription) == Checkpoint(
        position=(await store.read_all()).events[-1].position
    )
    # Nothing recorded since: nothing is sent (several idle periods pass).
    waiting = asyncio.ensure_future(anext(subscription))
    done, _ = await asyncio.wait({waiting}, timeout=0.5)
    assert not done
    waiting.cancel()
    await asyncio.wait({waiting})
    await subscription.aclose()  # type: ignore[attr-defined]
    assert asyncio.all_tasks() <= before  # the read-ahead task is gone


async def test_a_live_checkpoint_never_passes_an_event_not_yet_sent() -> None:
    """The live subscription lags: the log read finds a selected event it has not sent yet."""

    class Lagging(InMemoryEventStore):
        """Its live subscription delivers nothing until `go` is set."""

        go = asyncio.Event()

        async def subscribe_all(self, **kwargs: Any) -> AsyncGenerator[RecordedEvent, None]:
            await self.go.wait()
            async for e in super().subscribe_all(**kwargs):
                yield e

    store = Lagging()
    history = HistoryService(store, checkpoint_after=0.05)
    with mock.patch.object(history_service, "_READ_BATCH", 2):
        subscription = history.subscribe(EventQuery(types=frozenset({"Wanted"})))
        assert isinstance(await next_item(subscription), CaughtUp)
        kinds = ["Other", "Other", "Other", "Wanted", "Other", "Other", "Other"]
        await store.append("conversation-a", [event(k) for k in kinds], expected_version=None)
        log = (await store.read_all()).events
        # The read passes the page [0, 1]; the next, [2, 3], holds the
        # wanted event, which the live subscription has not sent: the
        # checkpoint stops before that page.
        assert await next_item(subscription) == Checkpoint(position=log[1].position)
        store.go.set()
        batch = await next_item(subscription)
        assert isinstance(batch, tuple)
        assert [e.event_id for e in batch] == [log[3].event_id]
        assert await next_item(subscription) == Checkpoint(position=log[-1].position)
        await subscription.aclose()  # type: ignore[attr-defined]


# -- over gRPC -----------------------------------------------------------------------


@pytest.fixture
async def stub(app: ConversationApplication) -> AsyncIterator[Stub]:
    async with conversation_stub(app) as served:
        yield served


async def all_visible(store: EventStore, count: int) -> None:
    """Waits until reads of all streams see `count` events (they lag on a shared server)."""
    async with asyncio.timeout(30):
        while len((await store.read_all(limit=count + 1)).events) < count:  # noqa: ASYNC110 (polling the database)
            await asyncio.sleep(0.05)


def kind(response: spb.SubscribeEventsResponse) -> str:
    if response.events:
        assert not response.HasField("caught_up")
        assert not response.HasField("checkpoint")
        return "events"
    assert response.HasField("caught_up") != response.HasField("checkpoint")
    return "caught_up" if response.HasField("caught_up") else "checkpoint"


async def until_caught_up_rpc(call: Any) -> list[spb.SubscribeEventsResponse]:
    got = []
    async for response in call:
        got.append(response)
        if response.HasField("caught_up"):
            return got
    raise AssertionError("the subscription ended")


#: The type the gRPC subscriptions below filter on: a real one (an unknown name is refused).
WANTED = "ContextCompacted"


async def test_a_sparse_filtered_subscription_gets_checkpoints_and_resumes_from_them(
    stub: Stub, app: ConversationApplication
) -> None:
    # 1,500 events of no interest, the one wanted, 1,500 more: store pages
    # of 1,000 are read, so three checkpoints (the last page, one event,
    # ends the catch-up).
    log = [event("Other") for _ in range(1500)] + [event(WANTED)]
    log += [event("Other") for _ in range(1500)]
    await app.store.append("conversation-sparse", log, expected_version=NO_STREAM)
    await all_visible(app.store, len(log))
    request = spb.SubscribeEventsRequest(event_types=[WANTED])
    call = stub.SubscribeEvents(request)
    messages = await until_caught_up_rpc(call)
    call.cancel()
    assert [kind(m) for m in messages] == [
        "checkpoint",
        "events",
        "checkpoint",
        "checkpoint",
        "caught_up",
    ]
    stored = (await app.store.read_all(limit=len(log))).events
    assert [e.event_id for e in messages[1].events] == [str(log[1500].event_id)]
    positions = [str(stored[i].position) for i in (999, 1999, 2999)]
    assert [m.checkpoint.position for m in messages if m.HasField("checkpoint")] == positions
    assert messages[-1].caught_up.position == str(stored[-1].position)
    # From the checkpoint before it: the wanted event, once.
    first = stub.SubscribeEvents(
        spb.SubscribeEventsRequest(event_types=[WANTED], after_position=positions[0])
    )
    resumed = await until_caught_up_rpc(first)
    first.cancel()
    assert [e.event_id for m in resumed for e in m.events] == [str(log[1500].event_id)]
    # From the one after it: nothing before the live events.
    second = stub.SubscribeEvents(
        spb.SubscribeEventsRequest(event_types=[WANTED], after_position=positions[1])
    )
    resumed = await until_caught_up_rpc(second)
    assert [kind(m) for m in resumed] == ["checkpoint", "caught_up"]
    later = event(WANTED)
    await app.store.append("conversation-sparse", [later], expected_version=len(log))
    arrived = await asyncio.wait_for(anext(aiter(second)), 30)
    second.cancel()
    assert [e.event_id for e in arrived.events] == [str(later.event_id)]


async def test_a_live_subscription_over_grpc_gets_a_checkpoint(
    app: ConversationApplication, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history_service, "CHECKPOINT_AFTER_SECONDS", 0.1)
    async with conversation_stub(app) as stub:
        call = stub.SubscribeEvents(spb.SubscribeEventsRequest(event_types=[WANTED]))
        await until_caught_up_rpc(call)
        others = [event("Other") for _ in range(50)]
        await app.store.append("conversation-busy", others, expected_version=NO_STREAM)
        await all_visible(app.store, len(others))
        last = (await app.store.read_all(limit=100)).events[-1]
        response = await asyncio.wait_for(anext(aiter(call)), 30)
        call.cancel()
        assert kind(response) == "checkpoint"
        assert response.checkpoint.position == str(last.position)
