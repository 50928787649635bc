"""Request messages to application inputs, and the request limits.

Parsing only: every request has passed `validation.RULES` (the one table of
field limits, applied by the `RequestValidation` interceptor) before a
handler calls these, so a field here is already known to be well formed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from turnlog.conversation.application import TurnInput, TurnOptions, UpdateConversation
from turnlog.domain import events as ev
from turnlog.history.service import EventQuery
from turnlog.storage import Position
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import history_pb2 as hpb

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MAX_REQUEST_ID = 128
MAX_CONTENT_CHARS = 1_000_000
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
MAX_REGEX_CHARS = 4096
MAX_EVENTS_PAGE = 1000
DEFAULT_EVENTS_PAGE = 100
MAX_EVENT_TYPES = 64
#: ListTurns' and ListMessages' page sizes, and GetConversation's message and
#: turn limits: the default (for 0) and the most (a larger one is coerced).
DEFAULT_TURNS_PAGE, MAX_TURNS_PAGE = 50, 500
DEFAULT_MESSAGES_PAGE, MAX_MESSAGES_PAGE = 100, 1000
DEFAULT_CONVERSATION_LIMIT, MAX_CONVERSATION_LIMIT = 100, 1000
#: The largest JSONL file ImportConversation accepts (bytes, all parts together).
MAX_IMPORT_BYTES = 256 * 1024 * 1024


_CONTEXT_POLICIES = {
    pb.CONTEXT_POLICY_DISABLED: ev.ContextPolicy.DISABLED,
    pb.CONTEXT_POLICY_TRUNCATE: ev.ContextPolicy.TRUNCATE,
    pb.CONTEXT_POLICY_COMPACT: ev.ContextPolicy.COMPACT,
}


def conversation_id(name: str) -> str:
    """The id in a validated "conversations/{id}"."""
    return name.partition("/")[2]


def turn_options(message: pb.TurnDefaults) -> TurnOptions:
    policy = (
        _CONTEXT_POLICIES[message.context_policy] if message.HasField("context_policy") else None
    )
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


def turn_input(message: spb.TurnInput, *, tenant: str) -> TurnInput:
    """The turn command of `message`, for the caller's `tenant`."""
    return TurnInput(
        tenant=tenant,
        conversation_id=conversation_id(message.conversation),
        content=message.content,
        request_id=message.request_id,
        options=turn_options(message.options),
        expected_version=(
            message.expected_version if message.HasField("expected_version") else None
        ),
    )


def tool_definitions(tools: Iterable[pb.ToolDefinition]) -> tuple[ev.ToolDefinition, ...]:
    return tuple(
        ev.ToolDefinition(
            name=tool.name,
            description=tool.description,
            parameters_json_schema=tool.parameters_json_schema or "{}",
            client_side=tool.client_side,
        )
        for tool in tools
    )


def update_command(request: spb.UpdateConversationRequest, *, tenant: str) -> UpdateConversation:
    """The update of `request` (its mask checked by the validation table), for `tenant`."""
    c = request.conversation
    return UpdateConversation(
        tenant=tenant,
        conversation_id=conversation_id(c.name),
        fields=tuple(request.update_mask.paths),
        system_prompt=c.system_prompt,
        tools=tool_definitions(c.tools),
        defaults=turn_options(c.defaults),
        labels=tuple(sorted(c.labels.items())),
        guardrail_profile=c.guardrail_profile,
        request_id=request.request_id,
        expected_version=(
            request.expected_version if request.HasField("expected_version") else None
        ),
    )


def microseconds(ts: timestamp_pb2.Timestamp) -> int:
    return int(ts.ToMicroseconds())


def event_query(
    request: spb.ReadEventsRequest | spb.SubscribeEventsRequest, *, tenant: str | None
) -> EventQuery:
    """The history query of `request`, limited to `tenant` (None: every tenant)."""
    return EventQuery(
        tenant=tenant,
        conversation_id=conversation_id(request.conversation) if request.conversation else None,
        after_version=request.after_version,
        after_position=(
            Position.parse(request.after_position) if request.after_position else Position(0, 0)
        ),
        types=frozenset(request.event_types) if request.event_types else None,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class EventView:
    """The forms in which `LogEvent` carries each payload: stored text, typed event or both."""

    raw: bool
    typed: bool


_EVENT_VIEWS = {
    hpb.EVENT_VIEW_UNSPECIFIED: EventView(raw=True, typed=False),
    hpb.EVENT_VIEW_RAW: EventView(raw=True, typed=False),
    hpb.EVENT_VIEW_TYPED: EventView(raw=False, typed=True),
    hpb.EVENT_VIEW_BOTH: EventView(raw=True, typed=True),
}


def event_view(request: spb.ReadEventsRequest | spb.SubscribeEventsRequest) -> EventView:
    """The payload forms `request` asks for (unspecified: the stored text only)."""
    return _EVENT_VIEWS[request.view]
