"""ATIF export: every trajectory validates against the ATIF-v1.8 schema and keeps the log's facts.

Pure tests: event sequences are built from the domain dataclasses (and, for
the log's form, `RecordedEvent`s encoded with the codec); no database.

The schema is `atif-v1.8.schema.json` beside this file (see its `$comment`
and docs/atif.md). The rules of the ATIF reference models that JSON Schema
cannot state are checked by `assert_valid_atif` here.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from domain.test_domain import conversations
from hypothesis import given, settings
from hypothesis import strategies as st

from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.history.atif import ATIF_SCHEMA_VERSION, export_atif
from turnlog.storage.port import RecordedEvent, encode_json

SCHEMA = json.loads((Path(__file__).parent / "atif-v1.8.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

_ENDS = (ev.TurnCompleted, ev.TurnFailed, ev.TurnCancelled, ev.TurnBlocked, ev.TurnInterrupted)


def assert_valid_atif(trajectory: dict[str, Any]) -> None:
    """The schema, plus the reference models' rules that JSON Schema cannot express."""
    errors = sorted(VALIDATOR.iter_errors(trajectory), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]
    assert (
        trajectory["schema_version"]
        == SCHEMA["$defs"]["Trajectory"]["properties"]["schema_version"]["default"]
    )
    for i, step in enumerate(trajectory["steps"]):
        assert step["step_id"] == i + 1  # sequential from 1
        if "timestamp" in step:
            datetime.fromisoformat(step["timestamp"].replace("Z", "+00:00"))
        call_ids = {c["tool_call_id"] for c in step.get("tool_calls", [])}
        for result in step.get("observation", {}).get("results", []):
            if result.get("source_call_id") is not None:
                assert result["source_call_id"] in call_ids
    # Strict JSON: no NaN, no tuples, no other types.
    assert json.loads(json.dumps(trajectory, allow_nan=False)) == trajectory


# --- event streams -----------------------------------------------------------------

decisions = st.builds(
    ev.GuardrailDecided,
    turn_id=st.just(""),
    stage=st.sampled_from(ev.GuardrailStage),
    guardrail=st.sampled_from(["pii", "toxicity", "topic"]),
    guardrail_version=st.just("1"),
    verdict=st.sampled_from(ev.Verdict),
    reason=st.text(max_size=10),
)


@st.composite
def streams(draw: st.DrawFn) -> list[ev.Event]:
    """Valid conversation streams with guardrail decisions, blocked turns and forks."""
    events: list[ev.Event] = []
    open_turn = ""
    for event in draw(conversations()):
        events.append(event)
        if isinstance(event, ev.TurnStarted):
            open_turn = event.turn_id
        elif isinstance(event, _ENDS):
            open_turn = ""
        if open_turn and draw(st.integers(0, 4)) == 0:
            events.append(_with_turn(draw(decisions), open_turn))
    turns = [e.turn_id for e in events if isinstance(e, ev.TurnStarted)]
    if turns and draw(st.booleans()):
        if isinstance(events[-1], _ENDS):
            events.pop()
        events.append(
            ev.TurnBlocked(
                turn_id=turns[-1],
                blocked_at_us=draw(st.integers(0, 2**62)),
                stage=ev.GuardrailStage.SANITIZE_RESPONSE,
                guardrail="pii",
                reason="blocked",
            )
        )
    if draw(st.booleans()):
        created = events[0]
        assert isinstance(created, ev.ConversationCreated)
        cut = draw(st.integers(1, len(events)))
        fork = ev.ConversationForked(
            conversation_id=created.conversation_id + "-fork",
            source_conversation_id=created.conversation_id,
            source_version=cut,
            forked_at_us=draw(st.integers(0, 2**62)),
        )
        events = [fork, *events[:cut]]
    return events


def _with_turn(decision: ev.GuardrailDecided, turn_id: str) -> ev.GuardrailDecided:
    return ev.GuardrailDecided(
        turn_id=turn_id,
        stage=decision.stage,
        guardrail=decision.guardrail,
        guardrail_version=decision.guardrail_version,
        verdict=decision.verdict,
        reason=decision.reason,
    )


def recorded(events: list[ev.Event], stream_id: str = "conversation-c") -> list[RecordedEvent]:
    """The events as the log returns them."""
    base = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    out = []
    for i, event in enumerate(events):
        type_name, data = codec.encode(event)
        out.append(
            RecordedEvent(
                global_position=i + 1,
                transaction_id=i + 1,
                stream_id=stream_id,
                stream_version=i + 1,
                event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{stream_id}/{i}"),
                type=type_name,
                data_json=encode_json(data),
                metadata_json="{}",
                recorded_at=base + timedelta(milliseconds=i),
                prev_hash=b"",
                hash=b"",
            )
        )
    return out


def _steps_with(trajectory: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return [s for s in trajectory["steps"] if key in s]


# --- properties ------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(streams())
def test_every_export_validates_against_the_atif_schema(events: list[ev.Event]) -> None:
    assert_valid_atif(export_atif(events))
    assert_valid_atif(export_atif(recorded(events)))


@settings(max_examples=100, deadline=None)
@given(streams())
def test_export_is_deterministic(events: list[ev.Event]) -> None:
    first = json.dumps(export_atif(events), sort_keys=True)
    assert json.dumps(export_atif(list(events)), sort_keys=True) == first
    log = recorded(events)
    assert export_atif(log) == export_atif(recorded(events))


@settings(max_examples=100, deadline=None)
@given(streams())
def test_final_metrics_are_the_sums_over_steps(events: list[ev.Event]) -> None:
    trajectory = export_atif(events)
    steps = trajectory["steps"]
    final = trajectory["final_metrics"]
    for total, key in [
        ("total_prompt_tokens", "prompt_tokens"),
        ("total_completion_tokens", "completion_tokens"),
        ("total_cached_tokens", "cached_tokens"),
    ]:
        assert final[total] == sum(s.get("metrics", {}).get(key, 0) for s in steps)
    assert final["total_steps"] == len(steps)
    completed = [e for e in events if isinstance(e, ev.GenerationCompleted)]
    assert final["total_completion_tokens"] == sum(g.usage.completion_tokens for g in completed)


@settings(max_examples=100, deadline=None)
@given(streams())
def test_tool_calls_pair_with_their_observations(events: list[ev.Event]) -> None:
    trajectory = export_atif(events)
    by_call = {
        c["tool_call_id"]: step for step in trajectory["steps"] for c in step.get("tool_calls", [])
    }
    for event in events:
        if isinstance(event, ev.GenerationCompleted):
            for call in event.tool_calls:
                step = by_call[call.call_id]
                assert step["source"] == "agent"
                assert step["extra"]["generation"]["generation_id"] == event.generation_id
        if isinstance(event, ev.ToolCallCompleted):
            results = by_call[event.call_id]["observation"]["results"]
            assert {"source_call_id": event.call_id, "content": event.result} in results


@settings(max_examples=100, deadline=None)
@given(streams())
def test_every_guardrail_decision_and_turn_is_kept_under_extra(events: list[ev.Event]) -> None:
    trajectory = export_atif(events)
    kept = [
        d for s in trajectory["steps"] for d in s.get("extra", {}).get("guardrail_decisions", [])
    ]
    kept += [d for t in trajectory["extra"]["turns"] for d in t.get("guardrail_decisions", [])]
    decided = [e for e in events if isinstance(e, ev.GuardrailDecided)]
    assert len(kept) == len(decided)
    assert sorted(d["guardrail"] for d in kept) == sorted(d.guardrail for d in decided)
    started = [e.turn_id for e in events if isinstance(e, ev.TurnStarted)]
    assert [t["turn_id"] for t in trajectory["extra"]["turns"]] == started
    blocked = {e.turn_id for e in events if isinstance(e, ev.TurnBlocked)}
    for turn in trajectory["extra"]["turns"]:
        assert (turn["status"] == "blocked") == (turn["turn_id"] in blocked)


# --- examples ------------------------------------------------------------------------

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z


def _tool_conversation() -> list[ev.Event]:
    sampling = ev.SamplingParams(temperature=0.0, seed=7, max_tokens=64)
    call = ev.ToolCall(call_id="call-1", name="weather", arguments_json='{"city": "Oslo"}')
    return [
        ev.ConversationCreated(
            conversation_id="c1",
            created_at_us=T0,
            system_prompt="Be brief.",
            model="tiny",
            sampling=sampling,
            tools=(
                ev.ToolDefinition(
                    name="weather",
                    description="Weather now",
                    parameters_json_schema='{"type": "object"}',
                ),
            ),
            guardrail_profile="default",
        ),
        ev.TurnStarted(turn_id="t1", request_id="r1", started_at_us=T0 + 1_000_000),
        ev.MessageAppended(message_id="m1", role=ev.Role.USER, content="Oslo?", turn_id="t1"),
        ev.GuardrailDecided(
            turn_id="t1",
            stage=ev.GuardrailStage.REQUEST_INTERCEPT,
            guardrail="pii",
            guardrail_version="1",
            verdict=ev.Verdict.ALLOW,
        ),
        ev.GenerationStarted(
            turn_id="t1", generation_id="t1/1", worker="w1", model="tiny", sampling=sampling
        ),
        ev.GenerationCompleted(
            turn_id="t1",
            generation_id="t1/1",
            text="",
            token_ids=(5, 6, 7),
            finish_reason=ev.FinishReason.TOOL_CALLS,
            usage=ev.Usage(prompt_tokens=20, completion_tokens=3, cached_prompt_tokens=4),
            model="tiny",
            sampling=sampling,
            tool_calls=(call,),
        ),
        ev.ToolCallRequested(turn_id="t1", call=call),
        ev.ToolCallCompleted(turn_id="t1", call_id="call-1", result="-3 C"),
        ev.GenerationStarted(
            turn_id="t1", generation_id="t1/2", worker="w1", model="tiny", sampling=sampling
        ),
        ev.GenerationCompleted(
            turn_id="t1",
            generation_id="t1/2",
            text="Cold: -3 C.",
            token_ids=(8, 9),
            finish_reason=ev.FinishReason.STOP,
            usage=ev.Usage(prompt_tokens=30, completion_tokens=2, cached_prompt_tokens=20),
            model="tiny",
            sampling=sampling,
        ),
        ev.TurnCompleted(
            turn_id="t1",
            completed_at_us=T0 + 2_000_000,
            finish_reason=ev.FinishReason.STOP,
            usage=ev.Usage(prompt_tokens=50, completion_tokens=5, cached_prompt_tokens=24),
        ),
    ]


def test_a_tool_conversation_maps_onto_atif_fields() -> None:
    trajectory = export_atif(_tool_conversation(), agent_version="9.9")
    assert_valid_atif(trajectory)
    assert trajectory["schema_version"] == ATIF_SCHEMA_VERSION == "ATIF-v1.8"
    assert trajectory["session_id"] == "c1"
    assert trajectory["agent"] == {
        "name": "turnlog",
        "version": "9.9",
        "model_name": "tiny",
        "tool_definitions": [
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "description": "Weather now",
                    "parameters": {"type": "object"},
                },
            }
        ],
        "extra": {
            "guardrail_profile": "default",
            "sampling": {"temperature": 0.0, "max_tokens": 64, "seed": 7},
        },
    }
    system, user, call, answer = trajectory["steps"]
    assert (system["source"], system["message"]) == ("system", "Be brief.")
    assert system["timestamp"] == "2026-01-01T00:00:00.000000Z"
    assert (user["source"], user["message"]) == ("user", "Oslo?")
    assert user["extra"]["turn_id"] == "t1"
    assert user["extra"]["guardrail_decisions"] == [
        {
            "stage": "request_intercept",
            "guardrail": "pii",
            "guardrail_version": "1",
            "verdict": "allow",
            "reason": "",
            "before_digest": "",
            "after_digest": "",
        }
    ]
    assert call["source"] == "agent"
    assert "model_name" not in call  # the agent's model
    assert call["tool_calls"] == [
        {"tool_call_id": "call-1", "function_name": "weather", "arguments": {"city": "Oslo"}}
    ]
    assert call["observation"] == {"results": [{"source_call_id": "call-1", "content": "-3 C"}]}
    assert call["metrics"] == {
        "prompt_tokens": 20,
        "completion_tokens": 3,
        "cached_tokens": 4,
        "completion_token_ids": [5, 6, 7],
    }
    assert call["llm_call_count"] == 1
    assert call["extra"]["generation"]["finish_reason"] == "tool_calls"
    assert call["extra"]["generation"]["worker"] == "w1"
    assert answer["message"] == "Cold: -3 C."
    assert trajectory["final_metrics"] == {
        "total_prompt_tokens": 50,
        "total_completion_tokens": 5,
        "total_cached_tokens": 24,
        "total_steps": 4,
        "extra": {"turns": 1, "turns_by_status": {"completed": 1}, "generations": 2},
    }
    (turn,) = trajectory["extra"]["turns"]
    assert turn["status"] == "completed"
    assert turn["finish_reason"] == "stop"
    assert turn["usage"] == {"prompt_tokens": 50, "completion_tokens": 5, "cached_tokens": 24}
    assert turn["step_ids"] == [2, 3, 4]


def test_a_conversation_without_tools_or_system_prompt() -> None:
    events: list[ev.Event] = [
        ev.ConversationCreated(conversation_id="c2", created_at_us=T0),
        ev.TurnStarted(turn_id="t1", request_id="r1", started_at_us=T0),
        ev.MessageAppended(message_id="m1", role=ev.Role.USER, content="hi", turn_id="t1"),
        ev.GenerationCompleted(
            turn_id="t1",
            generation_id="g1",
            text="hello",
            token_ids=(),
            finish_reason=ev.FinishReason.STOP,
            usage=ev.Usage(prompt_tokens=3, completion_tokens=1),
            model="m",
            sampling=ev.SamplingParams(),
        ),
        ev.TurnCompleted(turn_id="t1", completed_at_us=T0, finish_reason=ev.FinishReason.STOP),
    ]
    trajectory = export_atif(events, model_name="served-model")
    assert_valid_atif(trajectory)
    assert [s["source"] for s in trajectory["steps"]] == ["system", "user", "agent"]
    agent_step = trajectory["steps"][2]
    assert agent_step["model_name"] == "m"  # differs from the agent's model
    assert "completion_token_ids" not in agent_step["metrics"]  # none recorded
    assert "tool_calls" not in agent_step
    assert "tool_definitions" not in trajectory["agent"]


def test_a_blocked_generation_keeps_the_decision_and_the_visible_text() -> None:
    events = _tool_conversation()[:5]  # up to the first GenerationStarted
    events += [
        ev.TextStreamed(turn_id="t1", generation_id="t1/1", pieces=("My card is ", "4111")),
        ev.TextRetracted(turn_id="t1", generation_id="t1/1", start=11, end=15, reason="pii"),
        ev.GuardrailDecided(
            turn_id="t1",
            stage=ev.GuardrailStage.SANITIZE_RESPONSE,
            guardrail="pii",
            guardrail_version="1",
            verdict=ev.Verdict.BLOCK,
            reason="card number",
        ),
        ev.TurnBlocked(
            turn_id="t1",
            blocked_at_us=T0 + 3,
            stage=ev.GuardrailStage.SANITIZE_RESPONSE,
            guardrail="pii",
            reason="card number",
        ),
    ]
    trajectory = export_atif(events)
    assert_valid_atif(trajectory)
    step = trajectory["steps"][-1]
    assert step["source"] == "agent"
    assert step["message"] == "My card is "  # the retracted range is gone
    assert "metrics" not in step
    assert step["extra"]["generation"]["completed"] is False
    assert step["extra"]["retractions"] == [
        {"generation_id": "t1/1", "start": 11, "end": 15, "reason": "pii"}
    ]
    assert step["extra"]["guardrail_decisions"][0]["verdict"] == "block"
    (turn,) = trajectory["extra"]["turns"]
    assert turn["status"] == "blocked"
    assert turn["outcome"] == {
        "stage": "sanitize_response",
        "guardrail": "pii",
        "reason": "card number",
    }
    assert trajectory["final_metrics"]["extra"]["turns_by_status"] == {"blocked": 1}


def test_a_request_blocked_before_generation_has_no_agent_step() -> None:
    events = [
        *_tool_conversation()[:3],
        ev.TurnBlocked(
            turn_id="t1",
            blocked_at_us=T0 + 2,
            stage=ev.GuardrailStage.REQUEST_INTERCEPT,
            guardrail="topic",
            reason="off topic",
        ),
    ]
    trajectory = export_atif(events)
    assert_valid_atif(trajectory)
    assert [s["source"] for s in trajectory["steps"]] == ["system", "user"]
    assert trajectory["extra"]["turns"][0]["status"] == "blocked"


def test_an_interrupted_turn_is_recorded_as_such() -> None:
    events = [
        *_tool_conversation()[:8],  # through the tool result
        ev.GenerationStarted(
            turn_id="t1",
            generation_id="t1/2",
            worker="w1",
            model="tiny",
            sampling=ev.SamplingParams(),
        ),
        ev.TextStreamed(turn_id="t1", generation_id="t1/2", pieces=("Col",)),
        ev.TurnInterrupted(turn_id="t1", detected_at_us=T0 + 9),
    ]
    trajectory = export_atif(events)
    assert_valid_atif(trajectory)
    last = trajectory["steps"][-1]
    assert (last["message"], last["extra"]["generation"]["completed"]) == ("Col", False)
    (turn,) = trajectory["extra"]["turns"]
    assert (turn["status"], turn["ended_at_us"]) == ("interrupted", T0 + 9)


def test_a_fork_marks_the_copied_prefix_and_its_origin() -> None:
    source = _tool_conversation()
    events: list[ev.Event] = [
        ev.ConversationForked(
            conversation_id="c1-fork",
            source_conversation_id="c1",
            source_version=3,
            forked_at_us=T0,
        ),
        *source[:3],
        *[
            ev.TurnCompleted(
                turn_id="t1", completed_at_us=T0 + 5, finish_reason=ev.FinishReason.STOP
            )
        ],
    ]
    trajectory = export_atif(events)
    assert_valid_atif(trajectory)
    assert trajectory["session_id"] == "c1-fork"
    assert trajectory["extra"]["fork_origin"] == {
        "conversation_id": "c1",
        "version": 3,
        "forked_at_us": T0,
    }
    assert [s.get("is_copied_context", False) for s in trajectory["steps"]] == [True, True]
    assert trajectory["extra"]["turns"][0]["is_copied_context"] is True


def test_the_log_form_is_stamped_with_recorded_times() -> None:
    log = recorded(_tool_conversation())
    trajectory = export_atif(log)
    assert_valid_atif(trajectory)
    assert trajectory["steps"][1]["timestamp"] == "2026-01-02T03:04:05.002000Z"
    assert trajectory["steps"][1]["extra"]["version"] == 3
    without_time = export_atif(_tool_conversation())
    for a, b in zip(trajectory["steps"], without_time["steps"], strict=True):
        a.pop("timestamp"), b.pop("timestamp", None)
        assert a == b


def test_malformed_tool_arguments_are_kept_verbatim() -> None:
    events = _tool_conversation()
    bad = ev.ToolCall(call_id="call-1", name="weather", arguments_json="{city: Oslo")
    completed = events[5]
    assert isinstance(completed, ev.GenerationCompleted)
    events[5] = ev.GenerationCompleted(
        turn_id="t1",
        generation_id="t1/1",
        text="",
        token_ids=(),
        finish_reason=ev.FinishReason.TOOL_CALLS,
        usage=completed.usage,
        model="tiny",
        sampling=completed.sampling,
        tool_calls=(bad,),
    )
    trajectory = export_atif(events)
    assert_valid_atif(trajectory)
    assert trajectory["steps"][2]["tool_calls"][0]["arguments"] == {}
    assert trajectory["steps"][2]["tool_calls"][0]["extra"] == {"arguments_json": "{city: Oslo"}


def test_out_of_range_times_leave_the_timestamp_out() -> None:
    events = [ev.ConversationCreated(conversation_id="c", created_at_us=2**62)]
    trajectory = export_atif(events)
    assert_valid_atif(trajectory)
    assert "timestamp" not in trajectory["steps"][0]


def test_what_is_not_a_conversation_is_refused() -> None:
    with pytest.raises(ValueError, match="no events"):
        export_atif([])
    with pytest.raises(ValueError, match="not a valid conversation"):
        export_atif([ev.TurnStarted(turn_id="t", request_id="r", started_at_us=1)])
    mixed = recorded(_tool_conversation()[:2]) + recorded(
        _tool_conversation()[2:3], stream_id="conversation-other"
    )
    with pytest.raises(ValueError, match="more than one stream"):
        export_atif(mixed)


def test_the_schema_rejects_what_atif_forbids() -> None:
    good = export_atif(_tool_conversation())
    bad_user_metrics = json.loads(json.dumps(good))
    bad_user_metrics["steps"][1]["metrics"] = {"prompt_tokens": 1}
    bad_version = {**good, "schema_version": "ATIF-v9"}
    bad_field = {**good, "turns": []}
    for bad in (bad_user_metrics, bad_version, bad_field, {**good, "steps": []}):
        assert not VALIDATOR.is_valid(bad)
