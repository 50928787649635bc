"""Per-tenant limits: one tenant's burst is refused with retry information; others go on.

No timing assertions: "keep their latency" is shown as "admitted and run to
the end while the bursting tenant's turns hold every slot it may have".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from conversation_helpers import ServedApp, error_reason, scripted_worker_server, served
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from turnlog.api.limits import RateLimit
from turnlog.conversation.application import ConversationApplication, ServiceDefaults
from turnlog.storage import PostgresEventStore
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.client import EngineClient

RUNNING_LIMIT = 2
SCRIPT = {
    "model": "scripted-test",
    "replies": [{"match": "slow story", "text": "Once upon a time " * 40, "token_delay_ms": 25}],
    "default": {"text": "Hello there."},
}


def _retry_delay_s(error: grpc.aio.AioRpcError) -> float:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return float(info.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError("no RetryInfo")


@pytest.fixture
async def limited(store: PostgresEventStore) -> AsyncIterator[ServedApp]:
    """A service whose tenants may run 2 turns at once and make 5 calls at once, 1 a second after."""
    async with (
        scripted_worker_server(SCRIPT) as worker,
        EngineClient([worker.target]) as engine,
    ):
        app = ConversationApplication(
            store, engine, defaults=ServiceDefaults(tenant_max_running_turns=RUNNING_LIMIT)
        )
        try:
            async with served(app, rate_limit=RateLimit(rate=1.0, burst=40)) as serving:
                yield serving
        finally:
            await app.shutdown()


async def _conversation(stub: sgrpc.ConversationServiceStub, request_id: str) -> str:
    created = await stub.CreateConversation(spb.CreateConversationRequest(request_id=request_id))
    return created.conversation.name


def _slow_turn(stub: sgrpc.ConversationServiceStub, name: str) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
    return stub.StreamTurn(
        spb.StreamTurnRequest(
            start=spb.TurnInput(conversation=name, content="slow story", request_id="burst")
        ),
        timeout=30,
    )


async def test_a_tenant_over_its_running_turns_is_refused_and_another_tenant_runs(
    limited: ServedApp,
) -> None:
    async with limited.stub("tenant-a") as a, limited.stub("tenant-b") as b:
        names = [await _conversation(a, f"a{i}") for i in range(5)]
        other = await _conversation(b, "b0")
        running = [_slow_turn(a, name) for name in names[:RUNNING_LIMIT]]
        for call in running:  # both started: their first event is here
            assert (await call.read()).event.HasField("turn_started")
        refused = []
        for name in names[RUNNING_LIMIT:]:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _slow_turn(a, name).read()
            refused.append(raised.value)
        assert {(e.code(), error_reason(e)) for e in refused} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_LIMIT_EXCEEDED")
        }
        assert all(_retry_delay_s(e) > 0 for e in refused)
        # Tenant B's turn is admitted and ends while A's still hold their slots.
        sent = await b.SendMessage(
            spb.SendMessageRequest(input=spb.TurnInput(conversation=other, content="hi")),
            timeout=30,
        )
        assert sent.turn.status == pb.TURN_STATUS_COMPLETED
        for call in running:
            assert not call.done()
        # The refused turns left nothing in their conversations but their creation.
        for name in names[RUNNING_LIMIT:]:
            got = await a.GetConversation(spb.GetConversationRequest(name=name))
            assert list(got.conversation.turns) == []
        # A's slots free again once its turns end (they run on without a watcher).
        for call in running:
            call.cancel()
        async with asyncio.timeout(30):
            while True:
                try:
                    sent = await a.SendMessage(
                        spb.SendMessageRequest(
                            input=spb.TurnInput(conversation=names[-1], content="hi")
                        )
                    )
                    break
                except grpc.aio.AioRpcError as e:
                    if error_reason(e) != "TENANT_LIMIT_EXCEEDED":
                        raise
                    await asyncio.sleep(0.2)
        assert sent.turn.status == pb.TURN_STATUS_COMPLETED


async def test_a_tenant_over_its_request_rate_is_refused_with_retry_info(
    store: PostgresEventStore,
) -> None:
    app = ConversationApplication(store, None)
    try:
        async with (
            served(app, rate_limit=RateLimit(rate=0.5, burst=3)) as serving,
            serving.stub("tenant-a") as a,
            serving.stub("tenant-b") as b,
        ):
            for _ in range(3):
                await a.ListConversations(spb.ListConversationsRequest())
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await a.ListConversations(spb.ListConversationsRequest())
            assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_reason(raised.value) == "TENANT_LIMIT_EXCEEDED"
            assert 0 < _retry_delay_s(raised.value) <= 2.0
            # Another tenant's bucket is its own.
            for _ in range(3):
                await b.ListConversations(spb.ListConversationsRequest())
    finally:
        await app.shutdown()
