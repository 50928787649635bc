"""The Node client's quickstart (clients/node/examples/quickstart.mjs) against a live `turnlog serve`.

A real `turnlog serve` subprocess (conftest's `service`, on this test's own
database) over a scripted worker (`turnlog worker --backend scripted`, on
the example's own script, so that the model reliably calls the client-side
tool) is driven by the example under `node`, exactly as a Node developer
would run it; its JSON lines are then checked against what the service
itself says, read here in Python over gRPC.

Node and the package's modules are part of the test environment (`make
clients-node-install`): when they are missing the test fails, it never skips.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from live_service import NODE_CLIENT, Service, node_executable
from worker_processes import WorkerProcess, start_scripted_worker

from turnlog.auth.channel import credentialed_channel
from turnlog.v1 import conversation_pb2 as cpb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = NODE_CLIENT / "examples" / "quickstart.mjs"
SCRIPT = NODE_CLIENT / "examples" / "quickstart-script.json"
#: Events the example reads before it cuts the connection: past the turn's
#: start and request guardrail decisions, into the streamed text.
CUT_AFTER = 8
PAGE_SIZE = 10


@pytest.fixture
def scripted_worker(tmp_path: Path) -> Iterator[WorkerProcess]:
    """conftest's `service` runs over this: the script the Node README gives developers."""
    worker = start_scripted_worker(json.loads(SCRIPT.read_text()), tmp_path)
    yield worker
    worker.terminate(timeout_s=10)


def run_quickstart(service: Service, *args: str, token: str | None = None) -> tuple[int, list[Any]]:
    """Runs the example; returns its exit status and its JSON lines."""
    done = subprocess.run(
        [node_executable(), str(QUICKSTART), service.target, *args],
        cwd=NODE_CLIENT,
        env={**os.environ, "TURNLOG_TOKEN": service.token if token is None else token},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.stderr == "", done.stderr
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def sequences(events: list[dict[str, Any]]) -> list[int]:
    return [e["sequence"] for e in events]


async def test_quickstart_streams_resumes_answers_the_tool_cancels_and_reads_typed_history(
    service: Service,
) -> None:
    code, lines = run_quickstart(
        service, "--cut-after", str(CUT_AFTER), "--page-size", str(PAGE_SIZE)
    )
    assert code == 0, lines
    steps = {line["step"]: line for line in lines}
    assert [line["step"] for line in lines] == [
        "create",
        "stream",
        "resume",
        "converse",
        "cancel",
        "history",
        "verify",
    ]
    name = steps["create"]["conversation"]

    # 1-2. The stream was cut while the turn ran, and the resume on a new
    # connection continued at exactly the next number, to the turn's end.
    stream, resume = steps["stream"], steps["resume"]
    assert stream["cut"] is True
    assert sequences(stream["events"]) == list(range(1, CUT_AFTER + 1))
    assert stream["events"][-1]["kind"] != "turnEnded"
    assert resume["turn_id"] == stream["turn_id"]
    assert resume["after_sequence"] == CUT_AFTER
    total = CUT_AFTER + len(resume["events"])
    assert sequences(resume["events"]) == list(range(CUT_AFTER + 1, total + 1))
    assert resume["events"][-1]["kind"] == "turnEnded"
    assert resume["status"] == "TURN_STATUS_COMPLETED"
    assert "textDelta" in [e["kind"] for e in resume["events"]]

    async with credentialed_channel(service.target, service.token) as channel:
        stub = sgrpc.ConversationServiceStub(channel)
        # What a watcher resuming from the start is sent: the very events the
        # example saw before and after its cut, nothing missing or repeated.
        replay = [
            r.event
            async for r in stub.StreamTurn(
                spb.StreamTurnRequest(
                    resume=spb.ResumeTurn(conversation=name, turn_id=stream["turn_id"])
                )
            )
        ]
        assert [e.sequence for e in replay] == list(range(1, total + 1))
        seen = stream["events"] + resume["events"]
        assert [_camel(e.WhichOneof("kind")) for e in replay] == [e["kind"] for e in seen]

        # 3. The model called the client-side tool; the example's result reached
        # the turn (its ToolExecutionFinished, the log) and the model's next prompt.
        converse = steps["converse"]
        assert converse["status"] == "TURN_STATUS_COMPLETED"
        assert converse["rejected"] == []
        assert [(c["name"], json.loads(c["arguments"])) for c in converse["tool_calls"]] == [
            ("get_weather", {"city": "Paris"})
        ]
        result = {"city": "Paris", "forecast": "sunny", "celsius": 21}
        call_id = converse["tool_calls"][0]["call_id"]
        assert [(r["call_id"], json.loads(r["result"])) for r in converse["tool_results"]] == [
            (call_id, result)
        ]
        conversation = (
            await stub.GetConversation(spb.GetConversationRequest(name=name))
        ).conversation
        turn_messages = [m for m in conversation.messages if m.turn_id == converse["turn_id"]]
        tool_messages = [m for m in turn_messages if m.role == cpb.ROLE_TOOL]
        assert [(m.tool_call_id, json.loads(m.content)) for m in tool_messages] == [
            (call_id, result)
        ]
        # The scripted model answers "sunny" only when a prompt holds the result.
        assert turn_messages[-1].role == cpb.ROLE_ASSISTANT
        assert turn_messages[-1].content == "It is sunny in Paris, 21 degrees."

        # 4. The turn cancelled with CancelTurn from a second connection ended
        # CANCELLED on the first, long before the scripted reply's ~12 s of
        # text could end it otherwise.
        cancel = steps["cancel"]
        kinds = [e["kind"] for e in cancel["events"]]
        assert kinds[0] == "turnStarted"
        assert kinds[-1] == "turnEnded"
        assert cancel["status"] == cancel["cancel_status"] == "TURN_STATUS_CANCELLED"
        assert cancel["reason"] == "the quickstart cancels it"
        conversation = (
            await stub.GetConversation(spb.GetConversationRequest(name=name))
        ).conversation
        turn = next(t for t in conversation.turns if t.turn_id == cancel["turn_id"])
        assert turn.status == cpb.TURN_STATUS_CANCELLED

        # 5. The typed history the example paged through is the server's.
        history = steps["history"]
        expected: list[hpb.LogEvent] = []
        page_token = ""
        while True:
            page = await stub.ReadEvents(
                spb.ReadEventsRequest(
                    conversation=name,
                    view=hpb.EVENT_VIEW_TYPED,
                    page_size=1000,
                    page_token=page_token,
                )
            )
            expected.extend(page.events)
            page_token = page.next_page_token
            if not page_token:
                break
    assert len(expected) > PAGE_SIZE
    assert history["pages"] >= -(-len(expected) // PAGE_SIZE)  # it paged, PAGE_SIZE at a time
    assert history["versions"] == list(range(1, len(expected) + 1))
    assert history["types"] == [e.type for e in expected]
    assert history["members"] == [e.WhichOneof("event") for e in expected]
    assert None not in history["members"]
    read_by_node = [json_format.ParseDict(e, hpb.LogEvent()) for e in history["events"]]
    assert read_by_node == expected
    # 6. The chain Node verified from the raw events is the stored one.
    assert steps["verify"] == {
        "step": "verify",
        "intact": True,
        "events": len(expected),
        "head_hash": expected[-1].hash.hex(),
        "service": {"intact": True, "last_version": len(expected)},
    }
    # The three turns' events are all there, typed.
    assert history["types"].count("TurnCompleted") == 2
    assert "ToolCallCompleted" in history["types"]
    assert history["types"][-1] == "TurnCancelled"


async def test_quickstart_reports_the_grpc_code_and_errorinfo_reason(service: Service) -> None:
    code, lines = run_quickstart(service, token="not-a-token")
    assert code == 1
    assert lines == [
        {
            "step": "create",
            "error": {
                "code": "UNAUTHENTICATED",
                "reason": "CREDENTIAL_MALFORMED",
                "message": "the bearer token is not a JWT",
                "metadata": {"retryable": "false"},
            },
        }
    ]


def _camel(member: str | None) -> str:
    """A oneof member's proto name as protobuf-es names it (turn_ended → turnEnded)."""
    assert member is not None
    head, *rest = member.split("_")
    return head + "".join(part.title() for part in rest)
