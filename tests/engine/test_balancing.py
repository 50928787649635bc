"""Load balancing and conversation affinity across two scripted workers."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from turnlog.engine.v1 import engine_pb2 as pb
from turnlog.worker.client import EngineClient


def script(name: str) -> dict[str, Any]:
    return {
        "replies": [{"match": "slow", "text": name * 50, "token_delay_ms": 5}],
        "default": {"text": name},
    }


async def served_by(client: EngineClient, prompt: str, key: str | None = None) -> str:
    text = ""
    async for event in client.generate(
        pb.StartGeneration(prompt_text=prompt, sampling=pb.SamplingParams(max_tokens=20)),
        affinity_key=key,
    ):
        if isinstance(event, pb.GenerationDelta):
            text += event.text
    return text[:3]


async def test_concurrent_requests_spread_by_load(make_scripted_worker: Any) -> None:
    one = make_scripted_worker(script("one"))
    two = make_scripted_worker(script("two"))
    async with EngineClient([one.target, two.target], load_poll_interval_s=0) as client:
        names = await asyncio.gather(*(served_by(client, "slow") for _ in range(10)))
        assert Counter(names) == {"one": 5, "two": 5}


async def test_affinity_keeps_a_conversation_on_its_worker(make_scripted_worker: Any) -> None:
    one = make_scripted_worker(script("one"))
    two = make_scripted_worker(script("two"))
    async with EngineClient([one.target, two.target], load_poll_interval_s=0.2) as client:
        # Load one worker so that a least-loaded choice would differ from the bound one.
        home = await served_by(client, "hello", key="conv-a")
        busy = [asyncio.create_task(served_by(client, "slow", key="conv-a")) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert {await served_by(client, "hello", key="conv-a") for _ in range(5)} == {home}
        other = await served_by(client, "hello", key="conv-b")
        assert other != home  # the unbound conversation went to the idle worker
        assert set(await asyncio.gather(*busy)) == {home}


async def test_affinity_moves_when_its_worker_dies(make_scripted_worker: Any) -> None:
    one = make_scripted_worker(script("one"))
    two = make_scripted_worker(script("two"))
    async with EngineClient(
        [one.target, two.target], load_poll_interval_s=0, retry_backoff_s=0.01
    ) as client:
        home = await served_by(client, "hello", key="conv-a")
        (one if home == "one" else two).kill()
        moved = await served_by(client, "hello", key="conv-a")
        assert moved != home
        assert await served_by(client, "hello", key="conv-a") == moved
