"""Golden logs: exported conversations committed under golden/ keep replaying.

Each `golden/<name>.jsonl` was recorded by the service code of its day
(`golden/make_golden.py`) and is never regenerated; `<name>.transcript.txt`
is the transcript it replayed to then. The current code must verify each log,
replay it to the same transcript from the file (no database) and from the
database after an import, and export it again byte for byte, whatever event
shapes have changed since (upcasting).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from turnlog.conversation.application import ConversationApplication, CreateConversation
from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.domain.state import TurnStatus, fold
from turnlog.history import jsonl
from turnlog.history.service import ForkCommand, HistoryService
from turnlog.history.transcript import build_transcript, render_transcript
from turnlog.storage import PostgresEventStore, RecordedEvent

GOLDEN = Path(__file__).parent / "golden"
NAMES = ["plain", "tools", "guardrails", "fork", "interrupted"]


def recorded(name: str) -> list[RecordedEvent]:
    data = (GOLDEN / f"{name}.jsonl").read_bytes()
    return [e.to_recorded() for e in jsonl.read_jsonl(jsonl.split_lines(data))]


def committed_transcript(name: str) -> str:
    return (GOLDEN / f"{name}.transcript.txt").read_text()


@pytest.mark.parametrize("name", NAMES)
def test_a_golden_log_verifies_and_replays_to_its_transcript_without_a_database(
    name: str,
) -> None:
    data = (GOLDEN / f"{name}.jsonl").read_bytes()
    reports = jsonl.verify_exported(jsonl.split_lines(data))
    assert [r.ok for r in reports] == [True]
    transcript = build_transcript(recorded(name))
    assert render_transcript(transcript) == committed_transcript(name)


@pytest.mark.parametrize("name", NAMES)
async def test_a_golden_log_imports_replays_from_the_database_and_exports_identically(
    name: str, store: PostgresEventStore
) -> None:
    data = (GOLDEN / f"{name}.jsonl").read_bytes()
    history = HistoryService(store)
    outcome = await history.import_jsonl(data)
    cid = outcome.state.conversation_id
    stored = await store.read_stream(f"conversation-{cid}")
    assert render_transcript(build_transcript(stored)) == committed_transcript(name)
    again = b"".join([chunk async for chunk in history.export_jsonl(cid)])
    assert again == data
    assert (await history.verify(cid)).ok


@pytest.mark.parametrize("name", NAMES)
def test_replay_at_a_version_is_the_prefix_of_the_log(name: str) -> None:
    events = recorded(name)
    domain = [codec.decode_stored(e) for e in events]
    for version in range(1, len(events) + 1):
        transcript = build_transcript(events, at=version)
        assert transcript.state == fold(domain[:version])


def test_the_golden_logs_cover_what_they_promise() -> None:
    """Tools, guardrail blocks (request and response), a fork, an interrupted turn."""
    tools = build_transcript(recorded("tools"))
    assert [o.ok for t in tools.turns for o in t.tool_outcomes] == [True, False, True]
    assert any(isinstance(s, ev.ToolRoundLimitReached) for t in tools.turns for s in t.steps)
    guarded = build_transcript(recorded("guardrails"))
    assert [t.status for t in guarded.turns] == [
        TurnStatus.COMPLETED,
        TurnStatus.BLOCKED,
        TurnStatus.BLOCKED,
    ]
    verdicts = {(d.stage, d.verdict) for t in guarded.turns for d in t.decisions}
    assert (ev.GuardrailStage.SANITIZE_REQUEST, ev.Verdict.MODIFY) in verdicts
    assert (ev.GuardrailStage.CONDITIONAL_EXECUTION, ev.Verdict.BLOCK) in verdicts
    assert (ev.GuardrailStage.SANITIZE_RESPONSE, ev.Verdict.BLOCK) in verdicts
    assert guarded.turns[2].generations[0].retracted
    assert guarded.state.archived
    fork = build_transcript(recorded("fork"))
    assert fork.state.forked_from == ("golden-plain", 27)
    interrupted = build_transcript(recorded("interrupted"))
    assert [t.status for t in interrupted.turns] == [
        TurnStatus.COMPLETED,
        TurnStatus.INTERRUPTED,
        TurnStatus.COMPLETED,
    ]
    assert "".join(interrupted.turns[1].generations[0].streamed).startswith("Once upon")


# -- upcasting: shapes that changed since a golden log was written -----------------


def test_golden_logs_hold_conversation_created_in_its_first_shape() -> None:
    """The logs predate ConversationCreated v2, so replaying them runs the upcaster."""
    assert codec.SCHEMA_VERSION["ConversationCreated"] == 2
    created = recorded("plain")[0]
    assert created.type == "ConversationCreated"
    assert codec.schema_version_of(created.metadata_json) == 1
    assert json.loads(created.data_json)["labels"] == [["env", "golden"], ["team", "replay"]]
    decoded = codec.decode_stored(created)
    assert isinstance(decoded, ev.ConversationCreated)
    assert decoded.labels == (("env", "golden"), ("team", "replay"))


def test_conversation_created_is_written_in_its_current_shape_and_version() -> None:
    event = ev.ConversationCreated(
        conversation_id="c", created_at_us=1, labels=(("a", "1"), ("b", "2"))
    )
    type_name, data = codec.encode(event)
    assert data["labels"] == {"a": "1", "b": "2"}
    assert codec.written_schema_version(type_name) == 2
    assert codec.decode(type_name, data) == event
    assert codec.decode(type_name, {**data, "labels": [["a", "1"], ["b", "2"]]}, 1) == event


def test_data_of_a_newer_shape_than_the_code_is_refused() -> None:
    with pytest.raises(ValueError, match="newer"):
        codec.decode("MessageAppended", {}, schema_version=9)


async def test_new_events_record_their_shape_version_and_both_shapes_replay(
    store: PostgresEventStore,
) -> None:
    app = ConversationApplication(store, None)
    await app.create(
        CreateConversation(conversation_id="today", labels=(("env", "prod"), ("team", "a")))
    )
    (created,) = await store.read_stream("conversation-today")
    assert codec.schema_version_of(created.metadata_json) == 2
    assert json.loads(created.data_json)["labels"] == {"env": "prod", "team": "a"}
    assert build_transcript([created]).state.labels == (("env", "prod"), ("team", "a"))
    # A fork of an imported v1 log copies the v1 event verbatim, beside today's events.
    history = HistoryService(store)
    await history.import_jsonl((GOLDEN / "plain.jsonl").read_bytes())
    forked = await history.fork(ForkCommand(source_id="golden-plain", fork_id="mixed"))
    assert forked.state.labels == (("env", "golden"), ("team", "replay"))
    assert (await history.verify("mixed")).ok
