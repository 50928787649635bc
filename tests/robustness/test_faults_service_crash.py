"""`turnlog serve` SIGKILLed mid-`StreamTurn` and restarted: resuming the turn from what a client saw.

A client streams a turn, then the service process is killed while the
reply still has seconds to run. The restarted service closes the turn
(`TurnInterrupted`, its start-up recovery), and a client resuming from the
last sequence it saw, or from any earlier one, gets exactly the events it
had after that number, with the same numbers and contents, then what the
log holds beyond them and the turn's end. (tests/conversation/test_process_restart.py covers the log after such a
restart: the interrupted turn, the hash chain and the next turn.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_processes import ServeProcess
from worker_processes import WorkerProcess, start_scripted_worker

from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc

pytestmark = pytest.mark.timeout(120)

# One-character-ish tokens 5 ms apart for ~10 s: the kill comes long before
# the end, and between two of the service's text flushes (0.25 s) the
# client is shown many pieces.
SCRIPT: dict[str, Any] = {
    "model": "scripted-crash",
    "replies": [{"match": "long", "text": "tick " * 1000, "token_delay_ms": 5}],
    "default": {"text": "Fine."},
}
SEEN_BEFORE_KILL = 40


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[WorkerProcess]:
    started = start_scripted_worker(SCRIPT, tmp_path)
    yield started
    started.kill()


async def _resume(
    stub: sgrpc.ConversationServiceStub, name: str, turn_id: str, after: int
) -> list[spb.TurnEvent]:
    call = stub.StreamTurn(
        spb.StreamTurnRequest(
            resume=spb.ResumeTurn(conversation=name, turn_id=turn_id, after_sequence=after)
        ),
        timeout=20,
    )
    return [response.event async for response in call]


async def test_a_resume_after_a_service_crash_gets_what_followed_and_the_end(
    database_url: str, worker: WorkerProcess, tmp_path: Path
) -> None:
    serve = ServeProcess(
        tmp_path / "serve.log", tmp_path / "data", database_url=database_url, worker=worker.target
    )
    serve.start()
    seen: list[spb.TurnEvent] = []
    try:
        async with serve.channel() as channel:
            stub = sgrpc.ConversationServiceStub(channel)
            created = await stub.CreateConversation(
                spb.CreateConversationRequest(request_id="c"), timeout=10
            )
            name = created.conversation.name
            call = stub.StreamTurn(
                spb.StreamTurnRequest(
                    start=spb.TurnInput(conversation=name, content="a long story", request_id="1")
                ),
                timeout=60,
            )
            async for response in call:
                seen.append(response.event)
                texts = sum(e.HasField("text_delta") for e in seen)
                if texts >= SEEN_BEFORE_KILL:
                    # The moment a piece arrives: the reply has ~9 s to go.
                    serve.kill_alone()
                    killed_at = time.monotonic()
                    break
            call.cancel()
    finally:
        serve.kill()
    assert sum(e.HasField("text_delta") for e in seen) >= SEEN_BEFORE_KILL
    assert not any(e.HasField("turn_ended") for e in seen)
    turn_id = seen[0].turn_id
    assert [e.sequence for e in seen] == list(range(1, len(seen) + 1))
    last = seen[-1].sequence

    serve.start()  # its start-up recovery closes the dead replica's turn
    restarted_s = time.monotonic() - killed_at
    try:
        async with serve.channel() as channel:
            stub = sgrpc.ConversationServiceStub(channel)
            resumed_at = time.monotonic()
            from_last = await _resume(stub, name, turn_id, last)
            resume_s = time.monotonic() - resumed_at
            # After the last it saw: what the log holds beyond it (the rest
            # of a flush it had not read yet), numbered on from it, then the
            # end. Nothing shown before the kill is missing from the log.
            assert from_last, "the resumed stream is empty"
            assert [e.sequence for e in from_last] == list(
                range(last + 1, last + 1 + len(from_last))
            )
            assert [e.WhichOneof("kind") for e in from_last[:-1]] == ["text_delta"] * (
                len(from_last) - 1
            )
            end = from_last[-1]
            assert end.turn_ended.turn.status == pb.TURN_STATUS_INTERRUPTED
            # After any earlier number: the very events it was shown after
            # that number (same numbers, same contents), then the same rest.
            for after in (last - 1, last - SEEN_BEFORE_KILL // 2, 0):
                resumed = await _resume(stub, name, turn_id, after)
                assert resumed == [*seen[after:], *from_last], f"resumed after {after}"
            got = await stub.GetConversation(spb.GetConversationRequest(name=name), timeout=10)
            assert [t.status for t in got.conversation.turns] == [pb.TURN_STATUS_INTERRUPTED]
    finally:
        serve.stop()
    print(
        f"\nFAULT service SIGKILLed mid-StreamTurn: restarted and recovered in "
        f"{restarted_s:.2f} s; resume after the last of {last} events seen: "
        f"{len(from_last)} more and the end in {resume_s * 1000:.0f} ms"
    )
