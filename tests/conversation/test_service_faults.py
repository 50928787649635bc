"""Faults that actually cut things, seen by a client over real gRPC on loopback.

Every worker down, the database unreachable, a client deadline shorter than
the reply, and a cancel mid-stream over Converse that must abort the request
in the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import psycopg
import pytest
from conversation_helpers import served as serve_app
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from worker_processes import WorkerProcess

from turnlog.auth.channel import credentialed_channel
from turnlog.conversation.application import ConversationApplication, ServiceDefaults
from turnlog.conversation.tools import builtin_tools
from turnlog.engine.v1 import engine_pb2, engine_pb2_grpc
from turnlog.eventlog import stream_id
from turnlog.storage import PostgresEventStore
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.client import EngineClient
from turnlog.worker.scripted import Script, ScriptedEngine
from turnlog.worker.service import EngineServicer

pytestmark = pytest.mark.timeout(60)

# "long story" streams 200 one-character tokens for 2 s: longer than any wait
# below. "endless story" streams 480 for 12 s: a cancel must show long before.
SCRIPT: dict[str, Any] = {
    "model": "scripted-faults",
    "replies": [
        {"match": "long story", "text": "word " * 40, "token_delay_ms": 10},
        {"match": "endless story", "text": "word " * 96, "token_delay_ms": 25},
    ],
    "default": {"text": "Fine."},
}
# How long an aborted request may still count at the worker once its turn ended.
ABORT_DEADLINE_S = 0.5


class Served:
    """An in-process scripted worker and a ConversationService in front of it."""

    def __init__(self, worker: grpc.aio.Server | None, worker_target: str) -> None:
        self.worker = worker
        self.worker_target = worker_target
        self.stub: sgrpc.ConversationServiceStub
        self.engine_stub: engine_pb2_grpc.EngineServiceStub


async def _serve_worker() -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    engine_pb2_grpc.add_EngineServiceServicer_to_server(
        EngineServicer(ScriptedEngine(Script.from_json(SCRIPT))), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def make_served() -> AsyncIterator[Callable[..., Any]]:
    """Start a worker and a service over `store`; everything is stopped afterwards."""
    cleanups: list[Callable[[], Any]] = []

    async def make(store: PostgresEventStore, worker_target: str | None = None) -> Served:
        """Without `worker_target`, in front of a new in-process scripted worker."""
        worker: grpc.aio.Server | None = None
        if worker_target is None:
            worker, worker_target = await _serve_worker()
            cleanups.append(lambda: worker.stop(0))
        served = Served(worker, worker_target)
        engine = EngineClient([worker_target], retries=1, retry_backoff_s=0.05)
        await engine.__aenter__()
        cleanups.append(lambda: engine.__aexit__(None, None, None))
        app = ConversationApplication(
            store,
            engine,
            tools=builtin_tools(lambda: 0),
            defaults=ServiceDefaults(text_flush_interval_s=0.1),
        )
        cleanups.append(app.shutdown)
        serving_context = serve_app(app)
        serving = await serving_context.__aenter__()
        cleanups.append(lambda: serving_context.__aexit__(None, None, None))
        channel = credentialed_channel(serving.address, serving.token())
        cleanups.append(channel.close)
        worker_channel = grpc.aio.insecure_channel(worker_target)
        cleanups.append(worker_channel.close)
        served.stub = sgrpc.ConversationServiceStub(channel)
        served.engine_stub = engine_pb2_grpc.EngineServiceStub(worker_channel)
        return served

    yield make
    for cleanup in reversed(cleanups):
        await cleanup()


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status")


async def _create(stub: sgrpc.ConversationServiceStub, request_id: str = "c") -> str:
    created = await stub.CreateConversation(
        spb.CreateConversationRequest(request_id=request_id), timeout=10
    )
    return created.conversation.name


def _send(name: str, content: str, request_id: str) -> spb.SendMessageRequest:
    return spb.SendMessageRequest(
        input=spb.TurnInput(conversation=name, content=content, request_id=request_id)
    )


async def _running_requests(stub: engine_pb2_grpc.EngineServiceStub) -> int:
    load = await stub.GetLoad(engine_pb2.GetLoadRequest(), timeout=5)
    return int(load.running_requests + load.waiting_requests)


async def test_every_worker_down_is_unavailable_and_retryable(
    make_served: Callable[..., Any], store: PostgresEventStore
) -> None:
    served: Served = await make_served(store)
    name = await _create(served.stub)
    assert served.worker is not None
    await served.worker.stop(0)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.SendMessage(_send(name, "hi", "1"), timeout=20)
    assert time.monotonic() - started < 10
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = _error_info(caught.value)
    assert info.domain == "turnlog.dev"
    assert info.reason == "ENGINE_UNAVAILABLE"
    assert info.metadata["retryable"] == "true"
    # The turn's window is decided on the worker (token counts) before anything
    # is recorded: with no worker the request is refused and the log is
    # unchanged, so a retry with the same request id starts the turn afresh.
    got = await served.stub.GetConversation(spb.GetConversationRequest(name=name), timeout=10)
    assert list(got.conversation.turns) == []
    assert got.conversation.version == 1
    assert (await store.verify(stream_id(name.removeprefix("conversations/")))).ok


async def test_database_unreachable_is_unavailable(
    make_served: Callable[..., Any], database_url: str, pg_admin_url: str
) -> None:
    store = await PostgresEventStore.open(database_url, max_size=4, connect_timeout=2.0)
    try:
        served: Served = await make_served(store)
        name = await _create(served.stub)
        dbname = conninfo_to_dict(database_url)["dbname"]
        # Cut the database off: refuse new connections and kill the open ones.
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(dbname))
            )
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )
        try:
            for call in (
                served.stub.GetConversation(spb.GetConversationRequest(name=name), timeout=15),
                served.stub.SendMessage(_send(name, "hi", "1"), timeout=15),
                served.stub.CreateConversation(
                    spb.CreateConversationRequest(request_id="other"), timeout=15
                ),
            ):
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert time.monotonic() - started < 10
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
                info = _error_info(caught.value)
                assert info.reason == "STORAGE_UNAVAILABLE"
                assert info.metadata["retryable"] == "true"
                assert "psycopg" not in (caught.value.details() or "")
        finally:
            with psycopg.connect(pg_admin_url, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                        sql.Identifier(dbname)
                    )
                )
        # Back: the pool reconnects and the service serves again.
        deadline = time.monotonic() + 15
        while True:
            try:
                got = await served.stub.GetConversation(
                    spb.GetConversationRequest(name=name), timeout=5
                )
                break
            except grpc.aio.AioRpcError as e:
                code = e.code()
                assert code == grpc.StatusCode.UNAVAILABLE, code
                assert time.monotonic() < deadline, "the service did not recover"
                await asyncio.sleep(0.2)
        assert got.conversation.name == name
    finally:
        await store.close()


async def test_deadline_shorter_than_the_reply(
    make_served: Callable[..., Any], store: PostgresEventStore
) -> None:
    served: Served = await make_served(store)
    name = await _create(served.stub)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.SendMessage(_send(name, "tell a long story", "1"), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5
    # The turn outlives its caller: it completes, and a retry with the same
    # request id returns that turn instead of generating again.
    retried = await served.stub.SendMessage(_send(name, "tell a long story", "1"), timeout=20)
    assert retried.turn.status == pb.TURN_STATUS_COMPLETED
    assert retried.assistant_message.content == "word " * 40
    got = await served.stub.GetConversation(spb.GetConversationRequest(name=name), timeout=10)
    assert len(got.conversation.turns) == 1
    recorded = await store.read_stream(stream_id(name.removeprefix("conversations/")))
    assert [r.type for r in recorded].count("GenerationStarted") == 1
    assert (await store.verify(stream_id(name.removeprefix("conversations/")))).ok


async def _wait_idle(stub: engine_pb2_grpc.EngineServiceStub, requests: int = 0) -> None:
    """Fail unless the worker holds `requests` requests within ABORT_DEADLINE_S."""
    deadline = time.monotonic() + ABORT_DEADLINE_S
    while (running := await _running_requests(stub)) != requests:
        assert time.monotonic() < deadline, f"the worker still runs {running} requests"
        await asyncio.sleep(0.02)


async def _cancel_after_five_deltas(
    served: Served, turn: spb.TurnInput
) -> tuple[spb.TurnEnded, int]:
    """Converse a turn, cancel it at its fifth text delta; its end, and the load then."""
    call = served.stub.Converse(timeout=60)
    await call.write(spb.ConverseRequest(user_message=turn))
    deltas = 0
    running_at_cancel = -1
    cancelled_at = 0.0
    ended: spb.TurnEnded | None = None
    async for response in call:
        event = response.event
        if event.HasField("text_delta"):
            deltas += 1
            if deltas == 5:
                running_at_cancel = await _running_requests(served.engine_stub)
                await call.write(spb.ConverseRequest(cancel=spb.CancelTurn(turn_id=event.turn_id)))
                cancelled_at = time.monotonic()
        if event.HasField("turn_ended"):
            ended = event.turn_ended
            await call.done_writing()
    assert cancelled_at, "the turn ended before its fifth delta"
    assert ended is not None
    assert time.monotonic() - cancelled_at < 1  # a small part of the 10+ s reply
    return ended, running_at_cancel


async def test_cancel_mid_stream_aborts_the_worker_request(
    make_served: Callable[..., Any], store: PostgresEventStore
) -> None:
    served: Served = await make_served(store)
    name = await _create(served.stub)
    # "endless story" runs 12 s on its own.
    turn = spb.TurnInput(conversation=name, content="endless story", request_id="x")
    ended, running = await _cancel_after_five_deltas(served, turn)
    assert running == 1
    assert ended.turn.status == pb.TURN_STATUS_CANCELLED
    await _wait_idle(served.engine_stub)
    recorded = await store.read_stream(stream_id(name.removeprefix("conversations/")))
    types = [r.type for r in recorded]
    assert types[-1] == "TurnCancelled"
    assert "GenerationCompleted" not in types
    assert (await store.verify(stream_id(name.removeprefix("conversations/")))).ok


# The tiny model writes a turn's 440 tokens in ~0.5 s alone. So the worker
# first takes VLLM_BACKGROUND requests of 480 tokens (fewer than the 128 it
# runs at once, so the turn's request is not queued behind them), and the
# turn's output is forced long by its regex: it would then run 5-6 s on 2 CPU
# cores, not 10 (the tiny model's context is 512 tokens), still 10 times the
# deadline. The background runs as long, so what remains after the cancel is
# exactly the background.
VLLM_BACKGROUND = 100


@pytest.mark.vllm
@pytest.mark.timeout(300)  # the first vLLM test of a session starts the worker
async def test_cancel_mid_stream_aborts_the_vllm_request(
    make_served: Callable[..., Any], store: PostgresEventStore, vllm_worker: WorkerProcess
) -> None:
    served: Served = await make_served(store, worker_target=vllm_worker.target)
    created = await served.stub.CreateConversation(
        spb.CreateConversationRequest(
            request_id="c", defaults=pb.TurnDefaults(temperature=0, max_tokens=440)
        ),
        timeout=10,
    )
    name = created.conversation.name
    background = served.engine_stub.Generate()
    try:
        for n in range(VLLM_BACKGROUND):
            start = engine_pb2.StartGeneration(
                request_id=f"bg{n}",
                prompt_text="keep the worker busy",
                sampling=engine_pb2.SamplingParams(max_tokens=480, ignore_eos=True),
            )
            start.min_delta_interval.FromSeconds(1)  # little for this process to read
            await background.write(engine_pb2.GenerateRequest(start=start))
        deadline = time.monotonic() + 30
        while (running := await _running_requests(served.engine_stub)) < VLLM_BACKGROUND:
            assert time.monotonic() < deadline, f"the worker took {running} of the background"
            await asyncio.sleep(0.02)
        turn = spb.TurnInput(
            conversation=name,
            content="endless story",
            request_id="x",
            options=pb.TurnDefaults(first_generation_regex="(a ){1000}"),
        )
        ended, running = await _cancel_after_five_deltas(served, turn)
        assert running == VLLM_BACKGROUND + 1
        assert ended.turn.status == pb.TURN_STATUS_CANCELLED
        # The turn's request is gone; all the background (started earlier,
        # as long) still runs: the turn's would have too.
        await _wait_idle(served.engine_stub, VLLM_BACKGROUND)
    finally:
        background.cancel()
    await _wait_idle(served.engine_stub)
    recorded = await store.read_stream(stream_id(name.removeprefix("conversations/")))
    types = [r.type for r in recorded]
    assert types[-1] == "TurnCancelled"
    assert "GenerationCompleted" not in types
