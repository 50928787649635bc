"""Request messages to application inputs, validated.

Every check adds a field violation instead of failing at once, so a client
learns every bad field of a request in one `INVALID_ARGUMENT` (a
`google.rpc.BadRequest` with one violation per field, reason
`INVALID_REQUEST`).
"""

from __future__ import annotations

import re

from google.protobuf import timestamp_pb2

from turnlog import errors
from turnlog.api.status import FieldViolationsError
from turnlog.conversation.application import TurnInput, TurnOptions
from turnlog.domain import events as ev
from turnlog.history.service import EventQuery
from turnlog.storage import Position
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MAX_REQUEST_ID = 128
MAX_CONTENT_CHARS = 1_000_000
MAX_PAGE_SIZE = 500
MAX_REGEX_CHARS = 4096
MAX_EVENTS_PAGE = 1000
DEFAULT_EVENTS_PAGE = 100
MAX_EVENT_TYPES = 64
#: The largest JSONL file ImportConversation accepts (bytes, all parts together).
MAX_IMPORT_BYTES = 256 * 1024 * 1024


_CONTEXT_POLICIES = {
    pb.CONTEXT_POLICY_DISABLED: ev.ContextPolicy.DISABLED,
    pb.CONTEXT_POLICY_TRUNCATE: ev.ContextPolicy.TRUNCATE,
    pb.CONTEXT_POLICY_COMPACT: ev.ContextPolicy.COMPACT,
}


class Violations:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise FieldViolationsError(self.items)


def conversation_id(name: str, field: str, v: Violations) -> str:
    prefix, _, cid = name.partition("/")
    if prefix != "conversations" or not ID_PATTERN.match(cid):
        v.add(field, "must be conversations/{id} with an id of 1-63 letters, digits, - or _")
    return cid


def check_request_id(value: str, field: str, v: Violations) -> None:
    if len(value) > MAX_REQUEST_ID:
        v.add(field, f"at most {MAX_REQUEST_ID} characters")


def turn_options(message: pb.TurnDefaults, field: str, v: Violations) -> TurnOptions:
    if message.HasField("temperature") and not 0 <= message.temperature <= 2:
        v.add(f"{field}.temperature", "must be between 0 and 2")
    if message.HasField("top_p") and not 0 < message.top_p <= 1:
        v.add(f"{field}.top_p", "must be in (0, 1]")
    if message.HasField("max_tokens") and message.max_tokens < 1:
        v.add(f"{field}.max_tokens", "must be at least 1")
    if message.HasField("max_tool_round_trips") and not 0 <= message.max_tool_round_trips <= 32:
        v.add(f"{field}.max_tool_round_trips", "must be between 0 and 32")
    if len(message.stop) > 16:
        v.add(f"{field}.stop", "at most 16 stop strings")
    if message.HasField("first_generation_regex") and not (
        0 < len(message.first_generation_regex) <= MAX_REGEX_CHARS
    ):
        v.add(f"{field}.first_generation_regex", f"1-{MAX_REGEX_CHARS} characters")
    policy = None
    if message.HasField("context_policy"):
        policy = _CONTEXT_POLICIES.get(message.context_policy)
        if policy is None:
            v.add(f"{field}.context_policy", "must be DISABLED, TRUNCATE or COMPACT")
    return TurnOptions(
        model=message.model if message.HasField("model") else None,
        sampling=ev.SamplingParams(
            temperature=message.temperature if message.HasField("temperature") else None,
            top_p=message.top_p if message.HasField("top_p") else None,
            top_k=message.top_k if message.HasField("top_k") else None,
            max_tokens=message.max_tokens if message.HasField("max_tokens") else None,
            seed=message.seed if message.HasField("seed") else None,
            stop=tuple(message.stop),
            regex=(
                message.first_generation_regex
                if message.HasField("first_generation_regex")
                else None
            ),
        ),
        max_tool_round_trips=(
            message.max_tool_round_trips if message.HasField("max_tool_round_trips") else None
        ),
        context_policy=policy,
        strict_max_tokens=(
            message.strict_max_tokens if message.HasField("strict_max_tokens") else None
        ),
    )


def turn_input(message: spb.TurnInput, field: str, v: Violations) -> TurnInput:
    cid = conversation_id(message.conversation, f"{field}.conversation", v)
    check_request_id(message.request_id, f"{field}.request_id", v)
    if not message.content.strip():
        v.add(f"{field}.content", "must not be empty")
    elif len(message.content) > MAX_CONTENT_CHARS:
        v.add(f"{field}.content", f"at most {MAX_CONTENT_CHARS} characters")
    options = turn_options(message.options, f"{field}.options", v)
    return TurnInput(
        conversation_id=cid,
        content=message.content,
        request_id=message.request_id,
        options=options,
        expected_version=(
            message.expected_version if message.HasField("expected_version") else None
        ),
    )


def microseconds(ts: timestamp_pb2.Timestamp) -> int:
    return int(ts.ToMicroseconds())


def event_query(
    request: spb.ReadEventsRequest | spb.SubscribeEventsRequest, v: Violations
) -> EventQuery:
    cid: str | None = None
    if request.conversation:
        cid = conversation_id(request.conversation, "conversation", v)
        if request.after_position:
            v.add("after_position", "only for all conversations; use after_version")
    elif request.after_version:
        v.add("after_version", "only with a conversation; use after_position")
    if request.after_version < 0:
        v.add("after_version", "must not be negative")
    position = Position(0, 0)
    if request.after_position:
        try:
            position = Position.parse(request.after_position)
        except errors.InvalidArgumentError:
            v.add("after_position", "not a position from a LogEvent or CaughtUp")
    if len(request.event_types) > MAX_EVENT_TYPES:
        v.add("event_types", f"at most {MAX_EVENT_TYPES} types")
    for i, name in enumerate(request.event_types):
        if not name or len(name) > 128:
            v.add(f"event_types[{i}]", "1-128 characters")
    return EventQuery(
        conversation_id=cid,
        after_version=request.after_version,
        after_position=position,
        types=frozenset(request.event_types) if request.event_types else None,
    )
