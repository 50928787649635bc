"""Fault tests: kill workers mid-stream, restart them, drain them, retry before first token."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from engine_helpers import ENDLESS_TOKEN_DELAY_MS, ENDLESS_TOKENS, SCRIPT

from turnlog import errors
from turnlog.engine.v1 import engine_pb2 as pb
from turnlog.worker.backend import RequestProgress
from turnlog.worker.client import EngineClient, WorkerConnection
from turnlog.worker.scripted import Script, ScriptedEngine


def slow(tokens: int = 300) -> pb.StartGeneration:
    return pb.StartGeneration(
        prompt_text="slow please", sampling=pb.SamplingParams(max_tokens=tokens, ignore_eos=True)
    )


async def collect(stream: Any) -> list[Any]:
    return [event async for event in stream]


async def test_killed_worker_fails_in_flight_requests_and_client_recovers(
    make_scripted_worker: Any,
) -> None:
    worker = make_scripted_worker()
    conn = WorkerConnection(worker.target)
    started = asyncio.Event()
    counts = [0, 0, 0]

    async def consume(n: int) -> None:
        async for _ in conn.generate(slow()):
            counts[n] += 1
            started.set()

    try:
        tasks = [asyncio.create_task(consume(n)) for n in range(3)]
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.1)
        worker.kill()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert all(isinstance(r, errors.EngineUnavailableError) for r in results), results
        assert all(c > 0 for c in counts)
        assert conn.in_flight == 0
        assert not conn.healthy

        make_scripted_worker(port=worker.port)  # back on the same port
        deadline = time.monotonic() + 10
        while True:
            try:
                events = await collect(conn.generate(pb.StartGeneration(prompt_text="hello")))
                break
            except errors.EngineUnavailableError:
                assert time.monotonic() < deadline, "client did not recover"
                await asyncio.sleep(0.2)
        assert isinstance(events[-1], pb.GenerationDone)
        assert events[-1].finish_reason == pb.FINISH_REASON_STOP
    finally:
        await conn.close()


async def test_pool_client_retries_transparently_after_restart(make_scripted_worker: Any) -> None:
    worker = make_scripted_worker()
    async with EngineClient([worker.target], retries=5, retry_backoff_s=0.2) as client:
        await collect(client.generate(pb.StartGeneration(prompt_text="hello")))
        worker.kill()
        restart = asyncio.get_running_loop().run_in_executor(
            None, lambda: make_scripted_worker(port=worker.port)
        )
        events = await collect(client.generate(pb.StartGeneration(prompt_text="hello")))
        await restart
        assert isinstance(events[-1], pb.GenerationDone)


async def test_retry_before_first_token_goes_to_another_worker(make_scripted_worker: Any) -> None:
    failing = make_scripted_worker(
        {"default": {"text": "never", "fail_at_token": 0, "fail_reason": "ENGINE_UNAVAILABLE"}}
    )
    healthy = make_scripted_worker({"default": {"text": "from the healthy worker"}})
    async with EngineClient(
        [failing.target, healthy.target], load_poll_interval_s=0, retry_backoff_s=0.01
    ) as client:
        events = await collect(client.generate(pb.StartGeneration(prompt_text="hi")))
        text = "".join(e.text for e in events if isinstance(e, pb.GenerationDelta))
        assert text == "from the healthy worker"


@pytest.mark.parametrize("held_ms", [0, 10_000])
async def test_no_retry_after_the_first_token(make_scripted_worker: Any, held_ms: int) -> None:
    """A late failure ends the request; what was generated before it arrives first,
    held deltas (`min_delta_interval`) included."""
    worker = make_scripted_worker(
        {
            "default": {
                "text": "partial output",
                "fail_at_token": 3,
                "fail_reason": "ENGINE_UNAVAILABLE",
            }
        }
    )
    async with EngineClient([worker.target], load_poll_interval_s=0, retries=3) as client:
        seen: list[int] = []

        async def consume() -> None:
            start = pb.StartGeneration(prompt_text="hi")
            start.min_delta_interval.FromMilliseconds(held_ms)
            async for event in client.generate(start):
                seen.extend(event.token_ids if isinstance(event, pb.GenerationDelta) else [])

        with pytest.raises(errors.EngineUnavailableError):
            await consume()
        assert len(seen) == 3


async def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
    make_scripted_worker: Any,
) -> None:
    worker = make_scripted_worker()
    conn = WorkerConnection(worker.target)
    try:
        stream = conn.generate(slow(tokens=100))  # ~0.5 s of output
        first = await anext(stream)
        assert isinstance(first, pb.GenerationDelta)
        assert worker.proc is not None
        worker.proc.send_signal(15)
        await asyncio.sleep(0.2)
        with pytest.raises(errors.EngineUnavailableError):
            await collect(conn.generate(pb.StartGeneration(prompt_text="hello")))
        rest = await collect(stream)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert rest[-1].usage.completion_tokens == 100
        assert await asyncio.get_running_loop().run_in_executor(None, worker.proc.wait, 20) == 0
    finally:
        await conn.close()


async def test_the_endless_reply_outlasts_the_abort_deadlines() -> None:
    """The abort checks of test_contract.py wait 0.5 s for what takes 10+ s on its own:
    the scripted engine must pace the "endless" reply as scripted, and pick it."""
    engine = ScriptedEngine(Script.from_json(SCRIPT))
    start = pb.StartGeneration(
        request_id="pace",
        prompt_text="endless: tell me a long story",
        sampling=pb.SamplingParams(max_tokens=ENDLESS_TOKENS, ignore_eos=True),
    )
    stamps: list[float] = []
    text = ""
    generation = engine.generate(start, engine_request_id="pace", progress=RequestProgress())
    async for event in generation:
        assert isinstance(event, pb.GenerationDelta)
        stamps.append(time.monotonic())
        text += event.text
        if len(stamps) == 21:
            break
    await generation.aclose()
    assert text == "e" * 21
    per_token_s = (stamps[-1] - stamps[0]) / 20
    assert per_token_s >= 0.9 * ENDLESS_TOKEN_DELAY_MS / 1000
    assert per_token_s * ENDLESS_TOKENS >= 10
