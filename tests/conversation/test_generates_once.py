"""A request id generates once: counted at the worker, with a clock that ticks.

Counting `GenerationStarted` in the log proves nothing here: with a fixed
clock and derived ids, a second run of a turn writes byte-identical batches
that the store accepts as idempotent retries. So the worker counts the
generation requests it receives, and every event gets its own timestamp.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conversation_helpers import conversation_stub, engine_server

from turnlog.conversation.application import ConversationApplication, CreateConversation, TurnInput
from turnlog.domain.state import TurnStatus
from turnlog.engine.v1 import engine_pb2
from turnlog.eventlog import stream_id
from turnlog.storage import PostgresEventStore
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.worker.backend import GenerationEvent, RequestProgress
from turnlog.worker.scripted import Script, ScriptedEngine

pytestmark = pytest.mark.timeout(60)

# Long enough (~0.4 s) that a request cancelled early cannot have ended by itself.
REPLY = "tick " * 20
SCRIPT: dict[str, Any] = {
    "model": "scripted-test",
    "replies": [],
    "default": {"text": REPLY, "token_delay_ms": 20},
}


class CountingEngine(ScriptedEngine):
    """The scripted backend, counting the generation requests it is given and how each ended."""

    def __init__(self, script: Script) -> None:
        super().__init__(script)
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def generate(
        self,
        start: engine_pb2.StartGeneration,
        *,
        engine_request_id: str,
        progress: RequestProgress,
    ) -> AsyncIterator[GenerationEvent]:
        self.started += 1
        self._idle.clear()
        ended = False
        try:
            async for event in super().generate(
                start, engine_request_id=engine_request_id, progress=progress
            ):
                yield event
            ended = True
        finally:
            if ended:
                self.finished += 1
            else:
                self.cancelled += 1
            if self.finished + self.cancelled == self.started:
                self._idle.set()

    async def settled(self, timeout_s: float = 2.0) -> None:
        """Waits until every request it got has ended (finished or cancelled)."""
        async with asyncio.timeout(timeout_s):
            await self._idle.wait()


class CountingWorker:
    def __init__(self, engine: CountingEngine, target: str) -> None:
        self.engine = engine
        self.target = target


@pytest.fixture
async def worker() -> AsyncIterator[CountingWorker]:
    """Overrides conftest's scripted worker with one that counts requests."""
    engine = CountingEngine(Script.from_json(SCRIPT))
    async with engine_server(engine) as target:
        yield CountingWorker(engine, target)


def ticking_clock() -> Callable[[], int]:
    """Microseconds that move on by 1 ms at every reading: no two events share a time."""
    ticks = itertools.count(1_700_000_000_000_000, 1000)
    return lambda: next(ticks)


@pytest.fixture
async def ticking(
    make_app: Callable[..., ConversationApplication],
) -> AsyncIterator[Callable[[], ConversationApplication]]:
    """Makes applications (replicas) with a ticking clock; shuts them down after the test."""
    made: list[ConversationApplication] = []

    def make() -> ConversationApplication:
        app = make_app(clock=ticking_clock())
        made.append(app)
        return app

    yield make
    for app in made:
        await app.shutdown()


async def _event_types(store: PostgresEventStore, cid: str) -> list[str]:
    return [e.type for e in await store.read_stream(stream_id(cid))]


async def test_a_sequential_retry_generates_once(
    ticking: Callable[[], ConversationApplication],
    worker: CountingWorker,
    store: PostgresEventStore,
) -> None:
    app = ticking()
    cid = (await app.create(CreateConversation(request_id="c"))).conversation_id
    command = TurnInput(conversation_id=cid, content="hi", request_id="same")
    first = await app.send(command)
    again = await app.send(command)
    assert first.ended.turn.status is TurnStatus.COMPLETED
    assert again.ended.turn.turn_id == first.ended.turn.turn_id
    assert again.updates == first.updates
    # A retry on a replica that has never seen the conversation reads the log.
    other = await ticking().send(command)
    assert other.ended.turn.turn_id == first.ended.turn.turn_id
    await worker.engine.settled()
    assert worker.engine.started == 1
    assert (await _event_types(store, cid)).count("TurnStarted") == 1


async def test_concurrent_sends_of_one_request_generate_once(
    ticking: Callable[[], ConversationApplication],
    worker: CountingWorker,
    store: PostgresEventStore,
) -> None:
    app = ticking()
    cid = (await app.create(CreateConversation(request_id="c"))).conversation_id
    command = TurnInput(conversation_id=cid, content="hi", request_id="same")

    async def streamed() -> str:
        turn_id = await app.start_turn(command)
        updates = [u async for u in app.watch(cid, turn_id)]
        assert updates[-1].is_last
        return turn_id

    first, second, third = await asyncio.gather(app.send(command), app.send(command), streamed())
    assert first.ended.turn.status is TurnStatus.COMPLETED
    assert first.ended.turn.turn_id == second.ended.turn.turn_id == third
    assert first.assistant_message is not None
    assert first.assistant_message.text == REPLY
    await worker.engine.settled()
    # Not one request started and then cancelled: the worker got exactly one.
    assert worker.engine.started == 1
    types = await _event_types(store, cid)
    assert types.count("TurnStarted") == 1
    assert types.count("GenerationStarted") == 1


async def test_concurrent_sends_on_two_replicas_generate_to_the_end_once(
    ticking: Callable[[], ConversationApplication],
    worker: CountingWorker,
    store: PostgresEventStore,
) -> None:
    a, b = ticking(), ticking()
    cid = (await a.create(CreateConversation(request_id="c"))).conversation_id
    await b.load(cid)  # both replicas start from a warm state cache
    command = TurnInput(conversation_id=cid, content="hi", request_id="same")
    on_a, on_b = await asyncio.gather(a.send(command), b.send(command))
    assert on_a.ended.turn.turn_id == on_b.ended.turn.turn_id
    assert on_a.ended.turn.status is TurnStatus.COMPLETED
    await worker.engine.settled()
    # The log decides between replicas: one TurnStarted commits. The loser may
    # have sent its first request before (the warm-start fast path); it is
    # cancelled as soon as its TurnStarted is refused, and never runs on.
    assert worker.engine.finished == 1
    assert worker.engine.started == 1 + worker.engine.cancelled
    assert worker.engine.started <= 2
    types = await _event_types(store, cid)
    assert types.count("TurnStarted") == 1
    assert types.count("GenerationStarted") == 1


async def test_concurrent_send_message_calls_over_grpc_generate_once(
    ticking: Callable[[], ConversationApplication], worker: CountingWorker
) -> None:
    app = ticking()
    async with conversation_stub(app) as stub:
        created = await stub.CreateConversation(spb.CreateConversationRequest(request_id="c"))
        request = spb.SendMessageRequest(
            input=spb.TurnInput(
                conversation=created.conversation.name, content="hi", request_id="same"
            )
        )
        replies = await asyncio.gather(*(stub.SendMessage(request) for _ in range(3)))
        again = await stub.SendMessage(request)
    assert {r.turn.turn_id for r in [*replies, again]} == {again.turn.turn_id}
    assert again.turn.status == pb.TURN_STATUS_COMPLETED
    await worker.engine.settled()
    assert worker.engine.started == 1
