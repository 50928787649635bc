"""Worker affinity through the service: a conversation's turns stay on one worker.

Two in-process scripted workers count the generation requests they serve;
the application balances over both with one `EngineClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conversation_helpers import engine_server

from turnlog.conversation.application import ConversationApplication, CreateConversation, TurnInput
from turnlog.domain.state import TurnStatus
from turnlog.engine.v1 import engine_pb2
from turnlog.storage import PostgresEventStore
from turnlog.worker.backend import GenerationEvent, RequestProgress
from turnlog.worker.client import EngineClient
from turnlog.worker.scripted import Script, ScriptedEngine

pytestmark = pytest.mark.timeout(60)

SCRIPT: dict[str, Any] = {"model": "scripted-affinity", "default": {"text": "Done."}}


class CountingEngine(ScriptedEngine):
    """A scripted engine that records the last user message of each generation.

    A message ending in "(hold)" is answered only once `release` is set.
    """

    def __init__(self, release: asyncio.Event) -> None:
        super().__init__(Script.from_json(SCRIPT))
        self.served: list[str] = []
        self.started = asyncio.Event()
        self.release = release

    async def generate(
        self,
        start: engine_pb2.StartGeneration,
        *,
        engine_request_id: str,
        progress: RequestProgress,
    ) -> AsyncIterator[GenerationEvent]:
        content = start.chat.messages[-1].content
        self.served.append(content)
        self.started.set()
        if content.endswith("(hold)"):
            await self.release.wait()
        async for event in super().generate(
            start, engine_request_id=engine_request_id, progress=progress
        ):
            yield event


@contextlib.asynccontextmanager
async def counting_worker(release: asyncio.Event) -> AsyncIterator[tuple[CountingEngine, str]]:
    engine = CountingEngine(release)
    async with engine_server(engine) as target:
        yield engine, target


async def test_a_conversation_stays_on_its_worker_and_conversations_spread(
    store: PostgresEventStore,
) -> None:
    release = asyncio.Event()
    async with (
        counting_worker(release) as (one, one_target),
        counting_worker(release) as (two, two_target),
        # No load polling: the choice is affinity, else the fewest in flight
        # (ties broken round-robin, so unbound turns would alternate).
        EngineClient([one_target, two_target], load_poll_interval_s=0) as client,
    ):
        app = ConversationApplication(store, client)
        try:
            a = (await app.create(CreateConversation(request_id="a"))).conversation_id
            b = (await app.create(CreateConversation(request_id="b"))).conversation_id
            # A's first turn is in flight when B's starts: B goes to the idle worker.
            held = await app.start_turn(
                TurnInput(conversation_id=a, content="a0 (hold)", request_id="a0")
            )
            await asyncio.wait_for(
                asyncio.wait(
                    [asyncio.create_task(e.started.wait()) for e in (one, two)],
                    return_when=asyncio.FIRST_COMPLETED,
                ),
                10,
            )
            first = await app.send(TurnInput(conversation_id=b, content="b0", request_id="b0"))
            assert first.ended.turn.status is TurnStatus.COMPLETED
            release.set()
            updates = [u async for u in app.watch(a, held)]
            assert updates[-1].is_last
            # Then back-to-back turns of one conversation, then of the other,
            # then interleaved: each on its own conversation's worker.
            for n, cid in enumerate([a, a, a, b, b, b, a, b, a, b], start=1):
                name = "a" if cid == a else "b"
                result = await app.send(
                    TurnInput(conversation_id=cid, content=f"{name}{n}", request_id=f"{name}{n}")
                )
                assert result.ended.turn.status is TurnStatus.COMPLETED
        finally:
            await app.shutdown()
    served = {"one": {s[0] for s in one.served}, "two": {s[0] for s in two.served}}
    assert len(one.served) + len(two.served) == 12  # one generation per turn
    assert sorted(served.values(), key=sorted) == [{"a"}, {"b"}], (one.served, two.served)
