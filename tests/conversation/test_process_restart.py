"""`turnlog serve` SIGKILLed mid-turn and restarted on the same log.

Real processes: a scripted `turnlog worker` with a slow reply, and the service
as a subprocess on this test's PostgreSQL database. After the restart the
turn is closed as interrupted, the hash chain verifies, and the conversation
takes a new turn.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from worker_processes import TurnlogProcess, WorkerProcess, printed_token, start_scripted_worker

from turnlog.auth.channel import credentialed_channel
from turnlog.engine.v1 import engine_pb2, engine_pb2_grpc
from turnlog.eventlog import stream_id
from turnlog.storage import PostgresEventStore
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc

SLOW_SCRIPT: dict[str, Any] = {
    "model": "scripted-slow",
    # Replies match anywhere in the prompt, so the later message comes first.
    "replies": [
        {"match": "hello again", "text": "Back again."},
        {"match": "slow", "text": "tick " * 400, "token_delay_ms": 20},
    ],
}
SERVING = re.compile(r"turnlog serving gRPC on (\S+):(\d+)")


class ServiceProcess(TurnlogProcess):
    """A `turnlog serve` subprocess on a given database, on a free loopback port."""

    def __init__(self, database_url: str, worker: str, log_path: Path) -> None:
        super().__init__(["serve", "--worker", worker], log_path, SERVING)
        self.env = {
            "TURNLOG_DATABASE_URL": database_url,
            "TURNLOG_LISTEN": "127.0.0.1:0",
            # Its local signing key (so its printed token) stays with the test.
            "TURNLOG_DATA_DIR": str(log_path.parent / "serve-data"),
        }
        self.target = ""
        self.token = ""

    def start(self, timeout_s: float = 60.0) -> ServiceProcess:  # type: ignore[override]
        found = super().start(timeout_s)
        self.target = f"{found[1]}:{found[2]}"
        self.token = printed_token(self.log_path.read_text(errors="replace"))
        return self

    def channel(self) -> grpc.aio.Channel:
        """A channel to the service sending its printed token."""
        return credentialed_channel(self.target, self.token)

    def stop(self) -> None:
        """SIGTERM (graceful) and wait; SIGKILL if it hangs."""
        self.terminate(15)


@pytest.fixture
def slow_worker(tmp_path: Path) -> Iterator[WorkerProcess]:
    worker = start_scripted_worker(SLOW_SCRIPT, tmp_path)
    yield worker
    worker.kill()


async def _wait_worker_idle(target: str, timeout_s: float = 10.0) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            load = await stub.GetLoad(engine_pb2.GetLoadRequest())
            if load.running_requests == 0 and load.waiting_requests == 0:
                return
            assert time.monotonic() < deadline, f"worker still busy: {load}"
            await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_killed_service_leaves_an_interrupted_turn_and_a_usable_conversation(
    database_url: str, store: PostgresEventStore, slow_worker: WorkerProcess, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    first = ServiceProcess(database_url, slow_worker.target, log).start()
    try:
        async with first.channel() as channel:
            stub = sgrpc.ConversationServiceStub(channel)
            created = await stub.CreateConversation(spb.CreateConversationRequest(request_id="r"))
            name = created.conversation.name
            call = stub.StreamTurn(
                spb.StreamTurnRequest(
                    start=spb.TurnInput(conversation=name, content="slow story", request_id="1")
                ),
                timeout=30,
            )
            deltas = 0
            async for response in call:
                if response.event.HasField("text_delta"):
                    deltas += 1
                if deltas == 30:  # > 0.5 s in: some text is flushed to the log
                    break
            assert deltas == 30
            call.cancel()
        first.kill()  # mid-turn: ~8 s of reply left
    finally:
        first.kill()
    cid = name.removeprefix("conversations/")
    before = await store.read_stream(stream_id(cid))
    assert before[-1].type != "TurnInterrupted"
    assert "TurnCompleted" not in {r.type for r in before}
    # The worker aborted the orphaned request when the service's stream died.
    await _wait_worker_idle(slow_worker.target)

    second = ServiceProcess(database_url, slow_worker.target, log).start()
    try:
        async with second.channel() as channel:
            stub = sgrpc.ConversationServiceStub(channel)
            got = await stub.GetConversation(spb.GetConversationRequest(name=name), timeout=10)
            assert [t.status for t in got.conversation.turns] == [pb.TURN_STATUS_INTERRUPTED]
            assert (await store.verify(stream_id(cid))).ok
            sent = await stub.SendMessage(
                spb.SendMessageRequest(
                    input=spb.TurnInput(conversation=name, content="hello again", request_id="2")
                ),
                timeout=15,
            )
            assert sent.turn.status == pb.TURN_STATUS_COMPLETED
            assert sent.assistant_message.content == "Back again."
    finally:
        second.stop()
    after = await store.read_stream(stream_id(cid))
    types = [r.type for r in after]
    assert types.count("TurnInterrupted") == 1
    assert types[len(before)] == "TurnInterrupted"  # appended right after the dead turn's events
    assert types[-1] == "TurnCompleted"
    assert (await store.verify(stream_id(cid))).ok
