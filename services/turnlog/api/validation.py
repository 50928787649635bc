"""Every request field's limits in one table, applied before any handler runs.

`RULES` names, per request message of `turnlog.v1`, each field and what a
valid value is: a length in code points or UTF-8 bytes (always said which),
a pattern, a range, enum membership, a regular expression that must compile
in the engine's dialect, a JSON object of bounded size and depth, a page
token or log position of the right shape. `REQUIRED_ONEOFS` and `CHECKS`
add what involves more than one field. `Timestamp` and `Duration` fields
are range-checked wherever they occur, by type. A nested message is checked
by its own type's rules, with its path as the prefix (`input.options.top_p`).

`violations` walks a message and returns every violation at once;
`RequestValidation`, a server interceptor, applies it to every request of
every RPC the server registers (each message of a client stream too) and
turns a body that does not parse into INVALID_ARGUMENT (`MALFORMED_MESSAGE`)
instead of gRPC's UNKNOWN with a logged traceback. `tests/robustness` proves
that every field of every request message has a row here, so a new field
cannot escape it. docs/validation.md lists the limits.

The handlers keep the checks that need the application (does the
conversation exist, is the page token one of ours).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import grpc
from google.protobuf import descriptor, duration_pb2, message, timestamp_pb2

from turnlog import errors
from turnlog.api.requests import (
    DEFAULT_CONVERSATION_LIMIT,
    DEFAULT_EVENTS_PAGE,
    DEFAULT_MESSAGES_PAGE,
    DEFAULT_PAGE_SIZE,
    DEFAULT_TURNS_PAGE,
    ID_PATTERN,
    MAX_CONTENT_CHARS,
    MAX_CONVERSATION_LIMIT,
    MAX_EVENT_TYPES,
    MAX_EVENTS_PAGE,
    MAX_MESSAGES_PAGE,
    MAX_PAGE_SIZE,
    MAX_REGEX_CHARS,
    MAX_REQUEST_ID,
    MAX_TURNS_PAGE,
    TOOL_NAME_PATTERN,
)
from turnlog.api.status import Context, FieldViolationsError, abort
from turnlog.domain import codec
from turnlog.domain.events import UPDATABLE_SETTINGS
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import history_pb2 as hpb

Violation = tuple[str, str]

INT64_MAX: Final = 2**63 - 1
#: Timestamp range of google/protobuf/timestamp.proto: 0001-01-01T00:00:00Z to
#: 9999-12-31T23:59:59.999999999Z.
TIMESTAMP_MIN_SECONDS: Final = -62_135_596_800
TIMESTAMP_MAX_SECONDS: Final = 253_402_300_799
#: Duration range of google/protobuf/duration.proto: about ±10,000 years.
DURATION_MAX_SECONDS: Final = 315_576_000_000

MAX_SYSTEM_PROMPT_BYTES: Final = 256 * 1024
MAX_TOOLS: Final = 64
MAX_TOOL_DESCRIPTION_BYTES: Final = 16 * 1024
MAX_TOOL_SCHEMA_BYTES: Final = 64 * 1024
MAX_JSON_DEPTH: Final = 32
MAX_LABELS: Final = 64
MAX_LABEL_KEY_CHARS: Final = 63
MAX_LABEL_VALUE_CHARS: Final = 256
MAX_NAME_CHARS: Final = 128
MAX_STOP_STRINGS: Final = 16
MAX_STOP_CHARS: Final = 256
MAX_TOOL_RESULT_CHARS: Final = MAX_CONTENT_CHARS
MAX_REASON_CHARS: Final = 4096
MAX_TOOL_RESULTS: Final = 64
MAX_PAGE_TOKEN_CHARS: Final = 1024
MAX_TOOL_ROUND_TRIPS: Final = 32

NAME_PATTERN: Final = re.compile(r"^conversations/[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
TOKEN_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
PAGE_TOKEN_PATTERN: Final = re.compile(r"^[A-Za-z0-9_=-]*$")
POSITION_PATTERN: Final = re.compile(r"^([0-9]{1,19})-([0-9]{1,19})$")
GUARDRAIL_PROFILE_PATTERN: Final = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")
# What the engine's structured-output backend (xgrammar) cannot parse although
# Python's `re` can: lookaround, named/flag/conditional groups (any "(?" but
# "(?:"), backreferences and the anchors/classes \b \B \A \Z \z \G \p \P \k.
_UNSUPPORTED_REGEX: Final = re.compile(r"\(\?(?!:)|\\[1-9bBAZzGpPkK]")


# -- rules ---------------------------------------------------------------------


class Rule:
    """One field's constraint; `check` returns what is wrong, or None."""

    def check(self, value: Any) -> str | None:
        raise NotImplementedError

    def describe(self) -> str:
        """The limit in words (for docs and messages)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Unchecked(Rule):
    """Any value of the field's type is valid (said explicitly, with why)."""

    why: str

    def check(self, value: Any) -> str | None:
        return None

    def describe(self) -> str:
        return f"any ({self.why})"


@dataclass(frozen=True)
class Text(Rule):
    """A string: length in code points or UTF-8 bytes, optional pattern, not blank."""

    max_chars: int | None = None
    max_bytes: int | None = None
    pattern: re.Pattern[str] | None = None
    shape: str = ""
    required: bool = False
    not_blank: bool = False

    def check(self, value: Any) -> str | None:
        text = str(value)
        if self.max_chars is not None and len(text) > self.max_chars:
            return f"at most {self.max_chars} characters (code points)"
        if self.max_bytes is not None and len(text.encode()) > self.max_bytes:
            return f"at most {self.max_bytes} bytes (UTF-8)"
        if not text:
            return "required" if self.required or self.not_blank else None
        if self.not_blank and not text.strip():
            return "must not be blank"
        # fullmatch: "$" alone lets a trailing newline through ("abc\n").
        if self.pattern is not None and not self.pattern.fullmatch(text):
            return f"must be {self.shape}"
        return None

    def describe(self) -> str:
        parts = []
        if self.required or self.not_blank:
            parts.append("required" + (", not blank" if self.not_blank else ""))
        if self.max_chars is not None:
            parts.append(f"at most {self.max_chars:,} code points")
        if self.max_bytes is not None:
            parts.append(f"at most {self.max_bytes:,} UTF-8 bytes")
        if self.shape:
            parts.append(self.shape)
        return "; ".join(parts)


@dataclass(frozen=True)
class Range(Rule):
    """A number in [low, high] (`low_open`: low itself excluded); NaN never is."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def check(self, value: Any) -> str | None:
        if value != value:  # NaN
            return f"must be {self.describe()}"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {self.describe()}"
        if self.high is not None and value > self.high:
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        def show(x: float) -> str:
            return f"{x:g}" if isinstance(x, float) else f"{x:,}"

        if self.low is not None and self.high is not None:
            left = "(" if self.low_open else "["
            return f"in {left}{show(self.low)}, {show(self.high)}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '≥'} {show(self.low)}"
        assert self.high is not None
        return f"≤ {show(self.high)}"


@dataclass(frozen=True)
class KnownName(Rule):
    """One of a set of names, compared exactly (the set is said in words, not listed)."""

    names: frozenset[str]
    shape: str

    def check(self, value: Any) -> str | None:
        return None if value in self.names else f"must be {self.shape}"

    def describe(self) -> str:
        return self.shape


@dataclass(frozen=True)
class Member(Rule):
    """An enum value among `allowed` (by number; unknown numbers never are)."""

    enum: descriptor.EnumDescriptor
    allowed: frozenset[int]

    def check(self, value: Any) -> str | None:
        return None if value in self.allowed else f"must be {self.describe()}"

    def describe(self) -> str:
        names = [v.name for v in self.enum.values if v.number in self.allowed]
        return " or ".join(names)


@dataclass(frozen=True)
class EngineRegex(Rule):
    """A regular expression the engine's structured output can compile."""

    max_chars: int

    def check(self, value: Any) -> str | None:
        if not 0 < len(value) <= self.max_chars:
            return f"1-{self.max_chars} characters (code points)"
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError) as e:
            return f"not a regular expression ({type(e).__name__})"
        if _UNSUPPORTED_REGEX.search(value):
            return "uses a construct the engine cannot compile (lookaround, (?...) groups, backreferences, \\b \\A \\Z \\p)"
        return None

    def describe(self) -> str:
        return (
            f"1-{self.max_chars:,} code points; compiles as a regular expression without "
            "lookaround, (?...) groups other than (?:...), backreferences or \\b \\B \\A \\Z \\G \\p \\k"
        )


@dataclass(frozen=True)
class JsonObject(Rule):
    """JSON text of an object (or empty), bounded in UTF-8 bytes and nesting depth."""

    max_bytes: int
    max_depth: int

    def check(self, value: Any) -> str | None:
        if not value:
            return None
        if len(value.encode()) > self.max_bytes:
            return f"at most {self.max_bytes} bytes (UTF-8)"
        if _json_depth(value) > self.max_depth:
            return f"nested at most {self.max_depth} levels deep"
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return "must be a JSON object"
        return None if isinstance(parsed, dict) else "must be a JSON object"

    def describe(self) -> str:
        return f"a JSON object (or empty); at most {self.max_bytes:,} UTF-8 bytes, nested ≤ {self.max_depth} levels"


@dataclass(frozen=True)
class Position(Rule):
    """A log position as `LogEvent`, `CaughtUp` and `Checkpoint` write it."""

    def check(self, value: Any) -> str | None:
        if not value:
            return None
        found = POSITION_PATTERN.fullmatch(value)
        if found is None or max(int(found[1]), int(found[2])) > INT64_MAX:
            return "not a position from a LogEvent, CaughtUp or Checkpoint"
        return None

    def describe(self) -> str:
        return (
            "empty, or a position from a LogEvent, CaughtUp or Checkpoint "
            "(digits-digits, each < 2^63)"
        )


@dataclass(frozen=True)
class Items(Rule):
    """A repeated field: at most `max_items`, each checked by `each`."""

    max_items: int
    each: Rule

    def check(self, value: Any) -> str | None:
        return f"at most {self.max_items} items" if len(value) > self.max_items else None

    def describe(self) -> str:
        return f"at most {self.max_items} items, each {self.each.describe()}"


@dataclass(frozen=True)
class Entries(Rule):
    """A map field: at most `max_entries`; keys and values checked."""

    max_entries: int
    key: Text
    value: Text

    def check(self, value: Any) -> str | None:
        return f"at most {self.max_entries} entries" if len(value) > self.max_entries else None

    def describe(self) -> str:
        return (
            f"at most {self.max_entries} entries; keys {self.key.describe()}; "
            f"values {self.value.describe()}"
        )


@dataclass(frozen=True)
class Nested(Rule):
    """A message field: checked by its own type's rows of `RULES`."""

    def check(self, value: Any) -> str | None:
        return None

    def describe(self) -> str:
        return "checked by its message type's rules"


@dataclass(frozen=True)
class PageSize(Rule):
    """A page size or limit (AIP-158): 0 is the default, above the most is coerced, negative is invalid."""

    default: int
    maximum: int

    def check(self, value: Any) -> str | None:
        return "must be ≥ 0" if value < 0 else None

    def describe(self) -> str:
        return f"≥ 0; 0 means {self.default:,}, above {self.maximum:,} reads as {self.maximum:,}"


@dataclass(frozen=True)
class MaskPaths(Rule):
    """A `google.protobuf.FieldMask`: required, each path among `paths`."""

    paths: tuple[str, ...]

    def check(self, value: Any) -> str | None:
        if not value.paths:
            return f"required: name the fields to replace ({', '.join(self.paths)})"
        for path in value.paths:
            if path not in self.paths:
                return f"{path[:64]!r} is not a path this update takes ({', '.join(self.paths)})"
        return None

    def describe(self) -> str:
        return f"required; paths among {', '.join(self.paths)}"


def _json_depth(text: str) -> int:
    """How deeply brackets nest in JSON text (strings skipped), without parsing."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


# -- the table -----------------------------------------------------------------

CONVERSATION_NAME: Final = Text(
    required=True,
    pattern=NAME_PATTERN,
    shape="conversations/{id}, an id of 1-63 letters, digits, - or _",
)
OPTIONAL_CONVERSATION_NAME: Final = Text(
    pattern=NAME_PATTERN, shape="empty or conversations/{id}, an id of 1-63 letters, digits, - or _"
)
REQUEST_ID: Final = Text(max_chars=MAX_REQUEST_ID)
CONVERSATION_ID: Final = Text(pattern=ID_PATTERN, shape="empty or 1-63 letters, digits, - or _")
TURN_ID: Final = Text(
    required=True, pattern=TOKEN_ID_PATTERN, shape="1-128 letters, digits, _ . : -"
)
VERSION: Final = Range(low=1, high=INT64_MAX)
EXPECTED_VERSION: Final = Range(low=0, high=INT64_MAX)
AFTER: Final = Range(low=0, high=INT64_MAX - 1)
LABELS: Final = Entries(
    MAX_LABELS,
    key=Text(required=True, max_chars=MAX_LABEL_KEY_CHARS),
    value=Text(max_chars=MAX_LABEL_VALUE_CHARS),
)
# AIP-158: a size above the maximum is coerced (conversation.paging.page_size), not refused.
PAGE_SIZE: Final = PageSize(default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
EVENTS_PAGE_SIZE: Final = PageSize(default=DEFAULT_EVENTS_PAGE, maximum=MAX_EVENTS_PAGE)
PAGE_TOKEN: Final = Text(
    max_chars=MAX_PAGE_TOKEN_CHARS,
    pattern=PAGE_TOKEN_PATTERN,
    shape="empty or a next_page_token from a previous response",
)
EVENT_TYPES: Final = Items(
    MAX_EVENT_TYPES,
    # Only names the domain's event registry knows: a misspelt type would
    # otherwise select nothing, silently (and a name reaches SQL as a text
    # parameter, which cannot hold NUL).
    each=KnownName(
        names=frozenset(codec.EVENT_CLASSES),
        shape="the name of an event type the server records (a LogEvent.event member's type, "
        "e.g. TurnCompleted)",
    ),
)
EVENT_VIEW: Final = Member(
    hpb.EventView.DESCRIPTOR,
    frozenset(
        {
            hpb.EVENT_VIEW_UNSPECIFIED,
            hpb.EVENT_VIEW_RAW,
            hpb.EVENT_VIEW_TYPED,
            hpb.EVENT_VIEW_BOTH,
        }
    ),
)

#: The rule of a message field a request may carry but the server ignores
#: (AIP-203 output-only fields): not walked, so nothing below it is checked.
OUTPUT_ONLY: Final = Unchecked("output only; ignored")
UPDATE_MASK: Final = MaskPaths(UPDATABLE_SETTINGS)
SYSTEM_PROMPT: Final = Text(max_bytes=MAX_SYSTEM_PROMPT_BYTES)
GUARDRAIL_PROFILE: Final = Text(
    pattern=GUARDRAIL_PROFILE_PATTERN, shape="empty or 1-64 letters, digits, _ . -"
)

#: Per request message (full name): every field's rule. Nested message types
#: have rows of their own; `Nested()` marks where they are used.
RULES: Final[Mapping[str, Mapping[str, Rule]]] = {
    spb.CreateConversationRequest.DESCRIPTOR.full_name: {
        "request_id": REQUEST_ID,
        "conversation_id": CONVERSATION_ID,
        "system_prompt": SYSTEM_PROMPT,
        "defaults": Nested(),
        "tools": Items(MAX_TOOLS, each=Nested()),
        "guardrail_profile": GUARDRAIL_PROFILE,
        "labels": LABELS,
    },
    pb.TurnDefaults.DESCRIPTOR.full_name: {
        "model": Text(max_chars=MAX_NAME_CHARS),
        "temperature": Range(low=0.0, high=2.0),
        "top_p": Range(low=0.0, high=1.0, low_open=True),
        "top_k": Range(low=-1, high=2**31 - 1),
        "max_tokens": Range(low=1, high=2**31 - 1),
        "seed": Unchecked("every 64-bit seed is a seed"),
        "stop": Items(MAX_STOP_STRINGS, each=Text(required=True, max_chars=MAX_STOP_CHARS)),
        "max_tool_round_trips": Range(low=0, high=MAX_TOOL_ROUND_TRIPS),
        "first_generation_regex": EngineRegex(MAX_REGEX_CHARS),
        "context_policy": Member(
            pb.ContextPolicy.DESCRIPTOR,
            frozenset(
                {pb.CONTEXT_POLICY_DISABLED, pb.CONTEXT_POLICY_TRUNCATE, pb.CONTEXT_POLICY_COMPACT}
            ),
        ),
        "strict_max_tokens": Unchecked("a flag"),
    },
    pb.ToolDefinition.DESCRIPTOR.full_name: {
        "name": Text(
            required=True,
            pattern=TOOL_NAME_PATTERN,
            shape="a function name (letters, digits, _ . -)",
        ),
        "description": Text(max_bytes=MAX_TOOL_DESCRIPTION_BYTES),
        "parameters_json_schema": JsonObject(MAX_TOOL_SCHEMA_BYTES, MAX_JSON_DEPTH),
        "client_side": Unchecked("a flag"),
    },
    spb.GetConversationRequest.DESCRIPTOR.full_name: {
        "name": CONVERSATION_NAME,
        "version": VERSION,
        "message_limit": PageSize(DEFAULT_CONVERSATION_LIMIT, MAX_CONVERSATION_LIMIT),
        "turn_limit": PageSize(DEFAULT_CONVERSATION_LIMIT, MAX_CONVERSATION_LIMIT),
    },
    spb.ListConversationsRequest.DESCRIPTOR.full_name: {
        "page_size": PAGE_SIZE,
        "page_token": PAGE_TOKEN,
        "labels": LABELS,
        "create_time_after": Nested(),
        "create_time_before": Nested(),
        "show_archived": Unchecked("a flag"),
    },
    spb.ArchiveConversationRequest.DESCRIPTOR.full_name: {
        "name": CONVERSATION_NAME,
        "expected_version": EXPECTED_VERSION,
    },
    spb.CompactConversationRequest.DESCRIPTOR.full_name: {
        "name": CONVERSATION_NAME,
        "request_id": REQUEST_ID,
        "expected_version": EXPECTED_VERSION,
    },
    spb.TurnInput.DESCRIPTOR.full_name: {
        "conversation": CONVERSATION_NAME,
        "request_id": REQUEST_ID,
        "content": Text(not_blank=True, max_chars=MAX_CONTENT_CHARS),
        "options": Nested(),
        "expected_version": EXPECTED_VERSION,
    },
    spb.SendMessageRequest.DESCRIPTOR.full_name: {
        "input": Nested(),
    },
    spb.StreamTurnRequest.DESCRIPTOR.full_name: {
        "start": Nested(),
        "resume": Nested(),
    },
    spb.ResumeTurn.DESCRIPTOR.full_name: {
        "conversation": CONVERSATION_NAME,
        "turn_id": TURN_ID,
        "after_sequence": Range(low=0, high=INT64_MAX - 1),
    },
    spb.ConverseRequest.DESCRIPTOR.full_name: {
        "user_message": Nested(),
        "tool_result": Nested(),
        "cancel": Nested(),
    },
    spb.ToolResult.DESCRIPTOR.full_name: {
        # Required in Converse (CHECKS); in SubmitToolResults, empty or the request's.
        "turn_id": Text(
            pattern=TOKEN_ID_PATTERN,
            shape="1-128 letters, digits, _ . : - (empty only in SubmitToolResults)",
        ),
        "call_id": Text(required=True, max_chars=MAX_REQUEST_ID),
        "result": Text(max_chars=MAX_TOOL_RESULT_CHARS),
        "error": Text(max_chars=MAX_REASON_CHARS),
    },
    spb.CancelTurn.DESCRIPTOR.full_name: {
        "turn_id": TURN_ID,
        "reason": Text(max_chars=MAX_REASON_CHARS),
    },
    spb.CancelTurnRequest.DESCRIPTOR.full_name: {
        "conversation": CONVERSATION_NAME,
        "turn_id": TURN_ID,
        "reason": Text(max_chars=MAX_REASON_CHARS),
    },
    spb.SubmitToolResultsRequest.DESCRIPTOR.full_name: {
        "conversation": CONVERSATION_NAME,
        "turn_id": TURN_ID,
        "results": Items(MAX_TOOL_RESULTS, each=Nested()),
    },
    spb.ReadEventsRequest.DESCRIPTOR.full_name: {
        "conversation": OPTIONAL_CONVERSATION_NAME,
        "after_version": AFTER,
        "after_position": Position(),
        "event_types": EVENT_TYPES,
        "page_size": EVENTS_PAGE_SIZE,
        "page_token": PAGE_TOKEN,
        "view": EVENT_VIEW,
    },
    spb.SubscribeEventsRequest.DESCRIPTOR.full_name: {
        "conversation": OPTIONAL_CONVERSATION_NAME,
        "after_version": AFTER,
        "after_position": Position(),
        "event_types": EVENT_TYPES,
        "view": EVENT_VIEW,
    },
    spb.ForkConversationRequest.DESCRIPTOR.full_name: {
        "name": CONVERSATION_NAME,
        "version": VERSION,
        "fork_conversation_id": CONVERSATION_ID,
        "request_id": REQUEST_ID,
    },
    spb.VerifyConversationRequest.DESCRIPTOR.full_name: {
        "name": CONVERSATION_NAME,
    },
    spb.ExportConversationRequest.DESCRIPTOR.full_name: {
        "name": CONVERSATION_NAME,
        "format": Member(
            hpb.ExportFormat.DESCRIPTOR,
            frozenset({hpb.EXPORT_FORMAT_JSONL, hpb.EXPORT_FORMAT_ATIF}),
        ),
        "version": VERSION,
    },
    spb.ImportConversationRequest.DESCRIPTOR.full_name: {
        "data": Unchecked("any bytes; all parts together at most 256 MiB"),
    },
    spb.UpdateConversationRequest.DESCRIPTOR.full_name: {
        "conversation": Nested(),
        "update_mask": UPDATE_MASK,
        "expected_version": EXPECTED_VERSION,
        "request_id": REQUEST_ID,
    },
    # Only as UpdateConversationRequest.conversation: the settings it replaces
    # have CreateConversationRequest's limits; the rest is output only.
    pb.Conversation.DESCRIPTOR.full_name: {
        "name": CONVERSATION_NAME,
        "version": OUTPUT_ONLY,
        "create_time": OUTPUT_ONLY,
        "state": OUTPUT_ONLY,
        "system_prompt": SYSTEM_PROMPT,
        "defaults": Nested(),
        "tools": Items(MAX_TOOLS, each=Nested()),
        "guardrail_profile": GUARDRAIL_PROFILE,
        "labels": LABELS,
        "messages": OUTPUT_ONLY,
        "turns": OUTPUT_ONLY,
        "fork_origin": OUTPUT_ONLY,
        "context_window": OUTPUT_ONLY,
        "message_count": OUTPUT_ONLY,
        "turn_count": OUTPUT_ONLY,
    },
    spb.UnarchiveConversationRequest.DESCRIPTOR.full_name: {
        "name": CONVERSATION_NAME,
        "expected_version": EXPECTED_VERSION,
    },
    spb.ListTurnsRequest.DESCRIPTOR.full_name: {
        "conversation": CONVERSATION_NAME,
        "page_size": PageSize(DEFAULT_TURNS_PAGE, MAX_TURNS_PAGE),
        "page_token": PAGE_TOKEN,
    },
    spb.ListMessagesRequest.DESCRIPTOR.full_name: {
        "conversation": CONVERSATION_NAME,
        "page_size": PageSize(DEFAULT_MESSAGES_PAGE, MAX_MESSAGES_PAGE),
        "page_token": PAGE_TOKEN,
        "turn_id": Text(pattern=TOKEN_ID_PATTERN, shape="empty or 1-128 letters, digits, _ . : -"),
        "newest_first": Unchecked("a flag"),
    },
}

#: Oneofs of which one member must be set.
REQUIRED_ONEOFS: Final[Mapping[str, Sequence[str]]] = {
    spb.StreamTurnRequest.DESCRIPTOR.full_name: ("action",),
    spb.ConverseRequest.DESCRIPTOR.full_name: ("action",),
}


def _event_scope(request: Any) -> list[Violation]:
    found = []
    if request.conversation and request.after_position:
        found.append(("after_position", "only for all conversations; use after_version"))
    if not request.conversation and request.after_version:
        found.append(("after_version", "only with a conversation; use after_position"))
    return found


def _unique_tool_names(request: Any) -> list[Violation]:
    names = [tool.name for tool in request.tools]
    return [
        (f"tools[{i}].name", "names must be unique")
        for i, name in enumerate(names)
        if name in names[:i]
    ]


def _update_target(request: Any) -> list[Violation]:
    found = []
    if not request.HasField("conversation"):
        found.append(("conversation.name", "required"))
    if problem := UPDATE_MASK.check(request.update_mask):
        found.append(("update_mask", problem))
    return found


def _strict_is_per_turn(request: Any) -> list[Violation]:
    if request.defaults.HasField("strict_max_tokens"):
        return [("defaults.strict_max_tokens", "a turn option only")]
    return []


def _results_of_one_turn(request: Any) -> list[Violation]:
    if not request.results:
        return [("results", "at least 1 item")]
    found = []
    seen: set[str] = set()
    for i, result in enumerate(request.results):
        if result.turn_id and result.turn_id != request.turn_id:
            found.append((f"results[{i}].turn_id", "empty or the request's turn_id"))
        if result.call_id in seen:
            found.append((f"results[{i}].call_id", "each result answers a different call"))
        seen.add(result.call_id)
    return found


def _converse_result_names_its_turn(request: Any) -> list[Violation]:
    if request.WhichOneof("action") == "tool_result" and not request.tool_result.turn_id:
        return [("tool_result.turn_id", "required")]
    return []


#: Rules across fields of one message.
CHECKS: Final[Mapping[str, Sequence[Callable[[Any], list[Violation]]]]] = {
    spb.ReadEventsRequest.DESCRIPTOR.full_name: (_event_scope,),
    spb.SubscribeEventsRequest.DESCRIPTOR.full_name: (_event_scope,),
    spb.CreateConversationRequest.DESCRIPTOR.full_name: (
        _unique_tool_names,
        _strict_is_per_turn,
    ),
    spb.SubmitToolResultsRequest.DESCRIPTOR.full_name: (_results_of_one_turn,),
    spb.ConverseRequest.DESCRIPTOR.full_name: (_converse_result_names_its_turn,),
    spb.UpdateConversationRequest.DESCRIPTOR.full_name: (_update_target,),
    pb.Conversation.DESCRIPTOR.full_name: (_unique_tool_names, _strict_is_per_turn),
}


def _check_table() -> None:
    """Fails at import when a row names a field its message does not have."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    for name, fields in RULES.items():
        known = pool.FindMessageTypeByName(name).fields_by_name
        unknown = set(fields) - set(known)
        if unknown:
            raise AssertionError(f"validation table: {name} has no field(s) {sorted(unknown)}")


_check_table()


# -- applying it ---------------------------------------------------------------


def _time_range(value: message.Message, max_seconds: int, min_seconds: int) -> str | None:
    seconds, nanos = value.seconds, value.nanos  # type: ignore[attr-defined]
    if not min_seconds <= seconds <= max_seconds:
        return "out of range"
    if isinstance(value, timestamp_pb2.Timestamp) and not 0 <= nanos <= 999_999_999:
        return "nanos must be in [0, 999999999]"
    if isinstance(value, duration_pb2.Duration) and (
        not -999_999_999 <= nanos <= 999_999_999
        or (seconds and nanos and (seconds > 0) != (nanos > 0))
    ):
        return "nanos must be in [-999999999, 999999999] with the sign of seconds"
    return None


def _well_known(value: message.Message, path: str, found: list[Violation]) -> bool:
    if isinstance(value, timestamp_pb2.Timestamp):
        problem = _time_range(value, TIMESTAMP_MAX_SECONDS, TIMESTAMP_MIN_SECONDS)
        if problem:
            found.append((path, f"a time from 0001-01-01 to 9999-12-31 ({problem})"))
        return True
    if isinstance(value, duration_pb2.Duration):
        problem = _time_range(value, DURATION_MAX_SECONDS, -DURATION_MAX_SECONDS)
        if problem:
            found.append((path, f"a duration within ±10,000 years ({problem})"))
        return True
    return False


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _walk(value: message.Message, prefix: str, found: list[Violation]) -> None:
    desc = value.DESCRIPTOR
    rules = RULES.get(desc.full_name, {})
    for oneof in REQUIRED_ONEOFS.get(desc.full_name, ()):
        if value.WhichOneof(oneof) is None:
            members = " or ".join(f.name for f in desc.oneofs_by_name[oneof].fields)
            found.append((_join(prefix, oneof), f"{members} is required"))
    for field in desc.fields:
        path = _join(prefix, field.name)
        rule = rules.get(field.name)
        is_message = field.type == descriptor.FieldDescriptor.TYPE_MESSAGE
        if rule == OUTPUT_ONLY:
            continue
        repeated = field.is_repeated
        if repeated:
            items = getattr(value, field.name)
            if rule is not None and (problem := rule.check(items)):
                found.append((path, problem))
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                _walk_map(items, path, rule, found)
            elif is_message:
                for i, item in enumerate(items):
                    _walk_nested(item, f"{path}[{i}]", found)
            elif isinstance(rule, Items):
                for i, item in enumerate(items):
                    if problem := rule.each.check(item):
                        found.append((f"{path}[{i}]", problem))
            continue
        if field.has_presence and not value.HasField(field.name):
            continue
        item = getattr(value, field.name)
        if is_message:
            _walk_nested(item, path, found)
        elif rule is not None and (problem := rule.check(item)):
            found.append((path, problem))
    for check in CHECKS.get(desc.full_name, ()):
        found.extend((_join(prefix, f), d) for f, d in check(value))


def _walk_nested(value: message.Message, path: str, found: list[Violation]) -> None:
    if not _well_known(value, path, found):
        _walk(value, path, found)


def _walk_map(items: Any, path: str, rule: Rule | None, found: list[Violation]) -> None:
    if not isinstance(rule, Entries):
        return
    for key in items:
        if problem := rule.key.check(key):
            found.append((path, f"keys: {problem}"))
            continue
        if problem := rule.value.check(items[key]):
            found.append((f"{path}[{key}]", problem))


def violations(request: message.Message) -> list[Violation]:
    """Every violation of `RULES` in a request message, with field paths."""
    found: list[Violation] = []
    _walk(request, "", found)
    return found


def check(request: message.Message) -> None:
    """Raises `FieldViolationsError` (INVALID_ARGUMENT) when `request` breaks a rule."""
    found = violations(request)
    if found:
        raise FieldViolationsError(found)


# -- the interceptor -----------------------------------------------------------


class MalformedMessageError(errors.InvalidArgumentError):
    """A request body is not a message of the RPC's request type."""

    reason = "MALFORMED_MESSAGE"


class _Unparsable:
    """What the request deserializer returns for bytes that are not a message."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> MalformedMessageError:
        return MalformedMessageError(
            f"the request is not a valid {self.type_name} message",
            metadata={"messageType": self.type_name},
        )


def _tolerant(
    deserializer: Callable[[bytes], Any] | None, type_name: str
) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    unparsable = _Unparsable(type_name)

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except (message.DecodeError, ValueError, RecursionError):
            return unparsable

    return parse


def _request_error(request: Any) -> errors.TurnlogError | None:
    if isinstance(request, _Unparsable):
        return request.error()
    if isinstance(request, message.Message):
        found = violations(request)
        if found:
            return FieldViolationsError(found)
    return None


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        error = _request_error(request)
        if error is not None:
            raise error
        yield request


def _type_name(method: str) -> str:
    """The request type's full name of `/package.Service/Method` (for messages)."""
    from google.protobuf import descriptor_pool

    service, _, name = method.lstrip("/").rpartition("/")
    try:
        found = descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
    except KeyError:
        return "request"
    full_name: str = found.input_type.full_name
    return full_name


def guarded(handler: Handler, method: str) -> Handler:
    """`handler` with its requests validated by `RULES` and unparsable bodies refused.

    Unary requests are checked before the handler runs (the call ends with
    the status at once); each message of a client stream is checked as the
    handler reads it, so the error reaches the handler's own error mapping.
    """
    parse = _tolerant(handler.request_deserializer, _type_name(method))
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary: Any = handler.unary_unary

        async def checked_unary_unary(request: Any, context: Context) -> Any:
            error = _request_error(request)
            if error is not None:
                await abort(context, error)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(cast(Any, checked_unary_unary), parse, serialize)
    if handler.unary_stream is not None:
        unary_stream: Any = handler.unary_stream
        if not inspect.isasyncgenfunction(unary_stream):
            # A handler that writes with context.write (grpc_health's Watch):
            # it must not become a generator, gRPC refuses the two styles mixed.
            async def checked_writer(request: Any, context: Context) -> Any:
                error = _request_error(request)
                if error is not None:
                    await abort(context, error)
                return await unary_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(cast(Any, checked_writer), parse, serialize)

        async def checked_unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            error = _request_error(request)
            if error is not None:
                await abort(context, error)
            async with contextlib.aclosing(unary_stream(request, context)) as responses:
                async for response in responses:
                    yield response

        return grpc.unary_stream_rpc_method_handler(
            cast(Any, checked_unary_stream), parse, serialize
        )
    if handler.stream_unary is not None:
        stream_unary: Any = handler.stream_unary

        async def checked_stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
            return await stream_unary(_checked(requests), context)

        return grpc.stream_unary_rpc_method_handler(
            cast(Any, checked_stream_unary), parse, serialize
        )
    stream_stream: Any = handler.stream_stream
    assert stream_stream is not None
    if not inspect.isasyncgenfunction(stream_stream):

        async def checked_stream_writer(requests: AsyncIterator[Any], context: Context) -> Any:
            return await stream_stream(_checked(requests), context)

        return grpc.stream_stream_rpc_method_handler(
            cast(Any, checked_stream_writer), parse, serialize
        )

    async def checked_stream_stream(
        requests: AsyncIterator[Any], context: Context
    ) -> AsyncIterator[Any]:
        async with contextlib.aclosing(stream_stream(_checked(requests), context)) as responses:
            async for response in responses:
                yield response

    return grpc.stream_stream_rpc_method_handler(cast(Any, checked_stream_stream), parse, serialize)


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.aio.ServerInterceptor


class RequestValidation(_Interceptor):
    """Applies `RULES` to every request of every RPC, before its handler reads it."""

    def __init__(self) -> None:
        # The guarded handler of each method, built once (per registered handler).
        self._guarded: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        # None for a method no service registers (gRPC answers UNIMPLEMENTED);
        # grpc-stubs does not say so.
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return cast(Handler, None)
        method = handler_call_details.method
        known = self._guarded.get(method)
        if known is None or known[0] is not handler:
            known = self._guarded[method] = (handler, guarded(handler, method))
        return known[1]


def describe_table() -> Iterable[tuple[str, str, str]]:
    """(message, field, limit in words) for every row of `RULES`, for docs."""
    for name, fields in RULES.items():
        for field, rule in fields.items():
            yield name, field, rule.describe()


__all__ = [
    "CHECKS",
    "OUTPUT_ONLY",
    "REQUIRED_ONEOFS",
    "RULES",
    "MalformedMessageError",
    "RequestValidation",
    "check",
    "describe_table",
    "guarded",
    "violations",
]
