# ruff: noqa: F811  (pytest fixtures imported from tests/conversation/conftest.py)
"""History RPCs over real gRPC on loopback and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turnlog.conversation.application import ConversationApplication
from turnlog.conversation.servicer import ConversationServicer
from turnlog.domain.state import fold
from turnlog.history import jsonl
from turnlog.history.audit import decode_event
from turnlog.history.service import normalized
from turnlog.storage import PostgresEventStore
from turnlog.storage.migrations import migrate
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb

Stub = sgrpc.ConversationServiceStub


async def serve(application: ConversationApplication) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    sgrpc.add_ConversationServiceServicer_to_server(ConversationServicer(application), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
async def stub(app: ConversationApplication) -> AsyncIterator[Stub]:
    server, port = await serve(app)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Stub(channel)
    await server.stop(0)


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
    for version in range(1, latest + 1):
        source = await app.load(cid, version=version)
        fork = await stub.ForkConversation(
            spb.ForkConversationRequest(name=name, version=version, request_id=f"f{version}")
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
            spb.ForkConversationRequest(name=name, version=version, request_id=f"f{version}")
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
    server, port = await serve(other_app)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            other = Stub(channel)
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
        await server.stop(0)
        await other_app.shutdown()
        await other_store.close()


async def test_the_fold_is_deterministic(stub: Stub, app: ConversationApplication) -> None:
    name = await conversation(stub, ["what is 6*7", "leak a secret", "hi"])
    cid = name.removeprefix("conversations/")
    events = jsonl.read_jsonl((await export(stub, name)).splitlines())
    states = [fold(decode_event(e.to_recorded()) for e in events) for _ in range(3)]
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


async def take(call: object, count: int) -> list[spb.SubscribeEventsResponse]:
    got: list[spb.SubscribeEventsResponse] = []
    async for response in call:  # type: ignore[attr-defined]
        got.append(response)
        if len(got) == count:
            break
    return got


@pytest.mark.parametrize("scope", ["one", "all"])
async def test_a_cut_subscription_resumes_without_loss_or_duplicates(
    stub: Stub, scope: str
) -> None:
    name = await conversation(stub, ["hi", "what is 6*7"])
    request = spb.SubscribeEventsRequest(conversation=name if scope == "one" else "")
    first_call = stub.SubscribeEvents(request)
    first = await asyncio.wait_for(take(first_call, 5), 10)
    first_call.cancel()  # cut mid-way through the catch-up
    assert all(r.WhichOneof("kind") == "event" for r in first)
    await stub.SendMessage(
        spb.SendMessageRequest(input=spb.TurnInput(conversation=name, content="hi", request_id="z"))
    )
    last = first[-1].event
    if scope == "one":
        resume = spb.SubscribeEventsRequest(conversation=name, after_version=last.version)
    else:
        resume = spb.SubscribeEventsRequest(after_position=last.position)
    read = await stub.ReadEvents(spb.ReadEventsRequest(conversation=name, page_size=1000))
    total = len(read.events)
    second_call = stub.SubscribeEvents(resume)
    rest: list[spb.SubscribeEventsResponse] = []
    async for response in second_call:
        if response.WhichOneof("kind") == "caught_up":
            continue
        rest.append(response)
        if len(rest) == total - 5:
            break
    second_call.cancel()
    seen = [r.event.event_id for r in first + rest]
    assert seen == [e.event_id for e in read.events]
