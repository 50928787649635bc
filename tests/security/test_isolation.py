"""Two tenants side by side: every read path of each returns its own data only.

Each tenant creates conversations, runs turns concurrently with the other,
forks and imports; then every read RPC is asked by each. An all-conversation
subscription of A, running while both write, sees exactly A's events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from conversation_helpers import ServedApp

from turnlog.auth.principal import Scope
from turnlog.history.service import ADMIN_READS_STREAM
from turnlog.storage import PostgresEventStore
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb

TENANTS = ("tenant-a", "tenant-b")


async def _populate(stub: sgrpc.ConversationServiceStub, tenant: str) -> set[str]:
    """Two conversations with turns, a fork, and a re-import; the conversation ids."""
    names = []
    for i in range(2):
        # The same request ids in both tenants: each must get its own conversation.
        created = await stub.CreateConversation(
            spb.CreateConversationRequest(request_id=f"create-{i}", labels={"owner": tenant})
        )
        names.append(created.conversation.name)
    await asyncio.gather(
        *(
            stub.SendMessage(
                spb.SendMessageRequest(
                    input=spb.TurnInput(conversation=name, content="hi", request_id="turn-1")
                )
            )
            for name in names
        )
    )
    fork = await stub.ForkConversation(
        spb.ForkConversationRequest(name=names[0], request_id="fork-1")
    )
    names.append(fork.conversation.name)
    export = b"".join(
        [
            c.data
            async for c in stub.ExportConversation(
                spb.ExportConversationRequest(name=names[1], format=hpb.EXPORT_FORMAT_JSONL)
            )
        ]
    )
    imported = await stub.ImportConversation(_one(spb.ImportConversationRequest(data=export)))
    assert imported.conversation.name == names[1]
    return {name.removeprefix("conversations/") for name in names}


async def _one(
    message: spb.ImportConversationRequest,
) -> AsyncIterator[spb.ImportConversationRequest]:
    yield message


async def _all_events(stub: sgrpc.ConversationServiceStub) -> list[hpb.LogEvent]:
    events: list[hpb.LogEvent] = []
    token = ""
    while True:
        page = await stub.ReadEvents(spb.ReadEventsRequest(page_size=7, page_token=token))
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


def _conversation(event: hpb.LogEvent) -> str:
    return event.stream_id.removeprefix("conversation-")


async def test_each_tenant_reads_only_its_own(
    service: ServedApp, store: PostgresEventStore
) -> None:
    own: dict[str, set[str]] = {}
    async with service.stub(TENANTS[0]) as a, service.stub(TENANTS[1]) as b:
        stubs = {TENANTS[0]: a, TENANTS[1]: b}
        populated = await asyncio.gather(*(_populate(stubs[t], t) for t in TENANTS))
        own = dict(zip(TENANTS, populated, strict=True))
        assert not own[TENANTS[0]] & own[TENANTS[1]]  # same request ids, separate resources
        for tenant, stub in stubs.items():
            other = own[TENANTS[1] if tenant == TENANTS[0] else TENANTS[0]]
            listed = await stub.ListConversations(spb.ListConversationsRequest(page_size=100))
            assert {c.name.removeprefix("conversations/") for c in listed.conversations} == own[
                tenant
            ]
            events = await _all_events(stub)
            assert {_conversation(e) for e in events} == own[tenant]
            # Nothing skipped: the all-conversation read holds each stream whole.
            for cid in own[tenant]:
                versions = [e.version for e in events if _conversation(e) == cid]
                assert versions == list(range(1, len(versions) + 1))
                stream = await store.read_stream(f"conversation-{cid}")
                assert len(versions) == len(stream)
            for cid in other:
                name = f"conversations/{cid}"
                for call in (
                    stub.GetConversation(spb.GetConversationRequest(name=name)),
                    stub.ReadEvents(spb.ReadEventsRequest(conversation=name)),
                    stub.VerifyConversation(spb.VerifyConversationRequest(name=name)),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await call
                    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


async def test_an_all_conversation_subscription_sees_exactly_its_tenants_events(
    service: ServedApp, store: PostgresEventStore
) -> None:
    async with service.stub(TENANTS[0]) as a, service.stub(TENANTS[1]) as b:
        before_a = await _populate(a, TENANTS[0])
        subscription = a.SubscribeEvents(spb.SubscribeEventsRequest())
        seen: list[hpb.LogEvent] = []
        while True:
            message = await asyncio.wait_for(subscription.read(), 10)
            if message.HasField("caught_up"):
                break
            seen.extend(message.events)
        # Both tenants write while A's subscription runs.
        writes_b = asyncio.create_task(_populate(b, TENANTS[1]))
        more_a = await a.CreateConversation(spb.CreateConversationRequest(request_id="late"))
        for i in range(3):
            await a.SendMessage(
                spb.SendMessageRequest(
                    input=spb.TurnInput(
                        conversation=more_a.conversation.name, content="hi", request_id=f"t{i}"
                    )
                )
            )
        await writes_b
        own = before_a | {more_a.conversation.name.removeprefix("conversations/")}
        expected = sum([await store.stream_version(f"conversation-{cid}") for cid in own])
        while len(seen) < expected:
            message = await asyncio.wait_for(subscription.read(), 10)
            seen.extend(message.events)
        subscription.cancel()
        assert {_conversation(e) for e in seen} == own  # none of B's
        for cid in own:  # none of A's skipped or repeated
            versions = [e.version for e in seen if _conversation(e) == cid]
            assert versions == list(range(1, await store.stream_version(f"conversation-{cid}") + 1))


async def test_an_administrator_reads_across_tenants_and_each_read_is_recorded(
    service: ServedApp, store: PostgresEventStore
) -> None:
    async with service.stub(TENANTS[0]) as a:
        mine = await _populate(a, TENANTS[0])
    async with service.stub("operations", [Scope.ADMIN]) as admin:
        listed = await admin.ListConversations(spb.ListConversationsRequest(page_size=100))
        assert mine <= {c.name.removeprefix("conversations/") for c in listed.conversations}
        one = sorted(mine)[0]
        got = await admin.GetConversation(spb.GetConversationRequest(name=f"conversations/{one}"))
        assert got.conversation.name == f"conversations/{one}"
        # Writes never cross tenants, not even an administrator's.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await admin.ArchiveConversation(
                spb.ArchiveConversationRequest(name=f"conversations/{one}")
            )
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    recorded = await store.read_stream(ADMIN_READS_STREAM)
    assert [(e.data["method"], e.data["target"]) for e in recorded] == [
        ("ListConversations", ""),
        ("GetConversation", f"conversations/{one}"),
    ]
    assert {e.metadata.tenant for e in recorded} == {"operations"}
