"""The EngineService contract, run against every backend through a real worker."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from engine_helpers import ENDLESS_TOKENS, Backend, RawStream, wait_idle
from google.rpc import code_pb2
from worker_processes import VLLM_MAX_MODEL_LEN

from turnlog import errors
from turnlog.engine.v1 import engine_pb2 as pb
from turnlog.engine.v1 import engine_pb2_grpc
from turnlog.worker.client import WorkerConnection

Stub = engine_pb2_grpc.EngineServiceStub


def long_request(rid: str, tokens: int = 300) -> pb.StartGeneration:
    return pb.StartGeneration(
        request_id=rid,
        prompt_text="slow: tell me a long story",
        sampling=pb.SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0),
    )


# An abort must show within ABORT_DEADLINE_S, while the work it stops would
# run 10+ s on its own: on the scripted engine, "endless" replies (480 tokens
# at 25 ms: 12 s). The tiny vLLM model writes 480 tokens in ~0.5 s, so there
# the work is VLLM_BACKLOG such requests: four rounds of the 128 that vLLM
# runs at once on CPU, ~16 s on 2 CPU cores. Their deltas are held for a
# second: thousands a second would starve this process (it would send the
# last starts late, and the cancels).
ABORT_DEADLINE_S = 0.5
VLLM_BACKLOG = 512


def endless_requests(backend: Backend, prefix: str, scripted: int) -> list[pb.StartGeneration]:
    """Requests that keep the worker busy for 10+ s unless aborted."""
    count = VLLM_BACKLOG if backend.kind == "vllm" else scripted
    starts = []
    for n in range(count):
        start = pb.StartGeneration(
            request_id=f"{prefix}{n}",
            prompt_text="endless: tell me a long story",
            sampling=pb.SamplingParams(max_tokens=ENDLESS_TOKENS, ignore_eos=True, temperature=0),
        )
        start.min_delta_interval.FromSeconds(1)
        starts.append(start)
    return starts


async def wait_load(stub: Stub, requests: int, timeout_s: float = 30) -> None:
    """Wait until the worker holds `requests` unfinished requests (all of them accepted)."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = await stub.GetLoad(pb.GetLoadRequest())
        if load.running_requests + load.waiting_requests >= requests:
            return
        assert time.monotonic() < deadline, f"the worker never took {requests} requests: {load}"
        await asyncio.sleep(0.02)


async def test_model_info_names_the_backend(backend: Backend, stub: Stub) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    expected = pb.BACKEND_VLLM if backend.kind == "vllm" else pb.BACKEND_SCRIPTED
    assert info.backend == expected
    assert info.max_context_tokens == VLLM_MAX_MODEL_LEN
    assert info.tokenizer.vocab_size > 0
    assert info.tokenizer.HasField("eos_token_id")
    assert info.tokenizer.has_chat_template


async def test_stream_deltas_then_done_with_exact_usage(backend: Backend, stub: Stub) -> None:
    conn = WorkerConnection(backend.target)
    try:
        start = pb.StartGeneration(
            prompt_text="Hello",
            sampling=pb.SamplingParams(max_tokens=24, ignore_eos=True, temperature=0),
        )
        deltas: list[pb.GenerationDelta] = []
        done: pb.GenerationDone | None = None
        async for event in conn.generate(start):
            assert done is None, "nothing may follow done"
            if isinstance(event, pb.GenerationDelta):
                deltas.append(event)
            else:
                done = event
        assert done is not None
        assert done.finish_reason == pb.FINISH_REASON_LENGTH
        ids = [t for d in deltas for t in d.token_ids]
        assert len(ids) == 24 == done.usage.completion_tokens
        assert done.usage.prompt_tokens > 0
        assert done.timings.total.ToNanoseconds() > 0
        text = "".join(d.text for d in deltas)
        detok = await stub.Detokenize(pb.DetokenizeRequest(token_ids=ids))
        assert text == detok.text
    finally:
        await conn.close()


async def test_min_delta_interval_sends_the_same_output_in_fewer_deltas(
    backend: Backend,
) -> None:
    conn = WorkerConnection(backend.target)

    async def run(interval_ms: int) -> tuple[list[pb.GenerationDelta], pb.GenerationDone]:
        start = long_request("", tokens=120)
        if interval_ms:
            start.min_delta_interval.FromMilliseconds(interval_ms)
        deltas: list[pb.GenerationDelta] = []
        async for event in conn.generate(start):
            if isinstance(event, pb.GenerationDelta):
                deltas.append(event)
            else:
                return deltas, event
        raise AssertionError("no done")

    try:
        every, done = await run(0)
        held, held_done = await run(100)
    finally:
        await conn.close()
    ids = [t for d in every for t in d.token_ids]
    assert [t for d in held for t in d.token_ids] == ids
    assert "".join(d.text for d in held) == "".join(d.text for d in every)
    assert held_done.usage.completion_tokens == done.usage.completion_tokens == 120
    # The first delta is never held (holding it for the 100 ms interval would
    # gather 20+ tokens here); later ones are merged up to the interval. What
    # the engine hands over first can itself be one token or a few, by timing.
    first = list(held[0].token_ids)
    assert first == ids[: len(first)]
    assert 1 <= len(first) < 8
    assert len(every) >= 60
    assert len(held) < len(every) / 3


async def test_tokenize_detokenize_round_trip(stub: Stub) -> None:
    text = "def main():\n    return 'héllo wörld'\n"
    tokens = await stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=False))
    assert len(tokens.token_ids) > 0
    back = await stub.Detokenize(pb.DetokenizeRequest(token_ids=tokens.token_ids))
    assert back.text == text


async def test_render_chat_with_tools(stub: Stub) -> None:
    chat = pb.ChatPrompt(
        messages=[
            pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content="Be brief."),
            pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="What is the weather in Oslo?"),
        ],
        tools=[
            pb.ToolDefinition(
                name="get_weather",
                description="Current weather for a city",
                parameters_json_schema=json.dumps(
                    {"type": "object", "properties": {"city": {"type": "string"}}}
                ),
            )
        ],
    )
    rendered = await stub.RenderChat(pb.RenderChatRequest(chat=chat))
    assert "get_weather" in rendered.prompt_text
    assert "What is the weather in Oslo?" in rendered.prompt_text
    assert "Be brief." in rendered.prompt_text
    assert rendered.prompt_text.rstrip().endswith("assistant")
    again = await stub.Tokenize(
        pb.TokenizeRequest(text=rendered.prompt_text, add_special_tokens=False)
    )
    assert list(again.token_ids) == list(rendered.prompt_token_ids)


async def test_chat_token_counts_add_up_to_the_rendered_prompt(stub: Stub) -> None:
    """Head plus any run of counted messages is exactly the rendered prompt's length."""
    head = pb.ChatPrompt(
        messages=[pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content="Be brief.")],
        tools=[pb.ToolDefinition(name="calculator", description="Evaluates arithmetic")],
    )
    call = pb.ToolCall(id="c1", name="calculator", arguments_json='{"expression": "6 * 7"}')
    messages = [
        pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="What is 6 * 7? Ünïcode too."),
        pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, content="", tool_calls=[call]),
        pb.ChatMessage(role=pb.CHAT_ROLE_TOOL, content="42", tool_call_id="c1"),
        pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, content="It is 42.\n\nAnything else?"),
        pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="no"),
    ]
    counted = await stub.CountChatTokens(pb.CountChatTokensRequest(head=head, messages=messages))
    assert len(counted.message_tokens) == len(messages)
    assert all(n > 0 for n in counted.message_tokens)
    assert counted.max_context_tokens == VLLM_MAX_MODEL_LEN
    for first in (0, 1, 3, 4):
        chat = pb.ChatPrompt(
            messages=[*head.messages, *messages[first:]],
            tools=head.tools,
            add_generation_prompt=True,
        )
        rendered = await stub.RenderChat(pb.RenderChatRequest(chat=chat))
        expected = counted.head_tokens + sum(counted.message_tokens[first:])
        assert len(rendered.prompt_token_ids) == expected, first
    # A head without a system message or tools counts the generation prompt only.
    bare = await stub.CountChatTokens(pb.CountChatTokensRequest(messages=messages[:1]))
    rendered = await stub.RenderChat(
        pb.RenderChatRequest(chat=pb.ChatPrompt(messages=messages[:1], add_generation_prompt=True))
    )
    assert bare.head_tokens + bare.message_tokens[0] == len(rendered.prompt_token_ids)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CountChatTokens(pb.CountChatTokensRequest(messages=[*head.messages]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_render_chat_rejects_empty_chat_with_status(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RenderChat(pb.RenderChatRequest(chat=pb.ChatPrompt()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancel_one_request_leaves_others_intact(stub: Stub) -> None:
    stream = RawStream(stub)
    for rid in ("a", "b", "c"):
        await stream.start(long_request(rid, tokens=120))
    # Wait for a first token of "b", then cancel it.
    seen: dict[str, list[pb.GenerateResponse]] = {"a": [], "b": [], "c": []}
    while not seen["b"]:
        message = await stream.read()
        seen[getattr(message, message.WhichOneof("kind")).request_id].append(message)
    await stream.cancel("b")
    rest = await stream.collect(
        {"a", "b", "c"}
        - {r for r, m in seen.items() if any(x.WhichOneof("kind") in ("done", "error") for x in m)}
    )
    for rid, messages in rest.items():
        seen[rid].extend(messages)
    final = {rid: seen[rid][-1] for rid in seen}
    assert final["b"].done.finish_reason == pb.FINISH_REASON_CANCELLED
    b_tokens = sum(len(m.delta.token_ids) for m in seen["b"] if m.HasField("delta"))
    assert b_tokens < 120
    for rid in ("a", "c"):
        assert final[rid].done.finish_reason == pb.FINISH_REASON_LENGTH
        assert final[rid].done.usage.completion_tokens == 120
    await wait_idle(stub, timeout_s=2)
    stream.call.cancel()


async def test_closing_the_stream_aborts_all_its_requests(backend: Backend, stub: Stub) -> None:
    stream = RawStream(stub)
    requests = endless_requests(backend, "x", scripted=3)
    for start in requests:
        await stream.start(start)
    await stream.read()  # generation is under way
    await wait_load(stub, len(requests))
    stream.call.cancel()
    await wait_idle(stub, timeout_s=ABORT_DEADLINE_S)


async def test_bad_requests_get_per_request_errors_and_the_stream_survives(
    stub: Stub,
) -> None:
    stream = RawStream(stub)
    await stream.start(long_request("running", tokens=100))
    await stream.start(long_request("running", tokens=5))  # duplicate id
    await stream.cancel("no-such-request")
    await stream.start(pb.StartGeneration(request_id="empty", prompt_text=""))
    await stream.start(
        pb.StartGeneration(
            request_id="too-long", prompt_text="hi", sampling=pb.SamplingParams(max_tokens=100_000)
        )
    )
    await stream.start(
        pb.StartGeneration(
            request_id="bad-schema",
            prompt_text="hi",
            sampling=pb.SamplingParams(
                max_tokens=5, structured_output=pb.StructuredOutput(json_schema="{not json")
            ),
        )
    )
    errors_by_id: dict[str, pb.GenerationError] = {}
    running_done: pb.GenerationDone | None = None
    while running_done is None or len(errors_by_id) < 5:
        message = await stream.read()
        if message.HasField("error"):
            key = message.error.request_id
            if key == "running":
                key = "duplicate"
            errors_by_id[key] = message.error
        elif message.HasField("done"):
            assert message.done.request_id == "running"
            running_done = message.done
    assert running_done.finish_reason == pb.FINISH_REASON_LENGTH
    assert running_done.usage.completion_tokens == 100
    expected = {
        "duplicate": (code_pb2.ALREADY_EXISTS, "ALREADY_EXISTS"),
        "no-such-request": (code_pb2.NOT_FOUND, "NOT_FOUND"),
        "empty": (code_pb2.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        "too-long": (code_pb2.INVALID_ARGUMENT, "CONTEXT_LENGTH_EXCEEDED"),
        "bad-schema": (code_pb2.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    }
    for rid, (code, reason) in expected.items():
        error = errors_by_id[rid]
        assert error.code == code, rid
        assert error.error_info.reason == reason, rid
        assert error.error_info.domain == errors.ERROR_DOMAIN
        assert error.message
    assert errors_by_id["bad-schema"].error_info.metadata["field"].endswith("json_schema")
    # The same stream still serves requests.
    await stream.start(long_request("after", tokens=3))
    after = await stream.collect({"after"})
    assert after["after"][-1].done.usage.completion_tokens == 3
    await stream.call.done_writing()
    assert await stream.call.read() is grpc.aio.EOF  # ends cleanly once idle


async def test_client_maps_request_errors_to_turnlog_errors(backend: Backend) -> None:
    conn = WorkerConnection(backend.target)
    try:
        with pytest.raises(errors.ContextLengthExceededError) as caught:
            async for _ in conn.generate(
                pb.StartGeneration(prompt_text="hi", sampling=pb.SamplingParams(max_tokens=9999))
            ):
                pass
        assert caught.value.metadata["maxContextTokens"] == str(VLLM_MAX_MODEL_LEN)
        with pytest.raises(errors.InvalidArgumentError):
            async for _ in conn.generate(pb.StartGeneration(prompt_text="")):
                pass
    finally:
        await conn.close()


async def test_cancelling_the_consumer_task_cancels_the_request(
    backend: Backend, stub: Stub
) -> None:
    conn = WorkerConnection(backend.target)
    first_token = asyncio.Event()

    async def consume(start: pb.StartGeneration) -> None:
        async for _ in conn.generate(start):
            first_token.set()

    requests = endless_requests(backend, "task-", scripted=1)
    try:
        # One consuming task per request (one on the scripted engine).
        tasks = [asyncio.create_task(consume(start)) for start in requests]
        await asyncio.wait_for(first_token.wait(), 30)
        await wait_load(stub, len(requests))
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
        await wait_idle(stub, timeout_s=ABORT_DEADLINE_S)
        assert conn.in_flight == 0
    finally:
        await conn.close()


async def test_many_requests_share_one_stream(backend: Backend) -> None:
    conn = WorkerConnection(backend.target)

    async def run(n: int) -> pb.GenerationDone:
        start = pb.StartGeneration(
            request_id=f"req-{n}",
            prompt_text=f"request number {n}",
            sampling=pb.SamplingParams(max_tokens=16 + n, ignore_eos=True, temperature=0),
        )
        async for event in conn.generate(start):
            if isinstance(event, pb.GenerationDone):
                return event
        raise AssertionError("no done")

    try:
        dones = await asyncio.gather(*(run(n) for n in range(8)))
        assert [d.usage.completion_tokens for d in dones] == [16 + n for n in range(8)]
        assert [d.request_id for d in dones] == [f"req-{n}" for n in range(8)]
    finally:
        await conn.close()
