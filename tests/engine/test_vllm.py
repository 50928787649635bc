"""vLLM on CPU through the real gRPC worker (tiny random-weight model)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from engine_helpers import WorkerProcess, wait_idle

from turnlog.engine.v1 import engine_pb2 as pb
from turnlog.worker.client import EngineClient

pytestmark = pytest.mark.vllm

WEATHER_TOOL = pb.ToolDefinition(
    name="get_weather",
    description="Current weather for a city",
    parameters_json_schema=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)


@pytest.fixture
async def engine(vllm_worker: WorkerProcess) -> AsyncIterator[EngineClient]:
    async with EngineClient([vllm_worker.target], load_poll_interval_s=0) as client:
        yield client


async def run(
    client: EngineClient, start: pb.StartGeneration
) -> tuple[list[int], str, pb.GenerationDone]:
    ids: list[int] = []
    text = ""
    async for event in client.generate(start):
        if isinstance(event, pb.GenerationDelta):
            ids.extend(event.token_ids)
            text += event.text
        else:
            return ids, text, event
    raise AssertionError("no done")


async def test_eight_concurrent_requests_on_one_stream(engine: EngineClient) -> None:
    starts = [
        pb.StartGeneration(
            prompt_text=f"Request {n}: write some Python code",
            sampling=pb.SamplingParams(max_tokens=32, ignore_eos=True, temperature=0.8, seed=n),
        )
        for n in range(8)
    ]
    results = await asyncio.gather(*(run(engine, s) for s in starts))
    for ids, _, done in results:
        assert len(ids) == 32 == done.usage.completion_tokens
        assert done.finish_reason == pb.FINISH_REASON_LENGTH
    worker = engine.workers[0]
    assert worker._stream is not None  # one stream carried all eight
    assert worker.in_flight == 0


async def test_greedy_decoding_is_deterministic(engine: EngineClient) -> None:
    start = pb.StartGeneration(
        prompt_text="import os\nimport sys\n",
        sampling=pb.SamplingParams(max_tokens=24, ignore_eos=True, temperature=0),
    )
    first, _, _ = await run(engine, start)
    start.request_id = ""
    second, _, _ = await run(engine, start)
    assert first == second


async def test_per_request_seed_reproduces_sampled_output(engine: EngineClient) -> None:
    def start(seed: int) -> pb.StartGeneration:
        return pb.StartGeneration(
            prompt_text="class Foo:\n",
            sampling=pb.SamplingParams(max_tokens=24, ignore_eos=True, temperature=1.0, seed=seed),
        )

    a, _, _ = await run(engine, start(7))
    b, _, _ = await run(engine, start(7))
    c, _, _ = await run(engine, start(8))
    assert a == b
    assert a != c


async def test_json_schema_structured_output_is_well_formed_json(engine: EngineClient) -> None:
    # A random-weight model under a JSON grammar tends to emit whitespace until
    # max_tokens wherever the grammar allows it, so this schema leaves no room for
    # whitespace; the full tool-call shape is covered by the regex test below.
    schema = {"enum": ["get_weather", "get_time", "no_tool"]}
    start = pb.StartGeneration(
        prompt_text="Which tool?",
        sampling=pb.SamplingParams(
            max_tokens=40,
            temperature=0,
            structured_output=pb.StructuredOutput(json_schema=json.dumps(schema)),
        ),
    )
    _, text, done = await run(engine, start)
    assert done.finish_reason == pb.FINISH_REASON_STOP, text
    assert json.loads(text) in schema["enum"]


async def test_structured_tool_call_is_parsed_by_the_hermes_parser(engine: EngineClient) -> None:
    chat = pb.ChatPrompt(
        messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="Weather in Oslo?")],
        tools=[WEATHER_TOOL],
    )
    regex = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,10}"\}\}\n</tool_call>'
    start = pb.StartGeneration(
        chat=chat,
        sampling=pb.SamplingParams(
            max_tokens=120, temperature=0, structured_output=pb.StructuredOutput(regex=regex)
        ),
    )
    _, text, done = await run(engine, start)
    assert text.startswith("<tool_call>")
    assert len(done.tool_calls) == 1
    call = done.tool_calls[0]
    assert call.name == "get_weather"
    assert set(json.loads(call.arguments_json)) == {"city"}
    assert call.id


async def test_choice_structured_output(engine: EngineClient) -> None:
    start = pb.StartGeneration(
        prompt_text="yes or no?",
        sampling=pb.SamplingParams(
            max_tokens=10,
            temperature=0,
            structured_output=pb.StructuredOutput(choice=pb.ChoiceList(choices=["yes", "no"])),
        ),
    )
    _, text, _ = await run(engine, start)
    assert text in ("yes", "no")


async def test_chat_generation_uses_the_rendered_template(engine: EngineClient) -> None:
    chat = pb.ChatPrompt(
        messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="Hi there")], tools=[WEATHER_TOOL]
    )
    rendered = await engine.render_chat(pb.RenderChatRequest(chat=chat))
    _, _, done = await run(
        engine, pb.StartGeneration(chat=chat, sampling=pb.SamplingParams(max_tokens=4))
    )
    assert done.usage.prompt_tokens == len(rendered.prompt_token_ids)


async def test_prefix_cache_reuses_a_shared_prompt(engine: EngineClient) -> None:
    prompt = "def fibonacci(n):\n    " * 20  # several full 32-token blocks
    start = pb.StartGeneration(prompt_text=prompt, sampling=pb.SamplingParams(max_tokens=2))
    await run(engine, start)
    start.request_id = ""
    _, _, done = await run(engine, start)
    assert done.usage.cached_prompt_tokens >= 32


async def test_logprobs_and_stop_token_ids(engine: EngineClient) -> None:
    greedy = pb.StartGeneration(
        prompt_text="for i in range(10):",
        sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True, temperature=0, logprobs=2),
    )
    ids: list[int] = []
    async for event in engine.generate(greedy):
        if isinstance(event, pb.GenerationDelta):
            assert len(event.logprobs) == len(event.token_ids)
            for token, lp in zip(event.token_ids, event.logprobs, strict=True):
                assert lp.token_id == token
                assert len(lp.top) >= 2
            ids.extend(event.token_ids)
    stop_at = ids[3]
    greedy.request_id = ""
    greedy.sampling.ClearField("logprobs")
    greedy.sampling.stop_token_ids.append(stop_at)
    got, _, done = await run(engine, greedy)
    assert done.finish_reason == pb.FINISH_REASON_STOP
    assert done.matched_stop_token_id == stop_at
    assert got == ids[: ids.index(stop_at) + 1] or got == ids[: ids.index(stop_at)]


async def test_embed_is_refused_for_a_generative_model(engine: EngineClient) -> None:
    from turnlog import errors

    with pytest.raises(errors.UnsupportedByModelError):
        await engine.embed(pb.EmbedRequest(texts=["hello"]))


async def test_worker_is_idle_after_the_suite_so_far(vllm_worker: WorkerProcess) -> None:
    import grpc

    from turnlog.engine.v1 import engine_pb2_grpc

    async with grpc.aio.insecure_channel(vllm_worker.target) as channel:
        await wait_idle(engine_pb2_grpc.EngineServiceStub(channel), timeout_s=3)
