"""Properties of the pure domain: the codec round-trips and the fold is a fold."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, InvalidTransitionError, TurnStatus, evolve, fold

finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
texts = st.text(max_size=40)
ids = st.uuids().map(str)
micros = st.integers(min_value=0, max_value=2**62)

sampling = st.builds(
    ev.SamplingParams,
    temperature=st.none() | finite_floats,
    top_p=st.none() | finite_floats,
    top_k=st.none() | st.integers(-1, 1000),
    max_tokens=st.none() | st.integers(1, 100_000),
    seed=st.none() | st.integers(0, 2**63 - 1),
    stop=st.lists(texts, max_size=3).map(tuple),
)
st.register_type_strategy(ev.SamplingParams, sampling)
st.register_type_strategy(float, finite_floats)
# The domain's labels invariant: unique keys, sorted.
labels = st.dictionaries(texts, texts, max_size=3).map(lambda d: tuple(sorted(d.items())))
st.register_type_strategy(ev.ConversationCreated, st.builds(ev.ConversationCreated, labels=labels))
st.register_type_strategy(ev.ConversationUpdated, st.builds(ev.ConversationUpdated, labels=labels))
settings_updates = st.builds(
    ev.ConversationUpdated,
    fields=st.sets(st.sampled_from(ev.UPDATABLE_SETTINGS), min_size=1).map(
        lambda paths: tuple(sorted(paths))
    ),
    labels=labels,
    request_id=st.sampled_from(["", "u1", "u2"]),
)

any_event = st.one_of([st.from_type(cls) for cls in ev.EVENT_TYPES])


def _through_storage(event: ev.Event) -> ev.Event:
    """Encode, serialize as the log would, parse and decode."""
    type_name, data = codec.encode(event)
    stored = json.loads(json.dumps(data, allow_nan=False, ensure_ascii=False))
    return codec.decode(type_name, stored)


@given(any_event)
def test_every_event_round_trips_through_its_stored_form(event: ev.Event) -> None:
    assert _through_storage(event) == event


@given(st.from_type(ConversationState))
def test_every_state_round_trips_through_its_snapshot_form(state: ConversationState) -> None:
    data = codec.state_to_json(state)
    stored = json.loads(json.dumps(data, allow_nan=False, ensure_ascii=False))
    assert codec.state_from_json(stored) == state


def test_decoding_ignores_unknown_keys_and_fills_in_defaults() -> None:
    # Data written by a newer release (extra keys) or an older one (fewer keys),
    # and whole floats stored as JSON integers.
    data = {
        "turn_id": "t1",
        "request_id": "r1",
        "started_at_us": 5,
        "sampling": {"temperature": 1, "top_k": 3, "added_later": True},
        "added_later": [1, 2],
    }
    decoded = codec.decode("TurnStarted", data)
    assert decoded == ev.TurnStarted(
        turn_id="t1",
        request_id="r1",
        started_at_us=5,
        sampling=ev.SamplingParams(temperature=1.0, top_k=3),
    )
    assert isinstance(decoded, ev.TurnStarted)
    assert type(decoded.sampling.temperature) is float


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(codec.UnknownEventTypeError):
        codec.decode("NoSuchEvent", {})


def test_old_shapes_are_upcast_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend MessageAppended v2 renamed `content` from a v1 field `text`.
    monkeypatch.setitem(codec.SCHEMA_VERSION, "MessageAppended", 2)

    def v1_to_v2(data: dict[str, object]) -> dict[str, object]:
        data = dict(data)
        data["content"] = data.pop("text")
        return data

    monkeypatch.setitem(codec.UPCASTERS, ("MessageAppended", 1), v1_to_v2)
    v1 = {"message_id": "m1", "role": "user", "text": "hello"}
    decoded = codec.decode("MessageAppended", v1, schema_version=1)
    assert decoded == ev.MessageAppended(message_id="m1", role=ev.Role.USER, content="hello")


# --- conversation scripts: valid event sequences -----------------------------


@st.composite
def turn_events(draw: st.DrawFn, turn_id: str) -> list[ev.Event]:
    events: list[ev.Event] = [
        ev.TurnStarted(turn_id=turn_id, request_id=draw(ids), started_at_us=draw(micros)),
        ev.MessageAppended(
            message_id=draw(ids), role=ev.Role.USER, content=draw(texts), turn_id=turn_id
        ),
    ]
    for _ in range(draw(st.integers(0, 3))):
        gen_id = draw(ids)
        events.append(
            ev.GenerationStarted(
                turn_id=turn_id,
                generation_id=gen_id,
                worker="w",
                model="m",
                sampling=draw(sampling),
            )
        )
        calls = draw(
            st.lists(
                st.builds(ev.ToolCall, call_id=ids, name=texts, arguments_json=st.just("{}")),
                max_size=2,
            )
        )
        pieces = tuple(draw(st.lists(texts, max_size=3)))
        if pieces:
            events.append(ev.TextStreamed(turn_id=turn_id, generation_id=gen_id, pieces=pieces))
        events.append(
            ev.GenerationCompleted(
                turn_id=turn_id,
                generation_id=gen_id,
                text=draw(texts),
                token_ids=tuple(draw(st.lists(st.integers(0, 50_000), max_size=5))),
                finish_reason=ev.FinishReason.TOOL_CALLS if calls else ev.FinishReason.STOP,
                usage=ev.Usage(prompt_tokens=draw(st.integers(0, 99)), completion_tokens=3),
                model="m",
                sampling=ev.SamplingParams(),
                tool_calls=tuple(calls),
            )
        )
        for call in calls:
            events.append(ev.ToolCallRequested(turn_id=turn_id, call=call))
            events.append(ev.ToolCallCompleted(turn_id=turn_id, call_id=call.call_id, result="ok"))
    end = draw(st.sampled_from(["completed", "failed", "cancelled", "interrupted", "open"]))
    at = draw(micros)
    if end == "completed":
        events.append(
            ev.TurnCompleted(
                turn_id=turn_id, completed_at_us=at, finish_reason=ev.FinishReason.STOP
            )
        )
    elif end == "failed":
        events.append(
            ev.TurnFailed(
                turn_id=turn_id, failed_at_us=at, error_kind="x", phase="generate", retryable=True
            )
        )
    elif end == "cancelled":
        events.append(ev.TurnCancelled(turn_id=turn_id, cancelled_at_us=at))
    elif end == "interrupted":
        events.append(ev.TurnInterrupted(turn_id=turn_id, detected_at_us=at))
    return events


@st.composite
def conversations(draw: st.DrawFn) -> list[ev.Event]:
    events: list[ev.Event] = [
        ev.ConversationCreated(
            conversation_id=draw(ids),
            created_at_us=draw(micros),
            system_prompt=draw(texts),
            sampling=draw(sampling),
        )
    ]
    n_turns = draw(st.integers(0, 4))
    for i in range(n_turns):
        # Settings change, and the conversation is archived and back, between turns only.
        events += draw(st.lists(settings_updates, max_size=2))
        if draw(st.booleans()):
            events += [
                ev.ConversationArchived(archived_at_us=draw(micros)),
                ev.ConversationUnarchived(unarchived_at_us=draw(micros)),
            ]
        turn = draw(turn_events(f"t{i}"))
        events += turn
        ended = (ev.TurnCompleted, ev.TurnFailed, ev.TurnCancelled, ev.TurnInterrupted)
        if not isinstance(turn[-1], ended):
            break  # a turn left open must be the last one
    return events


_ENDINGS: dict[type[ev.Event], tuple[TurnStatus, str]] = {
    ev.TurnCompleted: (TurnStatus.COMPLETED, "completed_at_us"),
    ev.TurnFailed: (TurnStatus.FAILED, "failed_at_us"),
    ev.TurnCancelled: (TurnStatus.CANCELLED, "cancelled_at_us"),
    ev.TurnInterrupted: (TurnStatus.INTERRUPTED, "detected_at_us"),
}


@settings(max_examples=200)
@given(conversations())
def test_fold_counts_versions_and_ends_each_turn_as_its_log_says(events: list[ev.Event]) -> None:
    state = fold(events)
    assert state.version == len(events)
    created = events[0]
    assert isinstance(created, ev.ConversationCreated)
    prompts = [created.system_prompt] + [
        e.system_prompt
        for e in events
        if isinstance(e, ev.ConversationUpdated) and "system_prompt" in e.fields
    ]
    assert (state.conversation_id, state.created_at_us, state.system_prompt) == (
        created.conversation_id,
        created.created_at_us,
        prompts[-1],
    )
    # The turns, read from the script independently of `evolve`:
    # (id, request id, status, start version, end time).
    expected: list[tuple[str, str, TurnStatus, int, int | None]] = []
    for version, event in enumerate(events, start=1):
        if isinstance(event, ev.TurnStarted):
            expected.append((event.turn_id, event.request_id, TurnStatus.RUNNING, version, None))
        elif type(event) in _ENDINGS:
            status, at_field = _ENDINGS[type(event)]
            turn_id, request_id, _, started, _ = expected[-1]
            expected[-1] = (turn_id, request_id, status, started, getattr(event, at_field))
    assert [
        (t.turn_id, t.request_id, t.status, t.start_version, t.ended_at_us) for t in state.turns
    ] == expected
    open_ids = [e[0] for e in expected if e[2] is TurnStatus.RUNNING]
    open_turn = state.open_turn
    assert ([open_turn.turn_id] if open_turn is not None else []) == open_ids


@given(conversations(), st.data())
def test_folding_in_two_parts_equals_folding_at_once(
    events: list[ev.Event], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(events)))
    assert fold(events[cut:], fold(events[:cut])) == fold(events)


@given(conversations())
def test_replaying_the_stored_form_rebuilds_the_same_state(events: list[ev.Event]) -> None:
    assert fold(_through_storage(e) for e in events) == fold(events)


@given(conversations())
def test_usage_of_a_turn_is_the_sum_of_its_generations(events: list[ev.Event]) -> None:
    state = fold(events)
    for turn in state.turns:
        generated = [
            e for e in events if isinstance(e, ev.GenerationCompleted) and e.turn_id == turn.turn_id
        ]
        assert turn.usage.prompt_tokens == sum(g.usage.prompt_tokens for g in generated)
        assert turn.generations == len(generated)


def test_an_update_replaces_only_the_settings_it_names() -> None:
    created = ev.ConversationCreated(
        conversation_id="c",
        created_at_us=1,
        system_prompt="old",
        model="m",
        sampling=ev.SamplingParams(temperature=0.1, max_tokens=9),
        tools=(ev.ToolDefinition(name="t"),),
        labels=(("a", "1"),),
        guardrail_profile="strict",
        max_tool_round_trips=3,
        context_policy=ev.ContextPolicy.DISABLED,
    )
    before = fold([created])
    prompt = ev.ConversationUpdated(
        updated_at_us=2, fields=("system_prompt",), system_prompt="new", labels=(("x", "y"),)
    )
    after = evolve(before, prompt)
    assert after.system_prompt == "new"
    assert after.labels == before.labels  # not named: not read
    assert after.updates == ()  # no request id: nothing to find it by
    defaults = ev.ConversationUpdated(
        updated_at_us=3,
        fields=("defaults", "labels"),
        sampling=ev.SamplingParams(top_p=0.5),
        request_id="r",
    )
    last = evolve(after, defaults)
    # "defaults" is the whole TurnDefaults: unset values are unset, not kept.
    assert (last.model, last.sampling, last.max_tool_round_trips, last.context_policy) == (
        "",
        ev.SamplingParams(top_p=0.5),
        None,
        None,
    )
    assert last.labels == ()
    assert (last.tools, last.guardrail_profile, last.system_prompt) == (
        before.tools,
        "strict",
        "new",
    )
    found = last.update_for_request("r")
    assert found is not None
    assert (found.version, found.event) == (3, defaults)
    assert last.update_for_request("other") is None
    with pytest.raises(InvalidTransitionError):
        evolve(last, ev.ConversationUpdated(updated_at_us=4, fields=("messages",)))


def test_unarchive_makes_an_archived_conversation_active() -> None:
    state = fold(
        [
            ev.ConversationCreated(conversation_id="c", created_at_us=1),
            ev.ConversationArchived(archived_at_us=2),
        ]
    )
    assert state.archived
    assert not evolve(state, ev.ConversationUnarchived(unarchived_at_us=3)).archived


def test_events_before_creation_are_invalid() -> None:
    with pytest.raises(InvalidTransitionError):
        evolve(ConversationState(), ev.ConversationArchived(archived_at_us=1))


def test_a_second_turn_cannot_start_while_one_is_open() -> None:
    state = fold(
        [
            ev.ConversationCreated(conversation_id="c", created_at_us=1),
            ev.TurnStarted(turn_id="t1", request_id="r1", started_at_us=2),
        ]
    )
    assert state.open_turn is not None
    with pytest.raises(InvalidTransitionError):
        evolve(state, ev.TurnStarted(turn_id="t2", request_id="r2", started_at_us=3))


def test_per_turn_sampling_overrides_conversation_defaults() -> None:
    defaults = ev.SamplingParams(temperature=0.7, max_tokens=64, seed=1)
    per_turn = ev.SamplingParams(max_tokens=8)
    merged = defaults.overridden_by(per_turn)
    assert merged == ev.SamplingParams(temperature=0.7, max_tokens=8, seed=1)
