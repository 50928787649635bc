"""The Go client's example program against a live `turnlog serve` (clients/go/cmd/example).

The example prints one JSON line per step; these tests assert on those
lines and compare what the Go client read with what the service's Python
side reads and folds for the same conversation.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import grpc
import pytest
from compare import compare_summary
from google.protobuf import json_format
from live_service import FORECAST_REPLY, STORY, GoPrograms, Service

from turnlog.auth.channel import bearer_metadata
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb

# The first test builds the Go programs (about 20 s cold on two cores) inside its time.
pytestmark = pytest.mark.timeout(300)

CUT_AFTER = 3
PAGE_SIZE = 10


def run_example(
    go: GoPrograms, service: Service, *args: str, token: str | None = None
) -> tuple[int, list[dict[str, Any]], str]:
    """Runs the example; its exit code, its JSON lines by step order, its stderr."""
    done = subprocess.run(
        [go.example, "-addr", service.target, "-plaintext", *args],
        env={**os.environ, "TURNLOG_TOKEN": service.token if token is None else token},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return done.returncode, lines, done.stderr


def by_step(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    steps = {line["step"]: line for line in lines}
    assert len(steps) == len(lines), "a step printed twice"
    return steps


def stub(service: Service) -> tuple[grpc.Channel, sgrpc.ConversationServiceStub]:
    channel = grpc.insecure_channel(service.target)
    return channel, sgrpc.ConversationServiceStub(channel)


def python_typed_history(service: Service, conversation: str) -> list[dict[str, Any]]:
    """The conversation's events as the Python client reads them (one page, EVENT_VIEW_TYPED)."""
    channel, api = stub(service)
    with channel:
        page = api.ReadEvents(
            spb.ReadEventsRequest(
                conversation=conversation, page_size=1000, view=hpb.EVENT_VIEW_TYPED
            ),
            metadata=bearer_metadata(service.token),
        )
    assert not page.next_page_token
    events = []
    for event in page.events:
        member = event.WhichOneof("event")
        entry: dict[str, Any] = {"version": event.version, "type": event.type, "member": member}
        if member is None:
            entry |= {"typed": None, "data_json": event.data_json}
        else:
            entry["typed"] = json_format.MessageToDict(
                getattr(event, member), preserving_proto_field_name=True
            )
        events.append(entry)
    return events


def folded_conversation(service: Service, conversation: str) -> pb.Conversation:
    """The conversation as the service folds it from its log."""
    channel, api = stub(service)
    with channel:
        return api.GetConversation(
            spb.GetConversationRequest(name=conversation), metadata=bearer_metadata(service.token)
        ).conversation


def service_head(service: Service, conversation: str, events: int) -> str:
    """The hash of the conversation's last event, which the service verifies as intact."""
    channel, api = stub(service)
    with channel:
        verified = api.VerifyConversation(
            spb.VerifyConversationRequest(name=conversation),
            metadata=bearer_metadata(service.token),
        )
        assert verified.intact
        assert verified.last_version == events
        [last] = api.ReadEvents(
            spb.ReadEventsRequest(conversation=conversation, after_version=events - 1),
            metadata=bearer_metadata(service.token),
        ).events
    return last.hash.hex()


def test_example_runs_every_step(go_programs: GoPrograms, service: Service) -> None:
    code, lines, stderr = run_example(
        go_programs, service, "-cut-after", str(CUT_AFTER), "-page-size", str(PAGE_SIZE)
    )
    assert code == 0, f"{lines}\n{stderr}"
    steps = by_step(lines)
    assert list(steps) == [
        "invalid_request",
        "create",
        "stream",
        "resume",
        "converse",
        "cancel",
        "history",
        "verify",
    ]

    # A refusal shows its status and ErrorInfo; nothing was created.
    refused = steps["invalid_request"]["error"]
    assert refused["code"] == "InvalidArgument"
    assert refused["reason"] == "INVALID_REQUEST"
    assert refused["domain"] == "turnlog.dev"

    conversation = steps["create"]["conversation"]
    assert conversation.startswith("conversations/")

    # The resumed stream continues at exactly the next sequence: no gap, no repeat.
    stream, resume = steps["stream"], steps["resume"]
    assert stream["sequences"] == list(range(1, CUT_AFTER + 1))
    assert resume["turn_id"] == stream["turn_id"]
    assert resume["after_sequence"] == CUT_AFTER
    assert resume["sequences"]
    assert resume["sequences"] == list(
        range(CUT_AFTER + 1, CUT_AFTER + 1 + len(resume["sequences"]))
    )
    assert resume["status"] == "TURN_STATUS_COMPLETED"
    assert stream["text"] + resume["text"] == STORY

    # The model called the client-side tool; the client's result reached the turn.
    converse = steps["converse"]
    [call] = converse["tool_calls"]
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments_json"]) == {"city": "Paris"}
    [sent] = converse["tool_results_sent"]
    assert sent["call_id"] == call["call_id"]
    assert json.loads(sent["result"])["forecast"].startswith("sunny")
    assert converse["tools_finished"] == [sent]
    assert converse["assistant_message"] == FORECAST_REPLY
    assert converse["status"] == "TURN_STATUS_COMPLETED"
    assert converse["sequences"] == list(range(1, len(converse["sequences"]) + 1))

    cancelled = steps["cancel"]
    assert cancelled["status"] == "TURN_STATUS_CANCELLED"

    # The typed history the Go client paged through is what Python reads ...
    history = steps["history"]
    assert history["conversation"] == conversation
    python_events = python_typed_history(service, conversation)
    assert len(python_events) > PAGE_SIZE
    # Every page was read (a full last page may be followed by an empty one).
    assert history["pages"] >= -(-len(python_events) // PAGE_SIZE)
    assert compare_summary({"events": python_events}, {"events": history["events"]}) == []
    assert [e["version"] for e in history["events"]] == list(range(1, len(python_events) + 1))
    completed = [e["typed"] for e in history["events"] if e["type"] == "ToolCallCompleted"]
    assert completed == [
        {"turn_id": converse["turn_id"], "call_id": call["call_id"], "result": sent["result"]}
    ]

    # ... and what the service folds from it.
    folded = folded_conversation(service, conversation)
    assert [(t.turn_id, pb.TurnStatus.Name(t.status)) for t in folded.turns] == [
        (stream["turn_id"], "TURN_STATUS_COMPLETED"),
        (converse["turn_id"], "TURN_STATUS_COMPLETED"),
        (cancelled["turn_id"], "TURN_STATUS_CANCELLED"),
    ]
    assert [e["member"] for e in history["events"]].count("turn_started") == 3

    # The Go client recomputed the chain the database wrote, to the service's head.
    verified = steps["verify"]
    assert verified["intact"] is True, verified["problem"]
    assert verified["events"] == len(python_events)
    assert verified["head_hash"] == service_head(service, conversation, len(python_events))


def test_example_reports_status_and_reason(go_programs: GoPrograms, service: Service) -> None:
    """A refused call prints its gRPC status and ErrorInfo reason and exits 1."""
    code, lines, _ = run_example(go_programs, service, token="not-a-valid-token")
    assert code == 1
    [line] = lines
    assert line["step"] == "invalid_request"
    assert line["error"]["code"] == "Unauthenticated"
    assert line["error"]["reason"] == "CREDENTIAL_MALFORMED"
    assert line["error"]["domain"] == "turnlog.dev"
    assert "not-a-valid-token" not in json.dumps(line)


def test_example_keeps_the_token_off_plain_text(go_programs: GoPrograms, service: Service) -> None:
    """Without -plaintext the example insists on TLS, so it cannot talk to a plain-text port."""
    done = subprocess.run(
        [go_programs.example, "-addr", service.target, "-timeout", "3s"],
        env={**os.environ, "TURNLOG_TOKEN": service.token},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    [line] = [json.loads(x) for x in done.stdout.splitlines()]
    assert line["step"] == "connect"
