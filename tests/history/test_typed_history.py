# ruff: noqa: F811  (pytest fixtures imported from tests/conversation/conftest.py)
"""The typed history: `LogEvent.event` beside `data_json`, in the views a request asks for.

Typed events are read back into domain events by `from_typed` below, a
decoder written for the test (it shares nothing with the server's walk but
the rule that fields have the domain's names, and maps enums by value name),
and compared with what the codec decodes from the stored text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import types
import typing
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conversation.conftest import (  # noqa: F401 (fixtures)
    app,
    engine,
    make_app,
    worker,
)
from conversation_helpers import conversation_stub
from google.protobuf import message as pb_message
from hypothesis import given, settings
from hypothesis import strategies as st

from turnlog.api.messages import log_event
from turnlog.conversation.application import ConversationApplication
from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.eventlog import new_event
from turnlog.history import jsonl
from turnlog.storage import EventStore, InMemoryEventStore, NewEvent, RecordedEvent
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.v1 import history_pb2 as hpb

Stub = sgrpc.ConversationServiceStub
GOLDEN = Path(__file__).parent / "golden"
MIB = 1024 * 1024


# -- the test's own decoder of typed events -----------------------------------------


def _optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner, True
    return hint, False


def _value(hint: Any, field: Any, value: Any) -> Any:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        proto_name = field.enum_type.values_by_number[value].name
        (member,) = [m for m in hint if proto_name.endswith("_" + m.name)]
        return member
    if dataclasses.is_dataclass(hint):
        return from_typed(hint, value)
    if typing.get_origin(hint) is tuple:
        (item,) = typing.get_args(hint)[:1]
        if typing.get_origin(item) is tuple:  # labels: (key, value) pairs, sorted
            return tuple(sorted(value.items()))
        if dataclasses.is_dataclass(item):
            return tuple(from_typed(item, v) for v in value)
        return tuple(value)
    return value


def from_typed(cls: Any, message: pb_message.Message) -> Any:
    """The dataclass `cls` whose fields a typed message holds (unset optional: None)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        hint, optional = _optional(hints[f.name])
        field = message.DESCRIPTOR.fields_by_name[f.name]
        if optional and field.has_presence and not message.HasField(f.name):
            kwargs[f.name] = None
        else:
            kwargs[f.name] = _value(hint, field, getattr(message, f.name))
    return cls(**kwargs)


def typed_domain_event(message: hpb.LogEvent) -> ev.Event:
    """The domain event a LogEvent's typed member holds; the member must be named after its type."""
    member = message.WhichOneof("event")
    assert member is not None
    (cls,) = [c for c in ev.EVENT_TYPES if c.__name__ == message.type]
    assert member == "".join("_" + c.lower() if c.isupper() else c for c in cls.__name__)[1:]
    domain: ev.Event = from_typed(cls, getattr(message, member))
    return domain


# -- every event type, generated --------------------------------------------------------

INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(max_size=20)


def strategy(hint: Any, *, int_strategy: st.SearchStrategy[int] = INT64) -> Any:
    """Values of a domain type hint, with ints that fit the typed messages' fields."""
    hint, optional = _optional(hint)
    base: st.SearchStrategy[Any]
    if hint is int:
        base = int_strategy
    elif hint is float:
        base = st.floats(allow_nan=False, allow_infinity=False)
    elif hint is str:
        base = TEXT
    elif hint is bool:
        base = st.booleans()
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        base = st.sampled_from(list(hint))
    elif dataclasses.is_dataclass(hint):
        base = dataclass_strategy(hint)
    elif typing.get_origin(hint) is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
        base = st.lists(strategy(typing.get_args(hint)[0]), max_size=3).map(tuple)
    else:
        raise AssertionError(f"no strategy for {hint}")
    return st.none() | base if optional else base


def dataclass_strategy(cls: Any) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    # The context window reuses the API's ContextWindow, whose counts are int32.
    ints = INT32 if cls is ev.ContextWindow else INT64
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if hints[f.name] == tuple[tuple[str, str], ...]:
            # Labels, an error's metadata: the domain's invariant is unique keys, sorted.
            fields[f.name] = st.dictionaries(TEXT, TEXT, max_size=3).map(
                lambda d: tuple(sorted(d.items()))
            )
        else:
            fields[f.name] = strategy(hints[f.name], int_strategy=ints)
    return st.builds(cls, **fields)


async def stored(events: list[ev.Event]) -> tuple[RecordedEvent, ...]:
    """The events as an event store records them (their JSON text and metadata)."""
    store = InMemoryEventStore()
    await store.append(
        "conversation-x",
        [new_event(str(uuid.uuid4()), e, actor="test") for e in events],
        expected_version=None,
    )
    return await store.read_stream("conversation-x")


@pytest.mark.parametrize("cls", ev.EVENT_TYPES, ids=lambda cls: cls.__name__)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
async def test_every_event_type_arrives_typed_with_the_domain_events_values(
    cls: type[ev.Event], data: st.DataObject
) -> None:
    event = data.draw(dataclass_strategy(cls))
    (recorded,) = await stored([event])
    both = log_event(recorded, raw=True, typed=True)
    assert typed_domain_event(both) == event == codec.decode_stored(recorded)
    assert both.data_json == recorded.data_json
    typed_only = log_event(recorded, raw=False, typed=True)
    assert typed_only.data_json == ""
    assert typed_only.WhichOneof("event") == both.WhichOneof("event")


def golden_events(name: str = "*") -> list[RecordedEvent]:
    found = []
    for path in sorted(GOLDEN.glob(f"{name}.jsonl")):
        found += [e.to_recorded() for e in jsonl.read_jsonl(jsonl.split_lines(path.read_bytes()))]
    return found


def test_golden_logs_arrive_typed_as_the_codec_decodes_them() -> None:
    events = golden_events()
    for recorded in events:
        message = log_event(recorded, raw=True, typed=True)
        assert typed_domain_event(message) == codec.decode_stored(recorded)
        assert message.data_json == recorded.data_json
    # What the golden logs hold (the generated events above cover the rest).
    assert {e.type for e in events} >= {
        "ConversationCreated",
        "ConversationForked",
        "ConversationArchived",
        "TurnBlocked",
        "TurnInterrupted",
        "ToolRoundLimitReached",
        "TextRetracted",
    }


def test_an_event_without_a_typed_form_comes_raw_in_every_view() -> None:
    (created, *_) = golden_events("plain")
    unknown = dataclasses.replace(created, type="SomethingNewer")
    undecodable = dataclasses.replace(created, type="TurnCompleted", data_json='{"turn_id": 5}')
    too_large = dataclasses.replace(
        created,
        type="TurnInterrupted",
        data_json=json.dumps({"turn_id": "t", "detected_at_us": 2**64}),
    )
    lone_surrogate = dataclasses.replace(
        created, type="TurnInterrupted", data_json='{"turn_id": "\\ud800", "detected_at_us": 1}'
    )
    for event in (unknown, undecodable, too_large, lone_surrogate):
        for raw in (True, False):
            message = log_event(event, raw=raw, typed=True)
            assert message.WhichOneof("event") is None
            assert message.data_json == event.data_json
    fits = dataclasses.replace(too_large, data_json='{"turn_id": "t", "detected_at_us": 1}')
    assert log_event(fits, raw=False, typed=True).turn_interrupted.detected_at_us == 1


# -- over gRPC ---------------------------------------------------------------------------


@pytest.fixture
async def stub(app: ConversationApplication) -> AsyncIterator[Stub]:
    async with conversation_stub(app) as served:
        yield served


async def conversation(stub: Stub, prompts: list[str]) -> str:
    created = await stub.CreateConversation(
        spb.CreateConversationRequest(request_id=str(uuid.uuid4()), labels={"env": "test"})
    )
    name = created.conversation.name
    for i, prompt in enumerate(prompts):
        await stub.SendMessage(
            spb.SendMessageRequest(
                input=spb.TurnInput(conversation=name, content=prompt, request_id=f"r{i}")
            )
        )
    return name


async def import_golden(stub: Stub, name: str) -> str:
    data = (GOLDEN / f"{name}.jsonl").read_bytes()

    async def parts() -> AsyncIterator[spb.ImportConversationRequest]:
        yield spb.ImportConversationRequest(data=data)

    imported = await stub.ImportConversation(parts())
    conversation_name: str = imported.conversation.name
    return conversation_name


async def all_visible(store: EventStore, count: int) -> None:
    """Waits until reads of all streams see `count` events.

    They pass only transactions older than the oldest one running on the
    server, so on a shared server they can lag behind for a moment.
    """
    async with asyncio.timeout(30):
        while len((await store.read_all(limit=count + 1)).events) < count:  # noqa: ASYNC110 (polling the database)
            await asyncio.sleep(0.05)


def without_payload(message: hpb.LogEvent) -> hpb.LogEvent:
    copy = hpb.LogEvent()
    copy.CopyFrom(message)
    copy.ClearField("data_json")
    copy.ClearField("event")
    return copy


VIEWS = [
    hpb.EVENT_VIEW_UNSPECIFIED,
    hpb.EVENT_VIEW_RAW,
    hpb.EVENT_VIEW_TYPED,
    hpb.EVENT_VIEW_BOTH,
]


async def test_views_raw_typed_and_both_in_reads_and_subscriptions(
    stub: Stub, app: ConversationApplication
) -> None:
    name = await conversation(stub, ["hi", "what is 6*7", "leak a secret"])
    sid = name.replace("conversations/", "conversation-")
    version = await app.store.stream_version(sid)
    unknown = NewEvent(event_id=uuid.uuid4(), type="FromTheFuture", data={"x": 1})
    await app.store.append(sid, [unknown], expected_version=version)
    stored_events = await app.store.read_stream(sid)
    texts = [e.data_json for e in stored_events]
    await all_visible(app.store, len(stored_events))
    read: dict[int, list[hpb.LogEvent]] = {}
    for view in VIEWS:
        page = await stub.ReadEvents(
            spb.ReadEventsRequest(conversation=name, page_size=1000, view=view)
        )
        read[view] = list(page.events)
        for scope in (name, ""):
            call = stub.SubscribeEvents(spb.SubscribeEventsRequest(conversation=scope, view=view))
            got: list[hpb.LogEvent] = []
            async for response in call:
                got.extend(response.events)
                if response.HasField("caught_up"):
                    break
            call.cancel()
            assert got == read[view]
    raw, typed, both = (
        read[hpb.EVENT_VIEW_RAW],
        read[hpb.EVENT_VIEW_TYPED],
        read[hpb.EVENT_VIEW_BOTH],
    )
    assert read[hpb.EVENT_VIEW_UNSPECIFIED] == raw  # unset: the stored text, as before
    assert [e.data_json for e in raw] == [e.data_json for e in both] == texts
    assert all(e.WhichOneof("event") is None for e in raw)
    *known, last = both
    assert all(e.WhichOneof("event") is not None for e in known)
    assert [typed_domain_event(e) for e in known] == [
        codec.decode_stored(e) for e in stored_events[:-1]
    ]
    assert last.type == "FromTheFuture"
    assert last.WhichOneof("event") is None
    assert [e.data_json for e in typed] == [""] * len(known) + [last.data_json]
    for r, t, b in zip(raw, typed, both, strict=True):
        assert without_payload(r) == without_payload(t) == without_payload(b)
        member = b.WhichOneof("event")
        assert t.WhichOneof("event") == member
        if member is not None:
            assert getattr(t, member) == getattr(b, member)


async def test_an_old_shape_event_arrives_typed_in_the_current_shape(stub: Stub) -> None:
    name = await import_golden(stub, "plain")
    golden_created = golden_events("plain")[0]
    first = await stub.ReadEvents(
        spb.ReadEventsRequest(conversation=name, page_size=1, view=hpb.EVENT_VIEW_BOTH)
    )
    (created,) = first.events
    # Stored in shape 1 (labels as [key, value] pairs, no schema_version) ...
    assert created.type == "ConversationCreated"
    assert "schema_version" not in json.loads(created.metadata_json)
    assert json.loads(created.data_json)["labels"] == [["env", "golden"], ["team", "replay"]]
    # ... sent byte for byte as stored, and typed in the current shape (a map).
    assert created.data_json == golden_created.data_json
    assert dict(created.conversation_created.labels) == {"env": "golden", "team": "replay"}
    assert codec.SCHEMA_VERSION["ConversationCreated"] == 2


async def test_typed_pages_and_batches_keep_to_their_byte_caps(
    stub: Stub, app: ConversationApplication
) -> None:
    # 12 messages of 300,000 characters: 6 fit in 2 MiB as stored text, only
    # 3 when each also comes typed; 3 in a 1 MiB subscription message, 1.
    name = await conversation(stub, [])
    sid = name.replace("conversations/", "conversation-")
    version = await app.store.stream_version(sid)
    big = [
        new_event(
            str(uuid.uuid4()),
            ev.MessageAppended(message_id=f"m{i}", role=ev.Role.USER, content="x" * 300_000),
            actor="test",
        )
        for i in range(12)
    ]
    await app.store.append(sid, big, expected_version=version)
    big_per_page, big_per_message = {}, {}
    for view in (hpb.EVENT_VIEW_RAW, hpb.EVENT_VIEW_BOTH):
        request = spb.ReadEventsRequest(conversation=name, page_size=1000, view=view)
        pages = []
        while True:
            page = await stub.ReadEvents(request)
            pages.append(page)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        assert sum(len(p.events) for p in pages) == version + len(big)
        assert all(p.ByteSize() <= 2 * MIB for p in pages)
        big_per_page[view] = max(sum(e.type == "MessageAppended" for e in p.events) for p in pages)
        call = stub.SubscribeEvents(spb.SubscribeEventsRequest(conversation=name, view=view))
        messages = []
        async for response in call:
            messages.append(response)
            if response.HasField("caught_up"):
                break
        call.cancel()
        assert sum(len(m.events) for m in messages) == version + len(big)
        assert all(m.ByteSize() <= MIB for m in messages)
        big_per_message[view] = max(len(m.events) for m in messages[1:-1])
    assert big_per_page == {hpb.EVENT_VIEW_RAW: 6, hpb.EVENT_VIEW_BOTH: 3}
    assert big_per_message == {hpb.EVENT_VIEW_RAW: 3, hpb.EVENT_VIEW_BOTH: 1}
