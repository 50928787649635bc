"""Personal data injected through every path finds no way into the log or a tool in clear.

docs/guardrails.md ("Paths") lists every way user- or model-supplied text
reaches the event log or a tool. Each test here injects an e-mail address, a
card number and a phone number through some of them, under the default
profile (PII redaction on), then reads the whole log (every event's data and
metadata through `read_all`, and every row of every table of the schema, so
snapshots too) and asserts that none of the injected values is there in
clear, that the placeholders are (so the data did reach the log, redacted),
and, where a tool is involved, what the tool was handed.

Application level: real PostgreSQL, an in-process scripted worker over gRPC
(the engine client records every request, so what goes back to the model is
checked too), server tools registered by the test.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
from psycopg import sql

from turnlog.conversation.application import (
    ConversationApplication,
    CreateConversation,
    ServiceDefaults,
    TurnInput,
    TurnOptions,
)
from turnlog.conversation.projection import TextPiece, ToolStarted
from turnlog.conversation.tools import ServerTool, ToolError, ToolRegistry
from turnlog.domain import events as ev
from turnlog.domain.codec import decode_stored
from turnlog.domain.state import TurnStatus
from turnlog.engine.v1 import engine_pb2, engine_pb2_grpc
from turnlog.eventlog import stream_id
from turnlog.guardrails import (
    FieldRefusedError,
    GuardrailProfile,
    GuardrailSpec,
    PiiRedactor,
    default_registry,
)
from turnlog.guardrails.pii import luhn_valid
from turnlog.storage import START_POSITION, PostgresEventStore
from turnlog.worker.client import EngineClient, PooledRequestStream
from turnlog.worker.scripted import Script, ScriptedEngine
from turnlog.worker.service import EngineServicer

FIXED_NOW_US = 1_700_000_000_000_000


@dataclass(frozen=True)
class Pii:
    """One e-mail address, card number and phone number, distinct per path."""

    path: str
    email: str
    card: str
    phone: str

    @property
    def card_digits(self) -> str:
        return self.card.replace(" ", "")

    def values(self) -> list[tuple[str, str]]:
        """What must never be stored: each value, and the card's digits alone."""
        return [
            (f"{self.path} email", self.email),
            (f"{self.path} card", self.card),
            (f"{self.path} card digits", self.card_digits),
            (f"{self.path} phone", self.phone),
        ]

    def sentence(self) -> str:
        return f"mail {self.email} or call {self.phone}, card {self.card} thanks"


def _luhn_completed(body: str) -> str:
    for check in "0123456789":
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable")


def pii(path: str, n: int) -> Pii:
    digits = _luhn_completed(f"45391488{n:07d}")
    card = " ".join(digits[i : i + 4] for i in range(0, 16, 4))
    return Pii(
        path=path,
        email=f"{path.replace(' ', '')}.quill{n}@mailhost.example",
        card=card,
        phone=f"+44 20 7946 {n:04d}",
    )


USER = pii("user", 1)
TEXT = pii("response", 2)
ARGS = pii("arguments", 3)
RESULT = pii("result", 4)
ERROR = pii("error", 5)
CLIENT_ARGS = pii("clientargs", 6)
CLIENT_RESULT = pii("clientresult", 7)
CLIENT_ERROR = pii("clienterror", 8)
CANCEL = pii("cancel", 9)
SUMMARY = pii("summary", 10)
FIELD = pii("field", 11)


def test_the_injected_values_are_what_the_redactor_finds() -> None:
    """The premise: each value is personal data to the profile (else nothing is proven)."""
    for data in (USER, TEXT, ARGS, RESULT, ERROR, CLIENT_RESULT, CANCEL, SUMMARY, FIELD):
        redacted = PiiRedactor().check(data.sentence()).text
        assert redacted == "mail [EMAIL] or call [PHONE], card [CARD] thanks"


def _arguments(data: Pii) -> dict[str, Any]:
    # As a model would write them: strings, a nested list, and the card as a number.
    return {
        "email": data.email,
        "contact": {"phone": data.phone, "cards": [data.card]},
        "card_number": int(data.card_digits),
        data.email: "the address as a key",
    }


def _redacted_arguments() -> dict[str, Any]:
    return {
        "email": "[EMAIL]",
        "contact": {"phone": "[PHONE]", "cards": ["[CARD]"]},
        "card_number": "[CARD]",
        "[EMAIL]": "the address as a key",
    }


SCRIPT: dict[str, Any] = {
    "model": "scripted-paths",
    # The first reply whose match is anywhere in the prompt wins: later cues first.
    "replies": [
        {"match": "Summarize the conversation so far", "text": f"Summary: {SUMMARY.sentence()}"},
        {"match": "customer_record", "text": "Found them."},
        {
            "match": "find the customer",
            "text": f"Looking up {TEXT.sentence()}",
            "tool_calls": [
                {"name": "lookup_customer", "arguments": _arguments(ARGS)},
                {"name": "notify_customer", "arguments": {"email": ARGS.email}},
            ],
        },
        {
            "match": "ask the client",
            "tool_calls": [
                {"name": "client_lookup", "arguments": _arguments(CLIENT_ARGS)},
                {"name": "client_notify", "arguments": {"phone": CLIENT_ARGS.phone}},
            ],
        },
        {"match": "tell a long story", "text": "Once upon a time " * 60, "token_delay_ms": 20},
    ],
    "default": {"text": "Hello there."},
}


class RecordingEngine(EngineClient):
    """An engine client that keeps every generation request it sends (what the model sees)."""

    def __init__(self, targets: list[str]) -> None:
        super().__init__(targets)
        self.sent: list[engine_pb2.StartGeneration] = []

    def generate(
        self,
        start: engine_pb2.StartGeneration,
        *,
        affinity_key: str | None = None,
        model: str = "",
    ) -> PooledRequestStream:
        copy = engine_pb2.StartGeneration()
        copy.CopyFrom(start)
        self.sent.append(copy)
        return super().generate(start, affinity_key=affinity_key, model=model)

    def prompts_text(self) -> str:
        return "\n".join(str(start) for start in self.sent)


@pytest.fixture
async def engine() -> AsyncIterator[RecordingEngine]:
    server = grpc.aio.server()
    engine_pb2_grpc.add_EngineServiceServicer_to_server(
        EngineServicer(ScriptedEngine(Script.from_json(SCRIPT))), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        client = RecordingEngine([f"127.0.0.1:{port}"])
        async with client:
            yield client
    finally:
        await server.stop(0)


@dataclass
class ToolCalls:
    """What the server tools were handed."""

    arguments: list[Mapping[str, Any]]


@pytest.fixture
def handed() -> ToolCalls:
    return ToolCalls(arguments=[])


def _tools(handed: ToolCalls) -> ToolRegistry:
    async def lookup(arguments: Mapping[str, Any]) -> str:
        handed.arguments.append(dict(arguments))
        return json.dumps({"customer_record": {"email": RESULT.email, "note": RESULT.sentence()}})

    async def notify(arguments: Mapping[str, Any]) -> str:
        handed.arguments.append(dict(arguments))
        raise ToolError(f"no mailbox at {ERROR.email} (phone {ERROR.phone}, card {ERROR.card})")

    schema = json.dumps({"type": "object"})
    return ToolRegistry(
        (
            ServerTool(
                definition=ev.ToolDefinition(
                    name="lookup_customer",
                    description="Find a record.",
                    parameters_json_schema=schema,
                ),
                run=lookup,
            ),
            ServerTool(
                definition=ev.ToolDefinition(
                    name="notify_customer", description="Notify.", parameters_json_schema=schema
                ),
                run=notify,
            ),
        )
    )


@pytest.fixture
async def app(
    store: PostgresEventStore, engine: RecordingEngine, handed: ToolCalls
) -> AsyncIterator[ConversationApplication]:
    application = ConversationApplication(
        store,
        engine,
        tools=_tools(handed),
        # One tool round trip; a snapshot after every turn, so snapshots are scanned too.
        defaults=ServiceDefaults(max_tool_round_trips=1, snapshot_every=1),
        clock=lambda: FIXED_NOW_US,
    )
    yield application
    await application.shutdown()


async def stored_text(store: PostgresEventStore, database_url: str) -> str:
    """Everything the database holds: every event's data and metadata, every row of every table."""
    texts: list[str] = []
    position = START_POSITION
    while True:
        page = await store.read_all(after=position, limit=500)
        texts += [f"{e.stream_id} {e.data_json} {e.metadata_json}" for e in page.events]
        position = page.next_position
        if page.reached_end:
            break
    assert texts, "the log is empty: nothing was proven"
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        tables = await cursor.fetchall()
        assert ("turnlog", "events") in tables
        assert ("turnlog", "snapshots") in tables
        for schema, table in tables:
            rows = await conn.execute(
                sql.SQL("SELECT * FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
            )
            texts += [" ".join(map(_as_text, row)) for row in await rows.fetchall()]
    return "\n".join(texts)


def _as_text(value: object) -> str:
    # Bytes as the text they hold: a snapshot's state is JSON in a bytea column.
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


async def snapshots_text(database_url: str) -> str:
    """The conversation states saved as snapshots, as the JSON text they are."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute("SELECT convert_from(state, 'UTF8') FROM turnlog.snapshots")
        return "\n".join(row[0] for row in await cursor.fetchall())


def leaks(text: str, *injected: Pii) -> list[str]:
    return [label for data in injected for label, value in data.values() if value in text]


async def stream_events(store: PostgresEventStore, cid: str) -> list[ev.Event]:
    return [decode_stored(r) for r in await store.read_stream(stream_id(cid))]


def _modified(events: list[ev.Event], stage: ev.GuardrailStage, about: str) -> list[ev.Event]:
    return [
        e
        for e in events
        if isinstance(e, ev.GuardrailDecided)
        and e.stage is stage
        and e.verdict is ev.Verdict.MODIFY
        and e.guardrail == "pii_redaction"
        and about in e.reason
        and e.before_digest != e.after_digest
    ]


# --- the model's tool calls and server tools' results and errors ---------------------


async def test_a_server_tool_is_handed_and_the_log_keeps_only_redacted_text(
    app: ConversationApplication,
    store: PostgresEventStore,
    engine: RecordingEngine,
    handed: ToolCalls,
    database_url: str,
) -> None:
    state = await app.create(
        CreateConversation(
            request_id="c-server",
            system_prompt="Be brief.",
            tools=(
                ev.ToolDefinition(name="lookup_customer"),
                ev.ToolDefinition(name="notify_customer"),
            ),
        )
    )
    cid = state.conversation_id
    result = await app.send(
        TurnInput(
            conversation_id=cid,
            content=f"find the customer: {USER.sentence()}",
            request_id="r-server",
        )
    )
    assert result.ended.turn.status is TurnStatus.COMPLETED

    # The tools got the sanitized arguments, still valid JSON (decoded by the registry).
    assert handed.arguments == [_redacted_arguments(), {"email": "[EMAIL]"}]

    events = await stream_events(store, cid)
    requested = [e.call for e in events if isinstance(e, ev.ToolCallRequested)]
    assert [json.loads(c.arguments_json) for c in requested] == handed.arguments
    completed = next(e for e in events if isinstance(e, ev.ToolCallCompleted))
    assert json.loads(completed.result)["customer_record"]["email"] == "[EMAIL]"
    failed = next(e for e in events if isinstance(e, ev.ToolCallFailed))
    assert failed.error == "no mailbox at [EMAIL] (phone [PHONE], card [CARD])"
    # Each change is on record, as a decision with digests (never the text).
    assert len(_modified(events, ev.GuardrailStage.SANITIZE_RESPONSE, "tool call")) == 2
    assert len(_modified(events, ev.GuardrailStage.SANITIZE_REQUEST, "the result of tool")) == 1
    assert len(_modified(events, ev.GuardrailStage.SANITIZE_REQUEST, "the error of tool")) == 1
    # A generation whose tool calls were redacted keeps no token ids (they spell the clear text).
    first = next(e for e in events if isinstance(e, ev.GenerationCompleted))
    assert first.tool_calls == tuple(requested)
    assert first.token_ids == ()

    # What went back to the model (the second generation's prompt) was redacted too.
    assert len(engine.sent) == 2
    assert "customer_record" in str(engine.sent[1])
    assert leaks(engine.prompts_text(), USER, TEXT, ARGS, RESULT, ERROR) == []

    stored = await stored_text(store, database_url)
    assert leaks(stored, USER, TEXT, ARGS, RESULT, ERROR) == []
    for placeholder in ("[EMAIL]", "[CARD]", "[PHONE]"):
        assert placeholder in stored
    # The scan reads snapshots as text: the turn's state was saved, redacted.
    snapshots = await snapshots_text(database_url)
    assert "customer_record" in snapshots
    assert snapshots in stored


async def test_a_tool_result_a_sanitizer_blocks_ends_the_turn_and_is_not_stored(
    store: PostgresEventStore,
    engine: RecordingEngine,
    handed: ToolCalls,
    database_url: str,
) -> None:
    guardrails = default_registry()
    guardrails.register_profile(
        GuardrailProfile(
            name="no-records",
            sanitize_request=(
                GuardrailSpec(factory="pii_redaction"),
                GuardrailSpec(factory="blocked_terms", options={"terms": ["customer_record"]}),
            ),
        )
    )
    app = ConversationApplication(
        store,
        engine,
        tools=_tools(handed),
        guardrails=guardrails,
        defaults=ServiceDefaults(max_tool_round_trips=1),
        clock=lambda: FIXED_NOW_US,
    )
    try:
        state = await app.create(
            CreateConversation(
                request_id="c-blocked",
                guardrail_profile="no-records",
                tools=(
                    ev.ToolDefinition(name="lookup_customer"),
                    ev.ToolDefinition(name="notify_customer"),
                ),
            )
        )
        result = await app.send(
            TurnInput(
                conversation_id=state.conversation_id,
                content="find the customer",
                request_id="r-blocked",
            )
        )
    finally:
        await app.shutdown()
    assert result.ended.turn.status is TurnStatus.BLOCKED
    assert len(handed.arguments) == 1  # the second call never ran
    events = await stream_events(store, state.conversation_id)
    blocked = events[-1]
    assert isinstance(blocked, ev.TurnBlocked)
    assert (blocked.stage, blocked.guardrail) == (
        ev.GuardrailStage.SANITIZE_REQUEST,
        "blocked_terms",
    )
    assert not [e for e in events if isinstance(e, ev.ToolCallCompleted | ev.ToolCallFailed)]
    assert len(engine.sent) == 1  # nothing of it went back to the model
    assert leaks(await stored_text(store, database_url), RESULT) == []


# --- client-side tools: the call handed to the client, its result and error --------


async def test_a_client_tool_is_handed_redacted_arguments_and_its_answers_are_stored_redacted(
    app: ConversationApplication,
    store: PostgresEventStore,
    engine: RecordingEngine,
    database_url: str,
) -> None:
    state = await app.create(
        CreateConversation(
            request_id="c-client",
            tools=(
                ev.ToolDefinition(name="client_lookup", client_side=True),
                ev.ToolDefinition(name="client_notify", client_side=True),
            ),
        )
    )
    cid = state.conversation_id
    turn_id = await app.start_turn(
        TurnInput(conversation_id=cid, content="ask the client", request_id="r-client")
    )
    handed_to_client: list[ev.ToolCall] = []
    async for update in app.watch(cid, turn_id):
        payload = update.payload
        if isinstance(payload, ToolStarted) and payload.client_side:
            handed_to_client.append(payload.call)
            if payload.call.name == "client_lookup":
                app.submit_tool_result(
                    cid,
                    turn_id,
                    payload.call.call_id,
                    result=json.dumps({"record": CLIENT_RESULT.sentence()}),
                    error="",
                )
            else:
                app.submit_tool_result(
                    cid, turn_id, payload.call.call_id, result="", error=CLIENT_ERROR.sentence()
                )
    assert [c.name for c in handed_to_client] == ["client_lookup", "client_notify"]
    assert [json.loads(c.arguments_json) for c in handed_to_client] == [
        _redacted_arguments(),
        {"phone": "[PHONE]"},
    ]

    events = await stream_events(store, cid)
    completed = next(e for e in events if isinstance(e, ev.ToolCallCompleted))
    assert json.loads(completed.result) == {
        "record": "mail [EMAIL] or call [PHONE], card [CARD] thanks"
    }
    failed = next(e for e in events if isinstance(e, ev.ToolCallFailed))
    assert failed.error == "mail [EMAIL] or call [PHONE], card [CARD] thanks"
    assert len(_modified(events, ev.GuardrailStage.SANITIZE_REQUEST, "of tool call")) == 2

    assert len(engine.sent) == 2  # the results went back to the model
    assert leaks(engine.prompts_text(), CLIENT_ARGS, CLIENT_RESULT, CLIENT_ERROR) == []
    stored = await stored_text(store, database_url)
    assert leaks(stored, CLIENT_ARGS, CLIENT_RESULT, CLIENT_ERROR) == []


# --- a cancel reason and a compaction summary ----------------------------------------


async def test_a_cancel_reason_and_a_summary_are_stored_redacted(
    app: ConversationApplication, store: PostgresEventStore, database_url: str
) -> None:
    cid = (await app.create(CreateConversation(request_id="c-cancel"))).conversation_id
    turn_id = await app.start_turn(
        TurnInput(conversation_id=cid, content="tell a long story", request_id="r-long")
    )
    async for update in app.watch(cid, turn_id):
        if isinstance(update.payload, TextPiece):
            await app.cancel_turn(cid, turn_id, reason=f"stop: {CANCEL.sentence()}")
            break
    ended = [u async for u in app.watch(cid, turn_id)][-1]
    assert ended.is_last

    await app.send(TurnInput(conversation_id=cid, content="hello", request_id="r-hello"))
    compacted = await app.compact(cid, request_id="r-compact")
    assert compacted.ended.turn.status is TurnStatus.COMPLETED

    events = await stream_events(store, cid)
    cancelled = next(e for e in events if isinstance(e, ev.TurnCancelled))
    assert cancelled.reason == "stop: mail [EMAIL] or call [PHONE], card [CARD] thanks"
    assert len(_modified(events, ev.GuardrailStage.SANITIZE_REQUEST, "the cancel reason")) == 1
    summary = next(e for e in events if isinstance(e, ev.ContextCompacted))
    assert "[EMAIL]" in summary.summary

    stored = await stored_text(store, database_url)
    assert leaks(stored, CANCEL, SUMMARY) == []


# --- request fields the log records verbatim: refused, nothing written ----------------

_SCHEMA_WITH_EXAMPLE = json.dumps(
    {"type": "object", "properties": {"to": {"type": "string", "examples": [FIELD.email]}}}
)

REFUSED_CREATES: list[tuple[str, dict[str, Any]]] = [
    ("system_prompt", {"system_prompt": f"You work for {FIELD.sentence()}"}),
    ("labels", {"labels": (("owner", FIELD.email),)}),
    ("labels", {"labels": ((FIELD.phone, "x"),)}),
    (
        "tools[0].description",
        {"tools": (ev.ToolDefinition(name="t", description=FIELD.sentence(), client_side=True),)},
    ),
    (
        "tools[0].parameters_json_schema",
        {
            "tools": (
                ev.ToolDefinition(
                    name="t", parameters_json_schema=_SCHEMA_WITH_EXAMPLE, client_side=True
                ),
            )
        },
    ),
    (
        "defaults.stop[1]",
        {"defaults": TurnOptions(sampling=ev.SamplingParams(stop=("END", FIELD.card)))},
    ),
    (
        "defaults.first_generation_regex",
        {"defaults": TurnOptions(sampling=ev.SamplingParams(regex=f"Write to {FIELD.email}"))},
    ),
    (
        # Escaped as a regex literal, the address is still one.
        "defaults.first_generation_regex",
        {
            "defaults": TurnOptions(
                sampling=ev.SamplingParams(regex=FIELD.email.replace(".", r"\."))
            )
        },
    ),
]


@pytest.mark.parametrize(("field", "create"), REFUSED_CREATES)
async def test_a_create_field_the_redactor_would_change_is_refused(
    app: ConversationApplication,
    store: PostgresEventStore,
    field: str,
    create: dict[str, Any],
) -> None:
    with pytest.raises(FieldRefusedError) as refused:
        await app.create(CreateConversation(request_id="c-refused", **create))
    assert refused.value.reason == "FIELD_REFUSED_BY_GUARDRAIL"
    assert refused.value.metadata == {
        "field": field,
        "guardrail": "pii_redaction",
        "guardrailProfile": "default",
    }
    assert leaks(str(refused.value), FIELD) == []
    page = await store.read_all(after=START_POSITION)
    assert page.events == ()


async def test_clean_fields_of_the_same_shape_are_accepted(app: ConversationApplication) -> None:
    state = await app.create(
        CreateConversation(
            request_id="c-clean",
            system_prompt="You work for the help desk.",
            labels=(("owner", "help-desk"),),
            tools=(
                ev.ToolDefinition(
                    name="t",
                    description="Look up a record.",
                    parameters_json_schema=json.dumps({"type": "object"}),
                    client_side=True,
                ),
            ),
            defaults=TurnOptions(sampling=ev.SamplingParams(stop=("END",), regex=r"[a-z ]+\.")),
        )
    )
    assert state.system_prompt == "You work for the help desk."


@pytest.mark.parametrize(
    ("field", "sampling"),
    [
        ("options.stop[0]", ev.SamplingParams(stop=(FIELD.phone,))),
        ("options.first_generation_regex", ev.SamplingParams(regex=f".*{FIELD.card}.*")),
    ],
)
async def test_a_turn_option_the_redactor_would_change_is_refused_before_anything_runs(
    app: ConversationApplication,
    store: PostgresEventStore,
    engine: RecordingEngine,
    field: str,
    sampling: ev.SamplingParams,
) -> None:
    cid = (await app.create(CreateConversation(request_id="c-turn"))).conversation_id
    before = await store.read_stream(stream_id(cid))
    with pytest.raises(FieldRefusedError) as refused:
        await app.send(
            TurnInput(
                conversation_id=cid,
                content="hi",
                request_id="r-refused",
                options=TurnOptions(sampling=sampling),
            )
        )
    assert refused.value.metadata["field"] == field
    assert await store.read_stream(stream_id(cid)) == before
    assert engine.sent == []


# --- the gRPC status a refusal becomes ---------------------------------------------


def test_a_refusal_is_invalid_argument_with_its_reason() -> None:
    from google.rpc import code_pb2  # type: ignore[import-untyped]

    from turnlog import grpc_errors

    error = FieldRefusedError("x", metadata={"field": "system_prompt"})
    assert grpc_errors.code_of(error) == code_pb2.INVALID_ARGUMENT
    info = grpc_errors.error_info_of(error)
    assert (info.reason, info.metadata["field"]) == ("FIELD_REFUSED_BY_GUARDRAIL", "system_prompt")
