"""Bad input, fuzzed: every RPC the server registers, requests generated from its descriptors.

Proven for every request, generated or hand-made: the call ends with a
documented status (never INTERNAL or UNKNOWN; INVALID_ARGUMENT with an
ErrorInfo, and field violations for request validation), nothing is logged
as an error or with a traceback, a rejected request leaves the event log
byte-for-byte as it was, and health is still SERVING afterwards.

docs/validation.md has the contract; conftest.py the budget and the long run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from fuzz_harness import FUZZ, FUZZ_TIMEOUT_S, Serving
from google.protobuf import descriptor, descriptor_pool, field_mask_pb2, message, message_factory
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import event, given
from hypothesis import strategies as st
from message_strategies import Hints, bogus_tokens, messages, nested_json, positions, regexes

from turnlog.api import validation
from turnlog.domain.events import UPDATABLE_SETTINGS
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2

#: The services of the public API, from their own descriptors.
SERVICES = list(conversation_service_pb2.DESCRIPTOR.services_by_name.values())
METHODS = {f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods}
#: Registered beside the API, not part of it (their own contracts).
INFRASTRUCTURE = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}

OK = grpc.StatusCode.OK
#: The statuses a request can end with (docs/validation.md); never INTERNAL or UNKNOWN.
DOCUMENTED = {
    OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
#: gRPC's own receive limit; a larger request is refused before any handler.
MAX_RECEIVE_BYTES = 4 * 1024 * 1024
CALL_TIMEOUT_S = 60


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    info: error_details_pb2.ErrorInfo | None = None
    violations: list[tuple[str, str]] = field(default_factory=list)
    responses: list[message.Message] = field(default_factory=list)

    def __str__(self) -> str:
        reason = self.info.reason if self.info else None
        return f"{self.code.name} {reason} {self.details!r} {self.violations[:5]}"


def _outcome(error: grpc.aio.AioRpcError, responses: list[message.Message]) -> Outcome:
    outcome = Outcome(error.code(), error.details() or "", responses=responses)
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                outcome.info = error_details_pb2.ErrorInfo()
                detail.Unpack(outcome.info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                outcome.violations = [(v.field, v.description) for v in bad.field_violations]
    return outcome


def _stops_reading(response: message.Message) -> bool:
    """A live subscription never ends: stop at its caught_up marker."""
    return "caught_up" in response.DESCRIPTOR.fields_by_name and response.HasField("caught_up")


async def invoke(channel: grpc.aio.Channel, path: str, requests: Sequence[bytes]) -> Outcome:
    """Calls `path` with raw request bodies; reads every response (a subscription to caught_up)."""
    method = METHODS[path]
    parse = message_factory.GetMessageClass(method.output_type).FromString
    responses: list[message.Message] = []
    try:
        if not method.client_streaming and not method.server_streaming:
            responses.append(
                await channel.unary_unary(path, response_deserializer=parse)(
                    requests[0], timeout=CALL_TIMEOUT_S
                )
            )
        elif not method.client_streaming:
            call = channel.unary_stream(path, response_deserializer=parse)(
                requests[0], timeout=CALL_TIMEOUT_S
            )
            await _read(call, responses)
        elif not method.server_streaming:
            responses.append(
                await channel.stream_unary(path, response_deserializer=parse)(
                    iter(requests), timeout=CALL_TIMEOUT_S
                )
            )
        else:
            call = channel.stream_stream(path, response_deserializer=parse)(
                iter(requests), timeout=CALL_TIMEOUT_S
            )
            await _read(call, responses)
    except grpc.aio.AioRpcError as e:
        return _outcome(e, responses)
    return Outcome(OK, responses=responses)


async def _read(call: Any, responses: list[message.Message]) -> None:
    async for response in call:
        responses.append(response)
        if _stops_reading(response):
            call.cancel()
            return


def request_size(requests: Sequence[bytes]) -> int:
    return max((len(r) for r in requests), default=0)


async def check_call(serving: Serving, path: str, requests: Sequence[bytes]) -> Outcome:
    """Makes the call and proves the promises of a call with bad input; returns how it ended."""
    await serving.quiet()
    before = await serving.event_log()
    serving.log.records.clear()
    outcome = await invoke(serving.channel, path, requests)
    await serving.quiet()
    if request_size(requests) > MAX_RECEIVE_BYTES:
        # gRPC refuses it before any handler; nothing of ours runs.
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    else:
        assert outcome.code in DOCUMENTED, f"{path}: {outcome}"
        if outcome.code != OK:
            assert outcome.info is not None, f"{path}: no ErrorInfo in {outcome}"
            assert outcome.info.domain == "turnlog.dev"
            assert outcome.info.reason
            assert outcome.info.reason.isupper()
            assert outcome.info.metadata.get("retryable") in ("true", "false")
            if outcome.info.reason == "INVALID_REQUEST":
                assert outcome.violations, f"{path}: INVALID_REQUEST without field violations"
    assert serving.log.problems() == [], f"{path} logged errors for {outcome}"
    if outcome.code != OK:
        assert await serving.event_log() == before, f"{path} wrote to the log: {outcome}"
    return outcome


def hints(serving: Serving) -> Hints:
    seed = serving.seed
    names = [seed.active, seed.archived, "conversations/missing", "conversations/" + "x" * 64]
    ids = ["seed-active", "fresh-id", "x" * 63]
    return Hints(
        by_name={
            "conversation": names,
            "name": names,
            "turnlog.v1.ToolDefinition.name": ["lookup", "calculator", "a.b-c_d"],
            "turn_id": [seed.turn_id, "00000000-0000-0000-0000-000000000000"],
            "request_id": [seed.request_id, "r-new", "", "x" * 128],
            "after_position": seed.positions,
            "page_token": seed.list_tokens + seed.events_tokens,
            "event_types": seed.event_types,
            "content": ["hi", "the answer is", "\u202e\x00🙂 'OR 1=1 --"],
            "format": [1, 2],
            "page_size": [0, 1, 2],
            "after_sequence": [0, 1, 3],
            "expected_version": [1, 14, 15],
            "version": [1, 5, 14],
            "temperature": [0.0, 0.7],
            "top_p": [0.5, 1.0],
            "top_k": [-1, 0, 40],
            "max_tokens": [1, 16],
            "max_tool_round_trips": [0, 2],
            "stop": ["END"],
            "first_generation_regex": ["[a-z ]+", r"<tool_call>.*</tool_call>"],
            "labels": [{}, {"team": "fuzz"}],
            "conversation_id": ids,
            "fork_conversation_id": ids,
            "call_id": ["call-1"],
            "data": [seed.export, seed.export[:-1], seed.export.replace(b"Be brief", b"Be rude.")],
            # Message fields named like the string hints above: their own values.
            "turnlog.v1.UpdateConversationRequest.conversation": [
                pb.Conversation(name=n, system_prompt="Be kind.", labels={"team": "fuzz"})
                for n in names
            ],
            "turnlog.v1.UpdateConversationRequest.update_mask": [
                field_mask_pb2.FieldMask(paths=[path]) for path in UPDATABLE_SETTINGS
            ],
        },
        strategies={
            "page_token": bogus_tokens,
            "after_position": positions,
            "first_generation_regex": regexes,
            "parameters_json_schema": nested_json,
        },
    )


def request_bodies(
    method: descriptor.MethodDescriptor, hint: Hints
) -> st.SearchStrategy[list[bytes]]:
    one = messages(method.input_type, hint).map(lambda m: m.SerializeToString())
    if not method.client_streaming or method.server_streaming:
        # A bidi stream gets one message: its first, so a rejection proves the log untouched.
        return st.lists(one, min_size=1, max_size=1)
    return st.lists(one, min_size=1, max_size=3)


# -- every RPC is fuzzed -------------------------------------------------------


async def test_every_registered_rpc_is_fuzzed(serving: Serving) -> None:
    """The server registers no RPC of its own that the fuzzer does not call."""
    stub = reflection_pb2_grpc.ServerReflectionStub(serving.channel)
    replies = [
        r
        async for r in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    ]
    registered = {s.name for s in replies[0].list_services_response.service}
    assert {s.full_name for s in SERVICES} <= registered
    pool = descriptor_pool.Default()
    for name in registered - INFRASTRUCTURE:
        for method in pool.FindServiceByName(name).methods:
            assert f"/{name}/{method.name}" in METHODS, f"{name}/{method.name} is not fuzzed"
    assert len(METHODS) >= 13  # today's RPCs: a lost descriptor would shrink the fuzz


@pytest.mark.parametrize("path", sorted(METHODS))
@pytest.mark.timeout(FUZZ_TIMEOUT_S)
@FUZZ
@given(data=st.data())
async def test_fuzzed_requests_end_cleanly(
    serving: Serving, path: str, data: st.DataObject
) -> None:
    method = METHODS[path]
    requests = data.draw(request_bodies(method, hints(serving)), label="requests")
    outcome = await check_call(serving, path, requests)
    event(f"{outcome.code.name} {outcome.info.reason if outcome.info else ''}".strip())
    first = message_factory.GetMessageClass(method.input_type).FromString(requests[0])
    expected = validation.violations(first)
    if expected and request_size(requests) <= MAX_RECEIVE_BYTES:
        # What the table finds is what the client is told, before anything runs.
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
        assert [f for f, _ in outcome.violations] == [f[:160] for f, _ in expected[:20]]
    assert await serving.health() == health_pb2.HealthCheckResponse.SERVING


# -- every table rule is exercised ---------------------------------------------


def _request_messages() -> list[descriptor.Descriptor]:
    """Every message type a request can contain, reachable from the RPCs' input types."""
    seen: dict[str, descriptor.Descriptor] = {}
    todo = [m.input_type for m in METHODS.values()]
    while todo:
        desc = todo.pop()
        if desc.full_name in seen or desc.full_name.startswith("google.protobuf."):
            continue
        seen[desc.full_name] = desc
        rules = validation.RULES.get(desc.full_name, {})
        for f in desc.fields:
            # An output-only field is ignored, not walked: its type needs no rows.
            if f.message_type is not None and rules.get(f.name) != validation.OUTPUT_ONLY:
                if f.message_type.GetOptions().map_entry:
                    continue
                todo.append(f.message_type)
    return list(seen.values())


def test_the_table_has_a_rule_for_every_request_field() -> None:
    """A new request field (or message, or RPC) cannot escape the validation table."""
    missing = [
        f"{desc.full_name}.{f.name}"
        for desc in _request_messages()
        for f in desc.fields
        if f.name not in validation.RULES.get(desc.full_name, {})
    ]
    assert missing == []


# -- hand-made cases -----------------------------------------------------------


def body(request: message.Message) -> list[bytes]:
    return [request.SerializeToString()]


@contextlib.asynccontextmanager
async def still_serving(serving: Serving) -> Any:
    yield
    assert await serving.health() == health_pb2.HealthCheckResponse.SERVING


def _not_messages() -> list[tuple[str, bytes]]:
    """(RPC, body) pairs of bodies that do not parse as the RPC's request type."""
    cases = []
    for path, method in sorted(METHODS.items()):
        for raw in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 11):
            cases.append((path, raw))
        strings = [f for f in method.input_type.fields if f.type == f.TYPE_STRING]
        if strings:  # a string field holding bytes that are not UTF-8
            cases.append((path, bytes([strings[0].number << 3 | 2, 2, 0xC3, 0x28])))
    return cases


async def test_a_body_that_is_not_a_message(serving: Serving) -> None:
    """Every RPC: INVALID_ARGUMENT (MALFORMED_MESSAGE) at once, no traceback, nothing written."""
    cases = _not_messages()
    assert {path for path, _ in cases} == set(METHODS)
    async with still_serving(serving):
        for path, raw in cases:
            outcome = await check_call(serving, path, [raw])
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (path, raw, outcome)
            assert outcome.info is not None
            assert outcome.info.reason == "MALFORMED_MESSAGE", (path, raw, outcome)
            assert outcome.info.metadata["messageType"] == METHODS[path].input_type.full_name


async def test_an_oversized_message_is_refused_by_grpc(serving: Serving) -> None:
    from turnlog.v1 import conversation_service_pb2 as spb

    big = spb.CreateConversationRequest(system_prompt="a" * (MAX_RECEIVE_BYTES + 1))
    async with still_serving(serving):
        outcome = await check_call(
            serving, "/turnlog.v1.ConversationService/CreateConversation", body(big)
        )
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED


S = "/turnlog.v1.ConversationService/"


def _cases(seed_name: str, turn_id: str) -> list[tuple[str, message.Message, set[str]]]:
    """(RPC, request, the fields its violations must name) for the gaps found by hand."""
    from google.protobuf import timestamp_pb2

    from turnlog.v1 import conversation_pb2 as pb
    from turnlog.v1 import conversation_service_pb2 as spb
    from turnlog.v1 import history_pb2 as hpb

    ti = spb.TurnInput
    deep = '{"a":' * 10_000 + "1" + "}" * 10_000
    bad_regex = pb.TurnDefaults(first_generation_regex="(unclosed")
    lookahead = pb.TurnDefaults(first_generation_regex="(?=a)b")
    return [
        (
            "CreateConversation",
            spb.CreateConversationRequest(system_prompt="p" * 2_000_000),
            {"system_prompt"},
        ),
        (
            "CreateConversation",
            spb.CreateConversationRequest(labels={"k": "v" * 10_000}),
            {"labels[k]"},
        ),
        (
            "CreateConversation",
            spb.CreateConversationRequest(labels={f"k{i}": "v" for i in range(65)}),
            {"labels"},
        ),
        (
            "CreateConversation",
            spb.CreateConversationRequest(
                tools=[pb.ToolDefinition(name="t", parameters_json_schema=deep)]
            ),
            {"tools[0].parameters_json_schema"},
        ),
        (
            "CreateConversation",
            spb.CreateConversationRequest(
                tools=[pb.ToolDefinition(name="t"), pb.ToolDefinition(name="t")]
            ),
            {"tools[1].name"},
        ),
        (
            "CreateConversation",
            spb.CreateConversationRequest(defaults=bad_regex),
            {"defaults.first_generation_regex"},
        ),
        (
            "CreateConversation",
            spb.CreateConversationRequest(
                defaults=pb.TurnDefaults(temperature=float("nan"), top_p=0.0, stop=[""])
            ),
            {"defaults.temperature", "defaults.top_p", "defaults.stop[0]"},
        ),
        (
            "SendMessage",
            spb.SendMessageRequest(
                input=ti(conversation=seed_name, content="hi", options=bad_regex)
            ),
            {"input.options.first_generation_regex"},
        ),
        (
            "SendMessage",
            spb.SendMessageRequest(
                input=ti(conversation=seed_name, content="hi", options=lookahead)
            ),
            {"input.options.first_generation_regex"},
        ),
        (
            "SendMessage",
            spb.SendMessageRequest(
                input=ti(conversation=seed_name, content="hi", expected_version=-1)
            ),
            {"input.expected_version"},
        ),
        (
            "StreamTurn",
            spb.StreamTurnRequest(
                start=ti(conversation=seed_name, content="hi", options=bad_regex)
            ),
            {"start.options.first_generation_regex"},
        ),
        ("StreamTurn", spb.StreamTurnRequest(), {"action"}),
        (
            "StreamTurn",
            spb.StreamTurnRequest(
                resume=spb.ResumeTurn(conversation=seed_name, turn_id=turn_id, after_sequence=-1)
            ),
            {"resume.after_sequence"},
        ),
        ("Converse", spb.ConverseRequest(), {"action"}),
        (
            "Converse",
            spb.ConverseRequest(
                user_message=ti(conversation=seed_name, content="hi", options=bad_regex)
            ),
            {"user_message.options.first_generation_regex"},
        ),
        ("Converse", spb.ConverseRequest(cancel=spb.CancelTurn()), {"cancel.turn_id"}),
        (
            "ListConversations",
            spb.ListConversationsRequest(
                create_time_after=timestamp_pb2.Timestamp(seconds=2**62),
                create_time_before=timestamp_pb2.Timestamp(seconds=0, nanos=-1),
            ),
            {"create_time_after", "create_time_before"},
        ),
        ("ListConversations", spb.ListConversationsRequest(page_size=-1), {"page_size"}),
        ("ListConversations", spb.ListConversationsRequest(page_token="!!"), {"page_token"}),
        (
            "ReadEvents",
            spb.ReadEventsRequest(conversation=seed_name, after_position="1-1"),
            {"after_position"},
        ),
        ("ReadEvents", spb.ReadEventsRequest(after_version=3), {"after_version"}),
        (
            "ReadEvents",
            spb.ReadEventsRequest(after_position="99999999999999999999-1", page_size=-1),
            {"after_position", "page_size"},
        ),
        ("ReadEvents", spb.ReadEventsRequest(after_position="²-1"), {"after_position"}),
        (
            "SubscribeEvents",
            spb.SubscribeEventsRequest(after_position="not-a-position"),
            {"after_position"},
        ),
        (
            "SubscribeEvents",
            spb.SubscribeEventsRequest(conversation=seed_name, after_version=2**63 - 1),
            {"after_version"},
        ),
        (
            "ExportConversation",
            spb.ExportConversationRequest(name=seed_name, format=99),
            {"format"},
        ),
        (
            "ExportConversation",
            spb.ExportConversationRequest(name=seed_name, format=hpb.EXPORT_FORMAT_UNSPECIFIED),
            {"format"},
        ),
        (
            "ForkConversation",
            spb.ForkConversationRequest(name=seed_name, version=0, fork_conversation_id="-x"),
            {"version", "fork_conversation_id"},
        ),
        (
            "GetConversation",
            spb.GetConversationRequest(name="conversations/'; DROP TABLE turnlog.events; --"),
            {"name"},
        ),
        (
            "CreateConversation",
            spb.CreateConversationRequest(
                conversation_id="abc\n", tools=[pb.ToolDefinition(name="t\n")]
            ),
            {"conversation_id", "tools[0].name"},
        ),
        ("GetConversation", spb.GetConversationRequest(name="conversations/abc\n"), {"name"}),
        ("ReadEvents", spb.ReadEventsRequest(after_position="1-1\n"), {"after_position"}),
    ]


async def test_malformed_requests_name_their_fields(serving: Serving) -> None:
    """The gaps found by hand: INVALID_ARGUMENT at once, naming exactly the bad fields."""
    async with still_serving(serving):
        for rpc, request, fields in _cases(serving.seed.active, serving.seed.turn_id):
            outcome = await check_call(serving, S + rpc, body(request))
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (rpc, outcome)
            assert outcome.info is not None
            assert outcome.info.reason == "INVALID_REQUEST", (rpc, outcome)
            assert {f for f, _ in outcome.violations} == fields, (rpc, outcome)


async def test_a_page_token_of_ours_is_bound_to_its_query(serving: Serving) -> None:
    from turnlog.v1 import conversation_service_pb2 as spb

    seed = serving.seed
    # The token of one conversation's events (never empty: a stream read is
    # not cut short by the all-stream read's watermark, which can leave an
    # all-conversations page without a token under load).
    token = seed.events_tokens[1]
    assert token
    tokens = [
        (spb.ReadEventsRequest(conversation=seed.archived, page_token=token), "page_token"),
        (spb.ReadEventsRequest(page_token=token), "page_token"),
        (spb.ReadEventsRequest(page_token=seed.events_tokens[2]), "page_token"),
        (spb.ListConversationsRequest(page_token=token), "page_token"),
    ]
    async with still_serving(serving):
        for request, name in tokens:
            rpc = (
                "ReadEvents" if isinstance(request, spb.ReadEventsRequest) else "ListConversations"
            )
            outcome = await check_call(serving, S + rpc, body(request))
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (request, outcome)
            assert outcome.info is not None
            assert [f for f, _ in outcome.violations] == [name], outcome


async def test_a_bad_message_later_in_a_stream_ends_it(serving: Serving) -> None:
    """Each message of a client stream passes the table too, not only the first."""
    from turnlog.v1 import conversation_service_pb2 as spb

    seed = serving.seed
    requests = [
        spb.ConverseRequest(
            tool_result=spb.ToolResult(turn_id=seed.turn_id, call_id="c", result="x" * 1_000_001)
        ),
    ]
    outcome = await check_call(serving, S + "Converse", [r.SerializeToString() for r in requests])
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in outcome.violations] == ["tool_result.result"]
    parts = [spb.ImportConversationRequest(data=seed.export[:10]).SerializeToString(), b"\xff\xff"]
    outcome = await check_call(serving, S + "ImportConversation", parts)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert outcome.info is not None
    assert outcome.info.reason == "MALFORMED_MESSAGE"


def test_docs_list_the_table() -> None:
    """docs/validation.md shows the limits the code applies, row for row."""
    doc = (Path(__file__).parents[2] / "docs" / "validation.md").read_text()
    shown = doc.split("<!-- rules:begin -->\n")[1].split("<!-- rules:end -->")[0]
    rows = ["| message | field | valid values |", "|---|---|---|"]
    rows += [
        f"| `{m.removeprefix('turnlog.v1.')}` | `{f}` | {d} |"
        for m, f, d in validation.describe_table()
    ]
    assert shown.splitlines() == rows


async def test_an_import_file_with_hostile_values(serving: Serving) -> None:
    """Valid JSONL whose values PostgreSQL cannot store as they are: refused cleanly."""
    from turnlog.v1 import conversation_service_pb2 as spb

    lines = serving.seed.export.decode().splitlines(keepends=True)
    hostile = [
        ('"type":"ConversationCreated"', '"type":"Conversation\\u0000Created"'),
        ('"stream_id":"conversation-seed-active"', '"stream_id":"conversation-seed\\u0000"'),
        ('"stream_version":1,', '"stream_version":99999999999999999999,'),
        ('"recorded_at":"', '"recorded_at":"0000'),
    ]
    async with still_serving(serving):
        for old, new in hostile:
            changed = "".join([lines[0], lines[1].replace(old, new), *lines[2:]])
            assert changed != serving.seed.export.decode()
            parts = [spb.ImportConversationRequest(data=changed.encode()).SerializeToString()]
            outcome = await check_call(serving, S + "ImportConversation", parts)
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (new, outcome)
