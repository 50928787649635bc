# ruff: noqa: F811  (pytest fixtures imported from tests/conversation/conftest.py)
"""History RPCs over real gRPC on loopback and a real PostgreSQL server.

Also, in memory, the paging and batching rules of `HistoryService` under any caps.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
import psycopg
import pytest
from conversation.conftest import (  # noqa: F401 (fixtures)
    FIXED_NOW_US,
    app,
    engine,
    make_app,
    worker,
)
from conversation_helpers import conversation_stub
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turnlog import errors
from turnlog.api.messages import log_event
from turnlog.conversation.application import ConversationApplication
from turnlog.domain import codec
from turnlog.domain.state import fold
from turnlog.history import jsonl
from turnlog.history.service import (
    CaughtUp,
    EventQuery,
    HistoryService,
    event_size,
    normalized,
)
from turnlog.storage import (
    NO_STREAM,
    InMemoryEventStore,
    NewEvent,
    PostgresEventStore,
    RecordedEvent,
)
from turnlog.storage.migrations import migrate
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb

Stub = sgrpc.ConversationServiceStub


@pytest.fixture
async def stub(app: ConversationApplication) -> AsyncIterator[Stub]:
    async with conversation_stub(app) as served:
        yield served


async def conversation(stub: Stub, prompts: list[str]) -> str:
    created = await stub.CreateConversation(
        spb.CreateConversationRequest(request_id=str(uuid.uuid4()), system_prompt="Be brief.")
    )
    name = created.conversation.name
    for i, prompt in enumerate(prompts):
        await stub.SendMessage(
            spb.SendMessageRequest(
                input=spb.TurnInput(conversation=name, content=prompt, request_id=f"r{i}")
            )
        )
    return name


async def export(stub: Stub, name: str) -> bytes:
    request = spb.ExportConversationRequest(name=name, format=hpb.EXPORT_FORMAT_JSONL)
    return b"".join([r.data async for r in stub.ExportConversation(request)])


async def import_file(stub: Stub, data: bytes) -> spb.ImportConversationResponse:
    async def parts() -> AsyncIterator[spb.ImportConversationRequest]:
        for start in range(0, len(data), 1000):
            yield spb.ImportConversationRequest(data=data[start : start + 1000])

    response: spb.ImportConversationResponse = await stub.ImportConversation(parts())
    return response


PROMPTS = st.lists(
    st.sampled_from(["hi", "what is 6*7", "the answer is", "leak a secret", "fail early"]),
    min_size=1,
    max_size=3,
)


@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prompts=PROMPTS)
async def test_a_fork_at_every_version_rebuilds_that_prefix(
    stub: Stub,
    app: ConversationApplication,
    prompts: list[str],
) -> None:
    name = await conversation(stub, prompts)
    cid = name.removeprefix("conversations/")
    latest = (await app.load(cid)).version
    # Request ids name one fork each (a reuse for another source is refused).
    for version in range(1, latest + 1):
        source = await app.load(cid, version=version)
        fork = await stub.ForkConversation(
            spb.ForkConversationRequest(name=name, version=version, request_id=f"{cid}-f{version}")
        )
        fork_id = fork.conversation.name.removeprefix("conversations/")
        prefix = await app.load(fork_id, version=fork.prefix_version)
        offset = fork.prefix_version - version
        assert normalized(prefix, version_offset=offset) == normalized(source, version_offset=0)
        assert prefix.forked_from == (cid, version)
        assert fork.interrupted_turn_id == (source.open_turn.turn_id if source.open_turn else "")
        after = await app.load(fork_id)
        assert after.open_turn is None  # a fork can take turns at once
        verified = await stub.VerifyConversation(
            spb.VerifyConversationRequest(name=fork.conversation.name)
        )
        assert verified.intact
        again = await stub.ForkConversation(
            spb.ForkConversationRequest(name=name, version=version, request_id=f"{cid}-f{version}")
        )
        assert again.conversation.name == fork.conversation.name  # idempotent


async def test_a_fork_of_a_fork_takes_turns(stub: Stub, app: ConversationApplication) -> None:
    name = await conversation(stub, ["hi", "the answer is"])
    first = await stub.ForkConversation(spb.ForkConversationRequest(name=name, version=4))
    second = await stub.ForkConversation(
        spb.ForkConversationRequest(name=first.conversation.name, request_id="x")
    )
    assert second.conversation.fork_origin.conversation == first.conversation.name
    sent = await stub.SendMessage(
        spb.SendMessageRequest(
            input=spb.TurnInput(conversation=second.conversation.name, content="hi", request_id="n")
        )
    )
    assert sent.assistant_message.content == "Hello there."


async def test_a_fork_is_listed_under_its_own_name_and_time(stub: Stub) -> None:
    name = await conversation(stub, ["hi"])
    fork = await stub.ForkConversation(spb.ForkConversationRequest(name=name, version=1))
    listed = await stub.ListConversations(spb.ListConversationsRequest(page_size=50))
    by_name = {c.name: c for c in listed.conversations}
    assert set(by_name) == {name, fork.conversation.name}
    listed_fork = by_name[fork.conversation.name]
    assert listed_fork.fork_origin.conversation == name
    assert listed_fork.create_time.ToMicroseconds() >= by_name[name].create_time.ToMicroseconds()


@settings(
    max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prompts=PROMPTS)
async def test_export_import_export_is_byte_identical(
    stub: Stub,
    prompts: list[str],
    fresh_database_url: str,
) -> None:
    name = await conversation(stub, prompts)
    exported = await export(stub, name)
    assert all(r.ok for r in jsonl.verify_exported(exported.splitlines(keepends=True)))
    url = fresh_database_url
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("DROP SCHEMA IF EXISTS turnlog CASCADE")
    await migrate(url)
    other_store = await PostgresEventStore.open(url)
    other_app = ConversationApplication(other_store, None)
    try:
        async with conversation_stub(other_app) as other:
            imported = await import_file(other, exported)
            assert imported.conversation.name == name
            assert imported.events_already_present == 0
            assert await export(other, name) == exported
            twice = await import_file(other, exported)
            assert (twice.events_written, twice.events_already_present) == (
                0,
                imported.events_written,
            )
            assert await export(other, name) == exported
    finally:
        await other_app.shutdown()
        await other_store.close()


async def test_the_fold_is_deterministic(stub: Stub, app: ConversationApplication) -> None:
    name = await conversation(stub, ["what is 6*7", "leak a secret", "hi"])
    cid = name.removeprefix("conversations/")
    events = jsonl.read_jsonl((await export(stub, name)).splitlines())
    states = [fold(codec.decode_stored(e.to_recorded()) for e in events) for _ in range(3)]
    assert states[0] == states[1] == states[2] == await app.load(cid)


async def test_import_rejects_tampering_and_other_history(
    stub: Stub,
    app: ConversationApplication,
) -> None:
    name = await conversation(stub, ["hi"])
    sid = name.replace("conversations/", "conversation-")
    exported = await export(stub, name)
    lines = exported.splitlines(keepends=True)
    before = await stub.ReadEvents(spb.ReadEventsRequest(conversation=name, page_size=1000))
    # A longer, tampered copy: nothing of it may be written.
    tampered = b"".join([*lines[:3], lines[3].replace(b"hi", b"yo"), *lines[4:]])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(stub, tampered)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "version 3: hash mismatch" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(stub, b"".join(lines[:-1]) + b'{"format": 1}\n')
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = await stub.ReadEvents(spb.ReadEventsRequest(conversation=name, page_size=1000))
    assert after == before
    # Renaming the stream breaks every hash (the chain covers the stream id).
    renamed = exported.replace(sid.encode(), b"conversation-elsewhere")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(stub, renamed)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The same conversation, stored with another history from version 3 on.
    again = await import_file(stub, exported)
    assert again.events_written == 0
    from turnlog.storage import NewEvent

    async with await psycopg.AsyncConnection.connect(
        app.store._pool.conninfo,  # type: ignore[attr-defined]
        autocommit=True,
    ) as conn:
        await conn.execute(
            "DELETE FROM turnlog.events WHERE stream_id = %s AND stream_version >= 3", (sid,)
        )
    await app.store.append(
        sid,
        [NewEvent(event_id=uuid.uuid4(), type="ConversationArchived", data={"archived_at_us": 1})],
        expected_version=2,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(stub, exported)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "version 3" in (caught.value.details() or "")


async def test_raw_sql_edits_fail_verification_at_the_right_version(
    stub: Stub, database_url: str
) -> None:
    name = await conversation(stub, ["hi", "what is 6*7"])
    sid = name.replace("conversations/", "conversation-")
    ok = await stub.VerifyConversation(spb.VerifyConversationRequest(name=name))
    assert ok.intact
    assert ok.problem == hpb.VERIFICATION_PROBLEM_UNSPECIFIED
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE turnlog.events SET data = replace(data::text, 'hi', 'yo')::json"
            " WHERE stream_id = %s AND stream_version = 3",
            (sid,),
        )
    edited = await stub.VerifyConversation(spb.VerifyConversationRequest(name=name))
    assert (edited.intact, edited.broken_version) == (False, 3)
    assert edited.problem == hpb.VERIFICATION_PROBLEM_HASH_CHAIN
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM turnlog.events WHERE stream_id = %s AND stream_version = 2", (sid,)
        )
    deleted = await stub.VerifyConversation(spb.VerifyConversationRequest(name=name))
    # The first event that fails is version 3: its predecessor is missing.
    assert (deleted.broken_version, deleted.problem) == (
        3,
        hpb.VERIFICATION_PROBLEM_VERSION_SEQUENCE,
    )


async def test_a_chain_that_does_not_fold_fails_verification(
    stub: Stub,
    app: ConversationApplication,
) -> None:
    from turnlog.storage import NewEvent

    name = await conversation(stub, ["hi"])
    sid = name.replace("conversations/", "conversation-")
    version = await app.store.stream_version(sid)
    bogus = NewEvent(event_id=uuid.uuid4(), type="TurnCompleted", data={"turn_id": "nope"})
    await app.store.append(sid, [bogus], expected_version=version)
    report = await stub.VerifyConversation(spb.VerifyConversationRequest(name=name))
    assert (report.intact, report.broken_version, report.problem) == (
        False,
        version + 1,
        hpb.VERIFICATION_PROBLEM_FOLD,
    )


async def test_read_events_paging_covers_everything_once(stub: Stub) -> None:
    names = [await conversation(stub, ["hi", "what is 6*7"]) for _ in range(2)]
    everything = []
    token = ""
    while True:
        page = await stub.ReadEvents(spb.ReadEventsRequest(page_size=3, page_token=token))
        everything.extend(page.events)
        token = page.next_page_token
        if not token:
            break
    ids = [e.event_id for e in everything]
    assert len(ids) == len(set(ids))
    for name in names:
        mine = [(e.version, e.event_id) for e in everything if e.conversation == name]
        assert [v for v, _ in mine] == list(range(1, len(mine) + 1))
        paged, token = [], ""
        while True:
            page = await stub.ReadEvents(
                spb.ReadEventsRequest(conversation=name, page_size=2, page_token=token)
            )
            paged.extend((e.version, e.event_id) for e in page.events)
            token = page.next_page_token
            if not token:
                break
        assert paged == mine
    typed = await stub.ReadEvents(
        spb.ReadEventsRequest(event_types=["TurnCompleted"], page_size=1000)
    )
    assert [e.event_id for e in typed.events] == [
        e.event_id for e in everything if e.type == "TurnCompleted"
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ReadEvents(spb.ReadEventsRequest(page_size=2, page_token=token or "bad!"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def take(call: object, count: int) -> list[hpb.LogEvent]:
    """The first `count` events of a subscription, skipping the caught_up marker.

    The client may stop inside a message: only its first events count as seen.
    """
    got: list[hpb.LogEvent] = []
    async for response in call:  # type: ignore[attr-defined]
        assert bool(response.events) != response.HasField("caught_up")
        got.extend(response.events)
        if len(got) >= count:
            break
    return got[:count]


@pytest.mark.parametrize("scope", ["one", "all"])
async def test_a_cut_subscription_resumes_without_loss_or_duplicates(
    stub: Stub, scope: str
) -> None:
    name = await conversation(stub, ["hi", "what is 6*7"])
    request = spb.SubscribeEventsRequest(conversation=name if scope == "one" else "")
    first_call = stub.SubscribeEvents(request)
    first = await asyncio.wait_for(take(first_call, 5), 10)
    first_call.cancel()  # cut mid-way through the catch-up (inside its first message)
    await stub.SendMessage(
        spb.SendMessageRequest(input=spb.TurnInput(conversation=name, content="hi", request_id="z"))
    )
    last = first[-1]
    if scope == "one":
        resume = spb.SubscribeEventsRequest(conversation=name, after_version=last.version)
    else:
        resume = spb.SubscribeEventsRequest(after_position=last.position)
    read = await stub.ReadEvents(spb.ReadEventsRequest(conversation=name, page_size=1000))
    total = len(read.events)
    second_call = stub.SubscribeEvents(resume)
    rest: list[hpb.LogEvent] = []
    async for response in second_call:
        rest.extend(response.events)
        if len(rest) >= total - 5:
            break
    second_call.cancel()
    seen = [e.event_id for e in first + rest]
    assert seen == [e.event_id for e in read.events]


MIB = 1024 * 1024


def filler(size: int, kind: str = "Filler") -> NewEvent:
    """An event whose payload is about `size` bytes."""
    return NewEvent(event_id=uuid.uuid4(), type=kind, data={"text": "x" * size})


@pytest.mark.parametrize("scope", ["one", "all"])
async def test_a_catch_up_larger_than_a_message_comes_in_several(
    stub: Stub, app: ConversationApplication, scope: str
) -> None:
    # 1,257 events: more than one message holds (1000 events), and large
    # ones, of which only two fit in 1 MiB, and one larger than 1 MiB.
    sizes = [100] * 1200 + [400_000] * 6 + [1_500_000] + [100] * 50
    events = [filler(n) for n in sizes]
    await app.store.append("conversation-bulk", events, expected_version=NO_STREAM)
    ids = [str(e.event_id) for e in events]
    name = "conversations/bulk"
    request = spb.SubscribeEventsRequest(conversation=name if scope == "one" else "")
    call = stub.SubscribeEvents(request)
    messages: list[spb.SubscribeEventsResponse] = []
    async for response in call:
        messages.append(response)
        if response.HasField("caught_up"):
            break
    *catch_up, marker = messages
    assert not marker.events
    assert [e.event_id for m in catch_up for e in m.events] == ids  # nothing lost or repeated
    assert len(catch_up) >= 6
    assert all(1 <= len(m.events) <= 1000 for m in catch_up)
    assert max(len(m.events) for m in catch_up) == 1000
    for m in catch_up:
        assert m.ByteSize() <= MIB or len(m.events) == 1
        assert len([e for e in m.events if len(e.data_json) > 300_000]) <= 2
    (huge,) = [m for m in catch_up if any(len(e.data_json) > MIB for e in m.events)]
    assert len(huge.events) == 1
    last = catch_up[-1].events[-1]
    if scope == "one":
        assert (marker.caught_up.version, marker.caught_up.position) == (len(sizes), "")
    else:
        assert marker.caught_up.position == last.position
    # Live: events appended together arrive together.
    live = [filler(10) for _ in range(3)]
    await app.store.append("conversation-bulk", live, expected_version=len(sizes))
    arrived = await asyncio.wait_for(anext(aiter(call)), 10)
    call.cancel()
    assert [e.event_id for e in arrived.events] == [str(e.event_id) for e in live]
    # Resuming after an event inside a message gives the rest, once.
    cut = catch_up[1].events[100]
    if scope == "one":
        resume = spb.SubscribeEventsRequest(conversation=name, after_version=cut.version)
    else:
        resume = spb.SubscribeEventsRequest(after_position=cut.position)
    again = stub.SubscribeEvents(resume)
    rest: list[str] = []
    async for response in again:
        rest.extend(e.event_id for e in response.events)
        if response.HasField("caught_up"):
            break
    again.cancel()
    assert rest == [*ids, *(str(e.event_id) for e in live)][ids.index(cut.event_id) + 1 :]


async def test_read_events_pages_are_cut_at_2_mib_and_still_cover_everything_once(
    stub: Stub, app: ConversationApplication
) -> None:
    rng = random.Random(5)
    # 1,000 GenerationCompleted-like events of 512 token ids (about 3.5 MB) ...
    tokens = [
        NewEvent(
            event_id=uuid.uuid4(),
            type="GenerationCompleted",
            data={"token_ids": [rng.randrange(200_000) for _ in range(512)], "text": "ok"},
        )
        for _ in range(1000)
    ]
    await app.store.append("conversation-tokens", tokens, expected_version=NO_STREAM)
    # ... and a mix of small and large ones, one larger than the cap.
    sizes = [200, 900_000, 200, 1_200_000, 2_500_000, 200, 600_000, 600_000, 600_000, 200, 1000]
    # Filtered by type below, so the types are real ones (an unknown name is refused).
    large, small = "TextStreamed", "ToolRoundLimitReached"
    mixed = [filler(n, large if n > 500 else small) for n in sizes]
    await app.store.append("conversation-mixed", mixed, expected_version=NO_STREAM)

    def ids(events: list[NewEvent]) -> list[str]:
        return [str(e.event_id) for e in events]

    cases = [
        (spb.ReadEventsRequest(conversation="conversations/tokens"), ids(tokens)),
        (spb.ReadEventsRequest(conversation="conversations/mixed"), ids(mixed)),
        (
            spb.ReadEventsRequest(conversation="conversations/mixed", event_types=[large]),
            ids([e for e in mixed if e.type == large]),
        ),
        (spb.ReadEventsRequest(), ids(tokens + mixed)),
        (
            spb.ReadEventsRequest(event_types=[large, "GenerationCompleted"]),
            ids(tokens + [e for e in mixed if e.type == large]),
        ),
    ]
    for request, expected in cases:
        request.page_size = 1000
        pages: list[spb.ReadEventsResponse] = []
        while True:
            page = await stub.ReadEvents(request)
            pages.append(page)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        assert [e.event_id for p in pages for e in p.events] == expected  # each once, in order
        for page in pages:
            assert 1 <= len(page.events) <= 1000
            assert page.ByteSize() <= 2 * MIB + 1024 or len(page.events) == 1
        # The byte cap, not page_size, cut every page but the last.
        assert len(pages) >= 2
        assert all(len(p.events) < 1000 for p in pages)
    first_page = await stub.ReadEvents(
        spb.ReadEventsRequest(conversation="conversations/tokens", page_size=1000)
    )
    assert 500 < len(first_page.events) < 1000


STREAMS = ["conversation-a", "conversation-b", "other"]


@settings(max_examples=80, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(STREAMS), st.sampled_from("AB"), st.integers(0, 3000)),
        max_size=40,
    ),
    scope=st.sampled_from([None, "a"]),
    types=st.sampled_from([None, frozenset("A")]),
    page_size=st.integers(1, 12),
    max_bytes=st.integers(1, 6000),
    max_events=st.integers(1, 6),
)
async def test_paging_and_batching_return_every_event_once_under_any_caps(
    events: list[tuple[str, str, int]],
    scope: str | None,
    types: frozenset[str] | None,
    page_size: int,
    max_bytes: int,
    max_events: int,
) -> None:
    store = InMemoryEventStore()
    for sid, kind, size in events:
        await store.append(sid, [filler(size, kind)], expected_version=None)
    history = HistoryService(store)
    query = EventQuery(conversation_id=scope, types=types)
    wanted = [
        e.event_id
        for e in (await store.read_all()).events
        if (e.stream_id == f"conversation-{scope}" if scope else e.stream_id != "other")
        and (types is None or e.type in types)
    ]
    if scope and not any(sid == f"conversation-{scope}" for sid, _, _ in events):
        # A conversation that does not exist is not found, as another tenant's is.
        with pytest.raises(errors.NotFoundError):
            await history.read_events(query, page_size=page_size, page_token="")
        with pytest.raises(errors.NotFoundError):
            await anext(history.subscribe(query))
        return
    # ReadEvents: pages within both caps, each as full as the caps allow.
    pages = []
    token = ""
    while True:
        page = await history.read_events(
            query, page_size=page_size, page_token=token, max_bytes=max_bytes
        )
        pages.append(page.events)
        token = page.next_page_token
        if not token:
            break
    assert [e.event_id for p in pages for e in p] == wanted
    for page_events, following in itertools.pairwise(pages):
        size = sum(event_size(e) for e in page_events)
        assert 1 <= len(page_events) <= page_size
        assert size <= max_bytes or len(page_events) == 1
        if len(page_events) < page_size and following:
            assert size + event_size(following[0]) > max_bytes
    # SubscribeEvents: batches within both caps, then CaughtUp.
    batches: list[tuple[RecordedEvent, ...]] = []
    subscription = history.subscribe(query, max_events=max_events, max_bytes=max_bytes)
    async for item in subscription:
        if isinstance(item, CaughtUp):
            break
        batches.append(item)
    await subscription.aclose()  # type: ignore[attr-defined]
    assert [e.event_id for b in batches for e in b] == wanted
    for batch in batches:
        assert 1 <= len(batch) <= max_events
        size = sum(event_size(e) for e in batch)
        assert size <= max_bytes or len(batch) == 1


async def test_live_events_that_arrive_together_come_in_one_batch() -> None:
    store = InMemoryEventStore()
    history = HistoryService(store)
    before = asyncio.all_tasks()
    # The conversation must exist to be followed: its first event, then the rest live.
    await store.append("conversation-a", [filler(10)], expected_version=None)
    subscription = history.subscribe(EventQuery(conversation_id="a", after_version=1), max_events=3)

    async def batch() -> tuple[RecordedEvent, ...]:
        item = await asyncio.wait_for(anext(subscription), 5)
        assert not isinstance(item, CaughtUp)
        return item

    assert await anext(subscription) == CaughtUp(version=1)
    together = [filler(10) for _ in range(5)]
    await store.append("conversation-a", together, expected_version=None)
    first, second = await batch(), await batch()
    assert [len(first), len(second)] == [3, 2]  # cut by max_events
    assert [e.event_id for e in first + second] == [e.event_id for e in together]
    alone = filler(10)
    await store.append("conversation-a", [alone], expected_version=None)
    assert [e.event_id for e in await batch()] == [alone.event_id]
    large = [filler(400_000) for _ in range(3)]
    await store.append("conversation-a", large, expected_version=None)
    cut = [await batch(), await batch()]
    assert [len(b) for b in cut] == [2, 1]  # cut by max_bytes (1 MiB)
    assert [e.event_id for b in cut for e in b] == [e.event_id for e in large]
    await subscription.aclose()  # type: ignore[attr-defined]
    assert asyncio.all_tasks() <= before  # the read-ahead task is gone


@settings(max_examples=200, deadline=None)
@given(
    data=st.text(),
    metadata=st.text(),
    kind=st.text(min_size=1, max_size=512),
    conversation_id=st.text(min_size=1, max_size=512),
    prefixed=st.booleans(),
    big=st.booleans(),
)
def test_event_size_bounds_the_encoded_log_event(
    data: str, metadata: str, kind: str, conversation_id: str, prefixed: bool, big: bool
) -> None:
    largest = 2**63 - 1 if big else 1
    event = RecordedEvent(
        global_position=largest,
        transaction_id=largest,
        stream_id=f"conversation-{conversation_id}" if prefixed else conversation_id,
        stream_version=largest,
        event_id=uuid.uuid4(),
        type=kind,
        data_json=data,
        metadata_json=metadata,
        recorded_at=datetime.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=datetime.UTC),
        prev_hash=bytes(32),
        hash=bytes(32),
    )
    # As one of a message's repeated events: its tag and length included.
    encoded = spb.SubscribeEventsResponse(events=[log_event(event)]).ByteSize()
    assert encoded <= event_size(event) <= encoded + 512


async def test_a_live_source_error_comes_after_the_events_before_it() -> None:
    from turnlog.history.service import _arrived_together

    store = InMemoryEventStore()
    await store.append("s", [filler(10) for _ in range(2)], expected_version=None)
    recorded = (await store.read_all()).events

    async def failing() -> AsyncGenerator[RecordedEvent, None]:
        for event in recorded:
            yield event
        raise RuntimeError("connection lost")

    got: list[tuple[RecordedEvent, ...]] = []

    async def collect() -> None:
        async for batch in _arrived_together(failing(), max_events=10, max_bytes=MIB):
            got.append(batch)

    with pytest.raises(RuntimeError, match="connection lost"):
        await collect()
    assert got == [recorded]
