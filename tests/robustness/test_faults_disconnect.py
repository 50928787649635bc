"""A `Converse` client that disconnects mid-stream: its turn is cancelled, in the worker and in the log.

A Converse session is the client's side of its turns (client-side tool
results and cancels come only over it), so a session that breaks ends the
turns it started that still run: the worker's request is aborted within a
second (the issue's promise) and `TurnCancelled` is recorded. A StreamTurn
client that disconnects only stops watching: its turn runs on and can be
resumed (tests/conversation/test_grpc.py). An explicit CancelTurn over
Converse: tests/conversation/test_service_faults.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from conversation_helpers import scripted_worker_server, served

from turnlog.auth.channel import credentialed_channel
from turnlog.conversation.application import ConversationApplication, ServiceDefaults
from turnlog.engine.v1 import engine_pb2, engine_pb2_grpc
from turnlog.eventlog import stream_id
from turnlog.storage import PostgresEventStore
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.client import EngineClient

pytestmark = pytest.mark.timeout(60)

# 480 one-byte tokens 25 ms apart: 12 s on its own, far beyond every wait here.
SCRIPT: dict[str, Any] = {
    "model": "scripted-disconnect",
    "replies": [{"match": "endless story", "text": "word " * 96, "token_delay_ms": 25}],
    "default": {"text": "Fine."},
}
#: The issue's promise: the worker's request is aborted within a second.
ABORT_PROMISE_S = 1.0


class Served:
    def __init__(
        self, stub: sgrpc.ConversationServiceStub, engine: engine_pb2_grpc.EngineServiceStub
    ) -> None:
        self.stub = stub
        self.engine = engine

    async def running_requests(self) -> int:
        load = await self.engine.GetLoad(engine_pb2.GetLoadRequest(), timeout=5)
        return int(load.running_requests + load.waiting_requests)


@pytest.fixture
async def service(store: PostgresEventStore) -> AsyncIterator[Served]:
    async with (
        scripted_worker_server(SCRIPT) as worker,
        EngineClient([worker.target]) as engine,
    ):
        app = ConversationApplication(
            store, engine, defaults=ServiceDefaults(text_flush_interval_s=0.1)
        )
        try:
            async with (
                served(app) as serving,
                credentialed_channel(serving.address, serving.token()) as channel,
                grpc.aio.insecure_channel(worker.target) as worker_channel,
            ):
                yield Served(
                    sgrpc.ConversationServiceStub(channel),
                    engine_pb2_grpc.EngineServiceStub(worker_channel),
                )
        finally:
            await app.shutdown()


async def test_a_converse_client_that_disconnects_mid_stream_cancels_its_turn(
    service: Served, store: PostgresEventStore
) -> None:
    created = await service.stub.CreateConversation(
        spb.CreateConversationRequest(request_id="c"), timeout=10
    )
    name = created.conversation.name
    call = service.stub.Converse(timeout=60)
    await call.write(
        spb.ConverseRequest(
            user_message=spb.TurnInput(conversation=name, content="endless story", request_id="1")
        )
    )
    deltas = 0
    async for response in call:
        if response.event.HasField("text_delta"):
            deltas += 1
        if deltas == 5:
            break
    assert deltas == 5
    assert await service.running_requests() == 1
    call.cancel()  # the client goes away: no CancelTurn, no half-close
    disconnected = time.monotonic()
    while (running := await service.running_requests()) != 0:
        assert time.monotonic() - disconnected < ABORT_PROMISE_S, f"{running} still running"
        await asyncio.sleep(0.01)
    aborted_s = time.monotonic() - disconnected

    cid = name.removeprefix("conversations/")
    deadline = time.monotonic() + 10
    while (types := [e.type for e in await store.read_stream(stream_id(cid))])[-1] != (
        "TurnCancelled"
    ):
        assert time.monotonic() < deadline, f"no TurnCancelled recorded: {types}"
        await asyncio.sleep(0.05)
    recorded_s = time.monotonic() - disconnected
    events = await store.read_stream(stream_id(cid))
    assert events[-1].data["reason"] == "the client disconnected"
    assert "GenerationCompleted" not in types
    assert (await store.verify(stream_id(cid))).ok
    print(
        f"\nFAULT Converse client disconnected mid-stream: worker request aborted in "
        f"{aborted_s * 1000:.0f} ms (promise: {ABORT_PROMISE_S:.0f} s), TurnCancelled "
        f"recorded in {recorded_s * 1000:.0f} ms"
    )
