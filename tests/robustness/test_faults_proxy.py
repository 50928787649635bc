"""Impaired links through a TCP proxy the test controls: service↔worker and service↔database.

The service (its own gRPC server, `served`) reaches a scripted worker, or
this test's database, only through `TcpProxy` on loopback. Delay and a
bandwidth limit slow turns but they complete; a cut gives UNAVAILABLE with
`retryable`, leaves nothing half-written in the log, and the service
recovers once the proxy passes traffic again. Figures are printed.
(tests/conversation/test_service_faults.py covers a worker stopped outright
and a database refusing connections; tests/engine/test_faults.py a worker
process killed under the engine client.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest
from conversation_helpers import scripted_worker_server, served
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from tcp_proxy import TcpProxy

from turnlog.auth.channel import credentialed_channel
from turnlog.conversation.application import ConversationApplication, ServiceDefaults
from turnlog.eventlog import stream_id
from turnlog.storage import PostgresEventStore
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.client import EngineClient

pytestmark = pytest.mark.timeout(90)

# "long story": 40 words of 5 one-byte tokens, 10 ms apart (2 s). "hi": at once.
SCRIPT: dict[str, Any] = {
    "model": "scripted-proxy",
    "replies": [{"match": "long story", "text": "word " * 40, "token_delay_ms": 10}],
    "default": {"text": "Fine, thanks."},
}
#: A generous bound for any call to fail while a link is cut (it takes about
#: the store's 2 s connect timeout, twice, here).
FAILS_WITHIN_S = 15.0
#: A generous bound for the service to serve again once the link is back.
RECOVERS_WITHIN_S = 20.0

T = TypeVar("T")


@dataclass
class Service:
    stub: sgrpc.ConversationServiceStub
    app: ConversationApplication
    store: PostgresEventStore


@asynccontextmanager
async def _service(store: PostgresEventStore, worker_target: str) -> AsyncIterator[Service]:
    async with EngineClient([worker_target], retries=1, retry_backoff_s=0.05) as engine:
        app = ConversationApplication(
            store, engine, defaults=ServiceDefaults(text_flush_interval_s=0.1)
        )
        try:
            async with (
                served(app) as serving,
                credentialed_channel(serving.address, serving.token()) as channel,
            ):
                yield Service(sgrpc.ConversationServiceStub(channel), app, store)
        finally:
            await app.shutdown()


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo in the status")


async def _unavailable(call: Awaitable[Any], reason: str) -> float:
    """Seconds until `call` fails UNAVAILABLE with `reason`, retryable."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    took = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    info = _error_info(caught.value)
    assert info.reason == reason
    assert info.metadata["retryable"] == "true"
    assert took < FAILS_WITHIN_S
    return took


async def _until_served(attempt: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    """Retry `attempt` while it fails UNAVAILABLE; its result and the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            return await attempt(), time.monotonic() - started
        except grpc.aio.AioRpcError as e:
            code = e.code()
        assert code == grpc.StatusCode.UNAVAILABLE, code
        assert time.monotonic() - started < RECOVERS_WITHIN_S, "the service did not recover"
        await asyncio.sleep(0.1)


async def _read_and_cut(
    call: Any, proxy: TcpProxy, seen: list[spb.TurnEvent]
) -> tuple[grpc.aio.AioRpcError | None, float]:
    """Read a turn's events into `seen`, cutting the proxy at the fifth text delta.

    Returns how the stream failed (None: it ended) and when the cut came.
    """
    cut_at = 0.0
    try:
        async for response in call:
            seen.append(response.event)
            if sum(e.HasField("text_delta") for e in seen) == 5 and not cut_at:
                proxy.cut()
                cut_at = time.monotonic()
    except grpc.aio.AioRpcError as e:
        return e, cut_at
    return None, cut_at


def _send(name: str, content: str, request_id: str) -> spb.SendMessageRequest:
    return spb.SendMessageRequest(
        input=spb.TurnInput(conversation=name, content=content, request_id=request_id)
    )


def _stream(name: str, content: str, request_id: str) -> spb.StreamTurnRequest:
    return spb.StreamTurnRequest(
        start=spb.TurnInput(conversation=name, content=content, request_id=request_id)
    )


async def _create(stub: sgrpc.ConversationServiceStub, request_id: str = "c") -> str:
    created = await stub.CreateConversation(
        spb.CreateConversationRequest(request_id=request_id), timeout=10
    )
    return created.conversation.name


async def _timed_turns(stub: sgrpc.ConversationServiceStub, name: str, tag: str) -> float:
    """Seconds for one SendMessage turn and one streamed turn, both completed."""
    started = time.monotonic()
    sent = await stub.SendMessage(_send(name, "hi", f"{tag}-u"), timeout=60)
    assert sent.turn.status == pb.TURN_STATUS_COMPLETED
    events = [r.event async for r in stub.StreamTurn(_stream(name, "long story", f"{tag}-s"))]
    assert events[-1].turn_ended.turn.status == pb.TURN_STATUS_COMPLETED
    text = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
    assert text == "word " * 40
    return time.monotonic() - started


# -- service ↔ database ----------------------------------------------------------


@asynccontextmanager
async def _database_through(
    proxy: TcpProxy, database_url: str
) -> AsyncIterator[PostgresEventStore]:
    dsn = make_conninfo(database_url, host="127.0.0.1", port=str(proxy.port))
    store = await PostgresEventStore.open(dsn, max_size=4, connect_timeout=2.0)
    try:
        yield store
    finally:
        await store.close()


def _database_target(database_url: str) -> str:
    """Where the test database listens: loopback TCP, or the embedded server's Unix socket."""
    params = conninfo_to_dict(database_url)
    host = str(params.get("host") or "127.0.0.1")
    port = params.get("port") or 5432
    if host.startswith("/"):  # a socket folder (the embedded server has no TCP port)
        return f"{host}/.s.PGSQL.{port}"
    assert host.startswith("127.") or host == "localhost", "the test database must be on loopback"
    return f"127.0.0.1:{port}"


async def test_a_slow_narrow_database_link_slows_turns_that_still_complete(
    database_url: str,
) -> None:
    async with (
        TcpProxy(_database_target(database_url)) as proxy,
        _database_through(proxy, database_url) as store,
        scripted_worker_server(SCRIPT) as worker,
        _service(store, worker.target) as service,
    ):
        name = await _create(service.stub)
        clear = await _timed_turns(service.stub, name, "clear")
        proxy.delay_s = 0.025  # each way: 50 ms per round trip
        proxy.rate_bytes_per_s = 100_000
        impaired = await _timed_turns(service.stub, name, "impaired")
        assert proxy.connections >= 1  # the store's connections went through it
    print(
        f"\nFAULT database link +25 ms each way, 100 kB/s: a unary and a streamed turn "
        f"took {impaired:.2f} s (clear link {clear:.2f} s)"
    )


async def test_a_cut_database_link_is_unavailable_then_recovers_with_nothing_half_written(
    database_url: str,
) -> None:
    async with (
        TcpProxy(_database_target(database_url)) as proxy,
        _database_through(proxy, database_url) as store,
        scripted_worker_server(SCRIPT) as worker,
        _service(store, worker.target) as service,
    ):
        stub = service.stub
        name = await _create(stub)
        cid = name.removeprefix("conversations/")
        seen: list[spb.TurnEvent] = []
        error, cut_at = await _read_and_cut(
            stub.StreamTurn(_stream(name, "long story", "1"), timeout=60), proxy, seen
        )
        stream_failed_s = time.monotonic() - cut_at
        assert cut_at, "the turn ended before its fifth text delta"
        assert error is not None, "the stream ended without an error"
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert _error_info(error).reason == "STORAGE_UNAVAILABLE"
        assert _error_info(error).metadata["retryable"] == "true"
        assert stream_failed_s < FAILS_WITHIN_S
        # While cut, every call is refused the same way, none hangs.
        refused = [
            await _unavailable(
                stub.GetConversation(spb.GetConversationRequest(name=name), timeout=30),
                "STORAGE_UNAVAILABLE",
            ),
            await _unavailable(
                stub.CreateConversation(spb.CreateConversationRequest(request_id="o"), timeout=30),
                "STORAGE_UNAVAILABLE",
            ),
        ]

        proxy.restore()
        got, recovered_s = await _until_served(
            lambda: stub.GetConversation(spb.GetConversationRequest(name=name), timeout=5)
        )
        # The turn whose end could not be recorded is open in the log; recovery
        # (periodic in `turnlog serve`) closes it.
        assert [t.status for t in got.conversation.turns] == [pb.TURN_STATUS_RUNNING]
        assert await service.app.close_interrupted_turns() == [(cid, seen[0].turn_id)]
        # Nothing half-written: the log is whole batches that verify, holding
        # all the client saw (same numbers), then what it did not see, then
        # the end.
        assert (await store.verify(stream_id(cid))).ok
        resumed = [
            r.event
            async for r in stub.StreamTurn(
                spb.StreamTurnRequest(
                    resume=spb.ResumeTurn(conversation=name, turn_id=seen[0].turn_id)
                ),
                timeout=10,
            )
        ]
        assert resumed[: len(seen)] == seen
        assert all(e.HasField("text_delta") for e in resumed[len(seen) : -1])
        assert resumed[-1].turn_ended.turn.status == pb.TURN_STATUS_INTERRUPTED
        types = [e.type for e in await store.read_stream(stream_id(cid))]
        assert types.count("TurnStarted") == 1
        assert not {"GenerationCompleted", "TurnCompleted", "TurnFailed"} & set(types)
        # And the conversation goes on.
        sent = await stub.SendMessage(_send(name, "hi", "2"), timeout=20)
        assert sent.turn.status == pb.TURN_STATUS_COMPLETED
    print(
        f"\nFAULT database link cut mid-StreamTurn: the stream failed UNAVAILABLE in "
        f"{stream_failed_s:.2f} s, later calls in {max(refused):.2f} s at most; served again "
        f"{recovered_s:.2f} s after the link came back"
    )


# -- service ↔ worker -------------------------------------------------------------


async def test_a_slow_narrow_worker_link_slows_turns_that_still_complete(
    store: PostgresEventStore,
) -> None:
    async with (
        scripted_worker_server(SCRIPT) as worker,
        TcpProxy(worker.target) as proxy,
        _service(store, proxy.address) as service,
    ):
        name = await _create(service.stub)
        clear = await _timed_turns(service.stub, name, "clear")
        proxy.delay_s = 0.05  # each way: 100 ms per round trip
        proxy.rate_bytes_per_s = 20_000
        impaired = await _timed_turns(service.stub, name, "impaired")
        assert proxy.connections >= 1  # the engine client's channel went through it
    print(
        f"\nFAULT worker link +50 ms each way, 20 kB/s: a unary and a streamed turn "
        f"took {impaired:.2f} s (clear link {clear:.2f} s)"
    )


async def test_a_cut_worker_link_fails_the_turn_retryably_then_recovers(
    store: PostgresEventStore,
) -> None:
    async with (
        scripted_worker_server(SCRIPT) as worker,
        TcpProxy(worker.target) as proxy,
        _service(store, proxy.address) as service,
    ):
        stub = service.stub
        name = await _create(stub)
        cid = name.removeprefix("conversations/")
        seen: list[spb.TurnEvent] = []
        error, cut_at = await _read_and_cut(
            stub.StreamTurn(_stream(name, "long story", "1"), timeout=60), proxy, seen
        )
        ended_s = time.monotonic() - cut_at
        assert cut_at, "the turn ended before its fifth text delta"
        assert error is None, error
        # The generation broke off: the turn's recorded outcome says so, and
        # the log records it as retryable (the API's Turn has no such field).
        ended = seen[-1].turn_ended.turn
        assert ended.status == pb.TURN_STATUS_FAILED
        assert ended.outcome_reason == "generation: ENGINE_UNAVAILABLE"
        assert ended_s < FAILS_WITHIN_S
        before = await store.read_stream(stream_id(cid))
        assert before[-1].type == "TurnFailed"
        assert before[-1].data["retryable"] is True
        # While cut, a new turn is refused before anything is recorded.
        refused = await _unavailable(
            stub.SendMessage(_send(name, "hi", "2"), timeout=30), "ENGINE_UNAVAILABLE"
        )
        assert await store.read_stream(stream_id(cid)) == before
        assert (await store.verify(stream_id(cid))).ok

        proxy.restore()
        sent, recovered_s = await _until_served(
            lambda: stub.SendMessage(_send(name, "hi", "2"), timeout=10)
        )
        assert sent.turn.status == pb.TURN_STATUS_COMPLETED
    print(
        f"\nFAULT worker link cut mid-StreamTurn: the turn ended FAILED (ENGINE_UNAVAILABLE, "
        f"retryable) in {ended_s:.2f} s, a new turn refused UNAVAILABLE in {refused:.2f} s; "
        f"served again {recovered_s:.2f} s after the link came back"
    )
