"""`TokenCounter`: counts that other turns evict while one awaits the worker are not lost.

A fake engine stands in for the worker's `CountChatTokens` (this is a unit
test of the cache, not of counting): while it "counts" one turn's new
messages, another turn's counts push the first turn's cached entries out of
a small cache. bench/soak.py found this as turns failing INTERNAL (KeyError).
"""

from __future__ import annotations

import asyncio
from typing import Any

from turnlog.conversation.context import TokenCounter
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, Message
from turnlog.engine.v1 import engine_pb2


class SlowCounts:
    """Answers CountChatTokens with 10 tokens per message, after `gate` opens."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()

    async def count_chat_tokens(
        self, request: engine_pb2.CountChatTokensRequest, *, affinity_key: str | None = None
    ) -> engine_pb2.CountChatTokensResponse:
        await self.gate.wait()
        return engine_pb2.CountChatTokensResponse(
            head_tokens=5, message_tokens=[10] * len(request.messages), max_context_tokens=1024
        )


def _messages(prefix: str, n: int) -> list[Message]:
    return [
        Message(message_id=f"{prefix}-{i}", role=ev.Role.USER, content=f"message {i}")
        for i in range(n)
    ]


async def test_counts_evicted_during_the_workers_count_are_kept() -> None:
    engine = SlowCounts()
    counter = TokenCounter(engine, cache_size=4)  # type: ignore[arg-type]
    state = ConversationState(conversation_id="c", exists=True)
    first = _messages("a", 3)
    await counter.count(state, first, affinity_key="c")  # a-0..a-2 cached
    engine.gate.clear()
    # Turn 1: three cached messages and one new one; it waits for the worker.
    pending: Any = asyncio.ensure_future(
        counter.count(state, [*first, *_messages("b", 1)], affinity_key="c")
    )
    await asyncio.sleep(0)
    # Turn 2 (another conversation) fills the cache meanwhile, evicting a-*.
    engine.gate.set()
    await counter.count(state, _messages("z", 4), affinity_key="z")
    head, counts, context = await pending
    assert (head, counts, context) == (5, [10, 10, 10, 10], 1024)
